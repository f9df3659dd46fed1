"""Chat as OpenAI clients and agent frameworks use it, through the real `openai` client:
tools and tool_choice (calls enforced by the grammar, or parsed from the output),
streamed tool-call deltas, reasoning_content, lenient and strict OpenAI fields, chat
templates from every source, one stream chunk per token (the first with the role),
and `AsyncEngine.chat`.

The model is the fake runner on the tiny tokenizer: its tokens are a hash, so the only
outputs that are tool calls are those the grammar forces, and every expectation is
computed from the engine's own output for the same prompt."""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from aiosched import AsyncEngine, SamplingParams
from aiosched.chat_template import apply_chat_template, load_chat_template
from aiosched.reasoning_parser import ThinkSplitter
from aiosched.server import build_app
from aiosched.tokenizer import Tokenizer
from server_thread import ServerThread
from tiny_model import fake, write_tiny_model

KEY = "chat-key"

TOOL_TEMPLATE = """\
{%- if tools %}<|system|>
Tools: {{ tools | tojson }}{{ eos_token }}
{% endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}<|user|>
<tool_response id={{ m.tool_call_id }}>{{ m.content }}</tool_response>{{ eos_token }}
{% elif m.tool_calls %}<|assistant|>
{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call> city={{ c.function.arguments.city }}{% endfor %}{{ eos_token }}
{% else %}<|{{ m.role }}|>
{{ m.content }}{{ eos_token }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Paris", "Oslo", "Rome"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"top": {"type": "boolean"}}, "required": ["top"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Any]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _config(model: dict[str, Any]) -> dict[str, Any]:
    return {**fake(model), "num_kv_blocks": 256, "block_size": 4, "max_num_seqs": 16}


@pytest.fixture(scope="module")
def template_file(tmp_path_factory) -> pathlib.Path:
    p = tmp_path_factory.mktemp("tmpl") / "tools.jinja"
    p.write_text(TOOL_TEMPLATE)
    return p


@pytest.fixture(scope="module")
def srv(model, template_file):
    """Tools template from --chat-template, llama3_json parser for tool_choice=auto."""
    app = build_app(_config(model), api_key=KEY, served_model_name="tiny", chat_template=template_file, tool_call_parser="llama3_json")
    with ServerThread(app) as s:
        yield s


def client(s: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def engine_of(s: ServerThread) -> AsyncEngine:
    return s.app.state.aiosched.engine


def prompt_text(s: ServerThread, messages: list[dict[str, Any]], **kw: Any) -> str:
    r = httpx.post(s.url + "/tokenize", json={"messages": messages, **kw}, headers={"Authorization": f"Bearer {KEY}"}).json()
    return httpx.post(s.url + "/detokenize", json={"tokens": r["tokens"]}, headers={"Authorization": f"Bearer {KEY}"}).json()["prompt"]


def collect_stream(chunks: list[Any]) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """(content, {index: {id, name, arguments}}, finish_reason) from chat chunks, checking OpenAI's delta shape."""
    content, calls, reason = "", {}, None
    for ch in chunks:
        for choice in ch.choices:
            d = choice.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                if tc.index not in calls:  # a call's first delta: id, type and name
                    assert tc.id and tc.id.startswith("call_") and tc.type == "function" and tc.function.name, tc
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and tc.function.name is None, tc
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, calls, reason


# ------------------------------------------------------------------ tools


def test_tool_choice_required_is_a_valid_call_streamed_and_not(srv) -> None:
    c = client(srv)
    kw = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300)
    r = c.chat.completions.create(**kw)
    msg, choice = r.choices[0].message, r.choices[0]
    assert choice.finish_reason == "tool_calls" and msg.content is None and msg.tool_calls
    for call in msg.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    content, calls, reason = collect_stream(list(c.chat.completions.create(**kw, stream=True)))
    assert content == "" and reason == "tool_calls"
    assert [(v["name"], v["arguments"]) for _, v in sorted(calls.items())] == [(t.function.name, t.function.arguments) for t in msg.tool_calls]

    one = c.chat.completions.create(**kw, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def test_named_tool_choice_calls_that_function(srv) -> None:
    c = client(srv)
    kw = dict(model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=200,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = c.chat.completions.create(**kw)
    call, = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "stop"  # as OpenAI: a forced call stops
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    _, calls, reason = collect_stream(chunks)
    assert reason == "stop" and [(v["name"], v["arguments"]) for v in calls.values()] == [("get_weather", call.function.arguments)]
    # the arguments arrive in pieces as they are generated, one chunk per token
    pieces = [tc.function.arguments for ch in chunks for choice in ch.choices for tc in choice.delta.tool_calls or [] if tc.function.arguments]
    assert len(pieces) > 1 and len([ch for ch in chunks if ch.choices]) == chunks[-1].usage.completion_tokens


def test_auto_tool_choice_parses_calls_from_the_output(srv) -> None:
    """The grammar makes this output a Llama 3 JSON call; the llama3_json parser (the server's
    --tool-call-parser) finds it, as it would in a model's free output."""
    call_schema = {"type": "object", "properties": {"name": {"const": "get_weather"}, "parameters": SCHEMAS["get_weather"]},
                   "required": ["name", "parameters"], "additionalProperties": False}
    kw = dict(model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=200,
              response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": call_schema}})
    c = client(srv)
    r = c.chat.completions.create(**kw)  # tool_choice defaults to auto with tools
    call, = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])
    _, calls, reason = collect_stream(list(c.chat.completions.create(**kw, stream=True)))
    assert reason == "tool_calls" and [(v["name"], v["arguments"]) for v in calls.values()] == [("get_weather", call.function.arguments)]
    # the same JSON with a name that is no tool is an answer, not a call
    plain = c.chat.completions.create(**{**kw, "tools": [SEARCH]})
    assert plain.choices[0].message.tool_calls is None and json.loads(plain.choices[0].message.content)["name"] == "get_weather"


def test_tools_and_tool_messages_reach_the_template(srv) -> None:
    history = [*USER,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = prompt_text(srv, history, tools=TOOLS)
    assert '"name": "get_weather"' in text and '"description": "Weather for a city"' in text  # tools rendered
    assert "city=Oslo" in text  # the arguments string became an object the template indexes into
    assert "<tool_response id=call_1>sunny</tool_response>" in text
    r = client(srv).chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens == len(engine_of(srv).tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("patch, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [WEATHER["function"]]}, "functions"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
])
def test_bad_tool_requests_are_400_naming_the_field(srv, patch, param) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client(srv).chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body=patch)
    assert ei.value.body["param"] == param, ei.value.body


async def test_auto_needs_a_tool_call_parser(make_engine, model) -> None:
    async with make_engine(**_config(model)) as eng:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(eng)), base_url="http://t") as c:
            r = await c.post("/v1/chat/completions", json={"messages": USER, "tools": TOOLS, "max_tokens": 2})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "tool_choice" and "--tool-call-parser" in err["message"]
            r = await c.post("/v1/chat/completions", json={"messages": USER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 100})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"]  # forced calls need no parser
    with pytest.raises(ValueError, match="tool_call_parser"):
        build_app(_config(model), tool_call_parser="mistral")


# ------------------------------------------------------------------ OpenAI fields


def test_known_openai_fields_are_accepted_unknown_ones_are_400(srv, caplog) -> None:
    c = client(srv)
    fields = dict(store=True, metadata={"team": "a"}, service_tier="auto", reasoning_effort="low", modalities=["text"], user="u-1",
                  prediction={"type": "content", "content": "x"}, prompt_cache_key="k", safety_identifier="s")
    with caplog.at_level(logging.DEBUG, logger="aiosched.server"):
        for _ in range(2):
            r = c.chat.completions.create(model="tiny", messages=USER, max_tokens=2, **fields)
            assert r.choices[0].message.content is not None
    logged = [rec.getMessage() for rec in caplog.records if "accepted and ignored" in rec.getMessage()]
    assert sorted(logged) == sorted(f"request field {name!r} is accepted and ignored (logged once)" for name in fields)
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={"frobnicate": 1})
    assert ei.value.body["param"] == "frobnicate" and "Unrecognized request argument" in ei.value.body["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=2, store="yes")  # known, but the wrong type
    assert ei.value.body["param"] == "store"


async def test_strict_mode_refuses_ignored_fields(make_engine, model) -> None:
    async with make_engine(**_config(model)) as eng:
        app = build_app(eng, strict_request_fields=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "store": False})
            assert r.status_code == 400 and r.json()["error"]["param"] == "store"
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "user": "u"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "user"
            r = await c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
            assert r.status_code == 200


# ------------------------------------------------------------------ streaming shape


def test_one_chunk_per_token_the_first_with_the_role(srv) -> None:
    """Also for tokens whose text is still empty (half a UTF-8 character), and per choice with n > 1."""
    c = client(srv)
    eng = engine_of(srv)
    messages = [{"role": "user", "content": "prompt 3"}]
    ids = apply_chat_template(eng.tokenizer, messages, chat_template=srv.app.state.aiosched.chat_template, tokenize=True)

    async def engine_outputs() -> list[Any]:
        return [o async for o in eng.generate(ids, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))]

    ref = srv.call(engine_outputs)
    assert any(not o.new_text for o in ref), "the reference must have tokens with no text yet"
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=64, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert len(chunks) == 64
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ref[0].new_text
    assert [ch.choices[0].delta.content for ch in chunks] == [o.new_text for o in ref]
    assert all(ch.choices[0].delta.role is None for ch in chunks[1:])

    comp = list(c.completions.create(model="tiny", prompt=ids, max_tokens=64, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert [ch.choices[0].text for ch in comp] == [o.new_text for o in ref]

    many = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=16, n=3, seed=5, stream=True,
                                          extra_body={"ignore_eos": True}))
    for k in range(3):
        mine = [ch.choices[0] for ch in many if ch.choices and ch.choices[0].index == k]
        assert len(mine) == 16 and mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"


# ------------------------------------------------------------------ reasoning


async def test_reasoning_content_split_out(make_engine, model) -> None:
    template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}")  # the template opens the think block
    async with make_engine(**_config(model)) as eng:
        app = build_app(eng, chat_template=template, reasoning_parser="qwen3")
        prompt = apply_chat_template(eng.tokenizer, USER, chat_template=template)
        ref = await eng.generate(eng.tokenizer.encode(prompt, add_special_tokens=False), SamplingParams(max_tokens=20, temperature=0))
        splitter = ThinkSplitter(prompt)
        a, b = splitter.feed(ref.text), splitter.finish()
        reasoning, content = a[0] + b[0], a[1] + b[1]
        assert reasoning  # no `</think>` in 20 random tokens: all of it is reasoning
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            c = openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http, max_retries=0)
            r = await c.chat.completions.create(model=pathlib.Path(model["model"]).name, messages=USER, max_tokens=20, temperature=0)
            msg = r.choices[0].message
            assert msg.reasoning_content == reasoning and msg.content == content
            got_r, got_c = "", ""
            async for ch in await c.chat.completions.create(model=pathlib.Path(model["model"]).name, messages=USER, max_tokens=20,
                                                            temperature=0, stream=True):
                got_r += getattr(ch.choices[0].delta, "reasoning_content", None) or ""
                got_c += ch.choices[0].delta.content or ""
            assert (got_r, got_c) == (reasoning, content)
    with pytest.raises(ValueError, match="reasoning_parser"):
        build_app(_config(model), reasoning_parser="o1")


# ------------------------------------------------------------------ chat templates and AsyncEngine.chat


def test_template_sources_and_variables(model, tmp_path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    src = pathlib.Path(model["model"])
    for name in ("tokenizer.json", "config.json"):
        (d / name).write_bytes((src / name).read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "from tokenizer_config"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(d).chat_template == "from tokenizer_config"
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert load_chat_template(d, cfg) == "from chat_template.json"
    jinja = ("{{ bos_token }}{% for m in messages %}{% generation %}[{{ m.role }}] {{ m.content }}{% endgeneration %}{{ eos_token }}"
             "{% endfor %}{% if tools %}tools={{ tools | map(attribute='function.name') | join(',') }}{% endif %}"
             "{% if add_generation_prompt %}[assistant]{% endif %}{% if enable_thinking is defined %}think={{ enable_thinking }}{% endif %}")
    (d / "chat_template.jinja").write_text(jinja)  # transformers >= 4.49's file wins
    tok = Tokenizer(d)
    assert tok.chat_template == jinja
    bos, eos = tok.special_tokens["bos_token"], tok.special_tokens["eos_token"]
    text = apply_chat_template(tok, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tools=TOOLS, enable_thinking=False)
    assert text == f"{bos}[user] hi{eos}tools=get_weather,search[assistant]think=False"
    assert apply_chat_template(tok, USER, add_generation_prompt=False).endswith(eos)
    assert apply_chat_template(tok, USER, chat_template="{{ messages[0].content | upper }}") == USER[0]["content"].upper()
    with pytest.raises(ValueError, match="messages\\[0\\].role"):
        apply_chat_template(tok, [{"role": "robot", "content": "x"}])


async def test_engine_chat_equals_generate_on_the_rendered_prompt(make_engine, model) -> None:
    async with make_engine(**_config(model)) as eng:
        params = SamplingParams(max_tokens=8, temperature=0)
        out = await eng.chat(USER, params)
        ids = apply_chat_template(eng.tokenizer, USER, tokenize=True)
        ref = await eng.generate(ids, params)
        assert out.token_ids == ref.token_ids and out.prompt_token_ids == ids
        chunks = [o async for o in eng.chat(USER, params, add_generation_prompt=False)]
        assert chunks[-1].prompt_token_ids == apply_chat_template(eng.tokenizer, USER, add_generation_prompt=False, tokenize=True)
        with pytest.raises(ValueError, match="messages\\[0\\].role"):
            eng.chat([{"role": "robot", "content": "x"}], params)
    with pytest.raises(Exception, match="not running"):
        AsyncEngine.from_config(_config(model)).chat(USER)


def test_chat_template_override_from_the_command_line(template_file) -> None:
    import argparse

    from aiosched.server import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--chat-template", str(template_file), "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
                              "--allowed-origins", "http://a,http://b", "--strict-request-fields"])
    assert (args.chat_template, args.tool_call_parser, args.reasoning_parser, args.allowed_origins, args.strict_request_fields) == (
        str(template_file), "hermes", "qwen3", "http://a,http://b", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--tool-call-parser", "nope"])
