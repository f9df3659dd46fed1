"""The speculative-decoding policy keeps drafting only while it is measurably faster (issue 18).

Driven with synthetic step outputs (tokens, seconds): no clock, no race. The fake steps
are perfectly steady, which would end every window after `min_window` outputs: tests of
other rules set `steady=0.0` (windows of exactly `window` outputs)."""
from __future__ import annotations

import asyncio
import json

import pytest

from aiosched.sampling_params import SamplingParams
from aiosched.spec_policy import Estimate, SpecPolicy, bucket


def feed(p: SpecPolicy, steps: int, rate_with: float, rate_without: float, tokens: int = 64) -> list[bool]:
    """`steps` outputs at the given tokens/s for the mode the policy is in; the modes seen."""
    modes = []
    for _ in range(steps):
        modes.append(p.drafting)
        p.observe(tokens, tokens / (rate_with if p.drafting else rate_without))
    return modes


def test_slower_drafting_is_switched_off_after_one_round() -> None:
    p = SpecPolicy(steady=0.0, window=10, exploit=100, skip=2, cut=1.5)
    modes = feed(p, 24, rate_with=800.0, rate_without=1000.0)
    assert modes[:12] == [False] * 12 and modes[12:] == [True] * 12  # measured off, then on (a whole window)
    assert not p.drafting and p.stats()["spec_auto"] == "off"
    assert round(p.rates[True]) == 800 and round(p.rates[False]) == 1000


def test_a_clearly_losing_drafting_window_ends_early() -> None:
    """Verify steps that cost several plain ones: drafting stops after `early` counted outputs,
    not a whole window (short runs would pay more for measuring than drafting could win)."""
    p = SpecPolicy(steady=0.0, window=10, exploit=100, skip=2, early=4, cut=1.5)
    modes = feed(p, 24, rate_with=600.0, rate_without=1000.0)
    assert modes[:12] == [False] * 12 and modes[12:18] == [True] * 6 and modes[18:] == [False] * 6
    assert not p.drafting and p.rounds == 1
    assert round(p.rates[True]) == 600 and round(p.rates[False]) == 1000


def test_faster_drafting_is_kept() -> None:
    p = SpecPolicy(steady=0.0, window=10, exploit=100, skip=2)
    feed(p, 24, rate_with=1500.0, rate_without=1000.0)
    assert p.drafting and p.stats()["spec_auto"] == "on"


def test_a_gain_below_the_margin_is_not_worth_drafting() -> None:
    p = SpecPolicy(steady=0.0, window=10, exploit=100, skip=2, min_gain=1.05)
    feed(p, 24, rate_with=1020.0, rate_without=1000.0)
    assert not p.drafting


def test_outputs_just_after_a_switch_are_not_counted() -> None:
    """The first `skip` outputs after a switch belong to steps of the other mode."""
    p = SpecPolicy(steady=0.0, window=4, exploit=100, skip=2)
    for _ in range(6):  # measure-off: 2 skipped, 4 counted
        p.observe(10, 2.0)
    assert p.drafting
    p.observe(10, 1000.0)  # slow stragglers from the steps without drafts: skipped
    p.observe(10, 1000.0)
    for _ in range(4):
        p.observe(10, 1.0)
    assert p.rates == {True: 10.0, False: 5.0} and p.drafting


def test_measures_again_and_follows_a_change_in_the_workload() -> None:
    p = SpecPolicy(steady=0.0, window=10, exploit=50, skip=2)
    feed(p, 24, rate_with=2000.0, rate_without=1000.0)
    assert p.drafting
    modes = feed(p, 50 + 12 + 6, rate_with=500.0, rate_without=1000.0)  # acceptance fell: drafting now loses
    assert modes[:50] == [True] * 50  # exploiting the earlier answer
    assert not p.drafting and p.rounds == 2


def test_measuring_backs_off_while_the_answer_holds() -> None:
    """The losing mode's share shrinks: each confirming round doubles the exploit stretch."""
    p = SpecPolicy(steady=0.0, window=10, exploit=100, max_exploit=400, skip=2)
    # A round: 12 outputs without drafts, then drafting cut after 2 skipped + 4 counted.
    modes = feed(p, 18 + 100 + 18 + 200 + 18 + 400 + 18 + 400 + 18, rate_with=500.0, rate_without=1000.0)
    assert p.rounds == 5 and not p.drafting
    assert sum(modes) == 5 * 6  # drafting only while measuring: 6 outputs a round
    assert p.switches == 2 * 5


# ---- with the replayed acceptance (Estimate) and a learned verify cost ----


class Replayed:
    """The engine's estimate, as a test sets it: E tokens per verify request-step, at a batch size."""

    def __init__(self, e: float, batch: int = 16, steps: int = 400) -> None:
        self.e, self.batch, self.steps, self.calls = e, batch, steps, 0

    def __call__(self) -> Estimate:
        self.calls += 1
        return Estimate(batch=self.batch, steps=self.steps, tokens=round(self.e * self.steps))


def decode(p: SpecPolicy, outputs: int, verify_cost: float, e: float, batch: int = 16, plain_s: float = 0.016) -> list[bool]:
    """`outputs` step outputs of `batch` requests: a plain step yields a token per request
    in `plain_s`, a verify step `e` per request in `verify_cost` plain steps; the modes seen."""
    modes = []
    for _ in range(outputs):
        modes.append(p.drafting)
        if p.drafting:
            p.observe(round(e * batch), plain_s * verify_cost, requests=batch)
        else:
            p.observe(batch, plain_s, requests=batch)
    return modes


def test_a_low_estimate_decides_off_without_a_drafting_window() -> None:
    """E = 1.05 (drafts hardly ever accepted): no verify step is cheap enough for it, so the
    first round ends at the end of the window without drafts, and drafting never starts.
    Such a round cost nothing to decide: the next comes after `recheck` outputs, doubled
    while the answer holds, as for measured rounds."""
    est = Replayed(1.05)
    p = SpecPolicy(steady=0.0, window=10, exploit=100, recheck=30, max_exploit=200, skip=2, estimate=est)
    modes = decode(p, 12 + 30 + 60 + 120 + 200, verify_cost=3.5, e=1.05)
    assert not any(modes) and p.switches == 0
    assert p.rounds == 5 and p.rounds_estimated == 5 and p.rounds_measured == 0
    assert est.calls == p.rounds  # once per round, never per step
    assert p._exploit_len == 200
    s = p.stats()
    assert s["spec_auto"] == "off" and s["spec_auto_estimate"] == pytest.approx(1.05) and s["spec_auto_rounds_estimated"] == 5


def test_acceptance_that_rises_after_an_early_off_is_found_at_the_recheck() -> None:
    """A model that falls into loops later than the first decision: off by the floor at
    first, E above it at the recheck, so that round is measured and drafting is kept."""
    est = Replayed(1.05)
    p = SpecPolicy(steady=0.0, window=10, exploit=100, recheck=30, skip=2, estimate=est)
    modes = decode(p, 12 + 29, verify_cost=4 / 3, e=1.05)
    assert not any(modes) and p.rounds_estimated == 1
    est.e = 2.0
    modes = decode(p, 1 + 12 + 12, verify_cost=4 / 3, e=2.0)
    assert modes == [False] * 13 + [True] * 12 and p.drafting and p.rounds_measured == 1


def test_too_little_history_measures_as_without_an_estimate() -> None:
    """Fewer replayed steps than `min_steps`: the estimate says nothing, the round is measured."""
    p = SpecPolicy(steady=0.0, window=10, exploit=100, skip=2, estimate=Replayed(1.05, steps=15))
    modes = decode(p, 24, verify_cost=3.5, e=1.05)
    assert modes[:12] == [False] * 12 and modes[12:18] == [True] * 6  # measured, cut early
    assert p.rounds_measured == 1 and p.rounds_estimated == 0 and p.stats()["spec_auto_estimate"] == 0.0


def test_a_measured_round_learns_the_verify_cost_and_later_rounds_decide_from_it() -> None:
    """Round 1 measures q = 1.5 with E = 2: r = 2 / 1.5 = 1.33 plain steps per verify step at
    batch 16. Round 2 starts with r known: E / r decides it, with no window in either mode."""
    est = Replayed(2.0)
    p = SpecPolicy(steady=0.0, window=10, exploit=100, recheck=100, skip=2, estimate=est)
    modes = decode(p, 24, verify_cost=4 / 3, e=2.0)
    assert modes[:12] == [False] * 12 and p.drafting and p.rounds_measured == 1
    assert p.costs[16].ratio == pytest.approx(4 / 3)
    assert p.stats()["spec_auto_verify_cost"] == pytest.approx(4 / 3)
    modes = decode(p, 100, verify_cost=4 / 3, e=2.0)
    assert all(modes) and p.rounds == 2 and p.rounds_estimated == 1  # round 2: on, without switching off to measure
    # Acceptance falls to E = 1.35: 1.35 / 1.33 is not worth it. Decided at round 3's start.
    est.e = 1.35
    modes = decode(p, 250, verify_cost=4 / 3, e=1.35)
    assert modes[:200] == [True] * 200 and not any(modes[200:]) and p.rounds_estimated == 2


def test_after_a_measured_round_the_next_comes_soon_and_is_decided_from_the_estimate() -> None:
    """Acceptance that rises within an answer (code: copying starts some tokens in): the
    drafting window measured a loss at E = 1.2, so round 1 ends off; r is learned, so round 2
    comes `recheck` outputs later (not `exploit`) and, E having risen to 1.7 (within `drift`
    of the E r was measured at), drafts at once: 1.7 / r = 1.28."""
    est = Replayed(1.2)
    p = SpecPolicy(steady=0.0, window=10, exploit=400, recheck=30, skip=2, estimate=est)
    modes = decode(p, 24, verify_cost=4 / 3, e=1.2)
    assert modes[:12] == [False] * 12 and not p.drafting and p.rounds_measured == 1
    est.e = 1.7
    modes = decode(p, 31, verify_cost=4 / 3, e=1.7)
    assert modes[:30] == [False] * 30 and modes[30] and p.rounds_estimated == 1


def test_the_verify_cost_is_measured_again_every_fourth_round() -> None:
    """r drifts (context length, the batch's mix): rounds 1 and 5 at a bucket measure, 2-4
    decide from the estimate. Here verify steps got dearer after round 1: rounds 2-4 still
    draft on the old r, round 5 measures r = 3.5 and switches drafting off."""
    p = SpecPolicy(steady=0.0, window=10, exploit=100, recheck=100, max_exploit=100, skip=2, estimate=Replayed(2.0))
    decode(p, 24, verify_cost=4 / 3, e=2.0)
    modes = decode(p, 3 * 100, verify_cost=3.5, e=2.0)
    assert all(modes) and p.rounds == 4 and p.rounds_estimated == 3
    modes = decode(p, 100 + 12 + 6, verify_cost=3.5, e=2.0)
    assert modes[:100] == [True] * 100 and modes[100:112] == [False] * 12 and modes[112:] == [True] * 6
    assert p.rounds == 5 and p.rounds_measured == 2 and not p.drafting
    assert p.costs[16].ratio == pytest.approx(3.5)


def test_an_estimate_far_from_the_one_r_was_measured_at_measures_again() -> None:
    est = Replayed(2.0)
    p = SpecPolicy(steady=0.0, window=10, exploit=100, recheck=100, skip=2, drift=1.5, estimate=est)
    decode(p, 24, verify_cost=4 / 3, e=2.0)
    est.e = 3.5  # more than 1.5x the E of the measured round
    modes = decode(p, 100 + 12 + 12, verify_cost=4 / 3, e=3.5)
    assert modes[100:112] == [False] * 12 and modes[112:] == [True] * 12  # both windows again
    assert p.rounds_measured == 2 and p.rounds_estimated == 0 and p.costs[16].at == pytest.approx(3.5)


def test_the_verify_cost_is_kept_per_batch_size_bucket() -> None:
    """r measured at 16 requests says nothing about 4 (a verify step's cost relative to a
    plain one depends on the batch): at 4 the round is measured."""
    est = Replayed(2.0, batch=16)
    p = SpecPolicy(steady=0.0, window=10, exploit=100, recheck=100, skip=2, estimate=est)
    decode(p, 24, verify_cost=4 / 3, e=2.0)
    est.batch = 5  # bucket 4
    modes = decode(p, 100 + 12 + 12, verify_cost=4 / 3, e=2.0, batch=5)
    assert modes[100:112] == [False] * 12 and p.rounds_measured == 2
    assert set(p.costs) == {16, 4} and bucket(16) == 16 and bucket(31) == 16 and bucket(5) == 4


# ---- through the engine: fake runner whose drafts are accepted, a clock the test controls ----


def _repetitive_model(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 48, "max_position_embeddings": 4096, "fake_context_tokens": 1}))
    return str(tmp_path)


class StepClock:
    """Wall time as the policy sees it: each step output costs `with_drafts` seconds when the
    scheduler drafted for it, `without` otherwise (sync scheduling: one step at a time)."""

    def __init__(self, eng, with_drafts: float, without: float) -> None:
        self.eng, self.costs, self.now = eng, {True: with_drafts, False: without}, 0.0

    def __call__(self) -> float:
        self.now += self.costs[self.eng.scheduler.drafting]
        return self.now


@pytest.mark.parametrize("draft_cost, expect", [(4.0, "off"), (1.0, "on")])
async def test_engine_stops_drafting_when_it_does_not_pay(make_engine, tmp_path, draft_cost, expect) -> None:
    """Drafts accepted at ~2 tokens per step: with a verify step 4x a plain step drafting
    loses and is switched off; at the same cost it wins and stays on. Greedy output is the
    same as without speculation either way."""
    model = _repetitive_model(tmp_path)
    prompts = [[(i * 5 + j % (3 + i % 4)) % 48 for j in range(12)] for i in range(6)]
    greedy = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    kw = dict(runner="fake", model=model, async_scheduling=False)
    async with make_engine(**kw) as eng:
        want = [o.token_ids for o in await asyncio.gather(*[eng.generate(p, greedy) for p in prompts])]
    async with make_engine(**kw, speculative={"num_tokens": 3}) as eng:
        eng.spec_policy = SpecPolicy(steady=0.0, window=6, exploit=1000)
        eng._clock = StepClock(eng, with_drafts=draft_cost, without=1.0)
        got = [o.token_ids for o in await asyncio.gather(*[eng.generate(p, greedy) for p in prompts])]
        stats = eng.stats()
    assert got == want
    assert stats["spec_auto"] == expect and stats["spec_auto_rounds"] == 1, stats
    assert stats["spec_draft_tokens"] > 0  # it drafted while measuring
    measuring_drafts = (eng.spec_policy.skip + eng.spec_policy.window) * len(prompts) * 3
    if expect == "off":  # and never after
        assert stats["spec_draft_tokens"] <= measuring_drafts, stats
    else:
        assert stats["spec_draft_tokens"] > 2 * measuring_drafts, stats


@pytest.mark.parametrize("text", ["never copied", "repetitive"])
async def test_engine_drafts_only_where_the_replay_says_drafts_would_be_accepted(make_engine, tmp_path, text) -> None:
    """Output that never repeats its history (a whole-history hash over 64 ids): the
    proposer finds drafts (a 1-gram recurs every few tokens) but the replay of the first
    window's output says ~1 token per verify step, so the round ends off without one
    drafting step, however cheap verifying is. A repetitive text (a 1-gram model over 48
    ids falls into cycles) is measured, and drafts. The engine's own policy: its window of
    24 outputs leaves the replay 26 tokens per request, past the first ones before a cycle."""
    cfg = {"vocab_size": 64, "max_position_embeddings": 4096} if text == "never copied" else {
        "vocab_size": 48, "max_position_embeddings": 4096, "fake_context_tokens": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    prompts = [[(i * 5 + j % (3 + i % 4)) % 48 for j in range(12)] for i in range(6)]
    greedy = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    async with make_engine(runner="fake", model=str(tmp_path), async_scheduling=False, speculative={"num_tokens": 3}) as eng:
        eng._clock = StepClock(eng, with_drafts=1.0, without=1.0)
        await asyncio.gather(*[eng.generate(p, greedy) for p in prompts])
        stats = eng.stats()
    if text == "never copied":
        assert stats["spec_draft_tokens"] == 0 and stats["spec_auto"] == "off", stats
        assert stats["spec_auto_rounds_measured"] == 0 and stats["spec_auto_rounds_estimated"] >= 1, stats
        assert stats["spec_auto_estimate"] < 1.1, stats
    else:
        assert stats["spec_draft_tokens"] > 0 and stats["spec_auto"] == "on", stats
        # Above the floor (the first tokens, before the cycle, weigh it down: 1.66 here), so measured.
        floor = eng.spec_policy.verify_floor * eng.spec_policy.min_gain
        assert stats["spec_auto_rounds_measured"] == 1 and stats["spec_auto_estimate"] > floor, stats


async def test_disable_by_batch_size(make_engine, tmp_path) -> None:
    """No drafts while at least `disable_by_batch_size` requests run; drafts again below it."""
    model = _repetitive_model(tmp_path)
    prompts = [[(i * 5 + j % (3 + i % 4)) % 48 for j in range(12)] for i in range(4)]
    spec = {"num_tokens": 3, "auto": False, "disable_by_batch_size": 2}
    async with make_engine(runner="fake", model=model, async_scheduling=False, speculative=spec) as eng:
        await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)) for p in prompts])
        assert eng.stats()["spec_draft_tokens"] == 0
        await eng.generate(prompts[0], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        assert eng.stats()["spec_draft_tokens"] > 0


def test_steps_with_prompt_work_are_not_measured() -> None:
    """A burst of arrivals: the first outputs are prefill steps (few tokens, long steps).
    Counted, they would make the window without drafts look slow and drafting win; left
    out, the policy compares decode steps only and switches slower drafting off."""
    p = SpecPolicy(steady=0.0, window=4, exploit=100, skip=2)
    for _ in range(10):
        p.observe(2, 0.05, prompt_work=True)  # 40 tok/s: prefill, not a measure of either mode
    assert p.drafting is False and p.rounds == 0
    feed(p, 12, rate_with=800.0, rate_without=1000.0)
    assert p.rounds == 1 and not p.drafting
    assert round(p.rates[False]) == 1000 and round(p.rates[True]) == 800
    # In the exploit phase a prefill step counts toward the phase's length like any output.
    seen = p._seen
    p.observe(2, 0.05, prompt_work=True)
    assert p._seen == seen + 1


def test_outputs_without_tokens_are_not_measured() -> None:
    """Steps still in flight for requests that had ended yield no tokens but a whole step
    interval: counted, they would make the mode they fall into look slower."""
    p = SpecPolicy(steady=0.0, window=4, exploit=100, skip=2)
    feed(p, 3, rate_with=800.0, rate_without=1000.0)  # measure-off: 2 skipped, 1 counted
    p.observe(0, 0.05)
    p.observe(0, 0.05)
    assert p._seen == 3  # the empty outputs did not advance the window
    feed(p, 9, rate_with=800.0, rate_without=1000.0)
    assert p.rounds == 1 and round(p.rates[False]) == 1000 and not p.drafting


def test_a_steady_window_ends_after_min_window_outputs() -> None:
    """Steps as steady as a GPU's: the window without drafts ends after min_window counted
    outputs (not the whole window), and the drafting window that follows too."""
    p = SpecPolicy(window=24, min_window=8, skip=2, exploit=100)
    assert feed(p, 2 + 8, rate_with=3000.0, rate_without=1000.0) == [False] * 10
    assert p.drafting  # measuring with drafts after 10 outputs, not 26
    assert feed(p, 2 + 8, rate_with=3000.0, rate_without=1000.0) == [True] * 10
    assert p.stats()["spec_auto"] == "on" and p.rounds == 1


def test_a_noisy_window_measures_its_whole_length() -> None:
    """Step times that swing 3x (a shared CPU) leave the rate uncertain: the window runs
    its full length."""
    p = SpecPolicy(window=24, min_window=8, skip=2, exploit=100)
    for i in range(2 + 23):
        assert not p.drafting
        p.observe(64, 0.01 * (3 if i % 2 else 1))
    p.observe(64, 0.01)
    assert p.drafting  # the 24th counted output ended it
