"""Model runners by name; imported lazily so torch/jax load only when used."""
from __future__ import annotations

import importlib

from aiosched.config import EngineConfig
from executors.runner import ModelRunner

_RUNNERS = {
    "torch": "executors.runners.torch_runner:TorchModelRunner",
    "jax": "executors.runners.jax_runner:JaxModelRunner",
    "fake": "executors.runners.fake_runner:FakeModelRunner",
}


def create_runner(config: EngineConfig, rank: int = 0, world_size: int = 1) -> ModelRunner:
    try:
        module, _, attr = _RUNNERS[config.runner].partition(":")
    except KeyError:
        raise ValueError(f"runner: unknown runner {config.runner!r}; known: {sorted(_RUNNERS)}") from None
    cls = getattr(importlib.import_module(module), attr)
    return cls(config, rank=rank, world_size=world_size)
