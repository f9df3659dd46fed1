"""Phi-3 (Phi3ForCausalLM) in torch: Llama layers whose checkpoint already fuses the
projections (`self_attn.qkv_proj` = [q; k; v] rows, `mlp.gate_up_proj` = [gate; up]).

Our Llama modules hold exactly these fused matrices, so the tensors load as they are
(executors/torch/loader.py). Under tensor parallelism a fused checkpoint tensor is split
into its parts (q, k, v / gate, up: `shard_spec` in models/llama.py gives their sizes) and
each part is sharded on its own, so rank r gets its q heads with their kv heads.

Config (`parse_phi3`): the sliding window applies to every layer; partial rotary and
the su / longrope scalings are refused by name. With a window the model runs its unfused
forward on CUDA, without graphs (`cuda_fast_path` False), until the windowed fused path
is verified on a GPU.
"""
from __future__ import annotations

from aiosched.executors.torch.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    @property  # type: ignore[override]
    def cuda_fast_path(self) -> bool:
        return self.args.sliding_window is None
