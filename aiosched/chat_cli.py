"""`aiosched chat`: talk to the model in the terminal, through its chat template.

    aiosched chat --model DIR [--system "You are terse."] [sampling and engine flags]

Each line read is one user message; the reply streams back and the conversation grows
(the whole history is the next prompt, so the prefix cache serves its earlier turns).
`/reset` starts over (keeping the system message), `/exit`, `/quit` or end of input
leave. Input can be piped: `printf 'hi\\nbye\\n' | aiosched chat --model DIR`. The `> `
prompt is shown only when stdin is a terminal, so piped output is just the replies.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import msgspec

from aiosched.engine import AsyncEngine
from aiosched.engine_args import add_engine_arguments, engine_config_from_args
from aiosched.event_loop import run
from aiosched.generate_cli import add_sampling_arguments, sampling_params
from aiosched.llm import chat_prompt_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="a system message put first in the conversation")
    parser.add_argument("--chat-template", default=None, metavar="FILE", help="a jinja2 chat template file to use instead of the model's")
    add_sampling_arguments(parser, max_tokens=None)
    add_engine_arguments(parser)


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"chat-template: cannot read {path}: {e.strerror}") from None


async def _readline(interactive: bool) -> str | None:
    """One line from stdin without blocking the engine's loop; None at end of input."""
    if interactive:
        sys.stdout.write("> ")
        sys.stdout.flush()
    line = await asyncio.to_thread(sys.stdin.readline)
    return None if line == "" else line.rstrip("\n")


async def _chat(args: argparse.Namespace) -> int:
    template = _read_template(args.chat_template)
    config = engine_config_from_args(args)
    interactive = sys.stdin.isatty()
    async with AsyncEngine(config) as engine:
        if engine.tokenizer is None:
            raise ValueError("model: chat needs a tokenizer.json in the model dir")
        if template is None and not engine.tokenizer.chat_template:
            raise ValueError("model: this model has no chat template (tokenizer_config.json); give one with --chat-template FILE")
        base = sampling_params(args, engine)
        system: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
        history = list(system)
        info = engine.info
        assert info is not None
        room = min(info.max_model_len, info.num_kv_blocks * info.block_size)
        while True:
            line = await _readline(interactive)
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            if line.strip() == "/reset":
                history = list(system)
                continue
            history.append({"role": "user", "content": line})
            ids = chat_prompt_ids(engine.tokenizer, history, chat_template=template)
            if len(ids) >= room:
                print(f"[the conversation ({len(ids)} tokens) no longer fits the context ({room}); /reset to start over]", file=sys.stderr)
                history.pop()
                continue
            # Unless --max-tokens: as much as the context and the KV cache leave (as the server's chat default).
            params = base if args.max_tokens is not None else msgspec.structs.replace(base, max_tokens=room - len(ids))
            reply = ""
            async for out in engine.generate(ids, params):
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
                reply = out.text
            sys.stdout.write("\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": reply})
    return 0


def main(args: argparse.Namespace) -> int:
    return run(_chat(args))
