"""OpenAI-compatible HTTP server (Starlette + uvicorn on uvloop).

    aiosched serve --model DIR [engine flags] --host 127.0.0.1 --port 8000 --api-key KEY

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with SSE when
`stream` is true), GET /v1/models, GET /health, GET /metrics (Prometheus).

Embedding: `build_app(engine_or_config, api_key=None)` returns a Starlette app that
any ASGI server can run. Given a config (or an engine that is not started yet) the
app owns the engine: its lifespan starts and stops it. Given a running engine, the
app only uses it, and on shutdown aborts just the requests it submitted.

Errors use the OpenAI format `{"error": {"message", "type", "param", "code"}}`:
400 for bad input (naming the field), 401 for a missing or wrong API key, 404 for
an unknown model, 503 with Retry-After when the engine's queue is full or the
server is draining, 500 when the engine died. A client that disconnects aborts its
request, so its KV blocks go back to the pool at once.

Shutdown (SIGTERM/SIGINT under `aiosched serve`): stop accepting connections, let
in-flight requests finish for up to `--shutdown-timeout` seconds, then abort the
rest and stop the engine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from aiosched.chat_template import ChatTemplateError, render_chat
from aiosched.config import EngineConfig
from aiosched.engine import AsyncEngine
from aiosched.errors import EngineDeadError, EngineNotRunningError, EngineOverloadedError
from aiosched.metrics import ServerMetrics
from aiosched.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    RequestError,
    TopLogprob,
    Usage,
    decode_request,
)
from aiosched.outputs import CompletionOutput, RequestOutput, TokenLogprob
from aiosched.request_stream import RequestStream
from aiosched.sampling_params import SamplingParams, StructuredOutputParams

log = logging.getLogger("aiosched.server")

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_PROMPTS_PER_REQUEST = 256
_encode = msgspec.json.Encoder().encode
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)")


# ------------------------------------------------------------------ errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> bytes:
        return _encode(ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.code)))

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, media_type="application/json", headers=self.headers)


def _engine_error(e: BaseException, fields: dict[str, str]) -> APIError:
    """Map what generate() raises to an HTTP error; `fields` renames engine fields to request fields."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineOverloadedError):
        return APIError(503, f"the server is overloaded: {e}", "server_error", None, "overloaded", {"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return APIError(500, f"the inference engine is dead ({e}); the server must be restarted", "server_error", None, "engine_dead")
    if isinstance(e, EngineNotRunningError):
        return APIError(503, f"the inference engine is not running: {e}", "server_error", None, "engine_not_running", {"Retry-After": "1"})
    if isinstance(e, RequestError):
        return APIError(400, e.message, param=e.param)
    if isinstance(e, ChatTemplateError):
        return APIError(400, str(e), param="messages")
    if isinstance(e, ValueError):
        msg = str(e)
        m = _FIELD.match(msg)
        field = m.group(1) if m else None
        param = fields.get(field, field) if field is not None else None
        if param is not None and param != field:
            msg = param + msg[len(field):] if msg.startswith(field) else msg  # type: ignore[arg-type]
        return APIError(400, msg, param=param)
    log.exception("unexpected error while handling a request", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


# ------------------------------------------------------------------ app state


class ServerState:
    """What the route handlers share; reachable as `app.state.aiosched`."""

    def __init__(self, engine: AsyncEngine, api_key: str | None, served_model_name: str | list[str] | None) -> None:
        self.engine = engine
        self.api_key = api_key
        if served_model_name is None:
            model = engine.config.model
            served_model_name = os.path.basename(os.path.normpath(model)) if model else "aiosched-default"
        self.served_names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        self.owns_engine = False
        self.draining = False
        self.shutdown_timeout: float | None = None  # set by `aiosched serve`; None: the ASGI server decides
        self.loop: asyncio.AbstractEventLoop | None = None
        self.inflight: set[str] = set()  # engine request ids this app submitted and has not seen finish
        self.metrics = ServerMetrics(engine, model_name=self.served_names[0])
        self.created = int(time.time())

    @property
    def model_name(self) -> str:
        return self.served_names[0]

    def begin_drain(self) -> None:
        """Stop taking requests; abort those still running after `shutdown_timeout`.

        Safe to call from a signal handler or another thread."""
        self.draining = True
        loop, timeout = self.loop, self.shutdown_timeout
        if loop is not None and timeout is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.call_later, timeout, self.abort_inflight)

    def abort_inflight(self) -> None:
        for rid in list(self.inflight):
            self.engine.abort(rid)


_SHUTDOWN_ABORT = "the server is shutting down and aborted this request"


def _shutdown_abort(state: ServerState, outs: Any) -> bool:
    """Did the drain timeout abort any of these outputs?"""
    return state.draining and any(c.finish_reason == "abort" for o in outs for c in o.outputs)


def _state(request: Request) -> ServerState:
    return request.app.state.aiosched


# ------------------------------------------------------------------ middleware


class _GateMiddleware:
    """API key on every /v1 route; 503 for new /v1 requests while draining."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self._expected = f"Bearer {state.api_key}".encode() if state.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            err: APIError | None = None
            if self._expected is not None and scope["method"] != "OPTIONS":
                got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
                if not hmac.compare_digest(got, self._expected):
                    msg = "Missing API key: send 'Authorization: Bearer <key>'" if not got else "Incorrect API key provided"
                    err = APIError(401, msg, "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            if err is None and self.state.draining:
                err = APIError(503, "the server is shutting down", "server_error", None, "shutting_down", {"Retry-After": "1", "Connection": "close"})
            if err is not None:
                self.state.metrics.http_errors.labels(str(err.status)).inc()
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------ streaming


class _SSEResponse(Response):
    """Server-sent events from an async iterator of bytes.

    Watches for the client's disconnect while streaming; when it leaves (or the task
    is cancelled) the body generator is closed and `on_close` aborts what is left."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.body_iterator = body
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.on_close()


def _sse(obj: Any) -> bytes:
    data = _encode(obj)
    if b"\xc2\x85" in data or b"\xe2\x80" in data:
        # U+0085, U+2028, U+2029 are legal unescaped in JSON, but line-based SSE readers
        # that split like str.splitlines() (httpx's iter_lines, for one) would cut the
        # event there. Escaping them keeps the JSON identical and every event on one line.
        data = data.replace(b"\xc2\x85", b"\\u0085").replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")
    return b"data: " + data + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------ request handling


class _Job:
    """One API call: its engine requests (one per prompt) and how to describe it."""

    def __init__(self, state: ServerState, kind: str, req: CompletionRequest | ChatCompletionRequest) -> None:
        self.state = state
        self.kind = kind
        self.req = req
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = req.model or state.model_name
        self.n = req.n if req.n is not None else 1
        self.request_ids: list[str] = []
        self.streams: list[RequestStream] = []
        self.finished: set[str] = set()
        self.fields: dict[str, str] = {}  # engine field name -> request field name

    # --- submission ---

    def submit(self, prompts: list[str | list[int]], params: SamplingParams) -> None:
        engine = self.state.engine
        try:
            for i, p in enumerate(prompts):
                rid = self.id if len(prompts) == 1 else f"{self.id}-{i}"
                self.streams.append(engine.generate(p, params, request_id=rid))
                self.request_ids.append(rid)
                self.state.inflight.add(rid)
        except BaseException:
            self.close()
            raise

    def done(self, pi: int, out: RequestOutput) -> None:
        rid = self.request_ids[pi]
        if rid not in self.finished:
            self.finished.add(rid)
            self.state.inflight.discard(rid)
            self.state.metrics.observe(out)

    def close(self) -> None:
        """Abort whatever did not finish (client gone, error, shutdown)."""
        for rid in self.request_ids:
            if rid not in self.finished:
                self.finished.add(rid)
                self.state.inflight.discard(rid)
                self.state.engine.abort(rid)
                self.state.metrics.aborted()

    # --- sampling parameters ---

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        r = self.req
        tok = self.state.engine.tokenizer
        # Fields the request leaves unset take the checkpoint's generation_config.json values.
        kw: dict[str, Any] = dict(tok.generation_defaults) if tok is not None else {}
        if r.max_completion_tokens is not None:
            kw["max_tokens"] = r.max_completion_tokens
            self.fields["max_tokens"] = "max_completion_tokens"
        elif r.max_tokens is not None:
            kw["max_tokens"] = r.max_tokens
        else:
            kw["max_tokens"] = default_max_tokens
        for name in ("temperature", "top_p", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
                     "ignore_eos", "min_tokens", "skip_special_tokens", "include_stop_str_in_output", "n"):
            v = getattr(r, name)
            if v is not None:
                kw[name] = v
        if r.top_k is not None:
            kw["top_k"] = 0 if r.top_k == -1 else r.top_k
        if r.stop is not None:
            kw["stop"] = [r.stop] if isinstance(r.stop, str) else list(r.stop)
        if r.stop_token_ids is not None:
            kw["stop_token_ids"] = list(r.stop_token_ids)
        if r.logit_bias:
            bias: dict[int, float] = {}
            for k, v in r.logit_bias.items():
                try:
                    bias[int(k)] = v
                except ValueError:
                    raise RequestError(f"logit_bias: keys must be token ids, got {k!r}", "logit_bias") from None
            kw["logit_bias"] = bias
        if r.response_format is not None and r.response_format.type != "text":
            self.fields["structured"] = "response_format"
            rf = r.response_format
            if rf.type == "json_object":
                kw["structured"] = StructuredOutputParams(json_object=True)
            else:
                schema = (rf.json_schema or {}).get("schema")
                if not isinstance(schema, dict):
                    raise RequestError("response_format: json_schema.schema must be a JSON schema object", "response_format")
                kw["structured"] = StructuredOutputParams(json_schema=json.dumps(schema))
        if isinstance(r, CompletionRequest):
            if r.logprobs is not None:
                kw["logprobs"] = r.logprobs
            if r.best_of is not None:
                kw["best_of"] = r.best_of
            if r.suffix:
                raise RequestError("suffix: not supported", "suffix")
        else:
            if r.logprobs:
                kw["logprobs"] = r.top_logprobs if r.top_logprobs is not None else 0
                if r.top_logprobs is not None:
                    self.fields["logprobs"] = "top_logprobs"
            elif r.top_logprobs is not None:
                raise RequestError("top_logprobs: requires logprobs to be true", "top_logprobs")
        try:
            return SamplingParams(**kw)
        except TypeError as e:  # pragma: no cover - the Structs agree on field names
            raise RequestError(str(e), None) from None

    # --- formatting ---

    def usage(self, outs: dict[int, RequestOutput], completion_tokens: int) -> Usage:
        prompt = sum(len(o.prompt_token_ids) for o in outs.values())
        cached = sum(o.metrics.num_cached_prompt_tokens for o in outs.values() if o.metrics is not None)
        return Usage(prompt, completion_tokens, prompt + completion_tokens, PromptTokensDetails(cached))

    def token_text(self, tid: int) -> str:
        tok = self.state.engine.tokenizer
        return tok.decode([tid], skip_special_tokens=False) if tok is not None else str(tid)

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            t = self.token_text(lp.token_id)
            tokens.append(t)
            values.append(lp.logprob)
            tops.append({self.token_text(tid): v for tid, v in lp.top})
            offsets.append(offset)
            offset += len(t)
        return CompletionLogprobs(tokens, values, tops, offsets)

    def chat_logprobs(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for lp in lps:
            t = self.token_text(lp.token_id)
            tops = [TopLogprob(s, v, list(s.encode())) for s, v in ((self.token_text(tid), v) for tid, v in lp.top)]
            content.append(ChatTokenLogprob(t, lp.logprob, list(t.encode()), tops))
        return ChatLogprobs(content)

    def echo_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        tok = self.state.engine.tokenizer
        return tok.decode(out.prompt_token_ids) if tok is not None else ""


def _prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise RequestError("prompt: must not be empty", "prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
        if len(p) > MAX_PROMPTS_PER_REQUEST:
            raise RequestError(f"prompt: at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(p)}", "prompt")
        return list(p)  # type: ignore[arg-type]
    raise RequestError("prompt: must be a string, a list of strings, a list of token ids, or a list of token-id lists (not a mix)", "prompt")


def _chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    if not req.messages:
        raise RequestError("messages: must not be empty", "messages")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ("system", "user", "assistant", "developer", "tool"):
            raise RequestError(f"messages[{i}].role: must be one of system, developer, user, assistant, tool; got {m.role!r}", f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise RequestError(f"messages[{i}].content[{j}]: only text content parts are supported, got type {part.type!r}", f"messages[{i}].content")
                texts.append(part.text)
            content = "\n".join(texts)
        msg: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


async def _read_json(request: Request, cls: type) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"request body too large (max {MAX_BODY_BYTES} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body too large (max {MAX_BODY_BYTES} bytes)")
        chunks.append(chunk)
    return decode_request(b"".join(chunks), cls)


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.served_names:
        raise APIError(404, f"The model `{model}` does not exist; this server serves {state.served_names}", param="model", code="model_not_found")


async def _handle(request: Request, kind: str) -> Response:
    state = _state(request)
    job: _Job | None = None
    try:
        req = await _read_json(request, CompletionRequest if kind == "completion" else ChatCompletionRequest)
        _check_model(state, req.model)
        job = _Job(state, kind, req)
        engine = state.engine
        if engine.is_dead:
            raise EngineDeadError("the engine loop stopped")
        if engine.info is None or not engine._running:
            raise EngineNotRunningError("start the engine (or run the app's lifespan) before sending requests")
        if kind == "completion":
            prompts = _prompts_of(req)
            params = job.sampling_params(default_max_tokens=16)
        else:
            tok = engine.tokenizer
            if tok is None:
                raise RequestError("messages: this model has no tokenizer (tokenizer.json), so chat is unavailable", "messages")
            extra = dict(req.chat_template_kwargs or {})
            for reserved in ("messages", "add_generation_prompt"):
                if reserved in extra:
                    raise RequestError(f"chat_template_kwargs: {reserved!r} cannot be overridden", "chat_template_kwargs")
            specials = {k: v for k, v in tok.special_tokens.items() if k not in extra}
            text = render_chat(tok.chat_template, _chat_messages(req), add_generation_prompt=req.add_generation_prompt is not False,
                               special_tokens=specials, **extra)
            ids = tok.encode(text, add_special_tokens=False)  # the template writes the special tokens itself
            job.fields["prompt"] = "messages"
            info = engine.info
            default = 16
            if info is not None:  # as much as the context and the KV cache allow
                default = max(1, min(info.max_model_len, info.num_kv_blocks * info.block_size) - len(ids))
            prompts = [ids]
            params = job.sampling_params(default_max_tokens=default)
        job.submit(prompts, params)
    except Exception as e:
        err = _engine_error(e, job.fields if job is not None else {})
        state.metrics.http_errors.labels(str(err.status)).inc()
        return err.response()
    if req.stream:
        body = _stream_completion(job) if kind == "completion" else _stream_chat(job)
        return _SSEResponse(body, job.close)
    return await _respond(request, job)


async def _respond(request: Request, job: _Job) -> Response:
    """Non-streaming: wait for every output, but abort if the client disconnects."""
    outs: dict[int, RequestOutput] = {}
    error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await _until_disconnect(request.receive)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                async for pi, out in _merge(job.streams):
                    if out.finished:
                        outs[pi] = out
                        job.done(pi, out)
            except Exception as e:
                error = e
            tg.cancel_scope.cancel()
    finally:
        job.close()
    if error is None and _shutdown_abort(job.state, outs.values()):
        error = APIError(503, _SHUTDOWN_ABORT, "server_error", None, "shutting_down", {"Retry-After": "1"})
    if error is not None or len(outs) != len(job.streams):
        err = _engine_error(error or APIError(500, "the request did not finish", "server_error"), job.fields)
        job.state.metrics.http_errors.labels(str(err.status)).inc()
        return err.response()
    completion_tokens = 0
    if job.kind == "completion":
        req = job.req
        choices: list[Any] = []
        for pi in range(len(job.streams)):
            out = outs[pi]
            prefix = job.echo_text(out) if req.echo else ""  # type: ignore[union-attr]
            for c in sorted(out.outputs, key=lambda c: c.index):
                completion_tokens += len(c.token_ids)
                lp = job.completion_logprobs(c.logprobs, len(prefix)) if c.logprobs is not None else None
                choices.append(CompletionChoice(pi * job.n + c.index, prefix + c.text, lp, c.finish_reason, c.stop_reason))
        body: Any = CompletionResponse(job.id, job.created, job.model, choices, job.usage(outs, completion_tokens))
    else:
        out = outs[0]
        choices = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            lp = job.chat_logprobs(c.logprobs) if c.logprobs is not None else None
            choices.append(ChatChoice(c.index, ChatResponseMessage("assistant", c.text), lp, c.finish_reason, c.stop_reason))
        body = ChatCompletionResponse(job.id, job.created, job.model, choices, job.usage(outs, completion_tokens))
    return Response(_encode(body), media_type="application/json")


def _stream_error(e: BaseException, job: _Job) -> bytes:
    err = _engine_error(e, job.fields)
    job.state.metrics.http_errors.labels(str(err.status)).inc()
    return _sse(ErrorResponse(ErrorInfo(err.message, err.type, err.param, err.code)))


def _delta_logprobs(c: CompletionOutput) -> list[TokenLogprob] | None:
    if c.logprobs is None:
        return None
    n_new = len(c.new_token_ids)
    return c.logprobs[len(c.logprobs) - n_new:] if n_new else []


async def _stream_completion(job: _Job) -> AsyncIterator[bytes]:
    req = job.req
    assert isinstance(req, CompletionRequest)
    so = req.stream_options
    include_usage = bool(so and so.include_usage)
    continuous = bool(so and so.continuous_usage_stats)
    outs: dict[int, RequestOutput] = {}
    ntokens: dict[int, int] = {}
    offsets: dict[int, int] = {}
    finished: set[int] = set()
    echoed: set[int] = set()
    try:
        async for pi, out in _merge(job.streams):
            outs[pi] = out
            if req.echo and pi not in echoed:
                echoed.add(pi)
                prefix = job.echo_text(out)
                for k in range(job.n):
                    offsets[pi * job.n + k] = len(prefix)
                    yield _sse(CompletionChunk(job.id, job.created, job.model, [CompletionChoice(pi * job.n + k, prefix)]))
            for c in out.outputs:
                idx = pi * job.n + c.index
                if idx in finished:
                    continue
                ntokens[idx] = len(c.token_ids)
                lps = _delta_logprobs(c)
                if not c.new_text and c.finish_reason is None and not lps:
                    continue  # nothing printable yet (e.g. half a UTF-8 character)
                lp = job.completion_logprobs(lps, offsets.get(idx, 0)) if lps else None
                offsets[idx] = offsets.get(idx, 0) + len(c.new_text)
                if c.finish_reason is not None:
                    finished.add(idx)
                usage = job.usage(outs, sum(ntokens.values())) if continuous else None
                yield _sse(CompletionChunk(job.id, job.created, job.model, [CompletionChoice(idx, c.new_text, lp, c.finish_reason, c.stop_reason)], usage))
            if out.finished:
                job.done(pi, out)
        if _shutdown_abort(job.state, outs.values()):
            yield _stream_error(APIError(503, _SHUTDOWN_ABORT, "server_error", None, "shutting_down"), job)
            return
        if include_usage:
            yield _sse(CompletionChunk(job.id, job.created, job.model, [], job.usage(outs, sum(ntokens.values()))))
        yield _DONE
    except Exception as e:
        yield _stream_error(e, job)


async def _stream_chat(job: _Job) -> AsyncIterator[bytes]:
    req = job.req
    so = req.stream_options
    include_usage = bool(so and so.include_usage)
    continuous = bool(so and so.continuous_usage_stats)
    outs: dict[int, RequestOutput] = {}
    ntokens: dict[int, int] = {}
    finished: set[int] = set()
    try:
        # The first chunk of every choice carries the role.
        yield _sse(ChatCompletionChunk(job.id, job.created, job.model, [ChatChunkChoice(k, DeltaMessage(role="assistant", content="")) for k in range(job.n)]))
        async for pi, out in _merge(job.streams):
            outs[pi] = out
            for c in out.outputs:
                if c.index in finished:
                    continue
                ntokens[c.index] = len(c.token_ids)
                lps = _delta_logprobs(c)
                if not c.new_text and c.finish_reason is None and not lps:
                    continue
                if c.finish_reason is not None:
                    finished.add(c.index)
                delta = DeltaMessage(content=c.new_text) if c.new_text or c.finish_reason is None else DeltaMessage()
                usage = job.usage(outs, sum(ntokens.values())) if continuous else None
                lp = job.chat_logprobs(lps) if lps else None
                yield _sse(ChatCompletionChunk(job.id, job.created, job.model, [ChatChunkChoice(c.index, delta, lp, c.finish_reason, c.stop_reason)], usage))
            if out.finished:
                job.done(pi, out)
        if _shutdown_abort(job.state, outs.values()):
            yield _stream_error(APIError(503, _SHUTDOWN_ABORT, "server_error", None, "shutting_down"), job)
            return
        if include_usage:
            yield _sse(ChatCompletionChunk(job.id, job.created, job.model, [], job.usage(outs, sum(ntokens.values()))))
        yield _DONE
    except Exception as e:
        yield _stream_error(e, job)


# ------------------------------------------------------------------ routes


async def completions(request: Request) -> Response:
    return await _handle(request, "completion")


async def chat_completions(request: Request) -> Response:
    return await _handle(request, "chat")


async def models(request: Request) -> Response:
    state = _state(request)
    info = state.engine.info
    root = state.engine.config.resolved_model
    cards = [ModelCard(name, state.created, root=root, max_model_len=info.max_model_len if info else None) for name in state.served_names]
    return Response(_encode(ModelList(cards)), media_type="application/json")


async def health(request: Request) -> Response:
    state = _state(request)
    engine = state.engine
    if engine.is_dead:
        return Response(b'{"status":"dead"}', status_code=503, media_type="application/json")
    if state.draining:
        return Response(b'{"status":"draining"}', status_code=503, media_type="application/json")
    if engine.info is None:
        return Response(b'{"status":"starting"}', status_code=503, media_type="application/json")
    return Response(b'{"status":"ok"}', media_type="application/json")


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------ app factory


def build_app(engine_or_config: "AsyncEngine | EngineConfig | dict[str, Any] | str | os.PathLike[str]", api_key: str | None = None,
              *, served_model_name: str | list[str] | None = None) -> Starlette:
    """The OpenAI-compatible ASGI app.

    `engine_or_config`: a running AsyncEngine (shared: the app never stops it), an
    AsyncEngine not started yet, or anything `EngineConfig.load` accepts (the app's
    lifespan starts and stops the engine). `api_key`: require `Authorization: Bearer`
    on /v1 routes."""
    engine = engine_or_config if isinstance(engine_or_config, AsyncEngine) else AsyncEngine.from_config(engine_or_config)
    state = ServerState(engine, api_key or None, served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        if engine.info is None or not engine._running:
            await engine.start()
            state.owns_engine = True
        state.draining = False
        try:
            yield
        finally:
            state.draining = True
            for rid in list(state.inflight):  # whatever the server's graceful timeout left
                engine.abort(rid)
            state.inflight.clear()
            if state.owns_engine:
                await engine.shutdown()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_GateMiddleware, state=state)], lifespan=lifespan)
    app.state.aiosched = state
    return app


# ------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from aiosched.engine_args import add_engine_arguments

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes (default: $AIOSCHED_API_KEY)")
    parser.add_argument("--served-model-name", default=None, help="the model name clients use (default: the model dir's name)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True, help="log every HTTP request")
    add_engine_arguments(parser)


def _make_server(app: Starlette, shutdown_timeout: float | None = 30.0, **config: Any) -> Any:
    """A uvicorn Server for `app` with aiosched's graceful shutdown.

    On SIGTERM/SIGINT (or `handle_exit`), new /v1 requests get 503 and the listening
    socket closes; in-flight requests run on for `shutdown_timeout` seconds, then the
    app aborts them (their clients get a `shutting_down` error); then the lifespan
    stops the engine. uvicorn's own graceful timeout is only a backstop."""
    import uvicorn

    state: ServerState = app.state.aiosched
    state.shutdown_timeout = shutdown_timeout

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                state.begin_drain()
            super().handle_exit(sig, frame)

    config.setdefault("lifespan", "on")
    if shutdown_timeout is not None:
        config.setdefault("timeout_graceful_shutdown", shutdown_timeout + 5.0)
    return _Server(uvicorn.Config(app, **config))


async def _serve(app: Starlette, args: argparse.Namespace) -> int:
    server = _make_server(app, shutdown_timeout=args.shutdown_timeout, host=args.host, port=args.port, log_level=args.log_level,
                          access_log=args.access_log)
    await server.serve()
    return 0 if server.started else 1


def main(args: argparse.Namespace) -> int:
    from aiosched.engine_args import engine_config_from_args
    from aiosched.event_loop import run

    config = engine_config_from_args(args)
    api_key = args.api_key or os.environ.get("AIOSCHED_API_KEY") or None
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(config, api_key=api_key, served_model_name=args.served_model_name)
    return run(_serve(app, args))
