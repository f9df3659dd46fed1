"""The multiproc executor's cost per *synchronous* step, before vs after, in one run.

    .venv/bin/python benchmarks/mp_sync_overhead.py [--before 1277f66] [--rounds 5] [--steps 1500]

Issue 17 measured the multiproc executor's sync-mode overhead at 0.66 ms per step
on the H200 host (2.27 vs 1.60 ms inproc, tpu workload). In sync mode nothing
overlaps the round trip, so every thread wake-up on the path counts, and on a big
host with idle cores each wake-up is tens of microseconds.

Two measurements, each inproc vs multiproc in the same process, back to back:
- executor: `submit` -> future resolved, one step in flight, with a runner that
  does no work (`EchoRunner`), at batch 1, 3 (the tpu workload's concurrency) and
  256; also steps/s with 2 in flight (async scheduling must not regress);
- engine: an `AsyncEngine` with `async_scheduling = false` and the fake runner,
  3 concurrent requests of 200 tokens: wall time per engine step.

`--before REV` extracts that commit's tree (`git archive`) and runs the same child
measurement there, alternating with the working tree in every round, so a burst
of load on the shared machine hits both. Reported: medians over rounds; the
overhead is multiproc minus inproc of the same round and tree.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ---- child: measure one tree (its aiosched/executors come first on sys.path) ----


def _echo_runner_class() -> type:
    from aiosched.protocol import PROTOCOL_VERSION, RunnerOutput, SchedulerOutput, WorkerInfo
    from aiosched.executors.runner import ModelRunner, PendingOutput, ReadyOutput

    class EchoRunner(ModelRunner):
        """Does no model work: every sampling request gets token 7."""

        def load(self) -> WorkerInfo:
            return WorkerInfo(PROTOCOL_VERSION, 1 << 20, self.config.block_size, 32000, 1 << 16, "cpu", "none", "fake")

        def execute(self, so: SchedulerOutput) -> PendingOutput:
            ids = [sr.req_id for sr in so.scheduled if sr.sample]
            return ReadyOutput(RunnerOutput(so.step_id, ids, [[7] for _ in ids]))

    return EchoRunner


def __getattr__(name: str) -> Any:  # `mp_sync_overhead:EchoRunner` for the workers, built from their tree
    if name == "EchoRunner":
        return _echo_runner_class()
    raise AttributeError(name)


def _steps(batch: int, tag: str, step0: int):
    from aiosched.protocol import NewRequestData, ScheduledRequest, SchedulerOutput
    from aiosched.sampling_params import SamplingParams

    ids = [f"{tag}-{i}" for i in range(batch)]
    news = [NewRequestData(r, list(range(1, 17)), 16, SamplingParams(max_tokens=1 << 15, temperature=0.0), 42) for r in ids]
    yield SchedulerOutput(step0, news, [ScheduledRequest(r, 16, 0, [i * 64], True) for i, r in enumerate(ids)], [], 16 * batch)
    pos, step = 16, step0
    while True:
        step += 1
        new_block = pos % 16 == 0
        sched = [ScheduledRequest(r, 1, pos, [i * 64 + (pos // 16) % 64] if new_block else [], True) for i, r in enumerate(ids)]
        pos += 1
        yield SchedulerOutput(step, [], sched, [], batch)


async def _executor_figures(kind: str, batch: int, steps: int) -> dict[str, float]:
    from aiosched.config import EngineConfig

    config = EngineConfig(runner="fake", block_size=16, async_scheduling=False)
    if kind == "inproc":
        import aiosched.executors.inproc as module

        runner = _echo_runner_class()
        original = module.create_runner
        module.create_runner = lambda cfg, rank=0, world_size=1: runner(cfg, rank, world_size)  # type: ignore[assignment]
        ex: Any = module.InprocExecutor(config)
        try:
            await ex.start()
        finally:
            module.create_runner = original
    else:
        from aiosched.executors.multiproc import MultiprocExecutor

        ex = MultiprocExecutor(config, runner_factory="mp_sync_overhead:EchoRunner")
        await ex.start()
    try:
        gen = _steps(batch, "a", 0)
        for _ in range(100):  # prefill + warm-up
            await ex.submit(next(gen))
        lat = []
        for _ in range(steps):
            t0 = time.perf_counter()
            await ex.submit(next(gen))
            lat.append((time.perf_counter() - t0) * 1e6)
        gen = _steps(batch, "b", 10 * steps)
        await ex.submit(next(gen))
        futs = [ex.submit(next(gen)) for _ in range(2)]
        t0 = time.perf_counter()
        for _ in range(steps):
            await futs.pop(0)
            futs.append(ex.submit(next(gen)))
        rate = steps / (time.perf_counter() - t0)
        for f in futs:
            await f
    finally:
        await ex.shutdown()
    return {"p50_us": statistics.median(lat), "mean_us": statistics.fmean(lat), "steps_per_s_2_in_flight": rate}


async def _engine_figure(kind: str, tokens: int) -> float:
    """Wall µs per engine step: 3 concurrent requests, sync scheduling, fake runner."""
    from aiosched import AsyncEngine, SamplingParams
    from aiosched.config import EngineConfig

    config = EngineConfig(executor=kind, runner="fake", async_scheduling=False, num_kv_blocks=256, block_size=16)
    async with AsyncEngine(config) as eng:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        await eng.generate([1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*[eng.generate([5 + i, 6, 7, 8], params) for i in range(3)])
        return (time.perf_counter() - t0) / tokens * 1e6


async def child(args: argparse.Namespace) -> None:
    out: dict[str, Any] = {}
    for batch in args.batches:
        for kind in ("inproc", "multiproc"):
            out[f"{kind}/B{batch}"] = await _executor_figures(kind, batch, args.steps)
    for kind in ("inproc", "multiproc"):
        out[f"engine/{kind}"] = await _engine_figure(kind, args.engine_tokens)
    print("RESULT " + json.dumps(out), flush=True)


# ---- parent: alternate the two trees, report ----


def extract(rev: str) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    where = Path(tempfile.mkdtemp(prefix=f"aiosched-{rev}-"))
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(where, filter="data")
    return where


def run_child(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{HERE}")
    cmd = [sys.executable, str(HERE / "mp_sync_overhead.py"), "--child", "--steps", str(args.steps),
           "--engine-tokens", str(args.engine_tokens), "--batches", *map(str, args.batches)]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child in {tree} failed:\n{proc.stdout}\n{proc.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="1277f66", help="the commit to compare with (git rev)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--engine-tokens", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 3, 256])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.getcwd())
        try:
            import uvloop  # the CLI's loop
            uvloop.install()
        except ImportError:
            pass
        asyncio.run(child(args))
        return
    trees = {"before": extract(args.before), "after": ROOT}
    print(f"before = {args.before}, after = working tree; {args.rounds} rounds, {args.steps} steps each; "
          f"cpus {os.cpu_count()}, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            rounds[name].append(run_child(tree, args))
    med = lambda name, key, field: statistics.median(r[key][field] for r in rounds[name])  # noqa: E731
    print("\nexecutor, 1 step in flight (sync): p50 µs; overhead = multiproc - inproc (median of rounds)")
    print(f"| batch | inproc before | multiproc before | overhead before | inproc after | multiproc after | overhead after | 2 in flight mp before / after (steps/s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for b in args.batches:
        row = []
        for name in ("before", "after"):
            over = statistics.median(r[f"multiproc/B{b}"]["p50_us"] - r[f"inproc/B{b}"]["p50_us"] for r in rounds[name])
            row += [med(name, f"inproc/B{b}", "p50_us"), med(name, f"multiproc/B{b}", "p50_us"), over]
        rates = [med(n, f"multiproc/B{b}", "steps_per_s_2_in_flight") for n in ("before", "after")]
        print(f"| {b} | " + " | ".join(f"{x:.1f}" for x in row) + f" | {rates[0]:.0f} / {rates[1]:.0f} |")
    print("\nengine, sync scheduling, fake runner, 3 concurrent requests: µs per step")
    for name in ("before", "after"):
        ip = statistics.median(r["engine/inproc"] for r in rounds[name])
        mp = statistics.median(r["engine/multiproc"] for r in rounds[name])
        over = statistics.median(r["engine/multiproc"] - r["engine/inproc"] for r in rounds[name])
        print(f"  {name:<6}: inproc {ip:.1f}, multiproc {mp:.1f}, overhead {over:.1f}")
    print("\nraw: " + json.dumps(rounds))


if __name__ == "__main__":
    main()
