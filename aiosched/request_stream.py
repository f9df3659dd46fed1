"""The handle `generate()` returns: awaitable (final output) and an async iterator (stream).

Leaving the stream early (break, exception, task cancellation) aborts the request,
so its KV blocks go back to the pool at once.

The engine puts one output per request per step, so this is on the hot path (256
puts and 256 consumer wake-ups per step at batch 256): it is a deque and at most one
asyncio future, rather than an anyio memory stream (whose receive also yields to the
loop once per item, even when items are already buffered). Errors seen by the engine
are the same: putting after the final output raises `anyio.ClosedResourceError`,
putting after the consumer left raises `anyio.BrokenResourceError`.

The handle is also a coroutine (it has `send`, `throw`, `close` and `__await__`, so
`asyncio.iscoroutine` accepts it): `asyncio.create_task(engine.generate(...))`,
`gather`, `wait_for`, `ensure_future` and anyio task groups all take it, and run it
as `result()`.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any

import anyio

from aiosched.outputs import RequestOutput


class RequestStream:
    def __init__(self, request_id: str, abort: Callable[[], None]) -> None:
        self.request_id = request_id
        self._abort = abort
        self._items: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None  # set while the consumer waits for an item
        self._closed = False  # engine side: the final output (or an error) was put
        self._left = False  # consumer side: the iterator has ended
        self._done = False  # the consumer saw the final output (or an error)
        self._consumed = False
        self._coro: Coroutine[Any, Any, RequestOutput] | None = None  # result(), when driven as a coroutine

    # --- engine side (event loop thread) ---

    def put(self, output: RequestOutput) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._left:
            raise anyio.BrokenResourceError
        self._items.append(output)
        if output.finished:
            self._closed = True
        w = self._waiter  # _wake(), inlined: once per request per step
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self._closed and not self._left:
            self._items.append(exc)
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # --- user side ---

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._consumed:
            raise RuntimeError("a generate() stream can be consumed only once")
        self._consumed = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        items = self._items
        try:
            loop = asyncio.get_running_loop()
            # One future per wait, i.e. per request per step while streaming: on the stock
            # loops, the object `loop.create_future()` returns, without its Python frame.
            stock = type(loop).create_future is asyncio.BaseEventLoop.create_future
            future = asyncio.Future
            while True:
                if not items:
                    if self._closed:
                        return
                    self._waiter = future(loop=loop) if stock else loop.create_future()
                    await self._waiter
                    continue
                item = items.popleft()
                if isinstance(item, BaseException):
                    self._done = True
                    raise item
                if item.finished:
                    self._done = True
                yield item
                if self._done:
                    return
        finally:
            if not self._done:
                self._abort()
            self._left = True
            items.clear()

    async def result(self) -> RequestOutput:
        last: RequestOutput | None = None
        async for out in self:
            last = out
        assert last is not None and last.finished
        return last

    def __await__(self) -> Generator[Any, None, RequestOutput]:
        return self.result().__await__()

    # --- the coroutine protocol (a Task drives the handle as `result()`) ---

    def _driven(self) -> Coroutine[Any, Any, RequestOutput]:
        if self._coro is None:
            self._coro = self.result()
        return self._coro

    def send(self, value: Any) -> Any:
        return self._driven().send(value)

    def throw(self, *exc: Any) -> Any:
        return self._driven().throw(*exc)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()
