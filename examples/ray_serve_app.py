"""N data-parallel replicas of the OpenAI-compatible server behind one endpoint, on Ray Serve.

Run (needs `pip install 'aiosched[ray]'`):

    python examples/ray_serve_app.py --model /path/to/model --replicas 2 --port 8000
    # autoscaling between 1 and 4 replicas by the engines' queue length:
    python examples/ray_serve_app.py --model /path/to/model --min-replicas 1 --max-replicas 4 --target-load 8
    # a replica that is itself tensor-parallel over 2 Ray actors (GPUs of any node):
    python examples/ray_serve_app.py --model /path/to/model --replicas 2 --device cuda --executor ray --tensor-parallel-size 2

    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "MODEL", "prompt": "def fibonacci(n):", "max_tokens": 32}'

Each replica is one Ray Serve replica actor that owns one engine: the deployment
wraps `aiosched.server.build_app` as its ASGI ingress, and the app's lifespan
starts and stops that replica's engine. Ray Serve's proxy spreads requests over
the replicas (its default router: the less loaded of two random replicas).

Autoscaling: every replica reports its engine's load (`num_running +
num_waiting` from `engine.stats()`) through Ray Serve's custom autoscaling
metrics (`record_autoscaling_stats`); `engine_load_policy` asks for
ceil(total load / target_load) replicas, within [min, max]. Requests queued
inside the engines count, not only those in flight at the proxy.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from aiosched.engine import AsyncEngine
from aiosched.server import build_app

ENGINE_LOAD = "aiosched_engine_load"  # the custom autoscaling metric: running + waiting requests


def engine_load_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Replicas wanted: the engines' total load over the per-replica target (target_ongoing_requests)."""
    per_replica = (ctx.aggregated_metrics or {}).get(ENGINE_LOAD, {})
    if not per_replica:  # nothing reported yet (replicas starting): keep what we have
        return ctx.target_num_replicas, {}
    total = sum(per_replica.values())
    wanted = math.ceil(total / max(1e-9, ctx.config.get_target_ongoing_requests()))
    return max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, wanted)), {}


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress()
class OpenAIReplica:
    """One replica: one engine, the OpenAI API in front of it."""

    def __init__(self, engine_config: dict[str, Any], api_key: str | None = None,
                 served_model_name: str | None = None) -> None:
        self.engine = AsyncEngine.from_config(engine_config)
        self._api_key = api_key
        self._served_model_name = served_model_name

    def __serve_build_asgi_app__(self) -> Any:
        # The app's lifespan starts this engine on the replica's event loop and stops it with the replica.
        return build_app(self.engine, self._api_key, served_model_name=self._served_model_name)

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = self.engine.stats()
        return {ENGINE_LOAD: float(s.get("num_running", 0) + s.get("num_waiting", 0))}

    def engine_stats(self) -> dict[str, Any]:
        """For callers with a deployment handle (tests, dashboards): this replica's engine stats."""
        return self.engine.stats()


def autoscaling(min_replicas: int, max_replicas: int, target_load: float) -> AutoscalingConfig:
    return AutoscalingConfig(min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=target_load,
                             upscale_delay_s=5, downscale_delay_s=60,
                             policy=AutoscalingPolicy(policy_function=engine_load_policy))


def deployment(engine_config: dict[str, Any], *, replicas: int | None = 2, min_replicas: int = 1,
               max_replicas: int | None = None, target_load: float = 8.0, num_cpus: float = 1.0,
               api_key: str | None = None, served_model_name: str | None = None) -> Any:
    """The bound application: `replicas` fixed replicas, or autoscaling when `max_replicas` is given."""
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": num_cpus}}
    if max_replicas is not None:
        options["autoscaling_config"] = autoscaling(min_replicas, max_replicas, target_load)
    else:
        options["num_replicas"] = replicas
    return OpenAIReplica.options(**options).bind(engine_config, api_key, served_model_name)


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
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(deployment(engine_config, replicas=args.replicas, min_replicas=args.min_replicas,
                         max_replicas=args.max_replicas, target_load=args.target_load, num_cpus=num_cpus,
                         api_key=args.api_key), name="aiosched", route_prefix="/")
    print(f"serving on http://127.0.0.1:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
