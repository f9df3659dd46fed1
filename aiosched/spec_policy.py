"""Whether speculative drafting pays, decided from measured throughput (issue 18).

Drafts pay only when the tokens they add per step outweigh what verifying them costs,
and that depends on the machine (a speculating request computes 1 + k query rows every
step, found drafts or not, next to one row of a plain step replayed from its CUDA
graph; on a CPU the rows cost compute), on the batch size and on the text (acceptance).
No fixed threshold gets all three right, so the engine measures: it runs a window of
steps with drafts and a window without, keeps the faster mode for a longer stretch,
then measures again (the workload drifts).

Throughput is output tokens per second of wall time between step outputs, the figure a
user sees. Windows in both modes are short and alternate, so both see the same mix of
requests; the first outputs after a switch are skipped, as they belong to steps
scheduled before it. Drafting is kept only when it beats no drafting by `min_gain`:
speculation must never make things slower. Each round measures without drafts first, so
that a drafting window which is clearly losing (below 1/`cut` of that rate after `early`
outputs) ends at once: where a verify step costs several plain steps, a full window of
drafting would cost more than the whole answer is worth on short runs. `early` is 4,
not 2: step times within a mode are mostly steady (H200: 13.94, 13.82, 13.76, 13.75 ms),
but the first drafting outputs after a switch can be slow, and on the H200 (code
workload, 256 requests, 2026-12-04) two such outputs read as a 1.8x loss and ended a
window that measured 1.2-1.3x faster in the same run's other rounds.

The drafting window is itself the cost on short runs where drafts are rarely accepted
(H200, 128 tokens, acceptance 0.08: auto at 0.69x of no speculation at 256 requests).
Two things avoid it, given `estimate` (the engine passes one; without it the policy
measures every round as above):

- The text's side, for free. Greedy verification accepts a draft exactly when it equals
  the token the model produced, so replaying the proposer over the tokens requests
  already generated (aiosched/draft_replay.py) gives E, the tokens a verify step would
  yield per request. A verify step never costs less than `verify_floor` plain steps on
  any machine measured, so with E below verify_floor x min_gain drafting cannot pay: the
  round ends "off" at once, with no drafting window. The replay sees the past only, and
  the first decision comes early (about `window` tokens into a burst of requests, before
  a model that later loops or starts copying does so: the CPU test model's E is 1.09 at
  20 tokens, 1.7 at 96). Such a round cost nothing to decide, so the next one comes
  after `recheck` outputs, not `exploit` (doubled as usual while the answer holds).
- The machine's side, learned. A measured round gives r = T_verify / T_plain, the cost
  of a verify request-step in plain ones, at the round's batch size bucket (powers of
  two): r = E_measured / q, q = rate with drafts / rate without, E_measured = tokens per
  request-step while drafting. Drafting then yields E / r times the plain rate, so a
  later round at a bucket whose r is known decides from the estimate alone, at its start
  (no window in either mode): draft iff E / r > min_gain. r drifts (with context length,
  with the batch's mix), so every `remeasure`-th round at a bucket measures again, and so
  does a round whose E moved by more than `drift` times from the one r was measured at.

The estimate is consulted once per round, at its start (the first round: at the end of
its window without drafts), and again at the end of that window only when the requests
had too little history at the start (`min_steps`); never per step. Pure Python and
deterministic: the caller passes the time and the estimate, so tests drive it with a fake
clock.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple


class Estimate(NamedTuple):
    """What drafting would yield now, replayed from the running requests' generated tokens."""

    batch: int  # requests running
    steps: int  # verify request-steps replayed
    tokens: int  # tokens they would have produced (tokens / steps = E)


@dataclass
class VerifyCost:
    """r at one batch size bucket, from a measured round."""

    ratio: float  # r = T_verify / T_plain per request-step
    at: float  # the estimated E of the round that measured it
    used: int = 0  # rounds decided with it since


def bucket(batch: int) -> int:
    """The batch size bucket r is kept for: the largest power of two <= batch."""
    return 1 << (max(batch, 1).bit_length() - 1)


@dataclass
class SpecPolicy:
    window: int = 24  # step outputs measured per mode per round
    exploit: int = 400  # step outputs in the chosen mode before measuring again ...
    max_exploit: int = 6400  # ... doubled while the measurements keep agreeing, up to this
    skip: int = 2  # outputs ignored after a switch (steps still in flight from the other mode)
    min_gain: float = 1.03  # drafting must be this much faster to be kept
    early: int = 4  # counted drafting outputs after which a clear loss ends the window ...
    cut: float = 1.5  # ... clear: this many times slower than without drafts
    # The replayed acceptance of the running requests (engine: AsyncEngine._spec_estimate); None: measure always.
    estimate: Callable[[], Estimate] | None = None
    min_steps: int = 16  # replayed request-steps below which an estimate says nothing
    verify_floor: float = 1.1  # a verify request-step costs at least this many plain ones (prior, every machine measured)
    recheck: int = 48  # the first stretch after a round whose successor is decided from the estimate (cheap to decide again)
    remeasure: int = 4  # every this-many-th round at a bucket measures r again ...
    drift: float = 1.5  # ... and any round whose E is this many times above or below the one r was measured at
    min_window: int = 8  # a window may end after this many counted outputs ...
    steady: float = 0.03  # ... once its per-token time is known this closely (standard error / mean; 0: never)
    drafting: bool = False  # what the scheduler does now
    _sy: float = 0.0  # this window's counted outputs: sum and sum of squares of seconds per token
    _syy: float = 0.0
    # Measured tokens, seconds and request-steps of the current round, per mode.
    _tokens: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    _seconds: dict[bool, float] = field(default_factory=lambda: {True: 0.0, False: 0.0})
    _requests: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    _seen: int = 0  # outputs observed in the current phase
    _phase: str = "measure-off"  # measure-off -> measure-on -> exploit -> measure-off ...
    _probe: tuple[int, float] | None = None  # this round's estimate: (bucket, E)
    rates: dict[bool, float] = field(default_factory=dict)  # last measured tokens/s per mode
    costs: dict[int, VerifyCost] = field(default_factory=dict)  # learned r per batch size bucket
    last_estimate: float = 0.0  # E at the last consultation (0: none yet) ...
    last_bucket: int = 0  # ... and its batch size bucket
    _exploit_len: int = 0
    _last_choice: bool = True
    switches: int = 0
    rounds: int = 0
    rounds_estimated: int = 0  # rounds decided from the estimate, without a drafting window
    rounds_measured: int = 0  # rounds decided by measuring both modes

    @property
    def measuring(self) -> bool:
        """Whether an observation's prompt_work flag matters now (only while measuring:
        the caller may skip finding it out, a pass over the step's requests)."""
        return self._phase != "exploit"

    def observe(self, tokens: int, seconds: float, prompt_work: bool = False, requests: int = 0) -> None:
        """One step output: `tokens` produced for live requests, `seconds` since the last output,
        `requests` the requests it decoded (0: unknown; r is then not learned).

        prompt_work: the step also computed prompt chunks. Such a step measures prefill,
        not drafting: while measuring it is left out (neither counted nor a window step).
        When a burst of requests arrives at once (a benchmark, a batch job), the first
        window would otherwise be mostly prefill without drafts, and drafting would look
        faster than it is (H200, 256 requests: auto kept drafting at 0.74x of none).
        An output with no tokens (a step still in flight for requests that had ended:
        async scheduling) measures neither mode and is left out the same way."""
        if (prompt_work or not tokens) and self._phase != "exploit":
            return
        self._seen += 1
        if self._phase == "exploit":
            if self._seen >= self._exploit_len and not self._settle():
                self._enter("measure-off")
            return
        if self._seen <= self.skip:
            return
        self._tokens[self.drafting] += tokens
        self._seconds[self.drafting] += seconds
        self._requests[self.drafting] += requests
        counted = self._seen - self.skip
        y = seconds / tokens
        self._sy, self._syy = self._sy + y, self._syy + y * y
        if self._phase == "measure-on" and counted >= self.early and self._rate(True) * self.cut < self._rate(False):
            self._decide()  # clearly losing: the rest of the window would only add to the loss
            return
        if counted < self.window and not self._is_steady(counted):
            return
        if self._phase == "measure-off":
            # The round's estimate, unless its start had one (once per round).
            if self._probe is not None or not self._settle():
                self._enter("measure-on")
        else:
            self._decide()

    def _is_steady(self, n: int) -> bool:
        """The window has measured its mode closely enough to end early: its n counted
        outputs are at least `min_window`, and their seconds per token have a standard
        error below `steady` of their mean. GPU steps are steady (c16: 0.7-1.3 ms apart, 16 tokens each), so a
        window there ends after ~8 outputs instead of 24: on a 128-token run each plain
        output of a round that then drafts is one at the slower rate (code c16 on an H200:
        auto 1.30x where always-on was 1.5x, with 26 plain outputs measured first). A noisy
        machine (a shared CPU) still measures the whole window."""
        if not self.steady or n < self.min_window:
            return False
        mean = self._sy / n
        var = max(0.0, self._syy / n - mean * mean) * n / (n - 1)
        return var / n < (self.steady * mean) ** 2

    def _rate(self, mode: bool) -> float:
        s = self._seconds[mode]
        return self._tokens[mode] / s if s > 0 else 0.0

    def _settle(self) -> bool:
        """Decide the round from the estimate when it is enough; False: measure."""
        est = self.estimate() if self.estimate is not None else None
        if est is None or est.steps < self.min_steps:
            return False
        e = est.tokens / est.steps
        self.last_estimate, self.last_bucket = e, bucket(est.batch)
        self._probe = (self.last_bucket, e)
        if e < self.verify_floor * self.min_gain:
            self._conclude(False, estimated=True, base=self.recheck)  # no verify step is cheap enough for so few tokens
            return True
        cost = self.costs.get(self.last_bucket)
        if cost is None or cost.used + 1 >= self.remeasure or not 1 / self.drift <= e / cost.at <= self.drift:
            return False
        cost.used += 1
        self._conclude(e / cost.ratio > self.min_gain, estimated=True, base=self.recheck)
        return True

    def _decide(self) -> None:
        """End a measured round: keep the faster mode, and learn r at its bucket."""
        self.rates = {True: self._rate(True), False: self._rate(False)}
        learned = False
        if self._probe is not None and self._requests[True] and self.rates[True] and self.rates[False]:
            q = self.rates[True] / self.rates[False]
            e_measured = self._tokens[True] / self._requests[True]
            self.costs[self._probe[0]] = VerifyCost(ratio=e_measured / q, at=self._probe[1])
            learned = True
        # With r learned the next round is decided from the estimate (a replay, no window),
        # so it comes soon: acceptance moves within an answer (H200, code workload, 64
        # requests: the drafting window at tokens 15-40 yielded 1.6 tokens per request-step,
        # later steps 2.2; measured "off" and kept off for the rest of the run, 1.08x of no
        # speculation where drafting throughout gave 1.46x).
        self._conclude(self.rates[True] > self.rates[False] * self.min_gain, estimated=False,
                       base=self.recheck if learned else None)

    def _conclude(self, drafting: bool, estimated: bool, base: int | None = None) -> None:
        """End a round: `drafting` for the next stretch, `base` outputs long unless the answer held."""
        self.rounds += 1
        self.rounds_estimated += estimated
        self.rounds_measured += not estimated
        # Measuring costs the losing mode's share of the round: as long as the answer stays
        # the same, measure half as often.
        same = self.rounds > 1 and drafting == self._last_choice
        self._exploit_len = min(self._exploit_len * 2, self.max_exploit) if same else (base or self.exploit)
        self._last_choice = drafting
        self._probe = None
        self._enter("exploit", drafting=drafting)

    def _enter(self, phase: str, drafting: bool | None = None) -> None:
        if phase == "measure-off":
            self._tokens, self._seconds = {True: 0, False: 0}, {True: 0.0, False: 0.0}
            self._requests = {True: 0, False: 0}
            drafting = False
        elif phase == "measure-on":
            drafting = True
        assert drafting is not None
        self.switches += drafting != self.drafting
        self.drafting, self._phase, self._seen = drafting, phase, 0
        self._sy, self._syy = 0.0, 0.0

    def stats(self) -> dict[str, float | str]:
        return {
            "spec_auto": "measuring" if self._phase != "exploit" else ("on" if self.drafting else "off"),
            "spec_auto_rate_with_drafts": self.rates.get(True, 0.0),
            "spec_auto_rate_without_drafts": self.rates.get(False, 0.0),
            "spec_auto_rounds": self.rounds,
            # E (tokens per verify request-step) replayed at the last consultation; 0: none yet
            "spec_auto_estimate": self.last_estimate,
            "spec_auto_rounds_estimated": self.rounds_estimated,
            "spec_auto_rounds_measured": self.rounds_measured,
            # r (a verify request-step in plain ones) learned at that bucket; 0: not measured there
            "spec_auto_verify_cost": cost.ratio if (cost := self.costs.get(self.last_bucket)) else 0.0,
        }
