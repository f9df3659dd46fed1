"""Command-line flags for every EngineConfig field, shared by all subcommands."""
from __future__ import annotations

import argparse
from typing import Any

import msgspec

from aiosched.config import EngineConfig

_SKIP = {"speculative"}
_RENAME = {"seed": "engine-seed"}  # --seed is the per-request sampling seed


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file with engine settings (flags override it)")
    for f in msgspec.structs.fields(EngineConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + _RENAME.get(f.name, f.name.replace("_", "-"))
        default_repr = f.default if f.default is not msgspec.NODEFAULT else None
        if f.type is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f"default: {default_repr}")
        else:
            conv: Any = _converter(f.type)
            parser.add_argument(flag, dest=f.name, type=conv, default=None, help=f"default: {default_repr}")
    parser.add_argument("--speculative-tokens", type=int, default=None, help="enable n-gram speculative decoding with this many draft tokens")


def _converter(tp: Any) -> Any:
    s = str(tp)
    if "int" in s and "str" not in s:
        return int
    if "float" in s:
        return float
    return str


def engine_config_from_args(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    overrides = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(EngineConfig)
                 if f.name not in _SKIP and getattr(args, f.name, None) is not None}
    if getattr(args, "speculative_tokens", None):
        overrides["speculative"] = {"method": "ngram", "num_tokens": args.speculative_tokens}
    overrides.update(extra)
    return EngineConfig.load(getattr(args, "config", None), **overrides)
