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


# Sampling flags left unset take the checkpoint's generation_config.json values, then
# SamplingParams' defaults; the one exception is temperature, greedy unless asked.
_SAMPLING_FLAGS: dict[str, type] = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
                                    "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
                                    "min_tokens": int}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="def fibonacci(n):")
    parser.add_argument("--max-tokens", type=int, default=64)
    for name, kind in _SAMPLING_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--stats", action="store_true", help="print timing and engine stats to stderr")
    add_engine_arguments(parser)


def sampling_params(args: argparse.Namespace, engine: AsyncEngine) -> SamplingParams:
    """The flags given, over the checkpoint's generation defaults (greedy by default)."""
    fields = {name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None}
    if "temperature" not in fields and "temperature" not in (engine.tokenizer.generation_defaults if engine.tokenizer else {}):
        fields["temperature"] = 0.0
    return engine.default_sampling_params(max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos, **fields)


async def _generate(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)
    if config.resolved_model is None:
        raise ValueError("model: no --model given and no embedded default model is installed")
    t0 = time.perf_counter()
    async with AsyncEngine(config) as engine:
        params = sampling_params(args, engine)
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
