"""Per-step cost of the process boundary: multiproc vs inproc, at batch 1 and 256.

    PYTHONPATH=. .venv/bin/python benchmarks/ipc_overhead.py [--steps 2000] [--batches 1 256]

Drives the executors directly (no scheduler, no model) with synthetic decode
steps of B requests, so only the executor path is timed: a runner that does no
work (`EchoRunner`: one token per request) sits behind
- inproc: submit -> launch thread -> result thread -> call_soon_threadsafe;
- multiproc: encode -> ROUTER/ipc -> worker IO thread -> decode -> launch and
  result threads -> encode -> ipc -> zmq.asyncio recv -> decode -> future.
Each step is submitted and awaited alone (latency, 1 in flight); then 2 in flight
(the engine's async mode) for steps per second. The sandbox is shared, so the
measurement runs in rounds, inproc and multiproc back to back in each (a burst of
load elsewhere hits both), and reports medians over the rounds. Also reported: the codec alone
(encode + decode both ways, in process) and the frame sizes. Runs on uvloop
when installed, like the CLI.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiosched.config import EngineConfig  # noqa: E402
from aiosched.event_loop import run  # noqa: E402
from aiosched.protocol import (  # noqa: E402
    PROTOCOL_VERSION, Execute, NewRequestData, RunnerOutput, ScheduledRequest, SchedulerOutput, StepResult,
    WorkerInfo, decode_from_worker, decode_to_worker, encode,
)
from aiosched.sampling_params import SamplingParams  # noqa: E402
from aiosched.executors.base import Executor  # noqa: E402
from aiosched.executors.inproc import InprocExecutor  # noqa: E402
from aiosched.executors.runner import ModelRunner, PendingOutput, ReadyOutput  # noqa: E402

PROMPT_LEN = 16
BLOCK = 16
MAX_BLOCKS = 64  # per request: block ids i * 64 .. i * 64 + 63 (wrap around for the echo runner)


class EchoRunner(ModelRunner):
    """Does no model work: every sampling request gets token 7."""

    def load(self) -> WorkerInfo:
        return WorkerInfo(PROTOCOL_VERSION, 1 << 20, self.config.block_size, 32000, 1 << 16, "cpu", "none", "fake")

    def execute(self, so: SchedulerOutput) -> PendingOutput:
        ids = [sr.req_id for sr in so.scheduled if sr.sample]
        return ReadyOutput(RunnerOutput(so.step_id, ids, [[7] for _ in ids]))


def synthetic_steps(batch: int, step0: int = 0, tag: str = "") -> Iterator[SchedulerOutput]:
    """A prefill of `batch` new requests, then decode steps (a new block every BLOCK steps).

    Block ids wrap after MAX_BLOCKS per request: real runners get at most
    MAX_BLOCKS * BLOCK - PROMPT_LEN decode steps from one generator."""
    ids = [f"{tag}req-{i}#{i + 100_000}" for i in range(batch)]
    blocks_per = (PROMPT_LEN + BLOCK - 1) // BLOCK
    news = [NewRequestData(r, list(range(1, PROMPT_LEN + 1)), PROMPT_LEN, SamplingParams(max_tokens=1 << 15, temperature=0.0), 42)
            for r in ids]
    sched = [ScheduledRequest(r, PROMPT_LEN, 0, list(range(i * MAX_BLOCKS, i * MAX_BLOCKS + blocks_per)), True)
             for i, r in enumerate(ids)]
    step = step0
    yield SchedulerOutput(step, news, sched, [], batch * PROMPT_LEN)
    pos, next_block = PROMPT_LEN, blocks_per
    while True:
        step += 1
        new_block = pos % BLOCK == 0
        block = next_block % MAX_BLOCKS
        sched = [ScheduledRequest(r, 1, pos, [i * MAX_BLOCKS + block] if new_block else [], True) for i, r in enumerate(ids)]
        next_block += new_block
        pos += 1
        yield SchedulerOutput(step, [], sched, [], batch)


def decode_step(batch: int) -> SchedulerOutput:
    gen = synthetic_steps(batch)
    next(gen)
    return next(gen)


def codec_us(batch: int, reps: int = 2000) -> tuple[float, int, int]:
    """encode(Execute) + decode_to_worker + encode(StepResult) + decode_from_worker, µs; frame sizes."""
    so = decode_step(batch)
    out = EchoRunner(EngineConfig(runner="fake")).execute(so).result()
    reps = max(200, reps // max(1, batch // 16))
    t0 = time.perf_counter()
    for _ in range(reps):
        a = encode(Execute(so))
        decode_to_worker(a)
        b = encode(StepResult(out))
        decode_from_worker(b)
    return (time.perf_counter() - t0) / reps * 1e6, len(a), len(b)


async def time_steps(ex: Executor, batch: int, steps: int, in_flight: int, warmup: int = 100,
                     step0: int = 0, tag: str = "") -> tuple[list[float], float]:
    """Per-step latency (µs, when in_flight == 1) and steps per second; step ids from step0."""
    gen = synthetic_steps(batch, step0, tag)
    await ex.submit(next(gen))  # prefill
    for _ in range(warmup):
        await ex.submit(next(gen))
    lat: list[float] = []
    t_start = time.perf_counter()
    if in_flight == 1:
        for _ in range(steps):
            t0 = time.perf_counter()
            await ex.submit(next(gen))
            lat.append((time.perf_counter() - t0) * 1e6)
    else:
        futs = [ex.submit(next(gen)) for _ in range(in_flight)]
        for _ in range(steps):
            await futs.pop(0)
            futs.append(ex.submit(next(gen)))
        for f in futs:
            await f
    return lat, steps / (time.perf_counter() - t_start)


class EchoInproc(InprocExecutor):
    """The in-process executor with an EchoRunner."""

    async def start(self) -> WorkerInfo:
        import aiosched.executors.inproc as module

        original = module.create_runner
        module.create_runner = lambda cfg, rank=0, world_size=1: EchoRunner(cfg, rank, world_size)  # type: ignore[assignment]
        try:
            return await super().start()
        finally:
            module.create_runner = original


def inproc_echo(config: EngineConfig) -> Executor:
    return EchoInproc(config)


def multiproc_echo(config: EngineConfig) -> Executor:
    from aiosched.executors.multiproc import MultiprocExecutor

    return MultiprocExecutor(config, runner_factory="benchmarks.ipc_overhead:EchoRunner")


async def measure(name: str, factory: Callable[[EngineConfig], Executor], config: EngineConfig,
                  batch: int, steps: int) -> dict[str, Any]:
    ex = factory(config)
    await ex.start()
    try:
        lat, _ = await time_steps(ex, batch, steps, 1)
        _, sps = await time_steps(ex, batch, steps, 2, step0=10 * steps, tag="b")
    finally:
        await ex.shutdown()
    lat.sort()
    return {"name": name, "batch": batch, "p50": statistics.median(lat), "p90": lat[int(0.9 * len(lat))],
            "mean": statistics.fmean(lat), "steps_per_s_2_in_flight": sps}


def print_row(r: dict[str, Any]) -> None:
    print(f"  {r['name']:<10} B={r['batch']:<4} p50 {r['p50']:8.1f} µs  p90 {r['p90']:8.1f} µs  mean {r['mean']:8.1f} µs"
          f"  | 2 in flight: {r['steps_per_s_2_in_flight']:8.0f} steps/s")


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over the rounds."""
    out = dict(rows[0])
    for key in ("p50", "p90", "mean", "steps_per_s_2_in_flight"):
        out[key] = statistics.median(r[key] for r in rows)
    return out


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


async def main(args: argparse.Namespace) -> None:
    print(f"event loop: {type(asyncio.get_running_loop()).__module__}; {args.steps} steps per measurement, "
          f"{args.rounds} rounds (inproc and multiproc back to back), medians over rounds; "
          f"cpus {os.cpu_count()}, load average {load_average()}")
    config = EngineConfig(runner="fake", block_size=BLOCK)
    for batch in args.batches:
        c_us, to_bytes, from_bytes = min(codec_us(batch) for _ in range(args.rounds))
        print(f"batch {batch}: frames {to_bytes} B to the worker, {from_bytes} B back; codec (4 ops, best) {c_us:.1f} µs")
        rounds = []
        for _ in range(args.rounds):  # back to back, so a burst of load elsewhere hits both
            rounds.append((await measure("inproc", inproc_echo, config, batch, args.steps),
                           await measure("multiproc", multiproc_echo, config, batch, args.steps)))
        print_row(median_row([r[0] for r in rounds]))
        print_row(median_row([r[1] for r in rounds]))
        over_p50 = statistics.median(m["p50"] - i["p50"] for i, m in rounds)
        over_mean = statistics.median(m["mean"] - i["mean"] for i, m in rounds)
        spread = sorted(round(m["p50"] - i["p50"]) for i, m in rounds)
        print(f"  process-boundary overhead per step: p50 {over_p50:.1f} µs (rounds: {spread}), mean {over_mean:.1f} µs; "
              f"codec alone {c_us:.1f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (inproc, multiproc); medians are reported")
    run(main(parser.parse_args()))
