"""The model-runner contract every runner (torch, JAX, fake) implements.

A runner owns the model, the paged KV cache and each request's worker-side state.
It knows the protocol Structs, never the engine, the server or the transport.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable

from aiosched.config import EngineConfig
from aiosched.protocol import RunnerOutput, SchedulerOutput, WorkerInfo


class PendingOutput(ABC):
    """A step that has been launched; `result()` blocks until its tokens are on the host."""

    @abstractmethod
    def result(self) -> RunnerOutput: ...


class ReadyOutput(PendingOutput):
    """A step whose output is already on the host (CPU runners, empty steps)."""

    def __init__(self, output: RunnerOutput) -> None:
        self._output = output

    def result(self) -> RunnerOutput:
        return self._output


class ModelRunner(ABC):
    # True when `execute` queues the step on an accelerator and calls `on_launched` once the
    # forward is queued: an in-process executor may then hold its caller until that moment
    # (InprocExecutor: the launch is the critical path; CPU runners compute in `execute`).
    launch_handoff = False

    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.on_launched: Callable[[], None] | None = None  # set by the executor; called on the launch thread

    @abstractmethod
    def load(self) -> WorkerInfo:
        """Load weights, allocate the KV cache, return its size and the model's limits."""

    @abstractmethod
    def execute(self, output: SchedulerOutput) -> PendingOutput:
        """Apply the diff, launch the step and return without waiting for the device.

        Steps are launched in submission order; a step may read tokens sampled by the
        previous one (still on the device)."""

    def shutdown(self) -> None:
        """Release device memory and any process groups."""


# Runners by name, imported lazily so torch/jax load only in the worker that uses them.
_RUNNERS = {
    "torch": "aiosched.executors.torch.runner:TorchModelRunner",
    "jax": "aiosched.executors.jax.runner:JaxModelRunner",
    "fake": "aiosched.executors.fake_runner:FakeModelRunner",
}


def create_runner(config: EngineConfig, rank: int = 0, world_size: int = 1) -> ModelRunner:
    try:
        module, _, attr = _RUNNERS[config.runner].partition(":")
    except KeyError:
        raise ValueError(f"runner: unknown runner {config.runner!r}; known: {sorted(_RUNNERS)}") from None
    cls = getattr(importlib.import_module(module), attr)
    return cls(config, rank=rank, world_size=world_size)
