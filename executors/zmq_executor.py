"""Engine side shared by the socket executors (`multiproc`, `remote`).

Owns what does not depend on the transport:

- step futures, resolved in submission order by the StepResult of peer 0 (rank 0);
  other ranks' results are drained and ignored;
- the startup handshake: wait for every peer's first word (`connect_timeout_s`),
  send `Hello`, wait for every `Ready` (`worker_start_timeout_s`), check protocol
  version and that all ranks agree on the KV cache size and model limits;
- liveness, after a peer reported `Ready` only: a slow start (imports, loading,
  a loaded machine) is not a dead worker, the start timeout covers it. Then either
  the subclass checks its peers itself (`_check_peers`: the multiproc executor
  watches its worker processes, which nothing inside them can delay) or, with
  `silence_deadline`, every `worker_timeout_s / 10` each peer gets a `Heartbeat`
  and a peer silent for `worker_timeout_s` is declared dead (remote workers);
- failure: the first fatal event fails every pending future with
  `EngineDeadError`, later `submit`s fail at once and `check_health` raises.

Subclasses provide the transport: `peer_names`, `_open`, `_send`, `_recv` (or
they push frames to `_on_frame` themselves and set `push_frames`),
`_close_transport`, and optionally `_stop_workers` / `_on_dead` / `_check_peers`.
Everything runs on the engine's event loop; nothing here blocks it.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from aiosched.config import EngineConfig
from aiosched.errors import EngineDeadError
from aiosched.protocol import (
    PROTOCOL_VERSION,
    Execute,
    Heartbeat,
    Hello,
    Ready,
    RunnerOutput,
    SchedulerOutput,
    Shutdown,
    StepResult,
    WorkerError,
    WorkerInfo,
    decode_from_worker,
    encode,
)
from aiosched.executors.base import Executor

log = logging.getLogger("aiosched.executor")

_AGREED_FIELDS = ("num_kv_blocks", "block_size", "vocab_size", "max_model_len", "runner")


def disagreement(names: list[str], infos: list[WorkerInfo]) -> str | None:
    """Why these ranks' Ready infos cannot serve one engine (protocol, KV size, limits), or None."""
    for name, info in zip(names, infos):
        if info.protocol_version != PROTOCOL_VERSION:
            return f"worker {name} speaks protocol {info.protocol_version}, the engine {PROTOCOL_VERSION}"
    first = infos[0]
    for name, info in zip(names[1:], infos[1:]):
        for field in _AGREED_FIELDS:
            if getattr(info, field) != getattr(first, field):
                return (f"workers disagree on {field}: {names[0]} has {getattr(first, field)!r}, "
                        f"{name} has {getattr(info, field)!r}")
    return None


class ZmqExecutor(Executor):
    connect_timeout_s: float = 60.0  # first word from every peer (process spawn, imports, TCP connect)
    probe_before_heard: bool = False  # send heartbeats to peers we have not heard from yet
    connect_hint: str = ""  # appended to the "no answer" startup error
    silence_deadline: bool = True  # heartbeats, and a Ready peer silent for worker_timeout_s is dead
    push_frames: bool = False  # the transport calls _on_frame itself (no _recv loop)
    one_start_budget: bool = False  # connecting and loading share startup_timeout_s (else each has its own)

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[tuple[int, asyncio.Future[RunnerOutput]]] = deque()
        self._dead: str | None = None
        self._closing = False
        self._shut_down = False
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._hb_seq = itertools.count(1)
        self._last_seen: list[float | None] = []
        self._infos: list[WorkerInfo | None] = []
        self.worker_errors: list[str] = []  # non-fatal errors workers reported (bad frames)

    # ---- transport hooks ----

    @property
    @abstractmethod
    def peer_names(self) -> list[str]:
        """One human-readable name per peer (rank), used in errors."""

    @abstractmethod
    async def _open(self) -> None:
        """Create sockets and start or reach the workers."""

    @abstractmethod
    def _send(self, peer: int, frame: bytes) -> None:
        """Queue one frame for one peer without blocking; raise if it cannot be sent."""

    @abstractmethod
    async def _recv(self) -> tuple[int, list[Any]]:
        """The next message: (peer index, its frames)."""

    @abstractmethod
    async def _close_transport(self) -> None:
        """Close sockets and the context (after the workers were told to stop)."""

    def _config_for_workers(self) -> EngineConfig:
        """The config sent in Hello."""
        return self.config

    async def _stop_workers(self) -> None:
        """Wait for (or force) worker exit after Shutdown was sent."""

    def _on_dead(self) -> None:
        """Called once when the executor is declared dead."""

    def _check_peers(self, now: float) -> None:
        """Called every heartbeat interval: a subclass's own liveness checks (call `_die`)."""

    @property
    def startup_timeout_s(self) -> float:
        """Every Ready within this (model loading; no silence deadline before it)."""
        return self.config.worker_start_timeout_s

    # ---- Executor API ----

    async def start(self) -> WorkerInfo:
        self._loop = asyncio.get_running_loop()
        n = len(self.peer_names)
        self._last_seen = [None] * n
        self._infos = [None] * n
        await self._open()
        if not self.push_frames:
            self._tasks.append(self._loop.create_task(self._recv_loop(), name="aiosched-zmq-recv"))
        self._tasks.append(self._loop.create_task(self._heartbeat_loop(), name="aiosched-zmq-heartbeat"))
        if self.probe_before_heard:
            self._send_all(encode(Heartbeat(0)))
        t0 = time.monotonic()
        await self._wait_for(lambda: all(t is not None for t in self._last_seen), self.connect_timeout_s,
                             lambda: f"no answer from {self._unheard()} within {self.connect_timeout_s:g}s{self.connect_hint}")
        for peer in range(n):
            self._send_checked(peer, encode(Hello(PROTOCOL_VERSION, self._config_for_workers(), rank=peer)))
        budget = self.startup_timeout_s - (time.monotonic() - t0 if self.one_start_budget else 0.0)
        await self._wait_for(lambda: all(i is not None for i in self._infos), budget,
                             lambda: f"{self._unready()} did not finish loading within {self.startup_timeout_s:g}s "
                                     "(worker_start_timeout_s)")
        return self._agree([i for i in self._infos if i is not None])

    def submit(self, output: SchedulerOutput) -> "asyncio.Future[RunnerOutput]":
        assert self._loop is not None, "executor not started"
        fut: asyncio.Future[RunnerOutput] = self._loop.create_future()
        if self._dead is not None:
            fut.set_exception(EngineDeadError(self._dead))
            return fut
        self._pending.append((output.step_id, fut))
        self._send_all(encode(Execute(output)))
        return fut

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    async def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        self._closing = True
        if self._last_seen:  # also after a failure: a remote worker then ends the session at once
            for peer in range(len(self._last_seen)):
                if self._last_seen[peer] is not None:
                    with contextlib.suppress(Exception):
                        self._send(peer, encode(Shutdown()))
        await self._stop_workers()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self._close_transport()
        if self._dead is None:
            self._dead = "executor was shut down"
        self._fail_pending(self._dead)

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    # ---- internals ----

    def _unheard(self) -> str:
        names = [self.peer_names[i] for i, t in enumerate(self._last_seen) if t is None]
        return "worker " + ", ".join(names)

    def _unready(self) -> str:
        names = [self.peer_names[i] for i, info in enumerate(self._infos) if info is None]
        return "worker " + ", ".join(names)

    async def _wait_for(self, done: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._die(describe())
                raise EngineDeadError(self._dead)
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.25))

    def _agree(self, infos: list[WorkerInfo]) -> WorkerInfo:
        problem = disagreement(self.peer_names, infos)
        if problem is not None:
            self._die(problem)
            raise EngineDeadError(self._dead)
        return infos[0]

    def _send_checked(self, peer: int, frame: bytes) -> None:
        try:
            self._send(peer, frame)
        except Exception as e:
            self._die(f"sending to worker {self.peer_names[peer]} failed: {e}")

    def _send_all(self, frame: bytes) -> None:
        for peer in range(len(self._last_seen)):
            if self._dead is not None:
                return
            self._send_checked(peer, frame)

    async def _recv_loop(self) -> None:
        try:
            while self._dead is None:
                peer, parts = await self._recv()
                if len(parts) != 1:
                    self._die(f"worker {self.peer_names[peer]} sent a message of {len(parts)} frames")
                    return
                frame = parts[0]
                self._on_frame(peer, frame.buffer if isinstance(frame, zmq.Frame) else frame)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self._closing:
                self._die(f"receiving from workers failed: {e!r}")

    def _on_frame(self, peer: int, frame: bytes | memoryview) -> None:
        """One message from a peer (on the loop)."""
        if self._dead is not None:
            return
        self._last_seen[peer] = time.monotonic()
        try:
            msg = decode_from_worker(frame)
        except ValueError as e:
            self._die(f"worker {self.peer_names[peer]} sent a malformed message: {e}")
            return
        self._dispatch(peer, msg)
        if not isinstance(msg, StepResult):  # only the startup waits care; keep the step path lean
            self._changed.set()

    def _dispatch(self, peer: int, msg: Any) -> None:
        if isinstance(msg, StepResult):
            if peer == 0:
                self._resolve(msg.output)
        elif isinstance(msg, Heartbeat):
            pass
        elif isinstance(msg, Ready):
            if self._infos[peer] is None:
                self._infos[peer] = msg.info
        elif isinstance(msg, WorkerError):
            if msg.fatal:
                self._die(f"worker {self.peer_names[peer]} failed: {msg.message}")
            else:
                log.warning("worker %s rejected a message: %s", self.peer_names[peer], msg.message)
                self.worker_errors.append(msg.message)

    def _resolve(self, out: RunnerOutput) -> None:
        if not self._pending:
            self._die(f"worker returned step {out.step_id}, but no step is pending")
            return
        step_id, fut = self._pending.popleft()
        if step_id != out.step_id:
            self._pending.appendleft((step_id, fut))
            self._die(f"worker returned step {out.step_id} while step {step_id} was expected")
            return
        if not fut.done():
            fut.set_result(out)

    async def _heartbeat_loop(self) -> None:
        timeout = self.config.worker_timeout_s
        interval = min(1.0, timeout / 10)
        last_tick = time.monotonic()
        while self._dead is None:
            await asyncio.sleep(interval)
            now = time.monotonic()
            stalled = now - last_tick > 3 * interval  # our own loop was blocked: let recv catch up first
            last_tick = now
            self._check_peers(now)
            if not self.silence_deadline or self._dead is not None:
                continue
            frame = encode(Heartbeat(next(self._hb_seq)))
            for peer, seen in enumerate(self._last_seen):
                if seen is None:
                    if self.probe_before_heard:
                        self._send_checked(peer, frame)
                    continue
                # Only once the peer is Ready: before, it may be importing or loading
                # with its interpreter lock held for long stretches (the start timeout covers that).
                if not stalled and self._infos[peer] is not None and now - seen > timeout:
                    self._die(f"worker {self.peer_names[peer]} sent nothing for {now - seen:.1f}s "
                              f"(worker_timeout_s={timeout}): hung or unreachable")
                    return
                self._send_checked(peer, frame)

    def _die(self, reason: str) -> None:
        """Declare the executor dead: fail everything pending; first reason wins."""
        if self._dead is not None:
            return
        self._dead = reason
        if not self._closing:
            log.error("executor dead: %s", reason)
        self._fail_pending(reason)
        self._changed.set()
        self._on_dead()

    def _fail_pending(self, reason: str) -> None:
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
                fut.exception()  # mark retrieved: the engine awaits only the oldest step
