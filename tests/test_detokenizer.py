"""Incremental detokenization: never broken UTF-8, stop strings trimmed across tokens."""
from __future__ import annotations

import json
import pathlib

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from aiosched.detokenizer import IncrementalDetokenizer
from aiosched.tokenizer import Tokenizer

TEXT = "Hello wörld! naïve café — 日本語のテキスト 🙂🚀 def f(x): return x * 2\n" * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return Tokenizer(d)


def _stream(tok: Tokenizer, ids: list[int], stop: list[str] | None = None, chunk: int = 1) -> tuple[list[str], str | None]:
    d = IncrementalDetokenizer(tok, [], stop or [])
    pieces, hit = [], None
    for i in range(0, len(ids), chunk):
        text, hit = d.add_tokens(ids[i : i + chunk])
        pieces.append(text)
        if hit:
            break
    pieces.append(d.flush())
    return pieces, hit


@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_equals_full_decode_and_is_never_broken(tok: Tokenizer, chunk: int) -> None:
    ids = tok.encode(TEXT)
    # Byte-level pieces: single tokens for multi-byte characters split across tokens.
    pieces, _ = _stream(tok, ids, chunk=chunk)
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_single_byte_tokens_of_an_emoji_emit_nothing_until_complete(tok: Tokenizer) -> None:
    raw = HFTokenizer.from_str(tok._tok.to_str())
    byte_chars = _bytes_to_unicode()  # the emoji's 4 bytes as 4 single-byte tokens
    ids = [raw.token_to_id(byte_chars[b]) for b in "🙂".encode()]
    pieces, _ = _stream(tok, ids)
    assert pieces[:3] == ["", "", ""] and "".join(pieces) == "🙂"


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def test_stop_string_spanning_tokens_is_trimmed_and_never_leaks(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    full = tok.decode(ids)
    stop = "café — 日本"
    pieces, hit = _stream(tok, ids, stop=[stop])
    assert hit == stop
    # Exactly the text before the stop string: no part of it was streamed out early.
    assert "".join(pieces) == full[: full.index(stop)]


def test_include_stop_string(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    full = tok.decode(ids)
    d = IncrementalDetokenizer(tok, [], ["naïve"], include_stop=True)
    out = ""
    for t in ids:
        text, hit = d.add_tokens([t])
        out += text
        if hit:
            break
    assert out == full[: full.index("naïve") + len("naïve")]


def test_random_token_prompts_never_stall(tok: Tokenizer) -> None:
    """Prompts given as ids may end inside a character; output text must still flow,
    and it is exactly the decode of the output tokens."""
    import random

    rng = random.Random(0)
    vocab = tok.vocab_size
    for _ in range(300):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 64))]
        gen = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        d = IncrementalDetokenizer(tok, prompt, [])
        out = "".join(d.add_tokens([t])[0] for t in gen) + d.flush()
        assert out == tok.decode(gen), (prompt, gen)


def _byte_token(tok: Tokenizer, b: int) -> int:
    raw = HFTokenizer.from_str(tok._tok.to_str())
    return raw.token_to_id(_bytes_to_unicode()[b])


@pytest.mark.parametrize("chunk", [1, 2])
def test_a_prompt_ending_inside_a_character_keeps_its_dangling_bytes(tok: Tokenizer, chunk: int) -> None:
    # The prompt ends with the first 2 of the 4 bytes of an emoji; the output is plain text.
    emoji = "🙂".encode()
    prompt = tok.encode("Hello ") + [_byte_token(tok, emoji[0]), _byte_token(tok, emoji[1])]
    gen = tok.encode("wörld! café")
    d = IncrementalDetokenizer(tok, prompt, [])
    pieces = [d.add_tokens(gen[i : i + chunk])[0] for i in range(0, len(gen), chunk)] + [d.flush()]
    assert "".join(pieces) == tok.decode(gen) == "wörld! café"


def test_an_output_that_completes_the_prompts_character_starts_with_its_own_bytes(tok: Tokenizer) -> None:
    emoji = "🙂".encode()
    prompt = tok.encode("Hi ") + [_byte_token(tok, emoji[0])]
    gen = [_byte_token(tok, b) for b in emoji[1:]] + tok.encode(" ok")
    d = IncrementalDetokenizer(tok, prompt, [])
    out = "".join(d.add_tokens([t])[0] for t in gen) + d.flush()
    assert out == tok.decode(gen)


async def test_engine_output_text_is_the_decode_of_its_tokens_after_a_partial_prompt(make_engine) -> None:
    """Through the engine (embedded tokenizer, fake runner): final and streamed text."""
    import aiosched
    from aiosched import SamplingParams

    model = pathlib.Path(aiosched.__file__).parent / "default_model"
    t = Tokenizer(model)
    partial = next(i for i in range(t.vocab_size) if t.decode([i]).endswith("\ufffd"))
    prompt = t.encode("The answer is ") + [partial]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    async with make_engine(runner="fake", model=str(model)) as eng:
        final = await eng.generate(prompt, params)
        streamed = [o async for o in eng.generate(prompt, params)]
    assert final.text == t.decode(final.token_ids)
    assert "".join(o.new_text for o in streamed) == t.decode(streamed[-1].token_ids) == final.text


def test_warm_fills_every_tokens_text_as_the_lazy_path_would(tok: Tokenizer) -> None:
    """detokenizer.warm: one batched decode gives each token the text (and clean / partial
    verdict) that a first appearance would have learned, for the whole vocabulary; streams
    through the warm tables decode as before."""
    from aiosched import detokenizer

    detokenizer._clean.pop(tok, None)
    detokenizer._single.pop(tok, None)
    lazy = IncrementalDetokenizer(tok, [], [])
    learned = {t: lazy._learn(t) for t in range(tok.vocab_size)}
    detokenizer._clean.pop(tok, None)
    detokenizer._single.pop(tok, None)
    detokenizer.warm(tok)
    d = IncrementalDetokenizer(tok, [], [])
    assert d.clean == learned and len(learned) == tok.vocab_size
    assert any(v is None for v in learned.values()) and any(v for v in learned.values())  # both kinds present
    assert d._one == {t: tok.decode([t]) for t in range(tok.vocab_size)}
    pieces, _ = _stream(tok, tok.encode(TEXT))
    assert "".join(pieces) == tok.decode(tok.encode(TEXT))


async def test_engine_start_warms_the_token_texts(make_engine) -> None:
    """After start, a token the engine never emitted is already a dict hit (no decode on
    the loop at its first appearance)."""
    import aiosched
    from aiosched import detokenizer

    model = pathlib.Path(aiosched.__file__).parent / "default_model"
    async with make_engine(runner="fake", model=str(model)) as eng:
        table = detokenizer._clean[eng.tokenizer][True]
        assert len(table) == eng.tokenizer.vocab_size
