"""In-process executor: the runner lives in this process, on dedicated threads.

One thread launches steps in submission order (`runner.execute`), a second waits for
each step's tokens to reach the host and resolves the asyncio future through
`call_soon_threadsafe`. So the event loop never blocks on model compute, and on a GPU
step N+1 is launched while step N's tokens are still being copied back.
The same protocol Structs are passed as-is: no encoding in process.

The three threads share one interpreter lock. On a GPU the launch of a step is the
critical path (the device runs out of queued work while the launch thread waits for
the lock behind the event loop's output fan-out), so `submit` can hand the lock over
(opt-in, `AIOSCHED_LAUNCH_HANDOFF=1`, not yet measured on a GPU): when the launch
thread is idle it holds its caller (waiting releases the lock) until the runner reports
the step's forward queued (`ModelRunner.on_launched`), at most `HANDOFF_TIMEOUT_S`.
Runners that compute in `execute` (CPU) are never waited for.
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
from typing import Any

from aiosched.config import EngineConfig
from aiosched.errors import EngineDeadError
from aiosched.protocol import RunnerOutput, SchedulerOutput, WorkerInfo
from aiosched.executors.base import Executor
from aiosched.executors.runner import ModelRunner, PendingOutput, create_runner

_STOP = object()

HANDOFF_TIMEOUT_S = 0.002  # the longest submit waits for a launch (a long prefill step's layout)


async def run_in_thread(fn: Any, *args: Any) -> Any:
    """Like asyncio.to_thread, but on a short-lived thread: no pool outlives the engine."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def target() -> None:
        try:
            res, ok = fn(*args), True
        except BaseException as e:
            res, ok = e, False
        def deliver() -> None:
            if not fut.done():
                fut.set_result(res) if ok else fut.set_exception(res)
        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:
            pass

    th = threading.Thread(target=target, name="aiosched-call", daemon=True)
    th.start()
    try:
        return await fut
    finally:
        th.join()


class InprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.runner: ModelRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._launch_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._result_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._launch_idle = False  # the launch thread waits for a step (only submit puts one)
        self._launched = threading.Event()
        self._handoff = False
        self.handoff_timeout_s = HANDOFF_TIMEOUT_S

    async def start(self) -> WorkerInfo:
        self._loop = asyncio.get_running_loop()
        self.runner = create_runner(self.config)
        info = await run_in_thread(self.runner.load)
        # Opt-in (AIOSCHED_LAUNCH_HANDOFF=1) until a GPU has measured it (benchmarks/run_gpu.sh handoff)
        self._handoff = self.runner.launch_handoff and os.environ.get("AIOSCHED_LAUNCH_HANDOFF", "0") == "1"
        self.runner.on_launched = self._launched.set
        self._threads = [
            threading.Thread(target=self._launch_loop, name="aiosched-launch", daemon=True),
            threading.Thread(target=self._result_loop, name="aiosched-results", daemon=True),
        ]
        for th in self._threads:
            th.start()
        return info

    def submit(self, output: SchedulerOutput) -> "asyncio.Future[RunnerOutput]":
        assert self._loop is not None, "executor not started"
        fut: asyncio.Future[RunnerOutput] = self._loop.create_future()
        if self._error is not None:
            fut.set_exception(EngineDeadError(f"model runner failed: {self._error!r}"))
        elif self._handoff and self._launch_idle:
            self._launched.clear()
            self._launch_q.put((output, fut))
            self._launched.wait(self.handoff_timeout_s)  # the lock is the launch thread's until its forward is queued
        else:
            self._launch_q.put((output, fut))
        return fut

    def _launch_loop(self) -> None:
        assert self.runner is not None
        while True:
            self._launch_idle = True
            item = self._launch_q.get()
            self._launch_idle = False
            if item is _STOP:
                break
            so, fut = item
            if self._error is not None:
                self._result_q.put((None, fut))
                continue
            try:
                pending: PendingOutput | None = self.runner.execute(so)
            except BaseException as e:  # a runner error leaves worker state unknown: fatal
                self._error = e
                pending = None
            self._launched.set()  # (also for a step the runner did not report: empty, failed)
            self._result_q.put((pending, fut))
        self._result_q.put(_STOP)

    def _result_loop(self) -> None:
        while (item := self._result_q.get()) is not _STOP:
            pending, fut = item
            try:
                if pending is None:
                    raise EngineDeadError(f"model runner failed: {self._error!r}")
                result: Any = pending.result()
                ok = True
            except BaseException as e:
                self._error = self._error or e
                result = e if isinstance(e, EngineDeadError) else EngineDeadError(f"model runner failed: {e!r}")
                ok = False
            self._resolve(fut, result, ok)

    def _resolve(self, fut: "asyncio.Future[RunnerOutput]", result: Any, ok: bool) -> None:
        def setter() -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(result)
            else:
                fut.set_exception(result)

        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(setter)
        except RuntimeError:  # loop closed during shutdown
            pass

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"model runner failed: {self._error!r}")

    async def shutdown(self) -> None:
        if self._threads:
            self._launch_q.put(_STOP)
            for th in self._threads:
                await run_in_thread(th.join, 30)
            self._threads = []
        if self.runner is not None:
            self.runner.shutdown()
            self.runner = None
