"""The worker side of the out-of-process executors (`multiproc` and `remote`).

A worker serves one engine *session* at a time: `Hello` starts it (load the runner,
answer `Ready(WorkerInfo)`), `Execute` runs steps, `Shutdown` ends it. Three threads:

- the IO thread (whoever calls `serve_engine` or the remote server's loop) is the
  only one touching the engine socket. It decodes every frame strictly (size
  first), answers `Heartbeat`s at once (also while a model loads or a step runs),
  queues `Hello`/`Execute` for the launch thread and forwards finished replies;
- the launch thread loads the runner and calls `runner.execute(so)` for each step in
  submission order. `execute` only launches the step;
- the result thread waits for each step's `.result()` and sends the encoded
  `StepResult` (and `Ready`, and fatal errors, in order) on a socket of its own:
  in a multiproc worker a second DEALER connected to the engine (so results skip
  the IO thread; measured: ~1.6x the pipelined step rate at batch 256), in the
  remote server an inproc PAIR back to the IO thread, which owns the one bound
  ROUTER. ZeroMQ sockets are single-threaded: each is owned by one thread.

So step N+1 is launched while step N's tokens are still on their way to the host,
as in the in-process executor.

Bad input never takes a worker down: a malformed, truncated, oversized or
multi-part frame, or a message that does not fit the session state, is answered
with `WorkerError(fatal=False)` and the worker keeps serving. A runner failure is
`WorkerError(fatal=True)`: the worker's model state is then unknown, so the session
refuses further steps.

`serve_engine` is the multiproc worker process: a DEALER socket connected to the
engine's ROUTER, one session, and an exit as soon as the engine process is gone
(parent pid changes) or silent for too long, so no worker outlives its engine.
"""
from __future__ import annotations

import gc
import importlib
import itertools
import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import zmq

from aiosched.config import EngineConfig
from aiosched.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Execute,
    Heartbeat,
    Hello,
    Ready,
    SchedulerOutput,
    Shutdown,
    StepResult,
    ToWorker,
    WorkerError,
    decode_to_worker,
    encode,
)
from aiosched.executors.runner import ModelRunner, PendingOutput, create_runner

log = logging.getLogger("aiosched.worker")

POLL_MS = 200  # IO loop wake-up period: parent-death and silence checks
JOIN_TIMEOUT_S = 10.0  # how long closing a session waits for a busy runner thread
_STOP = object()
_session_ids = itertools.count()

RunnerFactory = Callable[[EngineConfig, int, int], ModelRunner]
ConfigHook = Callable[[EngineConfig], EngineConfig]


def error_frame(message: str, fatal: bool) -> bytes:
    return encode(WorkerError(message=message[:8000], fatal=fatal))


def rank_identity(rank: int) -> bytes:
    """The ZeroMQ routing id a multiproc worker of this rank connects with."""
    return b"rank-%d" % rank


def result_identity(rank: int) -> bytes:
    """The routing id of a multiproc worker's result socket."""
    return b"rank-%d-results" % rank


def parse_frames(parts: list[Any], limit: int = MAX_FRAME_BYTES) -> tuple[ToWorker | None, bytes | None]:
    """Decode one ZeroMQ message (a list of frames): (message, None) or (None, error reply)."""
    if len(parts) != 1:
        return None, error_frame(f"expected a message of one frame, got {len(parts)} frames", fatal=False)
    frame = parts[0]
    buf = frame.buffer if isinstance(frame, zmq.Frame) else frame
    try:
        return decode_to_worker(buf, limit), None
    except ValueError as e:
        return None, error_frame(str(e), fatal=False)


def resolve_runner_factory(path: str | None) -> RunnerFactory:
    """`None` -> `create_runner`; else a 'module:Class' path (tests and benchmarks)."""
    if path is None:
        return create_runner
    module, _, attr = path.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return lambda config, rank, world_size: cls(config, rank=rank, world_size=world_size)


def _describe(e: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-6))
    return f"{type(e).__name__}: {e}\n{tb}"


class Session:
    """One engine session: the runner and its launch/result threads.

    `handle(msg)` runs on the IO thread and returns an immediate reply (or None).
    Replies produced later (Ready, StepResult, fatal errors) go out on the socket
    `reply_socket(ctx)` makes in the result thread when given; otherwise the IO
    thread reads them from `replies` with `pending_replies()` and forwards them.
    """

    def __init__(self, ctx: zmq.Context, *, rank: int = 0, world_size: int = 1,
                 prepare: ConfigHook | None = None, runner_factory: RunnerFactory = create_runner,
                 reply_socket: Callable[[zmq.Context], zmq.Socket] | None = None) -> None:
        self.rank = rank
        self._reply_socket = reply_socket
        self.world_size = world_size
        self._prepare = prepare or (lambda c: c)
        self._runner_factory = runner_factory
        self._ctx = ctx
        self._addr = f"inproc://aiosched-session-{os.getpid()}-{next(_session_ids)}"
        self.replies: zmq.Socket = ctx.socket(zmq.PAIR)
        self.replies.linger = 0
        self.replies.bind(self._addr)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._launched: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.runner: ModelRunner | None = None
        self.config: EngineConfig | None = None
        self.failed: str | None = None  # set once a fatal error was produced
        self.last_heard = time.monotonic()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    # ---- IO thread ----

    def handle(self, msg: ToWorker) -> tuple[bytes | None, bool]:
        """Apply one decoded message: (immediate reply or None, session over)."""
        self.last_heard = time.monotonic()
        if isinstance(msg, Heartbeat):
            return encode(msg), False
        if isinstance(msg, Shutdown):
            return None, True
        if isinstance(msg, Hello):
            return self._hello(msg), False
        if isinstance(msg, Execute):
            if not self.started:
                return error_frame(f"Execute (step {msg.output.step_id}) before Hello: ignored", fatal=False), False
            if self.failed is None:
                self._jobs.put(msg.output)
            return None, False
        return error_frame(f"unexpected message {type(msg).__name__}", fatal=False), False  # pragma: no cover

    def _hello(self, msg: Hello) -> bytes | None:
        if self.started:
            return error_frame("session already started: second Hello ignored", fatal=False)
        if msg.protocol_version != PROTOCOL_VERSION:
            return error_frame(f"protocol version mismatch: engine speaks {msg.protocol_version}, worker speaks {PROTOCOL_VERSION}", fatal=True)
        if msg.rank != self.rank:
            return error_frame(f"Hello for rank {msg.rank} reached the worker of rank {self.rank}", fatal=True)
        try:
            config = self._prepare(msg.config)
            config.validate()
        except ValueError as e:
            return error_frame(f"config refused by the worker: {e}", fatal=True)
        self.config = config
        self._threads = [
            threading.Thread(target=self._launch_loop, name="aiosched-worker-launch", daemon=True),
            threading.Thread(target=self._result_loop, name="aiosched-worker-results", daemon=True),
        ]
        for th in self._threads:
            th.start()
        return None

    def pending_replies(self) -> list[zmq.Frame]:
        """Replies the result thread finished since the last call (non-blocking)."""
        out: list[zmq.Frame] = []
        while True:
            try:
                out.append(self.replies.recv(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                return out

    def close(self) -> bool:
        """End the session: stop the threads, release the runner, close sockets.

        False when a runner thread is stuck (it may still hold a socket): the caller
        must then not `term()` the ZeroMQ context, which would wait for it forever."""
        clean = True
        if self._threads:
            self._jobs.put(_STOP)
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            for th in self._threads:
                th.join(max(0.0, deadline - time.monotonic()))
            stuck = [th.name for th in self._threads if th.is_alive()]
            self._threads = []
            clean = not stuck
            if stuck:
                log.warning("session closed with busy threads %s; runner not shut down", stuck)
            elif self.runner is not None:
                try:
                    self.runner.shutdown()
                except Exception:
                    log.exception("runner.shutdown failed")
            self.runner = None
            gc.unfreeze()  # what the load froze may now be garbage (a remote worker serves on)
            gc.collect()
        self.replies.close(linger=0)
        return clean

    # ---- launch thread ----

    def _launch_loop(self) -> None:
        assert self.config is not None
        try:
            self.runner = self._runner_factory(self.config, self.rank, self.world_size)
            info = self.runner.load()
            # As in the engine: the model and modules leave the GC's view, so collections stay short.
            gc.collect()
            gc.freeze()
            self._launched.put(encode(Ready(info)))
        except BaseException as e:
            self._fail(f"loading the {self.config.runner} runner failed: {_describe(e)}")
        while (job := self._jobs.get()) is not _STOP:
            if self.failed is not None:
                continue
            so: SchedulerOutput = job
            try:
                assert self.runner is not None
                self._launched.put(self.runner.execute(so))
            except BaseException as e:
                self._fail(f"step {so.step_id} failed: {_describe(e)}")
        self._launched.put(_STOP)

    def _fail(self, message: str) -> None:
        log.error("%s", message)
        self.failed = message
        self._launched.put(error_frame(message, fatal=True))

    # ---- result thread ----

    def _result_loop(self) -> None:
        if self._reply_socket is not None:
            out = self._reply_socket(self._ctx)
        else:
            out = self._ctx.socket(zmq.PAIR)
            out.linger = 0
            out.connect(self._addr)
        try:
            while (item := self._launched.get()) is not _STOP:
                if isinstance(item, bytes):
                    out.send(item, copy=False)
                    continue
                pending: PendingOutput = item
                try:
                    frame = encode(StepResult(pending.result()))
                except BaseException as e:
                    self.failed = f"step failed: {_describe(e)}"
                    log.error("%s", self.failed)
                    frame = error_frame(self.failed, fatal=True)
                out.send(frame, copy=False)
        finally:
            out.close(linger=0)


# ---- the multiproc worker process ----


def silence_limit(config: EngineConfig | None) -> float:
    """How long a multiproc worker waits for a silent engine before exiting."""
    return 120.0 if config is None else max(30.0, 6 * config.worker_timeout_s)


def serve_engine(sock: zmq.Socket, session: Session, *, parent_pid: int | None = None,
                 stop: threading.Event | None = None) -> str:
    """Serve one session on a DEALER socket until it ends; returns why it ended."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(session.replies, zmq.POLLIN)
    while True:
        events = dict(poller.poll(POLL_MS))
        if session.replies in events:
            for frame in session.pending_replies():
                sock.send(frame, copy=False)
        if sock in events:
            while True:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                msg, reply = parse_frames(parts)
                over = False
                if msg is not None:
                    session.last_heard = time.monotonic()
                    reply, over = session.handle(msg)
                if reply is not None:
                    sock.send(reply, copy=False)
                if over:
                    return "shutdown requested"
        if parent_pid is not None and os.getppid() != parent_pid:
            return f"engine process {parent_pid} is gone"
        limit = silence_limit(session.config)
        if time.monotonic() - session.last_heard > limit:
            return f"engine silent for {limit:.0f}s"
        if stop is not None and stop.is_set():
            return "stopped"


def worker_main(address: str, rank: int, world_size: int, parent_pid: int,
                env: dict[str, str] | None = None, runner_factory: str | None = None) -> None:
    """Entry point of a multiproc worker process (spawn context)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the engine, which shuts us down
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    os.environ.update(env or {})
    logging.basicConfig(level=logging.WARNING, format=f"[worker rank {rank}] %(levelname)s %(message)s")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0
    sock.routing_id = rank_identity(rank)
    sock.connect(address)
    def reply_socket(ctx: zmq.Context) -> zmq.Socket:
        """The result thread's own connection to the engine: results skip the IO thread."""
        out = ctx.socket(zmq.DEALER)
        out.linger = 0
        out.sndhwm = 0
        out.routing_id = result_identity(rank)
        out.connect(address)
        return out

    session = Session(ctx, rank=rank, world_size=world_size, runner_factory=resolve_runner_factory(runner_factory),
                      reply_socket=reply_socket)
    try:
        sock.send(encode(Heartbeat(0)))  # announce ourselves: the engine's ROUTER now knows our id
        why = serve_engine(sock, session, parent_pid=parent_pid, stop=stop)
        log.info("worker exiting: %s", why)
    finally:
        clean = session.close()
        sock.close(linger=0)
        if clean:
            ctx.term()
