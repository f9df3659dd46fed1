"""The per-step host path of issue 17: behaviour the fast paths must keep.

- The engine's one-pass output path (a plain request's one-token step, built in
  `_process`) hands out exactly what the general `_emit` path does.
- The scheduler skips `allocate` for a decode step that stays inside the request's
  blocks (`Request.num_kv_slots`, kept by the KV cache manager) and allocates exactly
  when a step crosses a block boundary; such steps allocate no GC-tracked lists.
- A consumer waits on its event loop's own kind of future.
"""
from __future__ import annotations

import asyncio
import gc
import pathlib

import aiosched
from aiosched import SamplingParams
from aiosched.async_scheduler import AsyncScheduler
from aiosched.config import EngineConfig
from aiosched.kv_cache import KVCacheManager
from aiosched.outputs import RequestOutput
from aiosched.request import Request
from aiosched.request_stream import RequestStream

DEFAULT_MODEL = str(pathlib.Path(aiosched.__file__).parent / "default_model")
PROMPTS = [[(i * 37 + j * 11 + 5) % 8000 for j in range(9 + i)] for i in range(12)]


def _public(o: RequestOutput) -> tuple:
    c = o.outputs[0]
    m = o.metrics
    assert m is not None and m.last_token_time is not None and m.first_token_time is not None
    return (o.request_id, o.prompt, o.prompt_token_ids, o.finished, o.prompt_logprobs, len(o.outputs), c.index, c.new_text,
            c.new_token_ids, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.cumulative_logprob, c.logprobs,
            m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time,
            m.finished_time is None, m.num_cached_prompt_tokens, m.num_preemptions)


async def test_one_pass_outputs_equal_the_general_path(make_engine) -> None:
    """Plain requests take the one-pass path; the same requests with a one-character stop
    string that never occurs (no text held back) take `_emit`. Every streamed output is
    the same, field by field, under preemption too."""
    plain = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    general = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=["\uffff"])

    async def stream(eng, i, params):
        return [_public(o) for o in [o async for o in eng.generate(PROMPTS[i], params, request_id=f"r{i}")]]

    results = {}
    for name, params in (("plain", plain), ("general", general)):
        async with make_engine(runner="fake", model=DEFAULT_MODEL, num_kv_blocks=48, block_size=4,
                               max_num_batched_tokens=64) as eng:
            assert all(tr.plain is (name == "plain") for tr in eng._live.values())
            results[name] = await asyncio.gather(*[stream(eng, i, params) for i in range(len(PROMPTS))])
            assert eng.stats()["preemptions"] > 0, "the small pool must force preemption"
    assert results["plain"] == results["general"]
    for outs in results["plain"]:
        assert len(outs) == 40 and outs[-1][3] and outs[-1][11] == "length"
        assert "".join(o[7] for o in outs) == outs[-1][9]


def test_kv_slots_follow_the_block_table() -> None:
    kv = KVCacheManager(8, 4)
    r = Request("a", list(range(6)), SamplingParams(max_tokens=8), 0, [])
    assert r.num_kv_slots == 0
    kv.allocate(r, 6)
    assert r.num_kv_slots == 8 == len(kv.blocks["a"]) * 4
    r.num_computed_tokens = 6
    assert kv.allocate(r, 2) == [] and r.num_kv_slots == 8
    assert len(kv.allocate(r, 3)) == 1 and r.num_kv_slots == 12
    kv.free(r)
    assert r.num_kv_slots == 0 and "a" not in kv.blocks


def test_decode_steps_allocate_only_at_block_boundaries() -> None:
    """Async decode: each step schedules one token; a new block is sent exactly on the
    steps that cross a block boundary, and the other steps' scheduled entries hold no
    GC-tracked list (no per-request allocation the collector must visit)."""
    bs = 4
    cfg = EngineConfig.load(dict(runner="fake", block_size=bs, max_num_batched_tokens=64, max_num_seqs=4))
    sched = AsyncScheduler(cfg, num_kv_blocks=64, max_model_len=128)
    reqs = [Request(f"r{i}", list(range(1, 6 + i)), SamplingParams(max_tokens=30, ignore_eos=True), 0, []) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    so = sched.schedule()  # the prompts
    in_flight = [so]
    for step in range(20):
        so = sched.schedule()
        in_flight.append(so)
        for sr in so.scheduled:
            req = sched.requests[sr.req_id]
            assert sr.num_tokens == 1 and sr.sample
            crosses = sr.num_computed_tokens % bs == 0  # its token is the first of a new block
            assert len(sr.new_block_ids) == (1 if crosses else 0), (step, sr)
            assert req.num_kv_slots == len(sched.kv.blocks[sr.req_id]) * bs >= sr.num_computed_tokens + 1
            if not crosses:
                assert not any(gc.is_tracked(x) for x in (sr, sr.new_block_ids, sr.draft_token_ids))
        done = in_flight.pop(0)
        from aiosched.protocol import RunnerOutput

        ids = [sr.req_id for sr in done.scheduled if sr.sample]
        sched.update_from_output(done, RunnerOutput(done.step_id, ids, [[7] for _ in ids]))
        sched.check_invariants()


class _CountingLoop(asyncio.SelectorEventLoop):
    created = 0

    def create_future(self) -> asyncio.Future:
        _CountingLoop.created += 1
        return super().create_future()


def test_a_loop_with_its_own_futures_makes_the_waits() -> None:
    """Event loops that override create_future (uvloop, instrumented loops) still make
    the consumer's wait futures; the stock loops get the same asyncio.Future."""

    async def main() -> list[int]:
        s = RequestStream("x", lambda: None)
        got: list[int] = []

        async def consume() -> None:
            async for out in s:
                got.append(len(out.prompt_token_ids))

        task = asyncio.get_running_loop().create_task(consume())
        for i in range(3):
            await asyncio.sleep(0)
            s.put(RequestOutput("x", None, [0] * i, [], i == 2))
        await task
        return got

    loop = _CountingLoop()
    try:
        assert loop.run_until_complete(main()) == [0, 1, 2]
    finally:
        loop.close()
    assert _CountingLoop.created >= 3
    assert asyncio.run(main()) == [0, 1, 2]


def test_schedule_inlines_only_the_lookahead_count() -> None:
    """`schedule` inlines the one-step-ahead token count for the schedulers that use it;
    a subclass with its own `_num_new_tokens` (or the sync scheduler's) is still called."""
    from aiosched.scheduler import Scheduler

    calls: list[str] = []

    class Capped(AsyncScheduler):  # at most 2 tokens per request per step
        def _num_new_tokens(self, req: Request) -> int:
            calls.append(req.req_id)
            return min(2, super()._num_new_tokens(req))

    cfg = EngineConfig.load(dict(runner="fake", block_size=4, max_num_batched_tokens=64, max_num_seqs=4))
    for cls in (AsyncScheduler, Scheduler, Capped):
        sched = cls(cfg, num_kv_blocks=64, max_model_len=128)
        assert sched._inline_lookahead is (cls is AsyncScheduler)
        sched.add_request(Request("a", list(range(1, 10)), SamplingParams(max_tokens=5, ignore_eos=True), 0, []))
        so = sched.schedule()  # the prompt: admitted from the waiting queue
        assert [sr.num_tokens for sr in so.scheduled] == [9]
        if cls is Capped:
            sched.requests["a"].num_computed_tokens = 5  # as if only 5 prompt tokens were computed
            calls.clear()
            so = sched.schedule()
            assert calls == ["a"] and [sr.num_tokens for sr in so.scheduled] == [2]
        elif cls is AsyncScheduler:
            so = sched.schedule()  # one step ahead: the placeholder's position
            assert [(sr.num_tokens, sr.sample) for sr in so.scheduled] == [(1, True)]


def test_step_updates_are_parallel_lists() -> None:
    """update_from_output returns the requests and their new tokens as two parallel lists
    (no object per request per step); iterating or indexing gives StepUpdates."""
    from aiosched.protocol import RunnerOutput
    from aiosched.scheduler import StepUpdate

    cfg = EngineConfig.load(dict(runner="fake", block_size=4, max_num_batched_tokens=64, max_num_seqs=4))
    sched = AsyncScheduler(cfg, num_kv_blocks=64, max_model_len=128)
    reqs = [Request(f"r{i}", list(range(1, 6 + i)), SamplingParams(max_tokens=2, ignore_eos=True), 0, []) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    so = sched.schedule()
    ups = sched.update_from_output(so, RunnerOutput(so.step_id, ["r0", "gone", "r2", "r1"], [[7], [8], [9], [10]]))
    assert ups.reqs == [reqs[0], reqs[2], reqs[1]] and ups.new_token_ids == [[7], [9], [10]] and len(ups) == 3
    assert list(ups) == [StepUpdate(reqs[0], [7]), StepUpdate(reqs[2], [9]), StepUpdate(reqs[1], [10])]
    assert ups[1] == StepUpdate(reqs[2], [9])
    assert sched.stats.discarded_tokens == 1
