"""Does llguidance's mask fill scale with threads on this host? (issue 18, structured output)

Fresh matcher states every step, as in a decode step: each of R matchers (the structured
bench's JSON schema, the synthetic byte-level vocab of `--vocab` tokens) consumes one allowed
token (picked by a seeded RNG), then every mask is filled, by one thread (a loop of
`unsafe_compute_mask_ptr`, which releases the GIL), by `LLExecutor(num_threads=t)` (llguidance's
own batch fill and `consume_token_par`), or by t Python threads over slices of the matchers
(their consume: a loop). Prints one JSON line per (schema, rows, how, threads): wall us per
step for the fill and for the consume.

    python benchmarks/grammar_parallel.py --rows 16,64 --threads 1,2,4,8
    python benchmarks/grammar_parallel.py --rows 16 --threads 1 --skip 28 --steps 100   # deeper into the document
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from structured_bench import SCHEMA, synthetic_tokenizer_json  # noqa: E402


def schemas() -> dict[str, dict[str, Any]]:
    """The bench's schema (a 12-character bounded string: llguidance's precomputed slices do
    not apply inside it) and the same with the bound removed."""
    unbounded = copy.deepcopy(SCHEMA)
    del unbounded["properties"]["items"]["items"]["properties"]["name"]["maxLength"]
    return {"bounded": SCHEMA, "unbounded": unbounded}


def run(llg: Any, tok: Any, schema: dict[str, Any], rows: int, how: str, threads: int, steps: int, vocab: int,
        skip: int = 2) -> dict[str, Any]:
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    ms = [llg.LLMatcher(tok, grammar, log_level=0) for _ in range(rows)]
    words = (vocab + 31) // 32
    bm = np.zeros((rows, words), dtype=np.int32)
    ptr, nbytes = bm.ctypes.data, words * 4
    rng = random.Random(0)
    ex = llg.LLExecutor(num_threads=threads) if how == "executor" else None
    pool = ThreadPoolExecutor(threads) if how == "pythreads" else None

    def part(k: int) -> None:
        for i in range(k, rows, threads):
            ms[i].unsafe_compute_mask_ptr(ptr + i * nbytes, nbytes)

    fill = consume = 0.0
    for step in range(steps + skip):  # untimed: the first steps (two warm the lexer; more: start deeper in the document)
        t0 = time.perf_counter()
        if ex is not None:
            ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], ptr, nbytes, rows)
        elif pool is not None:
            list(pool.map(part, range(threads)))
        else:
            part(0) if threads == 1 else None
        t1 = time.perf_counter()
        picks = []
        for i in range(rows):
            allowed = np.flatnonzero(np.unpackbits(bm[i].view(np.uint8), bitorder="little")[:vocab])
            picks.append(int(allowed[rng.randrange(len(allowed))]))
        t2 = time.perf_counter()
        if ex is not None:  # llguidance's batch consume, as the engine's mask job uses it
            ex.consume_token_par(list(zip(ms, picks)))
        else:
            for m, p in zip(ms, picks):
                m.consume_token(p)
        t3 = time.perf_counter()
        if step >= skip:
            fill += t1 - t0
            consume += t3 - t2
    if pool is not None:
        pool.shutdown()
    return {"rows": rows, "how": how, "threads": threads, "fill_us_per_step": round(1e6 * fill / steps),
            "fill_us_per_mask": round(1e6 * fill / steps / rows, 1), "consume_us_per_token": round(1e6 * consume / steps / rows, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rows", default="16,64")
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=2,
                    help="untimed steps first: the document's opening tokens are its cheapest masks (structured_bench's "
                         "128-token outputs sit at tokens 0-127: --skip 28 --steps 100 times the deeper part)")
    args = ap.parse_args()
    import llguidance as llg

    tok = llg.LLTokenizer(synthetic_tokenizer_json(args.vocab, args.vocab - 1), n_vocab=args.vocab, eos_token=args.vocab - 1)
    for name, schema in schemas().items():
        for rows in (int(r) for r in args.rows.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                for how in (["serial"] if threads == 1 else ["executor", "pythreads"]):
                    r = run(llg, tok, schema, rows, how, threads, args.steps, args.vocab, args.skip)
                    print(json.dumps({"schema": name, **r}), flush=True)


if __name__ == "__main__":
    main()
