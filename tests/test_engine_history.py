"""Token histories in int64 buffers (issue 17): TokenIds behaves like the list it
replaces, the engine's outputs are unchanged, and no live history is a list of ints
that every full garbage collection would walk."""
from __future__ import annotations

import asyncio
import copy
import gc
import pathlib

import pytest

import aiosched
from aiosched import SamplingParams
from aiosched.executors.fake_runner import reference_tokens
from aiosched.token_ids import TokenIds

DEFAULT_MODEL = str(pathlib.Path(aiosched.__file__).parent / "default_model")
PROMPT = [(i * 37 + 11) % 8000 for i in range(40)]


# ---- TokenIds ----

def test_append_extend_len_iter_and_index() -> None:
    t = TokenIds([3, 1, 4])
    t.append(1)
    t.extend([5, 9])
    t += (2, 6)
    t += iter([5])
    assert len(t) == 9 and list(t) == [3, 1, 4, 1, 5, 9, 2, 6, 5]
    assert t[0] == 3 and t[-1] == 5 and isinstance(t[2], int)
    assert 9 in t and t.index(9) == 5 and t.count(5) == 2


def test_slices_compare_with_lists() -> None:
    t = TokenIds(range(10))
    s = t[2:5]
    assert isinstance(s, TokenIds) and s == [2, 3, 4] and [2, 3, 4] == s
    assert t[::-3] == [9, 6, 3, 0] and t[8:] == [8, 9] and t[20:] == []
    assert t[2:5].tolist() == [2, 3, 4] and type(t.tolist()) is list
    assert t != [0, 1] and t != list(range(11)) and t == list(range(10))
    assert t == TokenIds(range(10)) and t != TokenIds(range(9))
    s[0] = 99  # a slice is a copy
    assert t[2] == 2


def test_concatenation_copy_and_int64_range() -> None:
    t = TokenIds([1, 2])
    assert t + [3] == [1, 2, 3] and isinstance(t + [3], TokenIds) and t == [1, 2]
    assert [0] + t == [0, 1, 2] and type([0] + t) is list
    c = copy.deepcopy(t)
    c.append(7)
    assert t == [1, 2] and c == [1, 2, 7]
    big = (1 << 61) - 2  # the fake runner's prefix hashes
    assert TokenIds([big])[0] == big
    with pytest.raises(OverflowError):
        TokenIds([1 << 63])
    with pytest.raises(TypeError):
        hash(t)  # mutable, like a list
    assert not TokenIds() and TokenIds() == []


def test_the_collector_sees_one_object_with_nothing_inside() -> None:
    """A list of 4k token ids is 4k pointers for every full collection to visit; a
    TokenIds refers to nothing but its type."""
    ids = list(range(1000, 5096))
    t = TokenIds(ids)
    assert len(gc.get_referents(ids)) == 4096
    assert gc.get_referents(t) in ([], [TokenIds])  # the heap type only (3.11: a tracked subclass)
    t.extend(ids)
    assert gc.get_referents(t) in ([], [TokenIds])


# ---- the engine ----

def _text_engine(make_engine, **kw):
    return make_engine(runner="fake", model=DEFAULT_MODEL, num_kv_blocks=256, block_size=4, **kw)


def _is_int_list(x: object) -> bool:
    return isinstance(x, list) and len(x) > 8 and all(isinstance(v, int) for v in x)


async def test_live_histories_are_buffers_not_lists_of_ints(make_engine) -> None:
    """Mid-stream, the request's history, the sample's history and the fake runner's
    token history and prefix hashes are int64 buffers, none a list of ints."""
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    async with _text_engine(make_engine) as eng:
        seen = 0
        async for out in eng.generate(PROMPT, params, request_id="h"):
            seen += 1
            if seen != 30:
                continue
            (internal, tr), = eng._live.items()
            req = eng.scheduler.requests[internal]
            st = eng._executor.runner.reqs[internal]
            # (later steps may have landed already: compare the prefix this output covers)
            n = len(out.token_ids)
            assert isinstance(req.all_token_ids, TokenIds) and req.all_token_ids[: len(PROMPT) + n] == PROMPT + out.token_ids
            assert isinstance(tr.hist.token_ids, TokenIds) and tr.hist.token_ids[:n] == out.token_ids
            assert isinstance(st.tokens, TokenIds) and len(st.prefix_hash) >= len(PROMPT) + 29
            for holder in (req, tr, tr.hist, st):
                attrs = vars(holder) if hasattr(holder, "__dict__") else {s: getattr(holder, s) for s in holder.__slots__}
                # The prompt as given and the block table (a block id per block_size tokens) stay lists.
                bad = [k for k, v in attrs.items() if _is_int_list(v) and k not in ("prompt_token_ids", "blocks")]
                assert not bad, f"{type(holder).__name__}: lists of ints {bad}"
            assert not [r for r in gc.get_referents(req.all_token_ids, tr.hist.token_ids, st.tokens, st.prefix_hash)
                        if isinstance(r, int)]
    # The public API still hands out lists.
    assert type(out.token_ids) is list and type(out.new_token_ids) is list and type(req.output_token_ids) is list


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_streamed_deltas_add_up_and_match_the_reference(make_engine, async_scheduling: bool) -> None:
    """Many requests at once (the engine's one-token fast path) plus ones that take the
    general path (logprobs, stop strings, n > 1): the same tokens, text and logprobs."""
    greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    with_lp = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, logprobs=1)
    n2 = SamplingParams(max_tokens=24, temperature=1.0, seed=3, n=2, ignore_eos=True)
    prompts = [[(p + i * 11) % 8000 for p in PROMPT[: 10 + i]] for i in range(24)]

    async def stream(eng, prompt, params):
        return [o async for o in eng.generate(prompt, params)]

    async with _text_engine(make_engine, async_scheduling=async_scheduling, max_num_batched_tokens=2048) as eng:
        runs = await asyncio.gather(*[stream(eng, p, greedy) for p in prompts], stream(eng, PROMPT, with_lp), stream(eng, PROMPT, n2))
        tok = eng.tokenizer
    for p, outs in zip(prompts, runs):
        assert len(outs) == 48, "one output per token (stream_interval 1)"
        assert "".join(o.new_text for o in outs) == outs[-1].text == tok.decode(outs[-1].token_ids)
        assert sum((o.new_token_ids for o in outs), []) == outs[-1].token_ids == reference_tokens(p, 48, vocab_size=8192)
        for i, o in enumerate(outs):  # kept outputs are prefixes, never later tokens
            assert o.outputs[0].num_tokens == i + 1 and o.token_ids == outs[-1].token_ids[: i + 1]
            assert o.metrics is not None and o.metrics.first_token_time is not None
        assert [o.finished for o in outs] == [False] * 47 + [True] and outs[-1].finish_reason == "length"
    lp_outs = runs[-2]
    final = lp_outs[-1]
    assert final.token_ids == reference_tokens(PROMPT, 48, vocab_size=8192)
    assert sum((o.outputs[0].new_logprobs for o in lp_outs), []) == final.logprobs
    assert [lp.token_id for lp in final.logprobs] == final.token_ids
    last = runs[-1][-1]
    assert [c.index for c in last.outputs] == [0, 1]
    for i, c in enumerate(last.outputs):
        assert c.token_ids == reference_tokens(PROMPT, 24, vocab_size=8192, seed=3 + i, greedy=False)
        assert c.text == tok.decode(c.token_ids)


async def test_text_pieces_are_joined_on_the_fast_path_and_every_output_keeps_its_prefix(make_engine, monkeypatch) -> None:
    """The one-pass path appends each token's text to the history itself: it joins the
    pieces at the same bound as `SampleHistory.add_text` (here 4), so a long output holds
    a few chunks, and every output read later still sees exactly its own prefix."""
    from aiosched import engine as engine_mod, outputs

    monkeypatch.setattr(engine_mod, "PIECES_PER_CHUNK", 4)
    monkeypatch.setattr(outputs, "PIECES_PER_CHUNK", 4)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    async with _text_engine(make_engine) as eng:
        outs, most_pieces = [], 0
        async for out in eng.generate(PROMPT, params, request_id="p"):
            outs.append(out)
            for tr in eng._live.values():
                most_pieces = max(most_pieces, len(tr.hist.pieces))
        tok = eng.tokenizer
    assert most_pieces < 4
    assert "".join(o.new_text for o in outs) == outs[-1].text == tok.decode(outs[-1].token_ids)
    texts = [tok.decode(o.token_ids) for o in outs]
    for o, want in zip(outs, texts):  # read after the stream ended: each its own prefix
        assert o.text == want
