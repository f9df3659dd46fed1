"""Multiprocess executor: parity with inproc, worker failure, hostile frames, clean exits.

All on CPU with the fake runner (and the torch runner on a tiny random checkpoint
when it is available); every test is bounded in time.
"""
from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aiosched import SamplingParams
from aiosched.config import EngineConfig
from aiosched.errors import EngineDeadError
from aiosched.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Execute,
    Heartbeat,
    Hello,
    NewRequestData,
    Ready,
    ScheduledRequest,
    SchedulerOutput,
    Shutdown,
    StepResult,
    WorkerError,
    decode_from_worker,
    encode,
)
from aiosched.executors.base import register_executor
from aiosched.executors.multiproc import MultiprocExecutor
from aiosched.executors.fake_runner import FakeModelRunner, reference_tokens
from aiosched.executors.worker_loop import FrameSocket, worker_main
from procs import children_of, is_gone, proc_state, spawned_since, wait_gone

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
pytestmark = pytest.mark.timeout(120)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    return [[(i * 7 + j * 13 + seed) % 500 for j in range(3 + (i * 5) % 19)] for i in range(n)]


FAKE = dict(runner="fake", num_kv_blocks=48, block_size=4, max_num_batched_tokens=32)


async def run_all(eng, ps: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = await asyncio.gather(*[eng.generate(p, params) for p in ps])
    return [o.token_ids for o in outs]


# ---- parity ----


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_fake_runner_matches_inproc(make_engine, tp: int, async_scheduling: bool) -> None:
    ps = prompts(24)
    results = {}
    for executor in ("inproc", "multiproc"):
        kw = dict(FAKE, executor=executor, async_scheduling=async_scheduling)
        if executor == "multiproc":
            kw["tensor_parallel_size"] = tp
        async with make_engine(**kw) as eng:
            results[executor] = await run_all(eng, ps)
            if executor == "multiproc":
                assert eng._executor.max_concurrent_batches == (2 if async_scheduling else 1)
                assert eng.stats()["preemptions"] > 0, "the small pool must force preemption"
    assert results["multiproc"] == results["inproc"]
    assert results["inproc"][0] == reference_tokens(ps[0], GREEDY.max_tokens)


async def test_seeded_sampling_matches_inproc(make_engine) -> None:
    ps = prompts(8, seed=3)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
    results = {}
    for executor in ("inproc", "multiproc"):
        async with make_engine(**FAKE, executor=executor) as eng:
            results[executor] = await run_all(eng, ps, params)
    assert results["multiproc"] == results["inproc"]


# ---- the torch runner on a tiny random checkpoint ----


@pytest.fixture(scope="module")
def tiny_torch_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("aiosched.executors.torch.runner") is None:
        pytest.skip("executors/torch/runner.py is not there yet")
    random_checkpoint = pytest.importorskip("aiosched.executors.torch.random_checkpoint")
    path = tmp_path_factory.mktemp("tiny-llama")
    random_checkpoint.write_random_checkpoint(path, arch="llama", seed=5)
    return path


def torch_config(model: Path, **kw: object) -> dict:
    return dict(runner="torch", model=str(model), device="cpu", dtype="float32", num_kv_blocks=48, block_size=4,
                max_num_batched_tokens=64, max_model_len=256, **kw)


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_torch_runner_matches_inproc(make_engine, tiny_torch_model: Path, async_scheduling: bool) -> None:
    ps = prompts(6)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    results = {}
    for executor in ("inproc", "multiproc"):
        async with make_engine(**torch_config(tiny_torch_model, executor=executor, async_scheduling=async_scheduling)) as eng:
            results[executor] = await run_all(eng, ps, params)
    assert results["multiproc"] == results["inproc"]
    assert all(len(t) == 10 for t in results["inproc"])


# ---- failures ----


def _long() -> SamplingParams:
    return SamplingParams(max_tokens=3000, temperature=0.0)


async def _await(stream):
    return await stream


@pytest.mark.parametrize("tp,victim", [(1, 0), (2, 1)])
async def test_sigkill_fails_pending_fast_and_leaves_no_orphans(make_engine, tp: int, victim: int) -> None:
    eng = make_engine(executor="multiproc", runner="fake", tensor_parallel_size=tp, num_kv_blocks=1024, block_size=16)
    await eng.start()
    pids = eng._executor.worker_pids
    assert len(pids) == tp and all(proc_state(p) in "RS" for p in pids)
    streams = [eng.generate(p, _long()) for p in prompts(4)]
    await asyncio.sleep(0.3)  # mid-generation
    assert not eng.is_dead
    t0 = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    for s in streams:
        with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
            await asyncio.wait_for(_await(s), 5.0)
    assert time.monotonic() - t0 < 5.0
    t1 = time.monotonic()
    with pytest.raises(EngineDeadError):
        eng.generate([1, 2, 3], GREEDY)
    assert time.monotonic() - t1 < 0.1, "later generate() must fail fast"
    with pytest.raises(EngineDeadError):
        eng._executor.check_health()
    await eng.shutdown()
    assert wait_gone(pids, 30.0) == [], "workers left behind (or zombies)"
    assert not set(pids) & set(children_of(os.getpid()))
    # a new engine starts cleanly afterwards
    async with make_engine(**FAKE, executor="multiproc", tensor_parallel_size=tp) as eng2:
        ps = prompts(4)
        assert await run_all(eng2, ps) == [reference_tokens(p, GREEDY.max_tokens) for p in ps]


async def test_stopped_worker_is_detected(make_engine) -> None:
    eng = make_engine(executor="multiproc", runner="fake", num_kv_blocks=1024, block_size=16, worker_timeout_s=1.0)
    await eng.start()
    pid = eng._executor.worker_pids[0]
    stream = eng.generate([1, 2, 3], _long())
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(EngineDeadError, match=r"is stopped \(process state T\)"):
            await asyncio.wait_for(_await(stream), 5.0)
        assert time.monotonic() - t0 < 2.5
    finally:
        t1 = time.monotonic()
        await eng.shutdown()  # SIGTERM is not delivered to a stopped process: shutdown must SIGKILL it
    assert time.monotonic() - t1 < 5.0
    assert wait_gone([pid], 30.0) == []


class CrashingRunner(FakeModelRunner):
    """Raises in the 4th step: a runner bug must surface as EngineDeadError with its message."""

    def execute(self, so):  # type: ignore[override]
        if self.steps == 3:
            raise RuntimeError("boom in step 3")
        return super().execute(so)


class FailingLoadRunner(FakeModelRunner):
    def load(self):  # type: ignore[override]
        raise OSError("weights not found: /nowhere")


class BigKVRunner(FakeModelRunner):
    """Rank 1 claims a different KV size: the engine must refuse to start."""

    def load(self):  # type: ignore[override]
        info = super().load()
        if self.rank == 1:
            info.num_kv_blocks += 1
        return info


def hold_the_interpreter_lock(seconds: float) -> None:
    """Block this thread *with* the GIL held, as `import torch` or a long C call can.

    ctypes.PyDLL calls keep the lock (CDLL calls release it), so no other thread of
    the process runs meanwhile: a heartbeat thread in Python would fall silent."""
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))


class SlowImportRunner(FakeModelRunner):
    """Loading holds the interpreter lock for 3x worker_timeout_s (a starved start)."""

    def load(self):  # type: ignore[override]
        hold_the_interpreter_lock(3 * self.config.worker_timeout_s)
        return super().load()


class LongStepRunner(FakeModelRunner):
    """The third step holds the interpreter lock for 3x worker_timeout_s (a long compute)."""

    def execute(self, so):  # type: ignore[override]
        if self.steps == 2:
            hold_the_interpreter_lock(3 * self.config.worker_timeout_s)
        return super().execute(so)


def _register(name: str, runner: type) -> None:
    path = f"{runner.__module__}:{runner.__qualname__}"
    register_executor(name, lambda config: MultiprocExecutor(config, runner_factory=path))


async def test_runner_exception_is_engine_dead(make_engine) -> None:
    _register("mp-crashing", CrashingRunner)
    eng = make_engine(executor="mp-crashing", runner="fake", num_kv_blocks=64, block_size=16)
    await eng.start()
    pids = eng._executor.worker_pids
    with pytest.raises(EngineDeadError, match="boom in step 3"):
        await asyncio.wait_for(_await(eng.generate([1, 2], GREEDY)), 5.0)
    await eng.shutdown()
    assert wait_gone(pids, 30.0) == []


@pytest.mark.parametrize("runner,match", [(FailingLoadRunner, "weights not found"), (BigKVRunner, "disagree on num_kv_blocks")])
async def test_startup_failure_is_clear_and_clean(make_engine, runner: type, match: str) -> None:
    _register("mp-bad-start", runner)
    eng = make_engine(executor="mp-bad-start", runner="fake", tensor_parallel_size=2, num_kv_blocks=64, block_size=16)
    before = set(children_of(os.getpid()))
    with pytest.raises(EngineDeadError, match=match):
        await eng.start()
    assert wait_gone(spawned_since(before), 30.0) == []


@pytest.mark.parametrize("runner", [SlowImportRunner, LongStepRunner])
@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_a_busy_worker_is_not_a_dead_one(make_engine, runner: type, async_scheduling: bool) -> None:
    """Issue 16.5: a worker whose own load or step starves its threads for longer than
    worker_timeout_s still starts and serves; only a stopped or exited worker is dead."""
    _register(f"mp-{runner.__name__}", runner)
    async with make_engine(**FAKE, executor=f"mp-{runner.__name__}", async_scheduling=async_scheduling,
                           worker_timeout_s=0.4) as eng:
        ps = prompts(4)
        assert await run_all(eng, ps) == [reference_tokens(p, GREEDY.max_tokens) for p in ps]
        assert not eng.is_dead


async def test_start_timeout_is_separate_and_clear(make_engine) -> None:
    """Not ready within worker_start_timeout_s: a clear error naming the setting (and no silence deadline before)."""
    _register("mp-slow-start", SlowImportRunner)
    eng = make_engine(**FAKE, executor="mp-slow-start", worker_timeout_s=0.5, worker_start_timeout_s=0.6)
    # (on a loaded machine the spawn itself may take longer than 0.6 s: either phase, one budget)
    with pytest.raises(EngineDeadError, match=r"rank 0 \(pid \d+\).* within 0.6s.*worker_start_timeout_s"):
        await eng.start()
    await eng.shutdown()


async def test_startup_timeout_is_clear(make_engine, monkeypatch) -> None:
    monkeypatch.setattr(MultiprocExecutor, "connect_timeout_s", 0.5)
    monkeypatch.setattr("aiosched.executors.multiproc.worker_main", _sleep_forever)
    eng = make_engine(executor="multiproc", runner="fake")
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"no answer from worker rank 0 \(pid \d+\) within"):
        await eng.start()
    assert time.monotonic() - t0 < 5.0


def _sleep_forever(*args: object) -> None:
    time.sleep(3600)


# ---- hostile frames straight to a worker's socket ----


def _tiny_step(step_id: int, req: str, new: bool, computed: int, tokens: list[int]) -> SchedulerOutput:
    news = [NewRequestData(req, tokens, len(tokens), SamplingParams(max_tokens=4, temperature=0), 0)] if new else []
    n = len(tokens) if new else 1
    blocks = [0, 1] if new else []
    return SchedulerOutput(step_id, news, [ScheduledRequest(req, n, computed, blocks, True)], [], n)


def test_worker_survives_malformed_truncated_and_oversized_frames(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "w.sock")
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    proc = multiprocessing.get_context("spawn").Process(
        target=worker_main, args=(path, 0, 1, os.getpid(), {}, None), daemon=True)
    proc.start()
    conn, _ = listener.accept()
    conn.settimeout(10)
    chan = FrameSocket(conn)

    def recv():
        frame = chan.recv()
        assert frame is not None, "the worker hung up"
        return decode_from_worker(frame)

    try:
        assert recv() == Heartbeat(0)  # the worker announces itself
        cfg = EngineConfig(runner="fake", num_kv_blocks=8, block_size=4)
        chan.send(encode(Hello(PROTOCOL_VERSION, cfg, rank=0)))
        assert isinstance(recv(), Ready)
        valid = encode(Execute(_tiny_step(0, "a", True, 0, [1, 2, 3])))
        hostile = [
            (b"", "malformed"),
            (b"\xff\x00garbage", "malformed"),
            (valid[: len(valid) // 2], "malformed"),  # truncated
            (encode({"type": "Execute", "output": {"step_id": "x"}}), "malformed"),  # wrong types
            (encode({"type": "Nope"}), "malformed"),
            (encode({"type": "Ready", "info": {}}), "malformed"),  # a from-worker message
            (b"\x00" * (MAX_FRAME_BYTES + 1), "exceeds the limit"),  # oversized: read, discarded, reported
        ]
        for frame, match in hostile:
            chan.send(frame)
            err = recv()
            assert isinstance(err, WorkerError) and not err.fatal and match in err.message, (frame[:20], err)
            chan.send(encode(Heartbeat(7)))
            assert recv() == Heartbeat(7), "the worker must answer the next valid message"
        chan.send(encode(Hello(PROTOCOL_VERSION, cfg, rank=0)))  # second Hello: refused, session kept
        err = recv()
        assert isinstance(err, WorkerError) and not err.fatal
        chan.send(valid)  # the session still works
        res = recv()
        assert isinstance(res, StepResult) and res.output.req_ids == ["a"]
        tok = res.output.sampled_token_ids[0][0]
        chan.send(encode(Execute(_tiny_step(1, "a", False, 3, [1, 2, 3, tok]))))
        res = recv()
        assert isinstance(res, StepResult) and res.output.step_id == 1
        assert [tok, res.output.sampled_token_ids[0][0]] == reference_tokens([1, 2, 3], 2)
        chan.send(encode(Shutdown()))
        proc.join(10)
        assert proc.exitcode == 0
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        chan.close()
        listener.close()


def test_worker_exits_when_the_engine_closes_the_connection(tmp_path: Path) -> None:
    """End of stream is how a worker learns its engine is gone (the kernel closes a dead engine's sockets)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "w.sock")
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    proc = multiprocessing.get_context("spawn").Process(
        target=worker_main, args=(path, 0, 1, os.getpid(), {}, None), daemon=True)
    proc.start()
    try:
        conn, _ = listener.accept()
        chan = FrameSocket(conn)
        assert decode_from_worker(chan.recv()) == Heartbeat(0)
        chan.send(encode(Hello(PROTOCOL_VERSION, EngineConfig(runner="fake", num_kv_blocks=8, block_size=4), rank=0)))
        assert isinstance(decode_from_worker(chan.recv()), Ready)
        chan.close()
        proc.join(10)
        assert proc.exitcode == 0
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        listener.close()


async def test_bad_frames_through_the_executor_are_reported_not_fatal(make_engine) -> None:
    async with make_engine(**FAKE, executor="multiproc") as eng:
        ex: MultiprocExecutor = eng._executor
        streams = [eng.generate(p, GREEDY) for p in prompts(6)]
        ex._send(0, b"\x93garbage")
        ex._send(0, encode(Execute(_tiny_step(10**6, "x", False, 0, [1])))[:-3])
        outs = [o.token_ids for o in await asyncio.gather(*streams)]
        assert outs == [reference_tokens(p, GREEDY.max_tokens) for p in prompts(6)]
        assert len(ex.worker_errors) == 2 and not eng.is_dead


# ---- process lifetime ----

_SCRIPT = textwrap.dedent("""
    import asyncio, os, sys
    sys.path.insert(0, {root!r})
    from aiosched import AsyncEngine, SamplingParams

    async def main():
        async with AsyncEngine.from_config(executor="multiproc", runner="fake", tensor_parallel_size=2,
                                           num_kv_blocks=256, block_size=16) as eng:
            out = await eng.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
            print("PIDS", *eng._executor.worker_pids, flush=True)
            stream = eng.generate([4, 5, 6], SamplingParams(max_tokens=3000, temperature=0))
            async for _ in stream:
                await asyncio.sleep(0.01)

    if __name__ == "__main__":
        asyncio.run(main())
""")


def _start_engine_script(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "engine_script.py"
    script.write_text(_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("PIDS"), line + proc.stderr.read() if proc.stderr else ""
    return proc, [int(x) for x in line.split()[1:]]


def test_workers_exit_when_the_engine_process_is_killed(tmp_path: Path) -> None:
    proc, pids = _start_engine_script(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        assert wait_gone(pids, 30.0) == [], "workers outlived a SIGKILLed engine"
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_shuts_down_cleanly(tmp_path: Path) -> None:
    proc, pids = _start_engine_script(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # like a terminal: the whole process group gets SIGINT
        proc.wait(60)
        assert wait_gone(pids, 30.0) == []
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in stderr or "KeyboardInterrupt" in stderr, stderr
        assert "did not exit" not in stderr, stderr
    finally:
        proc.kill()
        proc.wait()
