"""N-gram speculative decoding: the proposer, the rejection sampler, and the oracle
that greedy output with speculation is token-for-token the output without it (fake
runner with its simulated KV check, tiny random torch model; sync and async; with
preemption and chunked prefill)."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiosched import SamplingParams
from aiosched.executors.torch.spec_decode import propose_ngram

# AIOSCHED_TEST_DEVICE=cuda: the torch-model tests on a GPU (float32, the CUDA fast path).
DEV = {"device": os.environ["AIOSCHED_TEST_DEVICE"], "dtype": "float32"} if os.environ.get("AIOSCHED_TEST_DEVICE") else {}
SPEC = {"method": "ngram", "num_tokens": 4, "ngram_min": 1, "ngram_max": 3, "auto": False}  # draft every step: counts are exact


# ---- proposer ----


def test_proposer_copies_what_followed_the_most_recent_match() -> None:
    #         0  1  2  3  4  5  6  7  8  9
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert propose_ngram(toks, 3, 1, 3) == [7, 8, 1]  # most recent "1 2 3" at 4..6
    assert propose_ngram(toks, 10, 1, 3) == [7, 8, 1, 2, 3]  # stops at the end of history


def test_proposer_prefers_the_longest_ngram() -> None:
    toks = [5, 3, 4, 6, 3, 9, 5, 3]  # "5 3" matches at 0 (-> 4); "3" alone matches at 4 (-> 9)
    assert propose_ngram(toks, 1, 1, 2) == [4]
    assert propose_ngram(toks, 1, 1, 1) == [9]
    assert propose_ngram(toks, 1, 2, 2) == [4]


def test_proposer_none() -> None:
    assert propose_ngram([1, 2, 3, 4], 4, 1, 3) == []
    assert propose_ngram([7], 4, 1, 3) == []
    assert propose_ngram([7, 7], 0, 1, 3) == []
    assert propose_ngram([1, 2, 9, 2], 2, 2, 3) == []  # only a 1-gram match, ngram_min=2
    assert propose_ngram([7, 7, 7], 4, 1, 3) == [7]  # "7 7" at 0..1 -> the token at 2


def _walk(tokens: list[int], accepted: list[bool]) -> list[int]:
    # The reference: keep drafts while accepted, then the first non-accepted row's token.
    out = []
    for t, a in zip(tokens, accepted):
        out.append(t)
        if not a:
            break
    return out


def accept_rows(tokens, accepted, num_rows: list[int]):
    """The acceptance grid from flat rows (num_rows[q] consecutive rows per request, as a
    step lays them out) through `spec_decode.accept_grid`: ([Q, K1] tokens, -1 padded; [Q] counts)."""
    import torch

    from aiosched.executors.torch.spec_decode import accept_grid

    Q, K1 = len(num_rows), max(num_rows)
    slot = torch.tensor([q * K1 + j for q, n in enumerate(num_rows) for j in range(n)], dtype=torch.int64)
    tok = torch.full((Q * K1,), -1, dtype=tokens.dtype).index_copy_(0, slot, tokens).view(Q, K1)
    acc = torch.zeros(Q * K1, dtype=torch.int64).index_copy_(0, slot, accepted.long()).view(Q, K1)
    return accept_grid(tok, acc)


def test_accept_rows() -> None:
    torch = pytest.importorskip("torch")

    # all drafts then the bonus; second draft rejected: corrected token; first rejected; no drafts
    toks = torch.tensor([5, 6, 7, 5, 6, 7, 5, 6, 7, 5])
    acc = torch.tensor([True, True, False, True, False, False, False, True, False, False])
    tok, counts = accept_rows(toks, acc, [3, 3, 3, 1])
    assert counts.tolist() == [3, 2, 1, 1]
    assert tok.tolist() == [[5, 6, 7], [5, 6, -1], [5, -1, -1], [5, -1, -1]]


@given(reqs=st.lists(st.lists(st.tuples(st.integers(0, 9), st.booleans()), min_size=1, max_size=6), min_size=1, max_size=8))
@settings(max_examples=100, deadline=None)
def test_accept_rows_equals_the_walk(reqs) -> None:
    torch = pytest.importorskip("torch")

    reqs = [r[:-1] + [(r[-1][0], False)] for r in reqs]  # the last row has no draft: never accepted
    tok, counts = accept_rows(torch.tensor([t for r in reqs for t, _ in r]), torch.tensor([a for r in reqs for _, a in r]),
                              [len(r) for r in reqs])
    for r, row, c in zip(reqs, tok.tolist(), counts.tolist()):
        want = _walk([t for t, _ in r], [a for _, a in r])
        assert row[:c] == want and c == len(want) and all(x == -1 for x in row[c:])


def test_rejection_sampling_preserves_the_target_distribution() -> None:
    torch = pytest.importorskip("torch")
    from aiosched.executors.torch.sampler import SamplingBatch
    from aiosched.executors.torch.spec_decode import verify_drafts

    V, N = 6, 20000
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0])
    target = torch.softmax(logits / 0.8, dim=-1)
    for draft in (3, 1, 5):  # likely, unlikely, rare
        b = SamplingBatch(
            temperature=torch.full((N,), 0.8), top_k=torch.zeros(N, dtype=torch.int64), top_p=torch.ones(N), min_p=torch.zeros(N),
            seeds=torch.arange(N, dtype=torch.int64) * 7919 + 1, positions=torch.full((N,), 37, dtype=torch.int64),
            all_greedy=False, any_top_k=False, any_top_p=False, any_min_p=False)
        toks, acc = verify_drafts(logits.expand(N, V).contiguous(), b, torch.full((N,), draft, dtype=torch.int64))
        assert bool(((toks == draft) == acc).all()), "accepted rows yield the draft, rejected ones never do"
        counts = torch.bincount(toks, minlength=V).double()
        expected = target.double() * N
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 20.5, f"draft {draft}: chi2 {chi2:.1f} (5 dof, p=0.001 -> 20.5), counts {counts.tolist()}"
        assert abs(float(acc.double().mean()) - float(target[draft])) < 0.02  # P(accept) = p(draft)


def test_greedy_verification_is_argmax() -> None:
    torch = pytest.importorskip("torch")
    from aiosched.executors.torch.sampler import SamplingBatch
    from aiosched.executors.torch.spec_decode import verify_drafts

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    b = SamplingBatch(torch.zeros(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), torch.zeros(3),
                      torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), True, False, False, False)
    toks, acc = verify_drafts(logits, b, torch.tensor([1, 2, -1]))
    assert toks.tolist() == [1, 0, 2] and acc.tolist() == [True, False, False]


# ---- engine identity: fake runner ----


def _fake_model_dir(tmp_path: Path, context: int) -> str:
    d = tmp_path / f"fake{context}"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"vocab_size": 48, "max_position_embeddings": 4096, "fake_context_tokens": context}))
    return str(d)


def _prompts(n: int) -> list[list[int]]:
    # repetitive prompts: the proposer finds matches from the start
    return [[(i * 5 + j % (3 + i % 4)) % 48 for j in range(6 + (i * 7) % 30)] for i in range(n)]


def _fixed_rows(eng) -> None:
    """The GPU's layout on the CPU: every speculative request computes 1 + k rows, drafts
    found or not (the CPU runner otherwise trims them to the drafts found)."""
    eng._executor.runner.trim_draft_rows = False


async def _run(make_engine, prompts, params, trim: bool = True, **kw) -> tuple[list[list[int]], dict]:
    async with make_engine(**kw) as eng:
        if not trim:
            _fixed_rows(eng)
        outs = await asyncio.gather(*[eng.generate(p, params[i % len(params)]) for i, p in enumerate(prompts)])
        stats = eng.stats()
        eng.scheduler.check_invariants()
    return [o.token_ids for o in outs], stats


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("context", [1, 0])
async def test_fake_greedy_identity_with_preemption_and_chunking(make_engine, tmp_path, async_scheduling, context) -> None:
    model = _fake_model_dir(tmp_path, context)
    ps = _prompts(40)
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, speculative=False)]
    kw = dict(runner="fake", model=model, async_scheduling=async_scheduling, num_kv_blocks=60, block_size=4, max_num_batched_tokens=24)
    base, _ = await _run(make_engine, ps, params, **kw)
    spec, st = await _run(make_engine, ps, params, speculative=SPEC, **kw)
    assert spec == base
    assert st["preemptions"] > 0, "the small pool must force preemption"
    assert st["spec_draft_tokens"] > 0
    if context:
        assert st["spec_accepted_tokens"] > 0.3 * st["spec_draft_tokens"], st
        assert st["spec_mean_accepted_len"] > 1.5, st


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_fake_spec_takes_fewer_steps(make_engine, tmp_path, async_scheduling) -> None:
    model = _fake_model_dir(tmp_path, 1)
    ps = _prompts(4)
    p = [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)]
    kw = dict(runner="fake", model=model, async_scheduling=async_scheduling)
    base, b = await _run(make_engine, ps, p, **kw)
    spec, s = await _run(make_engine, ps, p, speculative=SPEC, **kw)
    assert spec == base
    assert s["steps"] < 0.75 * b["steps"], (s["steps"], b["steps"])
    assert 0.0 < s["spec_acceptance_rate"] <= 1.0


async def test_fake_seeded_sampling_unchanged_for_a_point_mass_model(make_engine, tmp_path) -> None:
    # The fake model is deterministic also when sampling: verification must reproduce it.
    model = _fake_model_dir(tmp_path, 1)
    ps = _prompts(8)
    p = [SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True)]
    for mode in (False, True):
        kw = dict(runner="fake", model=model, async_scheduling=mode)
        base, _ = await _run(make_engine, ps, p, **kw)
        spec, _ = await _run(make_engine, ps, p, speculative=SPEC, **kw)
        assert spec == base


async def test_fake_multiproc_identity(make_engine, tmp_path) -> None:
    model = _fake_model_dir(tmp_path, 2)
    ps = _prompts(6)
    p = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)]
    base, _ = await _run(make_engine, ps, p, runner="fake", model=model)
    spec, st = await _run(make_engine, ps, p, runner="fake", model=model, executor="multiproc", speculative=SPEC)
    assert spec == base and st["spec_accepted_tokens"] > 0


# ---- engine identity: tiny random torch model ----


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    pytest.importorskip("torch")
    from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

    return str(write_random_checkpoint(tmp_path_factory.mktemp("spec_tiny"), arch="llama", seed=3))


def _torch_prompts(n: int) -> list[list[int]]:
    return [[(i * 11 + j % (2 + i % 5)) % 300 + 3 for j in range(5 + (i * 13) % 40)] for i in range(n)]


@pytest.mark.parametrize("trim", [True, False], ids=["trimmed", "fixed-rows"])
@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_torch_greedy_identity_with_preemption_and_chunking(make_engine, tiny_model, async_scheduling, trim) -> None:
    ps = _torch_prompts(16)
    params = [SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, speculative=False)]
    kw = dict(model=tiny_model, **DEV, async_scheduling=async_scheduling, num_kv_blocks=40, block_size=4, max_num_batched_tokens=32,
              cpu_threads=1)
    base, _ = await _run(make_engine, ps, params, **kw)
    spec, st = await _run(make_engine, ps, params, trim=trim, speculative=SPEC, **kw)
    assert spec == base
    assert st["preemptions"] > 0
    assert st["spec_accepted_tokens"] > 0, st


async def test_torch_seeded_sampling_with_spec_is_reproducible(make_engine, tiny_model) -> None:
    ps = _torch_prompts(6)
    p = [SamplingParams(max_tokens=24, temperature=0.9, top_k=50, seed=11, ignore_eos=True)]
    outs = []
    for mode, trim in ((False, True), (True, True), (True, False), (False, False)):
        o, st = await _run(make_engine, ps, p, trim=trim, model=tiny_model, **DEV, async_scheduling=mode, speculative=SPEC, cpu_threads=1)
        outs.append(o)
        assert st["spec_draft_tokens"] > 0
    # sync == async, and the same whether rows without a draft are laid out or not
    assert outs[0] == outs[1] == outs[2] == outs[3], "seeded speculative sampling: sync == async"


async def test_torch_multiproc_identity(make_engine, tiny_model) -> None:
    ps = _torch_prompts(4)
    p = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)]
    base, _ = await _run(make_engine, ps, p, model=tiny_model, **DEV, cpu_threads=1)
    spec, st = await _run(make_engine, ps, p, model=tiny_model, **DEV, executor="multiproc", speculative=SPEC, cpu_threads=1)
    assert spec == base and st["spec_draft_tokens"] > 0


async def test_torch_extras_requests_verified_without_drafts_others_keep_theirs(make_engine, tiny_model) -> None:
    """A request with a penalty or logprobs in the batch (issue 18: it used to turn drafting
    off for every step it was in): it runs as a one-token row, the plain greedy requests
    keep their drafts, and every output equals the request run alone without speculation."""
    ps = _torch_prompts(8)
    ps[6] = ps[6] * 3  # chunked over several steps (with prompt logprobs) while the others draft
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    # The extras requests run longer than the plain ones: every step has one of them.
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.5),
              SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2),
              plain, plain, plain, plain,
              SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=1),
              # seeded sampling with a penalty: sampled exactly as without speculation
              SamplingParams(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True, repetition_penalty=1.3)]
    kw = dict(model=tiny_model, **DEV, cpu_threads=1, max_num_batched_tokens=32)
    alone = []
    async with make_engine(**kw) as eng:
        for p, sp in zip(ps, params):
            alone.append(await eng.generate(p, sp))
    for mode in (False, True):
        async with make_engine(async_scheduling=mode, speculative=SPEC, **kw) as eng:
            if mode:
                _fixed_rows(eng)
            outs = await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(ps, params)])
            st = eng.stats()
            eng.scheduler.check_invariants()
        assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
        assert [t.logprob for t in outs[1].logprobs] == pytest.approx([t.logprob for t in alone[1].logprobs], abs=1e-4)
        got, want = outs[6].prompt_logprobs, alone[6].prompt_logprobs
        assert len(got) == len(want) == len(ps[6]) and [t and t.logprob for t in got] == pytest.approx([t and t.logprob for t in want], abs=1e-4)
        # Before: no drafts at all (every step had an extras request). Now 16-18 here.
        assert st["spec_draft_tokens"] >= 10, st
        assert st["spec_accepted_tokens"] > 0, st


async def test_torch_prompt_logprobs_chunks_beside_drafting_requests(make_engine, tiny_model) -> None:
    # Prompt logprobs of a chunked prompt computed in steps whose only samplers draft.
    ps = _torch_prompts(7)
    ps[6] = ps[6] * 4
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)] * 6 + [
        SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2)]
    kw = dict(model=tiny_model, **DEV, cpu_threads=1, max_num_batched_tokens=32)
    async with make_engine(**kw) as eng:
        want = await eng.generate(ps[6], params[6])
    async with make_engine(async_scheduling=True, speculative=SPEC, **kw) as eng:
        outs = await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(ps, params)])
        st = eng.stats()
    got = outs[6]
    assert got.token_ids == want.token_ids and len(got.prompt_logprobs) == len(ps[6])
    assert [t and t.logprob for t in got.prompt_logprobs] == pytest.approx([t and t.logprob for t in want.prompt_logprobs], abs=1e-4)
    assert st["spec_draft_tokens"] > 0, st


@given(hists=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=30), min_size=1, max_size=6),
       k=st.integers(1, 5), nmin=st.integers(1, 3), extra=st.integers(0, 2))
@settings(max_examples=150, deadline=None)
def test_batched_proposer_equals_the_reference(hists, k, nmin, extra) -> None:
    # Small alphabets: many matches, ties and overlaps. Padding past each length is noise
    # the proposer must not read.
    torch = pytest.importorskip("torch")
    from aiosched.executors.torch.spec_decode import propose_ngram_batch

    W = max(len(h) for h in hists) + 3
    hist = torch.tensor([h + [(7 * i + j) % 4 for j in range(W - len(h))] for i, h in enumerate(hists)])
    drafts, counts = propose_ngram_batch(hist, torch.tensor([len(h) for h in hists]), k, nmin, nmin + extra)
    for h, d, c in zip(hists, drafts.tolist(), counts.tolist()):
        want = propose_ngram(h, k, nmin, nmin + extra)
        assert d[:c] == want and c == len(want) and all(x == -1 for x in d[c:])


class _Toggle:
    """A speculation policy that turns drafting on and off every `every` step outputs (the
    auto policy's switches, mid-request and with steps of the other mode in flight)."""

    def __init__(self, every: int) -> None:
        self.every, self.seen, self.drafting, self.switches = every, 0, False, 0
        self.measuring = False  # (prompt work does not matter to it)

    def observe(self, tokens: int, seconds: float, prompt_work: bool = False, requests: int = 0) -> None:
        self.seen += 1
        if self.seen % self.every == 0:
            self.drafting, self.switches = not self.drafting, self.switches + 1

    def stats(self) -> dict:
        return {"spec_auto": "on" if self.drafting else "off"}


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("every", [3, 7])
async def test_torch_drafting_switched_on_and_off_mid_request_keeps_greedy_output(make_engine, tiny_model, async_scheduling, every) -> None:
    """SpecPolicy starts without drafts and switches while requests run: the greedy output
    equals the run without speculation whichever steps drafted."""
    ps = _torch_prompts(12)
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)]
    kw = dict(model=tiny_model, **DEV, async_scheduling=async_scheduling, max_num_batched_tokens=64, cpu_threads=1)
    base, _ = await _run(make_engine, ps, params, **kw)
    async with make_engine(speculative=dict(SPEC, auto=True), **kw) as eng:
        if every == 7:
            _fixed_rows(eng)
        eng.spec_policy = policy = _Toggle(every)
        eng.scheduler.drafting = False
        outs = await asyncio.gather(*[eng.generate(p, params[0]) for p in ps])
        st = eng.stats()
        eng.scheduler.check_invariants()
    assert [o.token_ids for o in outs] == base
    assert policy.switches >= 4 and st["spec_draft_tokens"] > 0, st


# ---- speculation one step ahead (issue 18): the launch never waits for an accepted count ----


def _relative_step(torch):
    """A packed step of 3 tokens of a plain request (row 0, positions 4..6) and 3 relative
    rows of a speculative one (row 1, whose device count is 9: positions 8, 9, 10)."""
    tokens = torch.arange(3 * 20, dtype=torch.int64).view(3, 20)  # row 2: the scratch row
    bt = torch.tensor([[3, 4, 5], [7, 8, 9], [0, 0, 0]])
    ntok = torch.tensor([7, 9, 1])
    T, R = 7, 3  # one padding token, one padding request slot
    rows = [0, 0, 0, 1, 1, 1, 2]
    pos = [4, 5, 6, -2, -3, -4, -1]
    o_rows, o_seq = 2 * T, 2 * T + R
    d = torch.tensor(rows + pos + [0, 1, 2] + [7, -3, 0] + [12345] * 4)
    return d, T, tokens, bt, ntok, R, o_rows, o_seq


def test_relative_rows_take_their_positions_from_the_device_count() -> None:
    """Speculative rows are laid out relative to the row's token count on the device
    (position -2 - j: query j at count - 1 + j; attention length -n: count - 1 + n), so
    a step is built without the previous step's accepted count on the host."""
    torch = pytest.importorskip("torch")
    from aiosched.executors.torch import fused_ops

    d, T, tokens, bt, ntok, R, o_rows, o_seq = _relative_step(torch)
    ids, p, slots = fused_ops.step_inputs_ref(d, T, tokens, bt, 4, ntok, R, o_rows, o_seq)
    assert p.tolist() == [4, 5, 6, 8, 9, 10, 0]
    assert ids.tolist() == [4, 5, 6, 28, 29, 30, 40]  # the padding token reads the scratch row
    assert slots.tolist() == [4 * 4 + 0, 4 * 4 + 1, 4 * 4 + 2, 9 * 4 + 0, 9 * 4 + 1, 9 * 4 + 2, -1]
    assert d[o_seq:o_seq + R].tolist() == [7, 11, 0]  # the relative length resolved in place
    plain = fused_ops.step_inputs_ref(d[:2 * T].clone(), T, tokens, bt, 4)  # without a count: unchanged behaviour
    assert plain[2].tolist()[:3] == slots.tolist()[:3] and plain[2].tolist()[3:] == [-1] * 4


def test_step_inputs_kernel_resolves_relative_rows_like_the_reference() -> None:
    """CUDA only (Triton): the fused step-inputs kernel equals the torch fallback on relative rows."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("the Triton step-inputs kernel needs a CUDA device")
    from aiosched.executors.torch import fused_ops

    for T, R in ((7, 3), (300, 257)):
        rows_n, row_len, page = 9, 400, 16
        g = torch.Generator().manual_seed(T)
        tokens = torch.randint(0, 50_000, (rows_n, row_len), generator=g)
        bt = torch.randint(0, 4_000, (rows_n, row_len // page + 1), generator=g)
        ntok = torch.randint(1, row_len - 8, (rows_n,), generator=g)
        rows = torch.randint(0, rows_n, (T,), generator=g)
        pos = torch.randint(0, row_len - 8, (T,), generator=g)
        pos[::3] = -2 - torch.randint(0, 5, (len(pos[::3]),), generator=g)  # relative
        pos[::7] = -1  # padding
        seq = torch.randint(0, row_len - 8, (R,), generator=g)
        seq[::2] = -torch.randint(1, 6, (len(seq[::2]),), generator=g)
        d = torch.cat([rows, pos, torch.randint(0, rows_n, (R,), generator=g), seq, torch.full((5,), 12345)])
        o_rows, o_seq = 2 * T, 2 * T + R
        want_d = d.clone()
        want = fused_ops.step_inputs_ref(want_d, T, tokens, bt, page, ntok, R, o_rows, o_seq)
        got_d = d.cuda()
        got = fused_ops.step_inputs(got_d, T, tokens.cuda(), bt.cuda(), page, ntok.cuda(), R, o_rows, o_seq)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b)
        assert torch.equal(got_d.cpu(), want_d)


def _spec_runner(tiny_model, **kw):
    from aiosched.config import EngineConfig
    from aiosched.executors.torch.runner import TorchModelRunner

    cfg = EngineConfig.load(dict(model=tiny_model, cpu_threads=1, **DEV, **kw))
    runner = TorchModelRunner(cfg)
    return cfg, runner, runner.load()


def _drive(cfg, runner, info, prompts, params, guard=None):
    """The engine loop, by hand and in a fixed order: with async scheduling step N + 1 is
    scheduled and launched before step N's output is read. Returns the outputs and, per
    step, (step id, the output of the step before it still unprocessed at its scheduling,
    [(req, num_tokens, draft slots)], the pending output)."""
    from collections import deque

    from aiosched.async_scheduler import AsyncScheduler
    from aiosched.request import Request
    from aiosched.scheduler import Scheduler

    sched = (AsyncScheduler if cfg.async_scheduling else Scheduler)(cfg, info.num_kv_blocks, info.max_model_len)
    reqs = [Request(f"r{i}", p, params, seed=i, eos_token_ids=[]) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add_request(r)
    in_flight, log = deque(), []
    depth = 2 if cfg.async_scheduling else 1
    while sched.has_unfinished() or in_flight:
        while len(in_flight) < depth:
            so = sched.schedule()
            if so.is_empty and not so.freed_req_ids:
                break
            with guard() if guard is not None else _nothing():
                pending = runner.execute(so)
            log.append((so.step_id, bool(in_flight), [(sr.req_id, sr.num_tokens, sr.num_draft_slots) for sr in so.scheduled], pending))
            in_flight.append((so, pending))
        so, pending = in_flight.popleft()
        sched.update_from_output(so, pending.result())
        sched.check_invariants()
    return [r.output_token_ids for r in reqs], log, sched


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("trim", [False, True], ids=["fixed-rows", "trimmed"])
def test_torch_async_speculative_steps_run_back_to_back_without_waiting(tiny_model, monkeypatch, trim) -> None:
    """Async scheduling: a speculating request is scheduled (with its draft slots) in
    consecutive steps, step N + 1 is built and launched before step N's output is
    processed, no launch reads a speculative step's emitted counts before that step's
    output was handed out (doing so while a step is being launched raises here), each verify step returns a pending output, and
    the greedy tokens equal those without speculation (sync, and this runner without drafts)."""
    from aiosched.executors.runner import ReadyOutput
    from aiosched.executors.torch import spec_decode

    ps = _torch_prompts(3)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    base_cfg, base_runner, base_info = _spec_runner(tiny_model, async_scheduling=False)
    want, _, _ = _drive(base_cfg, base_runner, base_info, ps, greedy)
    base_runner.shutdown()

    launching = [False]
    rows, count = spec_decode.SpecHost.rows, spec_decode.SpecHost.count

    def guarded_rows(self):
        assert not launching[0] or self.delivered, "a launch read a speculative step's emitted tokens before its output"
        return rows(self)

    def guarded_count(self, q):
        assert not launching[0] or self.delivered, "a launch waited for a speculative step's accepted count"
        return count(self, q)

    monkeypatch.setattr(spec_decode.SpecHost, "rows", guarded_rows)
    monkeypatch.setattr(spec_decode.SpecHost, "count", guarded_count)

    class guard:
        def __enter__(self):
            launching[0] = True

        def __exit__(self, *a):
            launching[0] = False
            return False

    cfg, runner, info = _spec_runner(tiny_model, async_scheduling=True, speculative=SPEC)
    runner.trim_draft_rows = trim
    got, log, sched = _drive(cfg, runner, info, ps, greedy, guard=guard)
    assert got == want
    assert runner.batch.host_waits == 0
    assert sched.stats.accepted_tokens > 0
    spec_steps = [(sid, prev, rows_, p) for sid, prev, rows_, p in log if any(d for _, _, d in rows_)]
    assert all(not isinstance(p, ReadyOutput) for *_, p in spec_steps), "verify steps return pending outputs"
    # r0 speculates in consecutive steps, each built while the step before it was in flight.
    r0 = [(sid, prev) for sid, prev, rows_, _ in log if any(r == "r0" and d for r, _, d in rows_)]
    runs = sum(1 for (a, _), (b, prev) in zip(r0, r0[1:]) if b == a + 1 and prev)
    assert runs >= 4, r0
    runner.shutdown()


async def test_torch_engine_async_schedules_speculative_step_before_the_previous_output(make_engine, tiny_model) -> None:
    """Through the engine loop (inproc executor, async): each speculative step of a
    request is scheduled while its previous speculative step's output is unprocessed, and
    the runner hands every verify step back as a pending output."""
    from aiosched.executors.runner import ReadyOutput

    events: list[tuple[str, int, bool]] = []
    async with make_engine(model=tiny_model, **DEV, cpu_threads=1, async_scheduling=True, speculative=SPEC) as eng:
        _fixed_rows(eng)
        sched, runner = eng.scheduler, eng._executor.runner
        schedule, update, execute = sched.schedule, sched.update_from_output, runner.execute

        def rec_schedule():
            so = schedule()
            events.append(("schedule", so.step_id, any(sr.num_draft_slots for sr in so.scheduled)))
            return so

        def rec_update(so, out):
            events.append(("update", so.step_id, False))
            return update(so, out)

        pendings = {}

        def rec_execute(so):
            p = execute(so)
            pendings[so.step_id] = p
            return p

        sched.schedule, sched.update_from_output, runner.execute = rec_schedule, rec_update, rec_execute
        out = await eng.generate(_torch_prompts(3)[2], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    spec = [sid for kind, sid, d in events if kind == "schedule" and d]
    assert len(out.token_ids) == 30 and len(spec) >= 5, events
    order = {(kind, sid): i for i, (kind, sid, _) in enumerate(events)}
    back_to_back = [s for s in spec if s - 1 in spec and order[("schedule", s)] < order[("update", s - 1)]]
    assert len(back_to_back) >= len(spec) - 2, events
    assert all(not isinstance(pendings[s], ReadyOutput) for s in spec)


async def test_cuda_speculative_steps_replay_the_mixed_graphs_and_launch_without_a_sync(make_engine, tiny_model) -> None:
    """CUDA only (AIOSCHED_TEST_DEVICE=cuda): speculative steps replay the mixed-step CUDA
    graphs (every input of the step is on the device), no CUDA call that synchronizes
    with the device runs while one is launched (torch's sync debug mode raises), the
    launch thread never waits for a count (host_waits), and the float32 greedy output
    equals the run without speculation."""
    torch = pytest.importorskip("torch")
    if DEV.get("device") != "cuda" or not torch.cuda.is_available():
        pytest.skip("needs AIOSCHED_TEST_DEVICE=cuda and a GPU")
    ps = _torch_prompts(6)
    p = [SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)]
    kw = dict(model=tiny_model, **DEV, async_scheduling=True)
    base, _ = await _run(make_engine, ps, p, **kw)
    async with make_engine(speculative=SPEC, **kw) as eng:
        runner = eng._executor.runner
        assert runner.fast is not None and runner.fast.mixed is not None, "the tiny model takes the CUDA fast path"
        execute = runner.execute
        launched = []

        def checked(so):
            if not any(sr.num_draft_slots for sr in so.scheduled):
                return execute(so)
            torch.cuda.set_sync_debug_mode("error")
            try:
                pending = execute(so)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            launched.append(pending)
            return pending

        runner.execute = checked
        outs = await asyncio.gather(*[eng.generate(x, p[0]) for x in ps])
        stats = dict(runner.fast.stats)
        waits = runner.batch.host_waits
    assert [o.token_ids for o in outs] == base
    assert launched and stats["spec_steps"] == len(launched) and waits == 0
    assert stats["mixed_graph_steps"] >= stats["spec_steps"], stats  # (prefill steps replay them too)
    # greedy steps on a mixed layout: propose and verify replay their own graphs too
    assert stats["spec_propose_graphs"] == stats["spec_verify_graphs"] == stats["spec_steps"], stats


async def test_cuda_captured_speculative_phases_keep_greedy_output_at_every_padded_size(make_engine, tiny_model) -> None:
    """CUDA only (AIOSCHED_TEST_DEVICE=cuda): with the propose and verify graphs captured,
    float32 greedy output with speculation equals the output without it for batches that
    pad to several mixed-step sizes (1 request to 12), async and sync, and each
    speculative step replays the three graphs (propose, forward, verify) under
    torch.cuda.set_sync_debug_mode("error")."""
    torch = pytest.importorskip("torch")
    if DEV.get("device") != "cuda" or not torch.cuda.is_available():
        pytest.skip("needs AIOSCHED_TEST_DEVICE=cuda and a GPU")
    p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for n, mode in ((1, True), (5, False), (12, True)):
        ps = _torch_prompts(n)
        kw = dict(model=tiny_model, **DEV, async_scheduling=mode)
        base, _ = await _run(make_engine, ps, [p], **kw)
        async with make_engine(speculative=SPEC, **kw) as eng:
            runner = eng._executor.runner
            assert runner.fast is not None and runner.fast.spec_graphs is not None
            execute = runner.execute

            def checked(so):
                torch.cuda.set_sync_debug_mode("error" if any(sr.num_draft_slots for sr in so.scheduled) else "default")
                try:
                    return execute(so)
                finally:
                    torch.cuda.set_sync_debug_mode("default")

            runner.execute = checked
            outs = await asyncio.gather(*[eng.generate(x, p) for x in ps])
            stats, st = dict(runner.fast.stats), eng.stats()
        assert [o.token_ids for o in outs] == base, n
        assert st["spec_accepted_tokens"] > 0 and stats["spec_verify_graphs"] == stats["spec_steps"] > 0, stats


def _staged_spec(torch, P: int, S: int, padded: bool):
    """A speculative section staged at P request slots and S logits rows (the real ones:
    3 requests, 9 logits rows, one of them an extras row), as the propose and verify phases read it."""
    import numpy as np

    from aiosched.executors.torch.input_batch import InputBatch, Layout, SpecRows

    batch = InputBatch(12, 40, 4, 32, torch.device("cpu"))
    batch.spec_k1 = 4
    hists = {2: [5, 6, 7, 8, 5, 6, 7], 0: [1, 2, 3, 1, 2, 3, 1, 2, 4, 9], 1: [9, 4, 9, 4, 9]}
    for row, h in hists.items():
        batch.tokens[row, :len(h)] = torch.tensor(h)
        batch.num_tokens_dev[row] = len(h) if row != 0 else 3  # row 0: a stale device count, set from the host
    # q0 (row 2): 3 drafts, 4 rows; q1 (row 0): a plain row; an extras row; q2 (row 1): 2 drafts, 3 rows
    v = SpecRows(rows=[2, 0, 1], ks=[3, 0, 2], setv=[-1, 10, -1], slot=[0, 1, 2, 3, 4, -1, 8, 9, 10])
    L = Layout(T=12, R=4, NT=0, S=S, block_q=1, decode=False, padded=padded, P=P)
    buf = np.zeros(L.end + 4, dtype=np.int64)
    batch._pack_spec(buf, L, v)
    return batch, torch.from_numpy(buf), L


def test_propose_and_verify_at_a_padded_shape_equal_the_exact_shape() -> None:
    """The fixed shapes a CUDA graph captures (P = S request slots of padding, the whole
    buffer row as history) give the exact layout's drafts, emitted tokens, histories and
    device counts; padding leaves the scratch row's count at 1."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from aiosched.executors.torch.spec_decode import SpecBuffers, greedy_accepts, propose_step, verify_step, window

    spec = SimpleNamespace(ngram_min=1, ngram_max=3)
    results = []
    for P, S, padded in ((3, 9, False), (12, 12, True)):
        batch, d, L = _staged_spec(torch, P, S, padded)
        bufs = SpecBuffers(batch.max_rows, batch.spec_k1, "cpu")
        rows, ks, setv, slot = batch.spec_views(d, L)
        W = batch.row_len if padded else window(12, batch.row_len)
        drafts = propose_step(batch, bufs, rows, ks, setv, W, spec).clone()
        # the target's argmax: q0 accepts its first 2 drafts, q2 rejects its first; padding rows: noise
        real = [drafts[0, 0], drafts[0, 1], 77, 78, 55, 66, 70, drafts[2, 1], 71]
        tok = torch.tensor([int(t) for t in real] + [(13 * i) % 9 for i in range(S - 9)])
        emitted = verify_step(batch, bufs, tok, greedy_accepts(bufs, tok, slot), rows, slot).clone()
        results.append((drafts[:3], emitted[:3], batch.tokens.clone(), batch.num_tokens_dev.clone()))
    (d0, e0, t0, n0), (d1, e1, t1, n1) = results
    assert d0.tolist() == [[8, 5, 6, -1], [-1, -1, -1, -1], [4, 9, -1, -1]]  # "5 6 7" -> 8 5 6; row 0 none (k 0); "9 4 9" -> 4 9
    assert e0.tolist() == [[8, 5, 77, -1, 3, 3], [55, -1, -1, -1, 1, 0], [70, -1, -1, -1, 1, 2]]
    assert n0[[2, 0, 1]].tolist() == [10, 11, 6] and n0[12] == n1[12] == 1  # + counts; the stale count was set first
    assert t0[2, 7:10].tolist() == [8, 5, 77] and t0[0, 10] == 55 and t0[1, 5] == 70
    assert torch.equal(d0, d1) and torch.equal(e0, e1) and torch.equal(n0, n1)
    assert torch.equal(t0[:12], t1[:12])  # (the scratch row holds what padding wrote)


@pytest.mark.parametrize("lookback", [2, 4, 20])
def test_the_proposer_reads_only_the_last_lookback_tokens(monkeypatch, lookback: int) -> None:
    """A captured propose phase reads the whole buffer row (max_model_len wide), so the
    proposer looks only at each request's last NGRAM_LOOKBACK tokens: the same drafts as
    the exact proposer over exactly those tokens (a request shorter than the lookback:
    the same drafts as over its whole history)."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from aiosched.executors.torch import spec_decode
    from aiosched.executors.torch.spec_decode import SpecBuffers, propose_ngram, propose_step

    monkeypatch.setattr(spec_decode, "NGRAM_LOOKBACK", lookback)
    spec = SimpleNamespace(ngram_min=1, ngram_max=3)
    batch, d, L = _staged_spec(torch, 12, 12, True)
    bufs = SpecBuffers(batch.max_rows, batch.spec_k1, "cpu")
    rows, ks, setv, _ = batch.spec_views(d, L)
    lengths = torch.where(setv >= 0, setv, batch.num_tokens_dev[rows])
    hists = [batch.tokens[r, :n].tolist() for r, n in zip(rows.tolist(), lengths.tolist())]
    assert lookback < batch.row_len  # the bounded path
    drafts = propose_step(batch, bufs, rows, ks, setv, batch.row_len, spec)
    for q in range(3):  # the real requests
        k = int(ks[q])
        want = propose_ngram(hists[q][-lookback:], k, spec.ngram_min, spec.ngram_max) if k else []
        assert [t for t in drafts[q].tolist() if t >= 0] == want[:k], (q, hists[q])
    if lookback == 20:  # longer than every request here
        assert drafts[0].tolist()[:3] == [8, 5, 6]  # "5 6 7" -> 8 5 6, as over the whole history
