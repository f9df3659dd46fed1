"""Decode-step microbenchmark: one Llama-shaped decode step (all layers + LM head +
greedy sampling) over a paged KV cache, random bf16 weights on the device.

Variants: `torch` (plain torch ops: torch RMSNorm/rotary/SiLU, attention by gathering
pages + SDPA) and `fused` (Triton paged decode attention, fused add+RMSNorm, rotary +
KV write, SiLU*up), each eager and inside one CUDA graph per batch size. Timed with
CUDA events (median of --iters replays after warm-up). Also measures the two
ceilings (device-to-device copy bandwidth, bf16 matmul rate) and prints the floor:
weights + KV bytes / bandwidth.

    python benchmarks/decode_step.py --shape llama-3.2-1b --batch-sizes 1,3,256 --ctx 300 --json decode.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aiosched.executors.torch import fused_ops  # noqa: E402
from aiosched.executors.torch.attention import triton_paged as tp  # noqa: E402
from aiosched.executors.torch.cuda_graphs import DecodeGraphs  # noqa: E402


def load_shape(shape: str) -> dict:
    if os.path.isfile(shape):
        with open(shape) as f:
            return json.load(f)
    try:
        from aiosched.executors.torch.random_checkpoint import shape_config

        return shape_config(shape)
    except ImportError:
        if shape != "llama-3.2-1b":
            raise
        return {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "tie_word_embeddings": True, "max_position_embeddings": 131072}


class Model:
    def __init__(self, cfg: dict, max_bs: int, ctx: int, page: int, device: str, dtype: torch.dtype) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        H = cfg["hidden_size"]
        self.Hq = cfg["num_attention_heads"]
        self.Hkv = cfg.get("num_key_value_heads", self.Hq)
        self.D = cfg.get("head_dim") or H // self.Hq
        I, V, L = cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
        self.eps = cfg.get("rms_norm_eps", 1e-5)
        self.L, self.V, self.H = L, V, H

        def w(*shape: int, std: float = 0.02) -> torch.Tensor:
            return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

        self.embed = w(V, H)
        self.layers = []
        for _ in range(L):
            self.layers.append({
                "ln1": (1 + w(H, std=0.1)), "qkv": w((self.Hq + 2 * self.Hkv) * self.D, H), "o": w(H, self.Hq * self.D),
                "ln2": (1 + w(H, std=0.1)), "gate_up": w(2 * I, H), "down": w(H, I),
            })
        self.norm = 1 + w(H, std=0.1)
        self.lm_head = self.embed if cfg.get("tie_word_embeddings", True) else w(V, H)
        self.param_bytes = sum(t.numel() * t.element_size() for lay in self.layers for t in lay.values())
        self.param_bytes += self.embed.numel() * self.embed.element_size() * (1 if self.lm_head is self.embed else 2) + self.norm.numel() * 2
        inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, self.D, 2, device=device).float() / self.D))
        ang = torch.arange(ctx + 64, device=device).float()[:, None] * inv[None, :]
        self.cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1).contiguous()  # float32 [pos, D]
        # paged KV cache: [L, blocks, page, 2*Hkv, D] (K at even heads, V at odd)
        self.page = page
        self.max_blocks = (ctx + 1 + page - 1) // page
        nblocks = max_bs * self.max_blocks + 1
        self.cache = torch.randn(L, nblocks, page, 2 * self.Hkv, self.D, generator=g, device=device, dtype=torch.float32).to(dtype)
        # persistent step inputs
        self.ids = torch.randint(0, V, (max_bs,), device=device)
        self.pos = torch.full((max_bs,), ctx, device=device, dtype=torch.long)
        self.seq = torch.full((max_bs,), ctx + 1, device=device, dtype=torch.int32)
        perm = torch.randperm(nblocks - 1, generator=g, device=device)[: max_bs * self.max_blocks].to(torch.int32)
        self.bt = perm.view(max_bs, self.max_blocks).contiguous()
        self.slots = (self.bt[:, ctx // page].long() * page + ctx % page).contiguous()
        self.out_tokens = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.ws = tp.DecodeWorkspace(max_bs, self.Hq, self.D, 16, device)
        self.scale = self.D ** -0.5
        self.ctx = ctx
        sb = min(max_bs, 16)
        self.qkv_buf = torch.empty(sb, (self.Hq + 2 * self.Hkv) * self.D, device=device, dtype=dtype)
        self.logits_buf = torch.empty(sb, V, device=device, dtype=dtype)
        self.argmax_ws = fused_ops.argmax_workspace(max_bs, V, device)
        # the runner's choice (executors/torch/cuda_path.py); --tune replaces it with measured winners
        self.best_choice: dict = {"o": True, "gate_up": True, "down": True, "lm_head": True}
        max_bs = max(max_bs, 1)
        self.res_big = torch.empty(max_bs, H, device=device, dtype=dtype)
        self.res = self.res_big
        self.attn_buf = torch.empty(max_bs, self.Hq, self.D, device=device, dtype=dtype)
        self.act_buf = torch.empty(max_bs, I, device=device, dtype=dtype)

    def logits_of(self, step: str, bs: int) -> torch.Tensor:
        """Run one step with an implementation; return its float logits (for cross-checks)."""
        out = {}
        orig = F.linear
        lm = self.lm_head

        def spy(x, w, *a, **k):  # noqa: ANN001
            y = orig(x, w, *a, **k)
            if w is lm:
                out["logits"] = y.float().clone()
            return y

        if step in ("skinny", "best", "fused"):
            getattr(self, "step_" + step)(bs)
            return self.logits_buf[:bs].float().clone()
        F.linear = spy
        try:
            getattr(self, "step_" + step)(bs)
        finally:
            F.linear = orig
        return out["logits"]

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache[layer]
        return c[:, :, 0::2], c[:, :, 1::2]

    # ---- one decode step, two implementations

    def step_fused(self, bs: int) -> None:
        """cuBLAS projections + Triton attention, fused add+RMSNorm, rotary+KV write, SiLU*up, argmax."""
        self._step(bs, {})

    def step_skinny(self, bs: int) -> None:
        """Batch <= 16: every projection a Triton skinny GEMM (norm prologue, residual/SiLU epilogue)."""
        self._step(bs, dict.fromkeys(("qkv", "o", "gate_up", "down", "lm_head"), True))

    def step_best(self, bs: int) -> None:
        """Per projection, whichever of skinny / cuBLAS the tuning found faster (batch <= 16)."""
        self._step(bs, self.best_choice, fused_ops.SKINNY_PREFERRED_MAX_M)

    def _step(self, bs: int, skinny: dict, max_m: int = fused_ops.SKINNY_MAX_M) -> None:
        sk = skinny if bs <= max_m else {}
        res = self.res[:bs]
        torch.index_select(self.embed, 0, self.ids[:bs], out=res)
        pending = None  # a projection output still to be added into the residual stream

        def normed_proj(name: str, w: torch.Tensor, lnw: torch.Tensor, out: torch.Tensor, silu: bool = False) -> torch.Tensor:
            nonlocal pending
            if sk.get(name):
                if pending is not None:
                    res.add_(pending)
                    pending = None
                return fused_ops.skinny_linear(res, w, out=out, norm_weight=lnw, eps=self.eps, epilogue="silu_mul" if silu else "store")
            if pending is not None:
                h, _ = fused_ops.add_rms_norm(pending, res, lnw, self.eps)
                pending = None
            else:
                h = fused_ops.rms_norm(res, lnw, self.eps)
            y = F.linear(h, w)
            return fused_ops.silu_and_mul(y, out=out) if silu else out.copy_(y) if out.data_ptr() != y.data_ptr() else y

        def residual_proj(name: str, x: torch.Tensor, w: torch.Tensor) -> None:
            nonlocal pending
            if sk.get(name):
                fused_ops.skinny_linear(x, w, out=res, epilogue="residual")
            else:
                pending = F.linear(x, w)

        for i, lay in enumerate(self.layers):
            if sk.get("qkv"):
                qkv = normed_proj("qkv", lay["qkv"], lay["ln1"], self.qkv_buf[:bs])
            else:  # cuBLAS writes its own output; no copy
                if pending is not None:
                    h, _ = fused_ops.add_rms_norm(pending, res, lay["ln1"], self.eps)
                    pending = None
                else:
                    h = fused_ops.rms_norm(res, lay["ln1"], self.eps)
                qkv = F.linear(h, lay["qkv"])
            q = qkv[:, : self.Hq * self.D].view(bs, self.Hq, self.D)
            k = qkv[:, self.Hq * self.D:(self.Hq + self.Hkv) * self.D].view(bs, self.Hkv, self.D)
            v = qkv[:, (self.Hq + self.Hkv) * self.D:].view(bs, self.Hkv, self.D)
            kc, vc = self.kv(i)
            fused_ops.rope_and_cache(q, k, v, self.pos[:bs], self.cos_sin, kc, vc, self.slots[:bs])
            a = tp.paged_decode_attention(q, kc, vc, self.bt[:bs], self.seq[:bs], self.scale, out=self.attn_buf[:bs], workspace=self.ws)
            residual_proj("o", a.view(bs, -1), lay["o"])
            act = normed_proj("gate_up", lay["gate_up"], lay["ln2"], self.act_buf[:bs], silu=True)
            residual_proj("down", act, lay["down"])
        if sk.get("lm_head"):
            logits = normed_proj("lm_head", self.lm_head, self.norm, self.logits_buf[:bs])
        else:
            if pending is not None:
                h, _ = fused_ops.add_rms_norm(pending, res, self.norm, self.eps)
            else:
                h = fused_ops.rms_norm(res, self.norm, self.eps)
            logits = F.linear(h, self.lm_head)
            self.logits_buf[:bs].copy_(logits) if bs <= self.logits_buf.shape[0] else None
        fused_ops.argmax_rows(logits, out=self.out_tokens[:bs], workspace=self.argmax_ws)

    def step_torch(self, bs: int) -> None:
        x = F.embedding(self.ids[:bs], self.embed)
        res = x
        pos = self.pos[:bs]
        cs = self.cos_sin[pos]
        half = self.D // 2
        cos, sin = cs[:, None, :half], cs[:, None, half:]
        nk = self.max_blocks * self.page
        kpos = torch.arange(nk, device=x.device)
        mask = kpos[None, :] < self.seq[:bs, None]  # [bs, nk]
        bt = self.bt[:bs].long()
        slots = self.slots[:bs]

        def norm(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            tf = t.float()
            return (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + self.eps)).to(t.dtype) * w

        def rope(t: torch.Tensor) -> torch.Tensor:
            t1, t2 = t[..., :half].float(), t[..., half:].float()
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1).to(t.dtype)

        for i, lay in enumerate(self.layers):
            h = norm(res, lay["ln1"])
            qkv = F.linear(h, lay["qkv"])
            q = rope(qkv[:, : self.Hq * self.D].view(bs, self.Hq, self.D))
            k = rope(qkv[:, self.Hq * self.D:(self.Hq + self.Hkv) * self.D].view(bs, self.Hkv, self.D))
            v = qkv[:, (self.Hq + self.Hkv) * self.D:].view(bs, self.Hkv, self.D)
            c = self.cache[i].view(-1, 2 * self.Hkv, self.D)
            c[slots, 0::2] = k
            c[slots, 1::2] = v
            pages = self.cache[i][bt].view(bs, nk, 2 * self.Hkv, self.D)
            kk = pages[:, :, 0::2].transpose(1, 2)
            vv = pages[:, :, 1::2].transpose(1, 2)
            a = F.scaled_dot_product_attention(q[:, :, None, :], kk, vv, attn_mask=mask[:, None, None, :], scale=self.scale,
                                               enable_gqa=True)
            res = res + F.linear(a.reshape(bs, -1), lay["o"])
            h = norm(res, lay["ln2"])
            gu = F.linear(h, lay["gate_up"])
            g, u = gu.chunk(2, -1)
            res = res + F.linear(F.silu(g) * u, lay["down"])
        logits = F.linear(norm(res, self.norm), self.lm_head)
        self.out_tokens[:bs] = logits.argmax(-1)


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


def tune_skinny(model: "Model") -> dict:
    """Per projection: time each skinny-GEMM tile config and cuBLAS, each as a graph of one
    launch per layer (distinct weights: no L2 reuse); keep the best config and the winner."""
    L = model.L
    H, I = model.H, model.act_buf.shape[1]
    dev, dt = "cuda", torch.bfloat16
    x_h = torch.randn(1, H, device=dev, dtype=dt)
    x_o = torch.randn(1, model.Hq * model.D, device=dev, dtype=dt)
    x_i = torch.randn(1, I, device=dev, dtype=dt)
    o_qkv = torch.empty(1, model.qkv_buf.shape[1], device=dev, dtype=dt)
    o_h = torch.zeros(1, H, device=dev, dtype=dt)
    o_i = torch.empty(1, I, device=dev, dtype=dt)
    o_v = torch.empty(1, model.V, device=dev, dtype=dt)
    lnw = model.layers[0]["ln1"]
    cases = {  # name: (weights per launch, x, out, epilogue, norm, cuBLAS extra kernels)
        "qkv": ([l["qkv"] for l in model.layers], x_h, o_qkv, "store", True),
        "o": ([l["o"] for l in model.layers], x_o, o_h, "residual", False),
        "gate_up": ([l["gate_up"] for l in model.layers], x_h, o_i, "silu_mul", True),
        "down": ([l["down"] for l in model.layers], x_i, o_h, "residual", False),
        "lm_head": ([model.lm_head] * 4, x_h, o_v, "store", True),
    }
    cands = [(16, 128, 4, 4), (16, 256, 4, 3), (16, 256, 4, 5), (16, 512, 4, 3), (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 4, 3),
             (32, 256, 8, 4), (64, 128, 4, 3), (64, 128, 8, 4), (64, 256, 8, 3), (16, 1024, 8, 2)]
    out = {}
    for name, (ws, x, o, epi, norm) in cases.items():
        n_out, K = o.shape[1], ws[0].shape[1]
        e = {"store": 0, "residual": 1, "silu_mul": 2}[epi]
        res = {}
        best = None
        for c in cands:
            fused_ops.set_skinny_config(n_out, K, e, c)
            try:
                t = graph_time(lambda: [fused_ops.skinny_linear(x, w, out=o, norm_weight=lnw if norm else None, epilogue=epi) for w in ws])
            except Exception as ex:  # does not fit (shared memory): skip
                res[str(c)] = repr(ex)[:60]
                continue
            t /= len(ws)
            res[str(c)] = t
            if best is None or t < best[1]:
                best = (c, t)
        assert best is not None
        fused_ops.set_skinny_config(n_out, K, e, best[0])

        def cublas() -> None:
            for w in ws:
                h = fused_ops.rms_norm(x, lnw, 1e-5) if norm else x
                y = F.linear(h, w)
                if epi == "silu_mul":
                    fused_ops.silu_and_mul(y, out=o)
                elif epi == "residual":
                    o.add_(y)

        tc = graph_time(cublas) / len(ws)
        tg = graph_time(lambda: [F.linear(x, w) for w in ws]) / len(ws)
        wbytes = ws[0].numel() * ws[0].element_size()
        out[name] = {"best": list(best[0]), "skinny_us": best[1] * 1e3, "skinny_TBps": wbytes / (best[1] * 1e-3) / 1e12,
                     "cublas_with_extras_us": tc * 1e3, "cublas_gemm_only_us": tg * 1e3, "cublas_TBps": wbytes / (tg * 1e-3) / 1e12,
                     "all_ms": res}
        model.best_choice[name] = best[1] < tc
        print(f"{name:8s} N={n_out:6d} K={K:5d}: skinny {best[0]} {best[1] * 1e3:6.1f} us ({out[name]['skinny_TBps']:.2f} TB/s) | "
              f"cuBLAS {tg * 1e3:6.1f} us ({out[name]['cublas_TBps']:.2f} TB/s), with norm/act/add {tc * 1e3:6.1f} us", flush=True)
    print(f"skinny chosen for: {[k for k, v in model.best_choice.items() if v]}", flush=True)
    out["choice"] = dict(model.best_choice)
    return out


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
    p.add_argument("--tune", action="store_true", help="sweep skinny-GEMM tile configs per projection first")
    p.add_argument("--kernel-profile", action="store_true", help="per-kernel time of one graph replay (torch profiler)")
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = "cuda"
    cfg = load_shape(args.shape)
    bss = [int(x) for x in args.batch_sizes.split(",")]
    result: dict = {"shape": args.shape, "ctx": args.ctx, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["ceilings"] = ceil = ceilings(dev)
    print(f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    model = Model(cfg, max(bss), args.ctx, args.page, dev, torch.bfloat16)
    kv_tok = model.L * 2 * model.Hkv * model.D * 2
    result["param_bytes"] = model.param_bytes
    # correctness: each variant's logits vs the plain-torch step on the same cache
    with torch.inference_mode():
        cache0 = model.cache.clone()
        ref = model.logits_of("torch", 3)
        for v in args.variants.split(","):
            model.cache.copy_(cache0)
            lg = model.logits_of(v, 3)
            err = ((lg - ref).norm() / ref.norm()).item()
            result[f"{v}_vs_torch_logits_rel_err"] = err
            print(f"{v} vs torch: logits rel err {err:.2e}", flush=True)
        model.cache.copy_(cache0)
        del cache0
    if args.tune:
        result["skinny_tune"] = tune_skinny(model)
    rows = []
    for variant in args.variants.split(","):
        step = getattr(model, "step_" + variant)
        graphs = DecodeGraphs(step, max(bss), dev, sizes=bss)
        with torch.inference_mode():
            cap = graphs.capture()
            for bs in bss:
                floor_bytes = model.param_bytes + bs * (args.ctx + 1) * kv_tok
                floor_ms = floor_bytes / (ceil["copy_TBps"] * 1e12) * 1e3
                rec = {"variant": variant, "batch": bs, "floor_ms": floor_ms, "floor_bytes": floor_bytes, "capture_s": cap}
                rec["graph"] = time_fn(lambda: graphs.replay(bs), args.iters)
                if not args.no_eager:
                    rec["eager"] = time_fn(lambda: step(bs), max(10, args.iters // 5))
                if args.kernel_profile and bs in (1, 3, 256):
                    rec["kernels"] = kernel_profile(lambda: graphs.replay(bs))
                rows.append(rec)
                e = rec.get("eager", {}).get("median_ms", float("nan"))
                print(f"{variant:6s} batch {bs:4d}: graph {rec['graph']['median_ms']:.3f} ms, eager {e:.3f} ms, "
                      f"floor {floor_ms:.3f} ms ({rec['graph']['median_ms'] / floor_ms:.2f}x)", flush=True)
        del graphs
        torch.cuda.synchronize()
    result["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
