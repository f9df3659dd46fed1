"""The CPU step on two cores: the batch's requests in two parts, one forward each, run at once.

Requests of one step are independent through the whole forward (each attends to its own
KV; every other op is per row), so a step splits by whole requests into two sub-steps
that need no synchronisation until the step's end: one barrier per step, where two torch
intra-op threads (static GEMM partitions, 8-12 OpenMP regions per layer) pay one per op.
The launch thread runs the first part, a helper thread the second, each with one torch
thread; torch ops and the C kernels release the GIL, so the parts overlap.

The helper never stalls the step: it claims its part only once it is awake, and the
launch thread, done with its own part, takes an unclaimed second part itself. So with the
other core busy (a shared machine, the event loop's output work) the step costs what one
thread costs, plus the split's bookkeeping (~0.1 ms); only a part the helper has claimed
is waited for, and the waiting launch thread sleeps, leaving its core to the helper.
Where another process keeps one core busy all the time, the split still loses ~10% to one
thread (hidden 256; `AIOSCHED_CPU_SPLIT=0` there).

Options, both measured (docs/benchmarks.md, "Issue 23, CPU, 2026-12-03 (third series)")
and off by default: `AIOSCHED_CPU_SPLIT_FRAC=auto` moves the split point toward the two
threads' measured rates (`PairRunner.frac`; a number fixes the launch thread's share, 0.5
by default); `AIOSCHED_CPU_SPLIT=auto` splits a step only where split steps of its kind
ran faster lately (`SplitChoice`). Neither paid in the A/B runs: adaptive split point
+-8% either way, SplitChoice 15-20% slower on a quiet machine for <= 7% on a busy one.

When a step is split (`split_inputs`): CPU, not fused, at least 2 requests and
`MIN_ROWS` rows, the logits rows in request order, and no block written by one part and
read by the other (two requests of one step sharing prefix blocks, one writing what the
other reads: the unsplit step writes the whole batch's KV before any read).
`AIOSCHED_CPU_SPLIT=0` turns it off, `1` on (the default where torch runs one intra-op
thread per two cores or fewer, i.e. a core is spare: the 2-core default), `auto` as above.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from aiosched.executors.torch.attention.torch_paged import AttentionMetadata
from aiosched.executors.torch.input_batch import StepInputs

SPLIT_ENV = "AIOSCHED_CPU_SPLIT"
FRAC_ENV = "AIOSCHED_CPU_SPLIT_FRAC"  # the launch thread's share of the work (default 0.5); "auto": adaptive
MIN_ROWS = 8  # below this a step is too small for two forwards to pay (the GEMMs turn weight-bound)


def split_choice_on() -> bool:
    """AIOSCHED_CPU_SPLIT=auto: split a step only where that has been faster (SplitChoice)."""
    return os.environ.get(SPLIT_ENV, "") == "auto"


def split_enabled(torch_threads: int, cores: int | None = None) -> bool:
    v = os.environ.get(SPLIT_ENV, "")
    if v in ("0", "1", "auto"):
        return v != "0"
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return cores >= 2 and 2 * torch_threads <= cores


def _sub(inputs: StepInputs, a: int, b: int, rows: list[int], lo: int, hi: int) -> StepInputs:
    """Requests [a, b) of `inputs` as a step of their own (logits rows [lo, hi))."""
    m = inputs.meta
    qsl = m.query_start_loc
    t0, t1 = qsl[a], qsl[b]
    meta = AttentionMetadata(m.slot_mapping[t0:t1], [q - t0 for q in qsl[a:b + 1]], m.seq_lens[a:b], m.block_tables[a:b],
                             m.block_size)
    logit_rows = torch.tensor([r - t0 for r in rows[lo:hi]], dtype=torch.int64)
    return StepInputs(inputs.input_ids[t0:t1], inputs.positions[t0:t1], meta, logit_rows, inputs.dst[lo:hi])


def split_inputs(inputs: StepInputs, frac: float = 0.5) -> tuple[tuple[StepInputs, StepInputs], tuple[float, float]] | None:
    """The step as two sub-steps of whole requests, the first with about `frac` of the
    work, and the work of each; or None where it does not split (see the module docstring)."""
    m = inputs.meta
    if m.fused or m.device is not None or inputs.input_ids.device.type != "cpu":
        return None
    qsl, B = m.query_start_loc, m.num_reqs
    T = qsl[-1] if qsl else 0
    if B < 2 or T < MIN_ROWS or inputs.input_ids.shape[0] != T:
        return None
    # Work of a request ~ its rows (the GEMMs) plus a share for its attention over the
    # context; split where the prefix sum crosses `frac` of the total.
    work = [qsl[i + 1] - qsl[i] + (qsl[i + 1] - qsl[i]) * m.seq_lens[i] / 1024.0 for i in range(B)]
    total = sum(work)
    goal, acc, k = total * frac, 0.0, 0
    while k < B - 1 and acc + work[k] / 2 < goal:
        acc += work[k]
        k += 1
    k = max(1, k)
    acc = sum(work[:k])
    t = qsl[k]
    rows = inputs.logit_rows.tolist()
    if any(x >= y for x, y in zip(rows, rows[1:])):
        return None  # not in request order
    lo = 0
    while lo < len(rows) and rows[lo] < t:
        lo += 1
    # KV blocks: none written by one part and read by the other.
    bs = m.block_size
    slots = m.slot_mapping.tolist()
    w0 = {s // bs for s in slots[:t] if s >= 0}
    w1 = {s // bs for s in slots[t:] if s >= 0}
    if any(blk in w0 for tab in m.block_tables[k:] for blk in tab) or any(blk in w1 for tab in m.block_tables[:k] for blk in tab):
        return None
    return (_sub(inputs, 0, k, rows, 0, lo), _sub(inputs, k, B, rows, lo, len(rows))), (acc, total - acc)


class SplitChoice:
    """Whether to split a step, from measured rates (work per second of the step's wall
    time) of split and unsplit steps, per kind of step (decode-only, other): the faster
    way, and every EXPLORE-th step of a kind the other way, to follow the load. On a
    machine where another process keeps a core busy, two threads lose to one (each step
    waits for a helper that shares its core); there the unsplit way wins and is kept."""

    EXPLORE, ALPHA = 16, 0.3

    def __init__(self) -> None:
        self.rate: dict[tuple[str, bool], float] = {}
        self.steps: dict[str, int] = {}
        self.stats = {"split": 0, "whole": 0}

    def split(self, kind: str) -> bool:
        n = self.steps[kind] = self.steps.get(kind, 0) + 1
        rs, rw = self.rate.get((kind, True)), self.rate.get((kind, False))
        if rs is None or rw is None:
            choice = rs is None  # one of each first
        else:
            choice = rs >= rw
            if n % self.EXPLORE == 0:
                choice = not choice
        self.stats["split" if choice else "whole"] += 1
        return choice

    def record(self, kind: str, split: bool, work: float, seconds: float) -> None:
        if seconds <= 0:
            return
        r, old = work / seconds, self.rate.get((kind, split))
        self.rate[(kind, split)] = r if old is None else old + self.ALPHA * (r - old)


class PairRunner:
    """Runs two tasks at once: the first on the calling thread, the second on a helper
    thread if it wakes up in time (else the caller runs it after the first).

    `frac` is the share of a step's work to give the first task: each run with work
    (w0, w1) measures both threads' rates (work per second of wall time, which counts the
    time the OS gave the core to someone else) and moves `frac` toward the balance
    rate0 / (rate0 + rate1) (the helper's time counted from the post, so its wake-up is
    in it), so that both parts end together when one core is shared
    with other processes. Bounded to [FRAC_MIN, FRAC_MAX]. Only with AIOSCHED_CPU_SPLIT_FRAC=auto;
    else `frac` stays the fixed share (0.5 by default)."""

    FRAC_MIN, FRAC_MAX, ALPHA = 0.25, 0.8, 0.25

    def __init__(self, torch_threads: int) -> None:
        self._threads = torch_threads
        self._cv = threading.Condition()
        self._task: Callable[[], Any] | None = None  # the posted second task, unclaimed
        self._busy = False  # the helper is running a claimed task
        self._result: Any = None
        self._error: BaseException | None = None
        self._end = 0.0  # when the helper finished its last task (perf_counter)
        self._stop = False
        fixed = os.environ.get(FRAC_ENV, "0.5")
        self.fixed = None if fixed == "auto" else float(fixed)
        self.frac = self.fixed if self.fixed is not None else 0.5
        self.stats = {"split_steps": 0, "helper_ran": 0, "caller_ran_both": 0, "caller_wait_s": 0.0}
        self._thread = threading.Thread(target=self._loop, name="aiosched-cpu-split", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)  # this thread's OpenMP/MKL count (per thread in libgomp)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while self._task is None and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        return
                    task, self._task, self._busy = self._task, None, True
                result, error = None, None
                try:
                    result = task()
                except BaseException as e:  # handed to the caller
                    error = e
                with self._cv:
                    self._result, self._error, self._busy, self._end = result, error, False, time.perf_counter()
                    self.stats["helper_ran"] += 1
                    self._cv.notify_all()

    def run(self, first: Callable[[], Any], second: Callable[[], Any], work: tuple[float, float] | None = None) -> tuple[Any, Any]:
        self.stats["split_steps"] += 1
        with self._cv:
            self._task, self._result, self._error = second, None, None
            self._cv.notify_all()
        t0 = time.perf_counter()
        try:
            r0 = first()
        finally:
            t1 = time.perf_counter()
            with self._cv:
                mine = self._task is second  # the helper has not claimed it: run it here
                if mine:
                    self._task = None
                else:
                    while self._busy:
                        self._cv.wait()
            self.stats["caller_wait_s"] += time.perf_counter() - t1
        if mine:
            self.stats["caller_ran_both"] += 1
            if work is not None and self.fixed is None:
                self.frac = min(self.FRAC_MAX, self.frac + self.ALPHA * (self.FRAC_MAX - self.frac))
            return r0, second()
        if self._error is not None:
            raise self._error
        if work is not None and self.fixed is None and work[0] > 0 and work[1] > 0 and t1 > t0 and self._end > t0:
            # rates from the post: the helper's includes its wake-up
            r0_, r1_ = work[0] / (t1 - t0), work[1] / (self._end - t0)
            target = r0_ / (r0_ + r1_)
            self.frac = min(self.FRAC_MAX, max(self.FRAC_MIN, self.frac + self.ALPHA * (target - self.frac)))
        return r0, self._result

    def close(self) -> None:
        """Stops the helper (between steps: it is idle) and waits for it to exit."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
