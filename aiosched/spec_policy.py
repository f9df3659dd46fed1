"""Whether speculative drafting pays, decided from measured throughput (issue 18).

Drafts pay only when the tokens they add per step outweigh what verifying them costs,
and that depends on the machine (a speculating request computes 1 + k query rows every
step, found drafts or not, next to one row of a plain step replayed from its CUDA
graph; on a CPU the rows cost compute), on the batch size and on the text (acceptance). No fixed threshold gets all three right, so the
engine measures: it runs a window of steps with drafts and a window without, keeps the
faster mode for a longer stretch, then measures both again (the workload drifts).

Throughput is output tokens per second of wall time between step outputs, the figure a
user sees. Windows in both modes are short and alternate, so both see the same mix of
requests; the first outputs after a switch are skipped, as they belong to steps
scheduled before it. Drafting is kept only when it beats no drafting by `min_gain`:
speculation must never make things slower. Each round measures without drafts first, so
that a drafting window which is clearly losing (below 1/`cut` of that rate after `early`
outputs) ends at once: where a verify step costs several plain steps, a full window of
drafting would cost more than the whole answer is worth on short runs. `early` is 2:
step times within a mode are steady (H200: 13.94, 13.82, 13.76, 13.75 ms; a clear loss
is 1.5x), so two outputs tell a loss as well as four, and the two saved are the most
expensive steps of a losing round. Pure Python and deterministic: the caller passes the
time, so tests drive it with a fake clock.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecPolicy:
    window: int = 24  # step outputs measured per mode per round
    exploit: int = 400  # step outputs in the chosen mode before measuring again ...
    max_exploit: int = 6400  # ... doubled while the measurements keep agreeing, up to this
    skip: int = 2  # outputs ignored after a switch (steps still in flight from the other mode)
    min_gain: float = 1.03  # drafting must be this much faster to be kept
    early: int = 2  # counted drafting outputs after which a clear loss ends the window ...
    cut: float = 1.5  # ... clear: this many times slower than without drafts
    drafting: bool = False  # what the scheduler does now
    # Measured tokens and seconds of the current round, per mode.
    _tokens: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    _seconds: dict[bool, float] = field(default_factory=lambda: {True: 0.0, False: 0.0})
    _seen: int = 0  # outputs observed in the current phase
    _phase: str = "measure-off"  # measure-off -> measure-on -> exploit -> measure-off ...
    rates: dict[bool, float] = field(default_factory=dict)  # last measured tokens/s per mode
    _exploit_len: int = 0
    _last_choice: bool = True
    switches: int = 0
    rounds: int = 0

    def observe(self, tokens: int, seconds: float, prompt_work: bool = False) -> None:
        """One step output: `tokens` produced for live requests, `seconds` since the last output.

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
            if self._seen >= self._exploit_len:
                self._enter("measure-off")
            return
        if self._seen <= self.skip:
            return
        self._tokens[self.drafting] += tokens
        self._seconds[self.drafting] += seconds
        counted = self._seen - self.skip
        if self._phase == "measure-on" and counted >= self.early and self._rate(True) * self.cut < self._rate(False):
            self._decide()  # clearly losing: the rest of the window would only add to the loss
            return
        if counted < self.window:
            return
        if self._phase == "measure-off":
            self._enter("measure-on")
        else:
            self._decide()

    def _rate(self, mode: bool) -> float:
        s = self._seconds[mode]
        return self._tokens[mode] / s if s > 0 else 0.0

    def _decide(self) -> None:
        self.rates = {True: self._rate(True), False: self._rate(False)}
        self.rounds += 1
        drafting = self.rates[True] > self.rates[False] * self.min_gain
        # Measuring costs the losing mode's share of the round: as long as the answer stays
        # the same, measure half as often.
        same = self.rounds > 1 and drafting == self._last_choice
        self._exploit_len = min(self._exploit_len * 2, self.max_exploit) if same else self.exploit
        self._last_choice = drafting
        self._enter("exploit", drafting=drafting)

    def _enter(self, phase: str, drafting: bool | None = None) -> None:
        if phase == "measure-off":
            self._tokens, self._seconds = {True: 0, False: 0}, {True: 0.0, False: 0.0}
            drafting = False
        elif phase == "measure-on":
            drafting = True
        assert drafting is not None
        self.switches += drafting != self.drafting
        self.drafting, self._phase, self._seen = drafting, phase, 0

    def stats(self) -> dict[str, float | str]:
        return {
            "spec_auto": "measuring" if self._phase != "exploit" else ("on" if self.drafting else "off"),
            "spec_auto_rate_with_drafts": self.rates.get(True, 0.0),
            "spec_auto_rate_without_drafts": self.rates.get(False, 0.0),
            "spec_auto_rounds": self.rounds,
        }
