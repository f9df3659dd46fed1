"""Command-line flags for every EngineConfig field, shared by all subcommands.

Each flag's help is the field's `# comment` in aiosched/config.py (the same text as
docs/config_reference.md), its default, and its choices where the field takes one of a
few names; flags are grouped by the config's sections.
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any

import msgspec

from aiosched.config import DTYPE_ALIASES, FIELD_CHOICES, EngineConfig
from aiosched.field_docs import field_comments

_SKIP = {"speculative"}
_RENAME = {"seed": "engine-seed"}  # --seed is the per-request sampling seed
ALIASES = {"tensor_parallel_size": ["-tp"]}  # as vLLM's CLI


def flag_name(field: str) -> str:
    return "--" + _RENAME.get(field, field.replace("_", "-"))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file with engine settings (flags override it)")
    comments, sections = field_comments(EngineConfig)
    group: Any = parser.add_argument_group("engine")
    for f in msgspec.structs.fields(EngineConfig):
        if f.name in _SKIP:
            continue
        if f.name in sections:
            group = parser.add_argument_group(f"engine: {sections[f.name].lower()}")
        names = [flag_name(f.name), *ALIASES.get(f.name, [])]
        default = f.default if f.default is not msgspec.NODEFAULT else None
        help_text = _help(comments.get(f.name, ""), default)
        if _base_type(f.type) is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kw: dict[str, Any] = {"dest": f.name, "type": _converter(f.type), "default": None, "help": help_text}
        choices = FIELD_CHOICES.get(f.name)
        if choices is not None:
            kw["type"] = _choice(f.name, choices, DTYPE_ALIASES if f.name == "dtype" else {})
            kw["metavar"] = "{" + ",".join(choices) + "}"
        group.add_argument(*names, **kw)
    group.add_argument("--speculative-tokens", type=int, default=None, help="enable n-gram speculative decoding with this many draft tokens")


def _help(comment: str, default: Any) -> str:
    # argparse %-formats help strings: a literal % must be doubled.
    text = comment.replace("%", "%%")
    return f"{text} (default: {default})" if text else f"default: {default}"


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `bool` -> bool."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _converter(tp: Any) -> Any:
    base = _base_type(tp)
    return base if base in (int, float) else str


def _choice(name: str, choices: tuple[str, ...], aliases: dict[str, str]) -> Any:
    """An argparse type that accepts the choices and their aliases (`--dtype half`)."""

    def convert(value: str) -> str:
        value = aliases.get(value, value)
        if value not in choices:
            extra = f" (or {', '.join(aliases)})" if aliases else ""
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(choices)}{extra})")
        return value

    convert.__name__ = name  # argparse names the type in its error messages
    return convert


def engine_config_from_args(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    overrides = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(EngineConfig)
                 if f.name not in _SKIP and getattr(args, f.name, None) is not None}
    if getattr(args, "speculative_tokens", None):
        overrides["speculative"] = {"method": "ngram", "num_tokens": args.speculative_tokens}
    overrides.update(extra)
    return EngineConfig.load(getattr(args, "config", None), **overrides)
