"""Llama-family decoder in torch: Llama 2/3 (llama3 RoPE scaling), Mistral, Qwen2 (qkv
bias), Qwen3 (per-head q/k RMSNorm), GQA, tied embeddings.

The input is one flattened ragged batch (no padding): `input_ids[T]`, `positions[T]`
and an attention-metadata object that knows each request's slice and block table.
Attention goes through `aiosched.executors.attention` so the CPU reference and the CUDA
kernels are interchangeable. q/k/v and gate/up are fused into single matmuls at load.

Tensor parallelism (Megatron-style, `tp.world_size` ranks): qkv and gate_up are
column-parallel (each rank holds its heads / its slice of the intermediate size),
o_proj and down_proj row-parallel (partial sums, all-reduced), the embedding and the
LM head vocab-parallel (vocab / N rows each). So a layer costs two all-reduces and a
step one all-gather of the sampled rows' logits. With world_size 1 the modules are
the plain ones and no collective runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aiosched.executors.torch.attention.torch_paged import AttentionMetadata, paged_attention, store_kv
from aiosched.executors.torch.parallel import SINGLE, TPGroup, all_gather, all_reduce_, shard_range


@dataclass
class ModelArgs:
    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None = None  # Mistral v0.1: keys older than this are not seen

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelArgs":
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = archs[0]
        heads = cfg["num_attention_heads"]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias"):
            raise ValueError("config.json: mlp_bias = true is not supported")
        rope_theta, rope_scaling = _rope_config(cfg)
        window = _sliding_window(cfg, arch)
        max_pos = cfg.get("max_position_embeddings", 4096)
        return cls(
            arch=arch,
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # A windowed model is served only up to its window, where full attention is exact.
            max_position_embeddings=min(max_pos, window) if window else max_pos,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window,
        )


def _rope_config(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either layout: transformers < 5 writes `rope_theta` and
    `rope_scaling`; transformers >= 5 writes one `rope_parameters` dict holding both."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(theta), scaling if scaling.get("rope_type", scaling.get("type")) not in (None, "default") else None
    return float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling")


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
    """The attention window, when the model uses one (Mistral when set; Qwen only with
    `use_sliding_window`). `from_hf` caps max_position_embeddings (hence max_model_len)
    to it, which keeps our full attention exact without masking old keys."""
    window = cfg.get("sliding_window", 4096 if arch == "MistralForCausalLM" else None)  # HF's defaults
    if not window:
        return None
    if arch != "MistralForCausalLM" and not cfg.get("use_sliding_window", False):
        return None
    return int(window)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = args.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        factor = rs["factor"]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv = inv / rs["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling: type {kind!r} is not supported")
    return inv


def rope_cos_sin(args: ModelArgs, max_pos: int, device: torch.device | str) -> torch.Tensor:
    """[max_pos, head_dim] float32: cos in the first half, sin in the second."""
    t = torch.arange(max_pos, dtype=torch.float64)
    freqs = torch.outer(t, rope_inv_freq(args))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device=device, dtype=torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama convention). x: [T, H, D]; cos/sin: [T, 1, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def check_tp_divisible(args: ModelArgs, world_size: int) -> None:
    """Raise ValueError naming the config.json field that does not split over the ranks."""
    for field, size in (("num_attention_heads", args.num_heads), ("num_key_value_heads", args.num_kv_heads),
                        ("intermediate_size", args.intermediate_size), ("vocab_size", args.vocab_size)):
        shard_range(size, 0, world_size, field)


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter of the full model is split over the ranks.

    dim: the split dimension (0: output rows, column-/vocab-parallel; 1: input columns,
    row-parallel), None: replicated. parts: for fused matrices, the full sizes of the
    fused tensors along dim 0 (each part is split on its own, so rank r holds its q
    heads, its k heads and its v heads, not a slice of the fused matrix)."""

    dim: int | None
    parts: tuple[int, ...] = ()


def shard_spec(args: ModelArgs, name: str) -> ShardSpec:
    """The split of our parameter `name` (e.g. 'layers.0.self_attn.qkv_proj.weight')."""
    if ".qkv_proj." in name:
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        return ShardSpec(0, (q, kv, kv))
    if ".gate_up_proj." in name:
        return ShardSpec(0, (args.intermediate_size, args.intermediate_size))
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return ShardSpec(1)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return ShardSpec(0)
    return ShardSpec(None)  # norms (incl. per-head q/k norms)


def local_part_rows(spec: ShardSpec, part: int, world_size: int) -> slice:
    """Rows of fused part `part` inside this rank's fused parameter."""
    sizes = [p // world_size for p in spec.parts]
    start = sum(sizes[:part])
    return slice(start, start + sizes[part])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype) if x.dtype != torch.float32 else xf * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        # This rank's heads: rank r has query heads r*nh/N.. and kv heads r*nkv/N.., which
        # keeps every query head with its GQA kv head (nh/N = groups * nkv/N).
        self.nh, self.nkv, self.hd = args.num_heads // tp.world_size, args.num_kv_heads // tp.world_size, args.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.hd, args.rms_norm_eps) if args.qk_norm else None
        self.scale = self.hd**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = q.view(T, self.nh, self.hd), k.view(T, self.nkv, self.hd), v.view(T, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)  # whole batch before any read
        out = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return all_reduce_(self.o_proj(out.reshape(T, self.q_size)), self.tp)  # row-parallel: sum the partials


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.inter = args.intermediate_size // tp.world_size  # this rank's slice
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = nn.Linear(self.inter, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return all_reduce_(self.down_proj(nn.functional.silu(gate) * up), self.tp)  # row-parallel


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, tp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """`args` describes the full model; with `tp.world_size` N each rank builds its 1/N shard."""

    def __init__(self, args: ModelArgs, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        check_tp_divisible(args, tp.world_size)
        self.args, self.tp = args, tp
        self.vocab_rows = shard_range(args.vocab_size, tp.rank, tp.world_size, "vocab_size")  # this rank's token ids
        local_vocab = self.vocab_rows.stop - self.vocab_rows.start
        self.embed_tokens = nn.Embedding(local_vocab, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, tp) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, local_vocab, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def init_rope(self, max_pos: int) -> None:
        self.cos_sin = rope_cos_sin(self.args, max_pos, self.embed_tokens.weight.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = self.embed(input_ids)
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        for layer, (kc, vc) in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, meta, kc, vc)
        return self.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.active:
            return self.embed_tokens(input_ids)
        # Vocab-parallel: ids outside this rank's rows look up row 0 and are zeroed, so
        # the all-reduce adds exactly one non-zero row per token (exact, no rounding).
        local = input_ids - self.vocab_rows.start
        outside = (local < 0) | (local >= self.embed_tokens.num_embeddings)
        x = self.embed_tokens(local.masked_fill(outside, 0))
        return all_reduce_(x.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocab float32 logits on every rank (TP: this rank's columns, then all-gathered)."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return all_gather((hidden @ w.t()).float(), self.tp, dim=-1)
