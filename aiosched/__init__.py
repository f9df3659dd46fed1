"""aiosched: an asyncio-native LLM inference engine."""
from aiosched.config import EngineConfig
from aiosched.engine import AsyncEngine
from aiosched.errors import EngineDeadError, EngineNotRunningError, EngineOverloadedError
from aiosched.llm import LLM
from aiosched.outputs import RequestOutput
from aiosched.sampling_params import SamplingParams, StructuredOutputParams

__all__ = ["AsyncEngine", "LLM", "EngineConfig", "SamplingParams", "StructuredOutputParams", "RequestOutput",
           "EngineDeadError", "EngineOverloadedError", "EngineNotRunningError"]
__version__ = "0.1.0"
