"""The in-process executor's launch handoff (opt-in, AIOSCHED_LAUNCH_HANDOFF=1): on an
accelerator the launch thread's work is the critical path, so `submit` holds the event loop
(the interpreter lock released) until the runner reports the step's forward queued, and no
longer than that."""
from __future__ import annotations

import asyncio
import threading

import pytest

from aiosched.config import EngineConfig
from aiosched.protocol import NewRequestData, ScheduledRequest, SchedulerOutput
from aiosched.sampling_params import SamplingParams
from aiosched.executors import inproc
from aiosched.executors.fake_runner import FakeModelRunner


class _LaunchingRunner(FakeModelRunner):
    """A fake runner that 'queues' its step: it reports the launch, then finishes the
    step only when the test lets it (as a GPU step finishes later)."""

    launch_handoff = True

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.release = threading.Event()
        self.submit_waiting_at_launch: list[bool] = []
        self.in_submit = False

    def execute(self, so: SchedulerOutput):
        self.submit_waiting_at_launch.append(self.in_submit)
        assert self.on_launched is not None
        self.on_launched()
        assert self.release.wait(30)
        return super().execute(so)


def _step(i: int, new: bool) -> SchedulerOutput:
    reqs = [NewRequestData("r", [1, 2, 3], 3, SamplingParams(max_tokens=8, temperature=0.0), 0)] if new else []
    return SchedulerOutput(i, reqs, [ScheduledRequest("r", 3 if new else 1, 0 if new else 3, [0] if new else [], True)], [], 3)


async def _started(monkeypatch: pytest.MonkeyPatch, runner_cls: type, env: str | None = "1") -> inproc.InprocExecutor:
    if env is None:
        monkeypatch.delenv("AIOSCHED_LAUNCH_HANDOFF", raising=False)
    else:
        monkeypatch.setenv("AIOSCHED_LAUNCH_HANDOFF", env)
    monkeypatch.setattr(inproc, "create_runner", lambda cfg: runner_cls(cfg))
    ex = inproc.InprocExecutor(EngineConfig(model="", runner="fake", num_kv_blocks=16))
    await ex.start()
    ex.handoff_timeout_s = 60.0  # the order below must not depend on the machine's speed
    return ex


async def test_submit_waits_for_the_launch_not_for_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = await _started(monkeypatch, _LaunchingRunner)
    runner = ex.runner
    assert isinstance(runner, _LaunchingRunner) and ex._handoff
    try:
        for i, new in enumerate([True, False]):
            while not ex._launch_idle:  # the launch thread is back at its queue
                await asyncio.sleep(0.001)
            runner.in_submit = True
            fut = ex.submit(_step(i + 1, new))
            runner.in_submit = False
            # submit returned after the launch and before the step finished
            assert runner.submit_waiting_at_launch == [True] * (i + 1)
            assert not fut.done()
            runner.release.set()
            out = await fut
            runner.release.clear()
            assert out.req_ids == ["r"] and len(out.sampled_token_ids[0]) == 1
    finally:
        runner.release.set()
        await ex.shutdown()


@pytest.mark.parametrize("case", ["cpu runner", "switched off", "not switched on"])
async def test_no_handoff_for_runners_that_compute_in_execute(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    if case == "cpu runner":
        ex = await _started(monkeypatch, FakeModelRunner)
    else:
        ex = await _started(monkeypatch, _LaunchingRunner, env="0" if case == "switched off" else None)
        ex.runner.release.set()
    try:
        assert not ex._handoff
        out = await ex.submit(_step(1, True))
        assert out.req_ids == ["r"]
    finally:
        await ex.shutdown()
