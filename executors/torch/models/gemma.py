"""Gemma 2 and Gemma 3 (text) decoders in torch: Gemma2ForCausalLM, Gemma3ForCausalLM.

What differs from Llama, all read from the shared config (`parse_gemma` in
executors/model_config.py):
- every RMSNorm scales by (1 + w), in float32 (the checkpoint stores w zero-centred);
- "sandwich" norms: the attention output and the MLP output are normed before the
  residual add, and the MLP input has its own norm (pre/post feed-forward norms);
- GeGLU MLP (gelu tanh); embeddings scaled by sqrt(hidden), the constant in the model's dtype;
- attention scale query_pre_attn_scalar ** -0.5; Gemma 2 soft-caps the attention scores
  and the final logits (cap * tanh(x / cap));
- layers alternate full and sliding-window attention (config's layer_types); Gemma 3
  also normalises q and k per head and gives the sliding layers their own rotary base
  (rope_local_base_freq), so its forward carries two rotary tables.

Attention is models/llama.py's (window and softcap are its arguments). The layers take
no fused CUDA kernels yet, so on CUDA these models run their unfused forward without
graphs (`cuda_fast_path = False`).
"""
from __future__ import annotations

import torch
from torch import nn

from aiosched.executors.torch.attention.torch_paged import AttentionMetadata
from aiosched.executors.torch.layers import RMSNorm, RotaryAt, rope_cos_sin
from aiosched.executors.torch.models.llama import MLP, Attention, LlamaForCausalLM, ModelArgs
from aiosched.executors.torch.parallel import SINGLE, TPGroup


class _Addend:
    """Stands in for the residual stream where a block's output is normed before the add
    (Gemma's sandwich norms): the block's `add` is kept as it is."""

    fused = False

    def __init__(self) -> None:
        self.y: torch.Tensor | None = None

    def add(self, y: torch.Tensor) -> None:
        self.y = y


class GemmaDecoderLayer(nn.Module):
    """x + post_attn_norm(attn(input_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x)))."""

    def __init__(self, args: ModelArgs, layer: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, unit_offset=True)
        self.self_attn = Attention(args, layer, tp)
        self.post_attention_layernorm = RMSNorm(h, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, unit_offset=True)
        self.mlp = MLP(args, tp)
        self.post_feedforward_layernorm = RMSNorm(h, eps, unit_offset=True)

    def forward(self, x: torch.Tensor, rope: RotaryAt, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        attn = _Addend()
        self.self_attn(self.input_layernorm(x), rope, meta, k_cache, v_cache, attn)  # type: ignore[arg-type]
        assert attn.y is not None
        x = x + self.post_attention_layernorm(attn.y)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def _check_gemma(args: ModelArgs) -> None:
    if not args.norm_unit_offset or not args.sandwich_norm:
        raise ValueError(f"model: {args.arch} needs a Gemma config (parse_gemma); got one parsed as {args.model_type!r}")


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 / Gemma 3 text: the Llama skeleton (embedding, vocab-parallel head, TP layout)
    with Gemma layers and, for Gemma 3, a second rotary table for the sliding layers."""

    cuda_fast_path = False

    def __init__(self, args: ModelArgs, tp: TPGroup = SINGLE) -> None:
        _check_gemma(args)
        super().__init__(args, tp)
        self.register_buffer("cos_sin_local", torch.empty(0), persistent=False)
        # Per layer: True if it rotates with the local (sliding-layer) table.
        self.local_rope = [args.rope_local is not None and args.rope_of(i) is args.rope_local for i in range(args.num_layers)]

    def make_layer(self, args: ModelArgs, layer: int, tp: TPGroup) -> nn.Module:
        return GemmaDecoderLayer(args, layer, tp)

    def init_rope(self, max_pos: int) -> None:
        super().init_rope(max_pos)
        if self.args.rope_local is not None:
            self.cos_sin_local = rope_cos_sin(self.args.rope_local, self.args.head_dim, max_pos, self.embed_tokens.weight.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states before the final norm (`compute_logits` applies it), unfused."""
        x = self.embed(input_ids)
        ropes = {False: RotaryAt(self.cos_sin, positions)}
        if any(self.local_rope):
            ropes[True] = RotaryAt(self.cos_sin_local, positions)
        for layer, local, (kc, vc) in zip(self.layers, self.local_rope, kv_caches):
            x = layer(x, ropes[local], meta, kc, vc)
        return x


# The registry names one class per architecture; both are this one model (the config says which variant).
Gemma2ForCausalLM = GemmaForCausalLM
Gemma3ForCausalLM = GemmaForCausalLM
