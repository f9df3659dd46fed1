"""Memory growth of the OpenAI server over many requests (issue 17 target 4).

Sends `--requests` requests (default 10,000) of `--prompt-len` + `--max-tokens` tokens
(default 1,000 + 24 = 1,024 tokens each: prompts are random token ids, so the output
is text from the embedded default model's tokenizer through the detokenizer) to
`aiosched.server.build_app` over HTTP semantics in this process (httpx's ASGI
transport: the server's routes, request parsing, SSE streaming and JSON responses run
as under uvicorn, without a socket), `--concurrency` clients at a time, alternating
streamed and non-streamed /v1/completions. The engine runs the fake runner (`--runner
fake`: the stock one, with its simulated KV cache; `light`: without it, faster).

RSS (VmRSS) is read after a warm-up of `--warmup` requests (allocator arenas, caches
bounded by the vocabulary, the prefix-cache index bounded by the KV pool) and then
every `--every` requests, after `gc.collect()`. Reported: the growth from the warm-up
mark to the end, and the largest live-object counts by type that grew (a leak shows up
as a type whose count rises with the requests). Exit status 1 if growth >= `--limit-mb`.

    .venv/bin/python benchmarks/server_rss.py                          # 10,000 x 1,024 tokens
    .venv/bin/python benchmarks/server_rss.py --requests 2000 --runner light
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import random
import sys
import time
from typing import Any

import httpx

from aiosched.engine import AsyncEngine
from aiosched.server import build_app

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_overhead  # noqa: E402  (the light runner and the long-context model dir)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


async def run(args: argparse.Namespace) -> int:
    if args.runner == "light":
        engine_overhead._install_light_runner()
    max_len = args.prompt_len + args.max_tokens
    blocks = -(-max_len // 16) + 1
    engine = AsyncEngine.from_config(dict(runner="fake", model=engine_overhead._model_dir(max(1024, max_len)), max_model_len=max(1024, max_len),
                                          max_num_seqs=args.concurrency, num_kv_blocks=args.concurrency * blocks + 64, seed=0,
                                          log_stats_interval_s=0))
    await engine.start()
    app = build_app(engine, served_model_name="fake")
    rng = random.Random(0)
    vocab = min(engine.info.vocab_size if engine.info else 512, 8000)
    done = 0
    marks: list[tuple[int, float]] = []
    base_types: collections.Counter[str] | None = None
    next_mark = args.warmup

    async def one(client: httpx.AsyncClient, i: int) -> None:
        prompt = [rng.randrange(1, vocab) for _ in range(args.prompt_len)]
        body = {"model": "fake", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
        if i % 2:
            body["stream"] = True
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, r.status_code
                chunks = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                assert chunks[-1] == "data: [DONE]", chunks[-1]
        else:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == args.max_tokens

    async def worker(client: httpx.AsyncClient, queue: asyncio.Queue[int]) -> None:
        nonlocal done, next_mark, base_types
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(client, i)
            done += 1
            if done == next_mark:
                gc.collect()
                marks.append((done, rss_mb()))
                if base_types is None:
                    base_types = type_counts()
                print(f"{done:>6} requests: RSS {marks[-1][1]:.1f} MB", flush=True)
                next_mark += args.every

    t0 = time.perf_counter()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.requests):
            queue.put_nowait(i)
        await asyncio.gather(*[worker(client, queue) for _ in range(args.concurrency)])
    wall = time.perf_counter() - t0
    gc.collect()
    end_rss = rss_mb()
    grown = type_counts() - (base_types or collections.Counter())
    await engine.shutdown()
    growth = end_rss - marks[0][1]
    print(json.dumps({"requests": args.requests, "tokens_per_request": max_len, "warmup": args.warmup,
                      "rss_after_warmup_mb": round(marks[0][1], 1), "rss_end_mb": round(end_rss, 1),
                      "growth_mb": round(growth, 1), "wall_s": round(wall, 1), "live_engine_requests": len(engine._live),
                      "grown_types": grown.most_common(8)}))
    return 0 if growth < args.limit_mb else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--runner", choices=["fake", "light"], default="fake")
    p.add_argument("--limit-mb", type=float, default=50.0)
    args = p.parse_args()
    sys.exit(asyncio.run(run(args)))
