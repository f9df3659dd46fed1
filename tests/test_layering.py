"""The dependency rules of docs/architecture.md, enforced.

Each layer is imported in a fresh interpreter and the modules it pulled in are
checked: a stray import (a scheduler that loads torch, a runner that loads the
engine) fails here instead of slowing every worker process down or tying the
layers together unnoticed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "jax", "numpy", "zmq", "anyio", "tokenizers", "starlette", "uvicorn", "llguidance", "safetensors", "transformers"}
FRONT = {"aiosched.engine", "aiosched.server", "aiosched.scheduler", "aiosched.request_stream", "aiosched.cli", "aiosched.bench"}


def _loaded(module: str) -> tuple[set[str], set[str]]:
    """(heavy third-party top-level packages, aiosched modules) loaded by importing `module`."""
    code = (
        "import json, sys, importlib; importlib.import_module(%r); "
        "print(json.dumps(sorted(sys.modules)))" % module
    )
    names = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    heavy = {n.split(".")[0] for n in names} & HEAVY
    ours = {n for n in names if n == "aiosched" or n.startswith("aiosched.")}
    return heavy, ours


@pytest.mark.parametrize("module", ["aiosched", "aiosched.protocol", "aiosched.config", "aiosched.sampling_params"])
def test_wire_and_config_load_msgspec_only(module: str) -> None:
    heavy, ours = _loaded(module)
    assert heavy == set(), f"{module} loads {heavy}"
    assert ours <= {"aiosched", "aiosched.protocol", "aiosched.config", "aiosched.sampling_params"}, ours


@pytest.mark.parametrize("module", ["aiosched.scheduler", "aiosched.async_scheduler", "aiosched.kv_cache"])
def test_scheduler_and_kv_cache_know_no_torch_and_no_executors(module: str) -> None:
    heavy, ours = _loaded(module)
    assert heavy == set(), f"{module} loads {heavy}"
    assert not any(n.startswith("aiosched.executors") for n in ours), ours


def test_engine_reaches_executors_only_through_the_interface() -> None:
    heavy, ours = _loaded("aiosched.engine")
    assert not heavy & {"torch", "jax", "zmq", "numpy"}, heavy
    assert {n for n in ours if n.startswith("aiosched.executors.")} == {"aiosched.executors.base"}


@pytest.mark.parametrize("module", [
    "aiosched.executors.fake_runner",
    "aiosched.executors.torch.runner",
    pytest.param("aiosched.executors.jax.runner", marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("jax") is None, reason="jax not installed")),
])
def test_runners_never_load_engine_server_or_transport(module: str) -> None:
    heavy, ours = _loaded(module)
    assert not ours & FRONT, f"{module} loads {ours & FRONT}"
    assert "zmq" not in heavy and "anyio" not in heavy and "starlette" not in heavy, heavy


def test_worker_loop_does_not_load_the_engine() -> None:
    heavy, ours = _loaded("aiosched.executors.worker_loop")
    assert not ours & FRONT, ours
    assert "torch" not in heavy, "the transport loads a runner only when a session asks for one"


def test_every_package_folder_is_installed_under_the_aiosched_namespace() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {"aiosched.executors": "executors"}
    want = set()
    for top, name in (("aiosched", "aiosched"), ("executors", "aiosched.executors")):
        for src in (ROOT / top).rglob("*.py"):  # a folder of modules without __init__.py would not be installed
            assert (src.parent / "__init__.py").exists(), f"{src.parent} has modules but no __init__.py"
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            want.add(".".join([name, *rel.parts]))
    assert set(cfg["packages"]) == want
    assert not any(p == "executors" or p.startswith("executors.") for p in cfg["packages"])


def test_torch_worker_makes_openmp_waiters_sleep_unless_the_user_chose() -> None:
    """Spinning OpenMP waiters starve the event loop when torch uses every core (issue 23);
    the torch worker asks for passive waiting before torch loads, and keeps a user's choice."""
    code = "import os, aiosched.executors.torch.runner, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    got = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout.strip()
    assert got == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    got = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout.strip()
    assert got == "ACTIVE"
