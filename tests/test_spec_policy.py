"""The speculative-decoding policy keeps drafting only while it is measurably faster (issue 18).

Driven with synthetic step outputs (tokens, seconds): no clock, no race."""
from __future__ import annotations

import asyncio
import json

import pytest

from aiosched.sampling_params import SamplingParams
from aiosched.spec_policy import SpecPolicy


def feed(p: SpecPolicy, steps: int, rate_with: float, rate_without: float, tokens: int = 64) -> list[bool]:
    """`steps` outputs at the given tokens/s for the mode the policy is in; the modes seen."""
    modes = []
    for _ in range(steps):
        modes.append(p.drafting)
        p.observe(tokens, tokens / (rate_with if p.drafting else rate_without))
    return modes


def test_slower_drafting_is_switched_off_after_one_round() -> None:
    p = SpecPolicy(window=10, exploit=100, skip=2, cut=1.5)
    modes = feed(p, 24, rate_with=800.0, rate_without=1000.0)
    assert modes[:12] == [False] * 12 and modes[12:] == [True] * 12  # measured off, then on (a whole window)
    assert not p.drafting and p.stats()["spec_auto"] == "off"
    assert round(p.rates[True]) == 800 and round(p.rates[False]) == 1000


def test_a_clearly_losing_drafting_window_ends_early() -> None:
    """Verify steps that cost several plain ones: drafting stops after `early` counted outputs,
    not a whole window (short runs would pay more for measuring than drafting could win)."""
    p = SpecPolicy(window=10, exploit=100, skip=2, early=4, cut=1.5)
    modes = feed(p, 24, rate_with=600.0, rate_without=1000.0)
    assert modes[:12] == [False] * 12 and modes[12:18] == [True] * 6 and modes[18:] == [False] * 6
    assert not p.drafting and p.rounds == 1
    assert round(p.rates[True]) == 600 and round(p.rates[False]) == 1000


def test_faster_drafting_is_kept() -> None:
    p = SpecPolicy(window=10, exploit=100, skip=2)
    feed(p, 24, rate_with=1500.0, rate_without=1000.0)
    assert p.drafting and p.stats()["spec_auto"] == "on"


def test_a_gain_below_the_margin_is_not_worth_drafting() -> None:
    p = SpecPolicy(window=10, exploit=100, skip=2, min_gain=1.05)
    feed(p, 24, rate_with=1020.0, rate_without=1000.0)
    assert not p.drafting


def test_outputs_just_after_a_switch_are_not_counted() -> None:
    """The first `skip` outputs after a switch belong to steps of the other mode."""
    p = SpecPolicy(window=4, exploit=100, skip=2)
    for _ in range(6):  # measure-off: 2 skipped, 4 counted
        p.observe(10, 2.0)
    assert p.drafting
    p.observe(10, 1000.0)  # slow stragglers from the steps without drafts: skipped
    p.observe(10, 1000.0)
    for _ in range(4):
        p.observe(10, 1.0)
    assert p.rates == {True: 10.0, False: 5.0} and p.drafting


def test_measures_again_and_follows_a_change_in_the_workload() -> None:
    p = SpecPolicy(window=10, exploit=50, skip=2)
    feed(p, 24, rate_with=2000.0, rate_without=1000.0)
    assert p.drafting
    modes = feed(p, 50 + 12 + 6, rate_with=500.0, rate_without=1000.0)  # acceptance fell: drafting now loses
    assert modes[:50] == [True] * 50  # exploiting the earlier answer
    assert not p.drafting and p.rounds == 2


def test_measuring_backs_off_while_the_answer_holds() -> None:
    """The losing mode's share shrinks: each confirming round doubles the exploit stretch."""
    p = SpecPolicy(window=10, exploit=100, max_exploit=400, skip=2)
    # A round: 12 outputs without drafts, then drafting cut after 2 skipped + 2 counted.
    modes = feed(p, 16 + 100 + 16 + 200 + 16 + 400 + 16 + 400 + 16, rate_with=500.0, rate_without=1000.0)
    assert p.rounds == 5 and not p.drafting
    assert sum(modes) == 5 * 4  # drafting only while measuring: 4 outputs a round
    assert p.switches == 2 * 5


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
        eng.spec_policy = SpecPolicy(window=6, exploit=1000)
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
    p = SpecPolicy(window=4, exploit=100, skip=2)
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
    p = SpecPolicy(window=4, exploit=100, skip=2)
    feed(p, 3, rate_with=800.0, rate_without=1000.0)  # measure-off: 2 skipped, 1 counted
    p.observe(0, 0.05)
    p.observe(0, 0.05)
    assert p._seen == 3  # the empty outputs did not advance the window
    feed(p, 9, rate_with=800.0, rate_without=1000.0)
    assert p.rounds == 1 and round(p.rates[False]) == 1000 and not p.drafting
