"""OpenAI-compatible HTTP server (Starlette + uvicorn on uvloop).

    aiosched serve --model DIR [engine flags] --host 127.0.0.1 --port 8000 --api-key KEY

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with SSE when
`stream` is true), GET /v1/models, GET /v1/models/{id}, POST /tokenize and
/detokenize (vLLM's), GET /health, GET /metrics (Prometheus).

Chat: tools (`tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls`
and `tool` messages) go to the chat template; calls are parsed out of the output by
`--tool-call-parser` (aiosched.tool_parsers), or enforced by the structured-output
grammar for `tool_choice="required"` / a named function (aiosched.chat_output);
`--reasoning-parser` splits `<think>` reasoning into `reasoning_content`.

Embedding: `build_app(engine_or_config, api_key=None, ...)` returns a Starlette app
that any ASGI server can run, at the root or mounted under a prefix. Given a config
(or an engine that is not started yet) the app owns the engine: its lifespan starts
and stops it. Given a running engine, the app only uses it, and on shutdown aborts
just the requests it submitted.

Errors use the OpenAI format `{"error": {"message", "type", "param", "code"}}`
(aiosched.server_http): 400 for bad input (naming the field), 401 for a missing or
wrong API key, 404 for an unknown model or route, 405, 413 for a body over 32 MiB,
503 with Retry-After when the engine's queue is full or the server is draining, 500
when the engine died. A client that disconnects aborts its request, so its KV blocks
go back to the pool at once.

Shutdown (SIGTERM/SIGINT under `aiosched serve`): stop accepting connections, let
in-flight requests finish for up to `--shutdown-timeout` seconds, then abort the
rest and stop the engine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from aiosched.chat_output import (
    ChoiceParser,
    Piece,
    delta_of,
    finish_reason,
    forced_parser,
    forced_schema,
    message_of,
    schema_text,
    tool_dicts,
)
from aiosched.chat_template import ChatTemplateError, apply_chat_template, read_template_override
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
        ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    IGNORED_FIELDS,
    IGNORED_MESSAGE_FIELDS,
    ModelCard,
    ModelList,
    NamedToolChoice,
    PromptTokensDetails,
    RequestError,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TopLogprob,
    Usage,
    decode_request,
)
from aiosched.outputs import RequestOutput, TokenLogprob
from aiosched.reasoning_parser import check_reasoning_parser, make_reasoning_parser
from aiosched.request_stream import RequestStream
from aiosched.sampling_params import SamplingParams, StructuredOutputParams
from aiosched.server_http import (
    MAX_BODY_BYTES,
    MAX_DRAIN_BYTES,
    SCOPE_REQUEST_ID,
    APIError,
    GateMiddleware,
    JSONErrorCORSMiddleware,
    RequestIdMiddleware,
    body_too_large,
    http_exception,
    internal_error,
    parse_origins,
)
from aiosched.tool_parsers import TOOL_PARSERS, make_tool_parser

log = logging.getLogger("aiosched.server")

MAX_PROMPTS_PER_REQUEST = 256
_encode = msgspec.json.Encoder().encode
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)")
# The message field a chat template error names: `messages[3].role`, `messages[0].content[1]` -> `messages[0].content`.
_MESSAGE_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?(?:\.[A-Za-z_][A-Za-z0-9_]*)?)(?:\[\d+\])?:")


# ------------------------------------------------------------------ errors


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
        m = _MESSAGE_FIELD.match(str(e))
        param = m.group(1) if m is not None else "messages"
        return APIError(400, str(e), param=param)
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
        self.chat_template: str | None = None  # an override of the model's
        self.tool_call_parser: str | None = None
        self.reasoning_parser: str | None = None
        self.strict_fields = False  # refuse the OpenAI fields the server would ignore
        self.max_body_bytes = MAX_BODY_BYTES
        self.logged_ignored: set[str] = set()  # ignored request fields already logged
        aliases: set[str] = set()
        if served_model_name is None:
            model = engine.config.model
            served_model_name = os.path.basename(os.path.normpath(model)) if model else "aiosched-default"
            # Without a served name, the model as configured (its path, as vLLM's server
            # names it) is accepted too, beside the listed short name.
            if model:
                aliases = {model, os.path.normpath(model)}
        self.served_names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        self.accepted_names = set(self.served_names) | aliases
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

    def __init__(self, state: ServerState, kind: str, req: CompletionRequest | ChatCompletionRequest, request_id: str | None = None) -> None:
        self.state = state
        self.kind = kind
        self.req = req
        # The client's X-Request-Id names the engine request (a suffix keeps ids of concurrent calls apart).
        base = ("chatcmpl-" if kind == "chat" else "cmpl-") + (request_id or uuid.uuid4().hex)
        if base in state.inflight or f"{base}-0" in state.inflight:
            base += "-" + uuid.uuid4().hex[:8]
        self.id = base
        self.created = int(time.time())
        self.model = req.model or state.model_name
        self.n = req.n if req.n is not None else 1
        self.request_ids: list[str] = []
        self.streams: list[RequestStream] = []
        self.finished: set[str] = set()
        self.fields: dict[str, str] = {}  # engine field name -> request field name
        # chat: how each choice's text becomes content / reasoning / tool calls
        self.make_parser: Callable[[], ChoiceParser] = ChoiceParser
        self.named_tool = False  # a named tool_choice: finish_reason stays "stop"
        self.forced: StructuredOutputParams | None = None  # the grammar of a forced tool call

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
        if self.forced is not None:
            kw["structured"] = self.forced
            self.fields["structured"] = "tools"  # the schema comes from the tool's parameters
        elif r.response_format is not None and r.response_format.type != "text":
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


def _chat_messages(req: ChatCompletionRequest | TokenizeChatRequest, strict: bool) -> list[dict[str, Any]]:
    """The request's messages as OpenAI-style dicts for the chat template."""
    out = []
    for i, m in enumerate(req.messages):
        if strict:
            for name in IGNORED_MESSAGE_FIELDS:
                if getattr(m, name) is not None:
                    raise RequestError(f"messages[{i}].{name}: not supported (the server runs with --strict-request-fields)", f"messages[{i}].{name}")
        msg = msgspec.to_builtins(m)
        for name in IGNORED_MESSAGE_FIELDS:
            msg.pop(name, None)
        out.append(msg)
    return out


def _check_ignored_fields(state: ServerState, req: Any) -> None:
    """OpenAI fields we accept but do not act on: ignored (logged once), or refused in strict mode."""
    for name in IGNORED_FIELDS.get(type(req), ()):
        if getattr(req, name) is None:
            continue
        if state.strict_fields:
            raise RequestError(f"{name}: not supported (the server runs with --strict-request-fields)", name)
        if name not in state.logged_ignored:
            state.logged_ignored.add(name)
            log.debug("request field %r is accepted and ignored (logged once)", name)


async def _read_json(request: Request, cls: type) -> Any:
    return decode_request(await _read_body(request), cls)


async def _read_body(request: Request) -> bytes:
    """The body, up to the limit (a chunked body has no Content-Length for the gate to check)."""
    limit = request.app.state.aiosched.max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > MAX_DRAIN_BYTES:
            break  # read (and dropped) the rest, so the client sees the 413, not a reset
    if size > limit:
        raise body_too_large(limit)
    return b"".join(chunks)


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.accepted_names:
        raise APIError(404, f"The model `{model}` does not exist; this server serves {state.served_names}", param="model", code="model_not_found")


def _check_engine(engine: AsyncEngine) -> None:
    if engine.is_dead:
        raise EngineDeadError("the engine loop stopped")
    if engine.info is None or not engine._running:
        raise EngineNotRunningError("start the engine (or run the app's lifespan) before sending requests")


def _tool_setup(state: ServerState, req: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, str | NamedToolChoice | None]:
    """Check tools / tool_choice; returns (tools for the template, the effective choice)."""
    if req.functions is not None or req.function_call is not None:
        name = "functions" if req.functions is not None else "function_call"
        raise RequestError(f"{name}: deprecated by OpenAI and not supported; use tools and tool_choice", name)
    tools, choice = req.tools, req.tool_choice
    if tools is not None and not tools:
        raise RequestError("tools: must not be empty (leave it out for no tools)", "tools")
    if not tools:
        if choice not in (None, "none"):
            raise RequestError("tool_choice: needs tools", "tool_choice")
        return None, None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise RequestError("tools: function names must be unique", "tools")
    choice = choice if choice is not None else "auto"
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise RequestError(f"tool_choice: function {choice.function.name!r} is not in tools", "tool_choice")
    if choice == "auto" and state.tool_call_parser is None:
        raise RequestError(f"tool_choice: \"auto\" needs a server started with --tool-call-parser ({', '.join(sorted(TOOL_PARSERS))}); "
                           "\"required\" or a named function work without one", "tool_choice")
    if (choice == "required" or isinstance(choice, NamedToolChoice)) and req.response_format is not None and req.response_format.type != "text":
        raise RequestError("response_format: cannot be combined with a tool_choice that forces a call", "response_format")
    return tool_dicts(tools), choice


def _prepare_chat(state: ServerState, job: _Job, req: ChatCompletionRequest) -> list[int]:
    """Render the prompt and set up the job's output parsing; returns the prompt's token ids."""
    engine = state.engine
    tools, choice = _tool_setup(state, req)
    text = apply_chat_template(engine.tokenizer, _chat_messages(req, state.strict_fields), tools=tools,
                               add_generation_prompt=req.add_generation_prompt is not False, chat_template=state.chat_template,
                               **(req.chat_template_kwargs or {}))
    ids = engine.tokenizer.encode(text, add_special_tokens=False)  # type: ignore[union-attr]  # the template writes the special tokens itself
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced:
        assert req.tools is not None and choice is not None
        job.forced = StructuredOutputParams(json_schema=schema_text(forced_schema(req.tools, choice, req.parallel_tool_calls is not False)))
        job.named_tool = isinstance(choice, NamedToolChoice)
    reasoning = state.reasoning_parser if not forced else None  # a forced call is JSON from its first token
    names = [t.function.name for t in req.tools or []]

    def make_parser() -> ChoiceParser:
        r = make_reasoning_parser(reasoning, text) if reasoning is not None else None
        if forced:
            t = forced_parser(req.tools or [], choice)  # type: ignore[arg-type]
        elif choice == "auto":
            t = make_tool_parser(state.tool_call_parser, names)  # type: ignore[arg-type]
        else:
            t = None
        return ChoiceParser(r, t)

    job.make_parser = make_parser
    return ids


async def _handle(request: Request, kind: str) -> Response:
    state = _state(request)
    job: _Job | None = None
    try:
        req = await _read_json(request, CompletionRequest if kind == "completion" else ChatCompletionRequest)
        _check_model(state, req.model)
        _check_ignored_fields(state, req)
        job = _Job(state, kind, req, request.scope.get(SCOPE_REQUEST_ID))
        engine = state.engine
        _check_engine(engine)
        if kind == "completion":
            prompts = _prompts_of(req)
            params = job.sampling_params(default_max_tokens=16)
        else:
            ids = _prepare_chat(state, job, req)
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
            parser = job.make_parser()
            message = message_of(parser, c.text)
            choices.append(ChatChoice(c.index, message, lp, finish_reason(c.finish_reason, parser, job.named_tool), c.stop_reason))
        body = ChatCompletionResponse(job.id, job.created, job.model, choices, job.usage(outs, completion_tokens))
    return Response(_encode(body), media_type="application/json")


def _stream_error(e: BaseException, job: _Job) -> bytes:
    err = _engine_error(e, job.fields)
    job.state.metrics.http_errors.labels(str(err.status)).inc()
    return _sse(ErrorResponse(ErrorInfo(err.message, err.type, err.param, err.code)))


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
                if not c.new_token_ids and c.finish_reason is None:
                    continue
                ntokens[idx] = c.num_tokens
                lps = c.new_logprobs
                # One chunk per output, also when its text is still empty (half a UTF-8
                # character): clients count chunks as tokens.
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
    """One chunk per output of each choice; a choice's first chunk (with its first token) carries the role."""
    req = job.req
    so = req.stream_options
    include_usage = bool(so and so.include_usage)
    continuous = bool(so and so.continuous_usage_stats)
    outs: dict[int, RequestOutput] = {}
    ntokens: dict[int, int] = {}
    finished: set[int] = set()
    parsers: dict[int, ChoiceParser] = {}
    try:
        async for pi, out in _merge(job.streams):
            outs[pi] = out
            for c in out.outputs:
                if c.index in finished or (not c.new_token_ids and c.finish_reason is None):
                    continue
                ntokens[c.index] = c.num_tokens
                first = c.index not in parsers
                parser = parsers[c.index] if not first else parsers.setdefault(c.index, job.make_parser())
                piece = parser.feed(c.new_text)
                reason = None
                if c.finish_reason is not None:
                    finished.add(c.index)
                    tail = parser.finish()
                    piece = Piece(piece.reasoning + tail.reasoning, piece.content + tail.content, piece.tool_events + tail.tool_events)
                    reason = finish_reason(c.finish_reason, parser, job.named_tool)
                delta = delta_of(piece, "assistant" if first else None)
                usage = job.usage(outs, sum(ntokens.values())) if continuous else None
                lps = c.new_logprobs
                lp = job.chat_logprobs(lps) if lps else None
                yield _sse(ChatCompletionChunk(job.id, job.created, job.model, [ChatChunkChoice(c.index, delta, lp, reason, c.stop_reason)], usage))
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


def _model_card(state: ServerState, name: str) -> ModelCard:
    info = state.engine.info
    return ModelCard(name, state.created, root=state.engine.config.resolved_model, max_model_len=info.max_model_len if info else None)


async def models(request: Request) -> Response:
    state = _state(request)
    return Response(_encode(ModelList([_model_card(state, n) for n in state.served_names])), media_type="application/json")


async def model(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["model_id"]
    try:
        _check_model(state, name)
    except APIError as e:
        return e.response()
    return Response(_encode(_model_card(state, name)), media_type="application/json")


async def tokenize(request: Request) -> Response:
    """vLLM's /tokenize: `prompt` (completions) or `messages` (chat, rendered with the template)."""
    state = _state(request)
    try:
        body = await _read_body(request)
        try:
            is_chat = "messages" in msgspec.json.decode(body, type=dict[str, Any])
        except (msgspec.DecodeError, msgspec.ValidationError):
            is_chat = False  # decode_request below names the problem
        req = decode_request(body, TokenizeChatRequest if is_chat else TokenizeCompletionRequest)
        _check_model(state, req.model)
        engine = state.engine
        _check_engine(engine)
        tok = engine.tokenizer
        if tok is None:
            raise RequestError("prompt: this model has no tokenizer (tokenizer.json)", None)
        if is_chat:
            tools = tool_dicts(req.tools) if req.tools else None
            text = apply_chat_template(tok, _chat_messages(req, state.strict_fields), tools=tools, chat_template=state.chat_template,
                                       add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                                       **(req.chat_template_kwargs or {}))
            if req.continue_final_message:
                last = _chat_messages(req, False)[-1].get("content") or ""
                if isinstance(last, str) and last and last in text:
                    text = text[: text.rindex(last) + len(last)]  # end the prompt inside the last message
        else:
            text = req.prompt
        ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
        strs = [tok.id_to_token(t) or "" for t in ids] if req.return_token_strs else None
        assert engine.info is not None
        return Response(_encode(TokenizeResponse(len(ids), engine.info.max_model_len, ids, strs)), media_type="application/json")
    except Exception as e:
        err = _engine_error(e, {})
        state.metrics.http_errors.labels(str(err.status)).inc()
        return err.response()


async def detokenize(request: Request) -> Response:
    """vLLM's /detokenize: token ids -> text."""
    state = _state(request)
    try:
        req = decode_request(await _read_body(request), DetokenizeRequest)
        _check_model(state, req.model)
        engine = state.engine
        _check_engine(engine)
        tok, info = engine.tokenizer, engine.info
        assert info is not None
        if tok is None:
            raise RequestError("tokens: this model has no tokenizer (tokenizer.json)", "tokens")
        for t in req.tokens:
            if not 0 <= t < info.vocab_size:
                raise RequestError(f"tokens: token id {t} is out of range [0, {info.vocab_size})", "tokens")
        # Special tokens stay (as vLLM's): the text tokenizes back to the same ids.
        return Response(_encode(DetokenizeResponse(tok.decode(req.tokens, skip_special_tokens=False))), media_type="application/json")
    except Exception as e:
        err = _engine_error(e, {})
        state.metrics.http_errors.labels(str(err.status)).inc()
        return err.response()


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
              *, served_model_name: str | list[str] | None = None, chat_template: str | os.PathLike[str] | None = None,
              tool_call_parser: str | None = None, reasoning_parser: str | None = None,
              allowed_origins: str | list[str] | None = None, strict_request_fields: bool = False,
              max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The OpenAI-compatible ASGI app.

    `engine_or_config`: a running AsyncEngine (shared: the app never stops it), an
    AsyncEngine not started yet, or anything `EngineConfig.load` accepts (the app's
    lifespan starts and stops the engine). `api_key`: require `Authorization: Bearer`
    on every route but /health and /metrics, wherever the app is mounted.
    `chat_template`: a file (or template text) instead of the model's.
    `tool_call_parser`: how tool calls are found in outputs (`hermes`, `qwen`,
    `llama3_json`); needed for `tool_choice="auto"`. `reasoning_parser`: `qwen3` /
    `deepseek_r1` split `<think>` into `reasoning_content`. `allowed_origins`: CORS
    origins (a list, a JSON list, or comma-separated; `*` for any).
    `strict_request_fields`: refuse (400) the OpenAI fields otherwise accepted and
    ignored. Raises ValueError naming the argument for a bad value."""
    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser: must be one of {sorted(TOOL_PARSERS)}, got {tool_call_parser!r}")
    check_reasoning_parser(reasoning_parser)
    template = read_template_override(chat_template) if chat_template is not None else None
    origins = parse_origins(allowed_origins)
    engine = engine_or_config if isinstance(engine_or_config, AsyncEngine) else AsyncEngine.from_config(engine_or_config)
    state = ServerState(engine, api_key or None, served_model_name)
    state.chat_template, state.tool_call_parser, state.reasoning_parser = template, tool_call_parser, reasoning_parser
    state.strict_fields = strict_request_fields
    state.max_body_bytes = max_body_bytes

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
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    middleware = []
    if origins:  # outermost: errors from the gate carry the CORS headers too, so browsers can read them
        middleware.append(Middleware(JSONErrorCORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["*"], expose_headers=["X-Request-Id"], max_age=600))
    middleware += [
        Middleware(RequestIdMiddleware),
        Middleware(GateMiddleware, key=state.api_key, draining=lambda: state.draining,
                   on_error=lambda status: state.metrics.http_errors.labels(str(status)).inc(), max_body_bytes=max_body_bytes),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_exception, Exception: internal_error})
    app.state.aiosched = state
    return app


# ------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from aiosched.engine_args import add_engine_arguments

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health and /metrics (default: $AIOSCHED_API_KEY)")
    parser.add_argument("--served-model-name", default=None, help="the model name clients use (default: the model dir's name)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a jinja chat template file to use instead of the model's (chat_template.jinja / tokenizer_config.json)")
    parser.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="how tool calls are parsed out of outputs; needed for tool_choice=auto (hermes/qwen: <tool_call> JSON; llama3_json: Llama 3 JSON)")
    parser.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                        help="split <think>...</think> reasoning into reasoning_content")
    parser.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                        help='CORS: origins browsers may call from, as a JSON list (\'["*"]\') or comma-separated (default: none)')
    parser.add_argument("--strict-request-fields", action="store_true",
                        help="refuse (400) OpenAI request fields the server otherwise accepts and ignores (store, metadata, service_tier, ...)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True, help="log every HTTP request")
    add_engine_arguments(parser)


def _make_server(app: Starlette, shutdown_timeout: float | None = 30.0, **config: Any) -> Any:
    """A uvicorn Server for `app` with aiosched's graceful shutdown.

    On SIGTERM/SIGINT (or `handle_exit`), new requests get 503 and the listening
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


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, taken before anything else starts: a port in use fails at once.

    Raises OSError (e.g. EADDRINUSE) from bind."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may reuse a port in TIME_WAIT
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def _serve(app: Starlette, args: argparse.Namespace, sock: socket.socket | None = None) -> int:
    server = _make_server(app, shutdown_timeout=args.shutdown_timeout, host=args.host, port=args.port, log_level=args.log_level,
                          access_log=args.access_log)
    await server.serve(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1


def main(args: argparse.Namespace) -> int:
    from aiosched.engine_args import engine_config_from_args
    from aiosched.event_loop import run

    # The port first: a port in use must not cost a model load to find out.
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        print(f"aiosched serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        config = engine_config_from_args(args)
        api_key = args.api_key or os.environ.get("AIOSCHED_API_KEY") or None
        logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = build_app(config, api_key=api_key, served_model_name=args.served_model_name, chat_template=args.chat_template,
                        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                        allowed_origins=args.allowed_origins, strict_request_fields=args.strict_request_fields)
        return run(_serve(app, args, sock))
    finally:
        sock.close()
