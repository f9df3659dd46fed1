"""An aiohttp web service with an aiosched engine owned by the app's cleanup context.

Run:

    python examples/aiohttp_app.py --model /path/to/model --port 8081
    curl localhost:8081/generate -d '{"prompt": "def fibonacci(n):", "max_tokens": 32}'
    curl -N localhost:8081/generate -d '{"prompt": "def fibonacci(n):", "max_tokens": 32, "stream": true}'

`cleanup_ctx` starts the engine before the first request and stops it after the
last one. The streaming handler writes each delta as it comes; when the client
disconnects, the write fails, the `async for` is left, and that aborts the request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from aiosched import AsyncEngine, EngineConfig, EngineOverloadedError, SamplingParams

ENGINE = web.AppKey("engine", AsyncEngine)


async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        body = await request.json()
        params = SamplingParams(max_tokens=int(body.get("max_tokens", 64)), temperature=float(body.get("temperature", 0.0)))
        stream = engine.generate(body["prompt"], params)
    except (ValueError, KeyError, TypeError) as e:
        return web.json_response({"error": f"bad request: {e}"}, status=400)
    except EngineOverloadedError as e:
        return web.json_response({"error": str(e)}, status=503, headers={"Retry-After": "1"})
    if not body.get("stream"):
        out = await stream
        return web.json_response({"text": out.text, "finish_reason": out.finish_reason, "completion_tokens": len(out.token_ids)})
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    try:
        async for out in stream:
            await resp.write(out.new_text.encode())
    except (ConnectionResetError, asyncio.CancelledError):
        engine.abort(stream.request_id)  # (leaving the loop already did; explicit for clarity)
        raise
    await resp.write_eof()
    return resp


def create_app(config: Any = None) -> web.Application:
    app = web.Application()

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        async with AsyncEngine.from_config(config) as engine:
            app[ENGINE] = engine
            yield

    app.cleanup_ctx.append(engine_ctx)
    app.router.add_post("/generate", generate)
    app.router.add_get("/stats", _stats)
    return app


async def _stats(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(request.app[ENGINE].stats()), content_type="application/json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF-layout model directory")
    parser.add_argument("--config", help="TOML engine config")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    config = EngineConfig.load(args.config, **({"model": args.model} if args.model else {}))
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = None
    web.run_app(create_app(config), host=args.host, port=args.port, loop=loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
