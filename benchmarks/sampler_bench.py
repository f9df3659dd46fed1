"""Time the device sampler (executors/torch/sampler.py) on one step's logits.

Why: non-greedy rows go through `sample`, whose counter-hash Gumbel noise touches
every vocab entry of every random row; this shows what that costs per step next to
greedy argmax, and what the top-k candidate path saves.

    python benchmarks/sampler_bench.py --device cuda --vocab 151936 --rows 1 32 256
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiosched.executors.torch.sampler import SamplingBatch, sample


def make_batch(rows: int, device: str, top_k: int = 0, top_p: float = 1.0, candidates: bool = False) -> SamplingBatch:
    def full(v: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((rows,), v, dtype=dtype, device=device)

    return SamplingBatch(
        temperature=full(0.8, torch.float32), top_k=full(top_k, torch.int64), top_p=full(top_p, torch.float32),
        min_p=full(0.0, torch.float32), seeds=torch.arange(rows, device=device) * 7919,
        positions=torch.arange(rows, device=device) + 100, all_greedy=False, any_top_k=top_k > 0,
        any_top_p=top_p < 1.0, any_min_p=False, max_top_k=top_k if candidates else 0)


def time_ms(fn, device: str, iters: int) -> float:
    for _ in range(2):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    results = []
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, device=args.device) * 3
        cases = {
            "argmax": lambda: logits.argmax(-1),
            "temperature": lambda b=make_batch(rows, args.device): sample(logits, b),
            "top_k50_top_p0.9_full": lambda b=make_batch(rows, args.device, 50, 0.9): sample(logits, b),
            "top_k50_top_p0.9_candidates": lambda b=make_batch(rows, args.device, 50, 0.9, True): sample(logits, b),
        }
        for name, fn in cases.items():
            ms = time_ms(fn, args.device, args.iters)
            results.append({"rows": rows, "vocab": args.vocab, "case": name, "ms": round(ms, 3)})
            print(f"rows {rows:4d}  {name:30s} {ms:9.3f} ms", flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            sample(logits, make_batch(rows, args.device))
            peak = torch.cuda.max_memory_allocated() / 2**20
            print(f"rows {rows:4d}  temperature peak memory {peak:.0f} MiB", flush=True)
            results.append({"rows": rows, "case": "temperature_peak_mib", "value": round(peak)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
