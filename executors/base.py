"""The executor interface and the registry that picks one by config name."""
from __future__ import annotations

import asyncio
import importlib
from abc import ABC, abstractmethod
from typing import Callable

from aiosched.config import EngineConfig
from aiosched.protocol import RunnerOutput, SchedulerOutput, WorkerInfo


class Executor(ABC):
    """Runs scheduler steps somewhere and hands back futures for their outputs.

    `submit` never blocks the event loop. Steps run in submission order; with
    `max_concurrent_batches == 2` the engine submits step N+1 before awaiting N.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @property
    def max_concurrent_batches(self) -> int:
        return self.config.max_concurrent_batches

    @abstractmethod
    async def start(self) -> WorkerInfo:
        """Start workers, load the model; return the agreed KV size and limits."""

    @abstractmethod
    def submit(self, output: SchedulerOutput) -> "asyncio.Future[RunnerOutput]":
        """Queue a step; the future resolves with its output or an EngineDeadError."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise EngineDeadError if the workers are gone."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop workers and release everything; safe to call twice and after a crash."""


ExecutorFactory = Callable[[EngineConfig], Executor]
_REGISTRY: dict[str, str | ExecutorFactory] = {
    # Lazy imports keep optional dependencies (pyzmq, jax) off the import path.
    "inproc": "aiosched.executors.inproc:InprocExecutor",
    "multiproc": "aiosched.executors.multiproc:MultiprocExecutor",
    "remote": "aiosched.executors.remote:RemoteExecutor",
    "ray": "aiosched.executors.ray_executor:RayExecutor",  # needs the `ray` extra
}


def register_executor(name: str, factory: str | ExecutorFactory) -> None:
    """Register a factory (or a 'module:Class' path) under a config name."""
    _REGISTRY[name] = factory


def create_executor(config: EngineConfig) -> Executor:
    try:
        entry = _REGISTRY[config.executor]
    except KeyError:
        raise ValueError(f"executor: unknown executor {config.executor!r}; known: {sorted(_REGISTRY)}") from None
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry(config)
