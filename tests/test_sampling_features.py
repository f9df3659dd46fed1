"""Logprobs, prompt logprobs, best_of, penalties, logit bias, bad tokens.

Three layers: the engine's plumbing against the deterministic fake runner; the
device logits processors against the reference formulas; and (when the torch runner
is present) end to end on a tiny random checkpoint against HF transformers.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import pathlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiosched import SamplingParams, StructuredOutputParams
from aiosched.executors.torch.logits_processors import (
    apply_bias,
    apply_penalties,
    build_bias_batch,
    build_penalty_batch,
    compute_logprobs,
    token_stats,
)
from tests.json_schemas import json_schemas

# ---- engine plumbing (fake runner) ----


def _fake(make_engine, **kw):
    cfg = dict(runner="fake", num_kv_blocks=256, block_size=4, max_num_batched_tokens=64)
    cfg.update(kw)
    return make_engine(**cfg)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_logprobs_plumbing(make_engine, async_scheduling: bool) -> None:
    async with _fake(make_engine, async_scheduling=async_scheduling) as eng:
        out = await eng.generate([5, 6, 7], SamplingParams(max_tokens=12, logprobs=3, seed=1))
        plain = await eng.generate([5, 6, 7], SamplingParams(max_tokens=12, seed=1))
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 12
    assert [lp.token_id for lp in c.logprobs] == c.token_ids
    assert all(len(lp.top) == 3 for lp in c.logprobs)
    assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))
    assert plain.outputs[0].logprobs is None and plain.outputs[0].cumulative_logprob is None
    assert plain.token_ids == c.token_ids  # asking for logprobs does not change sampling


async def test_logprobs_stream_and_stop_alignment(make_engine) -> None:
    from aiosched.executors.fake_runner import reference_tokens

    ref = reference_tokens([9, 9, 9], 20, seed=0, greedy=True)
    stop = ref[6]
    async with _fake(make_engine) as eng:
        seen = 0
        async for o in eng.generate([9, 9, 9], SamplingParams(max_tokens=20, temperature=0, logprobs=0, stop_token_ids=[stop])):
            c = o.outputs[0]
            assert len(c.logprobs) == len(c.token_ids) >= seen
            seen = len(c.token_ids)
    assert c.token_ids[-1] == stop and c.finish_reason == "stop"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_best_of_returns_highest_cumulative(make_engine, async_scheduling: bool) -> None:
    async with _fake(make_engine, async_scheduling=async_scheduling) as eng:
        all4 = await eng.generate([1, 2, 3], SamplingParams(max_tokens=8, n=4, seed=10, logprobs=0))
        outs = []
        async for o in eng.generate([1, 2, 3], SamplingParams(max_tokens=8, n=2, best_of=4, seed=10)):
            outs.append(o)
    assert len(outs) == 1 and outs[0].finished  # best_of sends only the final choice
    best = sorted(all4.outputs, key=lambda c: -c.cumulative_logprob)[:2]
    got = outs[0].outputs
    assert [c.index for c in got] == [0, 1]
    assert [c.token_ids for c in got] == [c.token_ids for c in best]
    assert [c.cumulative_logprob for c in got] == [c.cumulative_logprob for c in best]
    assert all(c.logprobs is None for c in got)  # not asked for: only the ranking used them
    assert got[0].new_token_ids == got[0].token_ids


@pytest.mark.parametrize("chunk", [64, 4], ids=["one-chunk", "chunked"])
async def test_prompt_logprobs(make_engine, chunk: int) -> None:
    prompt = list(range(10, 31))
    async with _fake(make_engine, max_num_batched_tokens=chunk) as eng:
        await eng.generate(prompt, SamplingParams(max_tokens=2))  # warms the prefix cache
        a = await eng.generate(prompt, SamplingParams(max_tokens=3, prompt_logprobs=2))
    plp = a.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    assert [p.token_id for p in plp[1:]] == prompt[1:]
    assert all(len(p.top) == 2 for p in plp[1:])
    async with _fake(make_engine, max_num_batched_tokens=64) as eng:
        b = await eng.generate(prompt, SamplingParams(max_tokens=3, prompt_logprobs=2))
    assert b.prompt_logprobs == plp  # chunking and cache state do not change them


async def test_bad_logprob_params_name_the_field(make_engine) -> None:
    async with _fake(make_engine) as eng:
        for kw, field in [({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
                          ({"n": 3, "best_of": 2}, "best_of"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
                          ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
                          ({"logit_bias": {10**7: 1.0}}, "logit_bias"), ({"logit_bias": {3: 101.0}}, "logit_bias"),
                          ({"bad_token_ids": [-1]}, "bad_token_ids"), ({"bad_token_ids": [10**7]}, "bad_token_ids")]:
            with pytest.raises(ValueError, match=f"^{field}"):
                eng.generate([1, 2], SamplingParams(**kw))
        assert not eng.scheduler.requests


# ---- logits processors vs the reference formulas ----


def _reference_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], rep: float, freq: float, pres: float) -> torch.Tensor:
    out = logits.clone()
    for t in set(prompt) | set(output):
        v = out[t].item()
        out[t] = v / rep if v > 0 else v * rep
    for t in set(output):
        c = output.count(t)
        out[t] -= freq * c + pres
    return out


def test_penalties_match_reference_formula() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, row_len = 50, 40
    buf = torch.zeros((4, row_len), dtype=torch.int64)
    hists = [([1, 2, 3, 3], [3, 4, 4, 4, 9]), ([7], []), ([5, 6], [6, 6, 40, 1]), ([2] * 3, [2, 2])]
    for r, (p, o) in enumerate(hists):
        buf[r, : len(p) + len(o)] = torch.tensor(p + o)
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams(),  # no penalty: untouched
              SamplingParams(repetition_penalty=0.7, presence_penalty=-1.0),
              SamplingParams(frequency_penalty=2.0)]
    logits = torch.randn(4, vocab, generator=g) * 3
    b = build_penalty_batch(params, [0, 1, 2, 3], [len(p) for p, _ in hists], [len(p) + len(o) for p, o in hists], torch.device("cpu"))
    assert b is not None and b.rows.tolist() == [0, 2, 3]
    got = apply_penalties(logits, buf, b)
    for r, ((p, o), sp) in enumerate(zip(hists, params)):
        ref = _reference_penalties(logits[r], p, o, sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty)
        assert torch.allclose(got[r], ref, atol=1e-6), r
    counts, seen = token_stats(buf, b, vocab)
    assert counts[0, 4].item() == 3 and counts[0, 3].item() == 1 and seen[0, 1] and not seen[0, 9 + 1]


def test_no_penalties_builds_nothing() -> None:
    assert build_penalty_batch([SamplingParams()] * 3, [0, 1, 2], [1, 1, 1], [2, 2, 2], torch.device("cpu")) is None
    assert build_bias_batch([SamplingParams()] * 3, torch.device("cpu")) is None


def test_logit_bias_and_bad_tokens() -> None:
    logits = torch.zeros(3, 10)
    params = [SamplingParams(logit_bias={1: 2.5, 4: -3.0}), SamplingParams(bad_token_ids=[0, 9]),
              SamplingParams(logit_bias={9: 5.0}, bad_token_ids=[9])]
    b = build_bias_batch(params, torch.device("cpu"))
    got = apply_bias(logits, b)
    ref = torch.zeros(3, 10)
    ref[0, 1], ref[0, 4] = 2.5, -3.0
    ref[1, 0] = ref[1, 9] = float("-inf")
    ref[2, 9] = float("-inf")  # banned wins over a bias
    assert torch.equal(got, ref)


def test_compute_logprobs() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 33, generator=g)
    sampled = torch.tensor([0, 5, 32, 7, 7])
    chosen, ids, vals = compute_logprobs(logits, sampled, 4)
    ref = torch.log_softmax(logits.double(), -1)
    assert torch.allclose(chosen.double(), ref[torch.arange(5), sampled], atol=1e-6)
    assert torch.equal(ids, ref.topk(4, -1).indices)
    assert torch.allclose(vals.double(), ref.topk(4, -1).values, atol=1e-6)
    assert compute_logprobs(logits, sampled, 0)[1].shape == (5, 0)


# ---- end to end on a tiny random checkpoint (needs the torch runner) ----

_HAS_TORCH_RUNNER = importlib.util.find_spec("aiosched.executors.torch.runner") is not None and importlib.util.find_spec("aiosched.executors.torch.random_checkpoint") is not None
needs_torch_runner = pytest.mark.skipif(not _HAS_TORCH_RUNNER, reason="torch runner not available")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> "pathlib.Path":
    if not _HAS_TORCH_RUNNER:
        pytest.skip("torch runner not available")
    from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("tiny-llama")
    write_random_checkpoint(path, arch="llama", seed=3)
    return path


@pytest.fixture(scope="module")
def hf_model(tiny):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()


def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log_softmax of the reference model's logits at every position."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (1, 6, 19, 40)]


def _require(eng, feature: str) -> None:
    if feature not in eng.info.features:
        pytest.skip(f"the torch runner does not implement {feature} yet")


# The CUDA fast path computes in TF32/fused kernels: looser than the float32 CPU path.
TOL = 2e-4 if os.environ.get("AIOSCHED_TEST_DEVICE", "cpu") == "cpu" else 3e-3


def _torch_cfg(path, async_scheduling: bool, **kw):
    # AIOSCHED_TEST_DEVICE=cuda runs the same checks on the CUDA fast path (a GPU machine).
    cfg = dict(model=str(path), async_scheduling=async_scheduling, num_kv_blocks=256, block_size=8, max_num_batched_tokens=24,
               device=os.environ.get("AIOSCHED_TEST_DEVICE", "cpu"), dtype="float32")
    cfg.update(kw)
    return cfg


@needs_torch_runner
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_logprobs_match_hf(make_engine, tiny, hf_model, async_scheduling: bool) -> None:
    vocab = hf_model.config.vocab_size
    prompts = _prompts(vocab)
    # Greedy and seeded sampling with temperature and penalties: logprobs stay the raw model's.
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=3),
              SamplingParams(max_tokens=12, temperature=0.7, seed=4, ignore_eos=True, logprobs=20, repetition_penalty=1.3),
              SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True, logprobs=0, prompt_logprobs=0),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2, frequency_penalty=0.5)]
    async with make_engine(**_torch_cfg(tiny, async_scheduling)) as eng:
        _require(eng, "logprobs")
        _require(eng, "prompt_logprobs")
        outs = await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(prompts, params)])
        plain = await eng.generate(prompts[0], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert plain.token_ids == outs[0].token_ids
    for p, sp, out in zip(prompts, params, outs):
        c = out.outputs[0]
        ref = _hf_logprobs(hf_model, p + c.token_ids)
        assert len(c.logprobs) == len(c.token_ids) == 12
        for i, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            row = ref[len(p) - 1 + i]
            assert lp.token_id == tok
            assert lp.logprob == pytest.approx(row[tok].item(), abs=TOL)
            assert [t for t, _ in lp.top] == row.topk(sp.logprobs).indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(row.topk(sp.logprobs).values.tolist(), abs=TOL)
        assert c.cumulative_logprob == pytest.approx(sum(ref[len(p) - 1 + i][t].item() for i, t in enumerate(c.token_ids)), abs=10 * TOL)
        if sp.prompt_logprobs is not None:
            plp = out.prompt_logprobs
            assert len(plp) == len(p) and plp[0] is None
            for j in range(1, len(p)):
                assert plp[j].token_id == p[j]
                assert plp[j].logprob == pytest.approx(ref[j - 1][p[j]].item(), abs=TOL)
                assert [t for t, _ in plp[j].top] == ref[j - 1].topk(sp.prompt_logprobs).indices.tolist()


def _reference_greedy(hf_model, prompt: list[int], sp: SamplingParams, n: int) -> list[int]:
    """Greedy decoding with penalties, bias and bans applied to the reference logits by the formulas."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1].double()
        logits = _reference_penalties(logits, prompt, out, sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty)
        for t, b in sp.logit_bias.items():
            logits[t] += b
        for t in sp.bad_token_ids:
            logits[t] = float("-inf")
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


@needs_torch_runner
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_penalties_end_to_end(make_engine, tiny, hf_model, async_scheduling: bool) -> None:
    vocab = hf_model.config.vocab_size
    prompts = _prompts(vocab)
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    async with make_engine(**_torch_cfg(tiny, False)) as eng:
        _require(eng, "penalties")
        base = await eng.generate(prompts[2], plain)
    top = base.token_ids[0]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, repetition_penalty=1.8),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.5),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logit_bias={7: 30.0}),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, bad_token_ids=[top], repetition_penalty=0.8,
                             presence_penalty=-0.5)]
    async with make_engine(**_torch_cfg(tiny, async_scheduling)) as eng:
        outs = await asyncio.gather(*[eng.generate(prompts[2], sp) for sp in params], eng.generate(prompts[2], plain))
    assert outs[-1].token_ids == base.token_ids  # penalized neighbours do not leak into a plain request
    for sp, out in zip(params, outs):
        assert out.token_ids == _reference_greedy(hf_model, prompts[2], sp, 16), sp
    assert outs[2].token_ids == [7] * 16
    assert top not in outs[3].token_ids
    assert outs[0].token_ids != base.token_ids


@needs_torch_runner
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_best_of_end_to_end(make_engine, tiny, async_scheduling: bool) -> None:
    async with make_engine(**_torch_cfg(tiny, async_scheduling)) as eng:
        _require(eng, "logprobs")
        all4 = await eng.generate([5, 6, 7], SamplingParams(max_tokens=10, n=4, seed=3, logprobs=0, ignore_eos=True))
        best = await eng.generate([5, 6, 7], SamplingParams(max_tokens=10, n=2, best_of=4, seed=3, ignore_eos=True))
    ranked = sorted(all4.outputs, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked]


# ---- structured output on the tiny random model (torch runner), async scheduling ----

_SEEN: set[str] = set()


@needs_torch_runner
@settings(max_examples=5, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(json_schemas(max_bytes=300), min_size=10, max_size=10, unique_by=json.dumps))
def test_structured_mixed_batch_torch(schemas: list[dict], make_engine, tiny) -> None:
    """5 examples x 10 = 50 hypothesis schemas, each batch mixed with unconstrained requests
    (greedy and seeded), async scheduling: every constrained output is valid for its schema,
    and the unconstrained outputs are identical to a run without the constrained ones."""
    import jsonschema

    free = [SamplingParams(max_tokens=24, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True) for i in range(6)]
    free_prompts = [[3 + i, 40 + i, 7] for i in range(6)]

    async def run(with_constrained: bool) -> list[list[int]]:
        async with make_engine(**_torch_cfg(tiny, True, num_kv_blocks=1024, max_num_batched_tokens=256, max_num_seqs=32)) as eng:
            _require(eng, "structured_output")
            _SEEN.update(json.dumps(s) for s in schemas)
            fjobs = [eng.generate(p, sp) for p, sp in zip(free_prompts, free)]
            cjobs = []
            if with_constrained:
                cjobs = [eng.generate("JSON:", SamplingParams(max_tokens=400, temperature=0.0 if i % 3 == 0 else 1.0, seed=i,
                                                              structured=StructuredOutputParams(json_schema=json.dumps(s))))
                         for i, s in enumerate(schemas)]
            fouts = await asyncio.gather(*fjobs)
            couts = await asyncio.gather(*cjobs)
        for s, out in zip(schemas, couts):
            assert out.finish_reason == "stop", (s, out.text)
            jsonschema.validate(json.loads(out.text), s)
        return [o.token_ids for o in fouts]

    assert asyncio.run(run(True)) == asyncio.run(run(False))


@needs_torch_runner
def test_structured_schemas_were_diverse() -> None:
    assert len(_SEEN) >= 40 or not _SEEN, len(_SEEN)
