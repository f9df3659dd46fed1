"""The CPU benchmarks the issues' numbers come from still run (smallest settings): a
benchmark that broke unnoticed would be found only when a measurement is due."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True, text=True,
                       timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_launch_host_cost_times_the_decode_launch() -> None:
    out = _run("launch_host_cost.py", "--batch", "2,4", "--steps", "4", "--repeats", "1", "--arrivals", "2", "--prompt-len", "8")
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("batch")] == ["batch 2", "batch 4"]
    assert out.splitlines()[-1].startswith("prefill step with 2 arrivals of 8 tokens:")


def test_engine_overhead_on_the_simulated_gpu() -> None:
    out = _run("engine_overhead.py", "--runner", "sim", "--device-ms", "0.5", "--batch", "4", "--output-len", "16",
               "--modes", "async", "--tokenizer", "ids", "--repeats", "1")
    row = out.strip().splitlines()[-1]
    assert row.startswith("|  | 4 | async | ids | 16 |") and "simulated device idle" in row


def test_grammar_parallel_threads_and_processes() -> None:
    pytest.importorskip("llguidance")
    out = _run("grammar_parallel.py", "--rows", "2", "--threads", "1,2", "--hows", "serial,procs", "--steps", "2", "--vocab", "2048")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {(r["how"], r["threads"]) for r in rows} == {("serial", 1), ("procs", 1), ("procs", 2)}
    assert all(r["fill_us_per_step"] > 0 for r in rows)
    assert all("slowest_mask_us_per_step" in r for r in rows if r["how"] == "serial")
