"""aiosched: an asyncio-native LLM inference engine.

The public names are imported lazily (module `__getattr__`): `import aiosched.protocol`
in a worker process loads msgspec and the config, not the engine, the scheduler,
tokenizers or anyio.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "AsyncEngine": "aiosched.engine",
    "LLM": "aiosched.llm",
    "EngineConfig": "aiosched.config",
    "SamplingParams": "aiosched.sampling_params",
    "StructuredOutputParams": "aiosched.sampling_params",
    "RequestOutput": "aiosched.outputs",
    "EngineDeadError": "aiosched.errors",
    "EngineOverloadedError": "aiosched.errors",
    "EngineNotRunningError": "aiosched.errors",
}
__all__ = list(_PUBLIC)

if TYPE_CHECKING:
    from aiosched.config import EngineConfig
    from aiosched.engine import AsyncEngine
    from aiosched.llm import LLM
    from aiosched.errors import EngineDeadError, EngineNotRunningError, EngineOverloadedError
    from aiosched.outputs import RequestOutput
    from aiosched.sampling_params import SamplingParams, StructuredOutputParams


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'aiosched' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
