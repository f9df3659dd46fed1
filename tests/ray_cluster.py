"""One local Ray instance per test process (2 CPUs, no dashboard, no usage stats), shared by
the Ray tests; loading the Ray Serve examples (also used by benchmarks/ray_prefix_routing.py)."""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

_STARTUP: dict[str, float] = {}


def local_ray() -> Any:
    """Start (once) and return the `ray` module; skip when the `ray` extra is not installed."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        t0 = time.monotonic()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        _STARTUP["ray.init"] = time.monotonic() - t0
    return ray


def free_cpus(ray: Any, want: float = 2.0, timeout: float = 20.0) -> float:
    """Wait until `want` CPUs are free again (placement groups and actors released); what is free."""
    deadline = time.monotonic() + timeout
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= want or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(ray: Any, name: str = "ray_serve_app") -> ModuleType:
    """examples/<name>.py as a module whose code Ray ships to the replicas by value."""
    spec = importlib.util.spec_from_file_location(f"aiosched_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    ray.cloudpickle.register_pickle_by_value(mod)  # examples/ is not on the replicas' path
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
