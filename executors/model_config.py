"""config.json -> one typed, hashable description of a model: the only parser of config.json.

The torch models, the torch loader and the JAX runner all read the checkpoint's config
through `ModelConfig.from_hf`, so they cannot disagree about a field (issue 16 item 3:
they used to: JAX applied a Llama `attention_bias` checkpoint's o_proj bias, torch
dropped it). What we cannot run is refused here, by name, before any weight is read:
a `quantization_config` (its scales would be dropped and the output garbage), an
unknown rope type, an activation the family does not implement.

Both config layouts are read: transformers < 5 writes `rope_theta` / `rope_scaling`,
transformers >= 5 one `rope_parameters` dict (per layer type for Gemma 3).

Standard library only: the JAX runner imports this without torch.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Checkpoint tensors that are not weights and are skipped on load; any other tensor
# that matches no parameter is an error (it would otherwise be silently dropped).
# - rotary inv_freq caches: old transformers saved the RoPE frequencies as a buffer;
#   we compute them from config.json.
IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

ROPE_TYPES = ("default", "linear", "llama3")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind: base theta and an optional scaling."""

    theta: float = 10000.0
    kind: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3

    @classmethod
    def parse(cls, params: dict[str, Any] | None, theta: float) -> "RopeConfig":
        p = dict(params or {})
        theta = float(p.pop("rope_theta", theta))
        kind = p.get("rope_type", p.get("type")) or "default"
        if kind not in ROPE_TYPES:
            raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if kind == "default":
            return cls(theta=theta)
        if kind == "linear":
            return cls(theta=theta, kind=kind, factor=float(p["factor"]))
        return cls(theta=theta, kind=kind, factor=float(p["factor"]),
                   low_freq_factor=float(p.get("low_freq_factor", 1.0)), high_freq_factor=float(p.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=int(p.get("original_max_position_embeddings", 8192)))


@dataclass(frozen=True)
class ModelConfig:
    """What our models need from config.json (hashable: a jit static argument in JAX)."""

    arch: str  # config.json's architectures[0]
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int  # capped to a Mistral/Qwen window (see _window)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3, Gemma 3)
    # Gemma family
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + w)
    embed_scale: float | None = None  # embeddings multiplied by sqrt(hidden_size)
    sandwich_norm: bool = False  # extra norms after attention and around the MLP
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None  # keys this far back or more are not seen (on SLIDING layers)
    layer_types: tuple[str, ...] = ()  # FULL / SLIDING per layer
    rope_local: RopeConfig | None = None  # rotary of SLIDING layers when it differs (Gemma 3)
    # Mixture of experts (Qwen3-MoE)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()  # per layer: a sparse MoE block (else a dense MLP)

    # -- compatibility names used by the runners --------------------------------
    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    @property
    def qkv_out(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window_of(self, layer: int) -> int | None:
        """The attention window of `layer` (None: full attention)."""
        if self.layer_types and self.layer_types[layer] == SLIDING:
            return self.sliding_window
        return None

    def rope_of(self, layer: int) -> RopeConfig:
        if self.rope_local is not None and self.layer_types and self.layer_types[layer] == SLIDING:
            return self.rope_local
        return self.rope

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> "ModelConfig":
        return cls.from_hf(read_config_json(model_dir))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        from aiosched.executors.model_registry import check_architecture, family_of  # each family's parser

        arch = check_architecture(cfg)
        _refuse_quantization(cfg)
        return family_of(arch)(cfg, arch)


def read_config_json(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"model: {model_dir} has no config.json")
    with open(path) as f:
        return json.load(f)


def _refuse_quantization(cfg: dict[str, Any]) -> None:
    """We run no quantized format: loading one would cast packed or fp8 values and drop their scales."""
    q = cfg.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else q
        raise ValueError(f"quantization {method!r} is not supported (config.json: quantization_config)")


# ---------------------------------------------------------------------------
# Family parsers (the registry maps each architecture to one)
# ---------------------------------------------------------------------------


def _rope_sources(cfg: dict[str, Any]) -> tuple[dict[str, Any] | None, float]:
    """(scaling-or-parameters dict, theta) from either layout."""
    params = cfg.get("rope_parameters")
    theta = float(cfg.get("rope_theta", 10000.0))
    if isinstance(params, dict):
        return params, theta
    return cfg.get("rope_scaling"), theta


def _common(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return dict(
        arch=arch, model_type=str(cfg.get("model_type", "")), vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _activation(cfg: dict[str, Any], supported: tuple[str, ...], default: str) -> str:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or default
    if act not in supported:
        raise ValueError(f"config.json: hidden_act {act!r} is not supported for {cfg['architectures'][0]} (supported: {', '.join(supported)})")
    return str(act)


def _capped_window(cfg: dict[str, Any], arch: str) -> int | None:
    """Mistral (when set) and Qwen (only with `use_sliding_window`) attend within a window
    on every layer. We serve such a model only up to its window, where full attention is
    exact: max_position_embeddings (hence max_model_len) is capped to it."""
    window = cfg.get("sliding_window", 4096 if arch == "MistralForCausalLM" else None)  # HF's defaults
    if not window:
        return None
    if arch != "MistralForCausalLM" and not cfg.get("use_sliding_window", False):
        return None
    return int(window)


def parse_llama(cfg: dict[str, Any], arch: str) -> ModelConfig:
    """Llama, Mistral, Qwen2, Qwen3 and Qwen3-MoE: biases as HF's modules have them."""
    base = _common(cfg, arch)
    scaling, theta = _rope_sources(cfg)
    attention_bias = bool(cfg.get("attention_bias", False))
    # HF: Llama's attention_bias covers q/k/v/o and mlp_bias gate/up/down; Qwen2 always has
    # q/k/v bias and never o; Qwen3 takes attention_bias for q/k/v/o; Mistral has none.
    qkv_bias = {"LlamaForCausalLM": attention_bias, "Qwen2ForCausalLM": True, "Qwen3ForCausalLM": attention_bias,
                "Qwen3MoeForCausalLM": attention_bias}.get(arch, False)
    o_bias = attention_bias and arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    mlp_bias = bool(cfg.get("mlp_bias", False)) and arch == "LlamaForCausalLM"
    window = _capped_window(cfg, arch)
    if window:
        base["max_position_embeddings"] = min(base["max_position_embeddings"], window)
    moe: dict[str, Any] = {}
    if arch == "Qwen3MoeForCausalLM":
        step = int(cfg.get("decoder_sparse_step", 1))
        dense = set(cfg.get("mlp_only_layers") or [])
        n = int(cfg.get("num_experts", 0))
        moe = dict(num_experts=n, num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                   moe_intermediate_size=int(cfg["moe_intermediate_size"]), norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                   moe_layers=tuple(i not in dense and n > 0 and (i + 1) % step == 0 for i in range(base["num_layers"])))
    return ModelConfig(**base, rope=RopeConfig.parse(scaling, theta), hidden_act=_activation(cfg, ("silu",), "silu"),
                       qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
                       qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"), sliding_window=window, **moe)


def parse_qwen3_moe(cfg: dict[str, Any], arch: str) -> ModelConfig:
    """Qwen3-MoE: Qwen3 attention; sparse MoE blocks on the layers HF makes sparse (every
    `decoder_sparse_step`-th layer not in `mlp_only_layers`), dense MLPs on the others.
    transformers >= 5 saves the expert count as `num_local_experts`, the hub's configs as `num_experts`."""
    n = int(cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0)
    if n <= 0:
        raise ValueError(f"config.json: num_experts must be > 0 for {arch}, got {n}")
    k = int(cfg.get("num_experts_per_tok", 0))
    if not 0 < k <= n:
        raise ValueError(f"config.json: num_experts_per_tok must be in 1..num_experts ({n}), got {k}")
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    layers = int(cfg["num_hidden_layers"])
    dense = {int(i) for i in cfg.get("mlp_only_layers") or []}
    if dense - set(range(layers)):
        raise ValueError(f"config.json: mlp_only_layers {sorted(dense - set(range(layers)))} are not layers of the model")
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError(f"config.json: shared_expert_intermediate_size (a shared expert) is not supported for {arch}")
    base = parse_llama({**cfg, "num_experts": 0}, arch)  # attention, biases, rope, window cap
    return replace(base, num_experts=n, num_experts_per_tok=k, moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                   norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                   moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)))


def parse_phi3(cfg: dict[str, Any], arch: str) -> ModelConfig:
    """Phi-3: Llama layers with fused qkv/gate_up in the checkpoint; a window on every layer."""
    base = _common(cfg, arch)
    scaling, theta = _rope_sources(cfg)
    # transformers >= 5 moves partial_rotary_factor into rope_parameters
    partial = (scaling or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if float(partial if partial is not None else 1.0) != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor {partial} (partial rotary) is not supported for {arch}")
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) in ("su", "longrope"):
        raise ValueError(f"config.json: rope_scaling type {scaling.get('rope_type') or scaling.get('type')!r} "
                         f"(Phi-3 long-context scaling) is not supported for {arch}")
    if isinstance(scaling, dict):
        scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
    window = cfg.get("sliding_window")
    n = base["num_layers"]
    return ModelConfig(**base, rope=RopeConfig.parse(scaling, theta), hidden_act=_activation(cfg, ("silu",), "silu"),
                       sliding_window=int(window) if window else None, layer_types=(SLIDING,) * n if window else ())


def _gemma_layer_types(cfg: dict[str, Any], n: int, pattern: int) -> tuple[str, ...]:
    """config's `layer_types` when written, else HF's default: every `pattern`-th layer full."""
    types = cfg.get("layer_types")
    if types:
        bad = set(types) - {FULL, SLIDING}
        if bad:
            raise ValueError(f"config.json: layer_types {sorted(bad)} are not supported")
        if len(types) != n:
            raise ValueError(f"config.json: layer_types has {len(types)} entries for {n} layers (num_hidden_layers)")
        return tuple(types)
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n))


def parse_gemma(cfg: dict[str, Any], arch: str) -> ModelConfig:
    """Gemma 2 and Gemma 3 (text): (1 + w) norms, GeGLU, soft-capping, alternating windows."""
    base = _common(cfg, arch)
    base["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))
    n = base["num_layers"]
    gemma3 = arch == "Gemma3ForCausalLM"
    params, theta = _rope_sources(cfg)
    if gemma3:
        local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
        if isinstance(params, dict) and FULL in params:  # transformers >= 5: per layer type
            rope, rope_local = RopeConfig.parse(params[FULL], theta), RopeConfig.parse(params.get(SLIDING), local_theta)
        else:
            rope, rope_local = RopeConfig.parse(params, theta), RopeConfig(theta=local_theta)
    else:
        rope, rope_local = RopeConfig.parse(params, theta), None
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"config.json: use_bidirectional_attention is not supported for {arch} (a causal LM is served)")
    if gemma3 and cfg.get("attn_logit_softcapping") is not None:
        # transformers' Gemma 3 attention never applies it: refused rather than guessed.
        raise ValueError("config.json: attn_logit_softcapping is not supported for Gemma3ForCausalLM")
    window = cfg.get("sliding_window")
    pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6 if gemma3 else 2)))
    return ModelConfig(
        **base, rope=rope, rope_local=rope_local,
        hidden_act=_activation(cfg, ("gelu_pytorch_tanh", "gelu"), "gelu_pytorch_tanh"),
        qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=gemma3, norm_unit_offset=True, embed_scale=math.sqrt(base["hidden_size"]), sandwich_norm=True,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or base["head_dim"]),
        attn_logit_softcap=_float_or_none(cfg.get("attn_logit_softcapping")),
        final_logit_softcap=_float_or_none(cfg.get("final_logit_softcapping")),
        sliding_window=int(window) if window else None,
        layer_types=_gemma_layer_types(cfg, n, pattern) if window else (),
    )


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)
