"""Greedy parity across executors and scheduling modes, on any device (issue 5's device check).

Runs the same greedy prompts through every (executor, tensor_parallel_size, mode)
variant and compares each variant's token ids with the first one's. Random weights of a
named shape are drawn from the same seed in every variant (sharded per rank for TP), so
the models are identical.

    python benchmarks/executor_parity.py --device cuda --random-weights llama-3.2-1b \
        --variants inproc:1,multiproc:1,multiproc:2 --json parity.json

Exit status 1 if any variant differs from the reference.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiosched import AsyncEngine, SamplingParams  # noqa: E402
from aiosched.bench import random_weights_config  # noqa: E402
from aiosched.config import EngineConfig  # noqa: E402


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    """Deterministic prompts of 8..200 tokens (a mix of short and chunked-prefill lengths)."""
    out = []
    for i in range(n):
        length = 8 + (i * 37 + seed) % 193
        out.append([(i * 7919 + j * 104729 + seed) % (vocab - 2) + 1 for j in range(length)])
    return out


async def run_variant(base: dict[str, Any], executor: str, tp: int, async_scheduling: bool,
                      ps: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    cfg = EngineConfig.load(dict(base, executor=executor, tensor_parallel_size=tp, async_scheduling=async_scheduling))
    t0 = time.perf_counter()
    async with AsyncEngine(cfg) as eng:
        t_ready = time.perf_counter() - t0
        t1 = time.perf_counter()
        outs = await asyncio.gather(*[eng.generate(p, params) for p in ps])
        wall = time.perf_counter() - t1
    return {"tokens": [o.token_ids for o in outs], "startup_s": t_ready, "wall_s": wall}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", default="llama-3.2-1b", metavar="SHAPE")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variants", default="inproc:1,multiproc:1", help="executor:tp, comma separated; the first is the reference")
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256, help="small: long prompts go through chunked prefill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rows: list[dict[str, Any]] = []
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(device=args.device, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=512,
                    num_kv_blocks=2048, **random_weights_config(args.random_weights, os.path.join(tmp, "model")))
        vocab = json.load(open(os.path.join(tmp, "model", "config.json")))["vocab_size"]
        ps = prompts(args.num_prompts, vocab, args.seed)
        ref: list[list[int]] | None = None
        ref_name = ""
        for v in args.variants.split(","):
            executor, tp = v.split(":")
            for mode in args.modes.split(","):
                name = f"{executor} tp={tp} {mode}"
                r = await run_variant(base, executor, int(tp), mode == "async", ps, params)
                toks = r.pop("tokens")
                if ref is None:
                    ref, ref_name = toks, name
                same = [a == b for a, b in zip(toks, ref)]
                first_diff = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(toks, ref)]
                r.update(variant=name, identical_requests=sum(same), requests=len(same),
                         first_divergence=[d for d in first_diff if d is not None])
                ok &= all(same)
                rows.append(r)
                print(f"{name:24s} identical to [{ref_name}]: {sum(same)}/{len(same)}  startup {r['startup_s']:.1f} s  "
                      f"generate {r['wall_s']:.2f} s  first divergence at {r['first_divergence'] or '-'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
