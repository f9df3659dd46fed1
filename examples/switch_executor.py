"""Same code, different executor: where the model runs is chosen by the config file only.

Run:

    python examples/switch_executor.py examples/configs/inproc.toml
    python examples/switch_executor.py examples/configs/multiproc.toml
    python examples/switch_executor.py examples/configs/multiproc.toml --model /path/to/model

`inproc` runs the model on threads of this process; `multiproc` runs it in worker
processes (one per tensor-parallel rank) over ZeroMQ; `remote` (see
docs/user_guide.md) on another host. Greedy outputs are identical in all of them.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from aiosched import AsyncEngine, EngineConfig, SamplingParams

PROMPTS = ["def fibonacci(n):", "import asyncio\n", "class Stack:"]


async def run(config_path: str, **overrides: Any) -> list[str]:
    """Generate PROMPTS greedily with the engine the file describes; return the texts."""
    config = EngineConfig.load(config_path, **overrides)
    t0 = time.perf_counter()
    async with AsyncEngine(config) as engine:
        t1 = time.perf_counter()
        outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_tokens=24, temperature=0.0)) for p in PROMPTS))
        t2 = time.perf_counter()
    print(f"executor={config.executor} device={config.device}: started in {t1 - t0:.2f}s, generated in {t2 - t1:.2f}s")
    for p, o in zip(PROMPTS, outs):
        print(f"  {p!r} -> {o.text!r}")
    return [o.text for o in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="TOML engine config")
    parser.add_argument("--model", help="override the config's model directory")
    args = parser.parse_args(argv)
    asyncio.run(run(args.config, **({"model": args.model} if args.model else {})))
    return 0


if __name__ == "__main__":  # required: the multiproc executor starts workers with `spawn`
    sys.exit(main())
