"""Does llguidance's mask fill scale with threads on this host? (issue 18, structured output)

Fresh matcher states every step, as in a decode step: each of R matchers (the structured
bench's JSON schema, the synthetic byte-level vocab of `--vocab` tokens) consumes one allowed
token (picked by a seeded RNG), then every mask is filled, by one thread (a loop of
`unsafe_compute_mask_ptr`, which releases the GIL), by `LLExecutor(num_threads=t)` (llguidance's
own batch fill and `consume_token_par`), by t Python threads over slices of the matchers
(their consume: a loop), or by t worker processes (`procs`: each owns every t-th matcher and its
own tokenizer, fills its rows of one shared-memory bitmask and consumes its picks; one pipe
message each way per step). Prints one JSON line per (schema, rows, how, threads): wall us per
step for the fill and for the consume.

    python benchmarks/grammar_parallel.py --rows 16,64 --threads 1,2,4,8
    python benchmarks/grammar_parallel.py --rows 16 --threads 1 --skip 28 --steps 100   # deeper into the document
    python benchmarks/grammar_parallel.py --rows 16,64 --threads 1,2,4,8,15 --hows procs    # processes instead of threads
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
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


def _picks(bm: np.ndarray, vocab: int, rng: random.Random) -> list[int]:
    """One allowed token per row of the bitmask, drawn by the seeded RNG (the step's "sample")."""
    picks = []
    for row in bm:
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab])
        picks.append(int(allowed[rng.randrange(len(allowed))]))
    return picks


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

    slowest: list[float] = []  # serial: the step's slowest single mask (a parallel fill cannot beat it)
    each: list[float] = []

    def part(k: int) -> None:
        if how == "serial":
            worst = 0.0
            for i in range(rows):
                t = time.perf_counter()
                ms[i].unsafe_compute_mask_ptr(ptr + i * nbytes, nbytes)
                t = time.perf_counter() - t
                each.append(t)
                worst = max(worst, t)
            slowest.append(worst)
            return
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
        picks = _picks(bm, vocab, rng)
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
    out = {"rows": rows, "how": how, "threads": threads, "fill_us_per_step": round(1e6 * fill / steps),
           "fill_us_per_mask": round(1e6 * fill / steps / rows, 1), "consume_us_per_token": round(1e6 * consume / steps / rows, 1)}
    if slowest:  # timed steps only
        timed, per = slowest[skip:], sorted(each[skip * rows:])
        out["slowest_mask_us_per_step"] = round(1e6 * sum(timed) / len(timed))
        out["mask_us_p50_p90_p99"] = [round(1e6 * per[int(q * (len(per) - 1))], 1) for q in (0.5, 0.9, 0.99)]
    return out


def _proc_worker(conn: Any, shm_name: str, schema: dict[str, Any], rows: int, k: int, procs: int, vocab: int) -> None:
    """One fill process: matchers k, k + procs, ... of `rows`, its own tokenizer; per step
    `b"f"` fills its rows of the shared bitmask, a list of picks consumes them."""
    import llguidance as llg

    tok = llg.LLTokenizer(synthetic_tokenizer_json(vocab, vocab - 1), n_vocab=vocab, eos_token=vocab - 1)
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    mine = list(range(k, rows, procs))
    ms = [llg.LLMatcher(tok, grammar, log_level=0) for _ in mine]
    shm = shared_memory.SharedMemory(name=shm_name)
    words = (vocab + 31) // 32
    bm = np.ndarray((rows, words), dtype=np.int32, buffer=shm.buf)
    ptr, nbytes = bm.ctypes.data, words * 4
    conn.send(b"ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        if msg == b"f":
            for i, m in zip(mine, ms):
                m.unsafe_compute_mask_ptr(ptr + i * nbytes, nbytes)
        else:
            for m, p in zip(ms, msg):
                m.consume_token(p)
        conn.send(b"ok")
    del bm
    shm.close()


def run_procs(schema: dict[str, Any], rows: int, procs: int, steps: int, vocab: int, skip: int = 2) -> dict[str, Any]:
    words = (vocab + 31) // 32
    shm = shared_memory.SharedMemory(create=True, size=rows * words * 4)
    bm = np.ndarray((rows, words), dtype=np.int32, buffer=shm.buf)
    ctx = mp.get_context("spawn")
    pipes, children = [], []
    for k in range(procs):
        a, b = ctx.Pipe()
        c = ctx.Process(target=_proc_worker, args=(b, shm.name, schema, rows, k, procs, vocab), daemon=True)
        c.start()
        pipes.append(a)
        children.append(c)
    for a in pipes:
        assert a.recv() == b"ready"
    rng = random.Random(0)
    fill = consume = 0.0
    for step in range(steps + skip):
        t0 = time.perf_counter()
        for a in pipes:
            a.send(b"f")
        for a in pipes:
            a.recv()
        t1 = time.perf_counter()
        picks = _picks(bm, vocab, rng)
        t2 = time.perf_counter()
        for k, a in enumerate(pipes):
            a.send(picks[k::procs])
        for a in pipes:
            a.recv()
        t3 = time.perf_counter()
        if step >= skip:
            fill += t1 - t0
            consume += t3 - t2
    for a in pipes:
        a.send(None)
    for c in children:
        c.join()
    del bm
    shm.close()
    shm.unlink()
    return {"rows": rows, "how": "procs", "threads": procs, "fill_us_per_step": round(1e6 * fill / steps),
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
    ap.add_argument("--hows", default="serial,executor,pythreads", help="which fills (serial runs at 1 thread only)")
    args = ap.parse_args()
    import llguidance as llg

    tok = llg.LLTokenizer(synthetic_tokenizer_json(args.vocab, args.vocab - 1), n_vocab=args.vocab, eos_token=args.vocab - 1)
    for name, schema in schemas().items():
        for rows in (int(r) for r in args.rows.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                hows = [h for h in args.hows.split(",") if (h == "serial") == (threads == 1) or h == "procs"]
                for how in hows:
                    if how == "procs":
                        r = run_procs(schema, rows, threads, args.steps, args.vocab, args.skip)
                    else:
                        r = run(llg, tok, schema, rows, how, threads, args.steps, args.vocab, args.skip)
                    print(json.dumps({"schema": name, **r}), flush=True)


if __name__ == "__main__":
    main()
