"""Compile the skinny GEMM for sm_90 (H100 / H200) on a machine without a GPU.

    PYTHONPATH=.:/path/to/triton python benchmarks/results/2026-12-06-splitk-sm90/compile_check.py

(Triton's NVIDIA backend and its bundled ptxas only; TRITON_INTERPRET unset.) Checks that
every split-K config of `decode_step.py --tune` builds with the launcher's run-time
specialisation (aligned pointers, sizes and strides divisible by 16: without those hints
the loads are not pipelined and num_stages changes nothing), prints its shared memory and
cp.async count, that the split path has the acq_rel counter atomic, the .cg (L2) partial
loads and the counter reset, and that num_stages does change the split-1 kernel.
With Triton 3.6.0 (2026-12-06): all 56 build, at most 152 KiB of shared memory (the limit is
227 KiB); and (compiled the same way, separately) the split-1 PTX has the same instructions,
debug info aside, as the kernel before split-K (main at 9c5582e) for three tiles/epilogues.
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.argv = sys.argv[:1]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import decode_step  # noqa: E402
from aiosched.executors.torch import fused_ops  # noqa: E402

SHAPES = {"qkv": (3072, 2048, 0, True), "o": (2048, 2048, 1, False), "gate_up": (8192, 2048, 2, True), "down": (2048, 8192, 1, False)}
SIG = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "lnw_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32",
       "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32", "eps": "fp32",
       **{k: "constexpr" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "NORM", "EPI", "PREC", "SPLIT_K")}}


# what the launcher specialises at run time for the model's shapes: 16-byte aligned pointers,
# N, K and the row strides divisible by 16 (M = 3 is not)
ALIGNED = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(SIG) if k.endswith("_ptr") or k in ("N", "K") or k.startswith("stride")}


def build(cfg: tuple[int, int, int, int, int], epi: int, norm: bool):
    bn, bk, nw, ns, split = cfg
    const = {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "NORM": norm, "EPI": epi, "PREC": "tf32", "SPLIT_K": split}
    return triton.compile(ASTSource(fn=fused_ops._skinny_gemm_kernel, signature=SIG, constexprs=const, attrs=ALIGNED),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})


def code(ptx: str) -> str:
    """The PTX without debug info and labels."""
    return "\n".join(ln for ln in ptx.splitlines() if not re.match(r"\s*(\.loc|//|\$L__|\.b8|\.b32|\.b64)", ln))


def main() -> int:
    seen: dict = {}
    for name, (n, k, epi, norm) in SHAPES.items():
        for cfg in decode_step.split_k_candidates(n, k, 132):
            if (cfg, epi, norm) in seen:
                continue
            kern = build(cfg, epi, norm)
            ptx = kern.asm["ptx"]
            seen[(cfg, epi, norm)] = kern.metadata.shared
            ok = "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx and "atom.global.gpu.acq_rel.exch" in ptx
            print(f"{name:8s} {cfg}: shared {kern.metadata.shared} B, cp.async {ptx.count('cp.async.')}, split atomics/.cg {ok}")
    print(f"{len(seen)} split-K kernels built for sm_90")
    for a, b in [((16, 256, 4, 3, 1), (16, 256, 4, 5, 1)), ((16, 512, 4, 3, 1), (16, 512, 4, 4, 1)), ((64, 128, 8, 4, 1), (64, 128, 8, 3, 1))]:
        same = code(build(a, 1, False).asm["ptx"]) == code(build(b, 1, False).asm["ptx"])
        print(f"{a} vs {b}: {'identical' if same else 'different'} PTX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
