"""AsyncEngine: the public entry point. One event loop owns the scheduler coroutine.

The loop keeps up to `max_concurrent_batches` steps in flight: with async
scheduling it builds and submits step N+1 before awaiting step N's output, so the
accelerator never waits for Python. The engine reaches executors only through
`aiosched.executors.base` (interface + registry).
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec

from aiosched import detokenizer, draft_replay, engine_log, preflight
from aiosched.async_scheduler import AsyncScheduler
from aiosched.config import EngineConfig
from aiosched.detokenizer import IncrementalDetokenizer
from aiosched.errors import EngineDeadError, EngineNotRunningError, EngineOverloadedError
from aiosched.outputs import PIECES_PER_CHUNK, CompletionOutput, RequestMetrics, RequestOutput, SampleHistory, TokenLogprob
from aiosched.protocol import Logprobs, RunnerOutput, SchedulerOutput, WorkerInfo
from aiosched.request import Request, RequestStatus
from aiosched.request_stream import RequestStream
from aiosched.sampling_params import SamplingParams
from aiosched.scheduler import Scheduler
from aiosched.spec_policy import Estimate, SpecPolicy
from aiosched.structured import validate_structured
from aiosched.tokenizer import Tokenizer
from aiosched.executors.base import Executor, create_executor

log = logging.getLogger("aiosched")

_FINISHED = RequestStatus.FINISHED


@dataclass(slots=True)  # attribute reads per request per step: no instance dict
class _Group:
    """One generate() call: `n` parallel samples sharing a stream (and prompt blocks).

    With `best_of > n`, `best_of` samples run and only the final output is sent: the
    `n` with the highest cumulative logprob, re-indexed 0..n-1."""

    user_id: str
    prompt: str | None
    stream: RequestStream
    children: list[str] = field(default_factory=list)  # internal request ids, by sample index
    latest: dict[int, CompletionOutput] = field(default_factory=dict)
    num_finished: int = 0
    n: int = 1  # samples returned
    want_logprobs: bool = False  # the user asked for per-token logprobs
    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # by prompt position; [0] is None
    prompt_logprobs_sent: bool = False

    @property
    def best_of(self) -> bool:
        return len(self.children) > self.n


@dataclass(slots=True)
class _Tracked:
    """Engine-side state of one live sample."""

    group: _Group
    index: int
    detok: IncrementalDetokenizer | None
    # Cumulative tokens/text/logprobs, append-only: each output is a view of a prefix.
    hist: SampleHistory = field(default_factory=SampleHistory)
    cumulative_logprob: float | None = None  # set once the worker returns logprobs
    # stream_interval > 1: tokens (and their text) held back since the last output
    held_ids: list[int] = field(default_factory=list)
    held_text: str = ""
    # The one-pass path of `_process` applies: one sample (no n > 1, no best_of), no
    # logprobs of any kind, no stop strings (set once, in generate()).
    plain: bool = False


@dataclass
class EngineTimings:
    """Where the engine loop's time goes (for the scheduler-vs-model split)."""

    steps: int = 0  # step outputs applied
    submitted: int = 0  # steps handed to the executor (== steps: none in flight)
    schedule_s: float = 0.0  # building SchedulerOutputs
    submit_s: float = 0.0  # handing them to the executor (executor.submit)
    update_s: float = 0.0  # applying outputs, detokenizing, streaming
    wait_s: float = 0.0  # awaiting the executor (model time not hidden by overlap)
    started: float = 0.0


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._stream_interval = config.stream_interval
        self.tokenizer: Tokenizer | None = None
        self.info: WorkerInfo | None = None
        self.scheduler: Scheduler | None = None
        self._executor: Executor | None = None
        self._live: dict[str, _Tracked] = {}  # internal id -> state
        self._by_user_id: dict[str, _Group] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._wakeup = anyio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the engine was started in
        self._thread_id: int | None = None
        self._dead: BaseException | None = None
        self._running = False
        self.timings = EngineTimings()
        # Speculative decoding: keep drafting only while measured throughput says it pays.
        spec = config.speculative
        self.spec_policy: SpecPolicy | None = SpecPolicy(estimate=self._spec_estimate) if spec is not None and spec.auto else None
        self._clock = time.perf_counter  # the policy's clock (tests drive it by hand)
        # on_request(request_id, prompt_ids, params) / on_output(RequestOutput): Prometheus
        # metrics and request logs (aiosched.metrics, aiosched.engine_log); empty: no cost.
        self._observers: list[Any] = []
        self._log_task: asyncio.Task[None] | None = None
        self.stats_logger: "engine_log.StatsLogger | None" = None  # the periodic stats line (log_stats_interval_s > 0)

    # ---- lifecycle ----

    @classmethod
    def from_config(cls, config: "EngineConfig | dict[str, Any] | str | os.PathLike[str] | None" = None, **overrides: Any) -> "AsyncEngine":
        return cls(EngineConfig.load(config, **overrides))

    async def start(self) -> "AsyncEngine":
        if self._running:
            return self
        t_start = time.perf_counter()
        preflight.check_startup(self.config)  # one clear ValueError for what would fail late
        # The tokenizer (and its EOS ids) must be the runner's model's. The fake runner runs
        # only a model dir it is given, never the embedded default model.
        fake_without_model = self.config.runner == "fake" and self.config.model is None
        model_dir = None if fake_without_model else self.config.resolved_model
        if model_dir is not None and os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            self.tokenizer = Tokenizer(model_dir)
            detokenizer.warm(self.tokenizer)  # every token's text known before the first output (the default skip_special_tokens)
        self._executor = create_executor(self.config)
        try:
            self.info = await self._executor.start()
        except BaseException:
            await self._executor.shutdown()
            raise
        # Long-lived objects (model, tokenizer, modules) leave the GC's view: full
        # collections then stay short and do not stall the loop.
        gc.collect()
        gc.freeze()
        sched_cls = AsyncScheduler if self.config.async_scheduling else Scheduler
        self.scheduler = sched_cls(self.config, self.info.num_kv_blocks, self.info.max_model_len)
        if self.spec_policy is not None:
            self.scheduler.drafting = self.spec_policy.drafting  # it measures without drafts first
        # A plain task, not a task group held open across calls: start() and shutdown()
        # may run in different tasks (web-framework lifespans, test fixtures).
        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        self._task = self._loop.create_task(self._engine_loop(), name="aiosched-engine")
        self._running = True
        self.timings.started = time.perf_counter()
        self._log_task = engine_log.on_started(self, self.timings.started - t_start)
        return self

    async def shutdown(self) -> None:
        if self._loop is not None and self._loop.is_closed():
            # Its loop is gone (a second asyncio.run): its tasks died with it; release the rest.
            self._task = self._log_task = None
        if self._log_task is not None:
            self._log_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._log_task
            self._log_task = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._running = False
        self._fail_all(EngineDeadError("engine was shut down"))
        if self._executor is not None:
            await self._executor.shutdown()

    async def __aenter__(self) -> "AsyncEngine":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def add_observer(self, observer: Any) -> None:
        """Call `observer.on_request(request_id, prompt_token_ids, params)` for every request
        and `observer.on_output(request_output)` for every output (on the engine's loop)."""
        if observer not in self._observers:
            self._observers.append(observer)

    # ---- requests ----

    def default_sampling_params(self, **fields: Any) -> SamplingParams:
        """`SamplingParams(**fields)`, with the checkpoint's generation_config.json values
        (temperature, top_p, top_k, min_p, repetition_penalty) for the fields not given."""
        defaults = {} if self.tokenizer is None else self.tokenizer.generation_defaults
        return SamplingParams(**{**defaults, **fields})

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> RequestStream:
        """Queue a request; await the result for the final output or `async for` to stream.

        Raises ValueError (naming the field) for bad input, EngineOverloadedError when
        the waiting queue is full, EngineDeadError when the engine died."""
        self._check_loop("generate()")
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead}")
        if not self._running or self.scheduler is None or self.info is None:
            raise EngineNotRunningError("engine is not running: use `async with engine:` or `await engine.start()`")
        params = params if params is not None else self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate(self.info.vocab_size)
        self._check_supported(params)
        prompt_text, prompt_ids = self._tokenize(prompt)
        self._check_fits(prompt_ids, params)
        if self.scheduler.num_waiting >= self.config.max_waiting_requests:
            raise EngineOverloadedError(f"{self.scheduler.num_waiting} requests are waiting (max_waiting_requests={self.config.max_waiting_requests})")
        user_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if not isinstance(user_id, str) or not user_id:
            raise ValueError("request_id must be a non-empty string")
        if user_id in self._by_user_id:
            raise ValueError(f"request_id {user_id!r} is already in use by a running request")
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        eos = [] if self.tokenizer is None else self.tokenizer.eos_token_ids
        group = _Group(user_id, prompt_text, RequestStream(user_id, lambda: self._abort_group(group)), n=params.n,
                       want_logprobs=params.logprobs is not None, prompt_ids=prompt_ids)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None] * len(prompt_ids)
        num_samples = max(params.n, params.best_of or 0)
        worker_params = params
        if num_samples > params.n and params.logprobs is None:
            # best_of ranks samples by cumulative logprob: the worker must compute it.
            worker_params = msgspec.structs.replace(params, logprobs=0)
        self._by_user_id[user_id] = group
        for obs in self._observers:
            obs.on_request(user_id, prompt_ids, params)
        serial = next(self._ids)
        for index in range(num_samples):
            internal = f"{user_id}#{serial}.{index}"
            # Each sample gets its own seed stream; the same user seed gives the same samples.
            req = Request(internal, prompt_ids, worker_params, base_seed + index, eos)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens, params.include_stop_str_in_output)
            plain = (num_samples == 1 and worker_params.logprobs is None and params.prompt_logprobs is None and not params.stop)
            self._live[internal] = _Tracked(group, index, detok, plain=plain)
            group.children.append(internal)
            self.scheduler.add_request(req)
        self._wakeup.set()
        return group.stream

    def _check_loop(self, what: str) -> None:
        """The engine serves the one event loop it was started in: anything else fails now."""
        loop = self._loop
        if loop is None:
            return
        if loop.is_closed():
            raise RuntimeError(f"{what}: the event loop this engine was started in is closed (e.g. a second asyncio.run()); "
                               "an AsyncEngine lives in one event loop: create and start a new engine in this one")
        if threading.get_ident() != self._thread_id:
            raise RuntimeError(f"{what} called from another thread: an AsyncEngine serves only the event loop it was started in "
                               "(from another thread, use asyncio.run_coroutine_threadsafe(coro, loop) with that loop)")
        running = asyncio._get_running_loop()  # None: this thread, outside the loop (it runs the request when it runs)
        if running is not None and running is not loop:
            raise RuntimeError(f"{what} called from another event loop: an AsyncEngine serves only the event loop it was started in")

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, request_id: str | None = None,
             **template_kwargs: Any) -> RequestStream:
        """`generate()` on OpenAI-style `messages` rendered with the model's chat template.

        `template_kwargs` go to `aiosched.chat_template.apply_chat_template` (`tools`,
        `add_generation_prompt`, `chat_template`, or template variables such as
        `enable_thinking`). A missing template or a conversation it rejects is a ValueError."""
        from aiosched.chat_template import apply_chat_template

        if self.tokenizer is None and not self._running:
            raise EngineNotRunningError("engine is not running: use `async with engine:` or `await engine.start()`")
        ids = apply_chat_template(self.tokenizer, messages, tokenize=True, **template_kwargs)
        return self.generate(ids, params, request_id)

    def abort(self, request_id: str) -> None:
        """Abort by the id given to (or returned from) generate(); all its samples."""
        group = self._by_user_id.get(request_id)
        if group is not None:
            self._abort_group(group)

    def _abort_group(self, group: _Group) -> None:
        for internal in list(group.children):
            self._abort_internal(internal)

    def _abort_internal(self, internal: str) -> None:
        if self.scheduler is None or internal not in self._live:
            return
        req = self.scheduler.requests.get(internal)
        self.scheduler.finish_request(internal, "abort")
        if req is not None:
            self._emit(req, [], final_text="")
        else:
            self._forget(internal)

    def _check_supported(self, params: SamplingParams) -> None:
        assert self.info is not None
        needs = {"logprobs": ("logprobs", params.logprobs is not None),
                 "best_of": ("logprobs", params.best_of is not None and params.best_of > params.n),
                 "prompt_logprobs": ("prompt_logprobs", params.prompt_logprobs is not None)}
        for name, (feature, used) in needs.items():
            if used and feature not in self.info.features:
                raise ValueError(f"{name}: not supported by the {self.info.runner!r} runner")
        if params.structured is not None:
            if "structured_output" not in self.info.features:
                raise ValueError(f"structured: not supported by the {self.info.runner!r} runner of this model "
                                 "(needs tokenizer.json in the model dir and the llguidance package)")
            # Cheap (cached per spec, no torch): a bad spec fails here, before any scheduling.
            validate_structured(params.structured)

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        assert self.info is not None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer.json in the model dir; pass token ids")
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            text = None
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.info.vocab_size:
                    raise ValueError(f"prompt: token id {t!r} is out of range [0, {self.info.vocab_size})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt: must not be empty")
        return text, ids

    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        assert self.info is not None and self.scheduler is not None
        max_len = self.info.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"prompt: {len(ids)} tokens, but max_model_len is {max_len} (the prompt must leave room for one new token)")
        if len(ids) + params.max_tokens > max_len:
            raise ValueError(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len ({max_len})")
        need = self.scheduler.kv.blocks_needed(len(ids) + params.max_tokens)
        if need > self.info.num_kv_blocks:
            raise ValueError(f"max_tokens: the request needs up to {need} KV blocks but the cache has {self.info.num_kv_blocks}; lower max_tokens or the prompt length")

    # ---- the loop ----

    async def _engine_loop(self) -> None:
        assert self.scheduler is not None and self._executor is not None
        sched, ex = self.scheduler, self._executor
        in_flight: deque[tuple[SchedulerOutput, Any]] = deque()
        max_batches = ex.max_concurrent_batches
        t = self.timings
        policy, last_out = self.spec_policy, None  # last_out: (time, generated tokens) at the previous output
        try:
            while True:
                if not in_flight and not sched.has_unfinished() and not sched._freed_for_worker:
                    self._wakeup = anyio.Event()
                    last_out = None  # idle time is not step time
                    await self._wakeup.wait()
                while len(in_flight) < max_batches:
                    t0 = time.perf_counter()
                    so = sched.schedule()
                    t1 = time.perf_counter()
                    t.schedule_s += t1 - t0
                    if so.is_empty and not so.freed_req_ids:
                        break
                    in_flight.append((so, ex.submit(so)))
                    t.submit_s += time.perf_counter() - t1
                    t.submitted += 1
                    if so.is_empty:
                        break
                if not in_flight:
                    await anyio.sleep(0.001)  # nothing runnable right now (e.g. all blocked); don't spin
                    continue
                so, fut = in_flight.popleft()
                t0 = time.perf_counter()
                out: RunnerOutput = await fut
                t1 = time.perf_counter()
                t.wait_s += t1 - t0
                self._process(so, out)
                t.update_s += time.perf_counter() - t1
                t.steps += 1
                if policy is not None:
                    last_out = self._observe_spec(policy, sched, last_out, so)
        except anyio.get_cancelled_exc_class():
            for _, fut in in_flight:
                fut.cancel()
            raise
        except BaseException as e:  # the engine must never take the host app down
            log.exception("engine loop died")
            self._dead = e if isinstance(e, EngineDeadError) else EngineDeadError(f"engine loop failed: {e!r}")
            self._fail_all(self._dead)

    def _observe_spec(self, policy: SpecPolicy, sched: Scheduler, last: tuple[float, int] | None,
                      so: SchedulerOutput) -> tuple[float, int]:
        """Feed one step output's tokens and wall time to the speculation policy (and
        whether the step computed prompt chunks, which the policy does not measure)."""
        now, gen = self._clock(), sched.stats.generated_tokens
        if last is not None:
            prompt_work = policy.measuring and any(not sr.sample or sr.num_tokens > 1 + sr.num_draft_slots for sr in so.scheduled)
            # Without prompt work every scheduled request decoded (the count matters only then).
            policy.observe(gen - last[1], now - last[0], prompt_work, len(so.scheduled))
            sched.drafting = policy.drafting
        return now, gen

    def _spec_estimate(self) -> Estimate:
        """What drafting would yield on the running requests' text (SpecPolicy.estimate):
        the n-gram proposer replayed over the last generated tokens of at most
        `draft_replay.REQUESTS` of them that may draft (aiosched/draft_replay.py). Called by
        the policy once per measuring round, never per step."""
        sched, spec = self.scheduler, self.config.speculative
        assert sched is not None and spec is not None
        picked = draft_replay.spread([r for r in sched.running if r.may_speculate])
        steps, tokens = draft_replay.replay_batch(((r.all_token_ids, r.num_prompt_tokens) for r in picked),
                                                  spec.num_tokens, spec.ngram_min, spec.ngram_max,
                                                  lookback=draft_replay.ESTIMATE_LOOKBACK)
        return Estimate(batch=len(sched.running), steps=steps, tokens=tokens)

    def _process(self, so: SchedulerOutput, out: RunnerOutput) -> None:
        """Apply one step's output: the scheduler's update, then each request's output.

        One pass over the step's requests. The common case (one new token, a plain
        request that did not finish, stream_interval 1) is built here without `_emit`'s
        branches; everything else (finish, several tokens, n > 1, best_of, logprobs,
        stop strings, held-back outputs) goes through `_emit`. Both build the same output."""
        assert self.scheduler is not None
        now = time.monotonic()
        lps: dict[str, Logprobs] | None = None
        if out.logprobs is not None:
            lps = {rid: lp for rid, lp in zip(out.req_ids, out.logprobs) if lp is not None}
        if out.prompt_logprobs:
            self._add_prompt_logprobs(so, out.prompt_logprobs)
        emit, live, observers = self._emit, self._live, self._observers
        one_pass = self._stream_interval == 1
        ups = self.scheduler.update_from_output(so, out)
        for req, new_ids in zip(ups.reqs, ups.new_token_ids):
            if req.first_token_time is None and new_ids:
                req.first_token_time = now
            tr = live.get(req.req_id)
            if tr is None:
                continue
            if not (one_pass and tr.plain and len(new_ids) == 1 and req.status is not _FINISHED):
                emit(req, new_ids, None, lps.get(req.req_id) if lps else None, now)
                continue
            t = new_ids[0]
            hist, detok = tr.hist, tr.detok
            new_text = ""
            if detok is not None:
                # IncrementalDetokenizer.push's first case, inlined: a clean token at a character boundary
                if detok.fast and (new_text := detok.clean.get(t)) is not None:  # type: ignore[union-attr]
                    detok.last = t
                else:
                    new_text = detok.push(t)
                if new_text:  # SampleHistory.add_text, inlined
                    tail = hist.pieces
                    tail.append(new_text)
                    hist.num_chars += len(new_text)
                    if len(tail) >= PIECES_PER_CHUNK:
                        hist.join_pieces()
            hist.token_ids.append(t)
            group = tr.group
            comp = CompletionOutput(0, new_text, new_ids, None, None, None, hist, len(hist.token_ids), hist.num_chars, -1)
            metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time, now, None,
                                     req.num_cached_prompt_tokens, req.num_preemptions)
            ro = RequestOutput(group.user_id, group.prompt, req.prompt_token_ids, [comp], False, metrics, None)
            for obs in observers:
                obs.on_output(ro)
            # RequestStream.put, inlined for an output that is not the final one; a stream
            # whose consumer left (the request is being aborted) takes nothing.
            stream = group.stream
            if not (stream._closed or stream._left):
                stream._items.append(ro)
                w = stream._waiter
                if w is not None:
                    stream._waiter = None
                    if not w.done():
                        w.set_result(None)

    def _add_prompt_logprobs(self, so: SchedulerOutput, plp: dict[str, Logprobs]) -> None:
        """A chunk [start, end) of the prompt gives the logprobs of prompt tokens start+1 ..
        min(end, prompt_len)-1. Stored by position, so recomputation (preemption) is idempotent."""
        for sr in so.scheduled:
            lp = plp.get(sr.req_id)
            tr = self._live.get(sr.req_id)
            if lp is None or tr is None or tr.group.prompt_logprobs is None:
                continue
            store, prompt = tr.group.prompt_logprobs, tr.group.prompt_ids
            for i, v in enumerate(lp.token_logprobs):
                pos = sr.num_computed_tokens + 1 + i
                if pos >= len(prompt):
                    break
                store[pos] = TokenLogprob(prompt[pos], v, list(zip(lp.top_token_ids[i], lp.top_logprobs[i])))

    def _emit(self, req: Request, new_ids: list[int], final_text: str | None = None, logprobs: Logprobs | None = None,
              now: float | None = None) -> None:
        """Turn a request's new tokens into a RequestOutput on its stream: O(new tokens)."""
        assert self.scheduler is not None
        tr = self._live.get(req.req_id)
        if tr is None:
            return
        new_text = ""
        detok = tr.detok
        if detok is not None:
            if len(new_ids) == 1 and not detok.stop:  # hot path: one token, nothing held back
                new_text = detok.push(new_ids[0])
            elif new_ids:
                new_text, stop = detok.add_tokens(new_ids)
                if stop is not None and req.status is not _FINISHED:
                    self.scheduler.finish_request(req.req_id, "stop", stop)
            if req.status is _FINISHED:
                new_text += detok.flush()
        finished = req.status is _FINISHED
        hist = tr.hist
        if new_text:
            hist.add_text(new_text)
        if new_ids:
            hist.token_ids.extend(new_ids)
        group = tr.group
        if logprobs is not None and new_ids:
            # Tokens past a stop were dropped by the scheduler: keep their logprobs aligned.
            cum = tr.cumulative_logprob or 0.0
            for i, tok in enumerate(new_ids[: len(logprobs.token_logprobs)]):
                cum += logprobs.token_logprobs[i]
                if group.want_logprobs:
                    hist.logprobs.append(TokenLogprob(tok, logprobs.token_logprobs[i],
                                                      list(zip(logprobs.top_token_ids[i], logprobs.top_logprobs[i]))))
            tr.cumulative_logprob = cum
        if self._stream_interval > 1:
            if tr.held_ids or tr.held_text:
                new_ids, new_text = tr.held_ids + new_ids, tr.held_text + new_text
                tr.held_ids, tr.held_text = [], ""
            # Tokens before `new_ids` went out already: the first output is never held.
            if not finished and len(hist.token_ids) > len(new_ids) and len(new_ids) < self._stream_interval:
                tr.held_ids, tr.held_text = new_ids, new_text  # the next output carries them
                return
        # Positional: one of these per request per step (fields in declaration order). The
        # cumulative text/token_ids/logprobs are a view of the history's current prefix.
        comp = CompletionOutput(tr.index, new_text, new_ids, req.finish_reason, req.stop_reason, tr.cumulative_logprob, hist,
                                len(hist.token_ids), hist.num_chars, len(hist.logprobs) if group.want_logprobs else -1)
        if finished:
            group.num_finished += 1
            self._forget(req.req_id)
        many = len(group.children) > 1
        if many:
            group.latest[tr.index] = comp
            done = group.num_finished == len(group.children)
            if not done and group.best_of:
                return  # best_of: only the final choice is sent
        else:
            done = finished
        outputs = [comp]
        if many and done:
            if group.best_of:
                ranked = sorted(group.latest.values(), key=lambda c: (-(c.cumulative_logprob if c.cumulative_logprob is not None else float("-inf")), c.index))
                outputs = [c.replace(index=i, new_text=c.text, new_token_ids=list(c.token_ids)) for i, c in enumerate(ranked[: group.n])]
            else:  # the final output carries every sample
                outputs = [c if c is comp else c.replace(new_text="", new_token_ids=[]) for _, c in sorted(group.latest.items())]
        prompt_lps = None
        if group.prompt_logprobs is not None and (done or not group.prompt_logprobs_sent):
            prompt_lps = list(group.prompt_logprobs)  # in the first output and the final one
            group.prompt_logprobs_sent = True
        if now is None:
            now = time.monotonic()
        metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time, now, now if done else None,
                                 req.num_cached_prompt_tokens, req.num_preemptions)
        out = RequestOutput(group.user_id, group.prompt, req.prompt_token_ids, outputs, done, metrics, prompt_lps)
        for obs in self._observers:
            obs.on_output(out)
        try:
            group.stream.put(out)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # the consumer left; the request was aborted

    def _forget(self, internal: str) -> None:
        tr = self._live.pop(internal, None)
        if tr is not None and all(c not in self._live for c in tr.group.children):
            self._by_user_id.pop(tr.group.user_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        if self.scheduler is not None:
            for rid in list(self.scheduler.requests):
                self.scheduler.finish_request(rid, "abort")
        for internal, tr in list(self._live.items()):
            tr.group.stream.fail(exc)
            self._forget(internal)

    # ---- introspection ----

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        if s is None:
            return {}
        return {
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_usage": s.kv.usage,
            "kv_free_blocks": s.kv.num_free_blocks,
            "kv_num_blocks": s.kv.num_blocks,
            "prefix_cache_queries": s.kv.stats.queries,
            "prefix_cache_hits": s.kv.stats.hits,
            "prefix_cache_hit_rate": s.kv.stats.hit_rate,
            "preemptions": s.stats.preemptions,
            "generated_tokens": s.stats.generated_tokens,
            "prompt_tokens": s.stats.prompt_tokens,
            "discarded_tokens": s.stats.discarded_tokens,
            "steps": s.stats.steps,
            "spec_draft_tokens": s.stats.draft_tokens,
            "spec_accepted_tokens": s.stats.accepted_tokens,
            # accepted / proposed drafts, and tokens per verified (request, step): 1 + accepted drafts
            "spec_acceptance_rate": s.stats.accepted_tokens / s.stats.draft_tokens if s.stats.draft_tokens else 0.0,
            "spec_mean_accepted_len": s.stats.spec_step_tokens / s.stats.spec_steps if s.stats.spec_steps else 0.0,
            **(self.spec_policy.stats() if self.spec_policy is not None else {}),
        }
