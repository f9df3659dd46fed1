"""The CUDA step path (fused kernels in the model's layers, CUDA graphs of its step:
executors/torch/cuda_path.py) against the reference torch path.

Same engine, same tiny random checkpoint, float32: greedy tokens of the fast path
(Triton kernels, persistent buffers, decode CUDA graphs) must equal the reference
path's, through chunked prefill, mixed batches, prefix-cache hits and preemption, in
sync and async scheduling. Runs on a CUDA device; on CPU only with TRITON_INTERPRET=1
(then without graphs), otherwise skipped.
"""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

pytest.importorskip("triton")
random_checkpoint = pytest.importorskip("aiosched.executors.torch.random_checkpoint")
CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (CUDA or INTERPRET):
    pytest.skip("the CUDA step path needs a CUDA device (or TRITON_INTERPRET=1)", allow_module_level=True)
if INTERPRET and not CUDA:
    import tests.test_triton_kernels  # noqa: F401  (the interpreter's numpy patch)

from aiosched import SamplingParams  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    random_checkpoint.write_random_checkpoint(path, arch="llama", seed=11, hidden_size=128, num_layers=2, num_heads=4,
                                              num_kv_heads=2, intermediate_size=256, vocab_size=384)
    return str(path)


def prompts() -> list[list[int]]:
    shared = [(7 * i + 3) % 300 + 5 for i in range(40)]
    ps = [shared + [11, 12, 13], shared + [21, 22], [5, 6, 7], list(range(20, 95)), [9] * 17, [(i * 13) % 350 + 2 for i in range(33)]]
    return ps + [[(i * 31 + j) % 370 + 3 for j in range(3 + (i * 7) % 29)] for i in range(10)]


async def generate(make_engine, ckpt: str, fast: str, **kw) -> tuple[list[list[int]], dict]:
    eng = make_engine(model=ckpt, device=DEV, dtype="float32", max_num_batched_tokens=48, block_size=16, max_num_seqs=8,
                      cuda_graph_max_batch=8, **kw)
    async with eng:
        runner = eng._executor.runner
        if fast == "off":
            runner.fast = None
        elif fast in ("eager", "padded") and (runner.fast is None or runner.fast.graphs is not None):
            from aiosched.executors.torch.cuda_path import FastPath

            runner.fast = FastPath(runner, use_graphs=False)
        if fast == "padded":  # the graphs' padded layouts (decode and mixed), run without capture
            runner.fast.padded_eager = True
        greedy = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
        outs = await asyncio.gather(*[eng.generate(p, greedy) for p in prompts()])
        stats = dict(runner.fast.stats) if runner.fast is not None else {}
        stats["preemptions"] = eng.stats()["preemptions"]
    return [o.token_ids for o in outs], stats


@pytest.mark.parametrize("async_scheduling", [True, False])
async def test_fast_path_matches_reference(make_engine, ckpt, async_scheduling) -> None:
    ref, _ = await generate(make_engine, ckpt, "off", async_scheduling=async_scheduling)
    modes = ["graphs", "eager", "padded"] if CUDA else ["eager", "padded"]
    for mode in modes:
        got, stats = await generate(make_engine, ckpt, mode, async_scheduling=async_scheduling)
        assert got == ref, mode
        if mode == "eager":
            assert stats["eager_steps"] > 0 and stats["mixed_graph_steps"] == 0 and stats["graph_steps"] == 0
        else:  # prefill/mixed and decode steps take the graphs' padded layouts (captured in graphs mode)
            assert stats["mixed_graph_steps"] > 0 and stats["graph_steps"] > 0


async def test_fast_path_under_preemption_and_sampling(make_engine, ckpt) -> None:
    kw = dict(num_kv_blocks=14, async_scheduling=True)
    ref, _ = await generate(make_engine, ckpt, "off", **kw)
    got, stats = await generate(make_engine, ckpt, "graphs" if CUDA else "eager", **kw)
    assert stats["preemptions"] > 0
    assert got == ref
    # seeded sampling: the fast path samples non-greedy rows with the reference sampler
    eng = make_engine(model=ckpt, device=DEV, dtype="float32", max_num_seqs=8, cuda_graph_max_batch=8)
    async with eng:
        if not CUDA:
            from aiosched.executors.torch.cuda_path import FastPath

            eng._executor.runner.fast = FastPath(eng._executor.runner, use_graphs=False)
        sp = SamplingParams(max_tokens=10, temperature=0.8, seed=123, ignore_eos=True)
        a = await eng.generate([5, 6, 7, 8], sp)
        b = await eng.generate([5, 6, 7, 8], sp)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 10


async def test_skinny_qkv_with_the_norm_prologue_matches_the_reference(make_engine, ckpt, monkeypatch) -> None:
    """The skinny-qkv switch (layers.set_skinny_qkv): decode steps of 1-2 rows take the qkv
    projection as one skinny GEMM with the input norm as prologue, same greedy tokens."""
    from aiosched.executors.torch import fused_ops, layers

    async def run(fast: bool) -> list[list[int]]:
        eng = make_engine(model=ckpt, device=DEV, dtype="float32", max_num_seqs=2, cuda_graph_max_batch=8)
        async with eng:
            runner = eng._executor.runner
            if not fast:
                runner.fast = None
            elif not CUDA:
                from aiosched.executors.torch.cuda_path import FastPath

                runner.fast = FastPath(runner, use_graphs=False)
            greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            outs = await asyncio.gather(*[eng.generate(p, greedy) for p in prompts()[:3]])
        return [o.token_ids for o in outs]

    ref = await run(fast=False)
    qkv_out = 4 * 32 + 2 * 2 * 32  # the checkpoint's q + k + v features
    seen: list[bool] = []
    real = fused_ops.skinny_linear

    def spy(x, w, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(w.shape[0] == qkv_out and k.get("norm_weight") is not None)
        return real(x, w, *a, **k)

    monkeypatch.setattr(fused_ops, "skinny_linear", spy)
    monkeypatch.setattr(layers, "_SKINNY_QKV", True)
    assert await run(fast=True) == ref
    assert any(seen)  # the qkv projections did take the skinny kernel


def repetitive_prompts() -> list[list[int]]:
    """Prompts with repeated phrases, so the n-gram proposer finds drafts."""
    return [([(i * 17 + j * 5) % 350 + 3 for j in range(4 + i % 5)] * 6)[: 20 + 3 * i] for i in range(8)]


@pytest.mark.parametrize("async_scheduling,padded", [(True, False), (False, False), (True, True)])
async def test_speculative_verification_on_the_fast_path(make_engine, ckpt, async_scheduling, padded) -> None:
    """Greedy with n-gram speculation equals greedy without it (float32); the drafts are
    verified by the fused path (its spec step counter moves), with chunked prefill and
    preemption in the mix (a small KV pool)."""
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def run(spec: dict | None) -> tuple[list[list[int]], dict, dict]:
        eng = make_engine(model=ckpt, device=DEV, dtype="float32", max_num_batched_tokens=48, block_size=16, max_num_seqs=8,
                          cuda_graph_max_batch=8, num_kv_blocks=20, async_scheduling=async_scheduling, speculative=spec)
        async with eng:
            runner = eng._executor.runner
            if not CUDA:  # interpreter: the fused path without graphs
                from aiosched.executors.torch.cuda_path import FastPath

                runner.fast = FastPath(runner, use_graphs=False)
                runner.fast.padded_eager = padded
            elif not padded:  # CUDA: verification on the eager varlen path instead of the mixed-step graphs
                runner.fast.mixed = None
            outs = await asyncio.gather(*[eng.generate(p, greedy) for p in repetitive_prompts()])
            return [o.token_ids for o in outs], dict(runner.fast.stats), eng.stats()

    ref, _, _ = await run(None)
    got, fast_stats, stats = await run({"method": "ngram", "num_tokens": 3, "ngram_min": 1, "ngram_max": 3, "auto": False})
    assert got == ref
    assert fast_stats.get("spec_steps", 0) > 0
    assert stats["spec_accepted_tokens"] > 0
    assert (fast_stats["mixed_graph_steps"] > 0) == padded
    if padded:
        # Speculative steps verifying more logits rows (1 + k per request) than a mixed
        # step of their size has ran at a padded (graph) layout too, not eagerly.
        assert fast_stats["spec_padded_steps"] > 0 and fast_stats["spec_rows_eager"] == 0
        assert fast_stats["spec_max_logits_rows"] > 8  # (max_num_seqs): such steps did occur


@pytest.mark.skipif(not CUDA, reason="CUDA sync debug mode")
async def test_no_step_waits_for_the_device_while_requests_arrive_and_leave(make_engine, ckpt) -> None:
    """Async scheduling on CUDA: every `execute` (new requests added, finished ones
    freed, prefill and decode steps launched) runs under torch.cuda.set_sync_debug_mode
    ("error"), so any host wait for the stream fails the step. A Python int assigned into
    a device tensor (`t[row] = n`) is such a wait: it cost 11.7 ms per prefill step at c256."""
    eng = make_engine(model=ckpt, device=DEV, dtype="float32", max_num_batched_tokens=48, block_size=16, max_num_seqs=4,
                      cuda_graph_max_batch=4, async_scheduling=True)
    async with eng:
        runner = eng._executor.runner
        execute, checked_steps = runner.execute, []

        def checked(so):
            torch.cuda.set_sync_debug_mode("error")
            try:
                pending = execute(so)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked_steps.append(len(so.new_requests))
            return pending

        runner.execute = checked
        greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outs = await asyncio.gather(*[eng.generate(p, greedy) for p in prompts()])
    assert all(len(o.token_ids) == 6 for o in outs)
    assert sum(checked_steps) == len(prompts()) and len(checked_steps) > len(prompts()) // 4  # requests came in waves


@pytest.mark.skipif(not CUDA, reason="CUDA events")
async def test_idle_probe_reports_the_gaps_between_steps(make_engine, ckpt) -> None:
    """The untraced idle figure: a sync engine leaves the device idle between steps (the
    host waits for each step's tokens before it builds the next), so gaps are measured."""
    eng = make_engine(model=ckpt, device=DEV, dtype="float32", max_num_seqs=8, cuda_graph_max_batch=8, async_scheduling=False)
    async with eng:
        fast = eng._executor.runner.fast
        fast.idle_probe = []
        await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)) for p in prompts()[:4]])
        rep = fast.idle_report()
    assert rep is not None and rep["steps"] >= 8
    assert 0.0 < rep["idle_share"] < 1.0 and rep["busy_ms"] > 0 and rep["idle_ms"] > 0
    # Sync: the host enters each launch only after the step before has finished, so the
    # gaps are the host's (the first step aligns the clocks); decode steps replay graphs.
    assert rep["host_late_ms"] > 0.5 * rep["idle_ms"]
    decode = rep["by_kind"]["graph_steps"]
    assert decode["steps"] >= 4 and decode["launch_ms_mean"] > 0 and decode["device_ms_mean"] > 0
    # Each step's start event runs at once on the idle device, which then waits inside the
    # step for the host to lay it out and replay its graph: measured apart from the gaps.
    assert decode["before_replay_ms"] > 0 and rep["before_replay_ms"] >= decode["before_replay_ms"]
    assert rep["idle_or_waiting_share"] > rep["idle_share"]
    assert fast.idle_probe is None  # reporting ends the measurement


async def test_padded_mixed_steps_with_sampling_extras(make_engine, ckpt) -> None:
    """Penalties and logprobs on prefill/mixed steps of the padded layout (graphs on CUDA):
    the same tokens and logprobs as the reference path."""
    ps = prompts()
    # Every request uses an extra, so no step of this run would take the padded layout without them.
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.3, logprobs=2) if i % 2
              else SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, presence_penalty=0.5) for i in range(len(ps))]

    async def run(fast: str):
        eng = make_engine(model=ckpt, device=DEV, dtype="float32", max_num_batched_tokens=48, block_size=16, max_num_seqs=8,
                          cuda_graph_max_batch=8)
        async with eng:
            runner = eng._executor.runner
            if fast == "off":
                runner.fast = None
            elif not CUDA:
                from aiosched.executors.torch.cuda_path import FastPath

                runner.fast = FastPath(runner, use_graphs=False)
                runner.fast.padded_eager = True
            outs = await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(ps, params)])
            stats = dict(runner.fast.stats) if runner.fast is not None else {}
        return outs, stats

    ref, _ = await run("off")
    got, stats = await run("padded")
    assert stats["mixed_graph_steps"] > 0
    if CUDA:  # decode steps replay their graphs too
        assert stats["eager_steps"] == 0
    for a, b in zip(got, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        if b.outputs[0].logprobs:
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4


def test_free_only_steps_leave_no_request_state_on_the_fast_path(ckpt) -> None:
    """The CUDA path keeps no per-request state past a request's free, also when the
    frees come in steps that schedule nothing (issue 16, item 6)."""
    from aiosched.config import EngineConfig
    from aiosched.executors.runner import create_runner
    from tests.test_torch_runner import BLOCK, MAX_SEQS, check_free_only_steps_leave_no_request_state

    runner = create_runner(EngineConfig(model=ckpt, runner="torch", device=DEV, dtype="float32", block_size=BLOCK,
                                        max_num_seqs=MAX_SEQS, num_kv_blocks=160, max_model_len=128, cuda_graph_max_batch=MAX_SEQS))
    runner.load()
    if not CUDA:
        from aiosched.executors.torch.cuda_path import FastPath

        runner.fast = FastPath(runner, use_graphs=False)
    assert runner.fast is not None
    check_free_only_steps_leave_no_request_state(runner)
