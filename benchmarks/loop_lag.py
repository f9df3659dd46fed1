"""How long another task on the engine's event loop waits for its turn (the lag a web
server's handlers see), with the fake runner: 256 requests of 200 prompt tokens, 64 out.

    .venv/bin/python benchmarks/loop_lag.py [--requests 256] [--max-tokens 64]

Prints the probe's lag p50 / p99 / max in ms (a 5 ms sleep, minus 5 ms). The test suite
checks the behaviour (the loop yields while steps are in flight); this measures the time.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from aiosched import AsyncEngine, EngineConfig, SamplingParams


async def run(n: int, max_tokens: int) -> dict[str, float]:
    lags: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)

    eng = AsyncEngine(EngineConfig(runner="fake", num_kv_blocks=4096, block_size=16, max_num_seqs=128, max_num_batched_tokens=4096))
    await eng.start()
    try:
        p = asyncio.create_task(probe())
        await asyncio.gather(*[eng.generate([i % 400 + 1] * 200, SamplingParams(max_tokens=max_tokens, temperature=0)) for i in range(n)])
        stop.set()
        await p
    finally:
        await eng.shutdown()
    lags.sort()
    return {"p50_ms": statistics.median(lags) * 1e3, "p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1e3, "max_ms": lags[-1] * 1e3,
            "probes": float(len(lags))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    r = asyncio.run(run(a.requests, a.max_tokens))
    print(" ".join(f"{k}={v:.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
