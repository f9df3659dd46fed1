"""The `aiosched` command line, run as a user runs it (subprocess) where it matters.

serve MODEL positional, -tp, --version, help text from the config comments, --dtype
half, dtype auto from config.json; chat (stdin piped), generate from stdin / --json / -n
and no default prompt; start-up checks that refuse in one line instead of a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiosched import AsyncEngine, EngineConfig
from aiosched.cli import _resolve_model_tag, build_parser
from aiosched.preflight import available_memory
from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--num-kv-blocks", "64", "--block-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("cli-model"), seed=2)


def aiosched(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "aiosched", *args], input=stdin if stdin is not None else "", capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one `error: ...` line and no traceback."""
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# ---------------------------------------------------------------- parsing and help


def parse(*argv: str):
    args = build_parser().parse_args(list(argv))
    _resolve_model_tag(args)
    return args


def test_serve_takes_the_model_as_a_positional() -> None:
    assert parse("serve", "/models/m", "--port", "9000").model == "/models/m"
    assert parse("serve", "--model", "/models/m").model == "/models/m"
    assert parse("serve", "/models/m", "--model", "/models/m").model == "/models/m"
    with pytest.raises(ValueError, match="model: given twice"):
        parse("serve", "/models/a", "--model", "/models/b")


def test_tp_alias_and_dtype_half() -> None:
    args = parse("generate", "x", "-tp", "2", "--dtype", "half")
    assert args.tensor_parallel_size == 2 and args.dtype == "float16"
    assert parse("serve", "--tensor-parallel-size", "4").tensor_parallel_size == 4
    with pytest.raises(SystemExit):
        parse("generate", "x", "--dtype", "int4")
    assert EngineConfig(dtype="half").dtype == "float16"


def test_version() -> None:
    res = aiosched("--version")
    assert res.returncode == 0 and res.stdout.strip().startswith("aiosched 0.")


def test_help_shows_the_config_comments_and_choices() -> None:
    res = aiosched("serve", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())  # argparse wraps lines
    assert "{auto,float32,bfloat16,float16}" in text and "{torch,jax,fake}" in text and "{auto,random}" in text
    assert "tokens per KV cache block (a power of two) (default: 16)" in text  # block_size's comment in config.py
    assert "--tensor-parallel-size TENSOR_PARALLEL_SIZE, -tp TENSOR_PARALLEL_SIZE" in text
    assert "engine: kv cache:" in text  # flags grouped by the config's sections
    assert "MODEL the model directory (same as --model)" in text


def test_dtype_auto_follows_the_checkpoint_on_cuda(tmp_path: Path) -> None:
    for declared, key, expect in (("float16", "torch_dtype", "float16"), ("bfloat16", "dtype", "bfloat16"), ("float32", "torch_dtype", "bfloat16")):
        d = tmp_path / f"{declared}-{key}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({key: declared}))
        assert EngineConfig(model=str(d), device="cuda").resolved_dtype == expect
        assert EngineConfig(model=str(d), device="cpu").resolved_dtype == "float32"
        assert EngineConfig(model=str(d), device="cuda", dtype="float32").resolved_dtype == "float32"


# ---------------------------------------------------------------- generate


def test_generate_reads_stdin_and_prints_json(model_dir: Path) -> None:
    res = aiosched("generate", "-", "--json", "-n", "2", "--temperature", "1.0", "--seed", "3", "--max-tokens", "5", "--ignore-eos",
                   "--model", str(model_dir), *SMALL, stdin="def fibonacci(n):\n")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["prompt"] == "def fibonacci(n):"
    assert [o["index"] for o in out["outputs"]] == [0, 1]
    assert all(len(o["token_ids"]) == 5 and o["finish_reason"] == "length" for o in out["outputs"])
    assert out["completion_tokens"] == 10 and out["prompt_tokens"] > 0


def test_generate_without_a_prompt_is_an_error() -> None:
    assert "prompt: give a prompt, or '-'" in one_error_line(aiosched("generate"))
    assert "prompt: must not be empty (stdin was empty)" in one_error_line(aiosched("generate", "-", stdin=""))


# ---------------------------------------------------------------- chat


def test_chat_over_piped_stdin(model_dir: Path) -> None:
    """Two turns and a /reset: each reply is what the engine gives for the templated history."""
    res = aiosched("chat", "--model", str(model_dir), "--system", "be brief", "--max-tokens", "6", "--ignore-eos", *SMALL,
                   stdin="hello\nhow are you\n/reset\nhello\n")
    assert res.returncode == 0, res.stderr[-3000:]
    replies = res.stdout.split("\n")[:3]
    assert "> " not in res.stdout  # no prompt decoration when stdin is not a terminal

    from aiosched.llm import LLM
    from aiosched.sampling_params import SamplingParams

    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with LLM(model=str(model_dir), num_kv_blocks=64, block_size=4) as llm:
        sys_msg = {"role": "system", "content": "be brief"}
        first = llm.chat([sys_msg, {"role": "user", "content": "hello"}], p)[0].text
        second = llm.chat([sys_msg, {"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                           {"role": "user", "content": "how are you"}], p)[0].text
    assert replies == [first, second, first]  # after /reset the history starts over


# ---------------------------------------------------------------- start-up checks (issue 16, item 4)


def test_serve_nonexistent_model_is_one_line() -> None:
    line = one_error_line(aiosched("serve", "/nonexistent/model", "--port", "0"))
    assert "model: /nonexistent/model does not exist" in line
    line = one_error_line(aiosched("generate", "x", "--model", "/nonexistent/model"))
    assert "model: /nonexistent/model does not exist" in line


def test_cuda_on_cpu_only_torch_is_one_line(model_dir: Path) -> None:
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    line = one_error_line(aiosched("serve", "--model", str(model_dir), "--device", "cuda"))
    assert line.startswith("error: device: 'cuda' needs a CUDA build of torch") and "CPU-only" in line


def test_max_model_len_above_the_positions_is_refused(model_dir: Path) -> None:
    line = one_error_line(aiosched("generate", "x", "--model", str(model_dir), "--max-model-len", "5000"))
    assert "max_model_len: 5000 exceeds the model's max_position_embeddings (1024" in line


def test_kv_budget_above_free_memory_is_refused(model_dir: Path) -> None:
    avail = available_memory()
    assert avail is not None
    blocks = str(int(avail // (2 * 2 * 4 * 2 * 16 * 4)) * 2)  # twice what fits: layers 2, block 4, kv heads 2, head dim 16, fp32
    line = one_error_line(aiosched("serve", "--model", str(model_dir), "--num-kv-blocks", blocks, "--block-size", "4"))
    assert line.startswith("error: num_kv_blocks: the KV cache needs") and "of memory is available; lower num_kv_blocks" in line
    gb = str(round(avail / 2**30 * 2 + 1))
    line = one_error_line(aiosched("generate", "x", "--model", str(model_dir), "--kv-cache-memory-gb", gb, "--max-num-seqs", "100000"))
    assert line.startswith("error: kv_cache_memory_gb: the KV cache needs")


async def test_the_library_gets_the_same_checks(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_model_len: 5000 exceeds"):
        await AsyncEngine(EngineConfig(model=str(model_dir), max_model_len=5000)).start()
    with pytest.raises(ValueError, match="model: .* does not exist"):
        await AsyncEngine(EngineConfig(model=str(model_dir / "nope"))).start()
    eng = AsyncEngine(EngineConfig(model=str(model_dir), max_model_len=1024, num_kv_blocks=16))
    async with eng:  # at the limit is fine
        assert eng.info is not None and eng.info.max_model_len == 1024
