"""The HTTP envelope of the OpenAI server: errors, API key, drain, body limit, request ids, CORS.

Every error the server sends is OpenAI-shaped JSON, `{"error": {"message", "type",
"param", "code"}}`: those the routes raise (`APIError`), 401/503 from the gate, 413
for a body over the limit, 404 and 405 from the router, 500 for a bug, and a CORS
preflight that is refused.

Routes are matched relative to where the app is mounted (`scope["root_path"]`), so
the API key and the drain-time 503 hold under `fastapi_app.mount("/openai", ...)`
or any other prefix, exactly as at the root: every route needs the key except the
public ones (`/health`, `/metrics`) and CORS preflights.
"""
from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aiosched.openai_protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("aiosched.server")
_encode = msgspec.json.Encoder().encode

PUBLIC_ROUTES = frozenset({"/health", "/metrics"})
MAX_BODY_BYTES = 32 * 1024 * 1024
# A body over the limit is read and discarded up to this much before the 413 goes out:
# answering while the client is still sending makes its TCP stack see a reset, not the error.
MAX_DRAIN_BYTES = 256 * 1024 * 1024
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
SCOPE_REQUEST_ID = "aiosched.request_id"


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


def route_path(scope: Scope) -> str:
    """The path inside this app, wherever it is mounted.

    Starlette's Mount (and uvicorn's --root-path) keep the full path in `path` and put
    the prefix in `root_path`; a server that strips the prefix leaves `path` relative."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "") or ""
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"request body too large (max {limit} bytes)", "invalid_request_error", None, "request_too_large",
                    {"Connection": "close"})


async def drain(receive: Receive, already: int = 0, limit: int = MAX_DRAIN_BYTES) -> None:
    """Read and drop the rest of a request body (up to `limit` bytes in all)."""
    seen = already
    while seen <= limit:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


# ---------------------------------------------------------------- middleware


class GateMiddleware:
    """API key on every non-public route; 503 for new requests while draining; the body limit.

    `key` and `draining` are callables so the app's state decides at request time."""

    def __init__(self, app: ASGIApp, key: str | None, draining: Callable[[], bool], on_error: Callable[[int], None],
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self._expected = f"Bearer {key}".encode() if key else None
        self._draining = draining
        self._on_error = on_error
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self._check(scope)
        if err is None:
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                err = body_too_large(self.max_body_bytes)
        if err is not None:
            self._on_error(err.status)
            if scope["method"] not in ("GET", "HEAD"):
                await drain(receive)
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> APIError | None:
        if route_path(scope) in PUBLIC_ROUTES or scope["method"] == "OPTIONS":
            return None
        if self._expected is not None:
            got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(got, self._expected):
                msg = "Missing API key: send 'Authorization: Bearer <key>'" if not got else "Incorrect API key provided"
                return APIError(401, msg, "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        if self._draining():
            return APIError(503, "the server is shutting down", "server_error", None, "shutting_down", {"Retry-After": "1", "Connection": "close"})
        return None


class RequestIdMiddleware:
    """`X-Request-Id`: the client's (checked) or a new one, echoed on the response and
    kept in the scope for the route (which uses it in the engine's request id)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        if given is not None:
            rid = given.decode("latin-1")
            if not _REQUEST_ID.match(rid):
                err = APIError(400, "X-Request-Id: must be 1-128 printable ASCII characters without spaces", param="X-Request-Id")
                await drain(receive)
                await err.response()(scope, receive, send)
                return
        else:
            rid = uuid.uuid4().hex
        scope[SCOPE_REQUEST_ID] = rid
        raw = rid.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", raw)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class JSONErrorCORSMiddleware(CORSMiddleware):
    """Starlette's CORS (preflight answers, headers on every response); a refused preflight is an OpenAI-shaped 400."""

    def preflight_response(self, request_headers: Any) -> Response:
        r = super().preflight_response(request_headers)
        if r.status_code < 400:
            return r
        message = r.body.decode() if isinstance(r.body, bytes) else "CORS preflight refused"
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-length", "content-type")}
        return APIError(r.status_code, message, "invalid_request_error", None, "cors_refused", headers).response()


def parse_origins(value: str | Iterable[str] | None) -> list[str]:
    """`--allowed-origins`: a JSON list (as vLLM's) or comma-separated origins."""
    if value is None:
        return []
    if not isinstance(value, str):
        return [str(v) for v in value]
    v = value.strip()
    if v.startswith("["):
        try:
            items = msgspec.json.decode(v.encode(), type=list[str])
        except msgspec.DecodeError as e:
            raise ValueError(f"allowed_origins: not a JSON list of strings: {e}") from None
        return items
    return [o.strip() for o in v.split(",") if o.strip()]


# ---------------------------------------------------------------- exception handlers


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's 404 / 405 (and any HTTPException) as OpenAI errors."""
    assert isinstance(exc, HTTPException)
    method, path = request.method, route_path(request.scope)
    if exc.status_code == 404:
        message = f"Invalid URL ({method} {path})"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"Method {method} not allowed on {path}" + (f" (allowed: {allowed})" if allowed else "")
    else:
        message = str(exc.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, message, "invalid_request_error", None, code, dict(exc.headers or {})).response()


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()
