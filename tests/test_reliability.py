"""Reliability: bad input costs nothing, the loop never stalls, nothing leaks in a long run."""
from __future__ import annotations

import asyncio
import pathlib
import random
import re
import resource
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiosched import AsyncEngine, EngineConfig, SamplingParams
from aiosched.errors import EngineOverloadedError

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---- bad input: every SamplingParams / EngineConfig field, property-based ----

_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=10**7), max_size=4), st.dictionaries(st.integers(-3, 10**6), st.floats(), max_size=3),
)
_SP_FIELDS = [f.name for f in msgspec.structs.fields(SamplingParams)]
_EC_FIELDS = [f.name for f in msgspec.structs.fields(EngineConfig) if f.name not in ("model",)]


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(_SP_FIELDS), _ANY, max_size=4))
def test_sampling_params_bad_values_are_value_errors(fields: dict) -> None:
    try:
        sp = msgspec.convert(fields, SamplingParams)
    except msgspec.ValidationError:
        return  # type errors are caught at decode (the server maps these to 400 too)
    try:
        sp.validate(vocab_size=1000)
    except ValueError as e:
        assert any(name in str(e) for name in _SP_FIELDS + ["structured"]), f"error does not name a field: {e}"


@settings(max_examples=800, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(_EC_FIELDS), _ANY, max_size=3))
def test_engine_config_bad_values_are_value_errors(fields: dict) -> None:
    try:
        EngineConfig.load(fields)
    except ValueError as e:
        assert str(e)


@pytest.fixture
async def engine(make_engine):
    async with make_engine(runner="fake", num_kv_blocks=64, block_size=4, max_num_batched_tokens=32, max_model_len=128) as eng:
        yield eng


_BAD_REQUESTS = [
    ([], {}, "prompt"),
    ([-1], {}, "prompt"),
    ([512], {}, "prompt"),
    ([1.5], {}, "prompt"),
    ("no tokenizer", {}, "prompt"),
    (b"\xff\xfe", {}, "prompt"),
    ([1] * 200, {}, "prompt"),
    ([1], {"max_tokens": 10**9}, "max_tokens"),
    ([1], {"temperature": float("nan")}, "temperature"),
    ([1], {"temperature": float("inf")}, "temperature"),
    ([1], {"top_p": 1.5}, "top_p"),
    ([1], {"min_p": -0.1}, "min_p"),
    ([1], {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ([1], {"stop": [""]}, "stop"),
    ([1], {"logit_bias": {99999: 1.0}}, "logit_bias"),
    ([1], {"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
]


@pytest.mark.parametrize("prompt, fields, name", _BAD_REQUESTS)
async def test_bad_requests_fail_alone(engine: AsyncEngine, prompt, fields, name) -> None:
    others = [engine.generate([i + 1, 2, 3], SamplingParams(max_tokens=30, temperature=0)) for i in range(4)]
    with pytest.raises(ValueError, match=name):
        engine.generate(prompt, SamplingParams(**fields))
    outs = await asyncio.gather(*others)
    assert all(o.finished and len(o.token_ids) == 30 for o in outs)


# ---- wire safety: no code-executing decoder anywhere ----

def test_no_pickle_or_marshal_decoding_in_source() -> None:
    banned = re.compile(r"\b(import pickle|from pickle|import marshal|cPickle|dill|cloudpickle|recv_pyobj|send_pyobj|pickle\.loads|torch\.load\()")
    offenders = []
    for path in list((ROOT / "aiosched").rglob("*.py")) + list((ROOT / "executors").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if banned.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "code-executing decoders on a wire path:\n" + "\n".join(offenders)


# ---- the event loop is never blocked for long ----

async def test_other_tasks_run_between_engine_steps(make_engine) -> None:
    """The engine loop yields to the event loop while steps are in flight: a task that only
    ever does `await asyncio.sleep(0)` sees the step counter advance by at most the number of
    steps that can be in flight at once between two of its turns, at every step of a
    256-request run. (How long a turn waits is measured by benchmarks/loop_lag.py, not here.)"""
    seen: list[int] = []
    stop = asyncio.Event()

    async with make_engine(runner="fake", num_kv_blocks=4096, block_size=16, max_num_seqs=128, max_num_batched_tokens=4096) as eng:
        async def probe() -> None:
            while not stop.is_set():
                seen.append(eng.timings.steps)
                await asyncio.sleep(0)

        p = asyncio.create_task(probe())
        outs = await asyncio.gather(*[eng.generate([i % 400 + 1] * 200, SamplingParams(max_tokens=64, temperature=0)) for i in range(256)])
        stop.set()
        await p
        depth = eng.config.max_concurrent_batches
    assert all(o.finished for o in outs)
    assert seen[-1] >= 64, seen[-1]  # it ran the whole time
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert max(gaps) <= depth, f"{max(gaps)} steps ran without letting another task run (depth {depth})"


# ---- overload ----

async def test_overload_is_bounded_and_recovers(make_engine) -> None:
    async with make_engine(runner="fake", max_waiting_requests=8, max_num_seqs=2) as eng:
        accepted, rejected = [], 0
        for i in range(50):
            try:
                accepted.append(eng.generate([i + 1], SamplingParams(max_tokens=5, temperature=0)))
            except EngineOverloadedError:
                rejected += 1
        assert rejected > 0 and len(accepted) <= 10
        assert all(o.finished for o in await asyncio.gather(*accepted))
        assert (await eng.generate([1], SamplingParams(max_tokens=2))).finished


# ---- soak: thousands of requests, cancellations and invalid ones; nothing lost or leaked ----

def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_soak_2000_requests_no_leaks(make_engine) -> None:
    rng = random.Random(1234)
    counts = {"ok": 0, "cancelled": 0, "invalid": 0, "lost": 0}

    async def one(eng: AsyncEngine, i: int) -> None:
        if rng.random() < 0.10:
            bad = rng.choice([[], [10**6], [1] * 1000])
            try:
                eng.generate(bad, SamplingParams(max_tokens=4))
            except ValueError:
                counts["invalid"] += 1
            return
        prompt = [rng.randrange(1, 500) for _ in range(rng.randrange(1, 80))]
        params = SamplingParams(max_tokens=rng.randrange(1, 40), temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(100))
        stream = eng.generate(prompt, params)
        cancel_after = rng.randrange(1, 10) if rng.random() < 0.2 else None
        n, last = 0, None
        async for out in stream:
            n += 1
            last = out
            if cancel_after is not None and n >= cancel_after:
                counts["cancelled"] += 1
                return
        if last is not None and last.finished:
            counts["ok"] += 1
        else:
            counts["lost"] += 1

    async with make_engine(runner="fake", num_kv_blocks=256, block_size=8, max_num_seqs=64, max_num_batched_tokens=256, max_model_len=512) as eng:
        sem = asyncio.Semaphore(128)

        async def bounded(i: int) -> None:
            async with sem:
                await one(eng, i)

        await asyncio.gather(*[bounded(i) for i in range(300)])  # warm-up
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        await asyncio.gather(*[bounded(i) for i in range(2000)])
        elapsed = time.perf_counter() - t0
        for _ in range(10):
            await asyncio.sleep(0.01)
        growth = _rss_mb() - rss0
        s = eng.scheduler
        assert not s.requests and s.kv.num_free_blocks == s.kv.num_blocks
    assert counts["lost"] == 0, counts
    assert counts["ok"] + counts["cancelled"] + counts["invalid"] == 2300
    assert growth < 50, f"RSS grew {growth:.1f} MB"
    print(f"soak: {counts}, {elapsed:.1f}s, RSS growth {growth:.1f} MB")
