"""docs/config_reference.md is generated from the config Structs and must be up to date."""
from __future__ import annotations

import importlib.util
import pathlib

import msgspec

from aiosched.config import EngineConfig
from aiosched.sampling_params import SamplingParams

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_is_up_to_date() -> None:
    gen = _generator()
    current = (ROOT / "docs" / "config_reference.md").read_text(encoding="utf-8")
    assert current == gen.render(), "docs/config_reference.md is stale: run `python tools/gen_config_docs.py`"
    assert gen.main(["--check"]) == 0


def test_every_field_is_documented() -> None:
    text = _generator().render()
    engine_part, sampling_part = text.split("## SamplingParams")
    for cls, part in ((EngineConfig, engine_part.split("### SpeculativeConfig")[0]), (SamplingParams, sampling_part.split("### Structured")[0])):
        for f in msgspec.structs.fields(cls):
            row = next((line for line in part.splitlines() if line.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f.name
            assert not row.rstrip().endswith("|  |"), f"{cls.__name__}.{f.name} has no description: add a trailing # comment"
