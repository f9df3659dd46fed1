"""examples/ray_serve_app.py: two data-parallel replicas of the OpenAI server on Ray Serve.

Driven through the real `openai` client against Ray Serve's HTTP proxy on
127.0.0.1; each replica owns an engine (the fake runner on the tiny model dir).
The autoscaling policy is checked on its own, with the metrics Ray Serve hands it.
"""
from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from aiosched import AsyncEngine, SamplingParams
from aiosched.config import EngineConfig
from ray_cluster import free_cpus, local_ray
from tiny_model import fake, write_tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray_serve_app.py"
pytestmark = pytest.mark.timeout(240)
PROMPTS = ["def fibonacci(n):", "import asyncio\n", "class Scheduler:", "for i in range(", "return x +", "# a comment"]


def load_example(ray: Any) -> ModuleType:
    spec = importlib.util.spec_from_file_location("aiosched_example_ray_serve_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    ray.cloudpickle.register_pickle_by_value(mod)  # examples/ is not on the replicas' path
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def expected_texts(config: dict[str, Any]) -> list[str]:
    async with AsyncEngine(EngineConfig.load(config)) as eng:
        outs = [await eng.generate(p, SamplingParams(max_tokens=12, temperature=0.0)) for p in PROMPTS]
    return [o.text for o in outs]


def test_two_replicas_behind_one_endpoint(tmp_path: Path) -> None:
    ray = local_ray()
    from ray import serve
    import openai

    example = load_example(ray)
    config = {**fake(write_tiny_model(tmp_path / "tiny")), "num_kv_blocks": 256, "block_size": 4}
    expected = asyncio.run(expected_texts(config))
    port = free_port()
    t0 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(example.deployment(config, replicas=2, num_cpus=0.5, served_model_name="tiny"),
                  name="aiosched", route_prefix="/")
        print(f"\n[ray serve] 2 replicas up in {time.monotonic() - t0:.1f}s", flush=True)
        status = serve.status().applications["aiosched"].deployments["OpenAIReplica"]
        assert status.replica_states.get("RUNNING") == 2, status
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        for _ in range(2):  # every replica gives the same greedy text as a local engine
            got = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
                   for p in PROMPTS]
            assert got == expected
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0, stream=True)
        assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) >= 1
        handle = serve.get_app_handle("aiosched")
        stats = handle.engine_stats.remote().result(timeout_s=30)
        assert stats["num_running"] == 0 and stats["kv_free_blocks"] == stats["kv_num_blocks"], stats
    finally:
        serve.shutdown()
    assert free_cpus(ray, timeout=30.0) == 2.0, "replicas left behind"


class _Config:
    def __init__(self, target: float) -> None:
        self.target = target

    def get_target_ongoing_requests(self) -> float:
        return self.target


class _Ctx:
    """The fields of ray.serve.config.AutoscalingContext that the policy reads."""

    def __init__(self, loads: dict[str, float] | None, target: float, current: int = 2, lo: int = 1, hi: int = 4) -> None:
        self.aggregated_metrics = None if loads is None else {"aiosched_engine_load": loads}
        self.config = _Config(target)
        self.target_num_replicas = current
        self.capacity_adjusted_min_replicas = lo
        self.capacity_adjusted_max_replicas = hi


def test_autoscaling_follows_the_engines_queue_length() -> None:
    ray = local_ray()
    policy = load_example(ray).engine_load_policy
    assert policy(_Ctx({"r1": 6, "r2": 5}, target=4))[0] == 3  # 11 running + waiting over 4 per replica
    assert policy(_Ctx({"r1": 30, "r2": 30}, target=4))[0] == 4  # capped at max_replicas
    assert policy(_Ctx({"r1": 0, "r2": 0}, target=4))[0] == 1  # idle: down to min_replicas
    assert policy(_Ctx(None, target=4, current=2))[0] == 2  # nothing reported yet: unchanged
