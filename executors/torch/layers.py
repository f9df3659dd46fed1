"""Layer primitives shared by the torch models (executors/torch/models/*).

Each family file composes these; a variant (Gemma's (1 + w) norm, GeGLU, soft-capping,
llama3 RoPE scaling) is a constructor argument here, not a copy of a layer in a model.
Numerics follow transformers' modules (norms in float32, rotary frequencies in float64
then float32) so a tiny float32 checkpoint gives HF's greedy tokens.

Tensor parallelism: column-parallel layers are plain `nn.Linear` holding this rank's
rows (the loader slices them, see `ShardSpec` in models/llama.py); `RowParallelLinear`
sums the ranks' partial products and adds its bias once, after the sum.

Fused CUDA ops: on a step whose `AttentionMetadata.fused` is set (the runner sets it on
CUDA, one device, executors/torch/fused_ops.py) the layers pick the Triton kernels
themselves: the residual stream (`Residual`) keeps the last addend pending so that
the add fuses into the next norm, rotary + KV write is one kernel (`rope_and_store`),
and for 1-2 rows the o / down projections add straight into the stream and gate_up
runs with its norm prologue and SiLU epilogue (`skinny_rows`). So the model's own
forward is the fast one, and CUDA graphs capture it. Unfused (CPU), each op is the
plain torch one, in HF's order.
"""
from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aiosched.executors.model_config import RopeConfig
from aiosched.executors.torch import fused_ops
from aiosched.executors.torch.attention import cpu_kernel
from aiosched.executors.torch.attention.torch_paged import AttentionMetadata, store_kv
from aiosched.executors.torch.parallel import SINGLE, TPGroup, all_reduce_


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32.

    unit_offset=False (Llama): `w * norm(x)`, the product in the input dtype as HF does;
    unit_offset=True (Gemma): `norm(x) * (1 + w)` in float32, then cast (w is stored
    zero-centred in the checkpoint)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return (xf * self.weight.float()).to(x.dtype) if x.dtype != torch.float32 else xf * self.weight

    def apply(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        """forward, with the Triton kernel on a fused step (same formula)."""
        return fused_ops.rms_norm(x, self.weight, self.eps) if fused and not self.unit_offset else self(x)


class Residual:
    """The residual stream `x` and one addend not yet added to it.

    Unfused: `add` is `x = x + y` (HF's order and rounding). Fused: the addend waits,
    and the next norm adds it in the same kernel (`add_rms_norm`, in place)."""

    def __init__(self, x: torch.Tensor, fused: bool) -> None:
        self.x, self.fused = x, fused
        self.pending: torch.Tensor | None = None

    def add(self, y: torch.Tensor) -> None:
        if not self.fused:
            self.x = self.x + y
            return
        self.flush()
        self.pending = y

    def flush(self) -> torch.Tensor:
        if self.pending is not None:
            self.x.add_(self.pending)
            self.pending = None
        return self.x

    def normed(self, norm: RMSNorm) -> torch.Tensor:
        """norm(x), after adding the pending addend."""
        if not self.fused or norm.unit_offset:
            return norm(self.flush())
        if self.pending is None:
            return fused_ops.rms_norm(self.x, norm.weight, norm.eps)
        h, _ = fused_ops.add_rms_norm(self.pending, self.x, norm.weight, norm.eps)
        self.pending = None
        return h


# The qkv projection of 1-2 rows as a skinny GEMM with the input norm as its prologue (one
# kernel instead of a norm kernel and a cuBLAS GEMV). Off: without PDL it lost on the H200
# (10.3 vs 8.3 us per layer, 2026-12-03); with PDL the skinny kernels' start overlaps the
# previous kernel's drain, which is what it lost on. AIOSCHED_SKINNY_QKV=1 or
# `set_skinny_qkv(True)` before graphs are captured; benchmarks/decode_step.py --skinny-qkv.
_SKINNY_QKV = os.environ.get("AIOSCHED_SKINNY_QKV") == "1"


def set_skinny_qkv(on: bool) -> None:
    global _SKINNY_QKV
    _SKINNY_QKV = bool(on)


def skinny_qkv_enabled() -> bool:
    return _SKINNY_QKV


def skinny_rows(x: torch.Tensor, fused: bool, tp: TPGroup = SINGLE) -> bool:
    """Whether a projection of x's rows takes the skinny Triton GEMM: 1-2 rows, where it
    beats cuBLAS on the H100 (benchmarks/decode_step.py --tune), on one device."""
    return fused and not tp.active and x.shape[0] <= fused_ops.SKINNY_PREFERRED_MAX_M


# ---------------------------------------------------------------------------
# Rotary embeddings
# ---------------------------------------------------------------------------


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float64) with the configured scaling."""
    d = head_dim
    inv = 1.0 / (rope.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        # Long wavelengths scaled down by `factor`, short ones kept, a smooth ramp between.
        low, high, old_len = rope.low_freq_factor, rope.high_freq_factor, rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / rope.factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(rope: RopeConfig, head_dim: int, max_pos: int, device: torch.device | str) -> torch.Tensor:
    """[max_pos, head_dim] float32: cos in the first half, sin in the second."""
    t = torch.arange(max_pos, dtype=torch.float64)
    freqs = torch.outer(t, rope_inv_freq(rope, head_dim))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device=device, dtype=torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF convention). x: [T, H, D]; cos/sin: [T, 1, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def cos_sin_at(cos_sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, D/2] of a `rope_cos_sin` table at `positions`."""
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    return cos, sin


class RotaryAt:
    """A `rope_cos_sin` table at one step's positions; cos/sin gathered once per step, at first use."""

    def __init__(self, table: torch.Tensor, positions: torch.Tensor) -> None:
        self.table, self.positions = table, positions
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        self._c_ok: bool | None = None

    def c_kernel_ok(self) -> bool:
        """Whether the CPU C kernel can take this step's rotations: a float32 host table and
        int64 positions inside it (checked once per step: the kernel does not bound-check)."""
        if self._c_ok is None:
            t, p = self.table, self.positions
            self._c_ok = (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and p.device.type == "cpu"
                          and p.dtype == torch.int64 and p.dim() == 1 and p.is_contiguous()
                          and (p.numel() == 0 or (int(p.min()) >= 0 and int(p.max()) < t.shape[0])))
        return self._c_ok

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos_sin is None:
            self._cos_sin = cos_sin_at(self.table, self.positions)
        return self._cos_sin


def _c_rope_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RotaryAt, meta: AttentionMetadata,
                    k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The CPU C kernel's domain (attention/cpu_kernel.py, `aiosched_rope_store_f32`): float32
    host tensors, heads contiguous within each token's row (views of the qkv output are),
    contiguous caches, the table as wide as the head, slots checked once per step. Other
    cases take the torch ops below, which the kernel equals bit for bit."""
    d = q.shape[-1]
    if not (q.dim() == k.dim() == v.dim() == 3 and q.device.type == "cpu" and d % 2 == 0
            and q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype == torch.float32
            and all(t.stride(2) == 1 and t.stride(1) == d for t in (q, k, v)) and k.shape == v.shape
            and k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == k.shape[1:]
            and rope.table.shape[-1] == d and rope.c_kernel_ok()):
        return False
    slots = meta.slot_mapping
    ok = meta.extra.get("cpu_slots_ok")
    if ok is None or ok[0] != k_cache.shape[0] * k_cache.shape[1]:
        n = k_cache.shape[0] * k_cache.shape[1]
        ok = (n, slots.device.type == "cpu" and slots.dtype == torch.int64 and slots.is_contiguous() and slots.numel() == q.shape[0]
              and (slots.numel() == 0 or (int(slots.min()) >= -1 and int(slots.max()) < n)))
        meta.extra["cpu_slots_ok"] = ok  # type: ignore[assignment]
    return bool(ok[1])


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RotaryAt, meta: AttentionMetadata,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k ([T, H, D]) and write this step's k, v into the paged cache (the whole
    batch before any attention reads it). Fused: one kernel, in place, padding slots
    (-1) skipped. CPU float32: one pass of the C kernel (attention/cpu_kernel.py), equal to
    the torch ops (`torch_rope_and_store`) bit for bit, where it applies."""
    if meta.fused:
        fused_ops.rope_and_cache(q, k, v, rope.positions, rope.table, k_cache, v_cache, meta.slot_mapping)
        return q, k
    if _c_rope_applies(q, k, v, rope, meta, k_cache, v_cache) and (lib := cpu_kernel.load()) is not None:
        T, hq, d = q.shape
        qo, ko = torch.empty(T, hq, d), torch.empty(T, k.shape[1], d)
        lib.aiosched_rope_store_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), v.stride(0),
                                    qo.data_ptr(), ko.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), rope.table.data_ptr(),
                                    rope.positions.data_ptr(), meta.slot_mapping.data_ptr(), T, hq, k.shape[1], d)
        return qo, ko
    return torch_rope_and_store(q, k, v, rope, meta, k_cache, v_cache)


def torch_rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RotaryAt, meta: AttentionMetadata,
                         k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_and_store in plain torch ops (any device and dtype), HF's order and rounding."""
    cos, sin = rope.cos_sin()
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return q, k


# ---------------------------------------------------------------------------
# Linear layers, activations, MLPs
# ---------------------------------------------------------------------------


# CPU float32 GEMMs through oneDNN with the weight kept in oneDNN's own blocked layout
# (reordered once, at first use). Measured on the AVX2 sandbox, 1 thread (docs/benchmarks.md,
# issue 23, 2026-12-03 and its second series):
# - wide outputs (the LM head, >= 16384 features) gain at every row count over narrow
#   inputs: [64, 256..2048] x [.., 32000] 1.2-1.7x over MKL's F.linear; one row only over
#   inputs <= 1024 wide ([1, 2048] x [2048, 32000] lost 15%);
# - the projections of hidden >= 512 models (inputs and outputs >= 512 features) gain from
#   8 rows on: [8..64, 512..1024] x [.., 1536..5632] 1.1-3.8x per op, and the whole step
#   1.1-1.25x (decode batch 64 and a 4 x 128 prefill, hidden 512 / 8 layers and
#   1024 / 12 layers); at one row they are even or lose (oneDNN's ~20 us per call);
# - the hidden 256 model's projections (256 wide) are even at 64 rows (0.95-1.11x) and lose
#   2-3x at one row: they stay on F.linear.
# AIOSCHED_CPU_LINEAR=torch keeps F.linear everywhere (the before/after switch, and a way out
# if a CPU misbehaves).
CPU_LINEAR_ENV = "AIOSCHED_CPU_LINEAR"
ONEDNN_MIN_OUT = 16384  # output features from which oneDNN pays at any row count (the LM head)
ONEDNN_FEW_ROWS, ONEDNN_FEW_ROWS_MAX_IN = 16, 1024  # wide outputs under 16 rows: only inputs <= 1024 wide
ONEDNN_PROJ_MIN_DIM, ONEDNN_PROJ_MIN_ROWS = 512, 8  # projections: both dims >= 512, from 8 rows


def onednn_pays(rows: int, in_features: int, out_features: int) -> bool:
    """Whether a float32 [rows, in] x [in, out] product is faster through oneDNN here."""
    if out_features >= ONEDNN_MIN_OUT:
        return rows >= ONEDNN_FEW_ROWS or in_features <= ONEDNN_FEW_ROWS_MAX_IN
    return rows >= ONEDNN_PROJ_MIN_ROWS and min(in_features, out_features) >= ONEDNN_PROJ_MIN_DIM


def _onednn_usable() -> bool:
    """oneDNN's packed linear ops exist in this torch build and the CPU is x86 (on ARM
    torch routes mkldnn through ACL, whose fp32 path is not measured here)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
            and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))


_ONEDNN = _onednn_usable()


def onednn_linear_enabled() -> bool:
    """Whether CPU float32 linears take oneDNN now (read per call, so tests and
    benchmarks can switch the path within one process)."""
    return _ONEDNN and os.environ.get(CPU_LINEAR_ENV, "onednn") != "torch"


class PackedWeight:
    """oneDNN's reordered copy of one weight, made at first use and again whenever the
    weight tensor changes (loading copies in place, which bumps its version; `.to()`
    swaps its storage). Holds nothing for a weight the oneDNN path does not take."""

    def __init__(self) -> None:
        self._key: tuple[int, int, tuple[int, ...]] | None = None
        self._packed: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
            return None
        # An inference tensor (a model built under inference_mode) has no version counter
        # and cannot be written in place outside it: its storage alone identifies it.
        key = (weight.data_ptr(), -1 if weight.is_inference() else weight._version, tuple(weight.shape))
        if key != self._key:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            self._key = key
        return self._packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); on the CPU in float32, without autograd, with `packed`
    given, oneDNN enabled and a shape where it pays (`onednn_pays`), oneDNN's GEMM over
    the prepacked weight instead (same product, other summation order: allclose, not
    bitwise, to MKL's)."""
    if (packed is None or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled()
            or x.numel() == 0 or not onednn_pays(x.numel() // x.shape[-1], weight.shape[-1], weight.shape[0])
            or not onednn_linear_enabled()):
        return F.linear(x, weight, bias)
    w = packed.get(weight)
    if w is None or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear whose CPU float32 forward runs through `linear` (oneDNN, prepacked weight);
    same parameters and state dict as nn.Linear, so loaders and HF names are unchanged."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.packed = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class RowParallelLinear(Linear):
    """Input columns split over the ranks: partial products are summed, then the bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce_(linear(x, self.weight, None, self.packed), self.tp)
        return out if self.bias is None else out + self.bias

    def add_into(self, stream: Residual, x: torch.Tensor) -> None:
        """stream += self(x); for 1-2 rows on a fused step, the skinny GEMM adds in place."""
        if self.bias is None and skinny_rows(x, stream.fused, self.tp):
            fused_ops.skinny_linear(x, self.weight, out=stream.flush(), epilogue="residual")
        else:
            stream.add(self(x))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with act='silu', GeGLU with 'gelu_pytorch_tanh'.
    gate and up are one fused column-parallel matrix (this rank's slice of each)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.inter = intermediate // tp.world_size
        self.act = activation(act)
        self.gate_up_proj = Linear(hidden, 2 * self.inter, bias=bias)
        self.down_proj = RowParallelLinear(self.inter, hidden, bias, tp)
        self.silu = act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(self.act(gate) * up)

    def add_into(self, stream: Residual, norm: RMSNorm) -> None:
        """stream += self(norm(stream)), with the fused kernels on a fused step."""
        fused_silu = stream.fused and self.silu and self.gate_up_proj.bias is None
        x = stream.x
        if fused_silu and not norm.unit_offset and skinny_rows(x, True, self.down_proj.tp):
            act = fused_ops.skinny_linear(stream.flush(), self.gate_up_proj.weight, norm_weight=norm.weight, eps=norm.eps,
                                          epilogue="silu_mul")
        elif fused_silu:
            act = fused_ops.silu_and_mul(self.gate_up_proj(stream.normed(norm)))
        else:
            gate, up = self.gate_up_proj(stream.normed(norm)).split([self.inter, self.inter], dim=-1)
            act = self.act(gate) * up
        self.down_proj.add_into(stream, act)


# ---------------------------------------------------------------------------
# Embedding scaling, soft-capping
# ---------------------------------------------------------------------------


def scale_embedding(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Gemma multiplies embeddings by sqrt(hidden), the constant rounded to x's dtype first (as HF)."""
    # A host scalar tensor: no copy to the device, so a CUDA graph can capture it.
    return x if scale is None else x * torch.tensor(scale, dtype=x.dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): bounds logits smoothly to (-cap, cap) (Gemma 2)."""
    return x if cap is None else torch.tanh(x / cap) * cap


# ---------------------------------------------------------------------------
# Mixture of experts: routing and the reference grouped-expert MLP
# ---------------------------------------------------------------------------


def route_topk(router_logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in the logits' dtype, expert ids [T, k]): softmax over all experts in
    float32, the k largest, optionally renormalised to sum to 1 (HF's norm_topk_prob)."""
    probs = router_logits.softmax(dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def grouped_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, expert_ids: torch.Tensor,
                    weights: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """The reference expert MLPs: sum_k weights[t, k] * down_e(act(gate_e(x_t)) * up_e(x_t)), e = expert_ids[t, k].

    x [T, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I]. The (token, k) pairs are
    sorted by expert, so each expert runs one matmul over all its tokens (grouped); each
    token's terms are added in ascending expert order, as transformers adds them."""
    T, K = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // K
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    xs = x[token]
    out = torch.empty_like(xs)
    f, inter, start = activation(act), down.shape[2], 0
    for e, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            gate, up = F.linear(xs[rows], gate_up[e]).split([inter, inter], dim=-1)
            out[rows] = F.linear(f(gate) * up, down[e])
            start += n
    out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)
