"""Every script in examples/ runs, gives the engine's greedy output, and frees its KV blocks.

The FastAPI example runs the tiny real model (when `aiosched.executors.torch.random_checkpoint`
exists); the others run the same model dir on the fake runner, which is much
faster on a CPU and equally deterministic.
"""
from __future__ import annotations

import asyncio
import importlib.util
import io
import pathlib
import sys
import time
from types import ModuleType
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from aiosched import EngineConfig, SamplingParams
from server_thread import ServerThread
from tiny_model import fake, write_tiny_model

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"aiosched_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Any]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def cfg(model: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {**model, "num_kv_blocks": 512, "block_size": 4, **kw}


def assert_pool_full(stats: dict[str, Any]) -> None:
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["kv_free_blocks"] == stats["kv_num_blocks"], stats


def test_every_example_has_a_docstring_saying_how_to_run_it() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["aiohttp_app.py", "asyncio_script.py", "fastapi_app.py", "ray_prefix_router.py", "ray_serve_app.py",
                       "switch_executor.py"]
    for name in scripts:
        doc = load(name[:-3]).__doc__
        assert doc and "Run" in doc and ("python examples/" in doc or "uvicorn examples." in doc), name


async def test_asyncio_script(model, make_engine) -> None:
    mod = load("asyncio_script")
    out = io.StringIO()
    res = await mod.demo(EngineConfig.load(cfg(fake(model))), out=out)
    greedy = SamplingParams(max_tokens=32, temperature=0.0)
    async with make_engine(**cfg(fake(model))) as eng:
        refs = [await eng.generate(p, greedy) for p in mod.PROMPTS]
    assert res["one"] == refs[0].text
    assert res["many"] == [r.text for r in refs]
    assert res["streamed"] == refs[1].text
    assert res["cancelled"]
    assert_pool_full(res["stats"])  # the cancelled request's blocks are back at once
    assert "--- streaming:" in out.getvalue()


def test_asyncio_script_command_line(model, tmp_path, capsys) -> None:
    toml = tmp_path / "engine.toml"
    toml.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in cfg(fake(model)).items()))
    assert load("asyncio_script").main(["--config", str(toml)]) == 0
    assert "--- after cancelling: running=0" in capsys.readouterr().out


async def test_switch_executor_inproc_and_multiproc_agree(model) -> None:
    mod = load("switch_executor")
    overrides = fake(model)
    inproc = await mod.run(str(EXAMPLES / "configs" / "inproc.toml"), **overrides)
    multiproc = await mod.run(str(EXAMPLES / "configs" / "multiproc.toml"), **overrides)
    assert EngineConfig.load(EXAMPLES / "configs" / "multiproc.toml").executor == "multiproc"
    assert inproc == multiproc and len(inproc) == len(mod.PROMPTS)


def test_fastapi_app(model) -> None:
    mod = load("fastapi_app")
    app = mod.create_app(cfg(model))
    engine = app.state.engine
    with ServerThread(app) as srv:
        ref = srv.call(lambda: engine.generate("def fibonacci(n):", SamplingParams(max_tokens=20, temperature=0.0)))
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/generate", json={"prompt": "def fibonacci(n):", "max_tokens": 20})
            assert r.status_code == 200 and r.json()["text"] == ref.text
            with c.stream("POST", "/generate", json={"prompt": "def fibonacci(n):", "max_tokens": 20, "stream": True}) as s:
                assert "".join(s.iter_text()) == ref.text
            r = c.post("/openai/v1/completions", json={"prompt": "def fibonacci(n):", "max_tokens": 20, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
            assert c.post("/generate", json={"prompt": "x", "max_tokens": 0}).status_code == 400
            # a client that leaves mid-stream frees its request
            with c.stream("POST", "/generate", json={"prompt": "long", "max_tokens": 400, "stream": True}) as s:
                next(s.iter_raw())
            deadline = time.monotonic() + 10
            while (stats := c.get("/stats").json())["num_running"] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert_pool_full(stats)
    assert not engine._running  # the lifespan stopped it


async def test_aiohttp_app(model) -> None:
    mod = load("aiohttp_app")
    app = mod.create_app(cfg(fake(model)))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = "http://127.0.0.1:%d" % runner.addresses[0][1]
        engine = app[mod.ENGINE]
        ref = await engine.generate("import asyncio", SamplingParams(max_tokens=20, temperature=0.0))
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/generate", json={"prompt": "import asyncio", "max_tokens": 20}) as r:
                assert r.status == 200 and (await r.json())["text"] == ref.text
            async with s.post(url + "/generate", json={"prompt": "import asyncio", "max_tokens": 20, "stream": True}) as r:
                assert (await r.text()) == ref.text
            async with s.post(url + "/generate", json={"prompt": "x", "max_tokens": -1}) as r:
                assert r.status == 400
            async with s.post(url + "/generate", json={"prompt": "long", "max_tokens": 400, "stream": True}) as r:
                await r.content.readany()
                r.close()  # leave mid-stream
            for _ in range(500):
                if not engine.stats()["num_running"]:
                    break
                await asyncio.sleep(0.01)
            assert_pool_full(engine.stats())
    finally:
        await runner.cleanup()
    assert not engine._running
