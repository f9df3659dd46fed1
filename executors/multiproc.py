"""Multiprocess executor: one worker process per tensor-parallel rank on this host.

Workers are started with the multiprocessing *spawn* context (no fork of the
engine's threads or event loop; scripts must guard their entry point with
`if __name__ == "__main__":`, as for any spawn-based library). Only primitive
arguments travel to the child; the config goes over the socket as msgpack.

Transport: the engine binds one ZeroMQ ROUTER socket on `ipc://` inside a fresh
private (0700) temp directory, driven by `zmq.asyncio` on the engine's loop. Each
worker connects a DEALER whose routing id is its rank and announces itself, then
gets `Hello` and serves `Execute`s; its result thread sends `Ready` and the
`StepResult`s on a second DEALER of its own (see `aiosched.executors.worker_loop`).
Every step is encoded once and sent to every rank; rank 0's `StepResult` resolves
the step's future.

Failure handling, all within `worker_timeout_s` (5 s by default):
- a worker process that exits (crash, SIGKILL, OOM kill) is seen at once through
  its process sentinel on the event loop;
- a hung or stopped worker stops answering heartbeats;
- a runner exception arrives as a fatal `WorkerError`.
Then every pending step fails with `EngineDeadError`, `check_health` raises, the
remaining workers are terminated, and `shutdown` reaps them all (terminate, then
kill). Workers in turn exit by themselves when the engine process disappears
(parent pid changes) or goes silent, and ignore SIGINT so Ctrl-C is handled once,
by the engine.
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
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

import zmq
import zmq.asyncio

from aiosched.config import EngineConfig
from aiosched.executors.worker_loop import rank_identity, result_identity, worker_main
from aiosched.executors.zmq_executor import ZmqExecutor

log = logging.getLogger("aiosched.executor")

SHUTDOWN_GRACE_S = 5.0  # after Shutdown, before SIGTERM
TERMINATE_GRACE_S = 2.0  # after SIGTERM, before SIGKILL


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


def dist_env(world_size: int) -> dict[str, str]:
    """Environment for torch.distributed's env:// rendezvous (TP > 1 only)."""
    if world_size == 1:
        return {}
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_tcp_port()), "WORLD_SIZE": str(world_size)}


class MultiprocExecutor(ZmqExecutor):
    """`runner_factory` ('module:Class') replaces create_runner in the workers: a hook
    for tests and benchmarks; engines leave it unset."""

    def __init__(self, config: EngineConfig, *, runner_factory: str | None = None) -> None:
        super().__init__(config)
        self.world_size = config.tensor_parallel_size
        self._runner_factory = runner_factory
        self._procs: list[BaseProcess] = []
        self._tmpdir: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        # each worker connects twice: its IO thread (control) and its result thread (results)
        self._ranks = {ident: r for r in range(self.world_size) for ident in (rank_identity(r), result_identity(r))}
        self.address: str | None = None

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
        self.address = f"ipc://{self._tmpdir}/engine"
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 0
        sock.router_mandatory = 1  # sending to a vanished worker raises instead of dropping
        sock.bind(self.address)
        self._sock = sock
        mp = multiprocessing.get_context("spawn")
        env = dist_env(self.world_size)
        assert self._loop is not None
        for rank in range(self.world_size):
            args = (self.address, rank, self.world_size, os.getpid(), env, self._runner_factory)
            proc = mp.Process(target=worker_main, args=args, name=f"aiosched-worker-{rank}", daemon=True)
            proc.start()
            self._procs.append(proc)
            self._loop.add_reader(proc.sentinel, self._on_exit, rank)

    def _send(self, peer: int, frame: bytes) -> None:
        assert self._sock is not None
        fut = self._sock.send_multipart([rank_identity(peer), frame], copy=False)
        if fut.done():
            if (exc := fut.exception()) is not None:
                if self._exited(peer):  # the socket noticed before the sentinel: report the exit itself
                    return
                raise exc
        else:
            fut.add_done_callback(lambda f: self._on_send_done(f, peer))

    def _on_send_done(self, fut: "asyncio.Future[Any]", peer: int) -> None:
        if not fut.cancelled() and fut.exception() is not None and not self._exited(peer):
            self._die(f"sending to worker {self.peer_names[peer]} failed: {fut.exception()}")

    async def _recv(self) -> tuple[int, list[Any]]:
        assert self._sock is not None
        while True:
            parts = await self._sock.recv_multipart(copy=False)
            rank = self._ranks.get(parts[0].bytes)
            if rank is not None:
                return rank, parts[1:]

    async def _close_transport(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ---- worker processes ----

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
