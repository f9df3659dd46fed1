"""One local Ray instance per test process (2 CPUs, no dashboard, no usage stats), shared by the Ray tests."""
from __future__ import annotations

import os
import time
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
