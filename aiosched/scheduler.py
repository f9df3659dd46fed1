"""Continuous batching over a paged KV cache: the sync (one step at a time) scheduler.

Each step: running requests first (decodes and unfinished prefill chunks), then
waiting requests fill the token budget (chunked prefill). When blocks run out the
latest running request is preempted (recompute later). The output is a diff for
the worker: new requests in full, the rest as deltas. `AsyncScheduler` is a small
subclass that schedules one step ahead of the outputs.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from aiosched.config import EngineConfig
from aiosched.kv_cache import KVCacheManager
from aiosched.protocol import NewRequestData, RunnerOutput, ScheduledRequest, SchedulerOutput
from aiosched.request import Request, RequestStatus


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens to compute (not prefix-cache hits), counted when a request is first admitted
    discarded_tokens: int = 0  # sampled for requests that had already finished
    draft_tokens: int = 0
    accepted_tokens: int = 0
    spec_steps: int = 0  # (request, step) pairs verified with draft slots
    spec_step_tokens: int = 0  # tokens those produced (accepted drafts + one each)


# An empty id list shared by every ScheduledRequest that has no new blocks / no drafts
# (most of them, every step): immutable, so sharing it is safe, and not one more
# GC-tracked list per request per step. It encodes as an empty array like [].
_NO_IDS: tuple[int, ...] = ()


class StepUpdate(msgspec.Struct, gc=False):
    """What one step's output did to one request (not tracked by the cyclic GC)."""

    req: Request
    new_token_ids: list[int] = msgspec.field(default_factory=list)


class StepUpdates:
    """What one step's output did, as two parallel lists: the requests that received
    tokens, in output order, and each one's new tokens. No object per request per step;
    iterating (or indexing) gives `StepUpdate`s, built then."""

    __slots__ = ("reqs", "new_token_ids")

    def __init__(self) -> None:
        self.reqs: list[Request] = []
        self.new_token_ids: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.reqs)

    def __iter__(self) -> Iterator[StepUpdate]:
        return map(StepUpdate, self.reqs, self.new_token_ids)

    def __getitem__(self, i: int) -> StepUpdate:
        return StepUpdate(self.reqs[i], self.new_token_ids[i])


def lookahead_new_tokens(self: "Scheduler", req: Request) -> int:
    """Tokens a request could compute now when the scheduler runs one step ahead: its
    known tokens plus those in flight (placeholders, draft slack) are an upper bound on
    its length. `AsyncScheduler._num_new_tokens`; `Scheduler.schedule` inlines it."""
    total = len(req.all_token_ids) + req.num_output_placeholders + req.num_spec_slack  # upper bound
    if total >= req.stop_length:
        return 0  # the last token it may produce is already in flight
    return total - req.num_computed_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, num_kv_blocks: int, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._freed_for_worker: list[str] = []  # worker must forget these
        self._step_id = 0
        self.stats = SchedulerStats()
        self.drafting = True  # speculative drafts in the next steps (the engine's SpecPolicy turns it off)
        self._inline_lookahead = type(self)._num_new_tokens is lookahead_new_tokens

    # ---- requests in and out ----

    def add_request(self, req: Request) -> None:
        # Fixed for the request's lifetime, and read for every running request every step.
        req.stop_length = min(req.max_total_tokens, self.max_model_len)
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def finish_request(self, req_id: str, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish (stop, length) or abort. Blocks return to the pool at once: any step
        still in flight for this request runs before any later step that reuses them."""
        req = self.requests.pop(req_id, None)
        if req is None or req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._freed_for_worker.append(req_id)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- scheduling ----

    def _num_new_tokens(self, req: Request) -> int:
        """Tokens the request could compute now. Sync: every known token is known."""
        assert req.num_output_placeholders == 0, "sync scheduler: output still pending"
        known = len(req.all_token_ids)
        if known >= req.stop_length:
            return 0
        return known - req.num_computed_tokens

    def _can_admit(self, req: Request) -> bool:
        return True

    def _uses_spec(self, req: Request) -> bool:
        # Speculative decoding on, and the request uses no feature the verifier lacks.
        return self.config.speculative is not None and req.may_speculate

    def _draft_slots(self, req: Request, budget: int) -> int:
        # Draft slots for a decode step, counted against the upper bound of the
        # request's length once its steps in flight land.
        assert self.config.speculative is not None
        total = len(req.all_token_ids) + req.num_output_placeholders + req.num_spec_slack
        return max(0, min(self.config.speculative.num_tokens, req.stop_length - total - 1, budget - 1))

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        new_reqs: list[NewRequestData] = []
        preempted = False
        # Hot loop (every running request, every step): bound methods and flags hoisted,
        # and `_schedule_tokens` inlined. In steady-state decoding a request's step stays
        # inside its last block (no `allocate`) and no block of it becomes full (no
        # `cache_full_blocks`), so it costs a few attribute updates and one ScheduledRequest.
        running = self.running
        # The one-step-ahead count (`lookahead_new_tokens`) inlined when the class uses it;
        # any other `_num_new_tokens` (the sync scheduler's, a subclass's) is called.
        inline_count = self._inline_lookahead
        num_new_tokens = self._num_new_tokens
        allocate = self.kv.allocate
        cache_full_blocks = self.kv.cache_full_blocks
        caching = self.kv.enable_caching
        spec_on = self.config.speculative is not None
        # Drafting may be off for this step (the engine's policy, or too many requests); a
        # request whose speculative step is still in flight waits for it either way.
        drafting = spec_on and self.drafting and not (0 < self.config.speculative.disable_by_batch_size <= len(running))
        append = scheduled.append

        # A for loop over the list: preemption removes requests only from its back (and
        # stops at the current one), which the list iterator sees as a shorter list.
        for req in running:
            if budget <= 0:
                break
            if inline_count:
                n = len(req.all_token_ids) + req.num_output_placeholders + req.num_spec_slack
                n = 0 if n >= req.stop_length else n - req.num_computed_tokens
            else:
                n = num_new_tokens(req)
            if n > budget:
                n = budget
            d = 0
            if spec_on and n == 1:  # (only requests that may speculate ever have spec slack)
                if drafting and req.may_speculate:
                    d = self._draft_slots(req, budget)
                if d == 0 and req.num_spec_slack:
                    n = 0  # its position is known only once its speculative step lands
                n += d
            if n <= 0:
                continue
            start = req.num_computed_tokens
            end = start + n
            if end <= req.num_kv_slots:
                new_blocks: list[int] = _NO_IDS  # type: ignore[assignment]
            else:
                new_blocks = allocate(req, n)
                while new_blocks is None:  # out of blocks: preempt from the back
                    victim = running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                    new_blocks = allocate(req, n)
                if new_blocks is None:
                    break
            # _schedule_tokens, for a request that is running (so it was scheduled before).
            req.num_computed_tokens = end
            known = len(req.all_token_ids)
            # Sample when this step reaches the end of the sequence (known + placeholders).
            sample = d > 0 or end == known + req.num_output_placeholders
            if sample:
                req.num_output_placeholders += 1
            if d:
                req.num_spec_slack += d  # KV reserved for the drafts; the step yields 1..1+d tokens
            if caching and (end if end < known else known) >= req.next_full_block_at:
                cache_full_blocks(req)
            append(ScheduledRequest(req.req_id, n, start, new_blocks, sample, _NO_IDS, d))
            budget -= n

        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not self._can_admit(req):
                break
            # Prompt logprobs need every prompt position computed: no prefix-cache hits.
            cached = self.kv.find_cached_prefix(req) if req.sampling.prompt_logprobs is None else []
            num_cached = len(cached) * self.config.block_size
            n = min(len(req.all_token_ids) - num_cached, budget)
            req.num_computed_tokens = num_cached
            new_blocks = self.kv.allocate(req, n, cached)
            if new_blocks is None:
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if req.num_preemptions == 0:
                self.kv.record_lookup(req.num_prompt_tokens, num_cached)
                req.num_cached_prompt_tokens = num_cached
                self.stats.prompt_tokens += req.num_prompt_tokens - num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            new_reqs.append(
                NewRequestData(
                    req_id=req.req_id,
                    token_ids=req.all_token_ids.tolist(),
                    prompt_len=req.num_prompt_tokens,
                    sampling=req.sampling,
                    seed=req.seed,
                    eos_token_ids=[] if req.sampling.ignore_eos else req.eos_token_ids,
                )
            )
            scheduled.append(self._schedule_tokens(req, n, new_blocks))
            budget -= n

        self._step_id += 1
        self.stats.steps += 1
        freed, self._freed_for_worker = self._freed_for_worker, []
        return SchedulerOutput(
            step_id=self._step_id,
            new_requests=new_reqs,
            scheduled=scheduled,
            freed_req_ids=freed,
            total_num_tokens=self.config.max_num_batched_tokens - budget,
        )

    def _schedule_tokens(self, req: Request, n: int, new_blocks: list[int], draft_slots: int = 0) -> ScheduledRequest:
        start = req.num_computed_tokens
        computed = req.num_computed_tokens = start + n
        # Sample when this step reaches the end of the sequence (known + placeholders).
        sample = draft_slots > 0 or computed == len(req.all_token_ids) + req.num_output_placeholders
        if sample:
            req.num_output_placeholders += 1
        # Speculative: KV reserved for the drafts; the step yields 1..1+draft_slots tokens.
        req.num_spec_slack += draft_slots
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        self.kv.cache_full_blocks(req)
        return ScheduledRequest(req.req_id, n, start, new_blocks, sample, _NO_IDS, draft_slots)

    def _preempt(self, req: Request) -> None:
        """Recompute later: drop its blocks and worker state, back to the front of the queue.

        A token already in flight for it stays valid (its KV was intact when that step
        ran) and is appended when it arrives; the request is not re-admitted before."""
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)
        self._freed_for_worker.append(req.req_id)

    # ---- outputs ----

    def update_from_output(self, so: SchedulerOutput, out: RunnerOutput) -> StepUpdates:
        """Resolve placeholders with real tokens; apply stop conditions. Returns each
        request that received tokens (finished ones included) with its new tokens."""
        updates = StepUpdates()
        slots = {sr.req_id: sr.num_draft_slots for sr in so.scheduled if sr.num_draft_slots} if self.config.speculative else None
        # Hot loop (every sampled request, every step): lookups hoisted, the common case
        # (one token that stops nothing and fills no block) without a function call.
        requests, stats, append_req, append_ids = self.requests, self.stats, updates.reqs.append, updates.new_token_ids.append
        check_stop, cache_full_blocks = self._check_stop, self.kv.cache_full_blocks
        caching = self.kv.enable_caching
        running = RequestStatus.RUNNING
        generated = 0
        for req_id, tokens in zip(out.req_ids, out.sampled_token_ids):
            req = requests.get(req_id)
            if req is None:  # finished or aborted while this step was in flight
                stats.discarded_tokens += len(tokens)
                continue
            d = slots.get(req_id, 0) if slots else 0
            if d:
                # The step was counted as yielding 1 + d tokens (KV reserved, positions
                # bounded): correct by what it did yield. Rejected drafts' KV slots lie
                # past the computed count and are simply recomputed over later.
                assert 1 <= len(tokens) <= 1 + d, f"{req_id}: {len(tokens)} tokens from a step with {d} draft slots"
                req.num_spec_slack -= d
                if req.status is running:
                    req.num_computed_tokens -= 1 + d - len(tokens)
                stats.spec_steps += 1
                stats.spec_step_tokens += len(tokens)
            placeholders = req.num_output_placeholders - 1
            assert placeholders >= 0, f"{req_id}: placeholder count went negative"
            req.num_output_placeholders = placeholders
            all_ids = req.all_token_ids
            if len(tokens) == 1:  # the usual case: one token, which cannot stop it unless in the set or at the length
                t = tokens[0]
                all_ids.append(t)
                new_ids = tokens  # the runner output's own list, read-only from here on
                if t in req.stop_token_set or len(all_ids) >= req.stop_length:
                    reason = check_stop(req, t)
                    if reason is not None:
                        self.finish_request(req_id, *reason)
                generated += 1
            else:
                new_ids = []
                for t in tokens:
                    all_ids.append(t)
                    new_ids.append(t)
                    reason = check_stop(req, t)
                    if reason is not None:
                        self.finish_request(req_id, *reason)
                        break
                generated += len(new_ids)
            if caching and req.status is running:
                # cache_full_blocks' own first test, inlined: is a block newly full?
                c, known = req.num_computed_tokens, len(all_ids)
                if (c if c < known else known) >= req.next_full_block_at:
                    cache_full_blocks(req)
            append_req(req)
            append_ids(new_ids)
        stats.generated_tokens += generated
        stats.draft_tokens += out.num_draft_tokens
        stats.accepted_tokens += out.num_accepted_tokens
        return updates

    def _check_stop(self, req: Request, token: int) -> tuple[str, int | str | None] | None:
        sp = req.sampling
        num_tokens = len(req.all_token_ids)
        num_output = num_tokens - req.num_prompt_tokens
        if num_output >= sp.min_tokens:
            if not sp.ignore_eos and token in req.eos_token_ids:
                return ("stop", None)
            if token in sp.stop_token_ids:
                return ("stop", token)
        if num_output >= sp.max_tokens or num_tokens >= self.max_model_len:
            return ("length", None)
        return None

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        bs = self.kv.block_size
        for req in self.running:
            assert req.num_kv_slots == len(self.kv.blocks.get(req.req_id, ())) * bs, f"{req.req_id}: num_kv_slots out of date"
            assert req.num_output_placeholders >= 0
            assert 0 <= req.num_spec_slack
            assert req.status is RequestStatus.RUNNING
        for req in self.waiting:
            assert req.num_computed_tokens == 0 and req.num_kv_slots == 0
        assert len(self.running) + len(self.waiting) == len(self.requests)
