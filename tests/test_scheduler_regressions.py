"""Deterministic regression tests for async scheduling: the classic failure modes of
one-step-ahead schedulers, each pinned to a small scenario (issue 12).

Each scenario runs on `sched_harness.Harness` (a synchronous copy of the engine loop
with the fake runner), which after every step checks the scheduler's invariants,
placeholder counts against the samples in flight, discarded tokens against its own
books, and every delivered token against the fake model run on that request alone.
The explicit asserts below pin the situation each test is about, so a test cannot
pass by no longer reaching it.
"""
from __future__ import annotations

import msgspec
import pytest

from aiosched.config import EngineConfig
from aiosched.request import RequestStatus
from aiosched.sampling_params import SamplingParams
from aiosched.executors.fake_runner import FakeModelRunner, penalize, penalty_candidates, reference_tokens
from sched_harness import Harness, HarnessError

GREEDY = dict(temperature=0.0)


def harness(**kw) -> Harness:
    cfg = dict(runner="fake", async_scheduling=True, block_size=2, num_kv_blocks=16, max_model_len=64, max_num_batched_tokens=64)
    cfg.update(kw)
    return Harness(EngineConfig(**cfg))


def step_until(h: Harness, cond, limit: int = 200) -> None:
    for _ in range(limit):
        if cond():
            return
        h.step()
    raise AssertionError("condition not reached")


def test_preempted_with_step_in_flight_gets_no_duplicate_token() -> None:
    # Two requests fill the 4-block pool; the first needs a third block while the
    # second's decode is in flight, so the second is preempted with a token in flight.
    h = harness(num_kv_blocks=4)
    a = h.add([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY))
    b = h.add([4, 5, 6], SamplingParams(max_tokens=4, **GREEDY))
    rb = h.tracked[b].req
    step_until(h, lambda: rb.status is RequestStatus.PREEMPTED)
    assert rb.num_output_placeholders == 1, "the scenario needs b's token in flight when it is preempted"
    known = list(rb.all_token_ids)
    h.step()  # b's in-flight token arrives while b waits
    assert rb.all_token_ids == known + [h.tracked[b].expected.tokens[len(known) - 3]]
    assert rb.num_output_placeholders == 0 and rb.status is RequestStatus.PREEMPTED
    resumed = []
    orig = h.sched.schedule

    def spy():
        so = orig()
        resumed.extend(n for n in so.new_requests if n.req_id == b)
        return so

    h.sched.schedule = spy
    h.drain()
    assert resumed and resumed[0].token_ids == rb.prompt_token_ids + rb.output_token_ids[: len(resumed[0].token_ids) - 3]
    assert rb.output_token_ids == reference_tokens([4, 5, 6], 4)
    assert h.tracked[a].received == reference_tokens([1, 2, 3], 5)
    assert h.sched.stats.discarded_tokens == 0  # a preempted request's in-flight token is kept, not dropped


def test_chunked_prefill_beside_decodes_keeps_placeholder_count() -> None:
    h = harness(max_num_batched_tokens=5, num_kv_blocks=32)
    dec = h.add([7, 8], SamplingParams(max_tokens=12, **GREEDY))
    h.step()
    h.step()
    long = h.add(list(range(100, 117)), SamplingParams(max_tokens=3, **GREEDY))  # 17 tokens: 4 chunks beside the decode
    r_long, r_dec = h.tracked[long].req, h.tracked[dec].req
    chunks = []
    while not r_long.output_token_ids:
        h.step()
        for f in h.in_flight:
            for s in f.so.scheduled:
                if s.req_id == long and s.num_computed_tokens < 17 and (f.so.step_id, s) not in chunks:
                    chunks.append((f.so.step_id, s))
        # A prompt chunk never adds a placeholder; the decode has one per sample in flight.
        in_flight = sum(f.sampled.count(dec) for f in h.in_flight)
        assert r_dec.num_output_placeholders == in_flight
        if r_long.num_computed_tokens < 17:
            assert r_long.num_output_placeholders == 0
    samples = [s.sample for _, s in chunks]
    assert len(chunks) >= 4 and samples[-1] and not any(samples[:-1]), "only the last prompt chunk samples"
    h.drain()
    assert h.tracked[long].received == reference_tokens(list(range(100, 117)), 3)


def test_min_tokens_and_stop_tokens_honoured_in_async_mode() -> None:
    prompt = [9, 9, 9]
    ref = reference_tokens(prompt, 20)
    h = harness()
    # A stop token the model would say at index 1 must not stop before min_tokens=4.
    early = ref[1]
    masked_ref = reference_tokens(prompt, 20, min_tokens=4, masked={early})
    r1 = h.add(prompt, SamplingParams(max_tokens=20, min_tokens=4, stop_token_ids=[early], **GREEDY))
    # A stop token at index 5 (past min_tokens=2) stops there, stop_reason is the token.
    late = ref[5]
    assert late not in ref[:5]
    r2 = h.add(prompt, SamplingParams(max_tokens=20, min_tokens=2, stop_token_ids=[late], **GREEDY))
    # EOS: honoured after min_tokens, ignored with ignore_eos.
    r3 = h.add(prompt, SamplingParams(max_tokens=20, **GREEDY), eos=[ref[3]])
    r4 = h.add(prompt, SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY), eos=[ref[3]])
    h.drain()
    t1 = h.tracked[r1]
    assert early not in t1.received[:4] and t1.received[:4] == masked_ref[:4]
    assert t1.req.finish_reason == t1.expected.finish_reason
    t2 = h.tracked[r2]
    assert (t2.received, t2.req.finish_reason, t2.req.stop_reason) == (ref[:6], "stop", late)
    t3 = h.tracked[r3]
    assert (t3.received, t3.req.finish_reason, t3.req.stop_reason) == (ref[:4], "stop", None)
    t4 = h.tracked[r4]
    assert (t4.received, t4.req.finish_reason) == (ref, "length")
    # Each stop arrived while the request's next decode was already in flight: that
    # sample is dropped, once per stopped request.
    assert h.sched.stats.discarded_tokens == h.expected_discards >= 2


def test_stop_with_next_step_in_flight_discards_its_token_once() -> None:
    prompt = [3, 1, 4]
    ref = reference_tokens(prompt, 10)
    h = harness()
    rid = h.add(prompt, SamplingParams(max_tokens=10, stop_token_ids=[ref[2]], **GREEDY))
    req = h.tracked[rid].req
    step_until(h, lambda: req.is_finished)
    assert req.output_token_ids == ref[:3]
    # The decode after the stop token was scheduled before the stop was seen.
    assert sum(f.sampled.count(rid) for f in h.in_flight) == 1
    h.drain()
    assert h.sched.stats.discarded_tokens == 1
    assert not h.runner.reqs  # the worker was told to forget it


def test_frees_while_a_step_is_in_flight_do_not_livelock_preemption() -> None:
    # The pool is exactly full. Aborting one request while its step is in flight must
    # hand its blocks to the other at once (steps run in order), with no preemption and
    # no step where nothing can run.
    h = harness(num_kv_blocks=6)
    a = h.add([1, 2, 3, 4, 5], SamplingParams(max_tokens=7, **GREEDY))
    b = h.add([6, 7, 8, 9, 10], SamplingParams(max_tokens=7, **GREEDY))
    ra, rb = h.tracked[a].req, h.tracked[b].req
    step_until(h, lambda: h.sched.kv.num_free_blocks == 0)
    assert ra.num_output_placeholders and rb.num_output_placeholders
    preemptions = h.sched.stats.preemptions
    h.abort(b)
    assert h.sched.kv.num_free_blocks == 3  # freed now, not when its step completes
    for _ in range(30):
        h.step()
        if ra.is_finished:
            break
    assert ra.is_finished and h.tracked[a].received == reference_tokens([1, 2, 3, 4, 5], 7)
    assert h.sched.stats.preemptions == preemptions
    h.drain()


def test_preemption_storm_makes_progress() -> None:
    # Many requests, a pool that holds about one at its longest: the scheduler keeps
    # preempting, yet every step some request advances and all finish exactly.
    h = harness(num_kv_blocks=12, max_model_len=24, max_num_batched_tokens=7)
    for i in range(12):
        h.add([i, i + 1, i + 2, i + 3, i + 4][: 1 + i % 5], SamplingParams(max_tokens=18, **GREEDY))
    h.drain()
    assert h.sched.stats.preemptions > 5
    assert h.counters["preempted_with_token_in_flight"] > 0
    assert all(t.done == "length" for t in h.tracked.values())


def test_abort_preempted_request_with_token_in_flight() -> None:
    h = harness(num_kv_blocks=4)
    h.add([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY))
    b = h.add([4, 5, 6], SamplingParams(max_tokens=4, **GREEDY))
    rb = h.tracked[b].req
    step_until(h, lambda: rb.status is RequestStatus.PREEMPTED)
    assert rb.num_output_placeholders == 1
    h.abort(b)
    assert rb not in h.sched.waiting and b not in h.sched.requests
    h.drain()
    assert h.sched.stats.discarded_tokens == 1  # its in-flight token, exactly once


def test_sync_and_async_schedulers_agree() -> None:
    outs = {}
    for mode in (False, True):
        h = harness(async_scheduling=mode, num_kv_blocks=10, max_model_len=32, max_num_batched_tokens=6)
        ids = [h.add([(i * 7 + j) % 50 for j in range(1 + (i * 3) % 11)], SamplingParams(max_tokens=9, temperature=1.0, seed=i), seed=i)
               for i in range(8)]
        h.drain()
        outs[mode] = [h.tracked[r].received for r in ids]
        assert h.sched.stats.preemptions > 0
    assert outs[False] == outs[True]


def test_deeper_pipeline_holds_resumption_until_the_token_arrives() -> None:
    # With three steps in flight the scheduler is asked again before a preempted
    # request's in-flight token is back; resuming it then would send the worker a
    # history without that token (and never sample it). AsyncScheduler._can_admit
    # holds it until the token arrives.
    h = Harness(EngineConfig(runner="fake", block_size=2, num_kv_blocks=4, max_model_len=64, max_num_batched_tokens=64), depth=3)
    prompts, max_tokens = [[31, 42, 25, 14], [32], [25]], [2, 5, 2]
    ids = [h.add(p, SamplingParams(max_tokens=m, **GREEDY)) for p, m in zip(prompts, max_tokens)]
    h.drain()
    assert h.counters["resume_waits_for_token_in_flight"] > 0
    for rid, p, m in zip(ids, prompts, max_tokens):
        assert h.tracked[rid].received == reference_tokens(p, m)


def test_preempted_request_resumes_before_later_arrivals() -> None:
    h = harness(num_kv_blocks=4, max_num_seqs=2)
    h.add([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY))
    b = h.add([4, 5, 6], SamplingParams(max_tokens=4, **GREEDY))
    late = h.add([7, 8, 9], SamplingParams(max_tokens=2, **GREEDY))  # waits: max_num_seqs=2
    rb, rl = h.tracked[b].req, h.tracked[late].req
    step_until(h, lambda: rb.status is RequestStatus.PREEMPTED)
    assert list(h.sched.waiting) == [rb, rl]  # back at the front of the queue
    step_until(h, lambda: rb.status is RequestStatus.RUNNING or rl.status is not RequestStatus.WAITING)
    assert rb.status is RequestStatus.RUNNING and rl.status is RequestStatus.WAITING
    h.drain()


def test_decoded_blocks_become_prefix_cache_hits_in_async_mode() -> None:
    # Decode positions are scheduled before their tokens are known; their blocks must
    # still be registered once the tokens arrive, so a follow-up turn hits them.
    h = harness(num_kv_blocks=32)
    prompt = [11, 12, 13]
    a = h.add(prompt, SamplingParams(max_tokens=10, **GREEDY))
    h.drain()
    history = prompt + h.tracked[a].received  # 13 tokens: 6 full blocks
    b = h.add(history + [99], SamplingParams(max_tokens=2, **GREEDY))
    hits_before = h.sched.kv.stats.hits
    h.step()
    assert h.sched.kv.stats.hits - hits_before == 12, "every full block of prompt + decoded tokens is a hit"
    h.drain()
    assert h.tracked[b].received == reference_tokens(history + [99], 2)


async def test_fake_runner_without_a_model_gets_no_tokenizer(make_engine) -> None:
    # Since the embedded default model shipped, an engine with runner="fake" and no
    # model loaded the default model's tokenizer: its EOS id ended fake-model outputs
    # early and text prompts were tokenized for a model the runner does not run.
    async with make_engine(runner="fake", num_kv_blocks=64, block_size=4) as eng:
        assert eng.tokenizer is None
        out = await eng.generate([3, 1, 4, 1, 5], SamplingParams(max_tokens=64, **GREEDY))
    assert out.token_ids == reference_tokens([3, 1, 4, 1, 5], 64) and out.finish_reason == "length"


# ---- penalties: the fake model honours them over the worker's history ----
# The classic failure: penalties (and anything else that reads the history) silently
# stop working because the worker's history lags one step behind the tokens (step
# N+1 is built before step N's token reaches the scheduler). These tests show the
# fake model's penalties are not a no-op and that the `reference_tokens` oracle
# (hence every harness test and the state machines) catches a lagging or mis-split
# history.

PENALTIES = [dict(presence_penalty=-1.0), dict(frequency_penalty=-0.8), dict(repetition_penalty=0.6),
             dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3)]


class LaggingPenaltyRunner(FakeModelRunner):
    """A worker whose penalties count a history one step behind: the token sampled by
    the previous step is missing (the model itself still sees every token)."""

    def _penalty_history(self, st, n):
        return st.tokens[: n - 1] if n > st.prompt_len else st.tokens[:n]


class ResumedAsPromptRunner(FakeModelRunner):
    """A worker that takes a resumed request's whole history as its prompt, so the
    presence / frequency penalties forget the outputs generated before preemption."""

    def execute(self, so):
        news = [msgspec.structs.replace(n, prompt_len=len(n.token_ids)) for n in so.new_requests]
        return super().execute(msgspec.structs.replace(so, new_requests=news))  # a copy: `so` stays as submitted


def test_fake_penalties_follow_their_definitions() -> None:
    cands = [(5, 1.0), (7, 0.8), (9, -0.3)]
    prompt, out = [7, 9], [5, 5]

    def best(history, prompt_len=2, **kw):
        return penalize(cands, history, prompt_len, SamplingParams(**kw))

    assert best(prompt + out) == 5  # no penalty: the best raw score
    # presence: once per token in the outputs (5: 1.0 - 0.3 = 0.7 < 0.8)
    assert best(prompt + out, presence_penalty=0.3) == 7 and best(prompt + out, presence_penalty=0.1) == 5
    # frequency: per occurrence in the outputs (5 twice: 1.0 - 2 x 0.15 = 0.7; once it would be 0.85)
    assert best(prompt + out, frequency_penalty=0.15) == 7 and best(prompt + [5], frequency_penalty=0.15) == 5
    # presence and frequency count outputs only: 5 in the prompt is not penalized
    assert best([5, 7, 9], prompt_len=3, presence_penalty=0.3, frequency_penalty=0.3) == 5
    # repetition: over prompt and outputs, positive scores divided (5: 1 / 1.3 = 0.77 < 0.8; 7 not seen)
    assert best([5], prompt_len=1, repetition_penalty=1.3) == 7 and best([9], prompt_len=1, repetition_penalty=1.3) == 5
    # ... negative scores multiplied
    neg = [(1, -0.2), (2, -0.3)]
    assert penalize(neg, [2], 1, SamplingParams(repetition_penalty=0.5)) == 2  # -0.15 > -0.2
    assert penalize(neg, [1], 1, SamplingParams(repetition_penalty=2.0)) == 2  # -0.4 < -0.3
    # negative presence / frequency favour tokens already generated
    assert best([9, 9], prompt_len=1, presence_penalty=-1.5) == 9 and best([9, 9], prompt_len=1, frequency_penalty=-1.5) == 9


def test_fake_penalties_change_tokens_and_neutral_ones_do_not() -> None:
    prompt = [1, 2, 3]
    plain = reference_tokens(prompt, 16)
    # The fake model's tokens without penalties are pinned (many tests depend on them).
    assert plain[:4] == [479, 317, 98, 466]
    assert reference_tokens(prompt, 16, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0) == plain
    for pen in PENALTIES[:3]:
        assert reference_tokens(prompt, 16, **pen) != plain, pen
        assert reference_tokens(prompt, 16, seed=7, greedy=False, **pen) != reference_tokens(prompt, 16, seed=7, greedy=False), pen
    # Penalties against repetition bite once the model repeats itself (a small vocabulary).
    for pen in (dict(presence_penalty=0.5), dict(frequency_penalty=0.5), dict(repetition_penalty=1.3)):
        assert reference_tokens(prompt, 24, vocab_size=32, **pen) != reference_tokens(prompt, 24, vocab_size=32), pen


def test_one_step_stale_penalty_history_changes_the_token() -> None:
    """The oracle can see a lag: along the fake model's own output, counting the
    penalties over the history without its last token picks another token at some step.
    (Penalties against repetition can only notice when the hash model repeats itself, so
    those cases use a small vocabulary, as a quarter of the state machine's examples do.)"""
    from aiosched.executors.fake_runner import _MOD

    prompt = [1, 2, 3]
    for vocab, pen in [(512, p) for p in PENALTIES[:3]] + [(32, dict(presence_penalty=0.5)), (32, dict(frequency_penalty=0.5)),
                                                     (32, dict(repetition_penalty=1.8))]:
        sp = SamplingParams(**pen)
        hist = prompt + reference_tokens(prompt, 24, vocab_size=vocab, **pen)
        stale_differs = 0
        for n in range(len(prompt) + 1, len(hist)):
            h = 0
            for t in hist[:n]:
                h = (h * 1_000_003 + t + 1) % _MOD
            cands = penalty_candidates(h, hist[:n], vocab)
            assert penalize(cands, hist[:n], len(prompt), sp) == hist[n]  # the fresh history gives the model's token
            stale_differs += penalize(cands, hist[: n - 1], len(prompt), sp) != hist[n]
        assert stale_differs > 0, (vocab, pen)


def test_worker_penalty_history_lagging_a_step_is_caught() -> None:
    def run(runner_cls) -> Harness:
        h = Harness(EngineConfig(runner="fake", async_scheduling=True, block_size=2, num_kv_blocks=64, max_model_len=64,
                                 max_num_batched_tokens=64), runner_cls=runner_cls, vocab_size=32)
        for i, pen in enumerate(PENALTIES):
            h.add([1, 2, 3 + i], SamplingParams(max_tokens=16, **pen, **GREEDY))
            h.add([4 + i, 5], SamplingParams(max_tokens=16, temperature=1.0, seed=i, **pen), seed=i)
        h.drain()
        return h

    h = run(FakeModelRunner)  # the worker's real history: every token equals the request alone
    assert all(t.done == "length" for t in h.tracked.values())
    with pytest.raises(HarnessError, match="the model alone gives"):
        run(LaggingPenaltyRunner)


def test_penalized_request_resumed_after_preemption_keeps_its_history_split() -> None:
    def run(runner_cls) -> tuple[Harness, str, list]:
        h = Harness(EngineConfig(runner="fake", async_scheduling=True, block_size=2, num_kv_blocks=4, max_model_len=64,
                                 max_num_batched_tokens=64), runner_cls=runner_cls)
        h.add([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY))
        b = h.add([4, 5, 6], SamplingParams(max_tokens=4, presence_penalty=-1.0, **GREEDY))
        resumed = []
        orig = h.sched.schedule

        def spy():
            so = orig()
            resumed.extend(n for n in so.new_requests if n.req_id == b and n.prompt_len < len(n.token_ids))
            return so

        h.sched.schedule = spy
        h.drain()
        return h, b, resumed

    h, b, resumed = run(FakeModelRunner)
    assert resumed, "the scenario needs the penalized request resumed with outputs"
    assert resumed[0].prompt_len == 3 and resumed[0].token_ids[:3] == [4, 5, 6]
    got = h.tracked[b].received
    assert got == reference_tokens([4, 5, 6], 4, presence_penalty=-1.0) != reference_tokens([4, 5, 6], 4)
    with pytest.raises(HarnessError, match="the model alone gives"):
        run(ResumedAsPromptRunner)
