"""A synchronous copy of the AsyncEngine loop around a scheduler and the fake runner.

Used by the stateful scheduler tests and the scheduler regression tests. It drives
`Scheduler`/`AsyncScheduler` exactly as `AsyncEngine._engine_loop` does, without an event
loop (thousands of steps per second):

    step = [apply the oldest in-flight step's output]  then  [fill: schedule and
           submit until `max_concurrent_batches` steps are in flight]

so between two `step()` calls, which is where the user's `add`/`abort` land, one or
two steps are in flight, as when the engine awaits its oldest future. The runner
executes a step lazily, just before its output is applied (steps still run in
submission order), and every submitted `SchedulerOutput` is snapshotted (msgpack)
at submission and compared at execution: the scheduler must not mutate a step it
has handed to the worker.

The oracle is the fake model itself: each request's output must equal
`reference_tokens` for that request alone (with its penalties, which the fake model
applies over the request's own history), with stop tokens, EOS, min_tokens and
max_tokens applied here, independently of the scheduler. The harness also keeps
its own books (in-flight samples per request, tokens that must be discarded) and
checks them against the scheduler after every step.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field

from aiosched.async_scheduler import AsyncScheduler
from aiosched.config import EngineConfig
from aiosched.kv_cache import hash_block
from aiosched.protocol import SchedulerOutput, encode
from aiosched.request import Request, RequestStatus
from aiosched.sampling_params import SamplingParams
from aiosched.scheduler import Scheduler
from aiosched.executors.fake_runner import FakeModelRunner, reference_tokens


@dataclass
class Expected:
    tokens: list[int]
    finish_reason: str
    stop_reason: int | None


def penalties_of(sp: SamplingParams) -> dict:
    return dict(repetition_penalty=sp.repetition_penalty, presence_penalty=sp.presence_penalty,
                frequency_penalty=sp.frequency_penalty)


def model_tokens(prompt: list[int], max_tokens: int, vocab_size: int, seed: int, greedy: bool, min_tokens: int = 0,
                 masked: set[int] | None = None, context: int = 0, penalties: dict | None = None) -> list[int]:
    """`reference_tokens`, also for the fake runner's w-gram mode (`context` = w > 0: the next
    token depends on the last w tokens only, so greedy output cycles and n-gram drafts hit).
    `penalties`: repetition_penalty / presence_penalty / frequency_penalty, applied by the
    fake model over the request's own history."""
    penalties = penalties or {}
    if not context:
        return reference_tokens(prompt, max_tokens, vocab_size, seed, greedy, min_tokens, masked, **penalties)
    from aiosched.protocol import NewRequestData
    from aiosched.executors.fake_runner import _State

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 1.0, min_tokens=min_tokens, **penalties)
    st = _State(NewRequestData("ref", list(prompt), len(prompt), sp, seed, sorted(masked or ())))
    model = FakeModelRunner.__new__(FakeModelRunner)
    model.vocab_size, model.context = vocab_size, context
    for _ in range(max_tokens):
        st.tokens.append(model._next_token(st, len(st.tokens)))
    return st.tokens[len(prompt):]


def expected_output(prompt: list[int], sp: SamplingParams, seed: int, eos: list[int], vocab_size: int,
                    context: int = 0) -> Expected:
    """What the request must produce: the fake model alone, with stop rules applied here."""
    eos_set = set() if sp.ignore_eos else set(eos)
    masked = set(sp.stop_token_ids) | eos_set  # the model never emits these before min_tokens
    ref = model_tokens(prompt, sp.max_tokens, vocab_size, seed, sp.greedy, sp.min_tokens, masked, context, penalties_of(sp))
    out: list[int] = []
    for tok in ref:
        out.append(tok)
        if len(out) >= sp.min_tokens:
            if tok in eos_set:
                return Expected(out, "stop", None)
            if tok in sp.stop_token_ids:
                return Expected(out, "stop", tok)
    return Expected(out, "length", None)


@dataclass
class Tracked:
    req: Request
    expected: Expected
    received: list[int] = field(default_factory=list)
    done: str | None = None  # finish reason once finished or aborted


@dataclass
class InFlight:
    so: SchedulerOutput
    snapshot: bytes
    sampled: list[str]  # req ids with sample=True, batch order
    tables: dict[str, list[int]]  # the scheduler's block table of each scheduled request at submission


class HarnessError(AssertionError):
    pass


class Harness:
    def __init__(self, config: EngineConfig, check_every_step: bool = True, depth: int | None = None,
                 context: int = 0, vocab_size: int | None = None, runner_cls: type[FakeModelRunner] = FakeModelRunner) -> None:
        self.config = config
        self.runner = runner_cls(config)
        # The fake model's w-gram mode over a small vocabulary cycles quickly, so n-gram
        # speculative drafts get accepted (multi-token steps).
        self.context = context
        if context:
            assert hasattr(FakeModelRunner, "context"), "this fake runner has no w-gram mode"
            self.runner.context = context
        if vocab_size is not None:
            self.runner.vocab_size = vocab_size
        info = self.runner.load()
        self.vocab_size = info.vocab_size
        self.max_model_len = info.max_model_len
        cls = AsyncScheduler if config.async_scheduling else Scheduler
        self.sched: Scheduler = cls(config, info.num_kv_blocks, info.max_model_len)
        # Steps in flight: the engine uses the executor's max_concurrent_batches (2 with
        # async scheduling); `depth` 3 models a deeper executor pipeline, where the
        # scheduler is asked again before an earlier step's tokens have arrived.
        self.max_batches = depth or config.max_concurrent_batches
        self.in_flight: deque[InFlight] = deque()
        self.tracked: dict[str, Tracked] = {}
        self.expected_discards = 0
        self.check_every_step = check_every_step
        self.steps = 0
        self.stall = 0  # consecutive steps with requests alive but no token generated
        # running[0] computes min(its tokens, budget) every step, so it produces a token
        # within ceil(max_model_len / budget) steps plus the in-flight lag.
        self.stall_bound = math.ceil(self.max_model_len / config.max_num_batched_tokens) + 4
        self.counters: Counter[str] = Counter()
        self._ids = 0
        # Stop strings end a request in the engine right after its tokens are applied
        # (AsyncEngine._emit), before the next step is scheduled: a different point from
        # a user's abort. Each pending one ends the first request the next output updates.
        self.pending_stop_strings = 0

    # ---- user side ----

    def fits(self, prompt_len: int, max_tokens: int) -> bool:
        """The engine's admission checks (AsyncEngine._check_fits)."""
        total = prompt_len + max_tokens
        return 0 < prompt_len < self.max_model_len and total <= self.max_model_len and \
            self.sched.kv.blocks_needed(total) <= self.sched.kv.num_blocks

    def add(self, prompt: list[int], sp: SamplingParams, seed: int = 0, eos: list[int] | None = None,
            req_id: str | None = None) -> str:
        assert self.fits(len(prompt), sp.max_tokens), "request does not fit (the engine would reject it)"
        sp.validate(self.vocab_size)
        eos = list(eos or [])
        rid = req_id if req_id is not None else f"r{self._ids}"
        self._ids += 1
        req = Request(rid, list(prompt), sp, seed, eos)
        self.tracked[rid] = Tracked(req, expected_output(prompt, sp, seed, eos, self.vocab_size, self.context))
        self.sched.add_request(req)
        self.check()
        return rid

    def abort(self, rid: str) -> None:
        tr = self.tracked[rid]
        assert tr.done is None
        req = tr.req
        if req.status is RequestStatus.PREEMPTED:
            self.counters["abort_preempted"] += 1
        elif req.status is RequestStatus.WAITING:
            self.counters["abort_waiting"] += 1
        if req.num_output_placeholders:
            self.counters["abort_with_token_in_flight"] += 1
            if req.status is RequestStatus.PREEMPTED:
                self.counters["abort_preempted_with_token_in_flight"] += 1
        self.sched.finish_request(rid, "abort")
        assert req.is_finished and req.finish_reason == "abort"
        assert rid not in self.sched.requests
        tr.done = "abort"
        self.stall = 0  # the progress bound restarts: the request at the head may have changed
        self.check()

    def live(self) -> list[str]:
        return [rid for rid, tr in self.tracked.items() if tr.done is None]

    # ---- the engine loop ----

    def step(self) -> None:
        generated = 0
        if self.in_flight:
            generated = self._process_one()
            self.check()  # also between applying an output and scheduling the next step
        self._fill()
        self.steps += 1
        self.check()
        if self.sched.requests and generated == 0:
            self.stall += 1
            if self.stall > self.stall_bound:
                raise HarnessError(f"no progress for {self.stall} steps with {len(self.sched.requests)} requests alive "
                                   f"(running={[r.req_id for r in self.sched.running]}, "
                                   f"waiting={[r.req_id for r in self.sched.waiting]}, in flight={len(self.in_flight)})")
        else:
            self.stall = 0

    def idle(self) -> bool:
        return not (self.sched.requests or self.in_flight or self.sched._freed_for_worker)

    def drain(self, max_steps: int = 100_000) -> None:
        """Step until every request has ended and the worker has been told to forget it."""
        for _ in range(max_steps):
            if self.idle():
                break
            self.step()
        else:
            raise HarnessError("did not drain")
        self.check_drained()

    def _fill(self) -> None:
        """AsyncEngine._engine_loop: schedule and submit until enough steps are in flight."""
        while len(self.in_flight) < self.max_batches:
            if self.sched.waiting and self.sched.waiting[0].num_output_placeholders:
                self.counters["resume_waits_for_token_in_flight"] += 1
            before = self.sched.stats.preemptions
            so = self.sched.schedule()
            self._check_scheduler_output(so)
            if self.sched.stats.preemptions > before:
                self.counters["preemptions"] += self.sched.stats.preemptions - before
                for req in self.sched.waiting:
                    if req.status is RequestStatus.PREEMPTED and req.num_output_placeholders:
                        self.counters["preempted_with_token_in_flight"] += 1
            if so.is_empty and not so.freed_req_ids:
                break
            tables = {s.req_id: list(self.sched.kv.blocks[s.req_id]) for s in so.scheduled}
            self.in_flight.append(InFlight(so, encode(so), [s.req_id for s in so.scheduled if s.sample], tables))
            if so.is_empty:
                break

    def _check_scheduler_output(self, so: SchedulerOutput) -> None:
        cfg = self.config
        ids = [s.req_id for s in so.scheduled]
        assert len(ids) == len(set(ids)), f"step {so.step_id}: a request scheduled twice"
        assert len(ids) <= cfg.max_num_seqs
        total = sum(s.num_tokens for s in so.scheduled)
        assert total == so.total_num_tokens <= cfg.max_num_batched_tokens
        assert all(s.num_tokens >= 1 for s in so.scheduled)
        assert {n.req_id for n in so.new_requests} <= set(ids)
        by_id = {s.req_id: s for s in so.scheduled}
        for new in so.new_requests:
            # The worker's history (penalties, logprobs read it) is every known token,
            # prompt first; on resumption too.
            tr = self.tracked[new.req_id]
            assert new.token_ids == tr.req.prompt_token_ids + tr.received and new.prompt_len == len(tr.req.prompt_token_ids)
            assert new.seed == tr.req.seed and new.sampling is tr.req.sampling
            start = by_id[new.req_id].num_computed_tokens
            if tr.req.num_preemptions:
                self.counters["resumed"] += 1
                sp = tr.req.sampling
                if tr.received and (sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0):
                    self.counters["resumed_with_penalties"] += 1
                if start:
                    self.counters["resumed_with_prefix_hit"] += 1
            if start:
                self.counters["prefix_hits"] += 1
                blocks = self.sched.kv.blocks[new.req_id][: start // self.sched.kv.block_size]
                if any(self.sched.kv.pool.ref_cnt[b] > 1 for b in blocks):
                    self.counters["prefix_hit_on_shared_block"] += 1
        for s in so.scheduled:
            req = self.sched.requests[s.req_id]
            if not s.sample and s.num_computed_tokens + s.num_tokens < len(req.all_token_ids):
                self.counters["prefill_chunks"] += 1
        if any(s.sample and s.num_tokens == 1 for s in so.scheduled) and any(not s.sample for s in so.scheduled):
            self.counters["chunk_beside_decode"] += 1

    def _process_one(self) -> int:
        """Run the oldest step on the worker and apply its output (AsyncEngine._process)."""
        f = self.in_flight.popleft()
        if encode(f.so) != f.snapshot:
            raise HarnessError(f"step {f.so.step_id} was changed after it was submitted to the worker")
        # The diff protocol: a continuing request starts where the worker left it.
        new_ids = {n.req_id for n in f.so.new_requests}
        for sr in f.so.scheduled:
            if getattr(sr, "num_draft_slots", 0):
                # Speculative step: the scheduler sends an upper bound of the position
                # (async); the worker decodes from its own history.
                self.counters["spec_steps"] += 1
                if self.tracked[sr.req_id].req.status is RequestStatus.PREEMPTED:
                    self.counters["spec_step_lands_after_preemption"] += 1
            elif sr.req_id not in new_ids:
                st = self.runner.reqs[sr.req_id]
                assert sr.num_computed_tokens == st.num_computed, \
                    f"{sr.req_id}: step starts at {sr.num_computed_tokens}, the worker has computed {st.num_computed}"
            else:
                assert sr.num_computed_tokens % self.sched.kv.block_size == 0  # after prefix hits: whole blocks
        out = self.runner.execute(f.so).result()
        for rid, table in f.tables.items():  # the worker's block table is the scheduler's
            assert self.runner.reqs[rid].blocks == table, f"{rid}: worker block table {self.runner.reqs[rid].blocks} != {table}"
        assert out.req_ids == f.sampled
        alive = {rid for rid in out.req_ids if self.tracked[rid].done is None}
        must_discard = sum(len(t) for rid, t in zip(out.req_ids, out.sampled_token_ids) if rid not in alive)
        self.counters["spec_multi_token_outputs"] += sum(len(t) > 1 for t in out.sampled_token_ids)
        before = self.sched.stats.discarded_tokens
        preempted = {rid for rid in alive if self.tracked[rid].req.status is RequestStatus.PREEMPTED}
        updates = self.sched.update_from_output(f.so, out)
        discarded = self.sched.stats.discarded_tokens - before
        if discarded != must_discard:
            raise HarnessError(f"step {f.so.step_id}: {discarded} tokens discarded, expected {must_discard} "
                               f"(sampled for {out.req_ids})")
        self.expected_discards += must_discard
        self.counters["discarded"] += must_discard
        generated = 0
        seen = set()
        for upd in updates:
            rid = upd.req.req_id
            assert rid not in seen
            seen.add(rid)
            tr = self.tracked[rid]
            assert tr.done is None, f"{rid}: output after it ended ({tr.done})"
            n = len(tr.received)
            want = tr.expected.tokens[n : n + len(upd.new_token_ids)]
            if upd.new_token_ids != want:
                raise HarnessError(f"{rid}: tokens {n}..: got {upd.new_token_ids}, the model alone gives {want} "
                                   f"(expected {tr.expected.tokens}, preemptions {tr.req.num_preemptions})")
            tr.received += upd.new_token_ids
            generated += len(upd.new_token_ids)
            if upd.req.is_finished:
                tr.done = upd.req.finish_reason
                e = tr.expected
                if (tr.received, upd.req.finish_reason, upd.req.stop_reason) != (e.tokens, e.finish_reason, e.stop_reason):
                    raise HarnessError(f"{rid}: finished {upd.req.finish_reason}/{upd.req.stop_reason} with {tr.received}, "
                                       f"expected {e.finish_reason}/{e.stop_reason} with {e.tokens}")
                self.counters[f"finished_{e.finish_reason}"] += 1
                if rid in preempted:
                    self.counters["finished_while_preempted"] += 1
                if e.finish_reason == "stop" and upd.req.sampling.min_tokens:
                    self.counters["stop_after_min_tokens"] += 1
            elif len(tr.received) >= len(tr.expected.tokens):
                raise HarnessError(f"{rid}: has all {len(tr.received)} expected tokens but did not finish")
            elif self.pending_stop_strings and upd.new_token_ids:
                self.pending_stop_strings -= 1
                self.sched.finish_request(rid, "stop", "<stop string>")
                assert upd.req.is_finished and rid not in self.sched.requests
                tr.done = "stop_string"
                self.counters["stop_string"] += 1
        assert seen == alive, f"step {f.so.step_id}: samples for {sorted(alive - seen)} were lost"
        return generated

    # ---- invariants ----

    def check(self) -> None:
        if not self.check_every_step:
            return
        s = self.sched
        s.check_invariants()
        kv, pool, bs = s.kv, s.kv.pool, s.kv.block_size
        # Block pool: every block is owned or free, the hash index is a bijection.
        owned = {b for bl in kv.blocks.values() for b in bl}
        assert len(owned) + pool.num_free == pool.num_blocks
        for h, b in pool.cached.items():
            assert pool.block_hash[b] == h
        assert sum(h is not None for h in pool.block_hash) == len(pool.cached)
        # Requests: bookkeeping agrees with ours.
        in_flight = Counter(rid for f in self.in_flight for rid in f.sampled)
        assert set(s.requests) == {rid for rid, tr in self.tracked.items() if tr.done is None}
        for rid, req in s.requests.items():
            assert req.num_output_placeholders == in_flight[rid], \
                f"{rid}: {req.num_output_placeholders} placeholders, {in_flight[rid]} samples in flight"
            tr = self.tracked[rid]
            assert req.all_token_ids == req.prompt_token_ids + tr.received
            # Known + in flight (+ draft slots reserved by speculative steps in flight: an
            # upper bound of what those steps may add) never passes the stop length.
            slack = getattr(req, "num_spec_slack", 0)
            assert slack >= 0 and (slack == 0 or in_flight[rid])
            total = len(req.all_token_ids) + req.num_output_placeholders + slack
            assert total <= min(req.max_total_tokens, self.max_model_len)
            if req.status is RequestStatus.RUNNING:
                blocks = kv.blocks.get(rid, [])
                # Exact without speculation; with it, rejected drafts' blocks stay reserved.
                need = kv.blocks_needed(req.num_computed_tokens)
                assert len(blocks) == need or self.config.speculative is not None and len(blocks) >= need, \
                    f"{rid}: {len(blocks)} blocks for {req.num_computed_tokens} tokens"
                assert req.num_computed_tokens <= total
                # A block carries a hash only if its tokens are all known, and it is their hash.
                parent = None
                for i, b in enumerate(blocks):
                    if (i + 1) * bs > len(req.all_token_ids):
                        assert pool.block_hash[b] is None, f"{rid}: block {i} is cached but its tokens are not all known"
                        break
                    parent = hash_block(parent, tuple(req.all_token_ids[i * bs : (i + 1) * bs]))
                    h = pool.block_hash[b]
                    assert h is None or h == parent, f"{rid}: block {i} ({b}) is cached under another content's hash"
            else:
                assert rid not in kv.blocks and req.num_computed_tokens == 0

    def check_drained(self) -> None:
        s = self.sched
        assert self.idle()
        s.check_invariants()
        assert not s.requests and not s.running and not s.waiting
        assert s.kv.num_free_blocks == s.kv.num_blocks, f"KV blocks leaked: {s.kv.num_blocks - s.kv.num_free_blocks}"
        assert not s.kv.blocks and not s.kv.hashes and not s.kv.num_registered
        assert not self.runner.reqs, f"the worker still holds {sorted(self.runner.reqs)}"
        assert s.stats.discarded_tokens == self.expected_discards
        for rid, tr in self.tracked.items():
            assert tr.done is not None, f"{rid} never finished"
