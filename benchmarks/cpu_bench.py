"""CPU benchmarks (issue 23): the decode step, and the engine workload in interleaved rounds.

`step`: one decode step of a random float32 Llama over a paged KV cache, outside the
engine (the model, the cache and AttentionMetadata built by hand; the LM head included).
Times each attention path (`kernel`: the C kernel; `torch`: plain torch) interleaved,
median of --iters steps per round; `--profile` prints the torch profiler's self-time table.

    python benchmarks/cpu_bench.py step --config benchmarks/configs/llama-512x8.json --batch 64 --ctx 160 --profile

`e2e`: the engine workload of issue 23 (64 prompts x 128 tokens, 64 out, ignore EOS, greedy,
no prefix caching, max-num-batched-tokens 512), each variant a fresh `aiosched.bench`
process, variants interleaved and repeated; prints per-variant median and min-max of req/s.

    python benchmarks/cpu_bench.py e2e --config benchmarks/configs/llama-512x8.json --rounds 3 \\
        --variant threads1:--cpu-threads=1 --variant threads2:--cpu-threads=2

Side by side with vLLM-CPU (installed in its own venv, never a dependency), on one
checkpoint built by `ckpt` (transformers' own save, float32, the embedded tokenizer):

    python benchmarks/cpu_bench.py ckpt                     # /work/ckpt256, /work/ckpt512, /work/ckpt1024
    python benchmarks/cpu_bench.py e2e --model /work/ckpt256 --vllm /work/vllm-venv/bin/vllm --rounds 3 \\
        --variant "after:" --variant "before:env:AIOSCHED_CPU_LINEAR=torch env:AIOSCHED_CPU_ARGMAX=torch"

`attn` times the C attention kernel alone (decode or `--prefill`, `--hot` for cache-resident KV).
`step --prefill 128 --batch 4` times a prefill step instead of a decode step.

`step --splits whole,split` times the step unsplit against the runner's two-part split on two
threads (executors/torch/cpu_split.py).
`step --linears onednn,torch` times the oneDNN LM head against F.linear (AIOSCHED_CPU_LINEAR),
`--argmaxes two-pass,torch` the two-pass greedy argmax against torch.argmax (AIOSCHED_CPU_ARGMAX).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the torch worker sets it (executors/torch/__init__.py)

import torch  # noqa: E402

from aiosched.executors.torch.attention import cpu_kernel, torch_paged  # noqa: E402
from aiosched.executors.torch.attention.torch_paged import AttentionMetadata  # noqa: E402
from aiosched.executors.torch.sampler import greedy_argmax  # noqa: E402


def _model(config: str):  # type: ignore[no-untyped-def]
    from aiosched.executors.torch.loader import build_model

    d = tempfile.mkdtemp(prefix="cpu_bench_")
    with open(config) as f, open(os.path.join(d, "config.json"), "w") as g:
        g.write(f.read())
    model = build_model(d, "float32", "cpu", load_format="random")
    return model


def _decode_batch(model, batch: int, ctx: int, block: int):  # type: ignore[no-untyped-def]
    """KV caches filled with random values and the metadata of one decode step at lengths ~ctx."""
    a = model.args
    lens = [ctx - batch // 2 + i for i in range(batch)]  # ragged, mean ctx
    per = -(-max(lens) // block)
    nblocks = batch * per + 1
    perm = torch.randperm(nblocks - 1).tolist()  # scattered block tables, as after a while of serving
    tables = [perm[i * per:(i + 1) * per] for i in range(batch)]
    caches = [(torch.randn(nblocks, block, a.num_kv_heads, a.head_dim), torch.randn(nblocks, block, a.num_kv_heads, a.head_dim))
              for _ in range(a.num_layers)]
    slots = [tables[i][(n - 1) // block] * block + (n - 1) % block for i, n in enumerate(lens)]
    meta = AttentionMetadata(torch.tensor(slots), list(range(batch + 1)), lens, tables, block)
    ids = torch.randint(0, a.vocab_size, (batch,))
    pos = torch.tensor([n - 1 for n in lens])
    model.init_rope(max(lens) + 16)
    return caches, meta, ids, pos


def _prefill_batch(model, reqs: int, qlen: int, block: int):  # type: ignore[no-untyped-def]
    """The metadata of one prefill step: `reqs` fresh prompts of `qlen` tokens each (the
    engine's chunked prefill at max-num-batched-tokens 512 schedules 4 x 128)."""
    a = model.args
    per = -(-qlen // block)
    nblocks = reqs * per + 1
    perm = torch.randperm(nblocks - 1).tolist()
    tables = [perm[i * per:(i + 1) * per] for i in range(reqs)]
    caches = [(torch.zeros(nblocks, block, a.num_kv_heads, a.head_dim), torch.zeros(nblocks, block, a.num_kv_heads, a.head_dim))
              for _ in range(a.num_layers)]
    slots = [tables[i][p // block] * block + p % block for i in range(reqs) for p in range(qlen)]
    meta = AttentionMetadata(torch.tensor(slots), [i * qlen for i in range(reqs + 1)], [qlen] * reqs, tables, block)
    ids = torch.randint(0, a.vocab_size, (reqs * qlen,))
    pos = torch.arange(qlen).repeat(reqs)
    model.init_rope(qlen + 16)
    meta.extra["logit_rows"] = torch.tensor([(i + 1) * qlen - 1 for i in range(reqs)])
    return caches, meta, ids, pos


def _step(model, caches, meta, ids, pos) -> torch.Tensor:  # type: ignore[no-untyped-def]
    rows = meta.extra.get("logit_rows")
    meta.extra.clear()  # per step, as the runner builds a new AttentionMetadata
    h = model(ids, pos, meta, caches)
    if rows is not None:  # a prefill step: logits of each prompt's last token only
        meta.extra["logit_rows"] = rows
        h = h[rows]
    return greedy_argmax(model.compute_logits(h))  # as the runner takes greedy tokens on the CPU


def _split_step(pair, model, caches, meta, ids, pos) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`_step` as the runner's split (executors/torch/cpu_split.py): the requests in two
    parts, one on this thread, one on the helper, each its forward, LM head and argmax."""
    from aiosched.executors.torch import cpu_split
    from aiosched.executors.torch.input_batch import StepInputs

    pre = meta.extra.get("logit_rows")  # a prefill step's (see _step)
    meta.extra.clear()
    rows = pre if pre is not None else torch.arange(ids.shape[0])
    split = cpu_split.split_inputs(StepInputs(ids, pos, meta, rows, torch.zeros_like(rows)), pair.frac)
    if split is None:
        raise SystemExit("this step does not split")
    parts, work = split

    def part(p):  # type: ignore[no-untyped-def]
        return greedy_argmax(model.compute_logits(model(p.input_ids, p.positions, p.meta, caches)[p.logit_rows]))

    a, b = pair.run(lambda: part(parts[0]), lambda: part(parts[1]), work)
    if pre is not None:
        meta.extra["logit_rows"] = pre
    return torch.cat([a, b])


def cmd_step(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = _model(args.config)
    if args.prefill:
        caches, meta, ids, pos = _prefill_batch(model, args.batch, args.prefill, args.block_size)
    else:
        caches, meta, ids, pos = _decode_batch(model, args.batch, args.ctx, args.block_size)
    lib = cpu_kernel.load()
    paths = {"kernel": lambda q, k, v, m, s, *_: torch_paged._kernel_attention(lib, q, k, v, m, s),  # no window/cap: Llama
             "torch": torch_paged.torch_paged_attention}
    attns = [p for p in args.paths.split(",") if p != "kernel" or lib is not None]
    # variant = attention path / linear path (AIOSCHED_CPU_LINEAR, read per call by layers.linear)
    names = [f"{a}/{lin}/{am}/{sp}" for a in attns for lin in args.linears.split(",") for am in args.argmaxes.split(",")
             for sp in args.splits.split(",")]
    real = torch_paged.paged_attention
    import aiosched.executors.torch.models.llama as llama
    from aiosched.executors.torch import cpu_split

    pair = cpu_split.PairRunner(args.threads) if "split" in args.splits.split(",") else None
    step_fn = _step

    def use(n: str) -> None:
        nonlocal step_fn
        attn, lin, am, sp = n.split("/")
        torch_paged.paged_attention = llama.paged_attention = paths[attn]
        os.environ["AIOSCHED_CPU_LINEAR"], os.environ["AIOSCHED_CPU_ARGMAX"] = lin, am
        step_fn = _step if sp == "whole" else (lambda *a: _split_step(pair, *a))

    times: dict[str, list[float]] = {n: [] for n in names}
    # CPU time of this thread per step: with one thread, the step's own cost whatever else runs
    # on the shared machine (the wall time includes waiting for a core).
    cpu: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for n in names:
                use(n)
                results[n] = step_fn(model, caches, meta, ids, pos)  # warm-up
                for _ in range(args.iters):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    step_fn(model, caches, meta, ids, pos)
                    times[n].append(time.perf_counter() - t0)
                    cpu[n].append(time.thread_time() - c0)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for n in names:
                use(n)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        step_fn(model, caches, meta, ids, pos)
                what = f"prefill {args.batch} x {args.prefill}" if args.prefill else f"decode, batch {args.batch}, ctx ~{args.ctx}"
                print(f"\n== profile: variant {n!r}, 3 steps, {what}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    llama.paged_attention = torch_paged.paged_attention = real
    os.environ.pop("AIOSCHED_CPU_LINEAR", None)
    os.environ.pop("AIOSCHED_CPU_ARGMAX", None)
    if len(results) > 1:
        first = next(iter(results.values()))
        print("same greedy tokens across paths:", all(torch.equal(first, r) for r in results.values()))
    report = {"config": args.config, "batch": args.batch, "ctx": args.ctx, "prefill": args.prefill, "threads": args.threads,
              "paths": {}}
    for n, ts in times.items():
        ms = sorted(t * 1e3 for t in ts)
        cms = sorted(t * 1e3 for t in cpu[n])
        report["paths"][n] = {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms),
                              "cpu_median_ms": statistics.median(cms), "cpu_min_ms": cms[0]}
        print(f"{n:24s} {'prefill' if args.prefill else 'decode'} step: median {statistics.median(ms):7.1f} ms  min {ms[0]:7.1f}  "
              f"max {ms[-1]:7.1f}  (n={len(ms)}); thread CPU median {statistics.median(cms):7.1f} ms  min {cms[0]:7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def _interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median µs per call of each function, calls interleaved (best of 2 per round)."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                f()
                best = min(best, time.perf_counter() - t0)
            ts[k].append(best)
    return {k: statistics.median(v) * 1e6 for k, v in ts.items()}


def cmd_ops(args: argparse.Namespace) -> None:
    """Each projection of a config (and its LM head) through F.linear vs oneDNN over the
    prepacked weight, and the greedy argmax over [rows, vocab]: the evidence behind
    layers.onednn_pays and sampler.greedy_argmax's thresholds."""
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    with open(args.config) as f:
        c = json.load(f)
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim", h // c["num_attention_heads"])
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * hd
    shapes = {"qkv": (h, qkv), "o": (c["num_attention_heads"] * hd, h), "gate_up": (h, 2 * i), "down": (i, h), "lm_head": (h, v)}
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            for name, (k, n) in shapes.items():
                x, w = torch.randn(rows, k), torch.randn(n, k)
                wp = torch.ops.mkldnn._reorder_linear_weight(w)
                t = _interleaved({"F": lambda: F.linear(x, w),
                                  "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")},
                                 args.rounds)
                print(f"rows {rows:4d} {name:8s} [{k}->{n}]  F.linear {t['F']:9.1f} us  oneDNN {t['onednn']:9.1f} us  "
                      f"F/oneDNN {t['F'] / t['onednn']:.2f}", flush=True)
            x = torch.randn(rows, v)
            t = _interleaved({"torch": lambda: x.argmax(-1), "two-pass": lambda: greedy_argmax(x)}, args.rounds)
            print(f"rows {rows:4d} argmax [{rows}, {v}]  torch.argmax {t['torch']:9.1f} us  two-pass {t['two-pass']:9.1f} us  "
                  f"ratio {t['torch'] / t['two-pass']:.2f}", flush=True)


def cmd_attn(args: argparse.Namespace) -> None:
    """The C attention kernel alone over --layers layers' caches: a decode batch (--batch
    requests at context ~--ctx, block tables scattered) or a prefill step (--prefill QLEN:
    --batch fresh prompts). --hot: every request reads the same blocks (the cache in L2/L3:
    the kernel's compute without the memory traffic). Wall and thread CPU ms per call of
    all layers, min and median over --iters."""
    torch.set_num_threads(args.threads)
    lib = cpu_kernel.load()
    if lib is None:
        raise SystemExit("the CPU kernel did not build")
    B, bs, H, D = args.batch, args.block_size, args.heads, args.head_dim
    if args.prefill:
        lens, qsl = [args.prefill] * B, [i * args.prefill for i in range(B + 1)]
    else:
        lens, qsl = [args.ctx - B // 2 + i for i in range(B)], list(range(B + 1))
    per = -(-max(lens) // bs)
    nb = B * per + 1
    perm = torch.randperm(nb - 1).tolist()
    tables = [list(range(per)) if args.hot else perm[i * per:(i + 1) * per] for i in range(B)]
    caches = [(torch.randn(nb, bs, H, D), torch.randn(nb, bs, H, D)) for _ in range(args.layers)]
    meta = AttentionMetadata(torch.zeros(qsl[-1], dtype=torch.long), qsl, lens, tables, bs)
    q = torch.randn(qsl[-1], H, D)

    def run() -> None:
        for k, v in caches:
            torch_paged._kernel_attention(lib, q, k, v, meta, D ** -0.5)

    run()
    wall, cpu = [], []
    for _ in range(args.iters):
        t0, c0 = time.perf_counter(), time.thread_time()
        run()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    err = (torch_paged.torch_paged_attention(q, *caches[0], meta, D ** -0.5) - torch_paged._kernel_attention(
        lib, q, *caches[0], meta, D ** -0.5)).abs().max().item()
    what = f"prefill {B} x {args.prefill}" if args.prefill else f"decode batch {B}, ctx ~{args.ctx}"
    print(f"attention, {args.layers} layers, {what}, {H} heads x {D}{', hot' if args.hot else ''}, {args.threads} thread(s): "
          f"wall min {min(wall):.1f} median {statistics.median(wall):.1f} ms; thread CPU min {min(cpu):.1f} "
          f"median {statistics.median(cpu):.1f} ms; max |kernel - torch| {err:.2e}")


CKPTS = {"256": "llama-256x4.json", "512": "llama-512x8.json", "1024": "llama-1024x12.json"}


def cmd_ckpt(args: argparse.Namespace) -> None:
    """float32 random Llama checkpoints saved by transformers itself (HF layout, safetensors)
    with the embedded model's tokenizer: the same directory serves aiosched, vLLM and HF."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    here = os.path.dirname(os.path.abspath(__file__))
    tok = os.path.join(os.path.dirname(here), "aiosched", "default_model")
    for size in args.sizes.split(","):
        out = f"{args.prefix}{size}"
        if os.path.exists(os.path.join(out, "model.safetensors")) and not args.force:
            print(f"{out}: exists")
            continue
        with open(os.path.join(here, "configs", CKPTS[size])) as f:
            cfg = LlamaConfig(**json.load(f))
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(cfg).to(torch.float32)
        model.save_pretrained(out, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tok, name), out)
        print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


def _vllm(args: argparse.Namespace, mode: str, r: int, rows: dict[str, list[float]]) -> None:
    """One `vllm bench throughput` run of the same workload on the same checkpoint (its
    start-up, 100-200 s here, is outside the timed part); req/s into rows['vllm/<mode>']."""
    path = os.path.abspath(os.path.join(args.out, f"vllm_{mode}_r{r}.json"))  # vLLM runs in the temp dir
    cmd = [args.vllm, "bench", "throughput", "--model", args.model, "--dataset-name", "random", "--random-input-len", "128",
           "--random-output-len", "64", "--num-prompts", str(args.num_prompts), "--max-num-batched-tokens", "512",
           "--dtype", "float32", "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.25",
           "--async-scheduling" if mode == "async" else "--no-async-scheduling", "--output-json", path]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    with open(os.path.join(args.out, f"vllm_{mode}_r{r}.txt"), "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    with open(path) as f:
        rps = json.load(f)["requests_per_second"]
    rows.setdefault(f"vllm/{mode}", []).append(rps)
    print(f"  round {r} vllm/{mode}: {rps:.3f} req/s  (load {os.getloadavg()[0]:.2f})", flush=True)


def cmd_e2e(args: argparse.Namespace) -> None:
    weights = ["--model", args.model, "--dtype", "float32"] if args.model else ["--random-weights", args.config]
    base = [sys.executable, "-m", "aiosched.bench", *weights, "--device", "cpu", "--input-len", "128",
            "--output-len", "64", "--num-prompts", str(args.num_prompts), "--ignore-eos", "--no-enable-prefix-caching",
            "--max-num-batched-tokens", "512", "--disable-tqdm", "--compare", args.modes]
    variants = [v.split(":", 1) if ":" in v else (v, "") for v in args.variant] or [("default", "")]
    rows: dict[str, list[float]] = {}
    os.makedirs(args.out, exist_ok=True)
    if args.vllm and not args.model:
        raise SystemExit("--vllm needs --model (the same checkpoint directory for both engines)")
    for r in range(args.rounds):
        if args.vllm and "sync" in args.modes.split(","):
            _vllm(args, "sync", r, rows)  # the issue's order: vLLM sync, ours, vLLM async
        for name, extra in variants:
            path = os.path.join(args.out, f"{name}_r{r}.json")
            words = shlex.split(extra)
            cmd = base + [w for w in words if not w.startswith("env:")] + ["--json", path]
            env = dict(os.environ)
            for kv in args.env + [w[4:] for w in words if w.startswith("env:")]:  # env:K=V words: this variant only
                k, v = kv.split("=", 1)
                env[k] = v
            print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL if not args.verbose else None)
            with open(path) as f:
                rep = json.load(f)
            for mode, run in rep["runs"].items():
                rows.setdefault(f"{name}/{mode}", []).append(run["request_throughput"])
                print(f"  round {r} {name}/{mode}: {run['request_throughput']:.3f} req/s  (load {os.getloadavg()[0]:.2f})",
                      flush=True)
        if args.vllm and "async" in args.modes.split(","):
            _vllm(args, "async", r, rows)
    print("\nvariant/mode: median req/s [min-max] over rounds")
    for k, xs in rows.items():
        ref = rows.get(f"vllm/{k.rsplit('/', 1)[-1]}")
        vs = f"  {statistics.median(xs) / statistics.median(ref):.2f}x vLLM" if ref and not k.startswith("vllm/") else ""
        print(f"{k:30s} {statistics.median(xs):6.3f} [{min(xs):.3f}-{max(xs):.3f}]  n={len(xs)}{vs}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step", help="decode-step microbenchmark per attention path")
    s.add_argument("--config", default="benchmarks/configs/llama-512x8.json")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--ctx", type=int, default=160, help="mean context length (128 prompt + half of 64 out)")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--prefill", type=int, default=0, metavar="QLEN",
                   help="time a prefill step instead: --batch fresh prompts of QLEN tokens (e.g. --batch 4 --prefill 128)")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--paths", default="kernel,torch", help="attention paths")
    s.add_argument("--linears", default="onednn,torch", help="linear paths (AIOSCHED_CPU_LINEAR values)")
    s.add_argument("--argmaxes", default="two-pass,torch", help="greedy argmax paths (AIOSCHED_CPU_ARGMAX values)")
    s.add_argument("--splits", default="whole", help="whole,split: the step unsplit and/or as the runner's two-part split "
                   "(executors/torch/cpu_split.py; the thread CPU time then counts the launch thread only)")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--iters", type=int, default=5)
    s.add_argument("--profile", action="store_true")
    s.add_argument("--profile-rows", type=int, default=15)
    s.add_argument("--json", default=None)
    e = sub.add_parser("e2e", help="engine workload, fresh process per variant, interleaved rounds")
    e.add_argument("--config", default="benchmarks/configs/llama-512x8.json")
    e.add_argument("--num-prompts", type=int, default=64)
    e.add_argument("--modes", default="sync,async")
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--variant", action="append", default=[], metavar="NAME:ARGS",
                   help="extra aiosched.bench args of one variant, e.g. 't2:--cpu-threads 2'; words env:K=V set its "
                        "environment, e.g. 't2p:--cpu-threads 2 env:OMP_WAIT_POLICY=PASSIVE' (repeatable)")
    e.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for every variant")
    e.add_argument("--model", default=None, help="a checkpoint dir (see `ckpt`) instead of --config's random weights")
    e.add_argument("--vllm", default=None, metavar="VLLM_BIN",
                   help="also run `VLLM_BIN bench throughput` (vLLM-CPU, its own venv) sync and async in every round")
    e.add_argument("--out", default="cpu_bench_out")
    e.add_argument("--verbose", action="store_true")
    o = sub.add_parser("ops", help="F.linear vs oneDNN per projection shape, torch vs two-pass argmax")
    o.add_argument("--config", default="benchmarks/configs/llama-256x4.json")
    o.add_argument("--rows", default="1,64,512")
    o.add_argument("--rounds", type=int, default=10)
    o.add_argument("--threads", type=int, default=1)
    a = sub.add_parser("attn", help="the C attention kernel alone (decode or prefill), wall and CPU ms")
    a.add_argument("--batch", type=int, default=64)
    a.add_argument("--ctx", type=int, default=160)
    a.add_argument("--prefill", type=int, default=0, metavar="QLEN")
    a.add_argument("--heads", type=int, default=8, help="query = KV heads")
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--layers", type=int, default=8)
    a.add_argument("--block-size", type=int, default=16)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--iters", type=int, default=10)
    a.add_argument("--hot", action="store_true", help="all requests read the same blocks (cache-resident)")
    c = sub.add_parser("ckpt", help="build the float32 random Llama checkpoints (transformers), /work/ckpt256 etc.")
    c.add_argument("--sizes", default="256,512,1024")
    c.add_argument("--prefix", default="/work/ckpt")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--force", action="store_true")
    args = p.parse_args()
    {"step": cmd_step, "e2e": cmd_e2e, "ckpt": cmd_ckpt, "ops": cmd_ops, "attn": cmd_attn}[args.cmd](args)


if __name__ == "__main__":
    main()
