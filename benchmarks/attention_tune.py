"""Sweep the Triton decode-attention kernel's launch shape on this GPU (issue 21).

Each config runs as a CUDA graph of one launch per layer over that layer's own K/V cache
(16 layers x 2.5 GB at batch 256: nothing stays in L2), on the runner's layout
(`[blocks, 16, kv heads, head dim]` for K and for V) with each request's blocks spread
over the pool. Reports us per layer call and the KV bytes read per second, and checks
every config's output against the default's.

  python benchmarks/attention_tune.py --batch-sizes 1,3,256 --ctx 300 --json /tmp/attn.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aiosched.executors.torch.attention.triton_paged import (DecodeConfig, DecodeWorkspace, num_decode_splits,  # noqa: E402
                                                          paged_decode_attention)
from decode_step import graph_time  # noqa: E402  (ms per replay of a CUDA graph of the function, events)


def configs(full: bool, quick: bool = False) -> list[DecodeConfig]:
    if quick:  # the per-kv-head kernel's two defaults (split, unsplit) against the all-heads grid
        grid = [(32, 4, 2, False), (64, 4, 2, True)]
    elif full:
        grid = itertools.product((16, 32, 64), (2, 4, 8), (1, 2, 3), (False, True))
    else:
        grid = itertools.product((32, 64), (2, 4), (2, 3), (False, True))
    one_head = [DecodeConfig(bn, nw, ns, hf) for bn, nw, ns, hf in grid]
    # every kv head of a request in one program (whole K/V token rows per load)
    all_heads = [DecodeConfig(bn, nw, ns, all_heads=True) for bn, nw, ns in itertools.product((16, 32, 64), (4, 8), (1, 2, 3))]
    return one_head + all_heads


def splits_for(cfg: DecodeConfig, batch: int, hkv: int) -> int:
    """The split count the launch would use: the all-heads grid has one program per
    (request, split), so it fills the SMs with more splits than the per-kv-head grid."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return num_decode_splits(batch, 1 if cfg.all_heads else hkv, sms)


def sweep(batch: int, ctx: int, layers: int, hq: int, hkv: int, d: int, page: int, full: bool, quick: bool = False) -> dict:
    dev, dt = "cuda", torch.bfloat16
    per_req = (ctx + 1 + page - 1) // page
    nblocks = batch * per_req + 1
    gen = torch.Generator(device="cpu").manual_seed(0)
    caches = [(torch.randn(nblocks, page, hkv, d, device=dev, dtype=dt), torch.randn(nblocks, page, hkv, d, device=dev, dtype=dt))
              for _ in range(layers)]
    # Blocks of a request scattered over the pool (a long-running server's free list).
    tables = torch.randperm(nblocks - 1, generator=gen)[: batch * per_req].view(batch, per_req).to(dev, torch.int32)
    lens = torch.full((batch,), ctx + 1, device=dev, dtype=torch.int32)
    q = torch.randn(batch, hq, d, device=dev, dtype=dt)
    out = torch.empty_like(q)
    ws = DecodeWorkspace(batch, hq, d, 16, dev)
    scale = d ** -0.5
    ref = paged_decode_attention(q, *caches[0], tables, lens, scale, workspace=ws).clone()
    kv_bytes = batch * (ctx + 1) * hkv * d * 2 * caches[0][0].element_size()
    rows = []
    for cfg in configs(full, quick):
        try:
            ns = splits_for(cfg, batch, hkv)
            got = paged_decode_attention(q, *caches[0], tables, lens, scale, out=out, workspace=ws, config=cfg, num_splits=ns)
            ok = torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
            us = graph_time(lambda: [paged_decode_attention(q, k, v, tables, lens, scale, out=out, workspace=ws, config=cfg,
                                                            num_splits=ns) for k, v in caches]) * 1e3 / layers
        except Exception as ex:  # does not fit (shared memory / registers): skip
            rows.append({"config": cfg._asdict(), "error": repr(ex)[:80]})
            continue
        rows.append({"config": cfg._asdict(), "splits": ns, "us": us, "TBps": kv_bytes / (us * 1e-6) / 1e12, "matches_default": ok})
    timed = [r for r in rows if "us" in r and r["matches_default"]]
    timed.sort(key=lambda r: r["us"])
    default = next(r for r in rows if r["config"] == DecodeConfig()._asdict())  # the tile before the sweep
    print(f"batch {batch:4d} ctx {ctx}: (32, 4, 2, False) {default['us']:7.1f} us ({default['TBps']:.2f} TB/s); best "
          + "; ".join(f"{tuple(r['config'].values())} x{r['splits']} {r['us']:.1f} us ({r['TBps']:.2f} TB/s)" for r in timed[:4]),
          flush=True)
    for flag in ("all_heads",):  # the best of each kernel, side by side
        fam = [r for r in timed if r["config"][flag]]
        if fam:
            print(f"  best {flag}: {tuple(fam[0]['config'].values())} x{fam[0]['splits']} {fam[0]['us']:.1f} us ({fam[0]['TBps']:.2f} TB/s)",
                  flush=True)
    bad = [r["config"] for r in rows if "us" in r and not r["matches_default"]]
    if bad:
        print(f"  configs that disagree with the default: {bad}", flush=True)
    return {"batch": batch, "ctx": ctx, "kv_bytes": kv_bytes, "default": default, "best": timed[:4], "all": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,3,256")
    p.add_argument("--ctx", type=int, default=300)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", default="32,8,64", help="query heads, kv heads, head dim (Llama-3.2-1B)")
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="the per-kv-head defaults only, against the all-heads grid")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    hq, hkv, d = (int(x) for x in a.heads.split(","))
    res = [sweep(b, a.ctx, a.layers, hq, hkv, d, a.page, full=b >= 64, quick=a.quick) for b in (int(x) for x in a.batch_sizes.split(","))]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
