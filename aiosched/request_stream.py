"""The handle `generate()` returns: awaitable (final output) and an async iterator (stream).

Leaving the stream early (break, exception, task cancellation) aborts the request,
so its KV blocks go back to the pool at once.
"""
from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from aiosched.outputs import RequestOutput


class RequestStream:
    def __init__(self, request_id: str, abort: Callable[[], None]) -> None:
        self.request_id = request_id
        self._abort = abort
        self._send: MemoryObjectSendStream[RequestOutput | BaseException]
        self._recv: MemoryObjectReceiveStream[RequestOutput | BaseException]
        self._send, self._recv = anyio.create_memory_object_stream(math.inf)
        self._done = False  # the consumer saw the final output (or an error)
        self._consumed = False

    # --- engine side (event loop thread) ---

    def put(self, output: RequestOutput) -> None:
        self._send.send_nowait(output)
        if output.finished:
            self._send.close()

    def fail(self, exc: BaseException) -> None:
        try:
            self._send.send_nowait(exc)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        self._send.close()

    # --- user side ---

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._consumed:
            raise RuntimeError("a generate() stream can be consumed only once")
        self._consumed = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            async for item in self._recv:
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
            self._recv.close()

    async def result(self) -> RequestOutput:
        last: RequestOutput | None = None
        async for out in self:
            last = out
        assert last is not None and last.finished
        return last

    def __await__(self) -> Generator[Any, None, RequestOutput]:
        return self.result().__await__()
