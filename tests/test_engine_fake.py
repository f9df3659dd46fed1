"""Engine and scheduler behaviour, specified against the deterministic fake runner."""
from __future__ import annotations

import asyncio

import pytest

from aiosched import AsyncEngine, SamplingParams
from aiosched.errors import EngineNotRunningError, EngineOverloadedError
from aiosched.executors.fake_runner import reference_tokens

GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


def prompts(n: int, max_len: int = 23, seed: int = 0) -> list[list[int]]:
    return [[(i * 7 + j * 13 + seed) % 500 for j in range(3 + (i * 5) % max_len)] for i in range(n)]


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_outputs_match_each_request_alone_under_preemption(make_engine, async_scheduling: bool) -> None:
    ps = prompts(64)
    async with make_engine(runner="fake", async_scheduling=async_scheduling, num_kv_blocks=40, block_size=4, max_num_batched_tokens=32) as eng:
        outs = await asyncio.gather(*[eng.generate(p, GREEDY) for p in ps])
        assert eng.stats()["preemptions"] > 0, "the small pool must force preemption"
    for o, p in zip(outs, ps):
        assert o.token_ids == reference_tokens(p, 20)
        assert o.finish_reason == "length"


async def test_async_and_sync_agree(make_engine) -> None:
    ps = prompts(32)
    results = {}
    for mode in (False, True):
        async with make_engine(runner="fake", async_scheduling=mode, num_kv_blocks=30, block_size=4, max_num_batched_tokens=16) as eng:
            results[mode] = [o.token_ids for o in await asyncio.gather(*[eng.generate(p, GREEDY) for p in ps])]
    assert results[False] == results[True]


async def test_prefix_cache_hits_compute_only_new_tokens(make_engine) -> None:
    shared = list(range(1, 33))  # 8 full blocks of 4
    async with make_engine(runner="fake", num_kv_blocks=64, block_size=4) as eng:
        first = await eng.generate(shared + [40, 41], GREEDY)
        runner = eng._executor.runner
        before = runner.tokens_computed
        second = await eng.generate(shared + [50, 51, 52], GREEDY)
        assert eng.stats()["prefix_cache_hits"] == 32
        assert second.metrics.num_cached_prompt_tokens == 32
        # prompt: 3 new tokens; then 19 decode steps of one token
        assert runner.tokens_computed - before == 3 + 19
    assert first.token_ids == reference_tokens(shared + [40, 41], 20)
    assert second.token_ids == reference_tokens(shared + [50, 51, 52], 20)


async def test_same_prefix_in_one_batch_shares_blocks(make_engine) -> None:
    shared = list(range(100, 132))
    async with make_engine(runner="fake", num_kv_blocks=64, block_size=4, max_num_batched_tokens=512) as eng:
        outs = await asyncio.gather(eng.generate(shared + [1], GREEDY), eng.generate(shared + [2], GREEDY))
        assert eng.stats()["prefix_cache_hits"] == 32
    assert outs[1].token_ids == reference_tokens(shared + [2], 20)


async def test_eviction_under_pressure_keeps_outputs_correct(make_engine) -> None:
    async with make_engine(runner="fake", num_kv_blocks=24, block_size=4, max_num_batched_tokens=64) as eng:
        for round_ in range(3):
            ps = [[round_] + list(range(i, i + 30)) for i in range(0, 120, 10)]
            outs = [await eng.generate(p, GREEDY) for p in ps]
            for o, p in zip(outs, ps):
                assert o.token_ids == reference_tokens(p, 20)


async def test_streaming_yields_deltas_that_add_up(fake_engine: AsyncEngine) -> None:
    seen: list[int] = []
    async for out in fake_engine.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0)):
        assert out.token_ids == seen + out.new_token_ids
        seen = out.token_ids
    assert out.finished and len(seen) == 12


async def test_break_and_cancel_abort_and_free_blocks(fake_engine: AsyncEngine) -> None:
    long = SamplingParams(max_tokens=200, temperature=0)
    async for _ in fake_engine.generate([1, 2, 3], long):
        break
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in fake_engine.generate([4, 5, 6], long):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(20):
        await asyncio.sleep(0)
    assert not fake_engine.scheduler.requests
    assert fake_engine.scheduler.kv.num_free_blocks == fake_engine.scheduler.kv.num_blocks


async def test_stop_token_and_min_tokens(fake_engine: AsyncEngine) -> None:
    ref = reference_tokens([9, 9, 9], 20)
    stop_tok = ref[3]
    out = await fake_engine.generate([9, 9, 9], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok]))
    assert out.token_ids == ref[: ref.index(stop_tok) + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    out = await fake_engine.generate([9, 9, 9], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok], min_tokens=8))
    assert stop_tok not in out.token_ids[:8]


async def test_seeded_sampling_is_batch_invariant(fake_engine: AsyncEngine) -> None:
    sp = SamplingParams(max_tokens=10, temperature=1.0, seed=42)
    alone = await fake_engine.generate([3, 4], sp)
    crowd = await asyncio.gather(*[fake_engine.generate([3, 4] if i == 5 else [i, i + 1], sp) for i in range(10)])
    assert crowd[5].token_ids == alone.token_ids


async def test_200_concurrent_generate_calls(make_engine) -> None:
    async with make_engine(runner="fake", num_kv_blocks=128, block_size=4, max_num_seqs=32) as eng:
        outs = await asyncio.gather(*[eng.generate([i % 400 + 1, 2, 3], SamplingParams(max_tokens=8, temperature=0)) for i in range(200)])
    assert all(o.finished and len(o.token_ids) == 8 for o in outs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": "text"}, "prompt"),
        ({"params": SamplingParams(temperature=float("nan"))}, "temperature"),
        ({"params": SamplingParams(top_p=0.0)}, "top_p"),
        ({"params": SamplingParams(top_k=-5)}, "top_k"),
        ({"params": SamplingParams(max_tokens=0)}, "max_tokens"),
        ({"params": SamplingParams(max_tokens=10**6)}, "max_tokens"),
        ({"prompt": [1] * 5000}, "prompt"),
    ],
)
async def test_bad_input_is_a_value_error_naming_the_field(fake_engine: AsyncEngine, kwargs, field) -> None:
    good = fake_engine.generate([1, 2], GREEDY)
    with pytest.raises(ValueError, match=field):
        fake_engine.generate(kwargs.get("prompt", [1, 2]), kwargs.get("params", GREEDY))
    assert (await good).finished  # the engine keeps serving everyone else


async def test_overload_raises(make_engine) -> None:
    async with make_engine(runner="fake", max_waiting_requests=2) as eng:
        eng.generate([1], GREEDY)
        eng.generate([2], GREEDY)
        with pytest.raises(EngineOverloadedError):
            eng.generate([3], GREEDY)
        for rid in list(eng._by_user_id):
            eng.abort(rid)


async def test_generate_outside_lifetime_fails_fast(make_engine) -> None:
    eng = make_engine(runner="fake")
    with pytest.raises(EngineNotRunningError):
        eng.generate([1], GREEDY)


async def test_no_stray_tasks_or_threads_after_exit(make_engine) -> None:
    import threading

    before = set(threading.enumerate())
    tasks_before = asyncio.all_tasks()
    async with make_engine(runner="fake") as eng:
        await eng.generate([1, 2], GREEDY)
    assert set(threading.enumerate()) <= before
    assert asyncio.all_tasks() <= tasks_before | {asyncio.current_task()}


async def test_parallel_samples_share_prompt_blocks_and_differ_by_seed(make_engine) -> None:
    prompt = list(range(1, 41))  # 10 full blocks of 4
    async with make_engine(runner="fake", num_kv_blocks=64, block_size=4, max_num_batched_tokens=256) as eng:
        stream = eng.generate(prompt, SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7))
        peak_used = 0
        async for out in stream:
            peak_used = max(peak_used, eng.stats()["kv_num_blocks"] - eng.stats()["kv_free_blocks"])
        # 4 samples alone would hold 4 * 12 blocks. Shared: 9 prompt blocks, then each
        # sample recomputes the last prompt token in its own block and decodes into 2 more.
        assert peak_used <= 9 + 4 * 3
        assert out.finished and [c.index for c in out.outputs] == [0, 1, 2, 3]
        texts = [tuple(c.token_ids) for c in out.outputs]
        assert len(set(texts)) > 1, "different seed streams give different samples"
        again = await eng.generate(prompt, SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7))
        assert [tuple(c.token_ids) for c in again.outputs] == texts
        one = await eng.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=8))
        assert tuple(one.token_ids) == texts[1], "sample i uses seed + i"


# ---- outputs are deltas inside the engine; the cumulative view is unchanged (issue 17) ----

import pathlib  # noqa: E402

import aiosched  # noqa: E402

DEFAULT_MODEL = str(pathlib.Path(aiosched.__file__).parent / "default_model")
TEXT_PROMPT = [(i * 37 + 11) % 8000 for i in range(40)]


def _text_engine(make_engine, **kw):
    """The fake model's tokens with the embedded tokenizer: every token is detokenized."""
    return make_engine(runner="fake", model=DEFAULT_MODEL, num_kv_blocks=256, block_size=4, **kw)


async def _stream(eng, prompt, params, request_id=None):
    return [o async for o in eng.generate(prompt, params, request_id=request_id)]


def _check_prefix_views(outs, index=0) -> None:
    """Every output's cumulative text/token_ids/logprobs is exactly the sum of the deltas
    up to it, read after the stream ended (a kept output never sees later tokens)."""
    text, ids, lps = "", [], []
    for o in outs:
        for c in o.outputs:
            if c.index != index:
                continue
            text += c.new_text
            ids += c.new_token_ids
            if c.logprobs is not None:
                lps += c.new_logprobs
                assert c.logprobs == lps and len(c.logprobs) == len(c.token_ids)
            assert (c.text, c.token_ids, c.num_tokens) == (text, ids, len(ids))


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_streamed_deltas_add_up_to_text_tokens_and_logprobs(make_engine, async_scheduling) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2)
    async with _text_engine(make_engine, async_scheduling=async_scheduling) as eng:
        outs = await _stream(eng, TEXT_PROMPT, params)
        final = await eng.generate(TEXT_PROMPT, params)
    _check_prefix_views(outs)
    last = outs[-1]
    assert last.token_ids == final.token_ids == reference_tokens(TEXT_PROMPT, 40, vocab_size=8192)
    assert last.text == final.text == eng.tokenizer.decode(final.token_ids)
    assert [lp.token_id for lp in final.logprobs] == final.token_ids
    assert final.outputs[0].cumulative_logprob == pytest.approx(sum(lp.logprob for lp in final.logprobs))


async def test_stop_string_across_token_boundaries_never_leaks_into_a_delta(make_engine) -> None:
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    async with _text_engine(make_engine) as eng:
        full = await eng.generate(TEXT_PROMPT, greedy)
        # A stop string that spans at least two tokens' text.
        texts = [eng.tokenizer.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
        cut = next(i for i in range(4, len(texts)) if len(texts[i]) - len(texts[i - 1]) >= 2 and len(texts[i - 1]) > 4)
        stop = texts[cut][len(texts[cut - 1]) - 2 : len(texts[cut - 1]) + 1]
        stopped = await _stream(eng, TEXT_PROMPT, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))
    last = stopped[-1]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert last.text == full.text[: full.text.index(stop)]
    assert all(stop not in o.new_text for o in stopped)
    _check_prefix_views(stopped)


async def test_abort_flushes_held_back_text(make_engine) -> None:
    """A stop string that never matches holds text back; abort releases all of it."""
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True, stop=["\x00never\x00 matches"])
    async with _text_engine(make_engine) as eng:
        outs = []
        async for out in eng.generate(TEXT_PROMPT, params, request_id="held"):
            outs.append(out)
            if len(outs) == 12:
                eng.abort("held")
    last = outs[-1]
    assert last.finished and last.finish_reason == "abort"
    assert last.text == eng.tokenizer.decode(last.token_ids)
    _check_prefix_views(outs)


async def test_parallel_samples_and_best_of_are_unchanged(make_engine) -> None:
    async with _text_engine(make_engine) as eng:
        n3 = SamplingParams(max_tokens=16, temperature=1.0, seed=7, n=3, ignore_eos=True)
        outs = await _stream(eng, TEXT_PROMPT, n3)
        final = outs[-1]
        assert [c.index for c in final.outputs] == [0, 1, 2]
        for i, c in enumerate(final.outputs):
            assert c.token_ids == reference_tokens(TEXT_PROMPT, 16, vocab_size=8192, seed=7 + i, greedy=False)
            assert c.text == eng.tokenizer.decode(c.token_ids)
            _check_prefix_views(outs, index=i)
        best = SamplingParams(max_tokens=16, temperature=1.0, seed=7, n=2, best_of=4, ignore_eos=True)
        b_outs = await _stream(eng, TEXT_PROMPT, best)
    assert len(b_outs) == 1 and b_outs[0].finished  # best_of: only the final choice is sent
    chosen = b_outs[0].outputs
    assert [c.index for c in chosen] == [0, 1]
    assert chosen[0].cumulative_logprob >= chosen[1].cumulative_logprob
    for c in chosen:
        assert c.new_text == c.text == eng.tokenizer.decode(c.token_ids) and c.new_token_ids == c.token_ids
    candidates = [reference_tokens(TEXT_PROMPT, 16, vocab_size=8192, seed=7 + i, greedy=False) for i in range(4)]
    assert all(c.token_ids in candidates for c in chosen)
