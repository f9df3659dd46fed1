"""Misuse of an engine fails at once with a clear error instead of hanging, and the
generate() handle works wherever asyncio or anyio take an awaitable (issue 16 item 4)."""
from __future__ import annotations

import asyncio
import threading

import anyio
import pytest

from aiosched import AsyncEngine, SamplingParams
from aiosched.executors.fake_runner import reference_tokens

PROMPT = [5, 6, 7, 8]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0)
EXPECTED = reference_tokens(PROMPT, 6)


def _engine() -> AsyncEngine:
    return AsyncEngine.from_config(dict(runner="fake", num_kv_blocks=64, block_size=4))


def test_an_engine_whose_event_loop_closed_refuses_generate_at_once() -> None:
    engine = _engine()

    async def first() -> list[int]:
        await engine.start()
        return (await engine.generate(PROMPT, PARAMS)).token_ids

    assert asyncio.run(first()) == EXPECTED  # the loop closes with the engine still started

    async def second() -> None:
        with pytest.raises(RuntimeError, match="event loop this engine was started in is closed"):
            engine.generate(PROMPT, PARAMS)
        await asyncio.wait_for(engine.shutdown(), 5)  # and shutting it down does not hang

    asyncio.run(asyncio.wait_for(second(), 10))


def test_async_with_in_a_second_asyncio_run_fails_clearly() -> None:
    engine = _engine()

    async def use() -> list[int]:
        async with engine:
            return (await engine.generate(PROMPT, PARAMS)).token_ids

    async def first() -> list[int]:
        await engine.start()
        return await use()

    assert asyncio.run(first()) == EXPECTED
    engine2 = _engine()

    async def leaked() -> None:  # started, never shut down: its loop closes under it
        await engine2.start()

    asyncio.run(leaked())

    async def again() -> None:
        with pytest.raises(RuntimeError, match="create and start a new engine"):
            async with engine2:
                engine2.generate(PROMPT, PARAMS)

    asyncio.run(asyncio.wait_for(again(), 10))


async def test_generate_from_another_thread_fails_at_once() -> None:
    async with _engine() as engine:
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                engine.generate(PROMPT, PARAMS)
            except BaseException as e:  # noqa: BLE001 (reported to the test)
                errors.append(e)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(5)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
        assert "another thread" in str(errors[0])
        # The engine still serves its own loop.
        assert (await engine.generate(PROMPT, PARAMS)).token_ids == EXPECTED


async def test_generate_from_an_event_loop_in_another_thread_fails_at_once() -> None:
    async with _engine() as engine:
        errors: list[BaseException] = []

        def other_loop() -> None:
            async def call() -> None:
                engine.generate(PROMPT, PARAMS)

            try:
                asyncio.run(call())
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=other_loop)
        t.start()
        t.join(5)
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
        assert "an AsyncEngine serves only the event loop it was started in" in str(errors[0])


def test_generate_from_another_event_loop_of_the_same_thread_fails_at_once() -> None:
    home = asyncio.new_event_loop()
    engine = _engine()
    try:
        home.run_until_complete(engine.start())
        # Outside any loop, in the engine's thread: queued; it runs when the home loop runs.
        handle = engine.generate(PROMPT, PARAMS)
        assert home.run_until_complete(asyncio.wait_for(handle.result(), 10)).token_ids == EXPECTED

        async def elsewhere() -> None:
            with pytest.raises(RuntimeError, match="called from another event loop"):
                engine.generate(PROMPT, PARAMS)

        asyncio.run(asyncio.wait_for(elsewhere(), 10))
    finally:
        home.run_until_complete(engine.shutdown())
        home.close()


async def test_the_handle_is_a_task_for_create_task(fake_engine: AsyncEngine) -> None:
    task = asyncio.create_task(fake_engine.generate(PROMPT, PARAMS))
    out = await task
    assert out.finished and out.token_ids == EXPECTED


async def test_the_handle_works_with_gather_wait_for_and_ensure_future(fake_engine: AsyncEngine) -> None:
    a, b = await asyncio.gather(fake_engine.generate(PROMPT, PARAMS), fake_engine.generate([9, 10], PARAMS))
    assert a.token_ids == EXPECTED and b.token_ids == reference_tokens([9, 10], 6)
    c = await asyncio.wait_for(fake_engine.generate(PROMPT, PARAMS), timeout=10)
    assert c.token_ids == EXPECTED
    d = await asyncio.ensure_future(fake_engine.generate(PROMPT, PARAMS))
    assert d.token_ids == EXPECTED


async def test_the_handle_works_in_an_anyio_task_group(fake_engine: AsyncEngine) -> None:
    results: dict[int, list[int]] = {}

    async def one(i: int) -> None:
        results[i] = (await fake_engine.generate(PROMPT, PARAMS)).token_ids

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
        tg.start_soon(fake_engine.generate, PROMPT, PARAMS)  # the handle as the task's coroutine
    assert results == {i: EXPECTED for i in range(3)}


async def test_cancelling_the_task_aborts_the_request(fake_engine: AsyncEngine) -> None:
    task = asyncio.create_task(fake_engine.generate(PROMPT, SamplingParams(max_tokens=200, temperature=0.0)))
    await asyncio.sleep(0)  # the task starts waiting for outputs
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Leaving the stream aborts at once: its blocks are back in the pool.
    assert not fake_engine._live and fake_engine.stats()["num_running"] == 0


async def test_await_and_async_for_still_work(fake_engine: AsyncEngine) -> None:
    assert (await fake_engine.generate(PROMPT, PARAMS)).token_ids == EXPECTED
    streamed = [o async for o in fake_engine.generate(PROMPT, PARAMS)]
    assert [t for o in streamed for t in o.new_token_ids] == EXPECTED and streamed[-1].finished
