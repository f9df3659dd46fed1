"""Run a coroutine on uvloop when it is installed (the CLI's entry points use this)."""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    # asyncio.Runner takes a loop factory on Python 3.11 too (asyncio.run only from 3.12).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
