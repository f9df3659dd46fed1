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

    .venv/bin/python benchmarks/engine_overhead.py                       # the table
    .venv/bin/python benchmarks/engine_overhead.py --batch 256 --modes async --tokenizer tok --profile
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
import sys
import time
from typing import Any

from aiosched.engine import AsyncEngine
from aiosched.sampling_params import SamplingParams

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(sys.modules["aiosched"].__file__)), "default_model")


def _install_light_runner() -> None:
    """Point runner "fake" at the fake model without its KV-cache read-back (same tokens)."""
    import aiosched.executors.runner as runners
    from aiosched.protocol import RunnerOutput
    from aiosched.executors.runner import ReadyOutput
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


class _GCTimer:
    """Wall time spent in the cyclic garbage collector (any thread)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0


_gc_timer = _GCTimer()
gc.callbacks.append(_gc_timer)


def _snapshot(engine: AsyncEngine) -> dict[str, float]:
    t = engine.timings
    return {"steps": t.steps, "schedule": t.schedule_s, "submit": getattr(t, "submit_s", 0.0), "update": t.update_s,
            "wait": t.wait_s, "wall": time.perf_counter(), "loop_cpu": time.thread_time(), "proc_cpu": time.process_time(),
            "gc": _gc_timer.total}


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


async def run_one(batch: int, mode: str, tok: bool, args: argparse.Namespace, profile: bool = False) -> dict[str, Any]:
    blocks_per_req = -(-(args.input_len + args.output_len) // 16) + 1
    config = dict(runner="fake", async_scheduling=mode == "async", max_num_seqs=max(batch, 1),
                  max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=batch * blocks_per_req + 64,
                  max_model_len=max(1024, args.input_len + args.output_len), model=DEFAULT_MODEL if tok else None, seed=0)
    engine = AsyncEngine.from_config(config)
    await engine.start()
    _time_submit(engine)
    assert engine.info is not None
    rng = random.Random(1234)
    vocab = min(engine.info.vocab_size, 32000)
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(batch)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    firsts = 0
    marks: dict[str, dict[str, float]] = {}
    prof = cProfile.Profile() if profile else None
    tokens = 0

    async def consume(p: list[int]) -> None:
        nonlocal firsts, tokens
        got = 0
        async for out in engine.generate(p, params):
            if got == 0 and out.new_token_ids:
                firsts += 1
                if firsts == batch:  # every request is decoding from here on
                    marks["start"] = _snapshot(engine)
                    if prof is not None:
                        prof.enable()
            got += len(out.new_token_ids)
        tokens += got

    try:
        await asyncio.gather(*[consume(p) for p in prompts])
        marks["end"] = _snapshot(engine)
        if prof is not None:
            prof.disable()
    finally:
        await engine.shutdown()
        del engine
        gc.unfreeze()
        gc.collect()
    assert tokens == batch * args.output_len, (tokens, batch * args.output_len)
    a, b = marks["start"], marks["end"]
    steps = int(b["steps"] - a["steps"])
    us = 1e6 / max(steps, 1)
    res = {"batch": batch, "mode": mode, "detok": "tok" if tok else "ids", "steps": steps,
           "schedule_us": (b["schedule"] - a["schedule"]) * us, "submit_us": (b["submit"] - a["submit"]) * us,
           "update_us": (b["update"] - a["update"]) * us, "wait_us": (b["wait"] - a["wait"]) * us,
           "loop_cpu_us": (b["loop_cpu"] - a["loop_cpu"]) * us, "proc_cpu_us": (b["proc_cpu"] - a["proc_cpu"]) * us,
           "gc_us": (b["gc"] - a["gc"]) * us,
           "steps_per_s": steps / (b["wall"] - a["wall"]), "tok_per_s": steps * batch / (b["wall"] - a["wall"])}
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(args.sort).print_stats(args.profile_lines)
        res["profile"] = s.getvalue()
    return res


_KEYS = ["schedule_us", "submit_us", "update_us", "wait_us", "loop_cpu_us", "proc_cpu_us", "gc_us", "steps_per_s", "tok_per_s"]


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    for k in _KEYS:
        out[k] = statistics.median(r[k] for r in runs)
    return out


def _row(r: dict[str, Any], label: str) -> str:
    return (f"| {label} | {r['batch']} | {r['mode']} | {r['detok']} | {r['steps']} | {r['schedule_us']:.0f} | {r['submit_us']:.0f} "
            f"| {r['update_us']:.0f} | {r['schedule_us'] + r['submit_us'] + r['update_us']:.0f} | {r['loop_cpu_us']:.0f} "
            f"| {r['proc_cpu_us']:.0f} | {r['gc_us']:.0f} | {r['steps_per_s']:.0f} | {r['tok_per_s']:.0f} |")


HEADER = ("| code | batch | mode | detok | decode steps | schedule us/step | submit us/step | update us/step | engine total us/step "
          "| loop-thread CPU us/step | process CPU us/step | of which GC us/step | steps/s | output tok/s |\n"
          "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


async def main(args: argparse.Namespace) -> None:
    if args.runner == "light":
        _install_light_runner()
    results = []
    for tok in [t == "tok" for t in args.tokenizer.split(",")]:
        for batch in [int(b) for b in args.batch.split(",")]:
            for mode in args.modes.split(","):
                if args.profile:
                    r = await run_one(batch, mode, tok, args, profile=True)
                    print(r.pop("profile"))
                    results.append(r)
                    continue
                await run_one(batch, mode, tok, args)  # warm-up (imports, tokenizer, allocator)
                runs = [await run_one(batch, mode, tok, args) for _ in range(args.repeats)]
                results.append(_median(runs))
                print(_row(results[-1], args.label), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,64,256", help="concurrent requests (comma list)")
    p.add_argument("--modes", default="sync,async")
    p.add_argument("--tokenizer", default="ids,tok", help="ids: no detokenizer; tok: the default model's tokenizer")
    p.add_argument("--input-len", type=int, default=230)
    p.add_argument("--output-len", type=int, default=120)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--runner", choices=["light", "fake"], default="light")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--label", default="", help="first column of the table (e.g. old/new)")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="cProfile the event-loop thread over the decode window")
    p.add_argument("--sort", default="tottime")
    p.add_argument("--profile-lines", type=int, default=35)
    args = p.parse_args()
    print(HEADER, flush=True)
    asyncio.run(main(args))
