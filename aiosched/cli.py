"""`aiosched` command line: generate | serve | bench | worker | keygen.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int`; this file only wires them together (imports are lazy so
`aiosched generate` does not pay for the server's dependencies).
"""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMANDS = {
    "generate": ("aiosched.generate_cli", "generate text from a prompt"),
    "serve": ("aiosched.server", "run the OpenAI-compatible HTTP server"),
    "bench": ("aiosched.bench", "benchmark throughput and latency (offline or against a server)"),
    "worker": ("aiosched.executors.worker_server", "serve a model to a remote engine over ZeroMQ"),
    "keygen": ("aiosched.executors.keys", "write a CurveZMQ key pair for the remote executor"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiosched", description="asyncio-native LLM inference engine")
    subs = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(sub)
        except ModuleNotFoundError as e:
            # the subcommand's module, or a dependency only it needs (e.g. the server's web stack)
            what = "" if e.name == module else f" (missing dependency: {e.name})"
            sub.set_defaults(_missing=f"'{name}' is not available in this build{what}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = getattr(args, "_missing", None)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
