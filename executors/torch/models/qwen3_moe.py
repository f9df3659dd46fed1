"""Qwen3-MoE (Qwen3MoeForCausalLM) in torch: Qwen3 attention (per-head q/k norms), and on
the sparse layers a mixture of experts in place of the MLP.

The MoE block: a router (`mlp.gate`, [E, H]) scores every expert per token; the top
`num_experts_per_tok` by softmax probability are kept (renormalised to sum to 1 when
`norm_topk_prob`), and the token's output is the weighted sum of those experts' SwiGLU
MLPs. Which layers are sparse comes from the config (`decoder_sparse_step`,
`mlp_only_layers`; the others have a dense MLP of `intermediate_size`).

Expert weights are stacked per layer, as transformers >= 5 holds them:
`mlp.experts.gate_up_proj` [E, 2 * moe_intermediate, H] (gate rows first) and
`mlp.experts.down_proj` [E, H, moe_intermediate]. Hub checkpoints store one matrix per
expert (`mlp.experts.{e}.gate_proj.weight`, ...); the loader writes each into its slot.

The experts run grouped (the tokens of one expert in one matmul): on CUDA the Triton
kernel of executors/torch/moe_triton.py, elsewhere the torch reference
(`layers.grouped_experts`). Tensor parallelism is refused by name (the experts are not
sharded). On CUDA the model runs its unfused forward without graphs (`cuda_fast_path = False`).
"""
from __future__ import annotations

import torch
from torch import nn

from aiosched.executors.torch.attention.torch_paged import AttentionMetadata
from aiosched.executors.torch.layers import Residual, RMSNorm, RotaryAt, grouped_experts, route_topk
from aiosched.executors.torch.models.llama import MLP, Attention, LlamaForCausalLM, ModelArgs
from aiosched.executors.torch.parallel import SINGLE, TPGroup


class Experts(nn.Module):
    """The stacked expert weights of one layer and the grouped computation over them."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        e, h, i = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act = args.hidden_act

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # Triton only where it runs (CPU workers never import it)
            from aiosched.executors.torch import moe_triton

            if moe_triton.available(x, self.act):
                return moe_triton.fused_experts(x, self.gate_up_proj, self.down_proj, expert_ids, weights, self.act)
        return grouped_experts(x, self.gate_up_proj, self.down_proj, expert_ids, weights, self.act)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k, self.renormalize = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)  # the router
        self.experts = Experts(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_topk(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, ids, weights)


class MoeDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp: nn.Module = SparseMoeBlock(args) if args.moe_layers[layer] else MLP(args, tp)

    def forward(self, stream: Residual, rope: RotaryAt, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.self_attn(stream.normed(self.input_layernorm), rope, meta, k_cache, v_cache, stream)
        if isinstance(self.mlp, SparseMoeBlock):
            stream.add(self.mlp(stream.normed(self.post_attention_layernorm)))
        else:
            self.mlp.add_into(stream, self.post_attention_layernorm)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    cuda_fast_path = False

    def __init__(self, args: ModelArgs, tp: TPGroup = SINGLE) -> None:
        if tp.world_size > 1:
            raise ValueError(f"tensor_parallel_size = {tp.world_size} is not supported for {args.arch} "
                             "(the experts are not sharded); use tensor_parallel_size = 1")
        if args.num_experts <= 0 or len(args.moe_layers) != args.num_layers:
            raise ValueError(f"model: {args.arch} needs a MoE config (parse_qwen3_moe); num_experts = {args.num_experts}")
        super().__init__(args, tp)

    def make_layer(self, args: ModelArgs, layer: int, tp: TPGroup) -> nn.Module:
        return MoeDecoderLayer(args, layer, tp)
