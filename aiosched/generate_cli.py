"""`aiosched generate PROMPT`: stream a completion to stdout."""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

from aiosched.engine import AsyncEngine
from aiosched.engine_args import add_engine_arguments, engine_config_from_args
from aiosched.event_loop import run
from aiosched.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="def fibonacci(n):")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--stats", action="store_true", help="print timing and engine stats to stderr")
    add_engine_arguments(parser)


async def _generate(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)
    if config.resolved_model is None:
        raise ValueError("model: no --model given and no embedded default model is installed")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    t0 = time.perf_counter()
    async with AsyncEngine(config) as engine:
        t1 = time.perf_counter()
        sys.stdout.write(args.prompt)
        first = None
        async for out in engine.generate(args.prompt, params):
            first = first or time.perf_counter()
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        t2 = time.perf_counter()
        sys.stdout.write("\n")
        if args.stats:
            n = len(out.token_ids)
            print(f"[load {t1 - t0:.2f}s, first token {((first or t2) - t1) * 1e3:.0f} ms, {n} tokens in {t2 - t1:.2f}s "
                  f"({n / max(t2 - t1, 1e-9):.1f} tok/s), finish={out.finish_reason}]", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    return run(_generate(args))
