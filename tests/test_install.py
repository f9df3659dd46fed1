"""The install path (Makefile + tools/install_torch.sh): a machine without a GPU gets the
CPU build of torch from PyTorch's CPU index when it is reachable, and an offline machine
falls back to `pip install torch==VERSION` (a local wheel), never an unpinned torch."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "install_torch.sh"


@pytest.fixture
def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A `python` whose `-m pip ...` only records its arguments (anything else runs the real one)."""
    log = tmp_path / "pip.log"
    exe = tmp_path / "python"
    exe.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then echo "$@" >> {log}; exit 0; fi\nexec {sys.executable} "$@"\n')
    exe.chmod(0o755)
    return exe, log


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_falls_back_to_the_pinned_version(fake_python: tuple[Path, Path]) -> None:
    exe, log = fake_python
    index = f"http://127.0.0.1:{closed_port()}/whl/cpu"
    res = run(str(exe), "2.13.0", "cpu", index)
    assert res.returncode == 0, res.stderr
    assert "is not reachable; falling back to 'pip install torch==2.13.0'" in res.stdout
    assert log.read_text().split("\n")[:-1] == ["-m pip install -q torch==2.13.0"]


def test_reachable_cpu_index_is_used(fake_python: tuple[Path, Path], tmp_path: Path) -> None:
    exe, log = fake_python
    (tmp_path / "site" / "whl" / "cpu" / "torch").mkdir(parents=True)
    (tmp_path / "site" / "whl" / "cpu" / "torch" / "index.html").write_text("<html></html>")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "site"), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
        res = run(str(exe), "2.13.0", "cpu", index)
    finally:
        server.shutdown()
    assert res.returncode == 0, res.stderr
    assert log.read_text().split("\n")[:-1] == [f"-m pip install -q --index-url {index} torch==2.13.0"]


def test_cuda_flavor_and_bad_flavor(fake_python: tuple[Path, Path]) -> None:
    exe, log = fake_python
    assert run(str(exe), "2.13.0", "cuda").returncode == 0
    assert run(str(exe), "2.13.0", "cuda", "https://download.pytorch.org/whl/cu128").returncode == 0
    assert log.read_text().split("\n")[:-1] == ["-m pip install -q torch==2.13.0",
                                                "-m pip install -q --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0"]
    bad = run(str(exe), "2.13.0", "rocm")
    assert bad.returncode == 2 and "TORCH must be cpu or cuda" in bad.stderr


def test_make_setup_installs_torch_through_the_script() -> None:
    def dry(*extra: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
        res = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), ".venv/.installed", *extra], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    default = dry()
    assert "sh tools/install_torch.sh .venv/bin/python 2.13.0 cpu" in default
    assert "pip install -q torch" not in default  # torch only through the script
    order = [ln for ln in default.splitlines() if "install_torch.sh" in ln or "pip install -q -e" in ln]
    assert "install_torch.sh" in order[0] and "-e '.[dev]'" in order[1], "torch before the package, or pip resolves it from PyPI"
    assert "2.13.0 cuda https://download.pytorch.org/whl/cu128" in dry("TORCH=cuda", "TORCH_INDEX=https://download.pytorch.org/whl/cu128")
