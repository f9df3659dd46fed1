"""Model architectures by the `architectures` name in a checkpoint's config.json.

One line per architecture: its config parser (`aiosched.executors.model_config`), the torch
class and the JAX implementation (None: the JAX runner refuses it by name). Classes are
named as import strings so this module stays importable without torch or jax.
Adding a family is one file in executors/torch/models/ plus a line here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ModelEntry:
    parser: str  # function name in aiosched.executors.model_config: (cfg dict, arch) -> ModelConfig
    torch_class: str  # "module:Class"
    jax_impl: str | None  # module of the JAX forward/load functions; None: not supported by the jax runner


_LLAMA = "aiosched.executors.torch.models.llama:LlamaForCausalLM"
_JAX_LLAMA = "aiosched.executors.jax.llama"
REGISTRY: dict[str, ModelEntry] = {
    "LlamaForCausalLM": ModelEntry("parse_llama", _LLAMA, _JAX_LLAMA),
    "MistralForCausalLM": ModelEntry("parse_llama", _LLAMA, _JAX_LLAMA),
    "Qwen2ForCausalLM": ModelEntry("parse_llama", _LLAMA, _JAX_LLAMA),
    "Qwen3ForCausalLM": ModelEntry("parse_llama", _LLAMA, _JAX_LLAMA),
    "Gemma2ForCausalLM": ModelEntry("parse_gemma", "aiosched.executors.torch.models.gemma:Gemma2ForCausalLM", _JAX_LLAMA),
    "Gemma3ForCausalLM": ModelEntry("parse_gemma", "aiosched.executors.torch.models.gemma:Gemma3ForCausalLM", _JAX_LLAMA),
    "Phi3ForCausalLM": ModelEntry("parse_phi3", "aiosched.executors.torch.models.phi3:Phi3ForCausalLM", _JAX_LLAMA),
    "Qwen3MoeForCausalLM": ModelEntry("parse_qwen3_moe", "aiosched.executors.torch.models.qwen3_moe:Qwen3MoeForCausalLM", _JAX_LLAMA),
}
SUPPORTED_ARCHITECTURES = tuple(REGISTRY)


def _entry(arch: str) -> ModelEntry:
    if arch not in REGISTRY:
        raise ValueError(f"config.json: architecture {arch!r} is not supported; supported: " + ", ".join(SUPPORTED_ARCHITECTURES))
    return REGISTRY[arch]


def check_architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError("config.json: 'architectures' is missing; supported: " + ", ".join(SUPPORTED_ARCHITECTURES))
    _entry(archs[0])
    return str(archs[0])


def family_of(arch: str) -> Callable[[dict[str, Any], str], Any]:
    """The config parser of `arch`."""
    from aiosched.executors import model_config

    return getattr(model_config, _entry(arch).parser)


def torch_model_class(arch: str) -> type:
    module, name = _entry(arch).torch_class.split(":")
    return getattr(importlib.import_module(module), name)


def check_jax_supported(arch: str) -> None:
    if _entry(arch).jax_impl is None:
        raise ValueError(f"model: architecture {arch!r} is not supported by the jax runner (use runner = 'torch'); "
                         "jax runs: " + ", ".join(a for a, e in REGISTRY.items() if e.jax_impl))
