"""Decode-step microbenchmark: one decode step of the torch runner's own model (all
layers + LM head + greedy argmax written into the token buffer) over its paged KV
cache, random bf16 weights of a named shape on the device.

The step is `TorchModelRunner.model_step` over the inputs `InputBatch` derives on the
device, i.e. exactly what the runner replays in its decode CUDA graphs. Variants:
- `best`: the runner's choice (fused kernels; skinny Triton GEMMs for 1-2 rows);
- `fused`: fused kernels, every projection on cuBLAS (no skinny GEMMs);
- `skinny`: fused kernels, skinny GEMMs (o, gate_up, down, LM head) up to 16 rows;
- `torch`: the model's unfused forward (plain torch ops, torch paged attention); eager
  only (its attention reads host block tables, which a graph cannot replay).
Each timed eagerly and (fused variants) inside one CUDA graph per batch size, with CUDA
events (median of --iters replays after warm-up). Also measures the two ceilings
(device-to-device copy bandwidth, bf16 matmul rate) and prints the floor: weights +
KV bytes / bandwidth.

--tune first sweeps the skinny GEMM per projection (qkv with its norm prologue, o and
down with the residual epilogue, gate_up with norm + SiLU, the LM head): split-1 tiles
and split-K configs at 1 row, a shortlist at 3 rows, each against cuBLAS; the step is
then timed with each projection's best one-row config (--skinny-from applies the choice
of an earlier run's --json instead).

--no-pdl / --pdl turn Programmatic Dependent Launch of the decode-path Triton kernels off / on
(`fused_ops.set_pdl`; on is the default, AIOSCHED_PDL=0 is off) before the model and its
graphs are built; run once with each to compare (benchmarks/run_gpu.sh stage `pdl`).

    python benchmarks/decode_step.py --shape llama-3.2-1b --batch-sizes 1,3,256 --ctx 300 --json decode.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aiosched.config import EngineConfig  # noqa: E402
from aiosched.protocol import NewRequestData, ScheduledRequest, SchedulerOutput  # noqa: E402
from aiosched.sampling_params import SamplingParams  # noqa: E402
from aiosched.executors.torch import fused_ops  # noqa: E402
from aiosched.executors.torch.cuda_graphs import DecodeGraphs  # noqa: E402
from aiosched.executors.torch.random_checkpoint import shape_config  # noqa: E402
from aiosched.executors.torch.runner import TorchModelRunner  # noqa: E402

VARIANTS = {"best": fused_ops.SKINNY_PREFERRED_MAX_M, "fused": 0, "skinny": fused_ops.SKINNY_MAX_M, "torch": None}


def load_shape(shape: str) -> dict:
    if os.path.isfile(shape):
        with open(shape) as f:
            return json.load(f)
    return shape_config(shape)


@contextlib.contextmanager
def skinny_max_rows(n: int):
    """Rows up to which the model's projections take the skinny GEMM (layers.skinny_rows)."""
    old = fused_ops.SKINNY_PREFERRED_MAX_M
    fused_ops.SKINNY_PREFERRED_MAX_M = n
    try:
        yield
    finally:
        fused_ops.SKINNY_PREFERRED_MAX_M = old


class Bench:
    """The runner (random weights, no graphs of its own), max_bs requests with ctx tokens
    each in the token buffer and their blocks on the device, one decode step per size."""

    def __init__(self, cfg: dict, max_bs: int, ctx: int, page: int, device: str = "cuda", dtype: str = "bfloat16") -> None:
        cfg = {"architectures": ["LlamaForCausalLM"], **cfg, "max_position_embeddings": max(cfg.get("max_position_embeddings", 0), ctx + 64)}
        self.dir = tempfile.mkdtemp()
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(cfg, f)
        max_len = ctx + 64
        blocks_per = math.ceil(max_len / page)
        self.runner = r = TorchModelRunner(EngineConfig(
            model=self.dir, load_format="random", dtype=dtype, device=device, max_num_seqs=max_bs, max_model_len=max_len,
            block_size=page, num_kv_blocks=max_bs * blocks_per + 1, max_num_batched_tokens=max(2048, max_bs),
            cuda_graph_max_batch=max_bs, enforce_eager=True))
        r.load()
        if r.fast is None:  # a CPU smoke run under TRITON_INTERPRET=1 (eager only)
            from aiosched.executors.torch.cuda_path import FastPath

            r.fast = FastPath(r, use_graphs=False)
        g = torch.Generator(device=device).manual_seed(0)
        for kc, vc in r.kv_caches:  # attention reads real-looking values; the content does not matter for time
            kc.normal_(generator=g)
            vc.normal_(generator=g)
        V = r.model.args.vocab_size
        greedy = SamplingParams(temperature=0.0)
        perm = torch.randperm(r.num_blocks - 1, generator=torch.Generator().manual_seed(0)).tolist()
        news, sched = [], []
        nb = math.ceil((ctx + 1) / page)
        for i in range(max_bs):
            ids = torch.randint(0, V, (ctx + 1,), generator=torch.Generator().manual_seed(i)).tolist()
            news.append(NewRequestData(f"r{i}", ids, ctx + 1, greedy, 0))
            sched.append(ScheduledRequest(f"r{i}", 1, ctx, perm[i * nb:(i + 1) * nb], True))
        for new in news:
            r.batch.add(new)
        self.all_step = r.batch.schedule(SchedulerOutput(0, [], sched, [], max_bs), {})  # applies every block table
        r.batch.upload(self.all_step, r.batch.exact_layout(self.all_step, 1, tiles=False))
        self.sched = [ScheduledRequest(sr.req_id, 1, ctx, [], True) for sr in sched]
        self.ctx, self.page = ctx, page
        a = r.model.args
        self.param_bytes = sum(p.numel() * p.element_size() for p in r.model.parameters())
        self.kv_tok = a.num_layers * 2 * a.num_kv_heads * a.head_dim * 2

    def step_of(self, bs: int):
        return self.runner.batch.schedule(SchedulerOutput(0, [], self.sched[:bs], [], bs), {})

    def eager(self, bs: int, fused: bool):
        """A function running one eager decode step of bs rows: (hidden, logits, tokens)."""
        r = self.runner
        step = self.step_of(bs)
        L = r.batch.exact_layout(step, r.fast.block_q(step) if fused else 1, tiles=fused)
        dev = r.batch.upload(step, L)
        ws = r.fast.decode_workspace if fused else None
        return lambda: r.model_step(r.batch.device_inputs(dev, L, fused, ws, host=step), argmax=True)

    def graphs(self, bss: list[int]) -> tuple[DecodeGraphs, float]:
        """The runner's decode step captured per size (padded decode layout, as in the runner)."""
        r = self.runner
        fast = r.fast

        def prepare(n: int) -> None:
            r.batch.upload(self.step_of(n), r.batch.padded_layout(n, True, 1))

        graphs = DecodeGraphs(lambda n: fast._padded_step(r.batch.padded_layout(n, True, 1)), max(bss), "cuda", sizes=bss,
                              prepare=prepare)
        with torch.inference_mode():
            cap = graphs.capture()
        return graphs, cap

    def kv_snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for kv in self.runner.kv_caches for t in kv]

    def kv_restore(self, snap: list[torch.Tensor]) -> None:
        for dst, src in zip((t for kv in self.runner.kv_caches for t in kv), snap):
            dst.copy_(src)


def check_logits(bench: Bench, variants: list[str], rows: int, result: dict, suffix: str = "") -> None:
    """Each variant's logits vs the unfused forward on the same cache (`rows` rows)."""
    with torch.inference_mode():
        snap = bench.kv_snapshot()
        ref = bench.eager(rows, fused=False)()[1].float()
        for v in variants:
            bench.kv_restore(snap)
            with skinny_max_rows(VARIANTS[v] or 0):
                lg = bench.eager(rows, fused=VARIANTS[v] is not None)()[1].float()
            err = ((lg - ref).norm() / ref.norm()).item()
            result[f"{v}_vs_torch_logits_rel_err{suffix}"] = err
            print(f"{v} vs torch{suffix}: logits rel err {err:.2e}", flush=True)
        bench.kv_restore(snap)


def time_fn(fn, iters: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return {"median_ms": statistics.median(ts), "p10_ms": ts[len(ts) // 10], "p90_ms": ts[(9 * len(ts)) // 10], "iters": iters}


def graph_time(fn, reps: int = 20) -> float:
    """ms per call of `fn` captured in a CUDA graph (launch gaps as in the real step)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_fn(g.replay, reps, 3)["median_ms"]


# Split-1 tiles (BLOCK_N, BLOCK_K, num_warps, num_stages): the sweep as before split-K.
TILE_CANDS = [(16, 128, 4, 4), (16, 256, 4, 3), (16, 256, 4, 5), (16, 512, 4, 3), (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 4, 3),
              (32, 256, 8, 4), (64, 128, 4, 3), (64, 128, 8, 4), (64, 256, 8, 3), (16, 1024, 8, 2),
              (16, 128, 2, 6), (16, 256, 2, 4), (32, 128, 4, 6), (32, 512, 8, 2), (16, 512, 8, 4), (64, 64, 4, 6)]
SPLITS = (2, 4, 8, 16)
SHORTLIST = 6  # configs re-timed at 3 rows: the best few at one row (and the shape's default)


def _split_tile_launch(bn: int, bk: int) -> tuple[int, int]:
    """(num_warps, num_stages) for a split-K tile: each split loops over few K blocks, so
    deep pipelines buy little; wider tiles get 8 warps."""
    return (4 if bn * bk <= 8192 else 8), {128: 4, 256: 3, 512: 2}[bk]


def split_k_candidates(n_out: int, K: int, sms: int) -> list[tuple[int, int, int, int, int]]:
    """Split-K configs worth timing for an [n_out, K] projection: BLOCK_N 16/32/64 x BLOCK_K
    128/256/512 x splits 2/4/8/16, kept only where the split adds parallelism the column tiles
    lack (fewer than 4 waves of tiles), gives more than one program per SM and at most 8,
    and leaves every split at least one K block (a clamped split would repeat a config)."""
    out = []
    for bn in (16, 32, 64):
        tiles = -(-n_out // bn)
        if tiles >= 4 * sms:
            continue
        for bk in (128, 256, 512):
            if bn * bk > 16384:  # 64 x 512: 64 KiB of W per stage (128 with gate_up's up): one program per SM at best
                continue
            for s in SPLITS:
                if s <= -(-K // bk) and sms < tiles * s <= 8 * sms:
                    out.append((bn, bk, *_split_tile_launch(bn, bk), s))
    return out


def skinny_candidates(n_out: int, K: int, sms: int, split_k: bool = True) -> list[tuple[int, int, int, int, int]]:
    """The split-1 tiles, then (unless the projection is wide enough already) split-K configs."""
    return [(*c, 1) for c in TILE_CANDS] + (split_k_candidates(n_out, K, sms) if split_k else [])


def time_skinny(ws: list[torch.Tensor], x: torch.Tensor, o: torch.Tensor, epi: str, lnw: torch.Tensor | None,
                cfg: tuple[int, int, int, int, int]) -> tuple[float, float] | str:
    """(ms per launch of `cfg`, a graph of one launch per weight; its relative error), or why it failed to run."""
    n_out, K = o.shape[1], ws[0].shape[1]
    fused_ops.set_skinny_config(n_out, K, _EPI[epi], cfg)
    try:
        err = check_skinny(ws[0], x, epi, lnw)
        t = graph_time(lambda: [fused_ops.skinny_linear(x, w, out=o, norm_weight=lnw, eps=1e-5, epilogue=epi) for w in ws])
    except Exception as ex:  # does not fit (shared memory) or does not compile: skip
        return repr(ex)[:60]
    return t / len(ws), err


def check_skinny(w: torch.Tensor, x: torch.Tensor, epi: str, lnw: torch.Tensor | None, calls: int = 3) -> float:
    """Relative error of the skinny GEMM (the shape's current config) against float32 torch:
    the worst of `calls` back-to-back launches, which must also agree bit for bit (split-K:
    the counters reset between launches and the partials are summed in a fixed order);
    on the device, where the interpreter's tests cannot race the splits."""
    h = fused_ops.rms_norm_ref(x, lnw, 1e-5).float() if lnw is not None else x.float()
    y = F.linear(h, w.float())
    n = y.shape[1] // 2 if epi == "silu_mul" else y.shape[1]
    base = torch.randn(x.shape[0], n, device=x.device).to(x.dtype)
    ref = fused_ops.silu_and_mul_ref(y) if epi == "silu_mul" else (base.float() + y if epi == "residual" else y)
    outs = []
    for _ in range(calls):
        outs.append(base.clone() if epi == "residual" else torch.full_like(base, float("nan")))
        fused_ops.skinny_linear(x, w, out=outs[-1], norm_weight=lnw, eps=1e-5, epilogue=epi)
    if any(not torch.equal(outs[0], o) for o in outs[1:]):
        return float("inf")
    return ((outs[0].float() - ref).norm() / ref.norm()).item()


def time_cublas(ws: list[torch.Tensor], x: torch.Tensor, o: torch.Tensor, epi: str, lnw: torch.Tensor | None) -> tuple[float, float]:
    """ms per layer: cuBLAS with the separate norm / activation / add kernels, and the GEMM alone."""
    def with_extras() -> None:
        for w in ws:
            h = fused_ops.rms_norm(x, lnw, 1e-5) if lnw is not None else x
            y = F.linear(h, w)
            if epi == "silu_mul":
                fused_ops.silu_and_mul(y, out=o)
            elif epi == "residual":
                o.add_(y)

    return graph_time(with_extras) / len(ws), graph_time(lambda: [F.linear(x, w) for w in ws]) / len(ws)


_EPI = fused_ops.SKINNY_EPILOGUES


def tune_skinny(bench: Bench, rows: tuple[int, ...] = (1, 3), sms: int | None = None) -> dict:
    """Per projection of the model and row count: time each skinny-GEMM config (split-1 tiles
    and split-K) and cuBLAS, each as a graph of one launch per layer (distinct weights: no
    L2 reuse); keep the best one-row config (`fused_ops.set_skinny_config`, which the
    model's skinny GEMMs then use; the table is per shape, not per row count) and report
    whether skinny beats cuBLAS. Rows after the first re-time only a shortlist (each
    config compiles once per row specialisation: compiling dominates the sweep's time)."""
    m = bench.runner.model
    a = m.args
    layers = list(m.layers)
    H, I = a.hidden_size, a.intermediate_size
    lnw = layers[0].input_layernorm.weight
    dev, dt = lnw.device, lnw.dtype
    if sms is None:  # the split-K candidates depend on it (programs per SM)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    lm = m.embed_tokens.weight if m.lm_head is None else m.lm_head.weight
    cases = {  # name: (weights per launch, in features, out features, epilogue, norm, split-K, row counts)
        "qkv": ([l.self_attn.qkv_proj.weight for l in layers], H, layers[0].self_attn.qkv_proj.weight.shape[0], "store", True, True, rows),
        "o": ([l.self_attn.o_proj.weight for l in layers], a.num_heads * a.head_dim, H, "residual", False, True, rows),
        "gate_up": ([l.mlp.gate_up_proj.weight for l in layers], H, I, "silu_mul", True, True, rows),
        "down": ([l.mlp.down_proj.weight for l in layers], I, H, "residual", False, True, rows),
        "lm_head": ([lm] * 4, H, a.vocab_size, "store", True, False, rows[:1]),  # 2000+ column tiles: no split
    }
    out: dict = {}
    t0, timed = time.perf_counter(), 0
    for name, (ws, k_in, n_out, epi, norm, split_k, rcounts) in cases.items():
        K = ws[0].shape[1]
        e = _EPI[epi]
        wbytes = ws[0].numel() * ws[0].element_size()
        default = fused_ops.skinny_config(n_out, K, e)
        cands = skinny_candidates(n_out, K, sms, split_k)
        cands += [default] if default not in cands else []
        chosen = default
        for r in rcounts:
            x = torch.randn(r, k_in, device=dev, dtype=dt)
            o = torch.zeros(r, n_out, device=dev, dtype=dt)
            res: dict[str, float | str] = {}
            errs: dict[str, float] = {}
            ok: list[tuple[float, tuple[int, int, int, int, int]]] = []
            for c in cands:
                got = time_skinny(ws, x, o, epi, lnw if norm else None, c)
                if isinstance(got, str):
                    res[str(c)] = got
                    continue
                t, err = got
                res[str(c)], errs[str(c)] = t, err
                bad = err > 3e-2  # bf16 rounding of the normed x / gate / up stays well below; a split race does not
                if not bad:  # a wrong config never wins
                    ok.append((t, c))
                print(f"  {name:8s} m={r} {str(c):26s} {t * 1e3:7.1f} us {wbytes / (t * 1e-3) / 1e12:5.2f} TB/s  "
                      f"rel err {err:.1e}{'  WRONG' if bad else ''}", flush=True)
            timed += len(cands)
            assert ok, f"{name}: no skinny config ran"
            ok.sort()
            t_best, best = ok[0]
            if r == rcounts[0]:  # the model's row count; later ones re-time this one's shortlist and the default
                chosen = best
                cands = [c for _, c in ok[:SHORTLIST]]
                cands += [default] if default not in cands else []
            fused_ops.set_skinny_config(n_out, K, e, chosen)
            tc, tg = time_cublas(ws, x, o, epi, lnw if norm else None)
            t_def = res.get(str(default))
            out.setdefault(name, {})[f"m{r}"] = rec = {
                "best": list(best), "skinny_us": t_best * 1e3, "skinny_TBps": wbytes / (t_best * 1e-3) / 1e12,
                "default": list(default), "default_us": t_def * 1e3 if isinstance(t_def, float) else None,
                "cublas_with_extras_us": tc * 1e3, "cublas_gemm_only_us": tg * 1e3, "cublas_TBps": wbytes / (tg * 1e-3) / 1e12,
                "skinny_wins": t_best < tc, "configs_timed": len(res), "all_ms": res, "rel_err": errs,
                "max_rel_err": max(errs.values(), default=None)}
            print(f"{name:8s} m={r} N={n_out:6d} K={K:5d}: skinny {best} {t_best * 1e3:6.1f} us ({rec['skinny_TBps']:.2f} TB/s; "
                  f"split-1 default {rec['default_us'] or float('nan'):.1f} us) | cuBLAS {tg * 1e3:6.1f} us ({rec['cublas_TBps']:.2f} TB/s), "
                  f"with norm/act/add {tc * 1e3:6.1f} us -> {'skinny' if rec['skinny_wins'] else 'cuBLAS'}", flush=True)
        out[name]["chosen"] = list(chosen)
        out[name]["key"] = [n_out, K, e]  # fused_ops.set_skinny_config(*key, chosen); --skinny-from applies it
    out["sweep"] = {"configs_timed": timed, "seconds": time.perf_counter() - t0, "sms": sms}
    print(f"skinny sweep: {timed} configs timed in {out['sweep']['seconds']:.0f} s", flush=True)
    return out


def apply_skinny_tune(path: str) -> dict:
    """Set each projection's chosen config from an earlier run's JSON (its "skinny_tune")."""
    with open(path) as f:
        tune = json.load(f)["skinny_tune"]
    applied = {}
    for name, rec in tune.items():
        if "chosen" in rec:
            fused_ops.set_skinny_config(*rec["key"], tuple(rec["chosen"]))
            applied[name] = rec["chosen"]
            print(f"skinny {name}: {tuple(rec['chosen'])} (from {path})", flush=True)
    return applied


def kernel_profile(fn, reps: int = 10) -> dict:
    """Per-kernel device time of `fn` (median over reps via the profiler's trace), and idle gaps."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from aiosched.bench import trace_idle_analysis

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    path = tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    by: dict = {}
    for e in ev:
        n = e["name"]
        n = n[:60]
        d = by.setdefault(n, [0, 0.0])
        d[0] += 1
        d[1] += e["dur"]
    top = sorted(by.items(), key=lambda kv: -kv[1][1])
    summary = {n: {"calls_per_step": c / reps, "us_per_step": t / reps} for n, (c, t) in top[:25]}
    idle = trace_idle_analysis(path)
    busy_per = idle.get("busy_us", 0) / reps
    print(f"  kernels per step {len(ev) / reps:.0f}, busy {busy_per:.0f} us/step, idle share {idle.get('idle_share') or 0:.1%}", flush=True)
    for n, v in list(summary.items())[:12]:
        print(f"    {v['us_per_step']:8.1f} us  x{v['calls_per_step']:4.0f}  {n}", flush=True)
    os.unlink(path)
    return {"kernels": summary, "kernels_per_step": len(ev) / reps, "busy_us_per_step": busy_per, "idle": idle}


def ceilings(device: str) -> dict:
    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), 20, 3)
    bw = 2 * n / (t["median_ms"] * 1e-3) / 1e12
    del a, b
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t2 = time_fn(lambda: m @ m, 20, 3)
    tf = 2 * 8192 ** 3 / (t2["median_ms"] * 1e-3) / 1e12
    del m
    torch.cuda.empty_cache()
    return {"copy_TBps": bw, "bf16_matmul_TFLOPs": tf}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--batch-sizes", default="1,3,256")
    p.add_argument("--ctx", type=int, default=300, help="tokens already in each request's cache")
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--variants", default="best,skinny,fused,torch")
    p.add_argument("--tune", action="store_true",
                   help="sweep skinny-GEMM configs (tiles, split-K) per projection at 1 and 3 rows first; the step then uses the best")
    p.add_argument("--skinny-from", default=None, metavar="JSON",
                   help="apply the chosen skinny configs of an earlier --tune run's --json output instead of sweeping")
    p.add_argument("--kernel-profile", action="store_true", help="per-kernel time of one graph replay (torch profiler)")
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--pdl", action="store_true",
                   help="launch the decode-path Triton kernels with Programmatic Dependent Launch (Hopper+; fused_ops.set_pdl; the default)")
    p.add_argument("--no-pdl", action="store_true", help="launch them without PDL (AIOSCHED_PDL=0)")
    p.add_argument("--skinny-qkv", action="store_true",
                   help="qkv of 1-2 rows as a skinny GEMM with the input norm as prologue (layers.set_skinny_qkv, AIOSCHED_SKINNY_QKV=1)")
    p.add_argument("--attn-all-heads", default=None, metavar="MIN_BATCH|off",
                   help="decode attention with every kv head of a request in one program from this batch size on, or never "
                        "(triton_paged.set_all_heads_min_batch, as AIOSCHED_ATTN_ALL_HEADS; default: the module's)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = "cuda"
    if args.pdl or args.no_pdl:  # before anything is compiled or captured: graphs keep the launches they captured
        fused_ops.set_pdl(not args.no_pdl)
    if args.skinny_qkv:
        from aiosched.executors.torch import layers

        layers.set_skinny_qkv(True)
    if args.attn_all_heads is not None:
        from aiosched.executors.torch.attention import triton_paged

        triton_paged.set_all_heads_min_batch(triton_paged._all_heads_from_env(args.attn_all_heads))
    cfg = load_shape(args.shape)
    bss = [int(x) for x in args.batch_sizes.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    result: dict = {"shape": args.shape, "ctx": args.ctx, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["pdl"] = bool(fused_ops.pdl_kwargs(torch.device(dev)))  # on and effective (an sm_90+ device)
    print(f"PDL launches: {'on' if result['pdl'] else 'off'}", flush=True)
    result["ceilings"] = ceil = ceilings(dev)
    print(f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    bench = Bench(cfg, max(bss), args.ctx, args.page)
    result["param_bytes"] = bench.param_bytes
    check_logits(bench, variants, min(3, max(bss)), result)
    if args.tune or args.skinny_from:
        if args.tune:
            result["skinny_tune"] = tune_skinny(bench)
        else:
            result["skinny_from"] = apply_skinny_tune(args.skinny_from)
        check_logits(bench, variants, min(3, max(bss)), result, "_tuned")  # the step with the chosen (split-K) configs
    rows = []
    for variant in variants:
        fused = VARIANTS[variant] is not None
        with skinny_max_rows(VARIANTS[variant] or 0), torch.inference_mode():
            graphs, cap = bench.graphs(bss) if fused else (None, 0.0)
            for bs in bss:
                floor_bytes = bench.param_bytes + bs * (args.ctx + 1) * bench.kv_tok
                floor_ms = floor_bytes / (ceil["copy_TBps"] * 1e12) * 1e3
                rec = {"variant": variant, "batch": bs, "floor_ms": floor_ms, "floor_bytes": floor_bytes, "capture_s": cap}
                if graphs is not None:
                    bench.runner.batch.upload(bench.step_of(bs), bench.runner.batch.padded_layout(bs, True, 1))
                    rec["graph"] = time_fn(lambda: graphs.replay(bs), args.iters)
                    if args.kernel_profile and bs in (1, 3, 256):
                        rec["kernels"] = kernel_profile(lambda: graphs.replay(bs))
                if not args.no_eager or graphs is None:
                    rec["eager"] = time_fn(bench.eager(bs, fused), max(10, args.iters // 5))
                rows.append(rec)
                g = rec.get("graph", {}).get("median_ms", float("nan"))
                e = rec.get("eager", {}).get("median_ms", float("nan"))
                print(f"{variant:6s} batch {bs:4d}: graph {g:.3f} ms, eager {e:.3f} ms, floor {floor_ms:.3f} ms ({g / floor_ms:.2f}x)", flush=True)
        del graphs
        torch.cuda.synchronize()
    result["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
