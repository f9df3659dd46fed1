"""What one acceptance estimate costs (aiosched/draft_replay.py): µs per `replay_batch`
call at `--requests` requests of `--positions` replayed positions each, on histories
whose drafts are never accepted (random ids) and often accepted (a repeated phrase with
noise), with a short prompt and with a prompt as long as the proposer's lookback.

`--naive` also times the same walk calling the worker's numpy proposer
(`propose_ngram`) at every step, the implementation the incremental index replaces.

  python benchmarks/replay_cost.py
  python benchmarks/replay_cost.py --requests 16 --positions 256 --naive
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiosched import draft_replay  # noqa: E402

K, NMIN, NMAX = 4, 1, 4


def history(kind: str, prompt: int, generated: int, rng: random.Random) -> list[int]:
    if kind == "random":
        return [rng.randrange(32000) for _ in range(prompt + generated)]
    phrase = [rng.randrange(32000) for _ in range(40)]
    out: list[int] = []
    while len(out) < prompt + generated:
        out += [t if rng.random() > 0.1 else rng.randrange(32000) for t in phrase]
    return out[: prompt + generated]


def naive_replay(tokens: list[int], begin: int) -> tuple[int, int]:
    """draft_replay.replay's walk, proposing with the worker's numpy `propose_ngram`."""
    from aiosched.executors.torch.spec_decode import propose_ngram

    p, steps, produced = begin, 0, 0
    while p + K <= len(tokens):
        drafts = propose_ngram(tokens[max(0, p - draft_replay.LOOKBACK):p], K, NMIN, NMAX)
        m = 0
        while m < len(drafts) and drafts[m] == tokens[p + m]:
            m += 1
        steps, produced, p = steps + 1, produced + 1 + m, p + 1 + m
    return steps, produced


def timed(fn: Callable[[], tuple[int, int]], repeat: int) -> tuple[float, tuple[int, int]]:
    """Best of `repeat` calls, in µs (the CPU is shared: the minimum is the cost, the rest is noise)."""
    best, got = float("inf"), (0, 0)
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--lookback", type=int, default=draft_replay.LOOKBACK)
    ap.add_argument("--naive", action="store_true")
    args = ap.parse_args()
    rng = random.Random(0)
    for kind in ("random", "repetitive"):
        for prompt in (64, draft_replay.LOOKBACK):
            hs = [(history(kind, prompt, args.positions, rng), prompt) for _ in range(args.requests)]
            us, (steps, produced) = timed(lambda: draft_replay.replay_batch(hs, K, NMIN, NMAX, args.positions, args.lookback), args.repeat)
            line = f"{kind:10s} prompt={prompt:5d}  {args.requests} x {args.positions} positions: {us:9.0f} µs  E={produced / steps:.2f} ({steps} steps)"
            if args.naive:
                nus, want = timed(lambda: (sum(naive_replay(h, max(p, len(h) - args.positions))[0] for h, p in hs), 0), 3)
                assert want[0] == steps, (want, steps)
                line += f"   naive (propose_ngram per step): {nus:9.0f} µs"
            print(line, flush=True)


if __name__ == "__main__":
    main()
