"""CUDA graphs for decode steps: one graph per padded batch size, persistent buffers.

`DecodeGraphs` captures `step(bs)` for every batch size in `capture_sizes(max_bs)`
(largest first, one shared memory pool). `step(bs)` must read its inputs only from
persistent device buffers (sliced to `[:bs]`); what it returns (tensors allocated in
the graph's pool, kept alive here) is what `replay(bs)` returns: replaying then needs
no allocation and no host work beyond filling the first `bs` rows of the inputs. Rows between the real batch and the padded
size must hold harmless values (the caller's job: e.g. slot -1 = no KV write,
length 1 over a scratch block).
"""
from __future__ import annotations

import bisect
import gc
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("aiosched")


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 and every 16 beyond: padding wastes < 8 rows."""
    sizes = [s for s in (1, 2, 3, 4) if s <= max_bs]
    sizes += list(range(8, min(max_bs, 256) + 1, 8))
    sizes += list(range(272, max_bs + 1, 16))
    if max_bs not in sizes:
        sizes.append(max_bs)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, step: Callable[[int], Any], max_bs: int, device: torch.device | str, sizes: list[int] | None = None,
                 prepare: Callable[[int], None] | None = None, name: str = "decode") -> None:
        self.step = step
        self.prepare = prepare  # fills the inputs for size bs with harmless values, outside the graph
        self.name = name
        self.device = torch.device(device)
        self.sizes = sorted(sizes) if sizes is not None else capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Any] = {}  # step(bs)'s return value in the graph's memory
        self.pool = None

    def padded(self, bs: int) -> int | None:
        """The smallest captured size >= bs, or None when bs is beyond the largest."""
        i = bisect.bisect_left(self.sizes, bs)
        return self.sizes[i] if i < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self, warmup: int = 2) -> float:
        """Capture every size (largest first, so later graphs fit in its pool); returns seconds."""
        import time

        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        gc.collect()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):
                if self.prepare is not None:
                    self.prepare(bs)
                for _ in range(warmup):  # compile Triton kernels, let cuBLAS pick, outside the capture
                    self.step(bs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for bs in reversed(self.sizes):
            if self.prepare is not None:
                self.prepare(bs)
                torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, stream=stream):
                self.outputs[bs] = self.step(bs)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[bs] = g
        torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        log.info("captured %d %s graphs (sizes %d..%d) in %.1f s", len(self.graphs), self.name, self.sizes[0], self.max_bs, dt)
        return dt

    def replay(self, bs: int) -> Any:
        """Replay the graph for `bs` (padded up); returns its outputs (those of `step` at the padded size)."""
        pb = self.padded(bs)
        if pb is None:
            raise ValueError(f"batch {bs} exceeds the largest captured graph ({self.max_bs})")
        self.graphs[pb].replay()
        return self.outputs[pb]
