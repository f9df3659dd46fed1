"""Structured output: spec validation, the worker-side grammar manager, bitmask fill and apply,
and the engine end to end (fake runner, sync and async scheduling)."""
from __future__ import annotations

import asyncio
import json
import pathlib
import time

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiosched import SamplingParams, StructuredOutputParams
from aiosched.protocol import NewRequestData, ScheduledRequest, SchedulerOutput
from aiosched.structured import grammar_for, validate_structured
from aiosched.executors.structured_output import (
    GrammarTokenizer,
    StructuredOutputManager,
    allowed_token_ids,
    apply_token_bitmask,
    bitmask_words,
    compile_grammar,
    unpack_bitmask,
)
from tests.json_schemas import ISSUE16_SCHEMA, json_schemas
from tests.tiny_model import _write_tokenizer_only

SO = StructuredOutputParams
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("tiny-tok")
    _write_tokenizer_only(d, max_model_len=1024)
    return d


@pytest.fixture(scope="module")
def gtok(model_dir: pathlib.Path) -> GrammarTokenizer:
    return GrammarTokenizer.from_model_dir(str(model_dir))


@pytest.fixture(scope="module")
def hf_tok(model_dir: pathlib.Path):
    from aiosched.tokenizer import Tokenizer

    return Tokenizer(model_dir)


# ---- validation: every bad spec is a ValueError naming the field ----

_BAD_SPECS = [
    (SO(json_schema="{not json"), "structured.json_schema"),
    (SO(json_schema="[1, 2]"), "structured.json_schema"),
    (SO(json_schema='{"type": "objekt"}'), "structured.json_schema"),
    (SO(json_schema='{"type": "string", "pattern": "(["}'), "structured.json_schema"),
    (SO(json_schema='{"properties": {"a": {"$ref": "#/defs/missing"}}}'), "structured.json_schema"),
    (SO(json_schema='{"not": {"type": "string"}}'), "structured.json_schema"),
    (SO(regex="(["), "structured.regex"),
    (SO(regex=""), "structured.regex"),
    (SO(grammar='root ::= "a" | undefined_rule'), "structured.grammar"),
    (SO(grammar="this is not ::: a grammar ("), "structured.grammar"),
    (SO(grammar="   "), "structured.grammar"),
    (SO(grammar='start: "a" | b'), "structured.grammar"),
    (SO(), "structured"),
    (SO(regex="a", grammar='root ::= "a"'), "structured"),
]


@pytest.mark.parametrize("spec, field", _BAD_SPECS)
def test_bad_specs_name_the_field(spec: StructuredOutputParams, field: str) -> None:
    with pytest.raises(ValueError) as e:
        validate_structured(spec)
    assert str(e.value).startswith(field + ":") or str(e.value).startswith(field + " "), str(e.value)


@pytest.mark.parametrize("spec", [SO(json_schema=json.dumps(SCHEMA)), SO(json_object=True), SO(regex=r"\d{3}-[a-z]+"),
                                  SO(grammar='root ::= "yes" | "no" | num\nnum ::= [0-9]+'), SO(grammar='start: "a"+ "b"')])
def test_good_specs_validate_and_are_cached(spec: StructuredOutputParams) -> None:
    validate_structured(spec)
    assert grammar_for(spec) is grammar_for(spec)  # second call is a cache hit


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.text(max_size=30), st.text(alphabet="()[]{}|*+?\\^$.-:=\"'a1 ", max_size=30)))
def test_arbitrary_text_specs_never_crash(text: str) -> None:
    for spec in (SO(json_schema=text), SO(regex=text), SO(grammar=text)):
        try:
            validate_structured(spec)
        except ValueError as e:
            assert str(e).startswith("structured"), str(e)


# ---- matcher, compile cache, bitmask ----


def _replay(gtok: GrammarTokenizer, hf_tok, spec: StructuredOutputParams, text: str) -> None:
    """Every token of a valid text is allowed at its step; EOS is allowed at the end."""
    mgr = StructuredOutputManager(gtok)
    ids = hf_tok.encode(text, add_special_tokens=False)
    mgr.add_request(NewRequestData("r", [5, 6], 2, SamplingParams(structured=spec), 0))
    bm = np.zeros((1, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    for i, t in enumerate(ids):
        mgr.fill_bitmask(bm, [(0, "r")])
        assert t in allowed_token_ids(bm[0], gtok.vocab_size), f"token {i} {hf_tok.decode([t])!r} masked out"
        assert mgr.get("r").accept_token(t)
    mgr.fill_bitmask(bm, [(0, "r")])
    assert set(gtok.eos_token_ids) <= set(allowed_token_ids(bm[0], gtok.vocab_size).tolist())


def test_replay_valid_outputs(gtok: GrammarTokenizer, hf_tok) -> None:
    _replay(gtok, hf_tok, SO(json_schema=json.dumps(SCHEMA)), '{"name":"abc","ok":true,"n":42}')
    _replay(gtok, hf_tok, SO(json_object=True), '{"a":[1,2,{"b":null}]}')
    _replay(gtok, hf_tok, SO(regex=r"\d{3}-[a-z]+"), "123-fox")
    _replay(gtok, hf_tok, SO(grammar='root ::= "def " name "(" name? ")"\nname ::= [a-z_]+'), "def fibonacci(n)")


def test_invalid_token_is_rejected_and_mask_becomes_eos_only(gtok: GrammarTokenizer, hf_tok) -> None:
    mgr = StructuredOutputManager(gtok)
    mgr.add_request(NewRequestData("r", [5], 1, SamplingParams(structured=SO(regex="[0-9]+")), 0))
    bm = np.zeros((1, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    mgr.fill_bitmask(bm, [(0, "r")])
    letter = hf_tok.encode("x", add_special_tokens=False)[0]
    assert letter not in allowed_token_ids(bm[0], gtok.vocab_size)
    assert not mgr.get("r").accept_token(letter)
    assert mgr.get("r").is_error and mgr.get("r").is_terminated
    mgr.fill_bitmask(bm, [(0, "r")])
    assert set(allowed_token_ids(bm[0], gtok.vocab_size).tolist()) == set(gtok.eos_token_ids)


def test_compile_cache_returns_independent_matchers(gtok: GrammarTokenizer, hf_tok) -> None:
    spec = SO(regex="ab|cd")
    m1, m2 = compile_grammar(gtok, spec), compile_grammar(gtok, spec)
    assert m1 is not m2
    a = hf_tok.encode("a", add_special_tokens=False)[0]
    assert m1.consume_token(a)
    assert m2.validate_tokens([hf_tok.encode("c", add_special_tokens=False)[0]]) == 1  # m2 unaffected by m1


def test_resumed_request_is_fast_forwarded(gtok: GrammarTokenizer, hf_tok) -> None:
    spec = SO(regex="[a-z]+=[0-9]+;")
    done = hf_tok.encode("abc=", add_special_tokens=False)
    mgr = StructuredOutputManager(gtok)
    rg = mgr.add_request(NewRequestData("r", [7, 8] + done, 2, SamplingParams(structured=spec), 0))
    assert rg.num_consumed == len(done)
    bm = np.zeros((1, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    mgr.fill_bitmask(bm, [(0, "r")])
    allowed = set(allowed_token_ids(bm[0], gtok.vocab_size).tolist())
    assert hf_tok.encode("7", add_special_tokens=False)[0] in allowed
    assert hf_tok.encode("x", add_special_tokens=False)[0] not in allowed


def test_constrained_rows_and_sync(gtok: GrammarTokenizer, hf_tok) -> None:
    mgr = StructuredOutputManager(gtok)
    news = [NewRequestData(f"r{i}", [1, 2, 3], 3, SamplingParams(structured=SO(regex="[0-9]+") if i % 2 else None), 0) for i in range(4)]
    for n in news:
        mgr.add_request(n)
    assert len(mgr) == 2
    so = SchedulerOutput(1, [], [ScheduledRequest("r0", 3, 0, [], True), ScheduledRequest("r1", 2, 0, [], False),
                                 ScheduledRequest("r2", 1, 3, [], True), ScheduledRequest("r3", 1, 4, [], True)], [], 7)
    # r1 is a prefill chunk (no sample); r3 samples position 5: it must first consume position 3 and 4.
    assert mgr.constrained_rows(so) == [(2, "r3", 5)]
    d1, d2 = hf_tok.encode("1", add_special_tokens=False)[0], hf_tok.encode("2", add_special_tokens=False)[0]
    # Two earlier steps sampled d1 then d2 for r3 (row 1 and row 0 of their batches).
    mgr.note_sampled([7, d1], None, [(1, "r3")])
    mgr.note_sampled([d2], None, [(0, "r3")])
    mgr.advance(mgr.constrained_rows(so))
    assert mgr.get("r3").outputs == [d1, d2] and mgr.get("r3").num_consumed == 2
    mgr.advance(mgr.constrained_rows(so))  # nothing new: nothing consumed twice
    assert mgr.get("r3").num_consumed == 2
    with pytest.raises(RuntimeError, match="position 6"):  # a token the host never saw is a lifecycle bug, not a mask
        mgr.sync("r3", 6)
    mgr.free("r3")
    assert "r3" not in mgr and mgr.held_request_ids() == {"r1"}


def test_free_drops_samples_in_flight(gtok: GrammarTokenizer, hf_tok) -> None:
    """Issue 16.1: a request preempted with its sample still in flight comes back under
    the same id with that sample in its history; the first life's copy must not be
    consumed a second time (the matcher would run one token behind, or fail)."""
    spec = SO(regex="[0-9]{1,2}-[a-z]")
    digit = hf_tok.encode("4", add_special_tokens=False)[0]
    mgr = StructuredOutputManager(gtok)
    mgr.add_request(NewRequestData("r", [1, 2], 2, SamplingParams(structured=spec), 0))
    mgr.note_sampled([digit], None, [(0, "r")])  # step N sampled "4"; not on the host yet
    mgr.free("r")  # preempted
    assert mgr.held_request_ids() == set()
    rg = mgr.add_request(NewRequestData("r", [1, 2, digit], 2, SamplingParams(structured=spec), 0))  # resumed with it
    mgr.advance([(0, "r", 3)])
    assert rg.outputs == [digit] and rg.num_consumed == 1 and not rg.is_error
    bm = np.zeros((1, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    mgr.fill_bitmask(bm, [(0, "r")])
    allowed = set(allowed_token_ids(bm[0], gtok.vocab_size).tolist())
    assert hf_tok.encode("-", add_special_tokens=False)[0] in allowed  # after one digit: another digit or "-"
    with pytest.raises(RuntimeError, match="added twice"):
        mgr.add_request(NewRequestData("r", [1, 2], 2, SamplingParams(structured=spec), 0))


@pytest.mark.parametrize("rows_mode", ["all", "subset"])
def test_apply_token_bitmask_matches_reference(rows_mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    batch, vocab = 6, 1000 + 7  # not a multiple of 32
    logits = torch.randn(batch, vocab, generator=g)
    rows = [0, 2, 5] if rows_mode == "subset" else list(range(batch))
    allowed = torch.rand(len(rows), vocab, generator=g) < 0.3
    words = bitmask_words(vocab)
    packed = np.zeros((len(rows), words), dtype=np.int64)
    for i in range(len(rows)):
        for t in torch.nonzero(allowed[i]).flatten().tolist():
            packed[i, t // 32] |= 1 << (t % 32)
    bitmask = torch.from_numpy(packed.astype(np.uint32).view(np.int32))
    assert torch.equal(unpack_bitmask(bitmask, vocab), allowed)
    ref = logits.clone()
    for i, r in enumerate(rows):
        ref[r][~allowed[i]] = float("-inf")
    out = logits.clone()
    apply_token_bitmask(out, bitmask, torch.tensor(rows) if rows_mode == "subset" else None)
    assert torch.equal(out, ref)
    # A bitmask narrower than the logits (model vocab padded past the tokenizer's): the tail is disallowed.
    wide = torch.randn(len(rows), words * 32 + 40, generator=g)
    apply_token_bitmask(wide, bitmask)
    assert torch.isinf(wide[:, words * 32 :]).all()


def test_batched_fill_equals_single_fill(gtok: GrammarTokenizer, hf_tok) -> None:
    specs = [SO(json_schema=json.dumps(SCHEMA)), SO(regex="[0-9]+"), SO(json_object=True), SO(grammar='root ::= "x"+')]
    mgr = StructuredOutputManager(gtok, num_threads=2)
    mgr.parallel_fill_rows = 2  # the pool's batched fill, on 4 rows
    for i, s in enumerate(specs):
        mgr.add_request(NewRequestData(f"r{i}", [3], 1, SamplingParams(structured=s), 0))
    words = bitmask_words(gtok.vocab_size)
    batched = np.zeros((6, words), dtype=np.int32)
    mgr.fill_bitmask(batched, [(5 - i, f"r{i}") for i in range(4)])
    for i in range(4):
        single = np.zeros((1, words), dtype=np.int32)
        mgr.fill_bitmask(single, [(0, f"r{i}")])
        assert np.array_equal(single[0], batched[5 - i])


@pytest.mark.parametrize("max_length", [5, 12, None])
def test_string_slices_change_no_mask_bit(gtok: GrammarTokenizer, model_dir: pathlib.Path, max_length: int | None) -> None:
    """The worker's tokenizer classifies string-safe tokens by length (STRING_SLICES: a mask
    inside a bounded string skips the trie walk); along seeded random walks through a schema
    every mask equals the one llguidance's default slices give."""
    import random

    import llguidance

    from aiosched.executors.structured_output import STRING_SLICES

    assert gtok.slices == STRING_SLICES
    ref_tok = llguidance.LLTokenizer((model_dir / "tokenizer.json").read_text(encoding="utf-8"), eos_token=gtok.eos_token_ids)
    assert ref_tok.vocab_size == gtok.vocab_size
    name: dict = {"type": "string"} if max_length is None else {"type": "string", "maxLength": max_length}
    schema = {"type": "object", "properties": {"name": name, "tags": {"type": "array", "items": name, "maxItems": 4}},
              "required": ["name", "tags"], "additionalProperties": False}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    words = bitmask_words(gtok.vocab_size)
    got, want = np.zeros(words, dtype=np.int32), np.zeros(words, dtype=np.int32)
    for seed in range(4):
        rng = random.Random(seed)
        ours, ref = llguidance.LLMatcher(gtok.tok, grammar, log_level=0), llguidance.LLMatcher(ref_tok, grammar, log_level=0)
        for _ in range(60):
            ours.unsafe_compute_mask_ptr(got.ctypes.data, words * 4)
            ref.unsafe_compute_mask_ptr(want.ctypes.data, words * 4)
            assert np.array_equal(got, want)
            allowed = allowed_token_ids(got, gtok.vocab_size)
            if ours.is_stopped() or not len(allowed):
                break
            t = int(allowed[rng.randrange(len(allowed))])
            assert ours.consume_token(t) and ref.consume_token(t)


# ---- engine end to end (fake runner: same manager, same batched fill) ----


def _check(spec: StructuredOutputParams, schema: dict | None, text: str) -> None:
    if spec.json_schema is not None or spec.json_object:
        value = json.loads(text)
        jsonschema.validate(value, schema if schema is not None else {"type": "object"})
    elif spec.regex is not None:
        import re

        assert re.fullmatch(spec.regex, text), text


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_engine_mixed_batch(make_engine, model_dir: pathlib.Path, async_scheduling: bool) -> None:
    cfg = dict(model=str(model_dir), runner="fake", async_scheduling=async_scheduling, num_kv_blocks=512, block_size=8,
               max_num_batched_tokens=128, max_model_len=1024)
    free = [SamplingParams(max_tokens=40, temperature=0.0 if i % 2 else 1.0, seed=i) for i in range(6)]
    prompts = ["def fibonacci(n):", "Hello world!", "import asyncio", "The quick brown fox", "naïve café", "return n"]
    constrained = [(SO(json_schema=json.dumps(SCHEMA)), SCHEMA), (SO(json_object=True), None), (SO(regex=r"[a-z]{2,8}-\d{1,3}"), None),
                   (SO(json_schema=json.dumps(SCHEMA)), SCHEMA)]
    async with make_engine(**cfg) as eng:
        alone = await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(prompts, free)])
    async with make_engine(**cfg) as eng:
        jobs = [eng.generate(p, sp) for p, sp in zip(prompts, free)]
        cjobs = [eng.generate(prompts[i % len(prompts)], SamplingParams(max_tokens=400, temperature=1.0, seed=100 + i, structured=s))
                 for i, (s, _) in enumerate(constrained)]
        mixed = await asyncio.gather(*jobs)
        couts = await asyncio.gather(*cjobs)
    assert [o.token_ids for o in mixed] == [o.token_ids for o in alone]
    for (spec, schema), out in zip(constrained, couts):
        assert out.finish_reason == "stop", (spec, out.text)
        _check(spec, schema, out.text)


_SEEN_SCHEMAS: set[str] = set()


@settings(max_examples=5, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(json_schemas(max_bytes=300), min_size=10, max_size=10, unique_by=json.dumps))
def test_engine_hypothesis_schemas(schemas: list[dict], make_engine, model_dir: pathlib.Path) -> None:
    """5 examples x 10 schemas = 50 schemas, each batch mixed with unconstrained requests,
    sync and async: every constrained output is valid JSON for its schema."""
    _SEEN_SCHEMAS.update(json.dumps(s) for s in schemas)

    async def run(async_scheduling: bool) -> list[list[int]]:
        async with make_engine(model=str(model_dir), runner="fake", async_scheduling=async_scheduling, num_kv_blocks=1024,
                               block_size=8, max_num_batched_tokens=256, max_model_len=1024) as eng:
            free = [eng.generate(f"free text {i}", SamplingParams(max_tokens=30, seed=i)) for i in range(4)]
            outs = await asyncio.gather(*[eng.generate("Reply in JSON:", SamplingParams(max_tokens=400, temperature=1.0, seed=i,
                                                                                        structured=SO(json_schema=json.dumps(s))))
                                          for i, s in enumerate(schemas)])
            free_outs = await asyncio.gather(*free)
        for s, out in zip(schemas, outs):
            assert out.finish_reason == "stop", (s, out.text)
            jsonschema.validate(json.loads(out.text), s)
        return [o.token_ids for o in free_outs]

    assert asyncio.run(run(False)) == asyncio.run(run(True))


def test_engine_hypothesis_schemas_were_diverse() -> None:
    assert len(_SEEN_SCHEMAS) >= 40 or not _SEEN_SCHEMAS, len(_SEEN_SCHEMAS)


async def test_engine_rejects_bad_spec_at_generate(make_engine, model_dir: pathlib.Path) -> None:
    async with make_engine(model=str(model_dir), runner="fake") as eng:
        for spec, field in _BAD_SPECS:
            with pytest.raises(ValueError, match=field.replace(".", r"\.")):
                eng.generate("hi", SamplingParams(structured=spec))
        assert not eng.scheduler.requests  # nothing was queued


async def test_engine_without_tokenizer_rejects_structured(fake_engine) -> None:
    with pytest.raises(ValueError, match="^structured: not supported"):
        fake_engine.generate([1, 2], SamplingParams(structured=SO(json_object=True)))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_engine_structured_under_preemption(make_engine, model_dir: pathlib.Path, async_scheduling: bool) -> None:
    """A tight KV pool forces preemptions; resumed constrained requests are fast-forwarded
    and still produce valid output, identical to an unpressured run."""
    grammar = 'root ::= "[" item ("," item)? ("," item)? "]"\nitem ::= [0-9] [0-9]? [0-9]?'
    specs = [SO(json_schema=json.dumps(SCHEMA)), SO(regex=r"[a-z]{3,9}(-[0-9]{1,3}){2,4}"), SO(grammar=grammar)] * 10

    async def run(num_kv_blocks: int) -> list:
        async with make_engine(model=str(model_dir), runner="fake", async_scheduling=async_scheduling, num_kv_blocks=num_kv_blocks,
                               block_size=4, max_num_batched_tokens=32, max_model_len=1024) as eng:
            outs = await asyncio.gather(*[eng.generate("Hello world!", SamplingParams(max_tokens=200, seed=i, structured=s))
                                          for i, s in enumerate(specs)])
            return outs, eng.stats()["preemptions"]

    tight, preemptions = await run(52)
    roomy, _ = await run(1024)
    assert preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    for spec, out in zip(specs, tight):
        assert out.finish_reason == "stop", out.text
        _check(spec, SCHEMA if spec.json_schema else None, out.text)
        if spec.grammar is not None:
            import re

            assert re.fullmatch(r"\[[0-9]{1,3}(,[0-9]{1,3}){0,2}\]", out.text), out.text


# ---- issue 16.1: a preempted constrained request, the real torch runner ----

ISSUE16_PROMPT = "class Scheduler:"
DEFAULT_MODEL = pathlib.Path(__file__).resolve().parents[1] / "aiosched" / "default_model"


def _issue16_params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=40, structured=SO(json_schema=json.dumps(ISSUE16_SCHEMA)))


@pytest.fixture(scope="module")
def issue16_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Issue 16's reproduction model: a random Llama (hidden 128, 2 layers) with the embedded
    model's tokenizer (the prompt is 6 tokens, so prompt + max_tokens fits 3 blocks of 16)."""
    if not (DEFAULT_MODEL / "tokenizer.json").is_file():
        pytest.skip("the embedded default model's tokenizer is not shipped")
    from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

    d = tmp_path_factory.mktemp("issue16-llama")
    write_random_checkpoint(d, arch="llama", seed=0, hidden_size=128, num_layers=2, vocab_size=8192)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((DEFAULT_MODEL / name).read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    ref = json.loads((DEFAULT_MODEL / "config.json").read_text())
    cfg.update({k: v for k, v in ref.items() if k.endswith("_token_id")})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _issue16_config(model: pathlib.Path, **kw) -> dict:
    return dict(model=str(model), runner="torch", device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def issue16_alone(issue16_model: pathlib.Path) -> str:
    """The constrained request alone, with room to spare: no preemption."""
    async def run() -> str:
        from aiosched.config import EngineConfig
        from aiosched.engine import AsyncEngine

        async with AsyncEngine(EngineConfig.load(_issue16_config(issue16_model, num_kv_blocks=64, block_size=16,
                                                                 async_scheduling=False))) as eng:
            out = await eng.generate(ISSUE16_PROMPT, _issue16_params())
            assert eng.stats()["preemptions"] == 0
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), ISSUE16_SCHEMA)
        return out.text

    return asyncio.run(run())


async def _worker_forgot_everything(eng) -> None:
    """Every per-request state of the in-process torch worker is gone once the engine has
    told it to free the last request."""
    runner = getattr(eng._executor, "runner", None)
    if runner is None:  # another process: nothing to look at from here
        return
    for _ in range(2000):  # the free-only step runs on the worker's launch thread
        if not eng.scheduler.requests and not eng.scheduler._freed_for_worker and not runner.reqs:
            break
        await asyncio.sleep(0.005)
    assert not runner.reqs and not runner.prompt_lp_reqs
    assert not runner.extras.active
    assert runner.extras.structured.held_request_ids() == set()


_ISSUE16_VARIANTS = {
    "inproc-sync": dict(executor="inproc", async_scheduling=False),
    "inproc-async": dict(executor="inproc", async_scheduling=True),
    "inproc-async-chunked": dict(executor="inproc", async_scheduling=True, max_num_batched_tokens=8),
    "inproc-sync-chunked": dict(executor="inproc", async_scheduling=False, max_num_batched_tokens=8),
    "inproc-async-speculative": dict(executor="inproc", async_scheduling=True, speculative={"num_tokens": 3}),
    "multiproc-sync": dict(executor="multiproc", async_scheduling=False),
    "multiproc-async": dict(executor="multiproc", async_scheduling=True),
}


@pytest.mark.parametrize("variant", list(_ISSUE16_VARIANTS))
async def test_preempted_constrained_request_equals_alone(make_engine, issue16_model: pathlib.Path, issue16_alone: str,
                                                          variant: str) -> None:
    """Issue 16.1, through the public API: an unconstrained 30-token request fills a pool of
    3 blocks of 16, the constrained one is preempted and resumed; its JSON is exactly the
    one it gives alone (it was `{"` / `{"a":9` with finish_reason "stop")."""
    cfg = _issue16_config(issue16_model, num_kv_blocks=3, block_size=16, **_ISSUE16_VARIANTS[variant])
    async with make_engine(**cfg) as eng:
        filler = eng.generate(list(range(5, 35)), SamplingParams(max_tokens=18, temperature=0.0))
        constrained = eng.generate(ISSUE16_PROMPT, _issue16_params())  # both queued before the first step
        out = await constrained
        await filler
        assert eng.stats()["preemptions"] >= 1
        assert (out.text, out.finish_reason) == (issue16_alone, "stop")
        jsonschema.validate(json.loads(out.text), ISSUE16_SCHEMA)
        await _worker_forgot_everything(eng)


class _GatedExecutor:
    """The in-process executor whose worker starts no step while `gate` is clear: lets a
    test queue several HTTP requests before the first step runs (a fixed order, no race)."""

    gate = None  # threading.Event, set by the test module

    def __new__(cls, config):
        import threading

        from aiosched.executors.inproc import InprocExecutor

        class Gated(InprocExecutor):
            async def start(self):
                info = await super().start()
                execute = self.runner.execute

                def gated(so):
                    _GatedExecutor.gate.wait(60)
                    return execute(so)

                self.runner.execute = gated
                return info

        if cls.gate is None:
            cls.gate = threading.Event()
            cls.gate.set()
        return Gated(config)


def test_server_preempted_constrained_request(issue16_model: pathlib.Path, issue16_alone: str) -> None:
    """Issue 16.1 through the server: HTTP 200 with the JSON the request gives alone (it was
    `{"a` with finish_reason "stop")."""
    import threading

    import httpx

    from aiosched.executors.base import register_executor
    from aiosched.server import build_app
    from tests.server_thread import ServerThread

    register_executor("test-gated-grammar", _GatedExecutor)
    app = build_app(_issue16_config(issue16_model, num_kv_blocks=3, block_size=16, executor="test-gated-grammar",
                                    async_scheduling=True))
    fmt = {"type": "json_schema", "json_schema": {"name": "ab", "schema": ISSUE16_SCHEMA}}
    with ServerThread(app) as srv:
        eng = app.state.aiosched.engine
        _GatedExecutor.gate.clear()
        results: dict[str, httpx.Response] = {}

        def post(name: str, body: dict) -> None:
            try:
                results[name] = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
            except BaseException as e:  # surfaced by wait_queued
                results[name] = e

        def queued() -> int:
            async def n() -> int:
                return len(eng.scheduler.requests)
            return srv.call(n)

        def wait_queued(n: int, client: threading.Thread) -> None:
            deadline = time.monotonic() + 60
            while queued() < n:
                assert client.is_alive(), f"the client ended before its request was queued: {results}"
                assert time.monotonic() < deadline, f"{n} requests not queued within 60 s: {results}"
                client.join(0.01)

        try:
            filler = threading.Thread(target=post, args=("filler", {"model": str(issue16_model), "prompt": list(range(5, 35)),
                                                                   "max_tokens": 18, "temperature": 0}))
            filler.start()
            wait_queued(1, filler)
            constrained = threading.Thread(target=post, args=("json", {"model": str(issue16_model), "prompt": ISSUE16_PROMPT,
                                                                       "max_tokens": 40, "temperature": 0,
                                                                       "response_format": fmt}))
            constrained.start()
            wait_queued(2, constrained)
        finally:
            _GatedExecutor.gate.set()
        filler.join(120)
        constrained.join(120)

        async def preemptions() -> int:
            return eng.stats()["preemptions"]
        assert srv.call(preemptions) >= 1
    r = results["json"]
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (issue16_alone, "stop")
    jsonschema.validate(json.loads(choice["text"]), ISSUE16_SCHEMA)
    assert results["filler"].status_code == 200
