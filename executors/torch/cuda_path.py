"""What is CUDA-only in the torch runner: fused kernels on, CUDA graphs of the model's step.

The step itself is the runner's (`TorchModelRunner.model_step`: the model's forward, the
LM head on the logits rows, the greedy argmax written into the token buffer) over the
inputs `InputBatch.device_inputs` derives on the device from one packed staging array.
This module only decides when that step is replayed from a graph, and captures it:

- **Decode steps** (every row samples one token; batch up to `cuda_graph_max_batch`):
  one graph per padded batch size (1-4, 8, 16, ... 256), split-K decode attention.
- **Prefill and mixed steps**, and speculative verification: one graph per padded
  *token count* (16, 32, 64, 128, 192, 256, 384, 512, ... up to
  `min(max_num_batched_tokens, 4096)`), varlen attention, a fixed number of logits rows.
  Steps with a prompt-logprobs request (they need every position's logits) and steps
  beyond the largest graph run eagerly, as does every step under `enforce_eager`.
- Models with sliding-window or soft-capped attention layers are not captured: those
  layers run the torch attention over host block tables, which a graph cannot replay.

- **Speculative steps** on a mixed-step layout: the propose phase (drafts into the token
  buffer) and the greedy verify phase (acceptance, the accepted tokens and counts written
  on the device) each replay a graph of their own for the same padded size, around the
  forward's replay: every phase reads only the staged step (its speculative section:
  `Layout.o_spec`) and persistent buffers (`spec_decode.SpecBuffers`), at fixed shapes
  (P = S request slots, the whole buffer row as history). Sampling verification (a
  temperature, min_tokens bans) runs eagerly on the same fixed shapes.

Padding is `InputBatch`'s (scratch row, position -1 = no KV write, empty request slots).
Non-greedy rows and sampling extras resample on the graph's logits (the runner's `_sample`).
`idle_probe` records CUDA events around each step (`aiosched bench`: device idle time).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from aiosched.executors.torch import fused_ops
from aiosched.executors.torch.attention import triton_paged as tp
from aiosched.executors.torch.cuda_graphs import DecodeGraphs, capture_sizes
from aiosched.executors.torch.input_batch import Layout, ScheduledStep

log = logging.getLogger("aiosched")

MIXED_MAX_TOKENS = 4096  # larger prefill steps run eagerly (device-bound there: launch overhead matters less)


def mixed_sizes(max_tokens: int) -> list[int]:
    """Padded token counts of the mixed-step graphs: 16, 32, 64, 128, then x1.5 / x2 steps
    (padding wastes < 50% of a small step, < 33% of a large one), capped at max_tokens."""
    sizes = [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    out = [t for t in sizes if t < max_tokens]
    if max_tokens >= 16:
        out.append(max_tokens)
    return out


def graphable(args: Any) -> bool:
    """Every attention layer runs on the Triton kernels (no window, no soft-capping)."""
    return args.attn_logit_softcap is None and all(args.window_of(i) is None for i in range(args.num_layers))


class FastPath:
    def __init__(self, runner: Any, use_graphs: bool | None = None) -> None:
        self.r = runner
        self.batch = batch = runner.batch
        cfg, a, dev = runner.config, runner.model.args, runner.device
        R = batch.max_rows
        self.decode_workspace = tp.DecodeWorkspace(R, a.num_heads, a.head_dim, 16, dev)
        self.argmax_workspace = fused_ops.argmax_workspace(batch.max_tokens, a.vocab_size, dev)
        self.num_heads, self.num_kv_heads = a.num_heads, a.num_kv_heads
        self.mixed_bq = tp.varlen_block_q(a.num_heads, a.num_kv_heads, 2)
        sizes = mixed_sizes(min(cfg.max_num_batched_tokens, MIXED_MAX_TOKENS))
        # Speculative steps beyond max_num_seqs tokens have more logits rows than a mixed
        # step of their size (1 + k per verified request): their own graphs, at the verify
        # layout (below that size both layouts are the same).
        self.verify_sizes = [t for t in sizes if t > R] if runner.spec_bufs is not None else []
        rows = max([R] + [self._layout(t, False, verify=True).S for t in self.verify_sizes])
        # What a graph replay leaves for the host side: one buffer for every graph (a
        # padded step has at most max_num_seqs logits rows, a verify step 1 + k per request).
        self.logits = torch.zeros((rows, a.vocab_size), dtype=runner.model.embed_tokens.weight.dtype, device=dev)
        self.sampled = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.stats = {"graph_steps": 0, "eager_steps": 0, "mixed_graph_steps": 0, "spec_steps": 0, "spec_padded_steps": 0,
                      "spec_max_logits_rows": 0, "spec_rows_eager": 0, "spec_propose_graphs": 0, "spec_verify_graphs": 0}
        self.idle_probe: list[tuple[Any, ...]] | None = None  # per step while measuring: CUDA events, host times, kind
        self._replay_mark: Any = None  # while probing: an event recorded right before the step's graph replay
        # tests: run the graphs' padded layouts (decode and mixed) without capturing them (no CUDA needed)
        self.padded_eager = False
        self.graphs: DecodeGraphs | None = None
        self.mixed: DecodeGraphs | None = None
        self.verify_mixed: DecodeGraphs | None = None  # speculative steps' forward, sizes > max_num_seqs
        self.spec_graphs: tuple[DecodeGraphs, DecodeGraphs] | None = None  # (propose, greedy verify) by mixed size
        if use_graphs is None:
            use_graphs = dev.type == "cuda" and not cfg.enforce_eager and graphable(a)
        # Relative (speculative) rows' host lengths are needed only by host-list attention layers.
        batch.fused_host_lists = not graphable(a)
        runner.fast = self  # the runner's model_step reads this path's workspaces, also while capturing below
        if use_graphs:
            max_bs = min(cfg.cuda_graph_max_batch, R)
            self.graphs = self._capture(capture_sizes(max_bs), decode=True, name="decode")
            if sizes:
                self.mixed = self._capture(sizes, decode=False, name="mixed-step")
                if self.verify_sizes:
                    self.verify_mixed = self._capture(self.verify_sizes, decode=False, name="verify-step", verify=True)
                if runner.spec_bufs is not None:
                    # each speculative phase at the verify layouts
                    self.spec_graphs = (self._capture(sizes, False, "spec-propose", True, self._padded_propose),
                                        self._capture(sizes, False, "spec-verify", True, self._padded_verify))

    @property
    def num_graphs(self) -> int:
        return sum(len(g.graphs) for g in (self.graphs, self.mixed, self.verify_mixed, *(self.spec_graphs or ())) if g is not None)

    def block_q(self, step: ScheduledStep) -> int:
        """Query tokens per varlen attention tile of an eager step."""
        return tp.varlen_block_q(self.num_heads, self.num_kv_heads, max(step.qlens))

    # ------------------------------------------------------------ graphs

    def _layout(self, size: int, decode: bool, verify: bool = False) -> Layout:
        return self.batch.padded_layout(size, decode, self.mixed_bq, verify)

    def _padded_step(self, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """The runner's step over the padded layout in the staging buffer: (logits, argmax tokens)."""
        inputs = self.batch.device_inputs(self.batch.stage.dev, layout, True, self.decode_workspace)
        _, logits, tokens = self.r.model_step(inputs, argmax=True, logits_out=self.logits, tokens_out=self.sampled)
        return logits, tokens

    def _capture(self, sizes: list[int], decode: bool, name: str, verify: bool = False,
                 run: Callable[[Layout], Any] | None = None) -> DecodeGraphs:
        """One graph per size of `run` (default: the model's step) at the padded layouts."""
        run = run or self._padded_step

        def prepare(size: int) -> None:  # all padding: harmless warm-up and capture inputs
            self.batch.upload(None, self._layout(size, decode, verify))

        graphs = DecodeGraphs(lambda size: run(self._layout(size, decode, verify)), sizes[-1], self.r.device, sizes,
                              prepare=prepare, name=name)
        with torch.inference_mode():
            graphs.capture()
        return graphs

    def _padded_propose(self, layout: Layout) -> torch.Tensor:
        """The propose phase over a padded layout's speculative section (the whole row as history)."""
        from aiosched.executors.torch.spec_decode import propose_step

        rows, ks, setv, _ = self.batch.spec_views(self.batch.stage.dev, layout)
        return propose_step(self.batch, self.r.spec_bufs, rows, ks, setv, self.batch.row_len, self.r.config.speculative)

    def _padded_verify(self, layout: Layout) -> torch.Tensor:
        """The greedy verify phase over a padded layout: the forward's argmax rows (`sampled`) against the drafts."""
        from aiosched.executors.torch.spec_decode import greedy_accepts, verify_step

        rows, _, _, slot = self.batch.spec_views(self.batch.stage.dev, layout)
        tok = self.sampled[:layout.S]
        bufs = self.r.spec_bufs
        return verify_step(self.batch, bufs, tok, greedy_accepts(bufs, tok, slot), rows, slot)

    def spec_propose(self, layout: Layout) -> None:
        """Run the propose phase of the speculative step staged at a padded layout."""
        if self.spec_graphs is not None:
            self.stats["spec_propose_graphs"] += 1
            self.spec_graphs[0].replay(layout.T)
        else:  # padded_eager
            self._padded_propose(layout)

    def spec_verify(self, layout: Layout) -> torch.Tensor:
        """Run the greedy verify phase of the step staged at a padded layout (after its
        forward): returns the [P, K1 + 2] emitted tokens / counts / drafts found."""
        if self.spec_graphs is not None:
            self.stats["spec_verify_graphs"] += 1
            return self.spec_graphs[1].replay(layout.T)
        return self._padded_verify(layout)

    def graph_layout(self, step: ScheduledStep, eager_only: bool) -> Layout | None:
        """The padded layout whose graph runs this step, or None (eager)."""
        if step.decode_only:
            size = self._padded_rows(len(step.states))
            return self._layout(size, True) if size is not None else None
        if eager_only or max(step.qlens) < 2:
            return None
        size = self._padded_tokens(step.num_tokens)
        if size is None:
            return None
        verify, n = step.verify is not None, len(step.logit_rows)
        layout = self._layout(size, False, verify)
        if verify:
            self.stats["spec_max_logits_rows"] = max(self.stats["spec_max_logits_rows"], n)
        if n > layout.S:
            self.stats["spec_rows_eager"] += verify  # (never: a verify layout has room for 1 + k rows per request)
            return None
        self.stats["spec_padded_steps"] += verify
        return layout

    def _padded_rows(self, B: int) -> int | None:
        if self.graphs is not None:
            return self.graphs.padded(B)
        if not self.padded_eager:
            return None
        return next((n for n in capture_sizes(min(self.r.config.cuda_graph_max_batch, self.batch.max_rows)) if n >= B), None)

    def _padded_tokens(self, T: int) -> int | None:
        if self.mixed is not None:
            return self.mixed.padded(T)
        if not self.padded_eager:
            return None
        sizes = mixed_sizes(min(self.r.config.max_num_batched_tokens, MIXED_MAX_TOKENS))
        return next((t for t in sizes if t >= T), None)

    def replay(self, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the step already uploaded at `layout`: (logits, argmax tokens) of its logits rows."""
        # (a layout with more logits rows than request slots is a verify step's: its own graphs)
        graphs = self.graphs if layout.decode else self.verify_mixed if layout.S > self.batch.max_rows else self.mixed
        self.stats["graph_steps" if layout.decode else "mixed_graph_steps"] += 1
        if self.idle_probe is not None:
            self._replay_mark = torch.cuda.Event(enable_timing=True)
            self._replay_mark.record()
        if graphs is not None:
            return graphs.replay(layout.T)
        return self._padded_step(layout)  # padded_eager

    # ------------------------------------------------------------ idle probe

    def timed(self, run: Callable[..., Any], *args: Any, add_s: float = 0.0) -> Any:
        """run(*args) between two CUDA events while probing; also the host's time in it
        (the launch), the time the runner spent before it on the step's new and freed
        requests (`add_s`), and the kind of step (the stats counter it moved)."""
        if self.idle_probe is None:
            return run(*args)
        before = dict(self.stats)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        self._replay_mark = None
        pending = run(*args)
        end.record()
        t1 = time.perf_counter()
        kind = ",".join(k for k, v in self.stats.items() if v != before.get(k)) or "other"
        self.idle_probe.append((start, end, t0, t1, add_s, kind, self._replay_mark))
        return pending

    def idle_report(self) -> dict[str, Any] | None:
        """Accelerator time between steps over the probed steps, from CUDA events (no
        profiler): a step is busy from its first enqueued op to its last; the gap from one
        step's end to the next one's start is the device waiting for the host.

        `by_kind` splits the steps by kind (graph_steps, mixed_graph_steps, ...): the gaps
        before them, their device time and the host's launch time. A gap is `host_late`
        when the host entered the next step's launch after the device had finished the
        step before (host and device clocks aligned at the first step, when the device
        is idle): the device then waited for the engine's own work, not for a launch.

        A step's busy time starts when the device reaches its first op, which the host
        enqueues before it builds the step: the device may then wait *inside* the step
        for the launch thread to enqueue the graph. `before_replay_ms` (graph steps: from
        the step's start to an event recorded right before the replay; the input copy
        and block-table update, microseconds, are in it too) is that wait, and
        `idle_or_waiting_share` counts it with the gaps."""
        ev, self.idle_probe = self.idle_probe, None
        if not ev or len(ev) < 2:
            return None
        ev[-1][1].synchronize()
        busy_of = [s.elapsed_time(e) for s, e, *_ in ev]
        gaps = [max(0.0, ev[i][1].elapsed_time(ev[i + 1][0])) for i in range(len(ev) - 1)]
        span = ev[0][0].elapsed_time(ev[-1][1])
        h0 = ev[0][2]
        late = [(ev[i + 1][2] - h0) * 1e3 >= ev[0][0].elapsed_time(ev[i][1]) for i in range(len(ev) - 1)]
        by_kind: dict[str, dict[str, float]] = {}
        before_replay = 0.0
        for i, (start, _, t0, t1, add_s, kind, mark) in enumerate(ev):
            k = by_kind.setdefault(kind, {"steps": 0, "device_ms": 0.0, "launch_ms": 0.0, "add_ms": 0.0, "gap_before_ms": 0.0,
                                          "host_late_gaps": 0, "host_late_ms": 0.0, "before_replay_ms": 0.0})
            k["steps"] += 1
            k["device_ms"] += busy_of[i]
            if mark is not None:
                w = max(0.0, start.elapsed_time(mark))
                k["before_replay_ms"] += w
                before_replay += w
            k["launch_ms"] += (t1 - t0) * 1e3
            k["add_ms"] += add_s * 1e3
            if i:
                k["gap_before_ms"] += gaps[i - 1]
                if late[i - 1]:
                    k["host_late_gaps"] += 1
                    k["host_late_ms"] += gaps[i - 1]
        for k in by_kind.values():  # means per step of that kind, totals for the gaps
            n = k["steps"]
            k["device_ms_mean"], k["launch_ms_mean"], k["add_ms_mean"] = k["device_ms"] / n, k["launch_ms"] / n, k["add_ms"] / n
        cadence = [(ev[i + 1][2] - ev[i][2]) * 1e3 for i in range(len(ev) - 1)]
        return {"steps": len(ev), "span_ms": span, "busy_ms": sum(busy_of), "idle_ms": sum(gaps),
                "idle_share": sum(gaps) / span if span else 0.0, "before_replay_ms": before_replay,
                "idle_or_waiting_share": (sum(gaps) + before_replay) / span if span else 0.0, "max_gap_ms": max(gaps), "gaps_over_50us": sum(g > 0.05 for g in gaps),
                "host_late_ms": sum(g for g, l in zip(gaps, late) if l), "host_cadence_ms_mean": sum(cadence) / len(cadence),
                "by_kind": by_kind}
