"""`stream_interval = N`: a streamed request gets its first token at once, then one
output per N new tokens, and its final output at once; the deltas still add up to the
whole completion (ids and text), whatever ends the request."""
from __future__ import annotations

import asyncio

import pytest

from aiosched import SamplingParams
from aiosched.config import EngineConfig
from aiosched.executors.fake_runner import reference_tokens


async def collect(eng, prompt, params):
    outs = []
    async for out in eng.generate(prompt, params):
        outs.append(out)
    return outs


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_outputs_every_n_tokens_and_deltas_add_up(make_engine, async_scheduling) -> None:
    async with make_engine(runner="fake", stream_interval=4, async_scheduling=async_scheduling, num_kv_blocks=64, block_size=4) as eng:
        outs = await collect(eng, [5, 6, 7], SamplingParams(max_tokens=11, temperature=0.0))
    sizes = [len(o.outputs[0].new_token_ids) for o in outs]
    assert sizes == [1, 4, 4, 2]  # first at once, then every 4, the rest with the final output
    assert [t for o in outs for t in o.outputs[0].new_token_ids] == outs[-1].outputs[0].token_ids == reference_tokens([5, 6, 7], 11)
    assert [o.finished for o in outs] == [False, False, False, True]


async def test_default_is_an_output_per_token(make_engine) -> None:
    async with make_engine(runner="fake", num_kv_blocks=64, block_size=4) as eng:
        outs = await collect(eng, [5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0))
    assert [len(o.outputs[0].new_token_ids) for o in outs] == [1] * 6


async def test_text_deltas_add_up_and_stop_strings_still_stop(make_engine) -> None:
    """Real tokenizer (the embedded default model): held text is carried, not lost."""
    async with make_engine(device="cpu", stream_interval=3) as eng:
        params = SamplingParams(max_tokens=24, temperature=0.0)
        outs = await collect(eng, "def add(a, b):\n", params)
        full = outs[-1].outputs[0]
        assert "".join(o.outputs[0].new_text for o in outs) == full.text
        assert len(outs) < len(full.token_ids)
        stop = full.text[5:9]
        stopped = await collect(eng, "def add(a, b):\n", SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]))
    last = stopped[-1].outputs[0]
    assert last.finish_reason == "stop" and stop not in last.text
    assert "".join(o.outputs[0].new_text for o in stopped) == last.text


async def test_abort_flushes_the_held_tokens(make_engine) -> None:
    async with make_engine(runner="fake", stream_interval=1000, num_kv_blocks=256, block_size=4) as eng:
        outs = []

        async def consume() -> None:
            async for out in eng.generate([1, 2, 3], SamplingParams(max_tokens=500, temperature=0.0), request_id="r"):
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs and not task.done():
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)  # some tokens held back
        eng.abort("r")
        await task
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert [t for o in outs for t in o.outputs[0].new_token_ids] == outs[-1].outputs[0].token_ids
    assert len(outs[-1].outputs[0].token_ids) > 1


def test_stream_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig(stream_interval=0)


async def test_held_outputs_carry_text_tokens_and_logprobs_and_views_stay_prefixes(make_engine) -> None:
    """The fake model with the embedded tokenizer: every output's cumulative view is the
    sum of the deltas so far, read after the stream ended."""
    import pathlib

    import aiosched

    model = str(pathlib.Path(aiosched.__file__).parent / "default_model")
    params = SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True, logprobs=1)
    async with make_engine(runner="fake", model=model, stream_interval=4, num_kv_blocks=64, block_size=4) as eng:
        outs = await collect(eng, [(i * 31) % 8000 for i in range(30)], params)
        tok = eng.tokenizer
    assert [len(o.new_token_ids) for o in outs] == [1, 4, 4, 4, 4, 4, 2]
    text, ids, lps = "", [], []
    for o in outs:
        text, ids, lps = text + o.new_text, ids + o.new_token_ids, lps + o.outputs[0].new_logprobs
        assert (o.text, o.token_ids, o.logprobs) == (text, ids, lps)
    assert outs[-1].text == tok.decode(outs[-1].token_ids)
    assert [lp.token_id for lp in outs[-1].logprobs] == outs[-1].token_ids
