"""The server's HTTP envelope: the API key and drain wherever the app is mounted, OpenAI-shaped
errors for everything (404, 405, 413, refused preflight), X-Request-Id, CORS, the models,
tokenize and detokenize routes, and `serve` failing at once on a port in use."""
from __future__ import annotations

import pathlib

import argparse
import socket
from typing import Any

import fastapi
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from aiosched.server import add_arguments, build_app
from server_thread import ServerThread
from tiny_model import fake, write_tiny_model

KEY = "mount-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Any]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _config(model: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {**fake(model), "num_kv_blocks": 128, "block_size": 4, "max_num_seqs": 16, **kw}


@pytest.fixture(scope="module")
def srv(model):
    app = build_app(_config(model), api_key=KEY, served_model_name="tiny", allowed_origins='["http://app.example"]')
    with ServerThread(app) as s:
        yield s


def client(s: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


# ------------------------------------------------------------------ mounted under a prefix


def fastapi_parent(app: Starlette) -> fastapi.FastAPI:
    parent = fastapi.FastAPI()
    parent.mount("/openai", app)

    @parent.get("/mine")
    async def mine() -> dict[str, str]:
        return {"own": "route"}

    return parent


def starlette_parent(app: Starlette) -> Starlette:
    async def mine(request: Any) -> PlainTextResponse:
        return PlainTextResponse("own route")

    return Starlette(routes=[Route("/mine", mine), Mount("/api/llm", app)])


PARENTS = [(fastapi_parent, "/openai"), (starlette_parent, "/api/llm")]


@pytest.mark.parametrize("parent, prefix", PARENTS, ids=["fastapi", "starlette"])
@pytest.mark.parametrize("key", [KEY, None], ids=["with-key", "without-key"])
async def test_api_key_and_drain_hold_under_a_mount(make_engine, model, parent, prefix, key) -> None:
    async with make_engine(**_config(model)) as eng:
        app = build_app(eng, api_key=key, served_model_name="tiny")
        root = parent(app)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=root), base_url="http://t") as c:
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
            routes = [("GET", "/v1/models", None), ("GET", "/v1/models/tiny", None), ("POST", "/v1/completions", body),
                      ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                      ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1, 2]})]
            for method, path, js in routes:
                bare = await c.request(method, prefix + path, json=js)
                authed = await c.request(method, prefix + path, json=js, headers=AUTH)
                if key is None:
                    assert bare.status_code == 200, (path, bare.text)
                else:
                    err = assert_openai_error(bare, 401)
                    assert err["code"] == "invalid_api_key", path
                    wrong = await c.request(method, prefix + path, json=js, headers={"Authorization": "Bearer nope"})
                    assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
                    assert authed.status_code == 200, (path, authed.text)
            assert (await c.get(prefix + "/health")).status_code == 200  # public, as at the root
            assert (await c.get(prefix + "/metrics")).status_code == 200
            assert (await c.get("/mine")).status_code == 200  # the parent's own routes are not ours to gate
            unknown = await c.get(prefix + "/v1/nothing-here", headers=AUTH)
            assert assert_openai_error(unknown, 404)["code"] == "not_found"

            app.state.aiosched.draining = True  # what SIGTERM sets under `aiosched serve`
            for method, path, js in routes:
                r = await c.request(method, prefix + path, json=js, headers=AUTH)
                err = assert_openai_error(r, 503)
                assert err["code"] == "shutting_down" and r.headers["retry-after"] == "1", path
            assert (await c.get(prefix + "/health")).json() == {"status": "draining"}


async def test_key_is_required_at_the_root_and_for_every_route(make_engine, model) -> None:
    async with make_engine(**_config(model)) as eng:
        app = build_app(eng, api_key=KEY)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            for path in ("/v1/models", "/v1/models/x", "/v1/unknown", "/tokenize", "/anything"):
                assert_openai_error(await c.get(path), 401)
            assert (await c.get("/health")).status_code == 200


# ------------------------------------------------------------------ OpenAI-shaped errors


def test_404_and_405_are_openai_errors(srv) -> None:
    err = assert_openai_error(httpx.get(srv.url + "/v1/embeddings", headers=AUTH), 404)
    assert err["type"] == "invalid_request_error" and "/v1/embeddings" in err["message"]
    r = httpx.get(srv.url + "/v1/completions", headers=AUTH)
    err = assert_openai_error(r, 405)
    assert err["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    with pytest.raises(openai.NotFoundError) as ei:
        client(srv).models.retrieve("gpt-9")
    assert ei.value.body["code"] == "model_not_found"
    assert client(srv).models.retrieve("tiny").id == "tiny"


async def test_the_model_path_names_the_model_as_under_vllm(make_engine, model) -> None:
    """Without --served-model-name the model is listed by its folder's name, and requests
    naming it by the path it was loaded from (what vLLM's server lists) are served too;
    with a served name, only the names given."""
    async with make_engine(**_config(model)) as eng:
        app = build_app(eng)
        path = eng.config.model
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            listed = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            assert listed == [pathlib.Path(path).name]
            for name in (listed[0], path):
                r = await c.post("/v1/completions", json={"model": name, "prompt": [5, 6], "max_tokens": 2})
                assert r.status_code == 200, (name, r.text)
            assert_openai_error(await c.post("/v1/completions", json={"model": "other", "prompt": [5], "max_tokens": 1}), 404)
        named = build_app(eng, served_model_name=pathlib.Path(path).name)  # a name given: exactly the names given
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=named), base_url="http://t") as c:
            assert_openai_error(await c.post("/v1/completions", json={"model": path, "prompt": [5], "max_tokens": 1}), 404)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_a_readable_413(srv, chunked) -> None:
    big = b'{"prompt": "' + b"x" * (33 * 1024 * 1024) + b'"}'
    content: Any = big
    if chunked:
        content = (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20))  # no Content-Length: Transfer-Encoding chunked
    r = httpx.post(srv.url + "/v1/completions", content=content, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    err = assert_openai_error(r, 413)
    assert err["code"] == "request_too_large" and "too large" in err["message"]
    assert client(srv).completions.create(model="tiny", prompt="still fine", max_tokens=2).choices  # the server serves on


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_413_goes_out_only_after_the_body_is_read(make_engine, model, declared) -> None:
    """Answering while the client still sends lets the connection close under it (keep-alive
    timeout, Connection: close): the client sees a reset instead of the error."""
    size, piece = 40 * 1024 * 1024, 1 << 20
    events: list[str] = []
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        sent += piece
        events.append("body" if sent < size else "last body")
        return {"type": "http.request", "body": b"x" * piece, "more_body": sent < size}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            events.append(f"response {message['status']}")

    async with make_engine(**_config(model)) as eng:
        app = build_app(eng)
        headers = [(b"content-type", b"application/json")] + ([(b"content-length", str(size).encode())] if declared else [])
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)
    assert events[-2:] == ["last body", "response 413"], events[-3:]


# ------------------------------------------------------------------ X-Request-Id


def test_x_request_id_is_honoured_and_echoed(srv) -> None:
    c = client(srv)
    raw = c.completions.with_raw_response.create(model="tiny", prompt="hi", max_tokens=2, extra_headers={"X-Request-Id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"
    assert raw.parse().id == "cmpl-trace-42"
    with c.chat.completions.with_streaming_response.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                                           stream=True, extra_headers={"X-Request-Id": "trace-43"}) as resp:
        assert resp.headers["x-request-id"] == "trace-43"
        assert all(ch.id == "chatcmpl-trace-43" for ch in resp.parse())
    r = httpx.get(srv.url + "/v1/models", headers=AUTH)
    assert len(r.headers["x-request-id"]) == 32  # one of ours when the client sent none
    assert httpx.get(srv.url + "/v1/models", headers={**AUTH, "X-Request-Id": "x" * 200}).status_code == 400
    assert httpx.get(srv.url + "/v1/models").headers["x-request-id"]  # on errors too


# ------------------------------------------------------------------ CORS


def test_browser_preflight_then_request(srv) -> None:
    origin = "http://app.example"
    pre = httpx.options(srv.url + "/v1/chat/completions", headers={  # what a browser sends, without credentials
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == origin
    assert "POST" in pre.headers["access-control-allow-methods"]
    allowed = pre.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "x-stainless-os" in allowed
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={**AUTH, "Origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    denied = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}, headers={"Origin": origin})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin  # the page can read why
    bad = httpx.options(srv.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert assert_openai_error(bad, 400)["code"] == "cors_refused"
    assert "access-control-allow-origin" not in bad.headers


async def test_no_cors_unless_origins_are_allowed(make_engine, model) -> None:
    async with make_engine(**_config(model)) as eng:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(eng)), base_url="http://t") as c:
            pre = await c.options("/v1/completions", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in pre.headers
            assert_openai_error(pre, 405)
    with pytest.raises(ValueError, match="allowed_origins"):
        build_app(_config(model), allowed_origins="[not json")


# ------------------------------------------------------------------ tokenize / detokenize


def test_tokenize_and_detokenize_like_vllm(srv) -> None:
    tok = srv.app.state.aiosched.engine.tokenizer
    r = httpx.post(srv.url + "/tokenize", json={"model": "tiny", "prompt": "def fibonacci(n):"}, headers=AUTH).json()
    assert r["tokens"] == tok.encode("def fibonacci(n):") and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    assert r["token_strs"] is None
    r2 = httpx.post(srv.url + "/tokenize", json={"prompt": "def f", "add_special_tokens": False, "return_token_strs": True}, headers=AUTH).json()
    assert r2["tokens"] == tok.encode("def f", add_special_tokens=False) and len(r2["token_strs"]) == r2["count"]
    messages = [{"role": "user", "content": "hello"}]
    chat = httpx.post(srv.url + "/tokenize", json={"messages": messages}, headers=AUTH).json()
    usage = client(srv).chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens  # the same prompt the chat route runs
    back = httpx.post(srv.url + "/detokenize", json={"tokens": r["tokens"]}, headers=AUTH).json()
    assert back == {"prompt": tok.decode(r["tokens"], skip_special_tokens=False)}
    chat_back = httpx.post(srv.url + "/detokenize", json={"tokens": chat["tokens"]}, headers=AUTH).json()["prompt"]
    assert tok.encode(chat_back, add_special_tokens=False) == chat["tokens"]  # special tokens kept: the text round-trips
    err = assert_openai_error(httpx.post(srv.url + "/detokenize", json={"tokens": [10**9]}, headers=AUTH), 400)
    assert err["param"] == "tokens"
    assert assert_openai_error(httpx.post(srv.url + "/tokenize", json={"prompt": 3}, headers=AUTH), 400)["param"] == "prompt"


# ------------------------------------------------------------------ serve: the port first


def test_serve_on_a_port_in_use_fails_before_loading_the_model(model, monkeypatch, capsys) -> None:
    from aiosched import server
    from aiosched.engine import AsyncEngine

    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("the engine was created although the port is taken")

    monkeypatch.setattr(AsyncEngine, "from_config", classmethod(no_load))
    monkeypatch.setattr(AsyncEngine, "start", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--model", model["model"], "--runner", "fake", "--port", str(port)])
        assert server.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "in use" in err, err
