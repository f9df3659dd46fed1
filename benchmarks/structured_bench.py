"""Throughput with structured output: a mixed batch (a fraction of the requests JSON-schema
constrained) vs all-unconstrained, in sync and async scheduling, in one process.

Every request generates exactly `--output-len` tokens (unconstrained: ignore_eos; constrained:
a schema whose shortest valid output is longer, so they stop for length), so the token
counts are equal and the difference is the cost of grammar masks.

CPU (tiny random checkpoint; `--vocab N` pads the vocab to N with a synthetic byte-level
tokenizer so the mask cost is that of a real vocab):

    .venv/bin/python benchmarks/structured_bench.py
    .venv/bin/python benchmarks/structured_bench.py --vocab 128256

GPU (random weights of a real shape, synthetic tokenizer of the same vocab):

    python benchmarks/structured_bench.py --device cuda --random-weights llama-3.2-1b --concurrency 64

Prints one JSON line per (mode, workload) and a summary table.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import string
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiosched import AsyncEngine, EngineConfig, SamplingParams, StructuredOutputParams  # noqa: E402

# Long by construction: at least 200 array items are needed, so a request always runs to max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 200, "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 100000}, "name": {"type": "string", "maxLength": 12},
                       "ok": {"type": "boolean"}},
        "required": ["id", "name", "ok"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False,
}


# Short by construction: a request that finishes ("stop") has produced a complete document,
# which the validity pass parses and checks (no jsonschema needed where this runs).
SMALL_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 1000}, "name": {"type": "string", "maxLength": 8},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
                   "ok": {"type": "boolean"}},
    "required": ["id", "name", "tags", "ok"], "additionalProperties": False,
}


def conforms_small(text: str) -> bool:
    """`text` is one JSON document valid against SMALL_SCHEMA (checked by hand)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return (isinstance(doc, dict) and set(doc) == {"id", "name", "tags", "ok"}
            and type(doc["id"]) is int and 0 <= doc["id"] <= 1000
            and isinstance(doc["name"], str) and len(doc["name"]) <= 8
            and isinstance(doc["tags"], list) and len(doc["tags"]) <= 3
            and all(isinstance(t, str) and len(t) <= 6 for t in doc["tags"])
            and type(doc["ok"]) is bool)


def synthetic_tokenizer_json(vocab_size: int, eos_id: int) -> str:
    """A byte-level BPE tokenizer.json of exactly `vocab_size` tokens (no merges: the grammar
    engine only needs each token's bytes). 256 byte tokens, JSON-ish and printable n-grams,
    then lowercase 4-grams; `<|endoftext|>` at eos_id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    enc = {b: c for b, c in zip(sorted(range(256), key=lambda b: b), _bytes_to_unicode())}
    assert set(enc.values()) == set(byte_chars)

    def mapped(s: str) -> str:
        return "".join(enc[b] for b in s.encode())

    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab and len(vocab) < vocab_size - 1:
            vocab[tok] = len(vocab)

    for b in range(256):
        add(enc[b])
    for s in ['{"', '":', '",', '"}', '},', '}]', ':[', '[{', 'true', 'false', 'null', ', ', ' "', '":"', '","', '{"id":', '"name":', '"ok":']:
        add(mapped(s))
    printable = string.ascii_letters + string.digits + string.punctuation + " "
    gens = [("".join(p) for p in itertools.product(printable, repeat=2)),
            ("".join(p) for p in itertools.product(" " + string.ascii_lowercase, repeat=3)),
            ("".join(p) for p in itertools.product(string.ascii_lowercase, repeat=4))]
    for gen in gens:
        for s in gen:
            if len(vocab) >= vocab_size - 1:
                break
            add(mapped(s))
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    eos_id = min(eos_id, vocab_size - 1)
    ordered = [t for t, _ in items]
    ordered.insert(eos_id, "<|endoftext|>")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(ordered)}, merges=[]))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def prepare_model(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    d = os.path.join(tmp, "model")
    if args.random_weights:
        from aiosched.bench import random_weights_config

        extra = random_weights_config(args.random_weights, d)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        eos = cfg.get("eos_token_id") or cfg["vocab_size"] - 1
        eos = eos[0] if isinstance(eos, list) else eos
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            f.write(synthetic_tokenizer_json(cfg["vocab_size"], eos))
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": eos}, f)
        return extra
    from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

    write_random_checkpoint(d, arch="llama", seed=1, vocab_size=args.vocab, max_position_embeddings=4096)
    if args.vocab:
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            f.write(synthetic_tokenizer_json(cfg["vocab_size"], cfg["eos_token_id"]))
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": cfg["eos_token_id"]}, f)
    return {"model": d}


async def run_one(config: dict[str, Any], args: argparse.Namespace, structured_frac: float) -> dict[str, Any]:
    eng = AsyncEngine(EngineConfig.load(config))
    await eng.start()
    try:
        assert eng.info is not None
        vocab = eng.info.vocab_size
        spec = StructuredOutputParams(json_schema=json.dumps(SCHEMA))
        every = round(1 / structured_frac) if structured_frac > 0 else 0

        def params(i: int) -> SamplingParams:
            constrained = every and i % every == 0
            return SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=i, ignore_eos=not constrained,
                                  structured=spec if constrained else None)

        prompts = [[(i * 7919 + j * 104729) % (vocab - 10) + 5 for j in range(args.input_len)] for i in range(args.num_requests)]
        await eng.generate(prompts[0], SamplingParams(max_tokens=4, structured=spec if every else None))  # warm-up (compile cache, first masks)
        t0, c0 = time.perf_counter(), time.process_time()
        outs = await asyncio.gather(*[eng.generate(p, params(i)) for i, p in enumerate(prompts)])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(o.token_ids) for o in outs)
        n_con = sum(1 for i in range(len(prompts)) if every and i % every == 0)
        con_tokens = sum(len(o.token_ids) for i, o in enumerate(outs) if every and i % every == 0)
        t = eng.timings
        mask = _mask_stats(eng)
        return {**mask, "requests": len(outs), "constrained": n_con, "output_tokens": tokens, "constrained_tokens": con_tokens,
                "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "tok_per_s": round(tokens / wall, 1), "steps": t.steps,
                "engine_wait_s": round(t.wait_s, 3)}
    finally:
        await eng.shutdown()


def _mask_stats(eng: AsyncEngine) -> dict[str, Any]:
    """The grammar manager's counters (in-process torch runner only): launch-thread ms per
    step with masks, and the share of rows whose mask was prefetched off that thread."""
    runner = getattr(getattr(eng, "_executor", None), "runner", None)
    mgr = getattr(getattr(runner, "extras", None), "structured", None)
    if mgr is None or not mgr.stats["mask_steps"]:
        return {}
    st = mgr.stats
    rows = st["prefetched_rows"] + st["launch_thread_rows"]
    return {"mask_steps": st["mask_steps"], "launch_thread_mask_ms_per_step": round(1e3 * st["launch_thread_s"] / st["mask_steps"], 3),
            "job_ms_per_step": round(1e3 * st["job_s"] / st["mask_steps"], 3),
            # the job's time split: waiting for the previous step's ids, advancing, filling
            "job_wait_ms_per_step": round(1e3 * st["job_wait_s"] / st["mask_steps"], 3),
            "job_consume_ms_per_step": round(1e3 * st["job_consume_s"] / st["mask_steps"], 3),
            "job_fill_ms_per_step": round(1e3 * st["job_fill_s"] / st["mask_steps"], 3),
            "job_fill_us_per_row": round(1e6 * st["job_fill_s"] / st["job_rows"], 1) if st["job_rows"] else None,
            "prefetched_share": round(st["prefetched_rows"] / rows, 3) if rows else 0.0}


def gil_probe(tokenizer_json: str, eos: int, n: int = 16, reps: int = 50) -> dict[str, Any]:
    """Does llguidance release the GIL while it fills masks? A second Python thread counts
    while the main thread fills `n` JSON masks `reps` times; its count rate is compared
    with its rate alone (1.0 = unhindered, ~0 = the fill holds the GIL)."""
    import threading

    import numpy as np

    from aiosched.executors.structured_output import GrammarTokenizer, StructuredOutputManager, bitmask_words
    from aiosched.protocol import NewRequestData

    gtok = GrammarTokenizer(tokenizer_json, eos_token_ids=[eos])
    mgr = StructuredOutputManager(gtok, num_threads=1)
    spec = StructuredOutputParams(json_schema=json.dumps(SCHEMA))
    for i in range(n):
        mgr.add_request(NewRequestData(f"r{i}", [5, 6], 2, SamplingParams(structured=spec), 0))
    bm = np.zeros((n, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    rows = [(i, f"r{i}") for i in range(n)]
    mgr.fill_bitmask(bm, rows)  # first masks build lexer state
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    def rate_while(work: Any) -> tuple[float, float]:
        stop.clear()
        count[0] = 0
        th = threading.Thread(target=spin)
        th.start()
        t0 = time.perf_counter()
        work()
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        return count[0] / dt, dt

    alone, _ = rate_while(lambda: time.sleep(0.3))
    during, dt = rate_while(lambda: [mgr.fill_bitmask(bm, rows) for _ in range(reps)])
    return {"rows": n, "vocab": gtok.vocab_size, "fill_ms_per_step": round(1e3 * dt / reps, 3),
            "spinner_rate_vs_alone": round(during / alone, 3)}


async def validity_pass(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`--validate N` requests, every 4th constrained by SMALL_SCHEMA and the rest free, all
    at once: every constrained request that finished must parse and conform."""
    async with AsyncEngine(EngineConfig.load(config)) as eng:
        assert eng.info is not None
        vocab = eng.info.vocab_size
        spec = StructuredOutputParams(json_schema=json.dumps(SMALL_SCHEMA))
        con = [i % 4 == 0 for i in range(args.validate)]
        params = [SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=1000 + i, structured=spec if c else None,
                                 ignore_eos=not c) for i, c in enumerate(con)]
        prompts = [[(i * 7919 + j * 104729) % (vocab - 10) + 5 for j in range(args.input_len)] for i in range(args.validate)]
        outs = await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(prompts, params)])
    finished = [o for o, c in zip(outs, con) if c and o.finish_reason == "stop"]
    valid = sum(conforms_small(o.text) for o in finished)
    bad = [o.text[:200] for o in finished if not conforms_small(o.text)]
    return {"constrained": sum(con), "finished": len(finished), "valid": valid, "invalid_examples": bad[:3],
            "free_requests_full_length": sum(len(o.token_ids) == args.output_len for o, c in zip(outs, con) if not c)}


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_model(args, tmp)
        base.update(device=args.device, max_num_seqs=args.concurrency, max_num_batched_tokens=args.max_num_batched_tokens,
                    max_model_len=args.input_len + args.output_len + 16)
        if args.device == "cpu":
            base.setdefault("num_kv_blocks", (args.input_len + args.output_len) // 16 * args.concurrency + 64)
        if args.validate:
            for mode in args.modes.split(","):
                v = await validity_pass(dict(base, async_scheduling=(mode == "async")), args)
                v["mode"] = mode
                print("validity " + json.dumps(v), flush=True)
                if v["valid"] != v["finished"]:
                    raise SystemExit(f"structured output INVALID in {mode} mode: {v}")
        if args.gil_probe:
            with open(os.path.join(base["model"], "tokenizer.json")) as f:
                tj = f.read()
            with open(os.path.join(base["model"], "generation_config.json")) as f:
                eos = json.load(f).get("eos_token_id", 0)
            print("gil_probe " + json.dumps(gil_probe(tj, eos[0] if isinstance(eos, list) else eos)), flush=True)
        best: dict[tuple[str, str], dict[str, Any]] = {}
        walls: dict[tuple[str, str], list[float]] = {}
        fracs = [float(f) for f in (args.fracs or str(args.structured_frac)).split(",")]
        workloads = [("unconstrained", 0.0, "")]
        threads = args.grammar_threads.split(",") if args.grammar_threads else [""]
        for path in args.grammar_paths.split(","):
            for th in threads:
                for sl in args.slices.split(","):
                    n, _, rows = th.partition("/")
                    tag = ", ".join(x for x in (path, f"{n} mask threads" if n else "", f"pool from {rows} rows" if rows else "",
                                                f"{sl} slices" if sl else "") if x)
                    workloads += [(f"{int(f * 100)}% structured" + (f" [{tag}]" if tag else ""), f, (path, th, sl)) for f in fracs]
        # Interleaved repeats, best wall time kept: a shared machine's noise only ever adds time.
        for rep in range(args.repeats):
            for mode in args.modes.split(","):
                for label, frac, path in workloads:
                    cfg = dict(base, async_scheduling=(mode == "async"))
                    # "before": the old path (masks filled on the launch thread), only for this comparison
                    path, th, sl = path or ("", "", "")
                    os.environ["AIOSCHED_GRAMMAR_PREFETCH"] = "0" if path == "before" else "1"
                    n, _, rows = th.partition("/")
                    for var, val in (("AIOSCHED_GRAMMAR_THREADS", n), ("AIOSCHED_GRAMMAR_PARALLEL_ROWS", rows),
                                     ("AIOSCHED_LLG_SLICES", sl)):
                        if val:
                            os.environ[var] = val
                        else:
                            os.environ.pop(var, None)
                    r = await run_one(cfg, args, frac)
                    r.update(mode=mode, workload=label, repeat=rep)
                    print(json.dumps(r), flush=True)
                    walls.setdefault((mode, label), []).append(r["wall_s"])
                    if (mode, label) not in best or r["wall_s"] < best[(mode, label)]["wall_s"]:
                        best[(mode, label)] = r
        rows = list(best.values())
        for r in rows:
            r["wall_s_all"] = walls[(r["mode"], r["workload"])]
        print(f"\nbest of {args.repeats} (interleaved); load average at the end: {os.getloadavg()[0]:.1f}")
        print("| scheduling | workload | requests (constrained) | output tokens | wall s (best; all) | process CPU s (of the best) | tok/s | vs unconstrained "
              "| launch-thread mask ms/step | prefetched | job ms/step: wait / consume / fill | fill us/row |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for mode in args.modes.split(","):
            ref = next(r for r in rows if r["mode"] == mode and r["workload"] == "unconstrained")
            for r in (x for x in rows if x["mode"] == mode):
                print(f"| {mode} | {r['workload']} | {r['requests']} ({r['constrained']}) | {r['output_tokens']} | "
                      f"{r['wall_s']}; {', '.join(str(w) for w in r['wall_s_all'])} | {r['cpu_s']} | "
                      f"{r['tok_per_s']} | {r['tok_per_s'] / ref['tok_per_s']:.2f}x | {r.get('launch_thread_mask_ms_per_step', '-')} | "
                      f"{r.get('prefetched_share', '-')} | {r.get('job_wait_ms_per_step', '-')} / {r.get('job_consume_ms_per_step', '-')} / "
                      f"{r.get('job_fill_ms_per_step', '-')} | {r.get('job_fill_us_per_row', '-')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", default=None, metavar="SHAPE", help="e.g. llama-3.2-1b (random weights, synthetic tokenizer)")
    ap.add_argument("--vocab", type=int, default=None, help="tiny model only: pad the vocab (synthetic tokenizer)")
    ap.add_argument("--concurrency", type=int, default=16, help="max_num_seqs")
    ap.add_argument("--num-requests", type=int, default=None, help="default: 2 x concurrency")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--structured-frac", type=float, default=0.25)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--fracs", default=None, help="constrained fractions to compare with 0%%, e.g. 0.25,1.0 (default: --structured-frac)")
    ap.add_argument("--grammar-paths", default="", help="'before,after': issue 18's old launch-thread masks vs prefetched ones, in one run")
    ap.add_argument("--grammar-threads", default="", help="mask-fill threads to compare, e.g. 8,15 (AIOSCHED_GRAMMAR_THREADS; default: the manager's); "
                    "THREADS/ROWS also sets the row count from which the pool fills (AIOSCHED_GRAMMAR_PARALLEL_ROWS), e.g. 8/32,8/2")
    ap.add_argument("--slices", default="", help="'default,ours': llguidance's own token slices vs the worker's STRING_SLICES "
                    "(AIOSCHED_LLG_SLICES), in one run")
    ap.add_argument("--gil-probe", action="store_true", help="first, measure whether the mask fill releases the GIL")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each config; the best is reported")
    ap.add_argument("--validate", type=int, default=0, metavar="N",
                    help="first, N requests (every 4th constrained by a short schema): each finished one must parse and conform")
    args = ap.parse_args()
    if args.num_requests is None:
        args.num_requests = 2 * args.concurrency
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
