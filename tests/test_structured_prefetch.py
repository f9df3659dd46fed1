"""Issue 18: grammar masks for step N+1 prefetched off the launch thread.

`StructuredOutputManager.note_sampled(..., prefetch=bitmask)` (the torch runner calls it
when a step with constrained rows has queued its sampled ids) starts a job on the mask
executor that waits for those ids, advances the matchers and fills their next masks; the
next step takes them with `masks_for`. Here: the job runs on another thread and the
caller never waits for it (ordered with a gate, not timed); the prefetched masks equal
masks computed the old way; rows the job did not have are filled on the spot; free and
resume while a job is in flight; and end to end on the tiny torch model (sync, async,
preemption, chunked prefill), outputs identical to the old launch-thread path.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import jsonschema
import numpy as np
import pytest

from aiosched import SamplingParams, StructuredOutputParams
from aiosched.protocol import NewRequestData
from aiosched.executors.structured_output import GrammarTokenizer, StructuredOutputManager, allowed_token_ids, bitmask_words
from tests.tiny_model import _write_tokenizer_only

SO = StructuredOutputParams
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def gtok(tmp_path_factory: pytest.TempPathFactory) -> GrammarTokenizer:
    d = tmp_path_factory.mktemp("tiny-tok")
    _write_tokenizer_only(d, max_model_len=1024)
    return GrammarTokenizer.from_model_dir(str(d))


@pytest.fixture(scope="module")
def hf_tok(gtok: GrammarTokenizer, tmp_path_factory: pytest.TempPathFactory):
    from aiosched.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tiny-tok2")
    _write_tokenizer_only(d, max_model_len=1024)
    return Tokenizer(d)


class GatedExecutor:
    """Runs each job on its own thread, but only once the test opens the gate: a job
    that must not have run yet provably has not."""

    def __init__(self) -> None:
        self.gates: list[threading.Event] = []  # one per job
        self.job_threads: list[int] = []

    @property
    def submitted(self) -> int:
        return len(self.gates)

    def submit(self, fn: Callable[[], None]) -> "Future[None]":
        fut: Future[None] = Future()
        gate = threading.Event()
        self.gates.append(gate)

        def run() -> None:
            gate.wait()
            self.job_threads.append(threading.get_ident())
            try:
                fn()
                fut.set_result(None)
            except BaseException as e:  # surfaced by the manager's join
                fut.set_exception(e)

        threading.Thread(target=run, daemon=True).start()
        return fut


def _new(rid: str, spec: SO | None, tokens: list[int] | None = None, prompt_len: int = 2) -> NewRequestData:
    return NewRequestData(rid, tokens or [5, 6], prompt_len, SamplingParams(structured=spec), 0)


def _ids(hf_tok, text: str) -> list[int]:
    return hf_tok.encode(text, add_special_tokens=False)


def _reference_mask(gtok: GrammarTokenizer, spec: SO, outputs: list[int]) -> np.ndarray:
    """The mask after `outputs`, from a fresh manager on the launch thread (the old path)."""
    ref = StructuredOutputManager(gtok, num_threads=1)
    ref.add_request(_new("x", spec, [5, 6] + outputs))
    bm = np.zeros((1, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    ref.fill_bitmask(bm, [(0, "x")])
    return bm[0]


@pytest.mark.parametrize("num_threads", [1, 2], ids=["one-thread", "pool"])
def test_prefetch_runs_off_the_caller_and_equals_the_old_masks(gtok, hf_tok, num_threads: int) -> None:
    ex = GatedExecutor()
    mgr = StructuredOutputManager(gtok, num_threads=num_threads, mask_executor=ex)
    mgr.parallel_fill_rows = 2  # "pool": llguidance's batched fill on these 3 rows
    specs = {"a": SO(json_schema=json.dumps(SCHEMA)), "b": SO(regex=r"[0-9]{1,3}-[a-z]+"), "c": SO(json_object=True)}
    for rid, spec in specs.items():
        mgr.add_request(_new(rid, spec))
    texts = {"a": '{"name":"ab","ok":true,"n":7}', "b": "12-xyz", "c": '{"k":[1,2]}'}
    toks = {rid: _ids(hf_tok, t) for rid, t in texts.items()}
    bm = np.zeros((8, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    rids = list(specs)
    for step in range(min(len(t) for t in toks.values())):
        rows = [(i, rid, 2 + step) for i, rid in enumerate(rids)]  # every request samples position 2 + step
        slots = mgr.masks_for(rows, bm)
        for (_, rid, _), slot in zip(rows, slots):
            assert np.array_equal(bm[slot], _reference_mask(gtok, specs[rid], toks[rid][:step])), (rid, step)
            assert toks[rid][step] in allowed_token_ids(bm[slot], gtok.vocab_size)
        sampled = [toks[rid][step] for rid in rids]
        before = ex.submitted
        mgr.note_sampled(sampled, None, [(i, rid) for i, rid, _ in rows], prefetch=bm)
        # The caller is back while the job has not even started (the gate is shut): it
        # did not wait for the masks of the next step.
        assert ex.submitted == before + 1
        assert all(len(mgr.grammars[rid].outputs) == step for rid in rids)
        assert not ex.gates[-1].is_set()
        ex.gates[-1].set()  # the device step "ends": the job may run; the next masks_for waits for it
    assert mgr.stats["prefetched_rows"] == 3 * (min(len(t) for t in toks.values()) - 1)
    assert mgr.stats["launch_thread_rows"] == 3  # the first step only
    assert ex.job_threads and threading.get_ident() not in ex.job_threads
    mgr.close()


def test_rows_the_job_did_not_have_are_filled_on_the_spot(gtok, hf_tok) -> None:
    """A new request (its first sample after the prefill) and a resumed one (same id, new
    incarnation) are not in the job: filled into the slots after the job's, correctly."""
    pool = ThreadPoolExecutor(1)
    mgr = StructuredOutputManager(gtok, num_threads=1, mask_executor=pool)
    spec = SO(regex=r"[0-9]{1,2}-[a-z]")
    d4, d5 = _ids(hf_tok, "4")[0], _ids(hf_tok, "5")[0]
    mgr.add_request(_new("r", spec))
    mgr.add_request(_new("s", spec))
    bm = np.zeros((4, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    mgr.masks_for([(0, "r", 2), (1, "s", 2)], bm)
    mgr.note_sampled([d4, d5], None, [(0, "r"), (1, "s")], prefetch=bm)  # job: r and s at position 3
    mgr.free("s")  # preempted while the job runs; comes back with its sample
    mgr.add_request(_new("s", spec, [5, 6, d5]))
    mgr.add_request(_new("t", spec))
    slots = mgr.masks_for([(0, "t", 2), (1, "r", 3), (2, "s", 3)], bm)
    assert slots[1] == 0  # r: the job's
    assert sorted(slots[::2]) == [1, 2]  # t and s: s's prefetched slot (its old incarnation) is free again
    for slot, outs in zip(slots, [[], [d4], [d5]]):
        assert np.array_equal(bm[slot], _reference_mask(gtok, spec, outs))
    assert mgr.grammars["s"].num_consumed == 1 and not mgr.grammars["s"].is_error
    mgr.free("r"), mgr.free("s"), mgr.free("t")
    assert mgr.held_request_ids() == set()
    mgr.close()
    pool.shutdown()


def test_job_errors_surface_on_the_launch_thread(gtok, hf_tok) -> None:
    pool = ThreadPoolExecutor(1)
    mgr = StructuredOutputManager(gtok, num_threads=1, mask_executor=pool)
    mgr.add_request(_new("r", SO(regex="[0-9]+")))
    bm = np.zeros((2, bitmask_words(gtok.vocab_size)), dtype=np.int32)

    class BadHost:
        def tolist(self) -> list[int]:
            raise RuntimeError("device copy failed")

    mgr.note_sampled(BadHost(), None, [(0, "r")], prefetch=bm)
    with pytest.raises(RuntimeError, match="device copy failed"):
        mgr.masks_for([(0, "r", 3)], bm)
    pool.shutdown()


# ---- end to end on the tiny torch model ----

try:
    import torch  # noqa: F401

    from aiosched.executors.torch.random_checkpoint import write_random_checkpoint
    _HAS_TORCH = True
except ImportError:  # pragma: no cover
    _HAS_TORCH = False

DEVICE = os.environ.get("AIOSCHED_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    if not _HAS_TORCH:
        pytest.skip("torch runner not available")
    path = tmp_path_factory.mktemp("tiny-llama")
    write_random_checkpoint(path, arch="llama", seed=3)
    return path


def _run(make_engine, tiny: pathlib.Path, prefetch: bool, async_scheduling: bool, **kw) -> tuple[list, list, dict]:
    """Greedy float32: constrained (3 kinds) and unconstrained requests in one batch."""
    cfg = dict(model=str(tiny), async_scheduling=async_scheduling, num_kv_blocks=1024, block_size=8, max_num_batched_tokens=64,
               max_num_seqs=16, device=DEVICE, dtype="float32")
    cfg.update(kw)
    grammar = 'root ::= "[" item ("," item)? ("," item)? "]"\nitem ::= [0-9] [0-9]? [0-9]?'
    specs = [SO(json_schema=json.dumps(SCHEMA)), SO(regex=r"[a-z]{3,9}(-[0-9]{1,3}){2,4}"), SO(grammar=grammar)] * 3

    async def go() -> tuple[list, list, dict]:
        async with make_engine(**cfg) as eng:
            extras = eng._executor.runner.extras
            extras.prefetch_masks = prefetch
            free = [eng.generate([3 + i, 40 + i, 7] * (1 + i), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
                    for i in range(5)]
            cons = [eng.generate(f"JSON {i}:", SamplingParams(max_tokens=120, temperature=0.0, structured=s)) for i, s in enumerate(specs)]
            fouts, couts = await asyncio.gather(asyncio.gather(*free), asyncio.gather(*cons))
            fast = eng._executor.runner.fast
            stats = dict(extras.structured.stats, preemptions=eng.scheduler.stats.preemptions,
                         graph_steps=fast.stats["graph_steps"] + fast.stats["mixed_graph_steps"] if fast is not None else 0)
        return [o.token_ids for o in fouts], [(o.text, o.finish_reason) for o in couts], stats

    free, cons, stats = asyncio.run(go())
    for spec, (text, reason) in zip(specs, cons):
        assert reason == "stop", (spec, text)
        if spec.json_schema is not None:
            jsonschema.validate(json.loads(text), SCHEMA)
    return free, cons, stats


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("pressure", ["roomy", "tight-kv-chunked"])
def test_prefetch_outputs_equal_the_launch_thread_path(make_engine, tiny, async_scheduling: bool, pressure: str) -> None:
    """Greedy float32: the prefetch path gives the same constrained and unconstrained
    outputs as the old launch-thread fill; the unconstrained ones equal a run without
    constrained neighbours; most masks came from the prefetch job. "tight-kv-chunked":
    a KV pool small enough to preempt, and prefills split into chunks."""
    kw = dict(num_kv_blocks=20, max_num_batched_tokens=16) if pressure != "roomy" else {}
    free_new, cons_new, stats_new = _run(make_engine, tiny, True, async_scheduling, **kw)
    free_old, cons_old, stats_old = _run(make_engine, tiny, False, async_scheduling, **kw)
    assert cons_new == cons_old
    assert free_new == free_old
    assert stats_old["prefetched_rows"] == 0
    assert stats_new["prefetched_rows"] > stats_new["launch_thread_rows"] > 0
    if pressure != "roomy":
        assert stats_new["preemptions"] > 0 and stats_old["preemptions"] > 0

    async def alone() -> list[list[int]]:
        cfg = dict(model=str(tiny), async_scheduling=async_scheduling, num_kv_blocks=1024, block_size=8, max_num_batched_tokens=64,
                   max_num_seqs=16, device=DEVICE, dtype="float32")
        async with make_engine(**cfg) as eng:
            outs = await asyncio.gather(*[eng.generate([3 + i, 40 + i, 7] * (1 + i), SamplingParams(max_tokens=20, temperature=0.0,
                                                                                                     ignore_eos=True))
                                          for i in range(5)])
        return [o.token_ids for o in outs]

    assert free_new == asyncio.run(alone())


def test_new_rows_reuse_slots_of_requests_gone_from_the_step(gtok, hf_tok) -> None:
    """The bitmask has max_num_seqs rows: when the job filled all of them and one request
    finished, a new request takes its slot (the old layout overflowed here)."""
    pool = ThreadPoolExecutor(1)
    mgr = StructuredOutputManager(gtok, num_threads=1, mask_executor=pool)
    spec = SO(regex=r"[0-9]{1,2}-[a-z]")
    d4 = _ids(hf_tok, "4")[0]
    for rid in ("r", "s"):
        mgr.add_request(_new(rid, spec))
    bm = np.zeros((2, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    mgr.masks_for([(0, "r", 2), (1, "s", 2)], bm)
    mgr.note_sampled([d4, d4], None, [(0, "r"), (1, "s")], prefetch=bm)
    mgr.free("s")  # finished
    mgr.add_request(_new("t", spec))
    slots = mgr.masks_for([(0, "t", 2), (1, "r", 3)], bm)
    assert slots == [1, 0]
    assert np.array_equal(bm[1], _reference_mask(gtok, spec, []))
    assert np.array_equal(bm[0], _reference_mask(gtok, spec, [d4]))
    mgr.close()
    pool.shutdown()


def test_the_job_not_the_caller_waits_for_the_device_copy(gtok, hf_tok) -> None:
    """On a GPU the sampled ids are complete on the host once a CUDA event has fired: the
    mask thread waits for it, the caller (the launch thread) never does."""
    pool = ThreadPoolExecutor(1)
    mgr = StructuredOutputManager(gtok, num_threads=1, mask_executor=pool)
    mgr.add_request(_new("r", SO(regex=r"[0-9]{1,2}-[a-z]")))
    bm = np.zeros((1, bitmask_words(gtok.vocab_size)), dtype=np.int32)
    mgr.masks_for([(0, "r", 2)], bm)

    class Event:  # the copy "completes" when the test says so
        def __init__(self) -> None:
            self.done = threading.Event()
            self.waiters: list[int] = []

        def synchronize(self) -> None:
            self.waiters.append(threading.get_ident())
            self.done.wait()

    ev = Event()
    host = [0]
    mgr.note_sampled(host, ev, [(0, "r")], prefetch=bm)  # returns with the copy still "in flight"
    host[0] = _ids(hf_tok, "4")[0]  # the copy lands
    ev.done.set()
    assert mgr.masks_for([(0, "r", 3)], bm) == [0]
    assert ev.waiters and threading.get_ident() not in ev.waiters
    assert mgr.grammars["r"].outputs == [host[0]]
    assert np.array_equal(bm[0], _reference_mask(gtok, SO(regex=r"[0-9]{1,2}-[a-z]"), [host[0]]))
    mgr.close()
    pool.shutdown()
