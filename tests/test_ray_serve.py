"""examples/ray_serve_app.py: two data-parallel replicas of the OpenAI server on Ray Serve.

Driven through the real `openai` client against Ray Serve's HTTP proxy on
127.0.0.1; each replica owns an engine (the fake runner on the tiny model dir).
One Serve instance for the module, two applications side by side: "aiosched"
(prefix-affinity routing through the ingress, the default) at /, and "direct"
(the engine replicas as HTTP ingress) at /direct. The router's choice logic
(examples/ray_prefix_router.py) and the autoscaling policy are checked on their
own, without actors.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest

from aiosched import AsyncEngine, SamplingParams
from aiosched.config import EngineConfig
from ray_cluster import free_cpus, free_port, load_example, local_ray
from tiny_model import fake, write_tiny_model

pytestmark = pytest.mark.timeout(240)
PROMPTS = ["def fibonacci(n):", "import asyncio\n", "class Scheduler:", "for i in range(", "return x +", "# a comment"]
# Three groups of requests, each sharing a long prefix (several 64-character router chunks, many KV blocks).
SHARED = {
    "fib": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 3,
    "fox": "The quick brown fox jumps over the lazy dog. Hello world! naïve café. " * 4,
    "chat": "You are a helpful assistant who answers in one line and never apologises for anything. " * 3,
}




async def expected_texts(config: dict[str, Any]) -> list[str]:
    async with AsyncEngine(EngineConfig.load(config)) as eng:
        outs = [await eng.generate(p, SamplingParams(max_tokens=12, temperature=0.0)) for p in PROMPTS]
    return [o.text for o in outs]


@dataclass
class Served:
    example: ModuleType
    config: dict[str, Any]
    port: int

    def client(self, prefix: str = "") -> Any:
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}{prefix}/v1", api_key="unused", max_retries=0,
                             timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    ray = local_ray()
    from ray import serve

    example = load_example(ray)
    config = {**fake(write_tiny_model(tmp_path_factory.mktemp("tiny"))), "num_kv_blocks": 1024, "block_size": 4}
    port = free_port()
    t0 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        apps = {"aiosched": ("/", "prefix"), "direct": ("/direct", "direct")}
        serve.run_many([serve.RunTarget(example.deployment(config, replicas=2, num_cpus=0.5, served_model_name="tiny",
                                                           router=router, max_body_bytes=65536),
                                         name=name, route_prefix=prefix)
                        for name, (prefix, router) in apps.items()])
        print(f"\n[ray serve] 2 apps x 2 replicas up in {time.monotonic() - t0:.1f}s", flush=True)
        yield Served(example, config, port)
    finally:
        serve.shutdown()
    assert free_cpus(ray, timeout=30.0) == 2.0, "replicas left behind"


@pytest.mark.parametrize("app, prefix", [("aiosched", ""), ("direct", "/direct")])
def test_two_replicas_behind_one_endpoint(served: Served, app: str, prefix: str) -> None:
    from ray import serve

    expected = asyncio.run(expected_texts(served.config))
    status = serve.status().applications[app].deployments["OpenAIReplica"]
    assert status.replica_states.get("RUNNING") == 2, status
    client = served.client(prefix)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for _ in range(2):  # every replica gives the same greedy text as a local engine
        got = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
               for p in PROMPTS]
        assert got == expected
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=0, stream=True)
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) >= 1
    handle = serve.get_deployment_handle("OpenAIReplica", app_name=app)
    stats = handle.engine_stats.remote().result(timeout_s=30)
    assert stats["num_running"] == 0 and stats["kv_free_blocks"] == stats["kv_num_blocks"], stats


@pytest.mark.parametrize("prefix", ["", "/direct"])
def test_errors_reach_the_client_and_name_the_replica(served: Served, prefix: str) -> None:
    import httpx

    base = f"http://127.0.0.1:{served.port}{prefix}"
    bad = httpx.post(f"{base}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json(), bad.text  # the replica's answer, relayed
    missing = httpx.post(f"{base}/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 1})
    assert missing.status_code == 404, missing.text
    assert bool(missing.headers.get("x-aiosched-replica")) == (prefix == "")  # the relay names the replica
    big = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x" * 70000, "max_tokens": 1})
    assert big.status_code == 413, big.text  # max_body_bytes (65536 here)


def _complete(client: Any, prompt: str) -> tuple[str, int]:
    raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    return raw.headers["x-aiosched-replica"], raw.parse().usage.prompt_tokens_details.cached_tokens


def _chat(client: Any, system: str, question: str) -> tuple[str, int]:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", max_tokens=2, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
    return raw.headers["x-aiosched-replica"], raw.parse().usage.prompt_tokens_details.cached_tokens


def test_requests_sharing_a_prefix_land_on_one_replica(served: Served) -> None:
    """One request at a time: a group's first request claims a replica (the less loaded, then the one
    owning fewer prefixes: the other group's), the rest of the group follows it and hits its cache."""
    from ray import serve

    client = served.client()
    handle = serve.get_deployment_handle("OpenAIReplica", app_name="aiosched")

    def hits(replica: str) -> int:  # the prefix router sends a call naming a replica to that replica
        stats = handle.engine_stats.remote(replica_id=replica).result(timeout_s=30)
        assert stats["replica_id"] == replica
        return int(stats["prefix_cache_hits"])

    fib = [_complete(client, SHARED["fib"] + f"# variant {i}\n") for i in range(3)]
    fox = [_complete(client, SHARED["fox"] + f"Line {i}.") for i in range(3)]
    chat = [_chat(client, SHARED["chat"], f"What is {i} + {i}?") for i in range(3)]
    (fib_replica,), (fox_replica,), (chat_replica,) = ({r for r, _ in g} for g in (fib, fox, chat))
    assert fib_replica != fox_replica  # different prefixes spread over both replicas
    for group in (fib, fox, chat):
        # the first computes the shared prefix (a block or so may hit, from the earlier tests), the rest hit it
        assert group[0][1] < 40 <= min(cached for _, cached in group[1:]), group
    before = {r: hits(r) for r in (fib_replica, fox_replica)}
    repeat = _complete(client, SHARED["fib"] + "# variant 0\n")
    assert repeat[0] == fib_replica
    assert hits(fib_replica) - before[fib_replica] == repeat[1] > 0  # the engine's stats count that hit
    assert hits(fox_replica) == before[fox_replica]


def test_the_relay_runs_a_request_through_the_app_and_a_closed_stream_aborts_it(tmp_path: Path) -> None:
    """OpenAIEngine.forward's relay, in this process: the app's answer with the replica header added;
    a stream closed early (Ray Serve cancels it when the client leaves) aborts the engine request."""
    from aiosched.server import build_app

    example = load_example(local_ray())
    config = {**fake(write_tiny_model(tmp_path / "tiny")), "num_kv_blocks": 256, "block_size": 4}

    def request(**body: Any) -> dict[str, Any]:
        return {"method": "POST", "path": "/v1/completions", "headers": [(b"content-type", b"application/json")],
                "client": ("127.0.0.1", 5000), "body": json.dumps({"model": "tiny", "temperature": 0, **body}).encode()}

    async def scenario() -> None:
        engine = AsyncEngine(EngineConfig.load(config))
        app = build_app(engine, served_model_name="tiny")
        async with app.router.lifespan_context(app):
            msgs = [m async for m in example.relay_to_app(app, request(prompt="def fibonacci(n):", max_tokens=12),
                                                          [(b"x-aiosched-replica", b"r1")])]
            assert msgs[0]["status"] == 200 and (b"x-aiosched-replica", b"r1") in msgs[0]["headers"]
            text = json.loads(b"".join(m.get("body", b"") for m in msgs[1:]))["choices"][0]["text"]
            local = await engine.generate("def fibonacci(n):", SamplingParams(max_tokens=12, temperature=0.0))
            assert text == local.text
            stream = example.relay_to_app(app, request(prompt="import asyncio", max_tokens=400, ignore_eos=True,
                                                       stream=True))
            assert (await stream.__anext__())["type"] == "http.response.start"
            assert (await stream.__anext__())["body"]  # the first chunk: the request is running
            await stream.aclose()  # the client left
            deadline = time.monotonic() + 10
            while engine.stats()["kv_free_blocks"] < engine.stats()["kv_num_blocks"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            stats = engine.stats()
            assert stats["num_running"] == 0 and stats["kv_free_blocks"] == stats["kv_num_blocks"], stats
            assert stats["generated_tokens"] < 12 + 12 + 400, stats  # aborted before its 400 tokens

    asyncio.run(scenario())


# --- the router's choice logic, without Ray actors ---

@pytest.fixture(scope="module")
def router_mod() -> ModuleType:
    return load_example(local_ray(), "ray_prefix_router")


def test_the_key_is_the_leading_text_of_completions_and_chat_bodies(router_mod: ModuleType) -> None:
    text = router_mod.leading_text
    assert text("/v1/completions", {"prompt": "abc"}) == "abc"
    assert text("/v1/completions", {"prompt": ["abc", "xyz"]}) == "abc"  # a batch: its first prompt
    assert text("/v1/completions", {"prompt": [5, 6, 7]}) == text("/v1/completions", {"prompt": [[5, 6, 7]]})
    assert text("/llm/v1/completions", {"prompt": "abc"}) == "abc"  # under a route prefix
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert text("/v1/chat/completions", chat) == "<|system|>S\n<|user|>U"
    with_tools = text("/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert with_tools.endswith("<|system|>S\n<|user|>U") and '"name": "f"' in with_tools  # tools come first
    for path, body in [("/v1/models", {"prompt": "x"}), ("/v1/completions", {}), ("/v1/chat/completions", {"messages": []}),
                       ("/v1/completions", ["x"])]:
        assert text(path, body) is None, (path, body)
    chain = router_mod.request_chain
    assert chain("/v1/completions", b"{not json", 4, 8) == []
    a = chain("/v1/completions", json.dumps({"prompt": "0123456789ab-tail-a"}), 4, 8)
    b = chain("/v1/completions", json.dumps({"prompt": "0123456789ab-tail-b"}), 4, 8)
    c = chain("/v1/completions", json.dumps({"prompt": "X123456789ab-tail-a"}), 4, 8)
    assert len(a) == 5 and a[:4] == b[:4] and a[4] != b[4]  # 4-character chunks, chained; the last one shorter
    assert not set(a) & set(c)  # a different first chunk changes every hash after it
    assert len(chain("/v1/completions", json.dumps({"prompt": "y" * 100}), 4, 8)) == 8  # capped at max_chunks


def test_affinity_follows_the_owner_until_it_is_overloaded(router_mod: ModuleType) -> None:
    aff = router_mod.PrefixAffinity(max_load=3, capacity=100, rng=random.Random(0))
    loads = {"r1": 0, "r2": 0}
    shared, other = [11, 12, 13], [21, 22]
    aff.record(shared + [14], "r1")
    assert aff.match(shared + [99]) == ("r1", 3)
    assert aff.rank(shared + [99], ["r1", "r2"], loads.__getitem__) == ["r1", "r2"]
    loads["r1"] = 2  # busier, but under max_load: still the owner
    assert aff.rank(shared, ["r1", "r2"], loads.__getitem__)[0] == "r1"
    loads["r1"] = 3  # overloaded: the less loaded replica instead
    assert aff.rank(shared, ["r1", "r2"], loads.__getitem__) == ["r2", "r1"]
    loads["r1"] = 0
    assert aff.rank(other, ["r1", "r2"], loads.__getitem__) == ["r2", "r1"]  # no owner, equal load: fewer prefixes
    loads["r2"] = 1
    assert aff.rank(other, ["r1", "r2"], loads.__getitem__)[0] == "r1"  # load before prefix count
    assert aff.rank(shared, ["r2"], loads.__getitem__) == ["r2"]  # the owner is not a candidate (gone, or busy)
    aff.forget("r1")
    assert aff.match(shared) == (None, 0) and aff.owned("r1") == 0


def test_affinity_table_is_bounded_and_keeps_recent_prefixes(router_mod: ModuleType) -> None:
    aff = router_mod.PrefixAffinity(capacity=4)
    aff.record([1, 2, 3], "r1")
    aff.record([7, 8], "r2")  # 5 entries: the oldest (1) goes, so the r1 prefix no longer matches from its start
    assert len(aff) == 4 and aff.match([1, 2, 3]) == (None, 0) and aff.match([7, 8]) == ("r2", 2)
    aff.record([7, 8], "r1")  # a later request of the same prefix went to r1: r1 owns it now
    assert aff.match([7, 8]) == ("r1", 2) and aff.owned("r2") == 0 and aff.owned("r1") == 4
    with pytest.raises(ValueError, match="max_load"):
        router_mod.PrefixAffinity(max_load=0)
    with pytest.raises(ValueError, match="capacity"):
        router_mod.PrefixAffinity(capacity=-1)


def test_the_ray_router_ranks_the_owner_first_and_honours_a_named_replica(router_mod: ModuleType) -> None:
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest, ReplicaID

    dep = DeploymentID(name="OpenAIReplica", app_name="t")

    @dataclass
    class FakeReplica:  # what choose_replicas reads of a RunningReplica
        replica_id: ReplicaID

    async def scenario() -> None:
        router = router_mod.PrefixAffinityRouter(deployment_id=dep, handle_source=DeploymentHandleSource.REPLICA)
        router.initialize_state(chunk_chars=8, max_load=2)
        r1, r2 = (FakeReplica(ReplicaID(u, dep)) for u in ("r1", "r2"))

        def request(body: dict[str, Any], **kwargs: Any) -> PendingRequest:
            return PendingRequest(args=[{"path": "/v1/completions", "body": json.dumps(body).encode()}], kwargs=kwargs,
                                  metadata=RequestMetadata(request_id="x", internal_request_id=str(random.random())))

        first = request({"prompt": "a shared prefix, then one"})
        ranks = await router.choose_replicas([r1, r2], first)
        owner = ranks[0][0]
        router.on_request_routed(first, owner.replica_id, None)
        other = r2 if owner is r1 else r1
        assert ranks == [[owner], [other]]
        for _ in range(3):  # the same prefix follows its owner
            assert (await router.choose_replicas([r1, r2], request({"prompt": "a shared prefix, then two"})))[0] == [owner]
        router.replica_queue_len_cache.update(owner.replica_id, 2)  # owner at max_load: the other one
        assert (await router.choose_replicas([r1, r2], request({"prompt": "a shared prefix, then 3"})))[0] == [other]
        pinned = request({"prompt": "a shared prefix"}, replica_id="r1")
        assert await router.choose_replicas([r1, r2], pinned) == [[r1]]
        with pytest.raises(ValueError, match="max_chunk"):
            router.initialize_state(max_chunks=0)
        with pytest.raises(ValueError, match="chunk_size"):
            router.initialize_state(chunk_size=8)

    asyncio.run(scenario())


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


def test_deployment_refuses_unknown_routers() -> None:
    example = load_example(local_ray())
    with pytest.raises(ValueError, match="router"):
        example.deployment({"model": "m"}, router="round-robin")
    with pytest.raises(ValueError, match="router_options"):
        example.deployment({"model": "m"}, router="pow2", router_options={"max_load": 4})
    with pytest.raises(ValueError, match="max_load"):  # checked before anything is deployed
        example.deployment({"model": "m"}, router_options={"max_load": 0})
