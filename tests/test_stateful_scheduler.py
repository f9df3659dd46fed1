"""Async scheduling that cannot go wrong: hypothesis state machines (issue 12).

1. `SchedulerMachine` drives `AsyncScheduler` (and, for a share of the examples,
   the sync `Scheduler`) with the fake runner through `sched_harness.Harness`, a
   synchronous copy of the engine loop (two steps in flight, outputs applied in
   order). Rules add requests (prompts from 1 token to several times the token
   budget, shared prefixes, random max_tokens / min_tokens / stop tokens / EOS,
   greedy and seeded sampling, penalties), abort requests (running, waiting, preempted, with a
   token in flight) and step. The KV pool is small, so preemption is frequent.
   After every step the harness checks the scheduler's and the KV pool's
   invariants, the placeholder count of every request against the samples in
   flight, the tokens discarded against its own books, progress, and every token
   delivered against the fake model run on that request alone.
   A share of the examples run a three-deep step pipeline (the scheduler is asked
   again before an earlier step's tokens are back), and a share use n-gram
   speculative decoding over the fake model's w-gram mode with a small vocabulary,
   so drafts are accepted and steps return several tokens.
2. `EngineMachine` does the same through the real `AsyncEngine` (asyncio, inproc
   executor), fewer examples, with n > 1; variants run it against each request
   alone on a sync engine (stop strings, logprobs, best_of, prompt logprobs), on
   the multiprocess executor, and on the real tiny torch model.

CI budget: the `stateful-ci` profile below is derandomized (every run explores the
same examples, so CI is deterministic) and runs >= 2,000 scheduler examples.
`AIOSCHED_STATEFUL_PROFILE=stateful-long` explores many more (run it after touching
scheduler.py, async_scheduler.py, kv_cache.py or the engine loop).

Parallel samples (n > 1, sibling requests) are covered by the engine machines.

Penalties: half the requests of every machine draw presence / frequency /
repetition penalties (one of them or all three, either sign; a quarter of the
requests in speculative examples, as penalized requests are never speculated). The
fake runner applies them deterministically to a small score vector (the hash token,
the request's last token, tokens of its history; see fake_runner.py) over the
worker's own history, prompt and outputs split at prompt_len, and
`reference_tokens` (the oracle: the request alone) does the same, so a penalized
request's tokens depend on how many times each token occurs in its history and on
which of those are outputs. A worker history that lags a step, loses or duplicates
a token, or is split at the wrong place on resumption after preemption therefore
changes the tokens and fails the oracle, at thousands of steps/s
(test_scheduler_regressions.py shows both are caught). Penalties against repetition
only bite when the hash model repeats itself, so a quarter of the other examples
use a 32-token vocabulary. The harness also checks the history a resumed request is
sent with on every new request. The "alone" machines add penalties when the runner
reports the "penalties" feature (the fake and the torch runner do).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import pathlib
import random
import time
from collections import Counter

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from aiosched.config import EngineConfig, SpeculativeConfig
from aiosched.protocol import ScheduledRequest
from aiosched.request import RequestStatus
from aiosched.sampling_params import SamplingParams, StructuredOutputParams
from aiosched.executors.fake_runner import FakeModelRunner, reference_tokens
from json_schemas import ISSUE16_SCHEMA
from sched_harness import Expected, Harness, expected_output

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---- hypothesis profiles: deterministic in CI ----

_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
settings.register_profile("stateful-ci", max_examples=2200, stateful_step_count=40, **_COMMON)
settings.register_profile("stateful-long", max_examples=30_000, stateful_step_count=80, **_COMMON)
PROFILE = os.environ.get("AIOSCHED_STATEFUL_PROFILE", "stateful-ci")
if PROFILE not in ("stateful-ci", "stateful-long"):
    PROFILE = "stateful-ci"
SCHED_SETTINGS = settings.get_profile(PROFILE)
ENGINE_SETTINGS = settings(SCHED_SETTINGS, max_examples=60 if PROFILE == "stateful-ci" else 500, stateful_step_count=25)

MAX_LIVE = 10  # requests alive at once in one example

# Speculative decoding (n-gram drafts verified by the worker) is drawn once the
# scheduler can reserve draft slots; the fake runner's w-gram mode makes drafts hit.
HAS_SPEC = "num_draft_slots" in ScheduledRequest.__struct_fields__ and hasattr(FakeModelRunner, "context")

# ---- strategies ----


@st.composite
def engine_configs(draw: st.DrawFn) -> EngineConfig:
    bs = draw(st.sampled_from([2, 4, 8]))
    max_model_len = draw(st.sampled_from([16, 24, 40, 64]))
    # From "one request at its longest barely fits" to about two of them: preemption is frequent.
    pool_tokens = draw(st.integers(min_value=max(12, max_model_len // 2), max_value=max_model_len + max_model_len // 2))
    spec_k = draw(st.sampled_from([0, 0, 0, 1, 3])) if HAS_SPEC else 0  # draft slots per speculative step
    return EngineConfig(
        runner="fake",
        async_scheduling=draw(st.sampled_from([True, True, True, False])),
        block_size=bs,
        num_kv_blocks=math.ceil(pool_tokens / bs),
        max_model_len=max_model_len,
        max_num_batched_tokens=draw(st.sampled_from([3, 4, 8, 13, 32])),
        max_num_seqs=draw(st.sampled_from([1, 2, 3, 8, 256, 256])),
        enable_prefix_caching=draw(st.sampled_from([True, True, True, False])),
        speculative=SpeculativeConfig(num_tokens=spec_k) if spec_k else None,
    )


def describe_request(seed: int) -> dict:
    """A request description from one drawn integer (one hypothesis draw per request
    keeps generation cheap: the scheduler runs thousands of steps per second, and
    hypothesis' own drawing would otherwise dominate). `build_request` turns it into
    tokens and params."""
    r = random.Random(seed)
    return dict(
        length=r.choice([r.randint(1, 6), r.randint(1, 80)]),
        token_seed=r.getrandbits(32),
        alphabet=r.choice([512, 512, 3]),  # a tiny alphabet repeats blocks
        share=r.choice([None, None, "prefix", "aligned", "same"]),
        share_idx=r.getrandbits(16),
        share_frac=r.random(),
        max_tokens=r.choice([r.randint(1, 4), r.randint(1, 40)]),
        min_tokens=r.choice([0, 0, 0, 1, 3, 100]),  # 100: clamped to max_tokens
        stops=[r.randint(0, 40) for _ in range(r.choice([0, 0, 1, 3]))],  # indexes into the reference output
        eos=[r.randint(0, 40) for _ in range(r.choice([0, 1]))],
        ignore_eos=r.random() < 0.3,
        greedy=r.random() < 0.5,
        seed=r.getrandbits(40),
        penalties=None if r.random() < 0.5 else draw_penalties(r),
    )


def draw_penalties(r: random.Random) -> dict:
    """One penalty or all three, either direction (a repetition penalty below 1 and a
    negative presence or frequency penalty favour tokens already seen)."""
    kind = r.choice(["presence", "frequency", "repetition", "all"])
    out = {}
    if kind in ("presence", "all"):
        out["presence_penalty"] = round(r.uniform(-1.5, 1.5), 2)
    if kind in ("frequency", "all"):
        out["frequency_penalty"] = round(r.uniform(-1.5, 1.5), 2)
    if kind in ("repetition", "all"):
        out["repetition_penalty"] = round(r.uniform(0.6, 1.8), 2)
    return out


requests = st.integers(0, 2**64 - 1).map(describe_request)

# Grammars the "alone" engine machines draw (the fake runner masks its hash tokens with them).
STRUCTURED_SPECS = [
    StructuredOutputParams(json_schema=json.dumps(ISSUE16_SCHEMA, separators=(",", ":"))),
    StructuredOutputParams(json_object=True),
    StructuredOutputParams(regex=r"(ab|cd)[0-9]{2,6}"),
    StructuredOutputParams(grammar='start: "[" item ("," item)* "]"\nitem: /[a-z]{1,3}/'),
]


def build_request(desc: dict, prompts: list[list[int]], vocab: int, max_total: int,
                  block_size: int) -> tuple[list[int], SamplingParams, int, list[int]] | None:
    """Prompt, params, seed, eos for a description, within `max_total` tokens."""
    rnd = random.Random(desc["token_seed"])
    alphabet = min(desc["alphabet"], vocab)
    prompt: list[int] = []
    if desc["share"] and prompts:
        other = prompts[desc["share_idx"] % len(prompts)]
        if desc["share"] == "same":
            prompt = list(other)
        else:
            k = int(len(other) * desc["share_frac"])
            if desc["share"] == "aligned":
                k -= k % block_size
            prompt = list(other[:k])
    target = max(desc["length"], len(prompt) + (desc["share"] != "same"))
    prompt += [rnd.randrange(alphabet) for _ in range(target - len(prompt))]
    prompt = prompt[: max_total - 1]
    if not prompt:
        return None
    max_tokens = max(1, min(desc["max_tokens"], max_total - len(prompt)))
    if len(prompt) + max_tokens > max_total:
        return None
    min_tokens = min(desc["min_tokens"], max_tokens)
    greedy = desc["greedy"]
    seed = desc["seed"]
    penalties = desc.get("penalties") or {}
    # Stop tokens / EOS drawn from what the model will say, so they actually fire.
    ref = reference_tokens(prompt, max_tokens, vocab, seed, greedy, **penalties)
    stops = sorted({ref[i % len(ref)] for i in desc["stops"]})
    eos = sorted({ref[i % len(ref)] for i in desc["eos"]})
    sp = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, temperature=0.0 if greedy else 1.0,
                        seed=seed if not greedy else None, stop_token_ids=stops, ignore_eos=desc["ignore_eos"], **penalties)
    return prompt, sp, seed, eos


# ---- 1. scheduler + fake runner, synchronous copy of the engine loop ----

COVERAGE: Counter[str] = Counter()  # summed over all examples of a run
NO_PENALTIES = dict(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)


class SchedulerMachine(RuleBasedStateMachine):
    """Scheduler + fake runner in the engine loop's order; every check is in the harness."""

    def __init__(self) -> None:
        super().__init__()
        self.h: Harness | None = None
        self.prompts: list[list[int]] = []
        self.ok = True  # False once a rule raised: teardown then leaves the state alone

    @initialize(config=engine_configs(), deep=st.sampled_from([False, False, False, True]),
                model=st.sampled_from([(0, None), (1, 16), (2, 8), (2, 32)]), small_vocab=st.sampled_from([False, False, False, True]))
    def setup(self, config: EngineConfig, deep: bool, model: tuple[int, int | None], small_vocab: bool) -> None:
        depth = 3 if deep and config.async_scheduling else None
        context, vocab = model if config.speculative is not None else (0, None)  # (w-gram, vocab) for drafts that hit
        if config.speculative is None and small_vocab:
            # The hash model then repeats tokens by itself, so penalties that discourage
            # repetition bite too (over 512 tokens mostly those that favour it do).
            vocab = 32
            COVERAGE["small_vocab"] += 1
        self.h = Harness(config, depth=depth, context=context, vocab_size=vocab)
        COVERAGE["speculative"] += config.speculative is not None
        COVERAGE["examples"] += 1
        COVERAGE["depth3"] += depth == 3
        COVERAGE["async" if config.async_scheduling else "sync"] += 1

    def _guard(self, fn, *args) -> None:
        self.ok = False
        fn(*args)
        self.ok = True

    @precondition(lambda self: self.h is not None and len(self.h.live()) < MAX_LIVE)
    @rule(desc=requests)
    def add(self, desc: dict) -> None:
        h = self.h
        if desc["penalties"] and h.config.speculative is not None and desc["seed"] % 2:
            desc = dict(desc, penalties=None)  # penalized requests are never speculated: a quarter, not half, here
        built = build_request(desc, self.prompts, h.vocab_size, min(h.max_model_len, h.sched.kv.num_blocks * h.sched.kv.block_size),
                              h.sched.kv.block_size)
        if built is None:
            return
        prompt, sp, seed, eos = built
        self.prompts.append(prompt)
        if desc["penalties"]:
            COVERAGE["penalized"] += 1
            plain = msgspec.structs.replace(sp, **NO_PENALTIES)
            COVERAGE["penalties_change_tokens"] += expected_output(prompt, plain, seed, eos, h.vocab_size, h.context) != \
                expected_output(prompt, sp, seed, eos, h.vocab_size, h.context)
        self._guard(h.add, prompt, sp, seed, eos)

    @precondition(lambda self: self.h is not None and self.h.live())
    @rule(kind=st.sampled_from(["any", "running", "waiting", "preempted", "in_flight"]), idx=st.integers(0, 2**16))
    def abort(self, kind: str, idx: int) -> None:
        h = self.h
        live = h.live()
        reqs = [h.tracked[r].req for r in live]
        pick = {
            "any": reqs,
            "running": [r for r in reqs if r.status is RequestStatus.RUNNING],
            "waiting": [r for r in reqs if r.status is RequestStatus.WAITING],
            # A preempted request whose token is still in flight first, when there is one
            # (the rarest state: it lasts until that step's output is applied).
            "preempted": [r for r in reqs if r.status is RequestStatus.PREEMPTED and r.num_output_placeholders]
            or [r for r in reqs if r.status is RequestStatus.PREEMPTED],
            "in_flight": [r for r in reqs if r.num_output_placeholders],
        }[kind] or reqs
        self._guard(h.abort, pick[idx % len(pick)].req_id)

    @precondition(lambda self: self.h is not None)
    @rule(n=st.sampled_from([1, 1, 2, 4, 8]), stop_string=st.sampled_from([False] * 7 + [True]),
          abort_preempted_in_flight=st.sampled_from([False] * 5 + [True]))
    def step(self, n: int, stop_string: bool, abort_preempted_in_flight: bool) -> None:
        """`n` engine steps; with `stop_string`, the detokenizer matches a stop string in
        the first tokens that arrive (the engine finishes that request before scheduling).
        With `abort_preempted_in_flight`, a request preempted while its token is still in
        flight is aborted right after the step that preempted it: that state lasts one
        step, too short for the `abort` rule to hit it reliably between rules."""
        self.h.pending_stop_strings = int(stop_string)
        for _ in range(n):
            self._guard(self.h.step)
            if abort_preempted_in_flight:
                for rid in self.h.live():
                    req = self.h.tracked[rid].req
                    if req.status is RequestStatus.PREEMPTED and req.num_output_placeholders:
                        self._guard(self.h.abort, rid)
                        break

    @precondition(lambda self: self.h is not None and self.h.config.speculative is not None)
    @rule()
    def toggle_drafting(self) -> None:
        """The engine's speculation policy switches drafting off and on between steps, also
        while speculative steps are in flight (their requests wait for them to land)."""
        self.h.sched.drafting = not self.h.sched.drafting
        COVERAGE["drafting_toggled"] += 1

    def teardown(self) -> None:
        if self.h is None or not self.ok:
            return
        self.h.drain()
        COVERAGE.update(self.h.counters)
        COVERAGE["steps"] += self.h.steps
        COVERAGE["requests"] += len(self.h.tracked)


def test_async_scheduler_state_machine() -> None:
    COVERAGE.clear()
    t0 = time.perf_counter()
    run_state_machine_as_test(SchedulerMachine, settings=SCHED_SETTINGS)
    elapsed = time.perf_counter() - t0
    cov = dict(COVERAGE)
    print(f"\nscheduler state machine: {cov.get('examples', 0)} examples, {cov.get('steps', 0)} steps, "
          f"{cov.get('requests', 0)} requests in {elapsed:.1f}s; coverage {cov}")
    # The generator must actually reach the situations this file exists for.
    for what in ("preemptions", "preempted_with_token_in_flight", "abort_with_token_in_flight", "abort_preempted",
                 "abort_preempted_with_token_in_flight", "finished_while_preempted", "resumed_with_prefix_hit",
                 "prefix_hit_on_shared_block", "discarded", "prefill_chunks", "chunk_beside_decode", "finished_stop",
                 "finished_length", "stop_after_min_tokens", "stop_string", "sync", "penalties_change_tokens",
                 "resumed_with_penalties", "drafting_toggled"):
        assert cov.get(what, 0) > 0, f"no example reached {what!r}: {cov}"
    assert cov["examples"] >= min(2000, SCHED_SETTINGS.max_examples)


# ---- 2. through the real AsyncEngine ----

ENGINE_COVERAGE: Counter[str] = Counter()


class EngineMachine(RuleBasedStateMachine):
    """The real engine on its own event loop; rules run while the engine task is parked.

    Timing (the executor's threads or processes) makes the interleavings
    nondeterministic, so the checks here are the ones that hold for every
    interleaving: every sample's tokens equal the model alone (or, for
    `oracle = "alone"`, the same request alone on a sync engine), aborted streams got
    a prefix of that, the scheduler's invariants hold whenever the loop is parked,
    and at the end no request is left and the KV pool is full."""

    config_overrides: dict = {}
    oracle = "fake"  # "fake": reference_tokens; "alone": each request alone on a sync engine
    structured_share = 0.3  # of "alone" requests drawn with a grammar (needs the runner's structured_output feature)
    tight_pool = False

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.engine = None
        self.alone = None  # the oracle engine for oracle == "alone"
        self.prompts: list[list[int]] = []
        self.streams: dict[str, dict] = {}  # user id -> {task, expected per sample, n, aborted}
        self.ok = True
        self.n_ids = 0
        self.structured_preempted: set[str] = set()  # engine request ids seen preempted with a grammar

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def _guard(self, fn, *args) -> None:
        self.ok = False
        fn(*args)
        self.ok = True

    @initialize(config=engine_configs())
    def setup(self, config: EngineConfig) -> None:
        from aiosched.engine import AsyncEngine

        self.ok = False
        cfg = config.replace(**self.config_overrides)
        if self.tight_pool:  # room for about one request at its longest: preemption on most steps
            cfg = cfg.replace(num_kv_blocks=max(2, math.ceil(cfg.max_model_len * 0.6 / cfg.block_size)))
        self.engine = AsyncEngine(cfg)
        self.run(self.engine.start())
        if self.oracle == "alone":
            self.alone = AsyncEngine(cfg.replace(async_scheduling=False, executor="inproc", num_kv_blocks=None))
            self.run(self.alone.start())
        ENGINE_COVERAGE["examples"] += 1
        self.ok = True

    def _check(self) -> None:
        assert not self.engine.is_dead, self.engine._dead
        s = self.engine.scheduler
        s.check_invariants()
        for req in s.requests.values():
            assert 0 <= req.num_output_placeholders <= self.engine.config.max_concurrent_batches
        for req in s.waiting:
            if req.num_output_placeholders:
                ENGINE_COVERAGE["preempted_with_token_in_flight"] += 1
                ENGINE_COVERAGE["structured_preempted_with_token_in_flight"] += req.sampling.structured is not None
        self._note_structured_preempted()

    def _note_structured_preempted(self) -> None:
        for rid, req in self.engine.scheduler.requests.items():
            if req.num_preemptions and req.sampling.structured is not None and rid not in self.structured_preempted:
                self.structured_preempted.add(rid)
                ENGINE_COVERAGE["structured_preempted"] += 1

    def _alone(self, prompt: list[int], sp: SamplingParams):
        return self.run(self.alone.generate(prompt, sp).result())

    # Preconditions depend only on what the rules did, never on timing: hypothesis
    # replays rule choices and needs the same ones to be available again.
    @precondition(lambda self: self.engine is not None and self.n_ids < 2 * MAX_LIVE)
    @rule(desc=requests, n=st.sampled_from([1, 1, 1, 2, 3]))
    def add(self, desc: dict, n: int) -> None:
        self._guard(self._add, desc, n)

    def _add(self, desc: dict, n: int) -> None:
        eng = self.engine
        bs = eng.scheduler.kv.block_size
        built = build_request(desc, self.prompts, eng.info.vocab_size,
                              min(eng.info.max_model_len, eng.info.num_kv_blocks * bs), bs)
        if built is None:
            return
        prompt, sp, seed, _ = built  # EOS comes from the model's tokenizer, if any
        self.prompts.append(prompt)
        # n > 1: sample i uses seed + i (greedy samples are all the same).
        sp = msgspec.structs.replace(sp, n=n, seed=seed)
        if self.oracle == "alone":
            sp = self._more_features(desc, prompt, sp)
        uid = f"u{self.n_ids}"
        self.n_ids += 1
        alone = None
        if self.oracle == "fake":
            tok = eng.tokenizer  # the embedded default model's tokenizer brings EOS ids
            eos = tok.eos_token_ids if tok is not None else []
            expected = [expected_output(prompt, sp, seed + i, eos, eng.info.vocab_size) for i in range(n)]
        else:  # the same request alone on a sync engine, before this one sees it
            alone = self._alone(prompt, sp)
            expected = [Expected(c.token_ids, c.finish_reason, c.stop_reason) for c in sorted(alone.outputs, key=lambda c: c.index)]
        stream = eng.generate(prompt, sp, request_id=uid)

        async def consume() -> list:
            return [out async for out in stream]

        self.streams[uid] = dict(task=self.loop.create_task(consume()), expected=expected, n=n, aborted=False, alone=alone,
                                 best_of=(sp.best_of or n) > n)
        ENGINE_COVERAGE["requests"] += 1
        ENGINE_COVERAGE["parallel_samples"] += n > 1
        ENGINE_COVERAGE["penalized"] += sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0
        self._check()

    @precondition(lambda self: self.engine is not None and self.n_ids > 0)
    @rule(idx=st.integers(0, 2**16), how=st.sampled_from(["abort", "cancel"]))
    def abort(self, idx: int, how: str) -> None:
        self._guard(self._abort, idx, how)

    def _abort(self, idx: int, how: str) -> None:
        uid = f"u{idx % self.n_ids}"
        ent = self.streams.get(uid)
        if ent is None:  # ended and checked already: aborting it is a no-op
            self.engine.abort(uid)
            return
        s = self.engine.scheduler
        if any(r.req_id.startswith(uid + "#") and r.num_output_placeholders for r in s.requests.values()):
            ENGINE_COVERAGE["abort_with_token_in_flight"] += 1
        if how == "abort":
            self.engine.abort(uid)
        else:  # the consumer goes away: the stream aborts the request
            ent["task"].cancel()
        ent["aborted"] = True
        ENGINE_COVERAGE["aborts"] += 1
        self._check()

    @precondition(lambda self: self.engine is not None)
    @rule(steps=st.sampled_from([1, 2, 4, 8]))
    def step(self, steps: int) -> None:
        self._guard(self._step, steps)

    def _step(self, steps: int) -> None:
        """Let the engine loop run `steps` more steps (or until it has nothing to do)."""
        eng = self.engine

        async def advance() -> None:
            target = eng.timings.steps + steps
            deadline = time.monotonic() + 30
            while eng.timings.steps < target and eng.scheduler.requests:
                assert time.monotonic() < deadline, "the engine made no progress for 30 s"
                self._note_structured_preempted()
                await asyncio.sleep(0)
        self.run(advance())
        self._check()
        self._collect(wait=False)

    def _more_features(self, desc: dict, prompt: list[int], sp: SamplingParams) -> SamplingParams:
        """With an "alone" oracle anything the engine does per request can be compared:
        stop tokens and stop strings picked from what the model says alone, logprobs,
        best_of, prompt logprobs and penalties, when the runner supports them."""
        eng, r = self.engine, random.Random(desc["token_seed"] ^ 0x5EED)
        feats = eng.info.features
        plain = self._alone(prompt, msgspec.structs.replace(sp, n=1, stop_token_ids=[], min_tokens=0))
        ref = plain.token_ids
        sp = msgspec.structs.replace(sp, stop_token_ids=sorted({ref[i % len(ref)] for i in desc["stops"]}))
        if eng.tokenizer is not None and plain.text.strip() and r.random() < 0.3:
            i = r.randrange(len(plain.text))
            stop = plain.text[i : i + r.randint(1, 3)]
            if stop.strip():
                sp = msgspec.structs.replace(sp, stop=[stop], include_stop_str_in_output=r.random() < 0.5)
                ENGINE_COVERAGE["stop_strings"] += 1
        if "logprobs" in feats and r.random() < 0.3:
            sp = msgspec.structs.replace(sp, logprobs=r.choice([0, 2]))
            ENGINE_COVERAGE["logprobs"] += 1
        if "logprobs" in feats and r.random() < 0.2:
            sp = msgspec.structs.replace(sp, best_of=sp.n + r.randint(1, 2))
            ENGINE_COVERAGE["best_of"] += 1
        if "prompt_logprobs" in feats and r.random() < 0.15:
            sp = msgspec.structs.replace(sp, prompt_logprobs=r.choice([0, 1]))
            ENGINE_COVERAGE["prompt_logprobs"] += 1
        if "structured_output" in feats and r.random() < self.structured_share:
            # Constrained requests under preemption, recomputation, chunked prefill, async
            # scheduling and speculation must equal the request alone (issue 16.1: a grammar
            # sample that outlived its request's free was consumed twice after resumption).
            sp = msgspec.structs.replace(sp, structured=r.choice(STRUCTURED_SPECS))
            ENGINE_COVERAGE["structured"] += 1
        if "penalties" in feats and r.random() < 0.4:
            # Penalties read the worker's history (prompt vs outputs), which async
            # placeholders and resumption after preemption must keep exact.
            sp = msgspec.structs.replace(sp, presence_penalty=round(r.uniform(-1, 1), 2),
                                         frequency_penalty=round(r.uniform(-1, 1), 2),
                                         repetition_penalty=round(r.uniform(0.7, 1.6), 2))
            ENGINE_COVERAGE["penalties"] += 1
        return sp

    def _collect(self, wait: bool) -> None:
        for uid in list(self.streams):
            ent = self.streams[uid]
            task = ent["task"]
            if not task.done():
                if not wait:
                    continue
                self.run(asyncio.wait({task}, timeout=60))
                assert task.done(), f"{uid}: stream did not end within 60 s"
            del self.streams[uid]
            if not task.cancelled():
                self._verify(uid, ent, task.result())

    def _verify(self, uid: str, ent: dict, outs: list) -> None:
        assert outs and outs[-1].finished and not any(o.finished for o in outs[:-1]), f"{uid}: bad stream end"
        got: dict[int, list[int]] = {}
        for out in outs:  # deltas add up, per sample
            for comp in out.outputs:
                before = got.get(comp.index, [])
                assert comp.token_ids == before + comp.new_token_ids or not comp.new_token_ids and comp.token_ids == before
                got[comp.index] = comp.token_ids
        final = outs[-1]
        assert sorted(c.index for c in final.outputs) == list(range(ent["n"])), f"{uid}: final output lacks samples"
        if ent["best_of"] and ent["aborted"]:
            return  # the best of partial samples: nothing to compare them with
        alone = ent["alone"]
        if alone is not None and not ent["aborted"]:
            self._compare_with_alone(uid, final, alone)
        for comp in final.outputs:
            exp = ent["expected"][comp.index]
            if comp.finish_reason == "abort":
                assert ent["aborted"], f"{uid}.{comp.index}: aborted, but nobody aborted it"
                assert comp.token_ids == exp.tokens[: len(comp.token_ids)], f"{uid}.{comp.index}: aborted output is not a prefix"
            else:
                assert (comp.token_ids, comp.finish_reason, comp.stop_reason) == (exp.tokens, exp.finish_reason, exp.stop_reason), \
                    f"{uid}.{comp.index}: {comp.token_ids} {comp.finish_reason}/{comp.stop_reason}, expected {exp}"
                ENGINE_COVERAGE[f"finished_{exp.finish_reason}"] += 1

    @staticmethod
    def _compare_with_alone(uid: str, got, want) -> None:
        def close(a, b) -> bool:
            return (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-4 or a == b)

        for g, w in zip(sorted(got.outputs, key=lambda c: c.index), sorted(want.outputs, key=lambda c: c.index)):
            assert g.text == w.text, f"{uid}.{g.index}: text {g.text!r}, alone {w.text!r}"
            assert close(g.cumulative_logprob, w.cumulative_logprob), f"{uid}.{g.index}: cumulative logprob"
            assert (g.logprobs is None) == (w.logprobs is None)
            for a, b in zip(g.logprobs or [], w.logprobs or []):
                assert a.token_id == b.token_id and close(a.logprob, b.logprob), f"{uid}.{g.index}: logprobs"
        assert (got.prompt_logprobs is None) == (want.prompt_logprobs is None), f"{uid}: prompt logprobs"
        for a, b in zip(got.prompt_logprobs or [], want.prompt_logprobs or []):
            assert (a is None) == (b is None) and (a is None or close(a.logprob, b.logprob)), f"{uid}: prompt logprobs differ"

    def teardown(self) -> None:
        try:
            if self.ok and self.engine is not None and self.engine._running:
                self._collect(wait=True)
                s = self.engine.scheduler

                async def settle() -> None:  # the loop tells the worker to forget the last ones
                    deadline = time.monotonic() + 30
                    while s.requests or s._freed_for_worker:
                        assert time.monotonic() < deadline, "requests left after every stream ended"
                        await asyncio.sleep(0.001)
                self.run(settle())
                self._check()
                assert not s.requests and not s.running and not s.waiting
                assert s.kv.num_free_blocks == s.kv.num_blocks, f"KV blocks leaked: {s.kv.num_blocks - s.kv.num_free_blocks}"
                assert not self.engine._live and not self.engine._by_user_id
                ENGINE_COVERAGE["preemptions"] += s.stats.preemptions
                ENGINE_COVERAGE["discarded"] += s.stats.discarded_tokens
        finally:
            for eng in (self.engine, self.alone):
                if eng is not None:
                    self.run(eng.shutdown())
            self.loop.close()


def _run_engine_machine(machine: type[EngineMachine], max_examples: int) -> dict:
    ENGINE_COVERAGE.clear()
    t0 = time.perf_counter()
    run_state_machine_as_test(machine, settings=settings(ENGINE_SETTINGS, max_examples=max_examples))
    cov = dict(ENGINE_COVERAGE)
    print(f"\n{machine.__name__}: {time.perf_counter() - t0:.1f}s; coverage {cov}")
    return cov


def test_engine_state_machine() -> None:
    cov = _run_engine_machine(EngineMachine, ENGINE_SETTINGS.max_examples)
    for what in ("preemptions", "aborts", "parallel_samples", "penalized", "finished_stop", "finished_length"):
        assert cov.get(what, 0) > 0, f"no example reached {what!r}: {cov}"


def test_engine_state_machine_vs_alone() -> None:
    """Fake runner (over the embedded model's dir when shipped, for its tokenizer): stop strings,
    logprobs, best_of, prompt logprobs and penalties under preemption and async scheduling equal
    the same request alone on a sync engine."""

    class AloneMachine(EngineMachine):
        oracle = "alone"
        # The fake runner over the embedded model's dir: its tokenizer (stop strings, EOS).
        default = ROOT / "aiosched" / "default_model"
        config_overrides = {"model": str(default)} if (default / "tokenizer.json").is_file() else {}

    cov = _run_engine_machine(AloneMachine, 30)
    wanted = ["logprobs", "best_of", "prompt_logprobs", "penalties", "preemptions"]
    if AloneMachine.config_overrides:  # the embedded model's tokenizer: stop strings and grammars
        wanted += ["stop_strings", "structured"]  # preempted ones: test_engine_state_machine_structured
    for what in wanted:
        assert cov.get(what, 0) > 0, f"no example reached {what!r}: {cov}"


@pytest.mark.skipif(not (ROOT / "executors" / "multiproc.py").exists(),
                    reason="executors/multiproc.py does not exist yet (the multiprocess executor is being written)")
def test_engine_state_machine_multiproc() -> None:
    class MultiprocMachine(EngineMachine):
        config_overrides = {"executor": "multiproc"}

    _run_engine_machine(MultiprocMachine, 12)


def test_engine_state_machine_torch(tmp_path_factory) -> None:
    """The real tiny torch model; the oracle is each request alone on a sync engine."""
    random_checkpoint = pytest.importorskip("aiosched.executors.torch.random_checkpoint")
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    random_checkpoint.write_random_checkpoint(model_dir, arch="llama", seed=11)

    class TorchMachine(EngineMachine):
        config_overrides = {"runner": "torch", "model": str(model_dir), "device": "cpu", "dtype": "float32"}
        oracle = "alone"

    _run_engine_machine(TorchMachine, 8)


def test_engine_state_machine_structured() -> None:
    """Mostly constrained requests (JSON schema, any JSON, regex, Lark grammar) on a small
    KV pool: under preemption with a sample in flight, recomputation, chunked prefill, async
    scheduling and speculation, each output equals the request alone on a sync engine
    (issue 16.1 as a class: grammar state that outlives its request's free)."""
    default = ROOT / "aiosched" / "default_model"
    if not (default / "tokenizer.json").is_file():
        pytest.skip("the embedded model's tokenizer is not shipped")
    pytest.importorskip("llguidance")

    class StructuredMachine(EngineMachine):
        oracle = "alone"
        structured_share = 0.4  # some unconstrained ones too: a constrained request can be the only one
        tight_pool = True
        config_overrides = {"model": str(default)}

    cov = _run_engine_machine(StructuredMachine, 30)
    # (A constrained request preempted with its sample in flight, the state of issue 16.1,
    # is reached too, but seen only when a rule happens to look: counted, not required.)
    for what in ("structured", "structured_preempted"):
        assert cov.get(what, 0) > 0, f"no example reached {what!r}: {cov}"
