"""The OpenAI-compatible server, driven by the real `openai` client over 127.0.0.1.

Two servers run in background threads for the whole module (uvicorn on uvloop):
`srv` on the plain in-process executor and `slow`, whose steps take a few ms more.
Where a test needs a request to still be running when something happens (a client
leaves, the server drains), a `StepGate` holds the engine's steps back until it has:
orders are made, not hoped for. After every test both engines must be idle with
their whole KV pool free.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import httpx
import openai
import pytest

from aiosched import AsyncEngine, SamplingParams
from aiosched.chat_template import render_chat
from aiosched.server import build_app
from aiosched.executors.base import register_executor
from aiosched.executors.inproc import InprocExecutor
from server_thread import ServerThread
from tiny_model import fake, write_tiny_model

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEP_DELAY_S = 0.004


class SlowInprocExecutor(InprocExecutor):
    """The in-process executor with a fixed extra delay on every step, and a gate:
    while `hold(runner_output)` is true, the step's result is kept back."""

    delay_s = STEP_DELAY_S
    hold: ClassVar[Callable[[Any], bool] | None] = None

    def submit(self, output):  # type: ignore[no-untyped-def]
        inner = super().submit(output)
        loop = self._loop
        assert loop is not None
        out = loop.create_future()

        def fire(f: asyncio.Future) -> None:
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(f.exception())  # type: ignore[arg-type]
            elif SlowInprocExecutor.hold is not None and SlowInprocExecutor.hold(f.result()):
                loop.call_later(0.001, fire, f)  # ask again soon
            else:
                out.set_result(f.result())

        inner.add_done_callback(lambda f: loop.call_later(self.delay_s, fire, f))
        return out


class SlowerInprocExecutor(SlowInprocExecutor):
    delay_s = 0.02


register_executor("test-slow", SlowInprocExecutor)
register_executor("test-slower", SlowerInprocExecutor)


class StepGate:
    """Holds back every step that carries a token of a tracked request while
    `rule(owner, tokens)` is true for it; `tokens`: how many the engine has sent that
    request's stream so far (tokens of a step lost to a preemption do not count).

    Requests are tracked by their user id (the server's `cmpl-` + X-Request-Id), which
    engine ids start with. The rule runs on the server's loop."""

    def __init__(self, owners: list[str], rule: Callable[[str, int], bool]) -> None:
        assert not any(a != b and b.startswith(a) for a in owners for b in owners), "no id may be a prefix of another"
        self.sent = dict.fromkeys(owners, 0)
        self.rule = rule

    def __call__(self, out: Any) -> bool:
        owners = {o for rid in out.req_ids for o in self.sent if rid.startswith(o)}
        return any(self.rule(o, self.sent[o]) for o in owners)

    # An engine observer (engine.add_observer): it sees every output the engine puts on a
    # stream, on the engine's loop, whichever path built it.
    def on_request(self, request_id: str, prompt_token_ids: Any, params: Any) -> None:
        pass

    def on_output(self, output: Any) -> None:
        if output.request_id in self.sent:
            self.sent[output.request_id] += sum(len(c.new_token_ids) for c in output.outputs)


@contextmanager
def gated(gate: StepGate, engine: AsyncEngine) -> Iterator[StepGate]:
    SlowInprocExecutor.hold = gate
    engine.add_observer(gate)
    try:
        yield gate
    finally:
        SlowInprocExecutor.hold = None
        engine._observers.remove(gate)


def inflight(s: ServerThread) -> set[str]:
    return s.app.state.aiosched.inflight


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Any]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _config(model: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {**model, "num_kv_blocks": 512, "block_size": 4, "max_num_seqs": 64, "max_num_batched_tokens": 256, **kw}


@pytest.fixture(scope="module")
def srv(model):
    with ServerThread(build_app(_config(model), api_key=KEY, served_model_name="tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def slow(model):
    # The fake runner (same tokenizer) with a step delay; a small pool, so the
    # 100-client test also goes through preemption.
    app = build_app(_config(fake(model), executor="test-slow", num_kv_blocks=96), api_key=KEY, served_model_name="tiny")
    with ServerThread(app) as s:
        yield s


def engine_of(s: ServerThread) -> AsyncEngine:
    return s.app.state.aiosched.engine


def wait_idle_and_check_pool(s: ServerThread, timeout: float = 10.0) -> None:
    async def check() -> None:
        eng = engine_of(s)
        deadline = time.monotonic() + timeout
        while (eng.scheduler.requests or eng._live) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sched = eng.scheduler
        sched.check_invariants()
        assert not sched.requests, f"requests left: {list(sched.requests)}"
        assert not eng._live
        assert sched.kv.num_free_blocks == sched.kv.num_blocks, f"KV blocks leaked: {sched.kv.num_blocks - sched.kv.num_free_blocks}"
        assert not s.app.state.aiosched.inflight

    s.call(check, timeout + 5)


@pytest.fixture(autouse=True)
def pools_full_after_each_test(request):
    yield
    for name in ("srv", "slow"):
        if name in request.fixturenames:
            wait_idle_and_check_pool(request.getfixturevalue(name))


def client(s: ServerThread, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=30, **kw)


def aclient(s: ServerThread, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=30, **kw)


def engine_greedy(s: ServerThread, prompt: str | list[int], max_tokens: int, **kw: Any):
    eng = engine_of(s)
    return s.call(lambda: eng.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)))


def chat_prompt_ids(s: ServerThread, messages: list[dict[str, str]]) -> list[int]:
    tok = engine_of(s).tokenizer
    text = render_chat(tok.chat_template, messages, add_generation_prompt=True, special_tokens=tok.special_tokens)
    return tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------ completions and chat


def test_completions_sync_client_equals_engine_generate(srv) -> None:
    c = client(srv)
    ref = engine_greedy(srv, "def fibonacci(n):", 12)
    r = c.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.model == "tiny"

    stream = c.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=12, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref.finish_reason
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)

    ids = ref.prompt_token_ids[:5]
    ref_ids = engine_greedy(srv, ids, 8)
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == ref_ids.text and r.usage.prompt_tokens == 5


def test_chat_sync_client_equals_engine_generate(srv) -> None:
    c = client(srv)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write fibonacci in Python."}]
    ref = engine_greedy(srv, chat_prompt_ids(srv, messages), 10)
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == len(ref.token_ids)

    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


async def test_async_client_streaming_and_not(srv) -> None:
    c = aclient(srv)
    ref = await asyncio.to_thread(engine_greedy, srv, "import asyncio", 9)
    r = await c.completions.create(model="tiny", prompt="import asyncio", max_tokens=9, temperature=0)
    assert r.choices[0].text == ref.text
    text = ""
    async for ch in await c.completions.create(model="tiny", prompt="import asyncio", max_tokens=9, temperature=0, stream=True):
        text += ch.choices[0].text
    assert text == ref.text

    messages = [{"role": "user", "content": "hello"}]
    ref = await asyncio.to_thread(engine_greedy, srv, chat_prompt_ids(srv, messages), 7)
    r = await c.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0)
    assert r.choices[0].message.content == ref.text
    content, usage = "", None
    async for ch in await c.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
        content += "".join(choice.delta.content or "" for choice in ch.choices)
        usage = ch.usage or usage
    assert content == ref.text and usage.completion_tokens == len(ref.token_ids)
    await c.close()


def test_n_samples_multi_prompt_echo_and_stop(srv) -> None:
    c = client(srv)
    r = c.completions.create(model="tiny", prompt=["one", "two"], n=2, max_tokens=5, temperature=1.0, seed=3)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2, 3]
    assert all(ch.finish_reason in ("stop", "length") for ch in r.choices)
    assert 0 < r.usage.completion_tokens <= 4 * 5
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4, seed=1, stream=True))
    assert {choice.index for ch in chunks for choice in ch.choices} == {0, 1}
    assert sorted(choice.index for ch in chunks for choice in ch.choices if choice.finish_reason) == [0, 1]

    chunks = list(c.completions.create(model="tiny", prompt=["one", "two"], n=2, max_tokens=3, seed=2, stream=True,
                                       stream_options={"include_usage": True}))
    assert sorted(choice.index for ch in chunks for choice in ch.choices if choice.finish_reason) == [0, 1, 2, 3]
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens

    ref = engine_greedy(srv, "hello", 6)
    r = c.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == "hello" + ref.text
    chunks = list(c.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0, echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "hello" + ref.text

    ref = engine_greedy(srv, "The quick", 16)
    text = ref.text
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip()), None)
    if stop is not None:
        r = c.completions.create(model="tiny", prompt="The quick", max_tokens=16, temperature=0, stop=stop)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].text == text[: text.index(stop)]


def test_models_health_metrics(srv) -> None:
    c = client(srv)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    c.completions.create(model="tiny", prompt="metrics please", max_tokens=4, temperature=0)
    text = httpx.get(srv.url + "/metrics").text
    for name in ("aiosched_num_requests_running", "aiosched_num_requests_waiting", "aiosched_kv_cache_usage_ratio",
                 "aiosched_prefix_cache_hit_rate", "aiosched_time_to_first_token_seconds_bucket",
                 "aiosched_time_per_output_token_seconds_bucket", "aiosched_e2e_request_latency_seconds_bucket",
                 "aiosched_generation_tokens_total", "aiosched_num_preemptions_total", 'aiosched_requests_total{finish_reason="length",model_name="tiny"}'):
        assert name in text, name
    count = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("aiosched_e2e_request_latency_seconds_count"))
    assert count >= 1


# ------------------------------------------------------------------ auth and errors


def test_api_key_required_on_v1_routes(srv) -> None:
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, srv.url + path, headers=headers, json={"model": "tiny", "prompt": "x"})
            assert r.status_code == 401, (key, path)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key" and "message" in err
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).completions.create(model="tiny", prompt="x", max_tokens=1)
    assert httpx.get(srv.url + "/health").status_code == 200  # not a /v1 route


BAD_COMPLETIONS = [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -7}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"n": 0}, "n"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"min_tokens": 50, "max_tokens": 5}, "min_tokens"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "word " * 2000}, "prompt"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"frobnicate": True}, "frobnicate"),
    ({"model": None, "prompt": None}, "prompt"),
]


@pytest.mark.parametrize("patch, field", BAD_COMPLETIONS)
def test_bad_completion_requests_are_400_naming_the_field(srv, patch, field) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, **patch}
    r = httpx.post(srv.url + "/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field, err
    assert err["type"] == "invalid_request_error" and err["code"] is None and err["message"]


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "word " * 2000}]}, "messages"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"tools": []}, "tools"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
]


@pytest.mark.parametrize("patch, field", BAD_CHATS)
def test_bad_chat_requests_are_400_naming_the_field(srv, patch, field) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **patch}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.json()


def test_other_client_errors(srv) -> None:
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    r = httpx.post(srv.url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError) as ei:
        client(srv).completions.create(model="tiny", prompt="x", max_tokens=1, temperature=-2)
    assert ei.value.body["param"] == "temperature"
    # logprobs: served when the engine supports them, otherwise a 400 naming the field
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "logprobs": 2}, headers=AUTH)
    assert r.status_code == 200 or (r.status_code == 400 and r.json()["error"]["param"] == "logprobs")
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                          "logprobs": True, "top_logprobs": 2}, headers=AUTH)
    assert r.status_code == 200 or (r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs")


async def test_overloaded_is_503_with_retry_after(make_engine, model) -> None:
    async with make_engine(**_config(fake(model), max_num_seqs=1, max_waiting_requests=2)) as eng:
        app = build_app(eng)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}) for _ in range(12)])
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in rs if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "overloaded"


async def test_dead_engine_is_a_clear_500(make_engine, model) -> None:
    async with make_engine(**_config(fake(model))) as eng:
        app = build_app(eng)

        def boom(so):  # the model runner crashes
            raise RuntimeError("GPU fell off the bus")

        eng._executor.runner.execute = boom
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
            second = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
            stream = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True})
            health = await c.get("/health")
    for r in (first, second, stream):
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead", r.text
        assert "dead" in r.json()["error"]["message"]
    assert health.status_code == 503


# ------------------------------------------------------------------ disconnects


def metric_values(s: ServerThread) -> dict[str, float]:
    text = httpx.get(s.url + "/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


def _running_requests(s: ServerThread) -> int:
    eng = engine_of(s)

    async def n() -> int:
        return len(eng.scheduler.requests)

    return s.call(n)


def until_it_leaves(s: ServerThread, tokens: int) -> Callable[[str, int], bool]:
    """Hold a tracked request once it has `tokens` tokens, for as long as the server runs it."""
    return lambda owner, n: n >= tokens and owner in inflight(s)


def test_stream_disconnect_aborts_the_request(slow) -> None:
    c = client(slow)
    with gated(StepGate(["cmpl-disc-1"], until_it_leaves(slow, 5)), engine_of(slow)):
        stream = c.completions.create(model="tiny", prompt="long one", max_tokens=300, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "disc-1"})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        assert _running_requests(slow) == 1  # held at 5 of 300 tokens until it is aborted
        stream.close()
        wait_idle_and_check_pool(slow, timeout=10)
    wait_idle_and_check_pool(slow, timeout=5)
    assert 'aiosched_requests_total{finish_reason="abort",model_name="tiny"}' in httpx.get(slow.url + "/metrics").text


def test_non_streaming_disconnect_aborts_the_request(slow) -> None:
    with gated(StepGate(["cmpl-disc-2"], until_it_leaves(slow, 5)), engine_of(slow)):  # it cannot finish before the client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(slow.url + "/v1/completions", headers={**AUTH, "X-Request-Id": "disc-2"}, timeout=0.3,
                       json={"model": "tiny", "prompt": "long", "max_tokens": 300, "ignore_eos": True})
        wait_idle_and_check_pool(slow, timeout=10)


async def test_100_streaming_clients_with_random_disconnects(slow) -> None:
    """35 of 100 concurrent streaming clients leave after k tokens (1 <= k <= 6) of 24.

    A leaver's request is held at k tokens until the server has seen the client go, so
    every leaver aborts its request (never a race with the request finishing)."""
    rng = random.Random(7)
    n_clients, max_tokens = 100, 24
    prompts = [f"client {i}: def f{i}(x):" for i in range(n_clients)]
    leave_after = {i: rng.randrange(1, 7) for i in rng.sample(range(n_clients), 35)}
    owner = {f"cmpl-leaver-{i:03d}": k for i, k in leave_after.items()}
    c = aclient(slow)
    before = await asyncio.to_thread(metric_values, slow)

    async def one(i: int) -> tuple[str, str | None, int | None] | None:
        """(text, finish_reason, usage tokens), or None if the client left mid-stream."""
        headers = {"X-Request-Id": f"leaver-{i:03d}" if i in leave_after else f"stayer-{i:03d}"}
        stream = await c.completions.create(model="tiny", prompt=prompts[i], max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
                                            stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                                            extra_headers=headers)
        text, reason, ntok = "", None, None
        async for ch in stream:
            for choice in ch.choices:
                text += choice.text
                reason = choice.finish_reason or reason
            if ch.usage is not None:
                ntok = ch.usage.completion_tokens
            if i in leave_after and ntok is not None and ntok >= leave_after[i]:
                assert reason is None
                await stream.close()
                return None
        return text, reason, ntok

    gate = StepGate(list(owner), lambda o, n: n >= owner[o] and o in inflight(slow))
    with gated(gate, engine_of(slow)):
        results = await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(n_clients)]), 120)
        await c.close()
        await asyncio.to_thread(wait_idle_and_check_pool, slow, 20)
    after = await asyncio.to_thread(metric_values, slow)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    completed = [i for i in range(n_clients) if results[i] is not None]
    assert sorted(set(range(n_clients)) - set(completed)) == sorted(leave_after)
    assert delta['aiosched_requests_total{finish_reason="abort",model_name="tiny"}'] == len(leave_after)
    assert delta['aiosched_requests_total{finish_reason="length",model_name="tiny"}'] == n_clients - len(leave_after)
    assert all(gate.sent[o] < max_tokens for o in owner)
    assert delta['aiosched_num_preemptions_total{model_name="tiny"}'] > 0, "the small KV pool must force preemption"
    for i in completed:
        text, reason, ntok = results[i]
        assert reason == "length" and ntok == max_tokens, (i, results[i])
    # every client that stayed got exactly what the engine generates for its prompt
    refs = await asyncio.to_thread(slow.call, lambda: asyncio.gather(
        *[engine_of(slow).generate(prompts[i], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)) for i in completed]))
    for i, ref in zip(completed, refs):
        assert results[i][0] == ref.text, i


# ------------------------------------------------------------------ shutdown


def test_graceful_shutdown_finishes_in_flight_then_aborts_the_rest(model) -> None:
    """SIGTERM with three requests in flight: `short` finishes within the shutdown timeout,
    the two long ones (streamed and whole) are aborted at the timeout, with a clear error.

    The gate makes the order: before SIGTERM every request is held (`short` one token
    before its end, the long ones at 5 tokens); after it, `short` finishes at once and the
    long ones are held until the drain aborts them."""
    app = build_app(_config(fake(model), executor="test-slow"), api_key=KEY, served_model_name="tiny")
    state = app.state.aiosched
    eng = state.engine
    results: dict[str, Any] = {}
    short_tokens = 3

    def rule(owner: str, n: int) -> bool:
        if owner == "cmpl-short":  # one token before its end until the drain begins
            return n >= short_tokens - 1 and not state.draining
        if owner not in state.inflight:
            return False  # aborted: let the step go
        return n >= 5 and not state.draining or state.draining and gate.sent["cmpl-short"] >= short_tokens

    gate = StepGate(["cmpl-short", "cmpl-long-s", "cmpl-long-w"], rule)
    with gated(gate, eng), ServerThread(app, shutdown_timeout=1.0) as s:
        c = client(s)

        def consume(name: str, max_tokens: int) -> None:
            chunks = []
            try:
                for ch in c.completions.create(model="tiny", prompt=name, max_tokens=max_tokens, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": name}):
                    chunks.append(ch)
                results[name] = chunks
            except Exception as e:  # the cut-off stream
                results[name] = e

        def consume_whole(name: str, max_tokens: int) -> None:
            try:
                results[name] = c.completions.create(model="tiny", prompt=name, max_tokens=max_tokens, temperature=0,
                                                     extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": name})
            except Exception as e:
                results[name] = e

        threads = [threading.Thread(target=consume, args=("short", short_tokens)),
                   threading.Thread(target=consume, args=("long-s", 480)),
                   threading.Thread(target=consume_whole, args=("long-w", 480))]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 30
        while len(eng._live) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(eng._live) == 3
        s.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):
            client(s).completions.create(model="tiny", prompt="late", max_tokens=2)
        for th in threads:
            th.join(30)
        assert not any(th.is_alive() for th in threads)
    assert not isinstance(results["short"], Exception), results["short"]
    assert results["short"][-1].choices[0].finish_reason == "length" and len(results["short"]) == short_tokens
    long_res = results["long-s"]  # cut at the timeout: the client is told why
    assert isinstance(long_res, openai.APIError) and "shutting down" in long_res.message, long_res
    whole = results["long-w"]
    assert isinstance(whole, openai.APIStatusError) and whole.status_code == 503 and whole.body["code"] == "shutting_down", whole
    assert gate.sent["cmpl-long-s"] < 480 and gate.sent["cmpl-long-w"] < 480
    assert not eng._running
    assert not eng.scheduler.requests and eng.scheduler.kv.num_free_blocks == eng.scheduler.kv.num_blocks


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def test_cli_serve_exits_cleanly_on_sigterm(model, tmp_path) -> None:
    port = _free_port()
    args = [sys.executable, "-m", "aiosched", "serve", "--model", model["model"], "--runner", "fake", "--port", str(port),
            "--num-kv-blocks", "128", "--shutdown-timeout", "5", "--no-access-log", "--log-level", "warning"]
    env = {**os.environ, "AIOSCHED_API_KEY": KEY, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode() if proc.poll() is not None else "timeout"
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from the environment
        with httpx.stream("POST", url + "/v1/completions", headers=AUTH,
                          json={"model": pathlib.Path(model["model"]).name, "prompt": "bye", "max_tokens": 50, "stream": True}) as r:
            lines = iter(r.iter_lines())
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
        proc.wait(30)
        assert proc.returncode in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ logprobs


async def test_logprobs_in_completions_and_chat(make_engine, model) -> None:
    async with make_engine(**_config(fake(model))) as eng:
        if "logprobs" not in eng.info.features:
            pytest.skip("this runner has no logprobs")
        ref = await eng.generate("def f", SamplingParams(max_tokens=5, temperature=0, logprobs=2))
        app = build_app(eng)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = (await c.post("/v1/completions", json={"prompt": "def f", "max_tokens": 5, "temperature": 0, "logprobs": 2})).json()
            lp = r["choices"][0]["logprobs"]
            assert lp["token_logprobs"] == [t.logprob for t in ref.logprobs]
            assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
            assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
            assert lp["text_offset"] == sorted(lp["text_offset"])

            body = {"prompt": "def f", "max_tokens": 5, "temperature": 0, "logprobs": 2, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as s:
                events = [json.loads(line[6:]) for line in [ln async for ln in s.aiter_lines()] if line.startswith("data: {")]
            streamed = [v for e in events for ch in e["choices"] if ch["logprobs"] for v in ch["logprobs"]["token_logprobs"]]
            assert streamed == lp["token_logprobs"]

            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3}
            r = (await c.post("/v1/chat/completions", json=chat)).json()
            content = r["choices"][0]["logprobs"]["content"]
            assert len(content) == 4 and all(len(t["top_logprobs"]) == 3 and t["bytes"] == list(t["token"].encode()) for t in content)
            r = (await c.post("/v1/chat/completions", json={**chat, "top_logprobs": None})).json()
            assert all(t["top_logprobs"] == [] for t in r["choices"][0]["logprobs"]["content"])
            r = (await c.post("/v1/chat/completions", json={**chat, "logprobs": None, "top_logprobs": None})).json()
            assert r["choices"][0]["logprobs"] is None


async def test_best_of_and_response_format(make_engine, model) -> None:
    async with make_engine(**_config(fake(model))) as eng:
        app = build_app(eng)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "n": 1, "best_of": 3, "seed": 1})
            assert r.status_code == 200 and len(r.json()["choices"]) == 1 or r.json()["error"]["param"] == "best_of"
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "n": 3, "best_of": 2})
            assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                          "response_format": {"type": "json_object"}})
            assert r.status_code == 200 or r.json()["error"]["param"] == "response_format", r.text
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                          "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
            assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


async def test_engine_not_started_is_503(make_engine, model) -> None:
    app = build_app(make_engine(**_config(fake(model))))  # no lifespan run: the engine never starts
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            r = await c.post(path, json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_running" and r.headers["retry-after"]
        assert (await c.get("/health")).status_code == 503


def test_sse_events_stay_on_one_line_for_line_splitting_clients() -> None:
    from aiosched.openai_protocol import DeltaMessage
    from aiosched.server import _sse

    text = "a\u2028b\x85c\u2029d\u20ac\n\x1c"
    event = _sse(DeltaMessage(content=text))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    line = event[6:-2].decode()
    assert len(line.splitlines()) == 1  # what httpx's iter_lines does
    assert json.loads(line)["content"] == text
