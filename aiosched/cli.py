"""`aiosched` command line: generate | chat | serve | bench | worker | keygen.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int`; this file only wires them together (imports are lazy so
`aiosched generate` does not pay for the server's dependencies), and adds what every
command shares: `--version`, `--log-level`, `serve MODEL` as a positional (as `vllm
serve`), the start-up checks before anything loads, and one `error: ...` line (exit 2)
for bad input instead of a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

_COMMANDS = {
    "generate": ("aiosched.generate_cli", "generate text from a prompt"),
    "chat": ("aiosched.chat_cli", "chat with the model in the terminal (its chat template)"),
    "serve": ("aiosched.server", "run the OpenAI-compatible HTTP server"),
    "bench": ("aiosched.bench", "benchmark throughput and latency (offline or against a server)"),
    "worker": ("aiosched.executors.worker_server", "serve a model to a remote engine over ZeroMQ"),
    "keygen": ("aiosched.executors.keys", "write a CurveZMQ key pair for the remote executor"),
}
# Commands that load a model in this process: their config is checked before loading.
_LOADS_MODEL = ("generate", "chat", "serve")


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("aiosched")
    except (ImportError, PackageNotFoundError):
        from aiosched import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiosched", description="asyncio-native LLM inference engine")
    parser.add_argument("--version", action="version", version=f"aiosched {version()}")
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
            continue
        _add_common(name, sub)
    return parser


def _add_common(name: str, sub: argparse.ArgumentParser) -> None:
    from aiosched.engine_log import LOG_LEVELS

    if "--log-level" not in sub._option_string_actions:
        sub.add_argument("--log-level", default=os.environ.get("AIOSCHED_LOG_LEVEL", "info"), choices=LOG_LEVELS,
                         help="level of aiosched's loggers (default: $AIOSCHED_LOG_LEVEL or info)")
    if name == "serve" and "model" in {a.dest for a in sub._actions}:
        sub.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                         help="the model directory (same as --model)")


def _resolve_model_tag(args: argparse.Namespace) -> None:
    tag = getattr(args, "model_tag", None)
    if tag is None:
        return
    if getattr(args, "model", None) not in (None, tag):
        raise ValueError(f"model: given twice, as {tag!r} and --model {args.model!r}")
    args.model = tag


def _preflight(args: argparse.Namespace) -> None:
    """Refuse a config this machine cannot run before the command loads anything."""
    if args.command not in _LOADS_MODEL:
        return
    from aiosched.engine_args import engine_config_from_args
    from aiosched.preflight import check_startup

    check_startup(engine_config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = getattr(args, "_missing", None)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    from aiosched.engine_log import configure_logging

    restore_logging = configure_logging(args.log_level)
    try:
        _resolve_model_tag(args)
        _preflight(args)
        return int(importlib.import_module(args._module).main(args) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        restore_logging()


if __name__ == "__main__":
    sys.exit(main())
