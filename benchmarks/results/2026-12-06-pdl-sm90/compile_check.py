"""Compile the decode-path Triton kernels for sm_90 (H100 / H200) with and without PDL, no GPU needed.

    PYTHONPATH=.:/path/to/triton python benchmarks/results/2026-12-06-pdl-sm90/compile_check.py [REF]

(Triton's NVIDIA backend and its bundled ptxas only; TRITON_INTERPRET unset.) For each of the
nine kernels that `fused_ops.pdl_kwargs` covers: with PDL=True the PTX has griddepcontrol.wait
before griddepcontrol.launch_dependents and both before the first global load/store; with
PDL=False it has neither, and its instructions (debug info aside) equal those of the same
kernel in the tree at git ref REF (default main), i.e. the switch off compiles today's kernels.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import types

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aiosched.executors.torch import fused_ops  # noqa: E402
from aiosched.executors.torch.attention import triton_paged  # noqa: E402

# per kernel: pointer dtypes other than *bf16, and the constexpr values of a Llama-3.2-1B decode step
KERNELS: dict[str, tuple[str, dict[str, str], dict]] = {
    "_step_inputs_kernel": ("fused_ops", {p: "*i64" for p in ("d", "tok", "bt", "ntok", "ids", "p", "slot")},
                            {"PAGE": 16, "BLOCK": 256, "REL": False}),
    "_rms_norm_kernel": ("fused_ops", {}, {"BLOCK": 2048, "ADD": True}),
    "_silu_mul_kernel": ("fused_ops", {}, {"BLOCK": 1024}),
    "_rope_cache_kernel": ("fused_ops", {"pos": "*i64", "slot": "*i64", "cs": "*fp32"},
                           {"HQ": 32, "HKV": 8, "BLOCK_HQ": 32, "BLOCK_HKV": 8, "HALF": 32, "PAGE": 16, "WRITE_CACHE": True}),
    "_skinny_gemm_kernel": ("fused_ops", {"part": "*fp32", "cnt": "*i32"},
                            {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "NORM": False, "EPI": 1, "PREC": "tf32", "SPLIT_K": 4}),
    "_argmax_partial_kernel": ("fused_ops", {"val": "*fp32", "idx": "*i32"}, {"BLOCK": 4096}),
    "_argmax_final_kernel": ("fused_ops", {"val": "*fp32", "idx": "*i32", "out": "*i64"}, {"BLOCK_C": 32}),
    "_decode_kernel": ("triton_paged", {"bt": "*i32", "lens": "*i32", "rows": "*i32", "part": "*fp32", "ml": "*fp32"},
                       {"G": 4, "BLOCK_H": 16, "D": 64, "BLOCK_N": 32, "PAGE": 16, "NUM_SPLITS": 4, "HAS_ROWS": False,
                        "PREC": "tf32", "HAS_WINDOW": False, "SOFTCAP": False, "HEADS_FAST": False}),
    "_decode_reduce_kernel": ("triton_paged", {"part": "*fp32", "ml": "*fp32"}, {"D": 64, "NUM_SPLITS": 4, "BLOCK_S": 4}),
}
FLOATS = {"eps", "sm_scale", "softcap"}


def signature(fn: triton.JITFunction, ptrs: dict[str, str]) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = ptrs.get(p.name[:-4], "*bf16")
        else:
            sig[p.name] = "fp32" if p.name in FLOATS else "i32"
    return sig


def build(fn: triton.JITFunction, ptrs: dict[str, str], const: dict, pdl: bool | None) -> str:
    const = dict(const) if pdl is None else {**const, "PDL": pdl}
    src = ASTSource(fn=fn, signature=signature(fn, ptrs), constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2}).asm["ptx"]


def code(ptx: str) -> str:
    """The PTX without debug info, comments and labels."""
    return "\n".join(ln for ln in ptx.splitlines() if not re.match(r"\s*(\.loc|//|\$L__|\.b8|\.b32|\.b64|\.file|\.section)", ln))


def load_ref(ref: str) -> dict[str, types.ModuleType]:
    """fused_ops and triton_paged as of git ref `ref`, imported from a temporary copy."""
    out = {}
    tmp = tempfile.mkdtemp(prefix="pdl-ref-")
    for name, path in (("fused_ops", "executors/torch/fused_ops.py"), ("triton_paged", "executors/torch/attention/triton_paged.py")):
        text = subprocess.run(["git", "-C", ROOT, "show", f"{ref}:{path}"], capture_output=True, text=True, check=True).stdout
        file = os.path.join(tmp, f"ref_{name}.py")
        with open(file, "w") as f:
            f.write(text)
        spec = importlib.util.spec_from_file_location(f"ref_{name}", file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        out[name] = mod
    return out


def first_global_access(ptx: str) -> int:
    m = re.search(r"\b(ld|st|atom|red|cp\.async)\.global", ptx)
    return m.start() if m else len(ptx)


def main() -> int:
    ref = sys.argv[1] if len(sys.argv) > 1 else "main"
    mods = {"fused_ops": fused_ops, "triton_paged": triton_paged}
    refs = load_ref(ref)
    ok_all = True
    for name, (mod, ptrs, const) in KERNELS.items():
        fn = getattr(mods[mod], name)
        on, off = build(fn, ptrs, const, True), build(fn, ptrs, const, False)
        before = build(getattr(refs[mod], name), ptrs, const, None)
        w, t, g = on.find("griddepcontrol.wait"), on.find("griddepcontrol.launch_dependents"), first_global_access(on)
        placed = 0 <= w < t < g
        clean = "griddepcontrol" not in off
        same = code(off) == code(before)
        ok_all &= placed and clean and same
        print(f"{name:24s} PDL=True: wait, trigger before the first global access {placed}; "
              f"PDL=False: no griddepcontrol {clean}, PTX as at {ref} {same}")
    print("all ok" if ok_all else "FAILED")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
