"""The CPU step split into two sub-steps of whole requests (executors/torch/cpu_split.py).

Checked: a split step gives HF's greedy tokens and the unsplit step's seeded samples;
the split keeps whole requests, their logits rows and KV slots; steps whose parts would
share a block one of them writes are not split; the helper's errors reach the caller, and
without the helper the caller runs both parts.
"""
from __future__ import annotations

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aiosched.executors.torch import cpu_split  # noqa: E402
from aiosched.executors.torch.attention.torch_paged import AttentionMetadata  # noqa: E402
from aiosched.executors.torch.input_batch import StepInputs  # noqa: E402
from aiosched.sampling_params import SamplingParams  # noqa: E402
from aiosched.config import EngineConfig  # noqa: E402
from aiosched.executors.runner import create_runner  # noqa: E402
from test_torch_runner import BLOCK, Driver, _prompts, ckpt  # noqa: E402,F401  (ckpt: the fixture)

NEW = 12


def _run(ckpt, monkeypatch, split: str, sampling: SamplingParams, lengths: list[int], seeds: bool = False):
    monkeypatch.setenv(cpu_split.SPLIT_ENV, split)
    runner = create_runner(EngineConfig(model=str(ckpt), runner="torch", device="cpu", dtype="float32", block_size=BLOCK,
                                        max_num_seqs=16, num_kv_blocks=400, max_model_len=128))
    runner.load()
    assert (runner.splitter is not None) == (split == "1")
    drv = Driver(runner)
    prompts = _prompts(runner.model.args.vocab_size, lengths, seed=11)
    for i, p in enumerate(prompts):
        drv.add(f"r{i}", p, sampling, seed=100 + i if seeds else 0)
    drv.run_sync(3, budget={f"r{i}": 5 for i in range(len(prompts))})  # chunked prefill: mixed steps
    drv.run_sync(NEW)
    stats = dict(runner.splitter.stats) if runner.splitter is not None else None
    runner.shutdown()
    return prompts, drv.outputs, stats


def test_split_steps_give_hf_greedy_tokens(ckpt, monkeypatch) -> None:
    lengths = [3, 17, 9, 30, 5, 12, 21, 8, 14, 2]
    prompts, outs, stats = _run(ckpt, monkeypatch, "1", SamplingParams(temperature=0.0, max_tokens=64), lengths)
    assert stats["split_steps"] >= NEW  # the decode steps (10 rows) and the prefill chunks split
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for i, p in enumerate(prompts):
        got = outs[f"r{i}"]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              max_new_tokens=len(got), min_new_tokens=len(got), pad_token_id=0)
        assert got == ref[0, len(p):].tolist(), f"request {i}"


def test_split_steps_sample_as_unsplit(ckpt, monkeypatch) -> None:
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=64)
    lengths = [4, 19, 11, 7, 26, 10, 3, 15, 9]
    _, split, stats = _run(ckpt, monkeypatch, "1", sp, lengths, seeds=True)
    _, whole, _ = _run(ckpt, monkeypatch, "0", sp, lengths, seeds=True)
    assert stats["split_steps"] >= NEW
    assert split == whole


def _inputs(qlens: list[int], ctx: list[int], tables: list[list[int]], logit_rows: list[int], bs: int = 4) -> StepInputs:
    T = sum(qlens)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    slots = []
    for n, c, tab in zip(qlens, ctx, tables):
        slots += [tab[p // bs] * bs + p % bs for p in range(c - n, c)]
    meta = AttentionMetadata(torch.tensor(slots), qsl, ctx, tables, bs)
    return StepInputs(torch.arange(T), torch.arange(T), meta, torch.tensor(logit_rows), torch.tensor(logit_rows) + 1000)


def test_split_keeps_whole_requests_and_their_rows() -> None:
    # a prefill chunk without a logits row, two prompt ends, six decodes
    qlens = [40, 30, 20] + [1] * 6
    ctx = [40, 30, 20] + [50] * 6
    tables = [[i * 20 + j for j in range(13)] for i in range(9)]
    inp = _inputs(qlens, ctx, tables, [69, 89, 90, 91, 92, 93, 94, 95])
    (a, b), (w0, w1) = cpu_split.split_inputs(inp)
    assert w0 > 0 and w1 > 0
    ta, tb = a.input_ids.shape[0], b.input_ids.shape[0]
    assert ta + tb == 96 and 0 < ta < 96
    assert a.meta.query_start_loc[0] == b.meta.query_start_loc[0] == 0
    assert a.meta.query_start_loc[-1] == ta and b.meta.query_start_loc[-1] == tb
    assert a.meta.num_reqs + b.meta.num_reqs == 9
    assert a.meta.block_tables + b.meta.block_tables == tables
    assert torch.equal(torch.cat([a.input_ids, b.input_ids]), inp.input_ids)
    assert torch.equal(torch.cat([a.meta.slot_mapping, b.meta.slot_mapping]), inp.meta.slot_mapping)
    assert torch.equal(torch.cat([a.logit_rows, b.logit_rows + ta]), inp.logit_rows)
    assert torch.equal(torch.cat([a.dst, b.dst]), inp.dst)
    assert (a.logit_rows < ta).all() and (b.logit_rows < tb).all()


def test_no_split_where_parts_share_a_written_block_or_the_step_is_small() -> None:
    tables = [[i * 4 + j for j in range(4)] for i in range(8)]
    assert cpu_split.split_inputs(_inputs([1] * 8, [10] * 8, tables, list(range(8)))) is not None
    shared = [list(t) for t in tables]
    shared[7][0] = tables[0][2]  # request 7 reads the block request 0 writes this step
    assert cpu_split.split_inputs(_inputs([1] * 8, [10] * 8, shared, list(range(8)))) is None
    assert cpu_split.split_inputs(_inputs([1] * 4, [10] * 4, tables[:4], list(range(4)))) is None  # < MIN_ROWS
    assert cpu_split.split_inputs(_inputs([16], [16], tables[:1], [15])) is None  # one request
    assert cpu_split.split_inputs(_inputs([1] * 8, [10] * 8, tables, [1, 0, 2, 3, 4, 5, 6, 7])) is None  # rows out of order


def test_split_default_only_with_a_spare_core(monkeypatch) -> None:
    monkeypatch.delenv(cpu_split.SPLIT_ENV, raising=False)
    assert cpu_split.split_enabled(1, cores=2)
    assert not cpu_split.split_enabled(1, cores=1)
    assert not cpu_split.split_enabled(7, cores=8)
    monkeypatch.setenv(cpu_split.SPLIT_ENV, "0")
    assert not cpu_split.split_enabled(1, cores=2)
    monkeypatch.setenv(cpu_split.SPLIT_ENV, "1")
    assert cpu_split.split_enabled(7, cores=8) and not cpu_split.split_choice_on()
    monkeypatch.setenv(cpu_split.SPLIT_ENV, "auto")
    assert cpu_split.split_enabled(1, cores=2) and cpu_split.split_choice_on()


def test_pair_runner_errors_and_a_missing_helper() -> None:
    pr = cpu_split.PairRunner(1)
    names: list[str] = []
    assert pr.run(lambda: 1, lambda: names.append(threading.current_thread().name) or 2) == (1, 2)

    def boom() -> None:
        raise ValueError("second part")

    for _ in range(3):  # whichever thread runs it, the error reaches the caller
        with pytest.raises(ValueError, match="second part"):
            pr.run(lambda: 1, boom)
    assert pr.run(lambda: 3, lambda: 4) == (3, 4)
    pr.close()
    assert not pr._thread.is_alive()
    me = threading.current_thread().name
    assert pr.run(lambda: 5, lambda: threading.current_thread().name) == (5, me)  # no helper: the caller runs both


def test_split_point_moves_toward_the_faster_thread(monkeypatch) -> None:
    import time

    monkeypatch.setenv(cpu_split.FRAC_ENV, "auto")
    pr = cpu_split.PairRunner(1)
    for _ in range(12):  # equal work, the helper's part three times as slow
        pr.run(lambda: time.sleep(0.004), lambda: time.sleep(0.012), (1.0, 1.0))
    assert pr.frac > 0.6
    assert cpu_split.PairRunner.FRAC_MIN <= pr.frac <= cpu_split.PairRunner.FRAC_MAX
    pr.close()
    monkeypatch.setenv(cpu_split.FRAC_ENV, "0.5")
    fixed = cpu_split.PairRunner(1)
    for _ in range(4):
        fixed.run(lambda: time.sleep(0.002), lambda: time.sleep(0.006), (1.0, 1.0))
    assert fixed.frac == 0.5
    fixed.close()


def test_split_at_a_given_share() -> None:
    tables = [[i * 4 + j for j in range(4)] for i in range(16)]
    inp = _inputs([1] * 16, [10] * 16, tables, list(range(16)))
    for frac, n0 in ((0.5, 8), (0.75, 12), (0.25, 4)):
        (a, b), (w0, w1) = cpu_split.split_inputs(inp, frac)
        assert a.meta.num_reqs == n0 and b.meta.num_reqs == 16 - n0
        assert w0 / (w0 + w1) == pytest.approx(frac)


def test_split_choice_keeps_the_faster_way_and_explores() -> None:
    ch = cpu_split.SplitChoice()
    picks = []
    for _ in range(64):
        s = ch.split("decode")
        picks.append(s)
        ch.record("decode", s, 10.0, 0.010 if s else 0.005)  # unsplit twice as fast here
    assert picks[0] and not picks[1]  # one of each first
    assert sum(picks[2:]) == sum(1 for i in range(3, 65) if i % ch.EXPLORE == 0)  # then split only to explore
    ch2 = cpu_split.SplitChoice()
    for _ in range(64):
        s = ch2.split("mixed")
        ch2.record("mixed", s, 10.0, 0.005 if s else 0.010)
    assert ch2.stats["whole"] == 1 + sum(1 for i in range(3, 65) if i % ch2.EXPLORE == 0)
    assert ch2.split("decode")  # kinds are separate
