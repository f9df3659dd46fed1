"""What an operator reads in the logs: one startup line, --log-level, opt-in request logs,
and the periodic throughput / queue line (as vLLM's "Avg prompt throughput ...")."""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiosched import SamplingParams
from aiosched.engine_log import StatsLogger, configure_logging
from tests.tiny_model import _write_tokenizer_only

ROOT = Path(__file__).resolve().parents[1]
P = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    _write_tokenizer_only(d, max_model_len=256)
    return d


def cfg(tok_dir: Path, **kw) -> dict:
    return dict(runner="fake", model=str(tok_dir), num_kv_blocks=64, block_size=4, max_num_batched_tokens=64, **kw)


async def test_one_startup_line_names_everything(make_engine, tok_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiosched")
    async with make_engine(**cfg(tok_dir, log_stats_interval_s=0)):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "aiosched.engine"]
    assert len(lines) == 1, lines
    line = lines[0]
    for part in (f"model {tok_dir} (LlamaForCausalLM)", "dtype none", "device cpu", "executor inproc", "runner fake",
                 "KV cache 64 blocks = 256 tokens (block size 4)", "max_model_len 256", "CUDA graphs captured 0", "ready in "):
        assert part in line, (part, line)


async def test_request_logs_are_opt_in(make_engine, tok_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiosched")
    async with make_engine(**cfg(tok_dir, log_stats_interval_s=0)) as eng:
        await eng.generate([5, 6, 7], P, request_id="quiet")
    assert not [r for r in caplog.records if r.name == "aiosched.requests"]
    async with make_engine(**cfg(tok_dir, log_stats_interval_s=0, log_requests=True)) as eng:
        await eng.generate([5, 6, 7], SamplingParams(max_tokens=6, temperature=0.5, seed=1, ignore_eos=True), request_id="loud")
    msgs = [r.getMessage() for r in caplog.records if r.name == "aiosched.requests"]
    assert len(msgs) == 2
    assert msgs[0].startswith("request loud: received, prompt 3 tokens, params: ") and "temperature=0.5" in msgs[0] and "seed=1" in msgs[0]
    assert msgs[1].startswith("request loud: finished (length), prompt 3 tokens, 6 generated, queue ") and "ttft" in msgs[1]


async def test_periodic_stats_line(make_engine, tok_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiosched")
    async with make_engine(**cfg(tok_dir, log_stats_interval_s=0.05)) as eng:
        stats = eng.stats_logger
        assert isinstance(stats, StatsLogger)
        assert stats not in eng._observers  # it reads the engine's counters: no per-output call
        assert stats.line() is None  # idle: nothing to say
        await asyncio.gather(*[eng.generate([5, 6, 7, 8], P) for _ in range(3)])
        assert stats.prompt_tokens == 12
        # The task's next tick comes before this sleep ends (earlier timer), and tokens
        # were generated since its last line: it must log one.
        await asyncio.sleep(0.2)
        assert stats.line() is None, "the task already reported this interval"
    lines = [r.getMessage() for r in caplog.records if r.name == "aiosched.stats"]
    assert len(lines) >= 1
    first = lines[0]
    assert first.startswith("Avg prompt throughput: ") and "Avg generation throughput: " in first
    for part in ("Running: ", "Waiting: ", "KV cache usage: ", "Prefix cache hit rate: ", "Preemptions: "):
        assert part in first
    assert "Avg generation throughput: 0.0 tokens/s" not in lines[0]


def test_log_level_configures_aiosched_loggers(tok_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "aiosched", "generate", "x", "--runner", "fake", "--model", str(tok_dir), "--max-tokens", "2",
            "--num-kv-blocks", "32", "--block-size", "4"]
    info = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    quiet = subprocess.run(base + ["--log-level", "warning"], capture_output=True, text=True, timeout=120, env=env)
    assert info.returncode == 0 and quiet.returncode == 0, info.stderr + quiet.stderr
    assert "INFO aiosched.engine: ready in" in info.stderr
    assert "aiosched.engine" not in quiet.stderr
    bad = subprocess.run(base + ["--log-level", "loud"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "invalid choice: 'loud'" in bad.stderr


def test_configure_logging_does_not_duplicate_handlers() -> None:
    root = logging.getLogger("aiosched")
    saved = (list(root.handlers), root.level, root.propagate)
    restore = configure_logging("debug")
    try:
        configure_logging("warning")
        assert sum(getattr(h, "_aiosched", False) for h in root.handlers) == 1
        assert root.level == logging.WARNING and root.propagate is False
        with pytest.raises(ValueError, match="log-level"):
            configure_logging("chatty")
    finally:
        restore()
    assert (list(root.handlers), root.level, root.propagate) == saved, "restore() puts the logger back as it was"
