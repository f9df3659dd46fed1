"""Tensor parallelism of the torch runner, on CPU (gloo): TP=2 equals TP=1.

- each rank's parameters are exactly its slice of the full model, and a rank reads
  only its slices from the checkpoint (no process group needed to check that);
- TP=2 through the multiproc executor gives the same tokens as TP=1 in process,
  sync and async, from a checkpoint and from random weights;
- a model that does not split fails at startup naming the field, leaving no process;
  TP > 1 with the inproc executor (one rank) is refused.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from aiosched import SamplingParams
from aiosched.errors import EngineDeadError
from aiosched.executors.torch import loader
from aiosched.executors.torch.loader import build_model
from aiosched.executors.torch.models.llama import LlamaForCausalLM
from aiosched.executors.torch.parallel import shard_range
from aiosched.executors.torch.random_checkpoint import write_random_checkpoint
from procs import children_of, describe, spawned_since, wait_gone

pytestmark = pytest.mark.timeout(120)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_tp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 heads, 2 kv heads, intermediate 128, vocab 482 (the tokenizer's): all divide by 2.
    return write_random_checkpoint(tmp_path_factory.mktemp("tp-llama"), arch="llama", seed=5)


def prompts(n: int) -> list[list[int]]:
    return [[(i * 7 + j * 13) % 480 for j in range(3 + (i * 5) % 17)] for i in range(n)]


def torch_config(model: Path, **kw: Any) -> dict[str, Any]:
    return dict(runner="torch", model=str(model), device="cpu", dtype="float32", num_kv_blocks=48, block_size=4,
                max_num_batched_tokens=64, max_model_len=256, **kw)


async def generate_all(make_engine, cfg: dict[str, Any], ps: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    async with make_engine(**cfg) as eng:
        outs = await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(ps, params)])
    return [o.token_ids for o in outs]


# ---- sharded loading (no process group) ----


def expected_shard(name: str, full: torch.Tensor, model: LlamaForCausalLM, rank: int, world: int) -> torch.Tensor:
    """What rank `rank` must hold of the full parameter `name` (written out independently of the loader)."""
    a = model.args
    half = lambda t, dim: t.chunk(world, dim=dim)[rank]  # noqa: E731
    if ".qkv_proj." in name:
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        return torch.cat([half(p, 0) for p in full.split([q, kv, kv])])
    if ".gate_up_proj." in name:
        return torch.cat([half(p, 0) for p in full.split([a.intermediate_size] * 2)])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return half(full, 1)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return half(full, 0)
    return full


class RecordingSlice:
    """A safetensors slice handle that counts the elements actually read."""

    def __init__(self, handle: Any, counter: list[int]) -> None:
        self._h, self._counter = handle, counter

    def get_shape(self) -> list[int]:
        return self._h.get_shape()

    def __getitem__(self, idx: Any) -> torch.Tensor:
        t = self._h[idx]
        self._counter[0] += t.numel()
        return t


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # untied; qkv bias; tied + q/k norms
def test_each_rank_reads_exactly_its_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    path = write_random_checkpoint(tmp_path / arch, arch=arch, seed=2)
    full = build_model(str(path), "float32", "cpu")
    full_params = dict(full.named_parameters())
    original = loader.iter_tensors
    for rank in range(2):
        read = [0]
        monkeypatch.setattr(loader, "iter_tensors", lambda d: ((n, RecordingSlice(h, read)) for n, h in original(d)))
        shard = build_model(str(path), "float32", "cpu", rank=rank, world_size=2)
        params = dict(shard.named_parameters())
        assert params.keys() == full_params.keys()
        assert (shard.lm_head is None) == (full.lm_head is None) == (arch == "qwen3")
        for name, p in params.items():
            want = expected_shard(name, full_params[name], full, rank, 2)
            assert torch.equal(p, want), name
            if "norm" not in name:
                assert p.numel() * 2 == full_params[name].numel(), f"{name}: {tuple(p.shape)} is not half"
        # Every element read from disk lands in this rank's parameters: nothing else was read.
        assert read[0] == sum(p.numel() for p in params.values())


def test_random_weights_shard_the_full_random_model(tiny_tp_model: Path) -> None:
    full = build_model(str(tiny_tp_model), "float32", "cpu", load_format="random", seed=3)
    full_params = dict(full.named_parameters())
    for rank in range(2):
        shard = build_model(str(tiny_tp_model), "float32", "cpu", load_format="random", seed=3, rank=rank, world_size=2)
        for name, p in shard.named_parameters():
            assert torch.equal(p, expected_shard(name, full_params[name], full, rank, 2)), name


def test_shard_range_names_the_field() -> None:
    assert shard_range(12, 1, 3) == slice(4, 8)
    with pytest.raises(ValueError, match=r"vocab_size \(7\) is not divisible by tensor_parallel_size \(2\)"):
        shard_range(7, 0, 2, "vocab_size")


# ---- TP=2 through the multiproc executor equals TP=1 in process ----


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_tp2_matches_tp1(make_engine, tiny_tp_model: Path, async_scheduling: bool) -> None:
    ps = prompts(6)
    params = [GREEDY] * len(ps)
    tp1 = await generate_all(make_engine, torch_config(tiny_tp_model, async_scheduling=async_scheduling), ps, params)
    tp2 = await generate_all(make_engine, torch_config(tiny_tp_model, async_scheduling=async_scheduling,
                                                       executor="multiproc", tensor_parallel_size=2), ps, params)
    assert all(len(t) == GREEDY.max_tokens for t in tp1)
    assert tp2 == tp1


async def test_tp2_random_weights_match_tp1_greedy_and_seeded(make_engine, tiny_tp_model: Path) -> None:
    ps = prompts(4)
    params = [GREEDY, SamplingParams(max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)] * 2
    cfg = torch_config(tiny_tp_model, load_format="random", seed=4)
    tp1 = await generate_all(make_engine, cfg, ps, params)
    tp2 = await generate_all(make_engine, dict(cfg, executor="multiproc", tensor_parallel_size=2), ps, params)
    assert tp2 == tp1


# ---- a model that does not split ----


async def test_indivisible_model_fails_at_startup_naming_the_field(make_engine, tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path / "one-kv-head", arch="llama", seed=1, num_heads=4, num_kv_heads=1)
    eng = make_engine(**torch_config(path, executor="multiproc", tensor_parallel_size=2))
    before = set(children_of(os.getpid()))
    with pytest.raises(EngineDeadError, match=r"num_key_value_heads \(1\) is not divisible by tensor_parallel_size \(2\)"):
        await eng.start()
    left = wait_gone(spawned_since(before), 30.0)
    assert left == [], f"processes left behind: {describe(left)}"


async def test_tp_with_the_inproc_executor_is_refused(make_engine, tiny_tp_model: Path) -> None:
    eng = make_engine(**torch_config(tiny_tp_model, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size = 2 needs executor = 'multiproc'"):
        await eng.start()
