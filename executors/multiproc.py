"""Multiprocess executor: one worker process per tensor-parallel rank on this host.

Workers are started with the multiprocessing *spawn* context (no fork of the
engine's threads or event loop; scripts must guard their entry point with
`if __name__ == "__main__":`, as for any spawn-based library). Only primitive
arguments travel to the child; the config goes over the socket as msgpack.

Transport: one Unix stream socket per worker, listening inside a fresh private
(0700) temp directory; frames are the protocol's msgpack Structs with a 4-byte
length prefix (`aiosched.executors.worker_loop.FrameSocket` on the worker side). The
engine side is non-blocking and driven by the event loop's reader callbacks, which
decode each frame and resolve the step's future on the spot. Every step is
encoded once and sent to every rank; rank 0's `StepResult` resolves the step's
future. No ZeroMQ here: its I/O threads put four more thread wake-ups on every
step's path (engine I/O thread, worker I/O thread, both ways), which a
synchronous step pays in full (issue 17; `benchmarks/mp_sync_overhead.py`).

Failure handling:
- a worker process that exits (crash, SIGKILL, OOM kill) is seen at once through
  its process sentinel on the event loop (or its connection closing);
- a worker stopped (SIGSTOP, a debugger) for `worker_timeout_s` is declared dead;
  the engine reads the process state from the kernel, so a worker that is merely
  busy (importing torch with the interpreter lock held, a long step, a loaded
  machine) is never mistaken for a dead one (issue 16, item 5). Starting is bounded
  by `worker_start_timeout_s` alone;
- a runner exception arrives as a fatal `WorkerError`.
Then every pending step fails with `EngineDeadError`, `check_health` raises, the
remaining workers are terminated, and `shutdown` reaps them all (terminate, then
kill). Workers in turn exit by themselves when their connection to the engine
ends, which the kernel does when the engine process dies, however it dies; they
ignore SIGINT so Ctrl-C is handled once, by the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

from aiosched.config import EngineConfig
from aiosched.protocol import MAX_FRAME_BYTES
from aiosched.executors.worker_loop import worker_main
from aiosched.executors.zmq_executor import ZmqExecutor

log = logging.getLogger("aiosched.executor")

SHUTDOWN_GRACE_S = 5.0  # after Shutdown, before SIGTERM
TERMINATE_GRACE_S = 2.0  # after SIGTERM, before SIGKILL
_HEADER = struct.Struct("<I")  # frame length prefix (as aiosched.executors.worker_loop.FrameSocket)
_RECV_CHUNK = 1 << 16
_STOPPED_STATES = ("T", "t")  # /proc/PID/stat: stopped by a signal, stopped by a tracer


def free_tcp_port() -> int:
    """A currently free port on 127.0.0.1 (for torch.distributed's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _resume(proc: BaseProcess) -> None:
    """SIGCONT, so that a stopped process acts on a pending SIGTERM."""
    if proc.pid is not None and proc.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)


def process_state(pid: int) -> str | None:
    """The kernel's state letter for `pid` (Linux /proc); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return chr(data[data.rindex(b")") + 2])


def dist_env(world_size: int) -> dict[str, str]:
    """Environment for torch.distributed's env:// rendezvous (TP > 1 only)."""
    if world_size == 1:
        return {}
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_tcp_port()), "WORLD_SIZE": str(world_size)}


class MultiprocExecutor(ZmqExecutor):
    """`runner_factory` ('module:Class') replaces create_runner in the workers: a hook
    for tests and benchmarks; engines leave it unset."""

    silence_deadline = False  # liveness from the kernel's view of the process (_check_peers)
    push_frames = True
    one_start_budget = True  # spawn, imports and loading: one generous deadline (worker_start_timeout_s)
    connect_hint = " (worker_start_timeout_s)"

    def __init__(self, config: EngineConfig, *, runner_factory: str | None = None) -> None:
        super().__init__(config)
        self.world_size = config.tensor_parallel_size
        self._runner_factory = runner_factory
        self._procs: list[BaseProcess] = []
        self._tmpdir: str | None = None
        self._listeners: list[socket.socket] = []
        self._conns: list[socket.socket | None] = [None] * self.world_size
        self._inbuf = [bytearray() for _ in range(self.world_size)]
        self._outbuf: list[bytearray | None] = [None] * self.world_size
        self._stopped_since: list[float | None] = [None] * self.world_size
        self.address: str | None = None  # the directory holding the workers' sockets

    @property
    def connect_timeout_s(self) -> float:  # type: ignore[override]
        """A slow spawn is not a dead worker: a crash is seen at once through the sentinel."""
        return self.startup_timeout_s

    @property
    def peer_names(self) -> list[str]:
        names = []
        for rank in range(self.world_size):
            pid = self._procs[rank].pid if rank < len(self._procs) else None
            names.append(f"rank {rank}" + (f" (pid {pid})" if pid else ""))
        return names

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    # ---- transport ----

    async def _open(self) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="aiosched-")  # mode 0700: only we can connect
        self.address = self._tmpdir
        mp = multiprocessing.get_context("spawn")
        env = dist_env(self.world_size)
        assert self._loop is not None
        for rank in range(self.world_size):
            path = os.path.join(self._tmpdir, f"rank-{rank}")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            listener.setblocking(False)
            self._listeners.append(listener)
            self._tasks.append(self._loop.create_task(self._accept(rank, listener), name=f"aiosched-mp-accept-{rank}"))
            args = (path, rank, self.world_size, os.getpid(), env, self._runner_factory)
            proc = mp.Process(target=worker_main, args=args, name=f"aiosched-worker-{rank}", daemon=True)
            proc.start()
            self._procs.append(proc)
            self._loop.add_reader(proc.sentinel, self._on_exit, rank)

    async def _accept(self, rank: int, listener: socket.socket) -> None:
        assert self._loop is not None
        conn, _ = await self._loop.sock_accept(listener)
        listener.close()  # one worker per socket: nobody else may connect
        conn.setblocking(False)
        self._conns[rank] = conn
        self._loop.add_reader(conn.fileno(), self._on_readable, rank)

    def _send(self, peer: int, frame: bytes) -> None:
        conn = self._conns[peer]
        if conn is None:
            raise ConnectionError("not connected yet")
        data = _HEADER.pack(len(frame)) + frame
        pending = self._outbuf[peer]
        if pending is not None:  # earlier bytes still queued: keep the order
            pending += data
            return
        try:
            sent = conn.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            if self._exited(peer):  # the socket noticed before the sentinel: report the exit itself
                return
            raise
        if sent < len(data):
            self._outbuf[peer] = bytearray(memoryview(data)[sent:])
            assert self._loop is not None
            self._loop.add_writer(conn.fileno(), self._on_writable, peer)

    def _on_writable(self, peer: int) -> None:
        conn, pending = self._conns[peer], self._outbuf[peer]
        if conn is None or pending is None:
            return
        try:
            sent = conn.send(pending)
        except BlockingIOError:
            return
        except OSError as e:
            self._drop(peer)
            if not self._exited(peer):
                self._die(f"sending to worker {self.peer_names[peer]} failed: {e}")
            return
        del pending[:sent]
        if not pending:
            self._outbuf[peer] = None
            assert self._loop is not None
            self._loop.remove_writer(conn.fileno())

    def _on_readable(self, peer: int) -> None:
        """Read what arrived and hand each complete frame to `_on_frame`, here on the loop."""
        conn = self._conns[peer]
        if conn is None:
            return
        buf = self._inbuf[peer]
        while True:
            try:
                chunk = conn.recv(_RECV_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._on_closed(peer)
                return
            if not buf and self._whole_frames(peer, chunk):
                pass  # the common case: whole frames in one read, no copy into the buffer
            else:
                buf += chunk
                self._drain(peer)
            if len(chunk) < _RECV_CHUNK or self._dead is not None:
                break

    def _whole_frames(self, peer: int, chunk: bytes) -> bool:
        """Dispatch `chunk` if it holds whole frames only; False (nothing done) otherwise."""
        view, pos, end, frames = memoryview(chunk), 0, len(chunk), []
        while pos < end:
            if end - pos < _HEADER.size:
                return False
            (n,) = _HEADER.unpack_from(chunk, pos)
            if n > MAX_FRAME_BYTES or end - pos - _HEADER.size < n:
                return False
            frames.append(view[pos + _HEADER.size:pos + _HEADER.size + n])
            pos += _HEADER.size + n
        for frame in frames:
            self._on_frame(peer, frame)
        return True

    def _drain(self, peer: int) -> None:
        buf = self._inbuf[peer]
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf, pos)
            if n > MAX_FRAME_BYTES:
                self._die(f"worker {self.peer_names[peer]} sent a frame of {n} bytes (limit {MAX_FRAME_BYTES})")
                return
            if len(buf) - pos - _HEADER.size < n:
                break
            frame = bytes(buf[pos + _HEADER.size:pos + _HEADER.size + n])
            pos += _HEADER.size + n
            self._on_frame(peer, frame)
        del buf[:pos]

    def _on_closed(self, peer: int) -> None:
        self._drop(peer)
        if not self._closing and not self._exited(peer):
            self._die(f"worker {self.peer_names[peer]} closed its connection")

    def _drop(self, peer: int) -> None:
        conn = self._conns[peer]
        if conn is None:
            return
        self._conns[peer] = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(conn.fileno())
            self._loop.remove_writer(conn.fileno())
        conn.close()

    async def _recv(self) -> tuple[int, list[Any]]:  # pragma: no cover - push_frames
        raise NotImplementedError

    async def _close_transport(self) -> None:
        for peer in range(self.world_size):
            self._drop(peer)
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ---- worker processes ----

    def _check_peers(self, now: float) -> None:
        """A worker the kernel shows stopped (SIGSTOP, a tracer) for worker_timeout_s is dead."""
        if not sys.platform.startswith("linux"):
            return
        timeout = self.config.worker_timeout_s
        for rank, proc in enumerate(self._procs):
            state = process_state(proc.pid) if proc.pid is not None and proc.exitcode is None else None
            if state not in _STOPPED_STATES:
                self._stopped_since[rank] = None
                continue
            since = self._stopped_since[rank]
            if since is None:
                self._stopped_since[rank] = now
            elif now - since > timeout:
                self._die(f"worker {self.peer_names[rank]} is stopped (process state {state}) for "
                          f"{now - since:.1f}s (worker_timeout_s={timeout}): hung")
                return
    def _exited(self, rank: int) -> bool:
        """If this worker's process is gone (or going), report it as the cause; True then."""
        proc = self._procs[rank]
        proc.join(0.5)
        if proc.exitcode is None:
            return False
        self._on_exit(rank)
        return True

    def _on_exit(self, rank: int) -> None:
        proc = self._procs[rank]
        self._remove_reader(proc)
        proc.join(1.0)  # the sentinel fired: the process is exiting; reap it (no zombie)
        code = proc.exitcode
        if not self._closing:
            hint = ("; its stderr says why (if it speaks of the 'bootstrapping phase': the script that starts "
                    "the engine must guard its entry point with `if __name__ == '__main__':`)") if code and code > 0 else ""
            self._die(f"worker rank {rank} (pid {proc.pid}) exited unexpectedly ({describe_exit(code)}){hint}")

    def _remove_reader(self, proc: BaseProcess) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(proc.sentinel)
            except (ValueError, OSError):
                pass  # sentinel already closed

    def _on_dead(self) -> None:
        """The other ranks are useless now (and may block in a collective): stop them."""
        for proc in self._procs:
            if proc.exitcode is None:
                proc.terminate()
                _resume(proc)  # a stopped (hung) worker gets the SIGTERM too

    async def _stop_workers(self) -> None:
        """After Shutdown: wait, then SIGTERM, then SIGKILL; always reap (no zombies)."""
        if self._dead is None:
            await self._wait_exit(SHUTDOWN_GRACE_S)  # they were sent Shutdown
        for action, grace in (("terminate", TERMINATE_GRACE_S), ("kill", 5.0)):
            alive = [p for p in self._procs if p.exitcode is None]
            if not alive:
                break
            if self._dead is None:
                log.warning("worker(s) %s did not exit after Shutdown: %s", [p.pid for p in alive], action)
            for p in alive:
                getattr(p, action)()
                _resume(p)
            await self._wait_exit(grace)
        for proc in self._procs:
            self._remove_reader(proc)
            proc.join(0)

    async def _wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(p.exitcode is None for p in self._procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
