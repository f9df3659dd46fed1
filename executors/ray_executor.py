"""Ray executor: each tensor-parallel rank is a Ray actor, so a model can span hosts.

    executor = "ray"                 # EngineConfig; needs `pip install 'aiosched[ray]'`
    ray_address = "auto"             # join a running cluster; unset: the current one, else a new local one
    ray_placement = "pack"           # or "spread": ranks over as many nodes as possible
    tensor_parallel_size = 2

Placement: one placement group per engine with one bundle per rank ({"CPU": 1},
plus {"GPU": 1} on CUDA), strategy PACK (one node when the bundles fit) or SPREAD.
Each rank's actor is scheduled into its bundle. Rank 0's actor picks a free port
on its own node, and every rank joins `torch.distributed` there (gloo on CPU, NCCL
on GPUs): the rendezvous goes through Ray, nobody writes an address by hand.

Steps: `submit` encodes the step once (`Execute`, msgpack: the protocol's msgspec
Structs, no pickled objects of ours) and calls every rank's `execute(seq, frame)`;
the call's ObjectRef (Ray resolves it as a future) becomes the asyncio future the
engine awaits, so two steps stay in flight exactly as with the other executors.
Actors are async actors: `execute` hands the step to the same `Session` that the
multiproc and remote workers run (`aiosched.executors.worker_loop`: launch thread, result
thread, replies in order) and awaits its reply frame. A sequence number restores
submission order, which Ray does not promise for async actors.

Faults: a long-lived `wait_closed()` call per actor fails the moment Ray declares
the actor dead (killed, its process or node gone), and so do its pending steps;
the executor then fails every pending step with `EngineDeadError`. A runner error
is a fatal `WorkerError` frame, as elsewhere. `shutdown()` ends the sessions, kills
the actors and removes the placement group; actors are owned by the process that
created them, so Ray also reaps them when that driver (or task) exits.

Works from a plain process (a local Ray instance is started, dashboard and usage
stats off), from a Ray driver (after `ray.init()`) and inside a Ray task or actor.
Every node needs aiosched installed in the same Python (Ray ships no code here).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections import deque
from typing import Any

from aiosched.config import EngineConfig
from aiosched.errors import EngineDeadError
from aiosched.protocol import (
    PROTOCOL_VERSION,
    Execute,
    Hello,
    Ready,
    RunnerOutput,
    SchedulerOutput,
    Shutdown,
    StepResult,
    WorkerError,
    WorkerInfo,
    decode_from_worker,
    decode_to_worker,
    encode,
)
from aiosched.executors.base import Executor
from aiosched.executors.inproc import run_in_thread
from aiosched.executors.worker_loop import Emit, Session, error_frame, resolve_runner_factory
from aiosched.executors.zmq_executor import disagreement

try:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError:  # pragma: no cover - the extra is not installed
    ray = None

log = logging.getLogger("aiosched.executor")

SHUTDOWN_WAIT_S = 5.0  # for the sessions to close before the actors are killed
# Set in a rank's actor on CUDA: Ray gave this process exactly its own GPU (CUDA_VISIBLE_DEVICES),
# so the runner uses the configured device as is instead of offsetting it by the rank.
RANK_LOCAL_DEVICE_ENV = "AIOSCHED_RANK_LOCAL_DEVICE"


def require_ray() -> Any:
    if ray is None:
        raise ValueError("executor = 'ray' needs Ray: pip install 'aiosched[ray]'")
    return ray


def init_ray(config: EngineConfig) -> None:
    """Join the cluster: the current one (driver or task), `ray_address`, else start a local one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home unless the user asked for it
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class RankWorker:
    """One tensor-parallel rank: a Ray async actor driving a `Session` (made remote at run time)."""

    def __init__(self, rank: int, world_size: int, runner_factory: str | None) -> None:
        self.rank = rank
        self.world_size = world_size
        self._runner_factory = runner_factory
        self._session: Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: deque[asyncio.Future[bytes]] = deque()  # in the order the session replies
        self._held: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}
        self._next_seq = 0
        self._fatal: bytes | None = None
        self._closed: asyncio.Event | None = None

    def pid(self) -> int:
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        """(this node's address, a free port): where torch.distributed's store will listen (rank 0)."""
        return ray.util.get_node_ip_address(), _free_port()

    async def wait_closed(self) -> None:
        """Returns when the session ends; fails (in the caller) when this actor dies."""
        if self._closed is None:
            self._closed = asyncio.Event()
        await self._closed.wait()

    async def start(self, env: dict[str, str], hello: bytes) -> bytes:
        """Apply the engine's Hello: load the runner; the Ready (or fatal WorkerError) frame."""
        os.environ.update(env)
        self._loop = asyncio.get_running_loop()
        self._session = Session(rank=self.rank, world_size=self.world_size,
                                runner_factory=resolve_runner_factory(self._runner_factory), emitter=self._emitter)
        try:
            msg = decode_to_worker(hello)
        except ValueError as e:
            return error_frame(str(e), fatal=True)
        if not isinstance(msg, Hello):
            return error_frame(f"expected Hello, got {type(msg).__name__}", fatal=True)
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        reply, _ = self._session.handle(msg)
        if reply is not None:  # refused at once (protocol, rank, config)
            self._waiters.remove(waiter)
            return reply
        return await waiter

    async def execute(self, seq: int, frame: bytes) -> bytes:
        """One step: its StepResult frame, or a fatal WorkerError frame."""
        assert self._loop is not None, "execute before start"
        waiter = self._loop.create_future()
        self._held[seq] = (frame, waiter)
        while self._next_seq in self._held:  # submission order, whatever order Ray runs the calls in
            item = self._held.pop(self._next_seq)
            self._next_seq += 1
            self._launch(*item)
        return await waiter

    def _launch(self, frame: bytes, waiter: asyncio.Future[bytes]) -> None:
        assert self._session is not None
        if self._fatal is not None:
            waiter.set_result(self._fatal)
            return
        try:
            msg = decode_to_worker(frame)
        except ValueError as e:
            waiter.set_result(error_frame(str(e), fatal=True))
            return
        if not isinstance(msg, Execute):
            waiter.set_result(error_frame(f"expected Execute, got {type(msg).__name__}", fatal=True))
            return
        self._waiters.append(waiter)
        reply, _ = self._session.handle(msg)
        if reply is not None:
            self._waiters.remove(waiter)
            waiter.set_result(reply)

    def _emitter(self) -> tuple[Emit, Any]:
        loop = self._loop
        assert loop is not None

        def emit(frame: bytes) -> None:  # the session's result thread
            with contextlib.suppress(RuntimeError):  # the loop is closing with the actor
                loop.call_soon_threadsafe(self._deliver, frame)
        return emit, lambda: None

    def _deliver(self, frame: bytes) -> None:
        # Only an error needs a look inside (its tag leads the frame): steps pass through undecoded.
        if b"WorkerError" in frame[:24] and (msg := decode_from_worker(frame)) and isinstance(msg, WorkerError) and msg.fatal:
            self._fatal = frame  # the session refuses further steps: answer every waiter with it
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_result(frame)
            return
        if self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(frame)

    async def shutdown(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.handle(Shutdown())
            await run_in_thread(session.close)
        if self._closed is None:
            self._closed = asyncio.Event()
        self._closed.set()


class RayExecutor(Executor):
    """`runner_factory` ('module:Class') replaces create_runner in the actors (tests, benchmarks)."""

    def __init__(self, config: EngineConfig, *, runner_factory: str | None = None) -> None:
        super().__init__(config)
        require_ray()
        self.world_size = config.tensor_parallel_size
        self._runner_factory = runner_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pg: Any = None
        self._actors: list[Any] = []
        self._pids: list[int | None] = [None] * self.world_size
        self._pending: dict[int, tuple[int, asyncio.Future[RunnerOutput]]] = {}  # seq -> (step id, future)
        self._seq = itertools.count()
        self._dead: str | None = None
        self._closing = False
        self._shut_down = False
        self.worker_errors: list[str] = []
        self.startup_s: float | None = None  # start() wall time: cluster join, placement, actors, loading

    # ---- naming ----

    @property
    def peer_names(self) -> list[str]:
        return [f"rank {r}" + (f" (Ray actor, pid {p})" if p else " (Ray actor)") for r, p in enumerate(self._pids)]

    @property
    def worker_pids(self) -> list[int]:
        return [p for p in self._pids if p is not None]

    @property
    def actors(self) -> list[Any]:
        return list(self._actors)

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    # ---- Executor API ----

    async def start(self) -> WorkerInfo:
        t0 = time.monotonic()
        self._loop = asyncio.get_running_loop()
        await run_in_thread(init_ray, self.config)
        deadline = t0 + self.config.worker_start_timeout_s
        try:
            await self._place(deadline)
            infos = await self._load(deadline)
        except BaseException:
            await self._release()
            raise
        problem = disagreement(self.peer_names, infos)
        if problem is not None:
            self._die(problem)
            await self._release()
            raise EngineDeadError(problem)
        self.startup_s = time.monotonic() - t0
        log.info("ray executor: %d rank(s) ready in %.1fs (%s)", self.world_size, self.startup_s, self.peer_names)
        return infos[0]

    async def _place(self, deadline: float) -> None:
        cuda = self.config.device.startswith("cuda")
        bundle = {"CPU": 1.0, "GPU": 1.0} if cuda else {"CPU": 1.0}
        strategy = "SPREAD" if self.config.ray_placement == "spread" else "PACK"
        self._pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy=strategy)
        try:
            await asyncio.wait_for(self._pg.ready(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise self._start_error(f"Ray could not place {self.world_size} bundle(s) of {bundle} ({strategy}) within "
                                    f"{self.config.worker_start_timeout_s:g}s (worker_start_timeout_s): "
                                    f"does the cluster have the resources? (ray.cluster_resources(): {ray.cluster_resources()})") from None
        remote_cls = ray.remote(RankWorker)
        env = {RANK_LOCAL_DEVICE_ENV: "1"} if cuda else {}
        for rank in range(self.world_size):
            opts: dict[str, Any] = dict(
                num_cpus=1, num_gpus=1 if cuda else 0, max_restarts=0, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank))
            if env:
                opts["runtime_env"] = {"env_vars": env}
            self._actors.append(remote_cls.options(**opts).remote(rank, self.world_size, self._runner_factory))
        for rank, actor in enumerate(self._actors):
            self._watch(rank, actor.wait_closed.remote())
        pids = await self._until(asyncio.gather(*[self._await(a.pid.remote()) for a in self._actors]), deadline,
                                 "the Ray actors did not start")
        self._pids = list(pids)

    async def _load(self, deadline: float) -> list[WorkerInfo]:
        env: dict[str, str] = {}
        if self.world_size > 1:  # torch.distributed rendezvous on rank 0's node, a port it chose
            host, port = await self._until(self._await(self._actors[0].rendezvous.remote()), deadline,
                                           "rank 0 did not answer")
            env = {"MASTER_ADDR": host, "MASTER_PORT": str(port), "WORLD_SIZE": str(self.world_size)}
        calls = [self._await(a.start.remote(env, encode(Hello(PROTOCOL_VERSION, self.config, rank=r))))
                 for r, a in enumerate(self._actors)]
        frames = await self._until(asyncio.gather(*calls), deadline, "the ranks did not finish loading")
        infos: list[WorkerInfo] = []
        for name, frame in zip(self.peer_names, frames):
            msg = decode_from_worker(frame)
            if isinstance(msg, WorkerError):
                raise self._start_error(f"worker {name} failed: {msg.message}")
            if not isinstance(msg, Ready):
                raise self._start_error(f"worker {name} answered Hello with {type(msg).__name__}")
            infos.append(msg.info)
        return infos

    async def _await(self, ref: Any) -> Any:
        """An ObjectRef as an awaitable; a dead actor is EngineDeadError."""
        try:
            return await ref
        except ray.exceptions.RayError as e:
            raise self._start_error(f"a Ray actor failed while starting: {e}") from None

    async def _until(self, aw: Any, deadline: float, what: str) -> Any:
        task = asyncio.ensure_future(aw)
        while True:  # wake up now and then: a rank that died meanwhile ends the wait at once
            left = deadline - time.monotonic()
            if left <= 0:
                task.cancel()
                raise self._start_error(f"{what} within {self.config.worker_start_timeout_s:g}s (worker_start_timeout_s)")
            done, _ = await asyncio.wait([task], timeout=min(left, 0.25))
            if done:
                return task.result()
            if self._dead is not None:
                task.cancel()
                raise EngineDeadError(self._dead)

    def _start_error(self, reason: str) -> EngineDeadError:
        self._die(reason)
        return EngineDeadError(self._dead)

    def submit(self, output: SchedulerOutput) -> "asyncio.Future[RunnerOutput]":
        assert self._loop is not None, "executor not started"
        fut: asyncio.Future[RunnerOutput] = self._loop.create_future()
        if self._dead is not None:
            fut.set_exception(EngineDeadError(self._dead))
            return fut
        seq = next(self._seq)
        frame = encode(Execute(output))
        self._pending[seq] = (output.step_id, fut)
        for rank, actor in enumerate(self._actors):
            ref = actor.execute.remote(seq, frame)
            ref.future().add_done_callback(lambda cf, r=rank: self._from_ray_thread(self._on_reply, seq, r, cf))
        return fut

    def _from_ray_thread(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: the engine is gone
                loop.call_soon_threadsafe(fn, *args)

    def _on_reply(self, seq: int, rank: int, cf: Any) -> None:
        if self._dead is not None:
            return
        try:
            frame = cf.result()
            msg = decode_from_worker(frame)
        except ValueError as e:
            self._die(f"worker {self.peer_names[rank]} sent a malformed message: {e}")
            return
        except Exception as e:  # RayActorError: the actor died; a cancelled ref: shutting down
            self._die(f"worker {self.peer_names[rank]} died: {_short(e)}")
            return
        if isinstance(msg, WorkerError):
            self._die(f"worker {self.peer_names[rank]} failed: {msg.message}")
            return
        if not isinstance(msg, StepResult):
            self._die(f"worker {self.peer_names[rank]} answered a step with {type(msg).__name__}")
            return
        if rank != 0:
            return
        step_id, fut = self._pending.pop(seq, (None, None))
        if fut is None:
            return
        if msg.output.step_id != step_id:
            self._die(f"worker returned step {msg.output.step_id} while step {step_id} was expected")
            return
        if not fut.done():
            fut.set_result(msg.output)

    def _watch(self, rank: int, ref: Any) -> None:
        def on_done(cf: Any) -> None:
            exc = cf.exception()
            if not self._closing and self._dead is None:
                reason = _short(exc) if exc is not None else "its session ended"
                self._die(f"worker {self.peer_names[rank]} died: {reason}")
        ref.future().add_done_callback(lambda cf: self._from_ray_thread(on_done, cf))

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    async def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        await self._release()
        if self._dead is None:
            self._dead = "executor was shut down"
        self._fail_pending(self._dead)

    async def _release(self) -> None:
        """End the sessions (briefly), kill the actors, remove the placement group."""
        self._closing = True
        if self._actors and self._dead is None:
            calls = [asyncio.ensure_future(self._quiet(a.shutdown.remote())) for a in self._actors]
            await asyncio.wait(calls, timeout=SHUTDOWN_WAIT_S)
        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self._actors = []
        if self._pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
            self._pg = None

    @staticmethod
    async def _quiet(ref: Any) -> None:
        with contextlib.suppress(Exception):
            await ref

    def _die(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        if not self._closing:
            log.error("executor dead: %s", reason)
        self._fail_pending(reason)
        for actor in self._actors:  # the other ranks may wait in a collective forever
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for _, fut in pending.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
                fut.exception()  # mark retrieved: the engine awaits only the oldest step


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
