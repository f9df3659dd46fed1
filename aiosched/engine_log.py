"""What the engine tells an operator through `logging` (all under the `aiosched` logger).

- `aiosched.engine`, INFO, once: the startup line (model, architecture, dtype, device,
  executor, KV blocks and tokens, max_model_len, CUDA graphs captured, time to ready).
- `aiosched.stats`, INFO, every `log_stats_interval_s` seconds while there is work:
  prompt and generation throughput, running / waiting requests, KV cache usage, prefix
  cache hit rate, preemptions (as vLLM's "Avg prompt throughput ..." line).
- `aiosched.requests`, INFO, only with `log_requests = true`: each request's arrival
  (prompt length, sampling parameters; never the prompt text) and finish (reason,
  tokens, queue time, TTFT, end-to-end latency).

Libraries leave handlers to the application; `aiosched` commands install one
(`--log-level`, `configure_logging`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from aiosched.outputs import RequestOutput
from aiosched.sampling_params import SamplingParams

if TYPE_CHECKING:
    from aiosched.engine import AsyncEngine

engine_log = logging.getLogger("aiosched.engine")
stats_log = logging.getLogger("aiosched.stats")
request_log = logging.getLogger("aiosched.requests")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | int = "info") -> Callable[[], None]:
    """One stderr handler on the `aiosched` logger at `level` (what `--log-level` sets).

    The logger stops propagating to the root, so an application's basicConfig does not
    print each line twice; calling again only changes the level. Returns a function that
    restores the logger as it was (the CLI calls it when the command ends, so running a
    command in-process leaves the host's logging alone)."""
    lvl = level if isinstance(level, int) else logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        raise ValueError(f"log-level: must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    root = logging.getLogger("aiosched")
    saved = (list(root.handlers), root.level, root.propagate)
    root.setLevel(lvl)
    if not any(getattr(h, "_aiosched", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._aiosched = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False

    def restore() -> None:
        root.handlers[:], root.level, root.propagate = saved

    return restore


# ---------------------------------------------------------------- startup


def architecture(engine: "AsyncEngine") -> str:
    """config.json's `architectures[0]` (or model_type), '-' when there is none."""
    cfg: dict[str, Any] = engine.tokenizer.model_config if engine.tokenizer is not None else {}
    model = engine.config.resolved_model
    if not cfg and model is not None and engine.config.executor != "remote":
        try:
            with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            cfg = {}
    archs = cfg.get("architectures") or []
    return str(archs[0]) if archs else str(cfg.get("model_type") or "-")


def startup_line(engine: "AsyncEngine", ready_s: float) -> str:
    info, cfg = engine.info, engine.config
    assert info is not None
    model = cfg.resolved_model or "(none)"
    tp = f" x{cfg.tensor_parallel_size} (tensor parallel)" if cfg.tensor_parallel_size > 1 else ""
    return (f"ready in {ready_s:.1f}s: model {model} ({architecture(engine)}), dtype {info.dtype}, device {info.device}, "
            f"executor {cfg.executor}{tp}, runner {info.runner}, KV cache {info.num_kv_blocks} blocks = "
            f"{info.num_kv_blocks * info.block_size} tokens (block size {info.block_size}), max_model_len {info.max_model_len}, "
            f"CUDA graphs captured {info.cuda_graphs}, async scheduling {'on' if cfg.async_scheduling else 'off'}")


def on_started(engine: "AsyncEngine", ready_s: float) -> "asyncio.Task[None] | None":
    """Called by AsyncEngine.start(): log the startup line, attach the request logger,
    and start the periodic stats task (returned; the engine cancels it on shutdown)."""
    engine_log.info("%s", startup_line(engine, ready_s))
    if engine.config.log_requests:
        engine.add_observer(RequestLogger())
    if engine.config.log_stats_interval_s <= 0:
        return None
    stats = engine.stats_logger = StatsLogger(engine)
    return asyncio.get_running_loop().create_task(stats.run(engine.config.log_stats_interval_s), name="aiosched-stats-log")


# ---------------------------------------------------------------- periodic stats


class StatsLogger:
    """Throughput over the last interval and the engine's state now, one line per interval."""

    def __init__(self, engine: "AsyncEngine") -> None:
        self.engine = engine
        s = engine.stats()
        self._last_time = time.monotonic()
        self._last_prompt = int(s.get("prompt_tokens", 0))
        self._last_generated = int(s.get("generated_tokens", 0))
        self._last_preemptions = 0

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens to compute (prefix-cache hits excluded) of every request admitted so far.
        Read from the engine's counters: this logger is not an output observer, so it
        adds nothing to the engine's per-output work."""
        return int(self.engine.stats().get("prompt_tokens", 0))

    def line(self) -> str | None:
        """The line for the interval since the previous call; None when the engine was idle."""
        s = self.engine.stats()
        now = time.monotonic()
        dt = max(now - self._last_time, 1e-9)
        prompt, generated = int(s.get("prompt_tokens", 0)), int(s.get("generated_tokens", 0))
        preemptions = int(s.get("preemptions", 0))
        d_prompt, d_gen = prompt - self._last_prompt, generated - self._last_generated
        d_preempt = preemptions - self._last_preemptions
        self._last_time, self._last_prompt, self._last_generated, self._last_preemptions = now, prompt, generated, preemptions
        running, waiting = int(s.get("num_running", 0)), int(s.get("num_waiting", 0))
        if not (d_prompt or d_gen or running or waiting):
            return None
        return (f"Avg prompt throughput: {d_prompt / dt:.1f} tokens/s, Avg generation throughput: {d_gen / dt:.1f} tokens/s, "
                f"Running: {running} reqs, Waiting: {waiting} reqs, KV cache usage: {100 * float(s.get('kv_usage', 0.0)):.1f}%, "
                f"Prefix cache hit rate: {100 * float(s.get('prefix_cache_hit_rate', 0.0)):.1f}%, Preemptions: {d_preempt}")

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            text = self.line()
            if text is not None:
                stats_log.info("%s", text)


# ---------------------------------------------------------------- per request


def _params_summary(params: SamplingParams) -> str:
    """The fields that differ from SamplingParams() (the full struct is long)."""
    default = SamplingParams()
    parts = []
    for f in msgspec.structs.fields(SamplingParams):
        v = getattr(params, f.name)
        if v != getattr(default, f.name):
            parts.append(f"{f.name}={v!r}")
    return ", ".join(parts) or "defaults"


class RequestLogger:
    """One line when a request arrives and one when it finishes (`log_requests = true`)."""

    def on_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        request_log.info("request %s: received, prompt %d tokens, params: %s", request_id, len(prompt_ids), _params_summary(params))

    def on_output(self, out: RequestOutput) -> None:
        if not out.finished:
            return
        m = out.metrics
        tokens = sum(len(c.token_ids) for c in out.outputs)
        reasons = ",".join(sorted({c.finish_reason or "?" for c in out.outputs}))
        timing = ""
        if m is not None:
            end = m.finished_time or m.last_token_time or m.arrival_time
            queue = f"{(m.first_scheduled_time - m.arrival_time) * 1e3:.1f} ms" if m.first_scheduled_time is not None else "-"
            ttft = f"{(m.first_token_time - m.arrival_time) * 1e3:.1f} ms" if m.first_token_time is not None else "-"
            timing = f", queue {queue}, ttft {ttft}, e2e {(end - m.arrival_time) * 1e3:.1f} ms, cached prompt tokens {m.num_cached_prompt_tokens}"
        request_log.info("request %s: finished (%s), prompt %d tokens, %d generated%s", out.request_id, reasons,
                         len(out.prompt_token_ids), tokens, timing)
