"""Llama-family decoder in torch: Llama 2/3 (llama3 RoPE scaling, attention_bias and
mlp_bias), Mistral, Qwen2 (qkv bias), Qwen3 (per-head q/k RMSNorm), GQA, tied embeddings.
Built on the shared primitives of `aiosched.executors.torch.layers`; the other families
(Gemma, Phi-3, Qwen3-MoE) reuse its attention and subclass the model.

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

from dataclasses import dataclass

import torch
from torch import nn

from aiosched.executors.model_config import ModelConfig
from aiosched.executors.torch.attention.torch_paged import AttentionMetadata, paged_attention
from aiosched.executors.torch import fused_ops
from aiosched.executors.torch.layers import (GatedMLP, Linear, PackedWeight, Residual, RMSNorm, RotaryAt, RowParallelLinear,
                                             linear, rope_and_store, rope_cos_sin, scale_embedding, skinny_qkv_enabled,
                                             skinny_rows, softcap)
from aiosched.executors.torch.parallel import SINGLE, TPGroup, all_gather, all_reduce_, shard_range


# The model's description: one parser for torch and JAX (executors/model_config.py).
ModelArgs = ModelConfig


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


class Attention(nn.Module):
    """GQA self-attention over the paged cache; the variants (biases, q/k norms, Gemma's
    scale, soft-capping and sliding window) come from the config and the layer index."""

    def __init__(self, args: ModelArgs, layer: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        # This rank's heads: rank r has query heads r*nh/N.. and kv heads r*nkv/N.., which
        # keeps every query head with its GQA kv head (nh/N = groups * nkv/N).
        self.nh, self.nkv, self.hd = args.num_heads // tp.world_size, args.num_kv_heads // tp.world_size, args.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.qkv_proj = Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = RowParallelLinear(self.q_size, args.hidden_size, args.o_bias, tp)
        self.q_norm = RMSNorm(self.hd, args.rms_norm_eps, args.norm_unit_offset) if args.qk_norm else None
        self.k_norm = RMSNorm(self.hd, args.rms_norm_eps, args.norm_unit_offset) if args.qk_norm else None
        self.scale = args.attn_scale
        self.window, self.softcap = args.window_of(layer), args.attn_logit_softcap

    def forward(self, x: torch.Tensor, rope: RotaryAt, meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor, stream: Residual) -> None:
        """stream += o_proj(attention(x)); x is the normed stream."""
        self._attend(self.qkv_proj(x), rope, meta, k_cache, v_cache, stream)

    def forward_normed(self, norm: RMSNorm, rope: RotaryAt, meta: AttentionMetadata, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, stream: Residual) -> None:
        """stream += o_proj(attention(norm(stream))). With the skinny-qkv switch, for 1-2 rows on
        a fused step, the norm is the qkv GEMM's prologue (layers.skinny_qkv_enabled)."""
        x = stream.x
        if (skinny_qkv_enabled() and self.qkv_proj.bias is None and not norm.unit_offset and stream.pending is None
                and skinny_rows(x, stream.fused, self.tp)):
            qkv = fused_ops.skinny_linear(x, self.qkv_proj.weight, norm_weight=norm.weight, eps=norm.eps)
        else:
            qkv = self.qkv_proj(stream.normed(norm))
        self._attend(qkv, rope, meta, k_cache, v_cache, stream)

    def _attend(self, qkv: torch.Tensor, rope: RotaryAt, meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor, stream: Residual) -> None:
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = q.view(T, self.nh, self.hd), k.view(T, self.nkv, self.hd), v.view(T, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm.apply(q, meta.fused), self.k_norm.apply(k, meta.fused)  # type: ignore[union-attr]
        q, k = rope_and_store(q, k, v, rope, meta, k_cache, v_cache)  # whole batch before any read
        out = paged_attention(q, k_cache, v_cache, meta, self.scale, self.window, self.softcap)
        self.o_proj.add_into(stream, out.reshape(T, self.q_size))  # row-parallel: sums the partials


def MLP(args: ModelArgs, tp: TPGroup = SINGLE) -> GatedMLP:
    """The dense feed-forward block of the config (SwiGLU / GeGLU, optional biases)."""
    return GatedMLP(args.hidden_size, args.intermediate_size, args.hidden_act, args.mlp_bias, tp)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, tp)

    def forward(self, stream: Residual, rope: RotaryAt, meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> None:
        self.self_attn.forward_normed(self.input_layernorm, rope, meta, k_cache, v_cache, stream)
        self.mlp.add_into(stream, self.post_attention_layernorm)


class LlamaForCausalLM(nn.Module):
    """`args` describes the full model; with `tp.world_size` N each rank builds its 1/N shard.

    What the runner needs of a model class (any family): `cls(args, tp)`, `.args`,
    `.embed_tokens.weight` (dtype, device), `init_rope(max_pos)`,
    `forward(input_ids [T], positions [T], meta, kv_caches) -> hidden [T, H]` (before the
    final norm) and `compute_logits(hidden rows, dtype) -> logits` (final norm, LM head).
    kv_caches: per layer (k, v), each [num_blocks, block_size, kv_heads, head_dim]. On a
    `meta.fused` step the same forward takes the fused kernels and is captured in CUDA
    graphs, so it must read its inputs only from the tensors it is given.

    Other families subclass this and override `make_layer` (and the forward when their
    layers need more than one rotary table)."""

    # On CUDA: its layers take the fused kernels on `meta.fused` steps and its step is
    # captured in graphs (the runner's FastPath). A family without that sets it False.
    cuda_fast_path = True

    def __init__(self, args: ModelArgs, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        check_tp_divisible(args, tp.world_size)
        self.args, self.tp = args, tp
        self.vocab_rows = shard_range(args.vocab_size, tp.rank, tp.world_size, "vocab_size")  # this rank's token ids
        local_vocab = self.vocab_rows.stop - self.vocab_rows.start
        self.embed_tokens = nn.Embedding(local_vocab, args.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(args, i, tp) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_unit_offset)
        self.lm_head = None if args.tie_word_embeddings else Linear(args.hidden_size, local_vocab, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)
        self.head_packed = PackedWeight()  # the LM head (or tied embedding) in oneDNN's layout, CPU float32

    def make_layer(self, args: ModelArgs, layer: int, tp: TPGroup) -> nn.Module:
        return DecoderLayer(args, layer, tp)

    def init_rope(self, max_pos: int) -> None:
        self.cos_sin = rope_cos_sin(self.args.rope, self.args.head_dim, max_pos, self.embed_tokens.weight.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states [T, H] before the final norm (`compute_logits` applies it to the rows it needs)."""
        stream = Residual(self.embed(input_ids), meta.fused)
        rope = RotaryAt(self.cos_sin, positions)
        for layer, (kc, vc) in zip(self.layers, kv_caches):
            layer(stream, rope, meta, kc, vc)
        return stream.flush()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return scale_embedding(self._lookup(input_ids), self.args.embed_scale)

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.active:
            return self.embed_tokens(input_ids)
        # Vocab-parallel: ids outside this rank's rows look up row 0 and are zeroed, so
        # the all-reduce adds exactly one non-zero row per token (exact, no rounding).
        local = input_ids - self.vocab_rows.start
        outside = (local < 0) | (local >= self.embed_tokens.num_embeddings)
        x = self.embed_tokens(local.masked_fill(outside, 0))
        return all_reduce_(x.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)

    def compute_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = torch.float32, fused: bool = False,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocab logits of `forward`'s hidden rows on every rank (TP: this rank's
        columns, then all-gathered): final norm, LM head, soft-capping. float32 unless
        dtype is None (the weights' dtype: a greedy argmax needs no upcast). fused: the
        norm's fused kernel. out: [rows, vocab]
        to write into (a CUDA graph's persistent buffer); the LM head writes it directly
        when no cast, gather or cap follows, else the result is copied there."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        cap = self.args.final_logit_softcap
        dtype = torch.float32 if cap is not None else dtype  # soft-capping in float32 whatever the caller reads
        direct = out if (out is not None and cap is None and not self.tp.active
                         and (dtype is None or dtype == w.dtype) and out.dtype == w.dtype) else None
        # The LM head stays on cuBLAS at every row count: at one row on the H200 it reads the
        # 525 MB weight at 4.11 TB/s against 3.85 for the best skinny config with the norm as
        # prologue (130 vs 136 us with the norm; decode_step.py --tune, 2026-12-03).
        if direct is not None:
            y = torch.mm(self.norm.apply(hidden, fused), w.t(), out=direct)
        else:
            y = linear(self.norm.apply(hidden, fused), w, None, self.head_packed)
        if direct is not None:
            return y
        y = softcap(all_gather(y if dtype is None else y.to(dtype), self.tp, dim=-1), cap)
        return y if out is None else out.copy_(y)
