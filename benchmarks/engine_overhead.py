"""Engine CPU overhead per step, with a model that costs (almost) nothing.

Drives `AsyncEngine` with `runner="fake"` at a fixed concurrency (all requests sent at
once, same input/output length, ignore_eos) and reports, over the *decode window*
(from the moment every request has its first token until the last one finishes,
so every step there is a pure decode step at full batch), per engine step:

- schedule / submit / update: the engine loop's own timers (`engine.timings`:
  building the SchedulerOutput, `executor.submit`, applying the runner output,
  detokenizing and putting outputs on the streams);
- loop CPU: CPU time of the event-loop thread (engine loop + the consumers'
  `async for` + asyncio itself) per step;
- process CPU: every thread, the fake runner's included;
- of which GC: wall time in the cyclic collector's automatic runs, per step;
- full GC: one `gc.collect()` (median of 3) at the end of the window, with the live state
  of every request at its longest history (what a generation-2 collection costs the loop
  whenever it triggers; grows with history held in lists of ints);
- steps/s and output tok/s (wall clock).

Modes: `ids` (no tokenizer: prompts and outputs are token ids, no detokenizer) and
`tok` (the embedded default model's tokenizer: every output token goes through the
incremental detokenizer). Prompts are token ids in both.

Runners: `fake` is the stock fake runner, which also simulates the paged KV cache
(each step reads back every earlier position of every scheduled request, O(context)
Python work per request, on the executor's launch thread, holding the GIL);
`light` (default) is the same fake model (same tokens) without that simulation, so
the engine's share is not hidden behind the runner's. Either way this is the CPU cost
of the engine with a near-zero-cost model, not a GPU throughput figure.

Window: per-step costs are measured over the *late decode window*: the steps while
every request holds between L-K and L-1 output tokens (L = --output-len, K = min(L/2,
128)), all at full batch, up to the step before the one where they all finish; prompts
are admitted in one step (the token budget defaults to batch x input_len), so the
requests decode in lockstep and the window is about K steps.
At L = 4096 this is the cost per step at 4k tokens of history, comparable with L = 128.
Every length of one run uses the same configuration, sized for the longest: a copy of
the embedded model's directory whose config.json allows input + longest output
positions (same tokenizer and vocabulary; `ids` mode: only that config.json) and the
same KV pool, so only the history length differs.

Before/after in one run: `--compare REF` checks REF out in a `git worktree` (cached
under /tmp) and runs every configuration `--repeats` times in fresh subprocesses,
alternating old/new (old, new, new, old, ...); medians and new/old ratios.

    .venv/bin/python benchmarks/engine_overhead.py                       # the table
    .venv/bin/python benchmarks/engine_overhead.py --batch 64,256 --output-len 128,4096 --modes async \
        --tokenizer tok --compare main --repeats 3                       # issue 17: before/after
    .venv/bin/python benchmarks/engine_overhead.py --batch 256 --modes async --tokenizer tok --profile
    .venv/bin/python benchmarks/engine_overhead.py --batch 64,256 --modes async --tokenizer tok --loop uvloop   # the CLI's loop
    .venv/bin/python benchmarks/engine_overhead.py --instructions --batch 64,256 --tokenizer tok --compare main

`--runner sim --device-ms X` puts the light model on a simulated GPU: the launch thread does the
torch runner's real host work for each step (InputBatch.schedule + upload on the CPU) and the
step then "runs" for X ms after the previous one (its output is ready when it ends), so the
engine loop, the launch thread and the result thread share the interpreter lock as on a GPU;
the row adds the simulated device's idle share (AIOSCHED_LAUNCH_HANDOFF=1 applies).

`--instructions` counts instructions under valgrind (callgrind) instead of timing: the
engine loop's host work on one thread (the runner output made inline, the consumers and
the stats observer included), per request per decode step. Timings on a shared 2-core
machine move by +-30% from run to run; instruction counts do not (they do not see cache
misses or the GIL hand-offs to a runner thread either: read both).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from aiosched.engine import AsyncEngine
from aiosched.sampling_params import SamplingParams

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(sys.modules["aiosched"].__file__)), "default_model")


def _install_light_runner(sim_device_ms: float | None = None) -> None:
    """Point runner "fake" at the fake model without its KV-cache read-back (same tokens);
    with `sim_device_ms`, at that model on a simulated GPU (`--runner sim`)."""
    import torch

    import aiosched.executors.runner as runners
    from aiosched.protocol import RunnerOutput
    from aiosched.executors.runner import PendingOutput, ReadyOutput
    from aiosched.executors.fake_runner import FakeModelRunner, _State

    class LightFakeRunner(FakeModelRunner):
        def execute(self, so):  # type: ignore[override]
            for rid in so.freed_req_ids:
                self.reqs.pop(rid, None)
            for new in so.new_requests:
                self.reqs[new.req_id] = _State(new)
            out = RunnerOutput(step_id=so.step_id, req_ids=[], sampled_token_ids=[])
            for sr in so.scheduled:
                if sr.sample:
                    st = self.reqs[sr.req_id]
                    tok = self._next_token(st, len(st.tokens))
                    st.tokens.append(tok)
                    out.req_ids.append(sr.req_id)
                    out.sampled_token_ids.append([tok])
            self.steps += 1
            return ReadyOutput(out)

    sys.modules[__name__].LightFakeRunner = LightFakeRunner  # type: ignore[attr-defined]
    runners._RUNNERS["fake"] = f"{__name__}:LightFakeRunner"
    if sim_device_ms is None:
        return

    from aiosched.executors.torch.input_batch import InputBatch
    from launch_host_cost import launch  # (benchmarks/: the script's directory)

    class _SimPending(PendingOutput):
        def __init__(self, out: RunnerOutput, done_at: float) -> None:
            self.out, self.done_at = out, done_at

        def result(self) -> RunnerOutput:
            wait = self.done_at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)  # the device finishing the step (the interpreter lock released, as in an event wait)
            return self.out

    class SimGpuRunner(LightFakeRunner):
        """`light` on a simulated GPU: `execute` does the torch runner's real launch-thread
        Python (`launch_host_cost.launch`: InputBatch.schedule + upload on the CPU, the bookkeeping), reports
        the launch (`on_launched`), and the step then 'runs' for `sim_device_ms` after the
        previous one; its output is ready when it ends. Device idle: the time the simulated
        device had finished every queued step before the next was launched."""

        launch_handoff = True

        def load(self):  # type: ignore[no-untyped-def]
            info = super().load()
            self.batch = InputBatch(self.config.max_num_seqs, self.max_model_len + 64, self.bs, self.config.max_num_batched_tokens,
                                    torch.device("cpu"))
            self.device_s, self.done_at, self.idle_s, self.first_launch = sim_device_ms / 1e3, 0.0, 0.0, None
            return info

        def execute(self, so):  # type: ignore[override]
            for rid in so.freed_req_ids:
                self.batch.free(rid)
            for new in so.new_requests:
                self.batch.add(new)
            if so.scheduled:
                launch(self.batch, so)
            if self.on_launched is not None:
                self.on_launched()
            if not so.scheduled:
                return ReadyOutput(RunnerOutput(step_id=so.step_id, req_ids=[], sampled_token_ids=[]))
            # The tokens come from the device on a GPU: no per-request host work for them here
            # (the light model's hash would be launch-thread Python a GPU runner does not have).
            ids = [sr.req_id for sr in so.scheduled if sr.sample]
            out = RunnerOutput(step_id=so.step_id, req_ids=ids, sampled_token_ids=[[(so.step_id * 7 + i) % 997 + 1] for i in range(len(ids))])
            now = time.perf_counter()
            if self.first_launch is None:
                self.first_launch = now
            elif now > self.done_at:
                self.idle_s += now - self.done_at  # the device ran dry: it waited for this launch
            self.done_at = max(now, self.done_at) + self.device_s
            return _SimPending(out, self.done_at)

    sys.modules[__name__].SimGpuRunner = SimGpuRunner  # type: ignore[attr-defined]
    runners._RUNNERS["fake"] = f"{__name__}:SimGpuRunner"


class _GCTimer:
    """Wall time spent in the cyclic garbage collector (any thread)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0 = 0.0
        self.count = [0, 0, 0]  # collections per generation

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0
            self.count[info["generation"]] += 1


_gc_timer = _GCTimer()
gc.callbacks.append(_gc_timer)


def _snapshot(engine: AsyncEngine) -> dict[str, float]:
    t = engine.timings
    return {"steps": t.steps, "schedule": t.schedule_s, "submit": getattr(t, "submit_s", 0.0), "update": t.update_s,
            "wait": t.wait_s, "wall": time.perf_counter(), "loop_cpu": time.thread_time(), "proc_cpu": time.process_time(),
            "gc": _gc_timer.total, "gc0": _gc_timer.count[0], "gc1": _gc_timer.count[1], "gc2": _gc_timer.count[2],
            "sim_idle": getattr(getattr(engine._executor, "runner", None), "idle_s", None)}  # --runner sim


def _time_full_gc(repeats: int = 3) -> float:
    """Median wall time of gc.collect() (a full collection) over the live state right
    now: every request at its longest history, their outputs, the runner's state. The
    engine pays this whenever the collector's third generation triggers, in the loop."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_submit(engine: AsyncEngine) -> None:
    """Engines whose timings have no `submit_s` (older code): time executor.submit here."""
    if hasattr(engine.timings, "submit_s"):
        return
    ex, t = engine._executor, engine.timings
    t.submit_s = 0.0  # type: ignore[attr-defined]
    orig = ex.submit

    def timed(so):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return orig(so)
        finally:
            t.submit_s += time.perf_counter() - t0  # type: ignore[attr-defined]

    ex.submit = timed  # type: ignore[method-assign]


def _model_dir(max_len: int, tokenizer: bool = True) -> str | None:
    """The embedded default model, or a copy of its directory (links) whose config.json
    allows `max_len` positions: the fake runner reads only vocab_size and positions.
    Without the tokenizer (`ids` mode): None, or a directory with only that config.json."""
    with open(os.path.join(DEFAULT_MODEL, "config.json")) as f:
        cfg = json.load(f)
    if max_len <= cfg["max_position_embeddings"]:
        return DEFAULT_MODEL if tokenizer else None
    d = os.path.join(tempfile.gettempdir(), f"aiosched-bench-model-{max_len}{'' if tokenizer else '-ids'}")
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(DEFAULT_MODEL) if tokenizer else []:
        if name != "config.json" and not os.path.exists(os.path.join(d, name)):
            os.symlink(os.path.join(DEFAULT_MODEL, name), os.path.join(d, name))
    cfg["max_position_embeddings"] = max_len
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


async def run_one(batch: int, mode: str, tok: bool, output_len: int, args: argparse.Namespace, profile: bool = False) -> dict[str, Any]:
    input_len = args.input_len
    # Model and KV pool sized for the longest output of the run, so that every length
    # runs the same configuration (same vocabulary, same pool) and only L differs.
    longest = max([output_len] + [int(n) for n in args.output_len.split(",")] + [args.size_for or 0])
    blocks_per_req = -(-(input_len + longest) // 16) + 1
    max_len = max(1024, input_len + longest)
    budget = args.max_num_batched_tokens or max(2048, batch * input_len)
    config = dict(runner="fake", async_scheduling=mode == "async", max_num_seqs=max(batch, 1),
                  max_num_batched_tokens=budget, num_kv_blocks=batch * blocks_per_req + 64,
                  max_model_len=max_len, model=_model_dir(max_len, tok), seed=0)
    if args.speculative != "none":  # n-gram speculation configured: "off" never drafts, "auto" lets the policy decide
        config["speculative"] = dict(method="ngram", num_tokens=4, auto=args.speculative == "auto",
                                     disable_by_batch_size=1 if args.speculative == "off" else 0)
    engine = AsyncEngine.from_config(config)
    await engine.start()
    _time_submit(engine)
    assert engine.info is not None
    rng = random.Random(1234)
    vocab = min(engine.info.vocab_size, 32000)
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(batch)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    window = max(1, min(output_len // 2, 128))
    reached = 0
    marks: dict[str, dict[str, float]] = {}
    prof = cProfile.Profile() if profile else None
    tokens = 0
    full_gc: list[float] = []

    async def consume(p: list[int]) -> None:
        nonlocal reached, tokens
        got = 0
        async for out in engine.generate(p, params):
            before = got
            got += len(out.new_token_ids)
            if before < output_len - window <= got:
                reached += 1
                if reached == batch:  # every request is in the late window from here on
                    marks["start"] = _snapshot(engine)
                    if prof is not None:
                        prof.enable()
            # The window ends one step before the last: in lockstep every request finishes in
            # that step, and freeing their blocks (O(blocks) once per request, amortised O(1)
            # per token) would be charged to the window's K steps, O(L) per step at L = 4096.
            if got >= output_len - 1 and "end" not in marks:
                marks["end"] = _snapshot(engine)
                if prof is not None:
                    prof.disable()
                full_gc.append(_time_full_gc())
        tokens += got

    try:
        await asyncio.gather(*[consume(p) for p in prompts])
    finally:
        await engine.shutdown()
        del engine
        gc.unfreeze()
        gc.collect()
    assert tokens == batch * output_len, (tokens, batch * output_len)
    a, b = marks["start"], marks["end"]
    steps = int(b["steps"] - a["steps"])
    us = 1e6 / max(steps, 1)
    res = {"batch": batch, "mode": mode, "detok": "tok" if tok else "ids", "output_len": output_len, "steps": steps,
           "schedule_us": (b["schedule"] - a["schedule"]) * us, "submit_us": (b["submit"] - a["submit"]) * us,
           "update_us": (b["update"] - a["update"]) * us, "wait_us": (b["wait"] - a["wait"]) * us,
           "loop_cpu_us": (b["loop_cpu"] - a["loop_cpu"]) * us, "proc_cpu_us": (b["proc_cpu"] - a["proc_cpu"]) * us,
           "gc_us": (b["gc"] - a["gc"]) * us, "full_gc_us": full_gc[0] * 1e6,
           # automatic collections per 100 steps, by generation (young, middle, full)
           "gc_per_100_steps": [round(100 * (b[f"gc{g}"] - a[f"gc{g}"]) / max(steps, 1), 1) for g in range(3)],
           "steps_per_s": steps / max(b["wall"] - a["wall"], 1e-9), "tok_per_s": steps * batch / max(b["wall"] - a["wall"], 1e-9)}
    res["engine_us"] = res["schedule_us"] + res["submit_us"] + res["update_us"]
    res["sim"] = b["sim_idle"] is not None
    # --runner sim: the share of the window the simulated device had run dry
    res["sim_idle_share"] = (b["sim_idle"] - a["sim_idle"]) / max(b["wall"] - a["wall"], 1e-9) if res["sim"] else 0.0
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(args.sort).print_stats(args.profile_lines)
        res["profile"] = s.getvalue()
    return res


_KEYS = ["schedule_us", "submit_us", "update_us", "engine_us", "wait_us", "loop_cpu_us", "proc_cpu_us", "gc_us", "full_gc_us",
         "steps_per_s", "tok_per_s", "sim_idle_share"]


STAT = "median"  # --stat: how repeats combine


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the repeats, or with --stat best its best value (lowest
    cost, highest rate): on a shared machine interference only ever adds time."""
    out = dict(runs[0])
    for k in _KEYS:
        vals = [r[k] for r in runs]
        if STAT == "best":
            out[k] = max(vals) if k in ("steps_per_s", "tok_per_s") else min(vals)
        else:
            out[k] = statistics.median(vals)
    return out


def _row(r: dict[str, Any], label: str) -> str:
    return (f"| {label} | {r['batch']} | {r['mode']} | {r['detok']} | {r['output_len']} | {r['steps']} | {r['schedule_us']:.0f} "
            f"| {r['submit_us']:.0f} | {r['update_us']:.0f} | {r['engine_us']:.0f} | {r['loop_cpu_us']:.0f} "
            f"| {r['proc_cpu_us']:.0f} | {r['gc_us']:.0f} | {r['full_gc_us']:.0f} | {r['steps_per_s']:.0f} | {r['tok_per_s']:.0f} |"
            + (f" simulated device idle {r['sim_idle_share']:.1%} |" if r.get("sim") else ""))


def _ratio_row(new: dict[str, Any], old: dict[str, Any]) -> str:
    def q(k: str) -> str:
        return f"{new[k] / old[k]:.2f}x" if old[k] else "-"

    return (f"| new/old | {new['batch']} | {new['mode']} | {new['detok']} | {new['output_len']} | | {q('schedule_us')} "
            f"| {q('submit_us')} | {q('update_us')} | {q('engine_us')} | {q('loop_cpu_us')} | {q('proc_cpu_us')} | {q('gc_us')} "
            f"| {q('full_gc_us')} | {q('steps_per_s')} | {q('tok_per_s')} |")


HEADER = ("| code | batch | mode | detok | output len | window steps | schedule us/step | submit us/step | update us/step "
          "| engine total us/step | loop-thread CPU us/step | process CPU us/step | of which GC us/step | full GC us | steps/s | output tok/s |\n"
          "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def run_loop(coro: Any, loop: str) -> Any:
    """Run `coro` on the chosen event loop (uvloop: its C call_soon and futures make each
    consumer's wake-up cheaper than the stock loop's Python ones)."""
    if loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def _configs(args: argparse.Namespace) -> list[tuple[bool, int, int, str]]:
    return [(t == "tok", int(b), int(n), m) for t in args.tokenizer.split(",") for b in args.batch.split(",")
            for n in args.output_len.split(",") for m in args.modes.split(",")]


def _old_tree(ref: str) -> str:
    """A worktree of `ref` (cached by commit) whose `aiosched.executors` is its own."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    sha = subprocess.run(["git", "rev-parse", ref], capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    tree = os.path.join(tempfile.gettempdir(), f"aiosched-bench-{sha[:12]}")
    if not os.path.isdir(tree):
        subprocess.run(["git", "worktree", "add", "--detach", tree, sha], check=True, cwd=root, capture_output=True)
    link = os.path.join(tree, "aiosched", "executors")
    if not os.path.exists(link):  # the package layout maps executors/ to aiosched.executors
        os.symlink(os.path.join("..", "executors"), link)
    return tree


def _child(tree: str, cfg: tuple[bool, int, int, str], args: argparse.Namespace) -> dict[str, Any]:
    tok, batch, n, mode = cfg
    cmd = [sys.executable, os.path.abspath(__file__),
           "--child", "--batch", str(batch), "--output-len", str(n), "--modes", mode, "--tokenizer", "tok" if tok else "ids",
           "--input-len", str(args.input_len), "--runner", args.runner,
           "--size-for", str(max(int(x) for x in args.output_len.split(","))), "--loop", args.loop]
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({tree}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Old and new code in fresh subprocesses, same script (this one); rounds over every
    configuration and both codes (old, new, then new, old), so load drifts hit all alike."""
    trees = {"old": _old_tree(args.compare),
             "new": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    configs = _configs(args)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {(i, label): [] for i in range(len(configs)) for label in trees}
    for r in range(args.repeats):
        for i, cfg in enumerate(configs):
            for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
                runs[(i, label)].append(_child(trees[label], cfg, args))
    results = []
    for i in range(len(configs)):
        med = {label: _combine(runs[(i, label)]) for label in trees}
        for label in ("old", "new"):
            print(_row(med[label], label), flush=True)
            results.append(dict(med[label], label=label, runs=runs[(i, label)]))
        print(_ratio_row(med["new"], med["old"]), flush=True)
    return results


# ---- instruction counts (valgrind): the one measure this shared machine does not blur ----


async def inline_workload(batch: int, output_len: int, tok: bool, input_len: int) -> None:
    """The engine loop's host work on one thread: `schedule()`, `_process()` with a runner
    output made inline (one random token per sampled request; no runner thread, so no
    GIL hand-offs), `batch` consumer tasks streaming with `async for` (older trees: and the stats observer).
    Same code paths as the engine loop in async mode (two steps in flight)."""
    import random as _random

    from aiosched import detokenizer, engine_log
    from aiosched.async_scheduler import AsyncScheduler
    from aiosched.config import EngineConfig
    from aiosched.protocol import RunnerOutput, WorkerInfo
    from aiosched.tokenizer import Tokenizer

    max_len = input_len + 1024 + 32  # one configuration for every length
    cfg = EngineConfig.load(dict(runner="fake", max_num_seqs=batch, max_num_batched_tokens=batch * input_len,
                                 num_kv_blocks=batch * (max_len // 16 + 2) + 64, max_model_len=max_len, seed=0))
    e = AsyncEngine(cfg)
    e.tokenizer = Tokenizer(DEFAULT_MODEL) if tok else None
    if tok and hasattr(detokenizer, "warm"):  # as AsyncEngine.start does (trees that have it)
        detokenizer.warm(e.tokenizer)
    e.info = WorkerInfo(1, cfg.num_kv_blocks, 16, 8192, max_len, "cpu", "none", "fake", features=["logprobs"])
    e.scheduler = AsyncScheduler(cfg, cfg.num_kv_blocks, max_len)
    e._running = True
    if hasattr(engine_log.StatsLogger, "on_output"):  # older trees: the stats logger observed every output
        e.add_observer(engine_log.StatsLogger(e))
    rng = _random.Random(1)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def consume(stream: Any) -> int:
        n = 0
        async for out in stream:
            n += len(out.new_token_ids)
        return n

    tasks = [asyncio.ensure_future(consume(e.generate([rng.randrange(8192) for _ in range(input_len)], params)))
             for _ in range(batch)]
    sched, in_flight, sampler = e.scheduler, [], _random.Random(2)
    while sched.has_unfinished() or in_flight:
        so = sched.schedule()
        if not so.is_empty:
            in_flight.append(so)
        if len(in_flight) < 2 and not so.is_empty:
            continue
        if not in_flight:
            await asyncio.sleep(0)
            continue
        so = in_flight.pop(0)
        ids = [sr.req_id for sr in so.scheduled if sr.sample]
        e._process(so, RunnerOutput(so.step_id, ids, [[sampler.randrange(8192)] for _ in ids]))
        await asyncio.sleep(0)  # the consumers run
    assert sum(await asyncio.gather(*tasks)) == batch * output_len


def _instructions(tree: str, batch: int, output_len: int, tok: bool, args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg.out")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__),
               "--child-inline", "--batch", str(batch), "--output-len", str(output_len), "--tokenizer", "tok" if tok else "ids",
               "--input-len", str(args.input_len)]
        # A fixed hash seed: start-up (the tokenizer's dicts, set orders) then costs the same in both runs of a pair, and
        # cancels in their difference.
        # One thread in every pool (the Rust tokenizer, OpenBLAS): valgrind serialises threads, and a pool's spin-waits count as
        # instructions in whatever amount the thread interleaving gives.
        env = dict(os.environ, PYTHONPATH=tree, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
        if r.returncode != 0:
            raise RuntimeError(f"valgrind run failed ({tree}): {r.stderr[-2000:]}")
        with open(out) as f:
            for line in f:
                if line.startswith("summary:"):
                    return int(line.split()[1])
    raise RuntimeError("no callgrind summary")


def instructions(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Instructions per request per decode step: Ir(L0 + 64) - Ir(L0) over 64 x batch, so
    start-up, imports and prefill cancel out (L0 from --instr-base: the steps measured are
    those while every request holds L0..L0+64 output tokens). Deterministic (valgrind counts what the CPU
    executes, whatever else runs on the machine), ~1-2 min per run."""
    trees = {"new": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    if args.compare:
        trees = {"old": _old_tree(args.compare), **trees}
    extra = 64
    results = []
    print("| code | batch | detok | history (output tokens) | instructions per request per decode step |\n"
          "| --- | ---: | --- | --- | ---: |", flush=True)
    for t in args.tokenizer.split(","):
        for b in (int(x) for x in args.batch.split(",")):
            for base in (int(x) for x in args.instr_base.split(",")):
                per = {}
                for label, tree in trees.items():
                    ir = [_instructions(tree, b, n, t == "tok", args) for n in (base, base + extra)]
                    per[label] = (ir[1] - ir[0]) / (extra * b)
                    print(f"| {label} | {b} | {t} | {base}-{base + extra} | {per[label]:,.0f} |", flush=True)
                    results.append({"label": label, "batch": b, "detok": t, "history": [base, base + extra],
                                    "instructions_per_request_step": per[label]})
                if "old" in per:
                    print(f"| new/old | {b} | {t} | {base}-{base + extra} | {per['new'] / per['old']:.2f}x |", flush=True)
    return results


async def main(args: argparse.Namespace) -> None:
    if args.runner == "light":
        _install_light_runner()
    elif args.runner == "sim":
        _install_light_runner(args.device_ms)
    if args.child_inline:
        tok, batch, n, _ = _configs(args)[0]
        gc.freeze()
        await inline_workload(batch, n, tok, args.input_len)
        return
    if args.child:  # one warm-up (imports, tokenizer, allocator), one timed run, JSON out
        tok, batch, n, mode = _configs(args)[0]
        await run_one(batch, mode, tok, min(n, 64), args)
        print(json.dumps(await run_one(batch, mode, tok, n, args)))
        return
    configs = _configs(args)
    if args.profile:
        for tok, batch, n, mode in configs:
            r = await run_one(batch, mode, tok, n, args, profile=True)
            print(r.pop("profile"))
        return
    for tok, batch, n, mode in configs:  # warm-up (imports, tokenizer, allocator)
        await run_one(batch, mode, tok, min(n, 64), args)
    # Rounds over the configurations (not one configuration after another): load drifts
    # on a shared machine then hit every configuration alike.
    runs: list[list[dict[str, Any]]] = [[] for _ in configs]
    for _ in range(args.repeats):
        for i, (tok, batch, n, mode) in enumerate(configs):
            runs[i].append(await run_one(batch, mode, tok, n, args))
    results = [_combine(r) for r in runs]
    for r in results:
        print(_row(r, args.label), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,64,256", help="concurrent requests (comma list)")
    p.add_argument("--modes", default="sync,async")
    p.add_argument("--tokenizer", default="ids,tok", help="ids: no detokenizer; tok: the default model's tokenizer")
    p.add_argument("--input-len", type=int, default=230)
    p.add_argument("--output-len", default="128", help="output tokens per request (comma list)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: batch x input_len (one prefill step)")
    p.add_argument("--runner", choices=["light", "fake", "sim"], default="light",
                   help="sim: light on a simulated GPU (--device-ms per step; the launch thread does the torch runner's "
                        "host work; AIOSCHED_LAUNCH_HANDOFF applies)")
    p.add_argument("--device-ms", type=float, default=2.5, help="--runner sim: the simulated device's time per step")
    p.add_argument("--speculative", choices=["none", "off", "auto"], default="none",
                   help="n-gram speculation configured: off = never drafting (disable_by_batch_size=1), auto = the SpecPolicy")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (combined by --stat)")
    p.add_argument("--stat", choices=["median", "best"], default="median", help="combine repeats by median or best value")
    p.add_argument("--label", default="", help="first column of the table (e.g. old/new)")
    p.add_argument("--compare", default=None, metavar="REF", help="before/after: REF's code vs this checkout, alternating subprocesses")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size-for", type=int, default=None, help=argparse.SUPPRESS)  # the run's longest output
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="the event loop (uvloop: what the CLI's serve/bench and uvicorn --loop uvloop run)")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="cProfile the event-loop thread over the window")
    p.add_argument("--instructions", action="store_true",
                   help="instructions per request per decode step under valgrind (one thread, runner inline); with --compare, old and new")
    p.add_argument("--instr-base", default="32", help="--instructions: output tokens already held (comma list, <= 960)")
    p.add_argument("--child-inline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sort", default="tottime")
    p.add_argument("--profile-lines", type=int, default=35)
    args = p.parse_args()
    STAT = args.stat
    if args.instructions:
        res = instructions(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": res}, f, indent=1)
    elif args.compare:
        print(HEADER, flush=True)
        res = compare(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": res}, f, indent=1)
    else:
        if not (args.child or args.child_inline):
            print(HEADER, flush=True)
        run_loop(main(args), args.loop)
