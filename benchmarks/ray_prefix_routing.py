"""Prefix-cache hit rate of data-parallel replicas on Ray Serve: 1 replica vs 2, Ray's default
router vs prefix affinity (examples/ray_serve_app.py, examples/ray_prefix_router.py).

    .venv/bin/python benchmarks/ray_prefix_routing.py [--groups 16] [--per-group 6] [--prefix-chars 1500]
        [--concurrency 8] [--rounds 3] [--kv-blocks 4096] [--variants 1:prefix,2:pow2,2:prefix]

`--groups` groups of `--per-group` requests each share a prefix of about `--prefix-chars`
characters (random words, a different draw per group) and end in a short suffix of their
own. Each run sends them in a shuffled order, `--concurrency` at a time, through the real
`openai` client to a fresh deployment (cold caches) on a local Ray instance; each replica is
an engine with the fake runner on the embedded model's tokenizer (the routing and the
prefix cache are what is measured, not the model). The hit rate is prefix_cache_hits /
prefix_cache_queries (prompt tokens) from the engines' stats, summed over the replicas
(`engine_stats(replica_id=...)` through the router, which sends a call naming a replica to
it). Variants run interleaved, round by round; the table gives medians over the rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

# The Ray Serve example loader shared with tests/test_ray_serve.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ray_cluster import free_port, load_example  # noqa: E402

WORDS = ("cache block prefix replica router engine token batch queue stream prompt model tensor "
         "kernel page memory request schedule decode prefill layer head value key attention").split()




def words(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(WORDS))
    return " ".join(out)


def workload(groups: int, per_group: int, prefix_chars: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for g in range(groups):
        prefix = f"Document {g}: " + words(rng, prefix_chars)
        prompts += [f"{prefix}\nQuestion {i}: {words(rng, 40)}?" for i in range(per_group)]
    return prompts


async def send_all(port: int, prompts: list[str], concurrency: int, max_tokens: int) -> list[tuple[str, int, int]]:
    """(replica, prompt tokens, cached tokens) per request, in completion order."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> tuple[str, int, int]:
        async with gate:
            raw = await client.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                                                    temperature=0)
        usage = raw.parse().usage
        return raw.headers["x-aiosched-replica"], usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await client.close()


def run_variant(example: ModuleType, port: int, replicas: int, router: str, prompts: list[str],
                args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    config = {"model": args.model, "runner": "fake", "num_kv_blocks": args.kv_blocks, "block_size": 16}
    t0 = time.monotonic()
    serve.run(example.deployment(config, replicas=replicas, num_cpus=1.0 / replicas, served_model_name="m",
                                 router=router), name="bench", route_prefix="/")
    up = time.monotonic() - t0
    try:
        t0 = time.monotonic()
        results = asyncio.run(send_all(port, prompts, args.concurrency, args.max_tokens))
        wall = time.monotonic() - t0
        handle = serve.get_deployment_handle("OpenAIReplica", app_name="bench")
        seen = sorted({r for r, _, _ in results})
        stats = {r: handle.engine_stats.remote(replica_id=r).result(timeout_s=60) for r in seen}
    finally:
        serve.delete("bench")
    assert all(s["replica_id"] == r for r, s in stats.items())
    hits = sum(s["prefix_cache_hits"] for s in stats.values())
    queries = sum(s["prefix_cache_queries"] for s in stats.values())
    usage_cached = sum(c for _, _, c in results)
    usage_prompt = sum(p for _, p, _ in results)
    assert (hits, queries) == (usage_cached, usage_prompt), "engine stats and the responses' usage disagree"
    per_replica = sorted((sum(1 for x, _, _ in results if x == r) for r in seen), reverse=True)
    return {"hit_rate": hits / queries, "computed": queries - hits, "queries": queries, "split": per_replica,
            "wall_s": wall, "up_s": up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "aiosched" / "default_model"),
                        help="a model dir with tokenizer.json (default: the embedded model; run by the fake runner)")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--per-group", type=int, default=6)
    parser.add_argument("--prefix-chars", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, default=4096, help="per replica, 16 tokens each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="1:prefix,2:pow2,2:prefix", help="replicas:router, comma-separated")
    args = parser.parse_args()
    variants = [(int(v.split(":")[0]), v.split(":")[1]) for v in args.variants.split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    example = load_example(ray)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[str, list[dict[str, Any]]] = {f"{n}:{r}": [] for n, r in variants}
    try:
        for rnd in range(args.rounds):
            prompts = workload(args.groups, args.per_group, args.prefix_chars, seed=rnd)
            random.Random(1000 + rnd).shuffle(prompts)
            for n, router in variants:
                res = run_variant(example, port, n, router, prompts, args)
                runs[f"{n}:{router}"].append(res)
                print(f"round {rnd} {n}:{router}: hit rate {res['hit_rate']:.3f}, prompt tokens computed "
                      f"{res['computed']}/{res['queries']}, requests per replica {res['split']}, "
                      f"{res['wall_s']:.1f}s (deployed in {res['up_s']:.1f}s)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{args.groups} groups x {args.per_group} requests, prefix ~{args.prefix_chars} chars, concurrency "
          f"{args.concurrency}, {args.kv_blocks} KV blocks of 16 per replica; medians over {args.rounds} rounds")
    print("| replicas:router | hit rate | prompt tokens computed | requests per replica (last round) |")
    print("| --- | ---: | ---: | --- |")
    for name, rs in runs.items():
        print(f"| {name} | {statistics.median(r['hit_rate'] for r in rs):.3f} | "
              f"{statistics.median(r['computed'] for r in rs):.0f} of {statistics.median(r['queries'] for r in rs):.0f} | "
              f"{rs[-1]['split']} |")


if __name__ == "__main__":
    main()
