"""The worker side of the out-of-process executors (`multiproc`, `remote`, `ray`).

A worker serves one engine *session* at a time: `Hello` starts it (load the runner,
answer `Ready(WorkerInfo)`), `Execute` runs steps, `Shutdown` ends it. `Session`
holds the step logic every transport shares: strict decoding, the launch of each
step in submission order (`runner.execute(so)` only launches it), the wait for its
tokens (`PendingOutput.result()`) and the encoded replies, in order: `Ready`, then
one `StepResult` per step, or a fatal `WorkerError`. Replies go to an *emitter*
(a callable taking the encoded frame) that the transport provides.

Two ways to drive a session:

- threaded (remote server, Ray actor): `handle()` runs on the transport's thread
  and returns at once; a launch thread loads the runner and launches the steps, a
  result thread waits for each step's tokens and emits the replies. The transport
  thread stays free for heartbeats and other clients while a step runs.
- inline (multiproc worker): the thread that reads the socket loads the runner and
  launches each step itself; with async scheduling a result thread waits for the
  tokens (so step N+1 is launched while step N's tokens are on their way), in sync
  mode the same thread waits and replies. A sync step thus crosses two thread
  wake-ups in the worker process in all (engine -> reader, reader -> engine)
  instead of the six a ZeroMQ + three-thread pipeline costs (issue 17).

Bad input never takes a worker down: a malformed, truncated or oversized frame, or
a message that does not fit the session state, is answered with
`WorkerError(fatal=False)` and the worker keeps serving. A runner failure is
`WorkerError(fatal=True)`: the worker's model state is then unknown, so the session
refuses further steps.

`worker_main` is the multiproc worker process: one Unix stream socket to the engine
(length-prefixed frames, `FrameSocket`), one session, and an exit as soon as the
engine closes the connection (which the kernel does when the engine process dies,
however it dies), so no worker outlives its engine. Liveness needs no heartbeat
thread here: the engine watches the worker process itself (exit, stopped state),
which nothing inside the worker (an import holding the interpreter lock, a long
step) can delay (issue 16, item 5).
"""
from __future__ import annotations

import gc
import importlib
import itertools
import logging
import os
import queue
import signal
import socket
import struct
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

POLL_MS = 200  # remote server loop wake-up period: silence checks
JOIN_TIMEOUT_S = 10.0  # how long closing a session waits for a busy runner thread
_STOP = object()
_session_ids = itertools.count()

RunnerFactory = Callable[[EngineConfig, int, int], ModelRunner]
ConfigHook = Callable[[EngineConfig], EngineConfig]
Emit = Callable[[bytes], None]
# Called on each thread that emits (once): returns that thread's emitter and its closer.
EmitterFactory = Callable[[], tuple[Emit, Callable[[], None]]]


def error_frame(message: str, fatal: bool) -> bytes:
    return encode(WorkerError(message=message[:8000], fatal=fatal))


def parse_frames(parts: list[Any], limit: int = MAX_FRAME_BYTES) -> tuple[ToWorker | None, bytes | None]:
    """Decode one message (a list of frames): (message, None) or (None, error reply)."""
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
    """One engine session: the runner, its launch and result logic, the replies.

    `handle(msg)` returns an immediate reply (or None) and whether the session is
    over. Later replies (Ready, StepResult, fatal errors) go to the emitter that
    `emitter` makes on the thread that sends them. Without `emitter` (the remote
    server) they go to an inproc PAIR socket that the server's IO thread reads with
    `pending_replies()` (ZeroMQ sockets are single-threaded: each is owned by one
    thread). `inline=True` runs loading and launching on the caller's thread.
    """

    def __init__(self, ctx: zmq.Context | None = None, *, rank: int = 0, world_size: int = 1,
                 prepare: ConfigHook | None = None, runner_factory: RunnerFactory = create_runner,
                 emitter: EmitterFactory | None = None, inline: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self._prepare = prepare or (lambda c: c)
        self._runner_factory = runner_factory
        self._inline = inline
        self.replies: zmq.Socket | None = None
        if emitter is None:
            if ctx is None:
                raise ValueError("Session needs a ZeroMQ context or an emitter")
            addr = f"inproc://aiosched-session-{os.getpid()}-{next(_session_ids)}"
            self.replies = ctx.socket(zmq.PAIR)
            self.replies.linger = 0
            self.replies.bind(addr)
            emitter = _pair_emitter(ctx, addr)
        self._emitter = emitter
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._launched: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._direct: tuple[Emit, Callable[[], None]] | None = None  # the caller thread's emitter (inline)
        self._started = False
        self.runner: ModelRunner | None = None
        self.config: EngineConfig | None = None
        self.failed: str | None = None  # set once a fatal error was produced
        self.last_heard = time.monotonic()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def _sync(self) -> bool:
        """One step in flight at a time: the launching thread can wait for the tokens itself."""
        return self.config is not None and not self.config.async_scheduling

    # ---- the caller's thread ----

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
                if self._inline:
                    self._launch(msg.output)
                else:
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
        self._started = True
        if self._inline:
            if not self._sync:
                self._start_thread(self._result_loop, "aiosched-worker-results")
            self._load()
        else:
            self._start_thread(self._launch_loop, "aiosched-worker-launch")
            self._start_thread(self._result_loop, "aiosched-worker-results")
        return None

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        th = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(th)
        th.start()

    def pending_replies(self) -> list[zmq.Frame]:
        """Replies the result thread finished since the last call (non-blocking; PAIR mode)."""
        out: list[zmq.Frame] = []
        if self.replies is None:
            return out
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
        if self._started:
            self._jobs.put(_STOP)
            if self._inline:
                self._launched.put(_STOP)
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
        if self._direct is not None:
            self._direct[1]()
            self._direct = None
        if self.replies is not None:
            self.replies.close(linger=0)
        return clean

    # ---- loading and launching (launch thread, or the caller's thread when inline) ----

    def _load(self) -> None:
        assert self.config is not None
        try:
            self.runner = self._runner_factory(self.config, self.rank, self.world_size)
            info = self.runner.load()
            # As in the engine: the model and modules leave the GC's view, so collections stay short.
            gc.collect()
            gc.freeze()
            self._out(encode(Ready(info)))
        except BaseException as e:
            self._fail(f"loading the {self.config.runner} runner failed: {_describe(e)}")

    def _launch(self, so: SchedulerOutput) -> None:
        if self.failed is not None:
            return
        try:
            assert self.runner is not None
            pending = self.runner.execute(so)
        except BaseException as e:
            self._fail(f"step {so.step_id} failed: {_describe(e)}")
            return
        if self._inline and self._sync:
            self._out(self._result_frame(pending))  # nothing else is in flight: no hand-off
        else:
            self._launched.put(pending)

    def _launch_loop(self) -> None:
        self._load()
        while (job := self._jobs.get()) is not _STOP:
            self._launch(job)
        self._launched.put(_STOP)

    def _out(self, frame: bytes) -> None:
        """Emit in order: through the result thread when one runs, else on this thread."""
        if self._inline and self._sync:
            if self._direct is None:
                self._direct = self._emitter()
            self._direct[0](frame)
        else:
            self._launched.put(frame)

    def _fail(self, message: str) -> None:
        log.error("%s", message)
        self.failed = message
        self._out(error_frame(message, fatal=True))

    def _result_frame(self, pending: PendingOutput) -> bytes:
        try:
            return encode(StepResult(pending.result()))
        except BaseException as e:
            self.failed = f"step failed: {_describe(e)}"
            log.error("%s", self.failed)
            return error_frame(self.failed, fatal=True)

    # ---- result thread ----

    def _result_loop(self) -> None:
        emit, close = self._emitter()
        try:
            while (item := self._launched.get()) is not _STOP:
                emit(item if isinstance(item, bytes) else self._result_frame(item))
        finally:
            close()


def _pair_emitter(ctx: zmq.Context, addr: str) -> EmitterFactory:
    """Replies through an inproc PAIR to the thread that owns the bound end."""
    def make() -> tuple[Emit, Callable[[], None]]:
        out = ctx.socket(zmq.PAIR)
        out.linger = 0
        out.connect(addr)
        return (lambda frame: out.send(frame, copy=False)), (lambda: out.close(linger=0))
    return make


# ---- the multiproc worker's transport: length-prefixed frames on a Unix stream socket ----

_HEADER = struct.Struct("<I")  # frame length; frames are at most MAX_FRAME_BYTES (< 4 GiB)


class FrameSocket:
    """Blocking, length-prefixed frames on a connected stream socket.

    `send` may be called from several threads (a lock keeps frames whole);
    `recv` from one. An oversized frame is read and discarded, and reported
    as a `ValueError`, so the stream stays in sync."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb", buffering=1 << 16)
        self._lock = threading.Lock()

    def send(self, frame: bytes | memoryview) -> None:
        with self._lock:
            self.sock.sendall(_HEADER.pack(len(frame)) + frame)

    def recv(self, limit: int = MAX_FRAME_BYTES) -> bytes | None:
        """The next frame; None at end of stream (the engine closed the connection)."""
        head = self._reader.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack(head)
        if n > limit:
            left = n
            while left > 0:
                chunk = self._reader.read(min(left, 1 << 20))
                if not chunk:
                    return None
                left -= len(chunk)
            raise ValueError(f"frame of {n} bytes exceeds the limit of {limit} bytes")
        data = self._reader.read(n)
        return data if len(data) == n else None

    def close(self) -> None:
        self._reader.close()
        self.sock.close()


class _Terminated(Exception):
    """SIGTERM arrived: unwind the serving thread and close the session."""


def serve_connection(chan: FrameSocket, session: Session) -> str:
    """Serve one session on a stream connection until it ends; returns why it ended."""
    while True:
        try:
            frame = chan.recv()
        except ValueError as e:  # oversized: discarded, the stream is still in sync
            chan.send(error_frame(str(e), fatal=False))
            continue
        if frame is None:
            return "the engine closed the connection"
        msg, reply = parse_frames([frame])
        over = False
        if msg is not None:
            reply, over = session.handle(msg)
        if reply is not None:
            chan.send(reply)
        if over:
            return "shutdown requested"


def _raise_terminated(*_: object) -> None:
    raise _Terminated()


def worker_main(address: str, rank: int, world_size: int, parent_pid: int,
                env: dict[str, str] | None = None, runner_factory: str | None = None) -> None:
    """Entry point of a multiproc worker process (spawn context); `address` is a Unix socket path."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the engine, which shuts us down
    signal.signal(signal.SIGTERM, _raise_terminated)
    os.environ.update(env or {})
    logging.basicConfig(level=logging.WARNING, format=f"[worker rank {rank}] %(levelname)s %(message)s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    chan = FrameSocket(sock)
    emitter: EmitterFactory = lambda: (chan.send, lambda: None)  # noqa: E731
    session = Session(rank=rank, world_size=world_size, runner_factory=resolve_runner_factory(runner_factory),
                      emitter=emitter, inline=True)
    why = "terminated (SIGTERM)"
    try:
        chan.send(encode(Heartbeat(0)))  # our first word: the engine knows we are up
        why = serve_connection(chan, session)
    except _Terminated:
        pass
    except OSError as e:  # the engine vanished mid-send
        why = f"connection to the engine failed: {e}"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while closing: just exit
        log.info("worker exiting: %s", why)
        session.close()
        chan.close()
    del parent_pid  # the connection's end of stream tells us the engine is gone, however it died
