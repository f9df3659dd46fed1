"""The synchronous offline API: `LLM(model=...).generate(prompts, params)` and `.chat(...)`.

It runs the same AsyncEngine on its own loop thread, so its greedy outputs equal the
async engine's, it works where an event loop is already running (Jupyter), and closing
it (or leaving `with`) stops the engine with every KV block back in the pool."""
from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aiosched import LLM, AsyncEngine, EngineConfig, SamplingParams
from aiosched.chat_template import render_chat
from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = ["def fibonacci(n):", "import asyncio\n", "The quick brown fox", "Hello world!"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("llm-model"), seed=5)


def engine_kw(model_dir: Path) -> dict:
    return dict(model=str(model_dir), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=64)


def pool_is_full(llm: LLM) -> bool:
    s = llm.engine.scheduler
    assert s is not None
    return not s.requests and s.kv.num_free_blocks == s.kv.num_blocks


@pytest.fixture(scope="module")
def llm(model_dir: Path):
    with LLM(**engine_kw(model_dir)) as handle:
        yield handle
    assert handle.closed


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[list[int]]:
    """The same prompts through the AsyncEngine directly, one at a time."""

    async def go() -> list[list[int]]:
        async with AsyncEngine(EngineConfig.load(engine_kw(model_dir))) as eng:
            return [(await eng.generate(p, GREEDY)).token_ids for p in PROMPTS]

    return asyncio.run(go())


def test_generate_returns_outputs_in_prompt_order(llm: LLM, reference: list[list[int]]) -> None:
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.prompt for o in outs] == PROMPTS
    assert [o.token_ids for o in outs] == reference
    assert all(o.finished and len(o.token_ids) == 8 for o in outs)
    assert pool_is_full(llm)


def test_single_prompt_token_ids_and_per_prompt_params(llm: LLM, reference: list[list[int]]) -> None:
    (one,) = llm.generate(PROMPTS[0], GREEDY)
    assert one.token_ids == reference[0]
    ids = llm.tokenizer.encode(PROMPTS[1])
    (by_ids,) = llm.generate(ids, GREEDY)
    assert by_ids.prompt_token_ids == ids and by_ids.token_ids == reference[1]
    short, long = llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), GREEDY])
    assert short.token_ids == reference[0][:2] and long.token_ids == reference[1]
    with pytest.raises(ValueError, match="params: 1 SamplingParams for 2 prompts"):
        llm.generate(PROMPTS[:2], [GREEDY])


def test_chat_renders_the_template(llm: LLM) -> None:
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello world!"}]
    tok = llm.tokenizer
    text = render_chat(tok.chat_template, conv, add_generation_prompt=True, special_tokens=tok.special_tokens)
    (direct,) = llm.generate(tok.encode(text, add_special_tokens=False), GREEDY)
    (reply,) = llm.chat(conv, GREEDY)
    assert reply.prompt_token_ids == direct.prompt_token_ids and reply.token_ids == direct.token_ids
    both = llm.chat([conv, [{"role": "user", "content": "bye"}]], GREEDY)
    assert len(both) == 2 and both[0].token_ids == direct.token_ids
    with pytest.raises(ValueError, match="messages"):
        llm.chat([{"content": "no role"}], GREEDY)
    assert pool_is_full(llm)


def test_bad_prompt_late_in_a_batch_leaves_nothing_running(llm: LLM) -> None:
    with pytest.raises(ValueError, match="top_p"):
        llm.generate(PROMPTS, [GREEDY, GREEDY, SamplingParams(top_p=0.0), GREEDY])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(["fine", ""], GREEDY)
    assert pool_is_full(llm)


async def test_works_inside_a_running_event_loop(llm: LLM, reference: list[list[int]]) -> None:
    """As in a Jupyter cell: an event loop is running in the calling thread."""
    asyncio.get_running_loop()  # this test body runs inside a loop
    outs = llm.generate(PROMPTS[:2], GREEDY)
    assert [o.token_ids for o in outs] == reference[:2]
    assert llm.chat([{"role": "user", "content": "hi"}], GREEDY)[0].finished


def test_close_stops_the_engine_and_the_thread(model_dir: Path) -> None:
    llm = LLM(**engine_kw(model_dir))
    thread = llm._loop.thread
    assert llm.generate("x", GREEDY)[0].finished
    llm.close()
    llm.close()  # idempotent
    assert llm.closed and not thread.is_alive() and not llm.engine._running
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("x", GREEDY)


def test_garbage_collected_llm_is_closed(model_dir: Path) -> None:
    llm = LLM(**engine_kw(model_dir))
    thread, engine = llm._loop.thread, llm.engine
    del llm
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive() and not engine._running


def test_a_bad_config_fails_in_the_constructor_and_leaves_no_thread(model_dir: Path) -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ValueError, match="max_model_len: 5000 exceeds"):
        LLM(**engine_kw(model_dir), max_model_len=5000)
    gc.collect()
    assert [t for t in threading.enumerate() if t.name == "aiosched-llm-loop" and t.name not in before] == []


def test_script_exits_cleanly_without_close(model_dir: Path, tmp_path: Path) -> None:
    """An LLM left open at interpreter exit is shut down by atexit, not left hanging."""
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent(f"""
        import atexit
        from aiosched import LLM, SamplingParams
        if __name__ == "__main__":  # the multiproc workers are spawned
            # Registered first, so it runs after the LLM's own exit hook (atexit is LIFO).
            atexit.register(lambda: print("running after exit:", llm.engine._running, llm._loop.thread.is_alive()))
            llm = LLM(model={str(model_dir)!r}, num_kv_blocks=32, block_size=4, executor="multiproc")
            print(len(llm.generate(["hi", "there"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))))
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[:2] == ["2", "running after exit: False False"]
    assert "Traceback" not in res.stderr
