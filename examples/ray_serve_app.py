"""N data-parallel replicas of the OpenAI-compatible server behind one endpoint, on Ray Serve.

Run (needs `pip install 'aiosched[ray]'`):

    python examples/ray_serve_app.py --model /path/to/model --replicas 2 --port 8000
    # autoscaling between 1 and 4 replicas by the engines' queue length:
    python examples/ray_serve_app.py --model /path/to/model --min-replicas 1 --max-replicas 4 --target-load 8
    # a replica that is itself tensor-parallel over 2 Ray actors (GPUs of any node):
    python examples/ray_serve_app.py --model /path/to/model --replicas 2 --device cuda --executor ray --tensor-parallel-size 2

    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "MODEL", "prompt": "def fibonacci(n):", "max_tokens": 32}'

Each replica (`OpenAIReplica`) is one Ray Serve replica actor that owns one
engine: the deployment wraps `aiosched.server.build_app` as its ASGI app, and the
app's lifespan starts and stops that replica's engine.

Routing (`--router`):
- `prefix` (the default): requests sharing a prompt prefix go to the same
  replica while it is not overloaded, so its prefix cache hits
  (examples/ray_prefix_router.py). Ray Serve's proxy does not read request
  bodies, so a light ingress deployment (`PrefixRoutedIngress`, no CPU of its
  own) reads each body and hands the request to an engine replica through a
  deployment handle, whose router sees the prompt; the replica runs it through
  its ASGI app (`OpenAIReplica.forward`) and streams the ASGI messages back.
  Every response names its replica in the `x-aiosched-replica` header.
- `pow2`: the same ingress with Ray Serve's default router (the less loaded of
  two random replicas), for comparison (benchmarks/ray_prefix_routing.py).
- `direct`: the engine replicas are the HTTP ingress themselves (one hop fewer),
  spread by the proxy's default router.

Autoscaling: every replica reports its engine's load (`num_running +
num_waiting` from `engine.stats()`) through Ray Serve's custom autoscaling
metrics (`record_autoscaling_stats`); `engine_load_policy` asks for
ceil(total load / target_load) replicas, within [min, max]. Requests queued
inside the engines count, not only those in flight at the proxy.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy, RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from aiosched.engine import AsyncEngine
from aiosched.server import build_app
from aiosched.server_http import MAX_BODY_BYTES

ENGINE_LOAD = "aiosched_engine_load"  # the custom autoscaling metric: running + waiting requests
REPLICA_HEADER = b"x-aiosched-replica"  # names the engine replica that answered (prefix / pow2 routing)
ROUTERS = ("prefix", "pow2", "direct")
log = logging.getLogger("ray.serve")

Message = dict[str, Any]


def _router_module() -> Any:
    """examples/ray_prefix_router.py, imported by path: examples/ is not a package, and this file runs
    as a script, as `examples.ray_serve_app`, or loaded by path (the tests)."""
    name = "ray_prefix_router"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def engine_load_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Replicas wanted: the engines' total load over the per-replica target (target_ongoing_requests)."""
    per_replica = (ctx.aggregated_metrics or {}).get(ENGINE_LOAD, {})
    if not per_replica:  # nothing reported yet (replicas starting): keep what we have
        return ctx.target_num_replicas, {}
    total = sum(per_replica.values())
    wanted = math.ceil(total / max(1e-9, ctx.config.get_target_ongoing_requests()))
    return max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, wanted)), {}


async def relay_to_app(app: Any, request: dict[str, Any],
                       extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> AsyncIterator[Message]:
    """Run one HTTP request through an ASGI app in this process: the app's ASGI messages, streamed.

    `request`: method, path, root_path, query_string, headers, client and the whole body, as
    `PrefixRoutedIngress` reads them. `extra_headers` are added to the response's. Closing the
    stream early (the client left, so Ray Serve cancels it) is a disconnect for the app, which
    aborts the engine request (its KV blocks are freed at once)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "scheme": "http", "method": request["method"], "path": request["path"],
             "raw_path": request["path"].encode(), "root_path": request.get("root_path", ""),
             "query_string": request.get("query_string", b""),
             "headers": [(bytes(k), bytes(v)) for k, v in request.get("headers", [])],
             "client": tuple(request["client"]) if request.get("client") else None, "server": None}
    body = [request.get("body", b"")]
    gone = asyncio.Event()
    out: asyncio.Queue[Message | None] = asyncio.Queue()

    async def receive() -> Message:
        if body:
            return {"type": "http.request", "body": body.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and extra_headers:
            message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
        await out.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: out.put_nowait(None))
    complete = False
    try:
        while (message := await out.get()) is not None:
            complete = message["type"] == "http.response.body" and not message.get("more_body", False)
            yield message
        if not task.cancelled() and task.exception() is not None:
            if not complete:
                raise task.exception()  # type: ignore[misc]
            # Starlette re-raises an error after sending its 500: the response is whole, keep it.
            log.error("%s %s failed after its response", request["method"], request["path"], exc_info=task.exception())
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5.0)  # the app sees the disconnect and aborts the request
            task.cancel()


class _Replica:
    """One replica: one engine, the OpenAI API in front of it. The two deployments below differ only in
    how requests reach the app: as Ray Serve's HTTP ingress, or relayed through `forward`."""

    def __init__(self, engine_config: dict[str, Any], api_key: str | None = None,
                 served_model_name: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.engine = AsyncEngine.from_config(engine_config)
        self._app = build_app(self.engine, api_key, served_model_name=served_model_name, max_body_bytes=max_body_bytes)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.engine.stats()
        return {ENGINE_LOAD: float(s.get("num_running", 0) + s.get("num_waiting", 0))}

    def engine_stats(self, replica_id: str | None = None) -> dict[str, Any]:
        """For callers with a deployment handle (tests, dashboards): this replica's engine stats.

        `replica_id`: the replica meant (the prefix router sends the call there); another replica refuses."""
        if replica_id is not None and replica_id != self.replica_id:
            raise ValueError(f"replica_id: {replica_id!r} is not this replica ({self.replica_id!r})")
        return {**self.engine.stats(), "replica_id": self.replica_id}


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress()
class OpenAIReplica(_Replica):
    """`direct` routing: the app is this deployment's ASGI ingress; its lifespan (run by Ray Serve)
    starts this replica's engine on the replica's event loop and stops it with the replica."""

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


@serve.deployment(name="OpenAIReplica", ray_actor_options={"num_cpus": 1})
class OpenAIEngine(_Replica):
    """`prefix` / `pow2` routing: behind `PrefixRoutedIngress` (an application has one ASGI ingress),
    the app runs here through `forward`; this replica runs the app's lifespan itself."""

    async def __init__(self, engine_config: dict[str, Any], api_key: str | None = None,  # type: ignore[misc]
                       served_model_name: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__(engine_config, api_key, served_model_name, max_body_bytes)
        self._lifespan = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()  # starts the engine

    async def __del__(self) -> None:  # Ray Serve awaits it when the replica stops: stops the engine
        lifespan = self.__dict__.pop("_lifespan", None)  # once; absent when __init__ failed
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)

    async def forward(self, request: dict[str, Any]) -> AsyncIterator[Message]:
        """One HTTP request relayed by `PrefixRoutedIngress`, run through this replica's app (streamed)."""
        async for message in relay_to_app(self._app, request, [(REPLICA_HEADER, self.replica_id.encode())]):
            yield message


class _ClientGone(Exception):
    """The client disconnected before its request was read whole."""


async def _read_body(receive: Callable[[], Awaitable[Message]], limit: int) -> bytes | None:
    """The whole request body; None when it is larger than `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_error(send: Callable[[Message], Awaitable[None]], status: int, text: str, kind: str) -> None:
    payload = json.dumps({"error": {"message": text, "type": kind, "param": None, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class _Relay:
    """The ingress's ASGI app: each HTTP request, body read whole, to an engine replica via the handle."""

    def __init__(self, engines: DeploymentHandle, max_body_bytes: int) -> None:
        self._engines = engines.options(stream=True)
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":  # nothing to start: the engines live in their own replicas
            while True:
                kind = (await receive())["type"]
                if kind == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif kind == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1003})
            return
        try:
            body = await _read_body(receive, self._max_body_bytes)
        except _ClientGone:
            return  # nobody to answer
        if body is None:
            await _send_error(send, 413, f"request body larger than {self._max_body_bytes} bytes", "invalid_request_error")
            return
        request = {"method": scope["method"], "path": scope["path"], "root_path": scope.get("root_path", ""),
                   "query_string": scope.get("query_string", b""), "headers": list(scope.get("headers", [])),
                   "client": scope.get("client"), "body": body}
        stream = self._engines.forward.remote(request)
        left = asyncio.ensure_future(self._until_disconnect(receive))
        left.add_done_callback(lambda t: None if t.cancelled() or t.exception() else stream.cancel())
        started = finished = False
        try:
            async for message in stream:
                started = started or message["type"] == "http.response.start"
                await send(message)
            finished = True
        except Exception as exc:  # noqa: BLE001 - a replica that died or failed before answering
            if left.done() or started:
                raise  # the client left (nothing to answer), or the response is cut: end the connection
            await _send_error(send, 503, f"engine replica failed: {exc}", "service_unavailable")
            finished = True
        finally:
            left.cancel()
            if not finished:
                stream.cancel()

    @staticmethod
    async def _until_disconnect(receive: Callable[[], Awaitable[Message]]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class PrefixRoutedIngress:
    """The HTTP ingress for `prefix` / `pow2` routing: reads each body, so the engine deployment's
    request router sees the prompt (Ray Serve's proxy forwards bodies only after routing)."""

    def __init__(self, engines: DeploymentHandle, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._relay = _Relay(engines, max_body_bytes)

    def __serve_build_asgi_app__(self) -> Any:
        return self._relay


def autoscaling(min_replicas: int, max_replicas: int, target_load: float) -> AutoscalingConfig:
    return AutoscalingConfig(min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=target_load,
                             upscale_delay_s=5, downscale_delay_s=60,
                             policy=AutoscalingPolicy(policy_function=engine_load_policy))


def deployment(engine_config: dict[str, Any], *, replicas: int | None = 2, min_replicas: int = 1,
               max_replicas: int | None = None, target_load: float = 8.0, num_cpus: float = 1.0,
               api_key: str | None = None, served_model_name: str | None = None, router: str = "prefix",
               router_options: dict[str, int] | None = None, max_ongoing_requests: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The bound application: `replicas` fixed replicas, or autoscaling when `max_replicas` is given.

    `router`: "prefix" | "pow2" | "direct" (see the module docstring); `router_options`: the prefix
    router's kwargs (examples/ray_prefix_router.py DEFAULTS). `max_ongoing_requests`: requests one
    replica takes at once (Ray Serve's default, 5, would cap the engine's batch at 5). `max_body_bytes`:
    the largest request body the ingress and the replicas' app read (413 beyond)."""
    if router not in ROUTERS:
        raise ValueError(f"router: must be one of {list(ROUTERS)}, got {router!r}")
    if router_options and router != "prefix":
        raise ValueError(f"router_options: only for router='prefix', got router={router!r}")
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": num_cpus}, "max_ongoing_requests": max_ongoing_requests}
    if max_replicas is not None:
        options["autoscaling_config"] = autoscaling(min_replicas, max_replicas, target_load)
    else:
        options["num_replicas"] = replicas
    if router == "prefix":
        kwargs = _router_module().check_options(dict(router_options or {}))  # here, not in a replica's log
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=_router_module().PrefixAffinityRouter, request_router_kwargs=kwargs)
    elif router == "pow2":  # Ray's default router; calls naming a replica (engine_stats) go there
        options["request_router_config"] = RequestRouterConfig(request_router_class=_router_module().PinnedPowerOfTwoRouter)
    init = (engine_config, api_key, served_model_name, max_body_bytes)
    if router == "direct":
        return OpenAIReplica.options(**options).bind(*init)
    engines = OpenAIEngine.options(**options).bind(*init)
    most = max_replicas if max_replicas is not None else (replicas or 1)
    return PrefixRoutedIngress.options(max_ongoing_requests=max_ongoing_requests * most).bind(engines, max_body_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--executor", default="inproc", help="each replica's executor: inproc | multiproc | ray")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, help="autoscale between --min-replicas and this")
    parser.add_argument("--target-load", type=float, default=8.0, help="running + waiting requests per replica")
    parser.add_argument("--router", choices=ROUTERS, default="prefix", help="how requests pick a replica")
    parser.add_argument("--affinity-max-load", type=int,
                        help="prefix router: skip the prefix's replica at this many requests in flight (default 16)")
    parser.add_argument("--max-ongoing-requests", type=int, default=256, help="requests one replica takes at once")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key")
    parser.add_argument("--ray-address", help="an existing cluster (default: start a local one)")
    args = parser.parse_args()
    import ray

    ray.init(address=args.ray_address, include_dashboard=False if args.ray_address is None else None)
    engine_config = {"model": args.model, "device": args.device, "executor": args.executor,
                     "tensor_parallel_size": args.tensor_parallel_size}
    # An engine with executor = "ray" places its own rank actors: the replica itself then needs no CPU.
    num_cpus = 0.0 if args.executor == "ray" else 1.0
    router_options = {"max_load": args.affinity_max_load} if args.affinity_max_load is not None else None
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(deployment(engine_config, replicas=args.replicas, min_replicas=args.min_replicas,
                         max_replicas=args.max_replicas, target_load=args.target_load, num_cpus=num_cpus,
                         api_key=args.api_key, router=args.router, router_options=router_options,
                         max_ongoing_requests=args.max_ongoing_requests), name="aiosched", route_prefix="/")
    print(f"serving on http://127.0.0.1:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
