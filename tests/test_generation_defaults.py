"""generation_config.json sampling defaults: like vLLM's `--generation-config auto`, every
field a request leaves unset (engine API without params, server request, CLI flag) takes
the checkpoint's recommended value; explicit values always win."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aiosched import SamplingParams
from aiosched.generate_cli import add_arguments, sampling_params
from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

PROMPT = [5, 6, 7, 5, 6, 7, 5, 6]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = write_random_checkpoint(tmp_path_factory.mktemp("gen-defaults"), seed=11)
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(temperature=0.0, repetition_penalty=1.8, top_k=7)
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


def cfg(model_dir: Path) -> dict:
    return dict(model=str(model_dir), device="cpu", dtype="float32", num_kv_blocks=32, block_size=4)


async def test_unset_fields_take_the_checkpoint_defaults(make_engine, model_dir: Path) -> None:
    async with make_engine(**cfg(model_dir)) as eng:
        p = eng.default_sampling_params(max_tokens=24)
        assert (p.temperature, p.repetition_penalty, p.top_k, p.top_p) == (0.0, 1.8, 7, 1.0)
        assert eng.default_sampling_params(repetition_penalty=1.0).repetition_penalty == 1.0, "explicit wins"
        with_defaults = await eng.generate(PROMPT, eng.default_sampling_params(max_tokens=24))
        explicit = await eng.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.8, top_k=7))
        plain = await eng.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0.0))
        no_params = await eng.generate(PROMPT)  # 16 tokens, greedy by the checkpoint's temperature 0
    assert with_defaults.token_ids == explicit.token_ids
    assert plain.token_ids != explicit.token_ids, "the penalty must change this greedy output, or the test proves nothing"
    assert no_params.token_ids == explicit.token_ids[:16]


async def test_cli_flags_override_and_unset_flags_use_defaults(make_engine, model_dir: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    async with make_engine(**cfg(model_dir)) as eng:
        p = sampling_params(parser.parse_args(["x"]), eng)
        assert (p.temperature, p.repetition_penalty, p.top_k) == (0.0, 1.8, 7)
        p = sampling_params(parser.parse_args(["x", "--repetition-penalty", "1.1", "--min-p", "0.2", "--ignore-eos"]), eng)
        assert (p.repetition_penalty, p.min_p, p.ignore_eos, p.top_k) == (1.1, 0.2, True, 7)


async def test_cli_is_greedy_when_the_checkpoint_sets_no_temperature(make_engine, tmp_path: Path) -> None:
    d = write_random_checkpoint(tmp_path / "m", seed=1)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    async with make_engine(**cfg(d)) as eng:
        assert sampling_params(parser.parse_args(["x"]), eng).temperature == 0.0
        assert sampling_params(parser.parse_args(["x", "--temperature", "0.7"]), eng).temperature == 0.7
        assert eng.default_sampling_params() == SamplingParams(), "no generation_config values: plain defaults"


def test_shipped_default_model_recommends_a_repetition_penalty() -> None:
    """The trained demo model loops under plain greedy decoding; its generation_config.json says so."""
    import aiosched

    gen = json.loads((Path(aiosched.__file__).parent / "default_model" / "generation_config.json").read_text())
    assert gen["repetition_penalty"] > 1.0


def test_server_requests_without_the_field_use_the_default(model_dir: Path) -> None:
    import httpx

    from aiosched.server import build_app
    from server_thread import ServerThread

    def complete(s: ServerThread, **fields: object) -> str:
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 24, **fields}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ServerThread(build_app(cfg(model_dir), served_model_name="m")) as s:
        unset = complete(s)
        assert unset == complete(s, temperature=0.0, repetition_penalty=1.8, top_k=7)
        assert unset != complete(s, repetition_penalty=1.0)
