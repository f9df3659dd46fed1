"""A FastAPI service that owns an aiosched engine in its lifespan.

Run (the engine config comes from the environment: AIOSCHED_CONFIG=file.toml
and/or AIOSCHED_MODEL=/path/to/model):

    AIOSCHED_MODEL=/path/to/model uvicorn examples.fastapi_app:app --port 8080 --loop uvloop

    curl localhost:8080/generate -H 'content-type: application/json' \\
         -d '{"prompt": "def fibonacci(n):", "max_tokens": 32}'
    curl -N localhost:8080/generate -H 'content-type: application/json' \\
         -d '{"prompt": "def fibonacci(n):", "max_tokens": 32, "stream": true}'
    # the OpenAI-compatible API, mounted in the same app:
    curl localhost:8080/openai/v1/completions -H 'content-type: application/json' \\
         -d '{"prompt": "def fibonacci(n):", "max_tokens": 32}'

Starting and stopping the engine in the lifespan ties it to the app: requests can
only arrive while it runs. A client that disconnects mid-stream cancels the
response, which aborts its request and frees its KV cache blocks.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from aiosched import AsyncEngine, EngineConfig, EngineOverloadedError, SamplingParams
from aiosched.server import build_app


class GenerateRequest(BaseModel):
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    stream: bool = False


def config_from_env() -> EngineConfig:
    overrides = {"model": os.environ["AIOSCHED_MODEL"]} if os.environ.get("AIOSCHED_MODEL") else {}
    return EngineConfig.load(os.environ.get("AIOSCHED_CONFIG"), **overrides)


def create_app(config: Any = None) -> FastAPI:
    """`config`: anything EngineConfig.load accepts; None reads the environment at startup."""
    engine = AsyncEngine.from_config(config if config is not None else config_from_env())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine:  # start on startup, stop (aborting what is left) on shutdown
            yield

    app = FastAPI(lifespan=lifespan)
    app.state.engine = engine
    # The OpenAI-compatible routes, sharing the same engine (the mount does not own it).
    app.mount("/openai", build_app(engine))

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Any:
        try:
            stream = engine.generate(body.prompt, SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature))
        except ValueError as e:  # the message starts with the bad field's name
            raise HTTPException(400, str(e)) from None
        except EngineOverloadedError as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        if body.stream:
            async def chunks() -> AsyncIterator[str]:
                try:
                    async for out in stream:
                        yield out.new_text
                finally:
                    engine.abort(stream.request_id)  # no-op when finished; frees blocks if the client left

            return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")
        out = await stream
        return {"text": out.text, "finish_reason": out.finish_reason, "completion_tokens": len(out.token_ids)}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    return app


# `uvicorn examples.fastapi_app:app`: the engine is configured from the environment at
# import (nothing starts) and started by the lifespan.
app = create_app()
