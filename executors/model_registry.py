"""Model architectures by the `architectures` name in a checkpoint's config.json (torch and JAX runners)."""
from __future__ import annotations

from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def check_architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError("config.json: 'architectures' is missing; supported: " + ", ".join(SUPPORTED_ARCHITECTURES))
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"config.json: architecture {archs[0]!r} is not supported; supported: " + ", ".join(SUPPORTED_ARCHITECTURES))
    return archs[0]
