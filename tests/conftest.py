"""Shared fixtures: every engine a test builds must end with its KV pool full again."""
from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aiosched.config import EngineConfig
from aiosched.engine import AsyncEngine

_ENGINES: list[AsyncEngine] = []


def _track(engine: AsyncEngine) -> AsyncEngine:
    _ENGINES.append(engine)
    return engine


@pytest.fixture(autouse=True)
def kv_pool_is_full_after_test() -> Any:
    """After every test, each engine it started holds no KV blocks and no requests."""
    _ENGINES.clear()
    yield
    gc.collect()
    for eng in _ENGINES:
        s = eng.scheduler
        if s is None:
            continue
        s.check_invariants()
        assert not s.requests, f"requests left in the engine: {list(s.requests)}"
        assert s.kv.num_free_blocks == s.kv.num_blocks, f"KV blocks leaked: {s.kv.num_blocks - s.kv.num_free_blocks}"


@pytest.fixture
def make_engine() -> Callable[..., AsyncEngine]:
    """Build an engine from config kwargs; tracked by the pool-full check."""

    def make(**kw: Any) -> AsyncEngine:
        return _track(AsyncEngine(EngineConfig.load(kw)))

    return make


@pytest.fixture
async def fake_engine(make_engine: Callable[..., AsyncEngine]) -> AsyncIterator[AsyncEngine]:
    async with make_engine(runner="fake", num_kv_blocks=64, block_size=4, max_num_batched_tokens=32) as eng:
        yield eng
