"""Layer primitives shared by the torch models (executors/torch/models/*).

Each family file composes these; a variant (Gemma's (1 + w) norm, GeGLU, soft-capping,
llama3 RoPE scaling) is a constructor argument here, not a copy of a layer in a model.
Numerics follow transformers' modules (norms in float32, rotary frequencies in float64
then float32) so a tiny float32 checkpoint gives HF's greedy tokens.

Tensor parallelism: column-parallel layers are plain `nn.Linear` holding this rank's
rows (the loader slices them, see `ShardSpec` in models/llama.py); `RowParallelLinear`
sums the ranks' partial products and adds its bias once, after the sum.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aiosched.executors.model_config import RopeConfig
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


# ---------------------------------------------------------------------------
# Linear layers, activations, MLPs
# ---------------------------------------------------------------------------


class RowParallelLinear(nn.Linear):
    """Input columns split over the ranks: partial products are summed, then the bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce_(F.linear(x, self.weight), self.tp)
        return out if self.bias is None else out + self.bias


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
        self.gate_up_proj = nn.Linear(hidden, 2 * self.inter, bias=bias)
        self.down_proj = RowParallelLinear(self.inter, hidden, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(self.act(gate) * up)


# ---------------------------------------------------------------------------
# Embedding scaling, soft-capping
# ---------------------------------------------------------------------------


def scale_embedding(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Gemma multiplies embeddings by sqrt(hidden), the constant rounded to x's dtype first (as HF)."""
    return x if scale is None else x * torch.tensor(scale, dtype=x.dtype, device=x.device)


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
