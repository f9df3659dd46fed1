"""`aiosched bench`: throughput and latency of a synthetic workload.

Two drivers, one workload and one set of metrics:
- offline (default): an AsyncEngine in this process; prompts are token ids, so no
  tokenizer is needed. `--compare sync,async` runs both scheduling modes on the same
  prompts in one process and prints the ratios; `--random-weights SHAPE` benchmarks
  a random-weight model of a known shape without a checkpoint.
- serving (`--base-url http://host:port`): any OpenAI-compatible server, streamed:
  `/v1/completions` (`--backend openai`, the default; random prompts go as token-id
  lists) or `/v1/chat/completions` (`--backend openai-chat` or that `--endpoint`;
  prompts go as one user message of text). `--api-key` (default: $OPENAI_API_KEY) is
  sent as `Authorization: Bearer`. Needs httpx (`pip install 'aiosched[bench]'`).

Datasets: `random` (the default) draws prompt tokens from the model's own vocabulary
(the tokenizer's ids, without special tokens; offline the engine's tokenizer, serving
`--tokenizer DIR`, else `--vocab-size`); `sharegpt` reads a ShareGPT-style JSON file
(`--dataset-path`: a list of {"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}]}, the first human turn is the prompt and the reply's
length the output length when a tokenizer is at hand); `jsonl` reads one JSON object
per line with a `prompt` (or `text`) and optionally `output_len` / `max_tokens`.

Metrics (per request, then mean / median / p99): TTFT (send to first token), TPOT
((e2e - TTFT) / (output tokens - 1)), ITL (gap between consecutive token arrivals),
e2e latency; and req/s, output tok/s, total tok/s over the run. Offline runs also
report the engine loop's time split per step (schedule / update / wait, from
`engine.timings`), on the CUDA path the device's idle time between steps over the
whole timed run from CUDA events recorded at each step's start and end (no profiler),
and, with `--profile DIR`, the accelerator's idle share from a torch profiler trace
of a window of steps (CUPTI slows the host, so the traced share is an upper bound).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiosched.config import EngineConfig
from aiosched.engine_args import add_engine_arguments, engine_config_from_args

# ---------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("workload")
    w.add_argument("--dataset", choices=["random", "sharegpt", "jsonl"], default="random",
                   help="random token prompts, or prompts from --dataset-path (ShareGPT JSON, or JSONL with a 'prompt' per line)")
    w.add_argument("--dataset-path", default=None, metavar="FILE", help="the local file of --dataset sharegpt|jsonl")
    w.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="serving: a model dir whose tokenizer.json gives the random prompts' vocabulary and the datasets' lengths "
                        "(default: --model, if given)")
    w.add_argument("--input-len", type=int, default=128, help="random prompt tokens per request (after the shared prefix)")
    w.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    w.add_argument("--prefix-len", type=int, default=0, help="tokens of one shared prefix put before every prompt")
    w.add_argument("--num-prompts", type=int, default=64)
    w.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    w.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default inf: all at once)")
    w.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    w.add_argument("--seed", type=int, default=0, help="seed of the prompts, arrivals and per-request sampling seeds")
    w.add_argument("--vocab-size", type=int, default=None,
                   help="random prompt token ids are drawn from [0, N) (default: the tokenizer's vocabulary without special tokens; "
                        "serving without a tokenizer: 10000)")
    w.add_argument("--num-warmups", type=int, default=2, help="requests run before timing (compilation, graph capture, caches)")

    o = parser.add_argument_group("output")
    o.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the raw numbers as JSON")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    o.add_argument("--label", default=None, help="free-form label stored in the JSON")

    d = parser.add_argument_group("driver")
    d.add_argument("--base-url", default=None, help="benchmark a running OpenAI-compatible server instead of an in-process engine")
    d.add_argument("--backend", choices=["openai", "openai-chat"], default=None,
                   help="serving: openai (/v1/completions) or openai-chat (/v1/chat/completions); default: from --endpoint")
    d.add_argument("--endpoint", default=None, help="serving: the route (default: /v1/completions, or /v1/chat/completions for openai-chat)")
    d.add_argument("--api-key", default=None, help="serving: sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    d.add_argument("--served-model-name", default=None, help="'model' field of the requests (default: the first of /v1/models)")
    d.add_argument("--compare", default=None, metavar="MODES", help="offline: run each scheduling mode on the same workload, e.g. 'sync,async'")
    d.add_argument("--random-weights", default=None, metavar="SHAPE",
                   help="offline: a random-weight model of this shape (llama-3.2-1b, qwen3-0.6b, or a config.json path), built on the device")
    d.add_argument("--profile", default=None, metavar="DIR", help="offline: after the timed run, trace a window of steps with the torch profiler into DIR")
    d.add_argument("--profile-start-step", type=int, default=20, help="engine steps into the profiled run before tracing starts")
    d.add_argument("--profile-steps", type=int, default=30,
                   help="engine steps of the timed window (the trace itself runs on to the end of the workload)")
    add_engine_arguments(parser)


# ---------------------------------------------------------------- workload


@dataclass
class Workload:
    prompts: list[Any]  # token-id lists (random) or text (datasets)
    output_len: int
    seeds: list[int]
    output_lens: list[int] | None = None  # per prompt (datasets); None: output_len for all
    prompt_lens: list[int] | None = None  # tokens per prompt when known for text prompts

    @property
    def num_input_tokens(self) -> int:
        return sum(self.prompt_len(i) for i in range(len(self.prompts)))

    def prompt_len(self, i: int) -> int:
        p = self.prompts[i]
        if isinstance(p, list):
            return len(p)
        return self.prompt_lens[i] if self.prompt_lens is not None else 0

    def max_tokens(self, i: int) -> int:
        return self.output_lens[i] if self.output_lens is not None else self.output_len


def make_workload(num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0, prefix_len: int = 0,
                  vocab: list[int] | None = None) -> Workload:
    """Random token-id prompts: one shared prefix (prefix_len) + input_len unique tokens each,
    drawn from `vocab` (token ids) if given, else from [0, vocab_size)."""
    if num_prompts < 1 or input_len < 0 or output_len < 1 or prefix_len < 0 or input_len + prefix_len < 1:
        raise ValueError("workload: need num_prompts >= 1, output_len >= 1 and a non-empty prompt")
    if vocab is None and vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if vocab is not None and len(vocab) < 2:
        raise ValueError("vocab: need at least 2 token ids to draw from")
    rng = random.Random(seed)
    draw = (lambda: vocab[rng.randrange(len(vocab))]) if vocab is not None else (lambda: rng.randrange(vocab_size))
    prefix = [draw() for _ in range(prefix_len)]
    prompts = [prefix + [draw() for _ in range(input_len)] for _ in range(num_prompts)]
    seeds = [rng.getrandbits(62) for _ in range(num_prompts)]
    return Workload(prompts, output_len, seeds)


def tokenizer_vocab(tokenizer: Any) -> list[int]:
    """The tokenizer's ordinary token ids: its vocabulary without special/added tokens,
    so random prompts look like the model's input and never contain an EOS."""
    specials = set(tokenizer.eos_token_ids)
    if tokenizer.bos_token_id is not None:
        specials.add(tokenizer.bos_token_id)
    try:
        added = tokenizer._tok.get_added_tokens_decoder()
        specials.update(added)
    except AttributeError:
        pass
    base = tokenizer._tok.get_vocab_size(with_added_tokens=False)
    return [i for i in range(base) if i not in specials]


def load_dataset(kind: str, path: str | None, num_prompts: int, output_len: int, seed: int, tokenizer: Any = None) -> Workload:
    """Text prompts from a local file (`sharegpt` JSON or `jsonl`), the first `num_prompts`
    usable ones, in file order."""
    if path is None:
        raise ValueError(f"dataset-path: --dataset {kind} needs a local file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"dataset-path: cannot read {path}: {e.strerror}") from None
    items: list[tuple[str, int | None]] = []
    if kind == "sharegpt":
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"dataset-path: {path} is not JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"dataset-path: {path} must hold a JSON list of conversations")
        for entry in data:
            conv = entry.get("conversations") if isinstance(entry, dict) else None
            if not isinstance(conv, list) or not conv:
                continue
            first = conv[0]
            if not isinstance(first, dict) or first.get("from") not in ("human", "user") or not first.get("value"):
                continue
            reply = conv[1].get("value") if len(conv) > 1 and isinstance(conv[1], dict) else None
            n = len(tokenizer.encode(reply, add_special_tokens=False)) if tokenizer is not None and reply else None
            items.append((str(first["value"]), max(1, n) if n is not None else None))
    else:
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"dataset-path: {path} line {lineno} is not JSON ({e})") from None
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
            if not isinstance(text, str) or not text:
                raise ValueError(f"dataset-path: {path} line {lineno} has no 'prompt' string")
            n = obj.get("output_len", obj.get("max_tokens")) if isinstance(obj, dict) else None
            items.append((text, int(n) if n is not None else None))
    items = items[:num_prompts]
    if not items:
        raise ValueError(f"dataset-path: no usable prompts in {path}")
    rng = random.Random(seed)
    prompts = [t for t, _ in items]
    lens = [tokenizer.encode(t).__len__() for t in prompts] if tokenizer is not None else None
    return Workload(prompts, output_len, [rng.getrandbits(62) for _ in items], [n or output_len for _, n in items], lens)


# ---------------------------------------------------------------- one request's record


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, send to last token
    itl: list[float] = field(default_factory=list)  # gaps between token arrivals
    error: str = ""


SendFn = Callable[[int], Awaitable[RequestResult]]


class _Recorder:
    """Token-arrival timing for one request."""

    def __init__(self, prompt_len: int) -> None:
        self.res = RequestResult(prompt_len=prompt_len)
        self.t0 = time.perf_counter()
        self.last = self.t0

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.res.output_len == 0:
            self.res.ttft = now - self.t0
        else:
            self.res.itl.append(now - self.last)
        self.last = now
        self.res.output_len += n

    def done(self, ok: bool = True, error: str = "") -> RequestResult:
        self.res.latency = time.perf_counter() - self.t0
        self.res.ok = ok and self.res.output_len > 0
        self.res.error = error or ("" if self.res.ok else "no tokens received")
        return self.res


# ---------------------------------------------------------------- the driver loop


async def run_workload(send: SendFn, n: int, request_rate: float, max_concurrency: int | None, seed: int,
                       progress: bool = True, desc: str = "bench") -> tuple[list[RequestResult], float]:
    """Send requests 0..n-1 (Poisson arrivals at `request_rate`, at most
    `max_concurrency` in flight); return the results and the wall time."""
    rng = random.Random(seed + 1)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    pbar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            pbar = tqdm(total=n, desc=desc, file=sys.stderr, leave=False)
        except ImportError:
            pbar = None

    async def one(i: int) -> RequestResult:
        if sem is not None:
            async with sem:
                r = await send(i)
        else:
            r = await send(i)
        if pbar is not None:
            pbar.update(1)
        return r

    t0 = time.perf_counter()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(i)))
        if math.isfinite(request_rate) and request_rate > 0 and i + 1 < n:
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    if pbar is not None:
        pbar.close()
    return list(results), duration


# ---------------------------------------------------------------- metrics


def _stats(xs: list[float], prefix: str) -> dict[str, float]:
    """mean / median / p99 / std in milliseconds."""
    if not xs:
        return {f"mean_{prefix}_ms": 0.0, f"median_{prefix}_ms": 0.0, f"p99_{prefix}_ms": 0.0, f"std_{prefix}_ms": 0.0}
    ys = sorted(xs)
    k = (len(ys) - 1) * 0.99
    lo, hi = math.floor(k), math.ceil(k)
    p99 = ys[lo] + (ys[hi] - ys[lo]) * (k - lo)
    return {
        f"mean_{prefix}_ms": statistics.fmean(ys) * 1e3,
        f"median_{prefix}_ms": statistics.median(ys) * 1e3,
        f"p99_{prefix}_ms": p99 * 1e3,
        f"std_{prefix}_ms": (statistics.pstdev(ys) if len(ys) > 1 else 0.0) * 1e3,
    }


METRIC_KEYS = [
    "completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput",
    *[f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p99", "std")],
]


def compute_metrics(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    m: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
    }
    m.update(_stats([r.ttft for r in ok], "ttft"))
    m.update(_stats(tpots, "tpot"))
    m.update(_stats([g for r in ok for g in r.itl], "itl"))
    m.update(_stats([r.latency for r in ok], "e2el"))
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        m["errors"] = errors[:10]
    return m


# ---------------------------------------------------------------- offline driver


def _triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache (one directory per compiled kernel); 0 without Triton."""
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        return sum(1 for e in os.scandir(cache) if e.is_dir())
    except OSError:
        return 0


def _timings_snapshot(engine: Any) -> dict[str, float]:
    t = engine.timings
    return {"steps": t.steps, "schedule_s": t.schedule_s, "update_s": t.update_s, "wait_s": t.wait_s}


def engine_split(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Per-step time split of the engine loop over the timed window.

    schedule: building SchedulerOutputs; update: applying outputs and streaming them;
    wait: awaiting the executor (model time not hidden by overlap); other: the rest of
    the wall time (the event loop running the benchmark's own tasks, idling)."""
    steps = int(after["steps"] - before["steps"])
    sch = after["schedule_s"] - before["schedule_s"]
    upd = after["update_s"] - before["update_s"]
    wait = after["wait_s"] - before["wait_s"]
    per = 1e3 / steps if steps else 0.0
    wall = wall_s if wall_s > 0 else 1.0
    return {
        "steps": steps,
        "mean_step_ms": wall_s * per,
        "schedule_ms_per_step": sch * per,
        "update_ms_per_step": upd * per,
        "wait_ms_per_step": wait * per,
        "other_ms_per_step": max(wall_s - sch - upd - wait, 0.0) * per,
        "scheduler_share": (sch + upd) / wall,  # Python scheduling work, share of the step
        "schedule_share": sch / wall,
        "update_share": upd / wall,
        "wait_share": wait / wall,
    }


def _free_device_memory() -> None:
    gc.unfreeze()  # the engine freezes the heap after load; let the dead engine's cycles be collected
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def random_weights_config(shape: str, dest_dir: str) -> dict[str, Any]:
    """Engine overrides for a random-weight model of `shape`: a model dir holding only
    config.json, and the loader told to build random weights on the device."""
    if os.path.isfile(shape):
        with open(shape) as f:
            cfg = json.load(f)
    else:
        try:
            from aiosched.executors.torch.random_checkpoint import shape_config
        except ImportError as e:
            raise ValueError(f"random-weights: shape {shape!r} needs aiosched.executors.torch.random_checkpoint ({e})") from None
        cfg = shape_config(shape)
    os.makedirs(dest_dir, exist_ok=True)
    with open(os.path.join(dest_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return {"model": dest_dir, "load_format": "random"}


async def _offline_run(config: EngineConfig, args: argparse.Namespace, workload: Workload | None, label: str,
                       profile_dir: str | None = None) -> tuple[dict[str, Any], Workload]:
    from aiosched.engine import AsyncEngine
    from aiosched.sampling_params import SamplingParams

    engine = AsyncEngine(config)
    await engine.start()
    try:
        assert engine.info is not None
        if workload is None:
            workload = build_workload(args, engine.tokenizer, engine.info.vocab_size)

        def params(i: int, max_tokens: int) -> SamplingParams:
            return SamplingParams(max_tokens=max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos, seed=workload.seeds[i])

        async def send(i: int, max_tokens: int | None = None) -> RequestResult:
            prompt = workload.prompts[i]
            rec = _Recorder(workload.prompt_len(i))
            try:
                async for out in engine.generate(prompt, params(i, max_tokens or workload.max_tokens(i))):
                    rec.res.prompt_len = len(out.prompt_token_ids)
                    rec.tokens(len(out.new_token_ids))
            except Exception as e:  # a failed request is counted, not fatal
                return rec.done(False, f"{type(e).__name__}: {e}")
            return rec.done()

        if args.num_warmups > 0:
            nw = min(args.num_warmups, len(workload.prompts))
            await asyncio.gather(*[send(i, min(workload.max_tokens(i), 16)) for i in range(nw)])
        torch = sys.modules.get("torch")
        if torch is not None and config.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.synchronize()

        prof_task = None
        prof_result: dict[str, Any] = {}
        if profile_dir is not None:
            prof_task = asyncio.create_task(_profile_window(engine, profile_dir, label, args.profile_start_step, args.profile_steps, prof_result))

        fast = getattr(getattr(engine._executor, "runner", None), "fast", None)
        if fast is not None and hasattr(fast, "idle_report") and profile_dir is None:
            fast.idle_probe = []  # CUDA path: device idle between steps, from events (untraced)
        stats0 = engine.stats()
        jit0 = _triton_cache_entries() if fast is not None else None
        t_before = _timings_snapshot(engine)
        results, duration = await run_workload(send, len(workload.prompts), args.request_rate, args.max_concurrency, args.seed,
                                               progress=not args.disable_tqdm, desc=label)
        t_after = _timings_snapshot(engine)
        stats1 = engine.stats()
        if prof_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                if not prof_task.done():
                    prof_task.cancel()
                await prof_task
            t = engine.timings
            # a step scheduled before the last request ended (a dead engine loop has none to finish)
            while t.submitted != t.steps and engine._task is not None and not engine._task.done():
                await asyncio.sleep(0.001)
            _export_profile(prof_result)  # the workload is over, no step in flight: the worker threads run no ops
        metrics = compute_metrics(results, duration)
        metrics["engine"] = engine_split(t_before, t_after, duration)
        metrics["engine"]["scheduler_steps"] = stats1.get("steps", 0) - stats0.get("steps", 0)
        metrics["engine"]["preemptions"] = stats1.get("preemptions", 0) - stats0.get("preemptions", 0)
        metrics["engine"]["prefix_cache_hit_rate"] = stats1.get("prefix_cache_hit_rate", 0.0)
        metrics["engine"]["num_kv_blocks"] = engine.info.num_kv_blocks
        metrics["engine"]["device"] = engine.info.device
        metrics["engine"]["dtype"] = engine.info.dtype
        metrics["engine"]["runner"] = engine.info.runner
        metrics["engine"]["async_scheduling"] = config.async_scheduling
        if fast is not None and getattr(fast, "idle_probe", None) is not None:
            idle = fast.idle_report()
            metrics["engine"]["device_idle"] = idle
            if idle is not None:
                metrics["engine"]["device_idle_share"] = idle["idle_share"]
                metrics["engine"]["device_idle_host_late_share"] = idle["host_late_ms"] / idle["span_ms"] if idle["span_ms"] else 0.0
                metrics["engine"]["device_idle_or_waiting_share"] = idle["idle_or_waiting_share"]
        if jit0 is not None:
            # Kernels Triton compiled inside the timed run (each costs the launch thread ~0.1-1 s):
            # a shape or specialisation that start-up and warm-up did not meet.
            metrics["engine"]["triton_compiled"] = _triton_cache_entries() - jit0
        if fast is not None and getattr(fast, "stats", None):
            metrics["engine"]["runner_steps"] = dict(fast.stats)  # CUDA path: graph replays vs eager steps (all runs)
        if profile_dir is not None:
            metrics["profile"] = prof_result
        return metrics, workload
    finally:
        await engine.shutdown()
        del engine
        _free_device_memory()


# ---------------------------------------------------------------- profiling


async def _profile_window(engine: Any, out_dir: str, label: str, start_step: int, num_steps: int, result: dict[str, Any]) -> None:
    """Trace `num_steps` engine steps with the torch profiler, starting `start_step`
    steps into the run; write a Chrome trace and fill `result` with the idle analysis."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    t = engine.timings
    base = t.steps
    while t.steps - base < start_step:
        await asyncio.sleep(0.0005)
    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available() and engine.config.device.startswith("cuda"):
        acts.append(ProfilerActivity.CUDA)
    try:  # the runner's ops run on the executor's launch thread, not this one
        exp = torch._C._profiler._ExperimentalConfig(profile_all_threads=True, record_python_gc_info=True)
    except (AttributeError, TypeError):
        exp = None
    prof = profile(activities=acts, experimental_config=exp)
    prof.start()
    s0 = t.steps
    w0 = time.perf_counter()
    try:
        while t.steps - s0 < num_steps:
            await asyncio.sleep(0.0005)
    finally:
        steps = t.steps - s0
        wall = time.perf_counter() - w0
        # Stopped and written by `_export_profile` once the workload is over: stopping or
        # exporting while the launch and result threads run ops (profile_all_threads)
        # crashed the process (2 of 17 runs of tests/test_bench.py exporting, and a full
        # suite run stopping). So the trace runs on to the end of the workload; the
        # window's own figures are these.
        result["_pending"] = (prof, os.path.join(out_dir, f"trace_{label}.json"))
        result.update({"traced_steps": steps, "traced_wall_ms": wall * 1e3})
        if steps:
            result["traced_step_ms"] = wall * 1e3 / steps


def _export_profile(result: dict[str, Any]) -> None:
    """Stop the profiler, write its Chrome trace and add the idle analysis (no engine
    step running: the workload is over). The trace covers the window and the rest of the
    workload after it."""
    pending = result.pop("_pending", None)
    if pending is None:
        return
    prof, path = pending
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    prof.stop()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prof.export_chrome_trace(path)
    result.update(trace_idle_analysis(path))
    result["trace"] = path


_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_and_gaps(iv: list[tuple[float, float]]) -> tuple[float, list[float], float]:
    """Sorted (start, end) intervals -> (time covered by their union, the gaps between
    the union's pieces, span from the first start to the last end)."""
    busy = 0.0
    gaps: list[float] = []
    cur_s, cur_e = iv[0]
    for s, e in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy, gaps, max(e for _, e in iv) - iv[0][0]


def trace_idle_analysis(trace_path: str, step_gap_us: float = 20.0) -> dict[str, Any]:
    """Accelerator busy/idle from a Chrome trace's device timeline.

    Busy = union of kernel/memcpy/memset intervals; span = first start to last end;
    idle share = 1 - busy/span. Gaps longer than `step_gap_us` are counted separately:
    inside a CUDA graph kernels follow each other within a few microseconds, so long
    gaps are the accelerator waiting for the host (between steps)."""
    with open(trace_path) as f:
        data = json.load(f)
    events = data.get("traceEvents", data) if isinstance(data, dict) else data
    iv = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
                for e in events if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in _DEVICE_CATS)
    if not iv:
        return {"device_events": 0, "idle_share": None, "note": "no accelerator events in the trace (CPU run)"}
    busy, gaps, span = busy_and_gaps(iv)
    long_gaps = [g for g in gaps if g > step_gap_us]
    return {
        "device_events": len(iv),
        "span_us": span,
        "busy_us": busy,
        "idle_us": span - busy,
        "idle_share": (span - busy) / span if span > 0 else 0.0,
        "long_gaps": len(long_gaps),
        "long_gap_idle_us": sum(long_gaps),
        "long_gap_idle_share": sum(long_gaps) / span if span > 0 else 0.0,
        "max_gap_us": max(gaps) if gaps else 0.0,
        "step_gap_threshold_us": step_gap_us,
    }


# ---------------------------------------------------------------- serving driver


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        try:  # some environments ship the client under its new name
            import httpx2 as httpx  # type: ignore[no-redef]
        except ImportError:
            raise ValueError("base-url: benchmarking a server needs httpx: pip install 'aiosched[bench]' (or pip install httpx)") from None
    return httpx


def build_workload(args: argparse.Namespace, tokenizer: Any, model_vocab_size: int | None) -> Workload:
    """The prompts: a dataset file's, or random tokens of the model's own vocabulary."""
    if args.dataset != "random":
        return load_dataset(args.dataset, args.dataset_path, args.num_prompts, args.output_len, args.seed, tokenizer)
    vocab = None
    if args.vocab_size is None and tokenizer is not None:
        vocab = [t for t in tokenizer_vocab(tokenizer) if model_vocab_size is None or t < model_vocab_size]
    size = args.vocab_size or model_vocab_size or 10000
    return make_workload(args.num_prompts, args.input_len, args.output_len, size, args.seed, args.prefix_len, vocab=vocab)


def _chat_mode(args: argparse.Namespace) -> bool:
    endpoint = args.endpoint or ""
    if args.backend == "openai-chat" or endpoint.rstrip("/").endswith("/chat/completions"):
        if endpoint and not endpoint.rstrip("/").endswith("/chat/completions"):
            raise ValueError(f"endpoint: --backend openai-chat needs a chat completions route, got {endpoint!r}")
        return True
    return False


def _serving_tokenizer(args: argparse.Namespace) -> Any:
    path = args.tokenizer or getattr(args, "model", None)
    if path is None:
        return None
    from aiosched.tokenizer import Tokenizer

    return Tokenizer(path)


async def _serving_run(args: argparse.Namespace, label: str) -> tuple[dict[str, Any], Workload]:
    httpx = _httpx()
    base = args.base_url.rstrip("/")
    chat = _chat_mode(args)
    endpoint = args.endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
    tokenizer = _serving_tokenizer(args)
    workload = build_workload(args, tokenizer, None)
    if chat and workload.prompts and isinstance(workload.prompts[0], list):
        if tokenizer is None:
            raise ValueError("tokenizer: the chat endpoint takes text, so random prompts need --tokenizer DIR (or a --dataset file)")
        # Random token ids as text (a chat message is text); their re-encoded length may differ slightly.
        workload.prompt_lens = [len(p) for p in workload.prompts]
        workload.prompts = [tokenizer.decode(p) for p in workload.prompts]
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or 1000, max_keepalive_connections=args.max_concurrency or 1000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits, headers=headers) as client:
        model = args.served_model_name
        if model is None:
            try:
                r = await client.get(base + "/v1/models")
                data = r.json().get("data") or []
                model = data[0]["id"] if data else "default"
            except Exception:
                model = "default"

        async def send(i: int, max_tokens: int | None = None) -> RequestResult:
            prompt = workload.prompts[i]
            body: dict[str, Any] = {"model": model, "max_tokens": max_tokens or workload.max_tokens(i), "temperature": args.temperature,
                                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos,
                                    "seed": workload.seeds[i]}
            if chat:
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body["prompt"] = prompt
            rec = _Recorder(workload.prompt_len(i))
            usage_tokens = None
            try:
                async with client.stream("POST", base + endpoint, json=body) as resp:
                    if resp.status_code != 200:
                        text = (await resp.aread()).decode(errors="replace")[:200]
                        return rec.done(False, f"HTTP {resp.status_code}: {text}")
                    async for line in resp.aiter_lines():
                        line = line.strip()
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            break
                        chunk = json.loads(payload)
                        if chunk.get("error"):
                            return rec.done(False, str(chunk["error"])[:200])
                        usage = chunk.get("usage") or {}
                        if usage.get("completion_tokens") is not None:
                            usage_tokens = int(usage["completion_tokens"])
                        if usage.get("prompt_tokens") is not None:
                            rec.res.prompt_len = int(usage["prompt_tokens"])
                        for ch in chunk.get("choices") or []:
                            if chat:  # the role-only first chunk carries no token
                                if (ch.get("delta") or {}).get("content"):
                                    rec.tokens(1)
                            elif ch.get("text") or ch.get("token_ids"):
                                rec.tokens(len(ch["token_ids"]) if ch.get("token_ids") else 1)
            except Exception as e:
                return rec.done(False, f"{type(e).__name__}: {e}")
            res = rec.done()
            if res.ok and usage_tokens is not None:
                res.output_len = usage_tokens  # chunks may hold several tokens (or an empty text)
            return res

        if args.num_warmups > 0:
            await asyncio.gather(*[send(i, min(workload.max_tokens(i), 16)) for i in range(min(args.num_warmups, len(workload.prompts)))])
        results, duration = await run_workload(send, len(workload.prompts), args.request_rate, args.max_concurrency, args.seed,
                                               progress=not args.disable_tqdm, desc=label)
    return compute_metrics(results, duration), workload


# ---------------------------------------------------------------- report


def _fmt_table(runs: dict[str, dict[str, Any]], ratios: dict[str, float] | None) -> str:
    names = list(runs)
    rows: list[tuple[str, list[str]]] = []

    def add(title: str, key: str, fmt: str = "{:.2f}", sub: str | None = None) -> None:
        vals = []
        for n in names:
            src = runs[n].get(sub, {}) if sub else runs[n]
            v = src.get(key)
            vals.append("-" if v is None else fmt.format(v))
        rows.append((title, vals))

    add("Successful requests", "completed", "{:d}")
    add("Failed requests", "failed", "{:d}")
    add("Duration (s)", "duration_s")
    add("Total input tokens", "total_input_tokens", "{:d}")
    add("Total output tokens", "total_output_tokens", "{:d}")
    add("Request throughput (req/s)", "request_throughput")
    add("Output throughput (tok/s)", "output_throughput", "{:.1f}")
    add("Total throughput (tok/s)", "total_token_throughput", "{:.1f}")
    for m, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        for s in ("mean", "median", "p99"):
            add(f"{s.capitalize()} {title} (ms)", f"{s}_{m}_ms")
    if any("engine" in r for r in runs.values()):
        add("Engine steps", "steps", "{:d}", "engine")
        add("Mean step (ms)", "mean_step_ms", "{:.3f}", "engine")
        add("  schedule (ms/step)", "schedule_ms_per_step", "{:.3f}", "engine")
        add("  update (ms/step)", "update_ms_per_step", "{:.3f}", "engine")
        add("  wait on model (ms/step)", "wait_ms_per_step", "{:.3f}", "engine")
        add("  other (ms/step)", "other_ms_per_step", "{:.3f}", "engine")
        add("Scheduler share of step", "scheduler_share", "{:.1%}", "engine")
        add("Wait share of step", "wait_share", "{:.1%}", "engine")
        if any("device_idle_share" in r.get("engine", {}) for r in runs.values()):
            add("Device idle between steps (events)", "device_idle_share", "{:.1%}", "engine")
            add("  of which the host was late", "device_idle_host_late_share", "{:.1%}", "engine")
        if any("device_idle_or_waiting_share" in r.get("engine", {}) for r in runs.values()):
            add("  + waiting inside steps for the replay", "device_idle_or_waiting_share", "{:.1%}", "engine")
        if any("triton_compiled" in r.get("engine", {}) for r in runs.values()):
            add("Triton kernels compiled in the run", "triton_compiled", "{:d}", "engine")
    if any("profile" in r for r in runs.values()):
        add("Accelerator idle share (trace)", "idle_share", "{:.1%}", "profile")
        add("  in gaps > 20 us", "long_gap_idle_share", "{:.1%}", "profile")
        add("Traced step (ms)", "traced_step_ms", "{:.3f}", "profile")
    header = ["metric", *names] + (["ratio " + "/".join(reversed(names[:2]))] if ratios else [])
    lines = []
    ratio_for = {
        "Request throughput (req/s)": "request_throughput",
        "Output throughput (tok/s)": "output_throughput",
        "Total throughput (tok/s)": "total_token_throughput",
        "Mean TPOT (ms)": "mean_tpot_ms",
        "Mean ITL (ms)": "mean_itl_ms",
        "Mean E2E latency (ms)": "mean_e2el_ms",
        "Mean TTFT (ms)": "mean_ttft_ms",
        "Mean step (ms)": "mean_step_ms",
    }
    table = [header]
    for title, vals in rows:
        r = [title, *vals]
        if ratios:
            k = ratio_for.get(title)
            r.append(f"{ratios[k]:.3f}" if k and k in ratios else "")
        table.append(r)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """b / a for the headline metrics (e.g. async / sync)."""
    keys = ["request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms"]
    out = {k: (b[k] / a[k] if a.get(k) else float("nan")) for k in keys}
    if "engine" in a and "engine" in b and a["engine"].get("mean_step_ms"):
        out["mean_step_ms"] = b["engine"]["mean_step_ms"] / a["engine"]["mean_step_ms"]
    return out


# ---------------------------------------------------------------- entry points


def _modes(args: argparse.Namespace) -> list[str]:
    if not args.compare:
        return []
    modes = [m.strip() for m in args.compare.split(",") if m.strip()]
    for m in modes:
        if m not in ("sync", "async"):
            raise ValueError(f"compare: modes are 'sync' and 'async', got {m!r}")
    if len(set(modes)) != len(modes):
        raise ValueError("compare: a mode is named twice")
    return modes


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by `args`; return the JSON-able report."""
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("max-concurrency must be >= 1")
    if not args.request_rate > 0:
        raise ValueError("request-rate must be > 0 (inf: all at once)")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "label": args.label,
        "workload": {"dataset": args.dataset, "dataset_path": args.dataset_path, "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "prefix_len": args.prefix_len, "max_concurrency": args.max_concurrency,
                     "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
                     "ignore_eos": args.ignore_eos, "temperature": args.temperature, "seed": args.seed},
        "runs": {},
    }
    if args.base_url:
        if args.compare or args.random_weights or args.profile:
            raise ValueError("base-url: --compare, --random-weights and --profile apply to offline runs only")
        metrics, _ = await _serving_run(args, "serving")
        report["mode"] = "serving"
        report["base_url"] = args.base_url
        report["endpoint"] = args.endpoint or ("/v1/chat/completions" if _chat_mode(args) else "/v1/completions")
        report["runs"]["serving"] = metrics
        return report

    report["mode"] = "offline"
    with tempfile.TemporaryDirectory(prefix="aiosched-bench-") as tmp:
        extra: dict[str, Any] = {}
        if args.random_weights:
            extra = random_weights_config(args.random_weights, os.path.join(tmp, "model"))
            report["random_weights"] = args.random_weights
        base = engine_config_from_args(args, **extra)
        modes = _modes(args) or ["async" if base.async_scheduling else "sync"]
        report["engine_config"] = {k: v for k, v in _config_dict(base).items() if k != "async_scheduling"}
        workload = None
        for mode in modes:
            cfg = base.replace(async_scheduling=(mode == "async"))
            metrics, workload = await _offline_run(cfg, args, workload, mode)
            report["runs"][mode] = metrics
        if args.profile:
            for mode in modes:
                cfg = base.replace(async_scheduling=(mode == "async"))
                pm, _ = await _offline_run(cfg, args, workload, f"profile_{mode}", profile_dir=args.profile)
                report["runs"][mode]["profile"] = pm.get("profile", {})
    if len(report["runs"]) == 2:
        a, b = list(report["runs"].values())
        report["ratios"] = compare_ratios(a, b)
        report["ratios_of"] = "/".join(reversed(list(report["runs"])))
    return report


def _config_dict(cfg: EngineConfig) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(cfg)


def print_report(report: dict[str, Any], file: Any = None) -> None:
    file = file or sys.stdout
    w = report["workload"]
    print(f"\n=== aiosched bench ({report['mode']}) === input {w['input_len']} (+{w['prefix_len']} shared) / output {w['output_len']}, "
          f"{w['num_prompts']} prompts, concurrency {w['max_concurrency'] or 'inf'}, rate {w['request_rate'] or 'inf'}", file=file)
    print(_fmt_table(report["runs"], report.get("ratios")), file=file)
    for name, run in report["runs"].items():
        if run.get("errors"):
            print(f"[{name}] errors: {run['errors']}", file=file)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


def write_json(report: dict[str, Any], path: str) -> None:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(report), f, indent=2, default=_json_default)


def main(args: argparse.Namespace) -> int:
    from aiosched.event_loop import run

    report = run(run_bench(args))
    print_report(report)
    if args.json_path:
        write_json(report, args.json_path)
        print(f"raw numbers: {args.json_path}")
    return 0 if all(r["failed"] == 0 for r in report["runs"].values()) else 1


if __name__ == "__main__":  # `python -m aiosched.bench ...`: no other subcommand's imports
    _p = argparse.ArgumentParser(prog="aiosched bench", description=__doc__.splitlines()[0])
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
