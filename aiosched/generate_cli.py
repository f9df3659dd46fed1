"""`aiosched generate PROMPT`: stream a completion to stdout.

    aiosched generate "def fibonacci(n):" --max-tokens 64
    echo "def fibonacci(n):" | aiosched generate -          # the prompt from stdin
    aiosched generate "x = " -n 3 --temperature 0.8 --json  # one JSON object, every sample

A prompt is required: there is no default one (an empty prompt is an error too).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from aiosched.engine import AsyncEngine
from aiosched.engine_args import add_engine_arguments, engine_config_from_args
from aiosched.event_loop import run
from aiosched.outputs import RequestOutput
from aiosched.sampling_params import SamplingParams

# Sampling flags left unset take the checkpoint's generation_config.json values, then
# SamplingParams' defaults; the one exception is temperature, greedy unless asked.
_SAMPLING_FLAGS: dict[str, tuple[type, str]] = {
    "temperature": (float, "sampling temperature (default: the checkpoint's generation_config.json, else 0 = greedy)"),
    "top_p": (float, "nucleus sampling: keep the smallest set of tokens with this total probability"),
    "top_k": (int, "keep the k most likely tokens (0: off)"),
    "min_p": (float, "drop tokens below min_p x the top token's probability"),
    "seed": (int, "per-request sampling seed (reproducible sampling)"),
    "repetition_penalty": (float, "penalise tokens already in the prompt or output (1.0: off)"),
    "presence_penalty": (float, "OpenAI-style presence penalty"),
    "frequency_penalty": (float, "OpenAI-style frequency penalty"),
    "min_tokens": (int, "generate at least this many tokens before EOS may end it"),
}


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int | None = 64) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default: {max_tokens or 'what the context leaves'})")
    for name, (kind, help_text) in _SAMPLING_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    g.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt text; '-' reads it from stdin")
    parser.add_argument("-n", type=int, default=1, help="samples to generate for the prompt (default: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, finish reason of every sample) instead of streaming")
    parser.add_argument("--stats", action="store_true", help="print timing and engine stats to stderr")
    add_sampling_arguments(parser)
    add_engine_arguments(parser)


def read_prompt(arg: str | None) -> str:
    """The prompt from the argument, or stdin for '-'; a missing or empty one is an error."""
    if arg is None:
        raise ValueError("prompt: give a prompt, or '-' to read it from stdin (e.g. aiosched generate \"def fibonacci(n):\")")
    text = sys.stdin.read() if arg == "-" else arg
    if arg == "-" and text.endswith("\n"):
        text = text[:-1]  # `echo` and here-docs add one
    if not text:
        raise ValueError("prompt: must not be empty" + (" (stdin was empty)" if arg == "-" else ""))
    return text


def sampling_params(args: argparse.Namespace, engine: AsyncEngine) -> SamplingParams:
    """The flags given, over the checkpoint's generation defaults (greedy by default)."""
    fields: dict[str, Any] = {name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None}
    if "temperature" not in fields and "temperature" not in (engine.tokenizer.generation_defaults if engine.tokenizer else {}):
        fields["temperature"] = 0.0
    n = getattr(args, "n", 1)
    if n != 1:
        fields["n"] = n
    if args.max_tokens is not None:
        fields["max_tokens"] = args.max_tokens
    return engine.default_sampling_params(stop=args.stop, ignore_eos=args.ignore_eos, **fields)


def output_json(out: RequestOutput) -> dict[str, Any]:
    """A finished request as plain JSON (the --json output)."""
    m = out.metrics
    return {
        "request_id": out.request_id,
        "prompt": out.prompt,
        "prompt_tokens": len(out.prompt_token_ids),
        "outputs": [{"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                     "stop_reason": c.stop_reason} for c in sorted(out.outputs, key=lambda c: c.index)],
        "completion_tokens": sum(len(c.token_ids) for c in out.outputs),
        "cached_prompt_tokens": m.num_cached_prompt_tokens if m is not None else 0,
    }


async def _generate(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    config = engine_config_from_args(args)
    if config.resolved_model is None:
        raise ValueError("model: no --model given and no embedded default model is installed")
    t0 = time.perf_counter()
    async with AsyncEngine(config) as engine:
        params = sampling_params(args, engine)
        t1 = time.perf_counter()
        stream = engine.generate(prompt, params)
        first = None
        if args.json or params.n > 1 or params.best_of:
            out = await stream
            first = t2 = time.perf_counter()
            if args.json:
                print(json.dumps(output_json(out), ensure_ascii=False))
            else:
                for c in sorted(out.outputs, key=lambda c: c.index):
                    print(f"--- sample {c.index} (finish={c.finish_reason}) ---\n{prompt}{c.text}")
        else:
            sys.stdout.write(prompt)
            async for out in stream:
                first = first or time.perf_counter()
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            t2 = time.perf_counter()
            sys.stdout.write("\n")
        if args.stats:
            n = sum(len(c.token_ids) for c in out.outputs)
            print(f"[load {t1 - t0:.2f}s, first token {((first or t2) - t1) * 1e3:.0f} ms, {n} tokens in {t2 - t1:.2f}s "
                  f"({n / max(t2 - t1, 1e-9):.1f} tok/s), finish={out.finish_reason}]", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    return run(_generate(args))
