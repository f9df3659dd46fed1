"""Run an ASGI app under uvicorn (on uvloop) in a background thread, on 127.0.0.1 only."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiosched.event_loop import run


class ServerThread:
    """`with ServerThread(app) as srv:` serves `app` at `srv.url` (a random free port)."""

    def __init__(self, app: Any, startup_timeout: float = 60.0, **uvicorn_config: Any) -> None:
        import uvicorn

        from aiosched.server import _make_server

        self.app = app
        self.startup_timeout = startup_timeout
        uvicorn_config.setdefault("log_level", "warning")
        uvicorn_config.setdefault("access_log", False)
        if hasattr(getattr(app, "state", None), "aiosched"):  # an aiosched.server app: its own drain logic
            self.server = _make_server(app, **uvicorn_config)
        else:
            self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **uvicorn_config))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._run, name="test-uvicorn", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self._sock])

        try:
            run(main())
        except BaseException as e:  # surfaced by __enter__/__exit__
            self.error = e

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.error!r}")
            time.sleep(0.02)
        return self

    def call(self, fn: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
        """Run `await fn()` on the server's event loop (e.g. to inspect the engine)."""
        assert self.loop is not None

        async def wrapper() -> Any:
            return await fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError("server thread did not stop")

    def __exit__(self, *exc: object) -> None:
        self.stop()
