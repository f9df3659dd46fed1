"""N-gram speculative decoding: output tok/s and tokens per step, with and without
speculation, sync and async, in one process; greedy outputs are checked identical.

Workloads:
  code    the shipped default model (trained on CPython stdlib source) on code prompts
          that invite copying (a function, then a request to repeat/extend it)
  random  a repetitive token-id workload on a random-weight model: the tiny test
          model by default, or `--random-weights SHAPE` (e.g. llama-3.2-1b on a GPU)

Variants per (workload, concurrency): spec none / always / auto, sync and async.
`--requests 1,4,16` sweeps concurrency; `--extras-every N` gives every Nth request a
presence penalty (such requests are verified without drafts; the others keep theirs).

  python benchmarks/spec_bench.py                      # CPU, both workloads
  python benchmarks/spec_bench.py --device cuda --random-weights llama-3.2-1b --workloads random
  python benchmarks/spec_bench.py --device cuda --random-weights llama-3.2-1b --requests 1,4,16,64,256 --extras-every 4
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

import msgspec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiosched import AsyncEngine, SamplingParams  # noqa: E402
from aiosched.config import EngineConfig  # noqa: E402

CODE_FUNCS = [
    '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            result.append(a[i])
            i += 1
        else:
            result.append(b[j])
            j += 1
    result.extend(a[i:])
    result.extend(b[j:])
    return result
''',
    '''class Stack:
    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from empty stack")
        return self._items.pop()

    def __len__(self):
        return len(self._items)
''',
    '''def parse_header(line):
    """Split a 'Key: value' header line."""
    if ":" not in line:
        raise ValueError("invalid header line: %r" % (line,))
    key, value = line.split(":", 1)
    return key.strip().lower(), value.strip()
''',
]


def code_prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        f = CODE_FUNCS[i % len(CODE_FUNCS)]
        first = f.splitlines()[0]
        if i % 2 == 0:  # repeat it (a copy with a new name)
            out.append(f"{f}\n\n# The same function again, unchanged:\n\n{first}\n")
        else:  # extend it: a second version right below
            out.append(f"{f}\n\n{f}\n\n# Version 3, with the same body:\n\n{first}\n")
    return out


def random_prompts(n: int, vocab: int) -> list[list[int]]:
    """Token ids with repeated phrases (a period of 5..12 tokens, several repeats)."""
    out = []
    for i in range(n):
        period = 5 + i % 8
        phrase = [(i * 131 + j * 17) % (vocab - 10) + 5 for j in range(period)]
        out.append((phrase * (1 + 64 // period))[:64])
    return out


def _log_policy(eng: AsyncEngine) -> list[tuple[str, bool, int, float, bool]] | None:
    """Record every observation the engine's SpecPolicy gets: (phase, drafting, tokens, ms, prompt work)."""
    pol = eng.spec_policy
    if pol is None:
        return None
    log: list[tuple[str, bool, int, float, bool]] = []
    orig = pol.observe

    def observe(tokens: int, seconds: float, prompt_work: bool = False, requests: int = 0) -> None:
        log.append((pol._phase, pol.drafting, tokens, seconds * 1e3, prompt_work))
        orig(tokens, seconds, prompt_work, requests)

    pol.observe = observe  # type: ignore[method-assign]
    return log


def _summarize_policy(log: list[tuple[str, bool, int, float, bool]], start: int) -> dict[str, Any]:
    """Per (phase, drafting, prompt work): outputs, tokens, ms, tok/s; and the first 60 observations of the timed run."""
    agg: dict[str, list[float]] = {}
    for ph, d, t, ms, pw in log[start:]:
        a = agg.setdefault(f"{ph}/{'draft' if d else 'plain'}{'/prompt' if pw else ''}", [0, 0, 0.0])
        a[0] += 1
        a[1] += t
        a[2] += ms
    return {"warmup_outputs": start,
            "by_phase": {k: {"outputs": c, "tokens": t, "ms": round(ms, 1), "tok_s": round(t / ms * 1e3) if ms else 0}
                         for k, (c, t, ms) in agg.items()},
            "first": [(ph.replace("measure-", "m-")[:6], int(d), t, round(ms, 2), int(pw)) for ph, d, t, ms, pw in log[start : start + 60]]}


async def run_once(config: EngineConfig, prompts: list[Any], params: list[SamplingParams], policy_log: bool = False) -> dict[str, Any]:
    async with AsyncEngine(config) as eng:
        plog = _log_policy(eng) if policy_log else None
        # Warm-up with the whole batch: the kernels' shape specialisations compile here, not in the timed run.
        await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=8, temperature=0.0)) for p in prompts])
        s0 = dict(eng.stats())
        warm = len(plog) if plog is not None else 0
        tm = eng.timings
        h0 = (tm.steps, tm.schedule_s, tm.submit_s, tm.update_s, tm.wait_s)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(prompts, params)])
        wall = time.perf_counter() - t0
        s1 = eng.stats()
        # the engine loop's own time per step (schedule, submit, update) and its wait for the executor
        n = max(1, tm.steps - h0[0])
        host = {k: round(1e3 * (v - v0) / n, 3) for k, v, v0 in
                zip(("schedule", "submit", "update", "wait"), (tm.schedule_s, tm.submit_s, tm.update_s, tm.wait_s), h0[1:])}
    gen = sum(len(o.token_ids) for o in outs)
    steps = s1["steps"] - s0["steps"]
    draft = s1["spec_draft_tokens"] - s0["spec_draft_tokens"]
    acc = s1["spec_accepted_tokens"] - s0["spec_accepted_tokens"]
    row = {
        "tokens": [o.token_ids for o in outs],
        "out_tok_s": gen / wall, "wall_s": wall, "generated": gen, "steps": steps,
        "tokens_per_step": gen / steps if steps else 0.0,
        "acceptance_rate": acc / draft if draft else 0.0,
        "mean_accepted_len": s1["spec_mean_accepted_len"],
        "spec_auto": s1.get("spec_auto"),
        "loop_ms_per_step": host,
    }
    if plog is not None:
        pol = eng.spec_policy
        row["policy"] = dict(_summarize_policy(plog, warm), rates={str(k): round(v) for k, v in pol.rates.items()}, rounds=pol.rounds,
                             rounds_estimated=pol.rounds_estimated, estimate=round(pol.last_estimate, 2),
                             verify_costs={str(b): round(c.ratio, 2) for b, c in pol.costs.items()})
    return row


def request_params(n: int, params: SamplingParams, extras_every: int) -> list[SamplingParams]:
    """Every `extras_every`-th request (0: none) with a presence penalty (a sampling extra)."""
    pen = msgspec.structs.replace(params, presence_penalty=0.5)
    return [pen if extras_every and i % extras_every == extras_every - 1 else params for i in range(n)]


async def bench(name: str, base: dict[str, Any], prompts: list[Any], params: list[SamplingParams], spec: dict[str, Any],
                args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for async_scheduling in (m == "async" for m in args.modes.split(",")):
        ref = None
        # none: no speculation; always: drafts every step; auto: the engine's SpecPolicy
        # (measures both, keeps drafting only while it is faster); off: speculation
        # configured but never drafting (disable_by_batch_size=1): what plain steps cost
        # in a speculative engine.
        for use_spec in args.variants.split(","):
            sc = None if use_spec == "none" else dict(spec, auto=use_spec == "auto", disable_by_batch_size=int(use_spec == "off"))
            cfg = EngineConfig.load(dict(base, async_scheduling=async_scheduling, speculative=sc))
            r = await run_once(cfg, prompts, params, args.policy_log)
            toks = r.pop("tokens")
            if ref is None:
                ref = toks
            # Where outputs differ (bf16: the verify step's kernels round differently from the
            # decode graph's), how far each request agreed with the run without speculation.
            agree = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(toks, ref)]
            r.update(workload=name, requests=len(prompts), extras_requests=sum(sp.presence_penalty != 0 for sp in params), mode="async" if async_scheduling else "sync", spec=use_spec,
                     identical_to_no_spec=(toks == ref), identical_requests=sum(a == b for a, b in zip(toks, ref)),
                     mean_agreeing_prefix=sum(agree) / len(agree))
            rows.append(r)
            print(f"{name:7s} c={len(prompts):<3d} {r['mode']:5s} spec={use_spec:6s} {r['out_tok_s']:8.1f} tok/s  {r['tokens_per_step']:5.2f} tok/step  "
                  f"steps={r['steps']:5d}  accept={r['acceptance_rate']:.2f}  mean_len={r['mean_accepted_len']:.2f}  "
                  f"identical={r['identical_to_no_spec']} ({r['identical_requests']}/{len(toks)} requests, "
                  f"mean agreeing prefix {r['mean_agreeing_prefix']:.1f} tokens)  loop ms/step {r['loop_ms_per_step']}", flush=True)
            if "policy" in r:
                print("  policy " + json.dumps(r["policy"]), flush=True)
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", default=None, metavar="SHAPE", help="random workload on this shape (default: the tiny test model)")
    ap.add_argument("--workloads", default="code,random")
    ap.add_argument("--num-tokens", type=int, default=4, help="draft tokens per step (k)")
    ap.add_argument("--ngram-min", type=int, default=1)
    ap.add_argument("--ngram-max", type=int, default=4)
    ap.add_argument("--requests", default="4", help="concurrent requests (a comma list sweeps them)")
    ap.add_argument("--extras-every", type=int, default=0, help="every Nth request has a presence penalty (0: none)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None, help="cap the model's context (buffers sized by it)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--variants", default="none,always,auto", help="none (first: the reference), always, auto, off; repeat names to interleave repeats")
    ap.add_argument("--policy-log", action="store_true", help="auto rows: print what the SpecPolicy measured, per phase")
    args = ap.parse_args()
    spec = {"method": "ngram", "num_tokens": args.num_tokens, "ngram_min": args.ngram_min, "ngram_max": args.ngram_max}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    common: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if args.cpu_threads:
        common["cpu_threads"] = args.cpu_threads
    if args.max_model_len:
        common["max_model_len"] = args.max_model_len
    rows: list[dict[str, Any]] = []
    wl = args.workloads.split(",")
    conc = [int(c) for c in args.requests.split(",")]
    if "code" in wl:
        for c in conc:
            rows += await bench("code", dict(common, model=None), code_prompts(c), request_params(c, params, args.extras_every), spec, args)
    if "random" in wl:
        with tempfile.TemporaryDirectory() as tmp:
            if args.random_weights:
                from aiosched.bench import random_weights_config

                base = dict(common, **random_weights_config(args.random_weights, os.path.join(tmp, "model")))
                vocab = json.load(open(os.path.join(tmp, "model", "config.json")))["vocab_size"]
            else:
                from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

                d = write_random_checkpoint(os.path.join(tmp, "tiny"), arch="llama", seed=3)
                base = dict(common, model=str(d))
                vocab = json.load(open(os.path.join(d, "config.json")))["vocab_size"]
            for c in conc:
                rows += await bench("random", base, random_prompts(c, vocab), request_params(c, params, args.extras_every), spec, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    asyncio.run(main())
