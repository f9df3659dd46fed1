"""Tool-call and reasoning parsers on text: whole outputs, and the same text streamed in any pieces."""
from __future__ import annotations

import json
import random

import pytest

from aiosched.reasoning_parser import ThinkSplitter, make_reasoning_parser
from aiosched.tool_parsers import (
    ContentEvent,
    JsonArrayToolParser,
    NamedToolParser,
    ToolCallArguments,
    ToolCallStart,
    collect,
    make_tool_parser,
    parse_all,
)

TOOLS = ["get_weather", "search"]


def streamed(parser_factory, text: str, rng: random.Random):
    """Feed `text` in random pieces (including empty ones, as partial UTF-8 gives)."""
    p = parser_factory()
    events, i = [], 0
    while i < len(text):
        k = rng.choice([0, 1, 1, 2, 3, 7])
        events += p.feed(text[i:i + k])
        i += k
    events += p.finish()
    return events


def same_streamed_and_whole(factory, text: str) -> None:
    whole = parse_all(factory(), text)
    for seed in range(20):
        events = streamed(factory, text, random.Random(seed))
        got = collect(events)
        assert got.content == whole.content, seed
        assert [(c.name, c.arguments) for c in got.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls], seed
        # OpenAI's shape: each call starts with its id and name, then argument pieces for that index only.
        started: set[int] = set()
        for e in events:
            if isinstance(e, ToolCallStart):
                assert e.index == len(started) and e.id.startswith("call_")
                started.add(e.index)
            elif isinstance(e, ToolCallArguments):
                assert e.index in started and e.text


HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "search", "arguments": {"q": "a \\"quoted\\" } brace", "n": [1, {"x": 2}]}}\n</tool_call>')


def test_hermes_calls_and_content() -> None:
    out = parse_all(make_tool_parser("hermes", TOOLS), HERMES)
    assert out.content == "Let me check.\n"
    assert [c.name for c in out.tool_calls] == ["get_weather", "search"]
    assert json.loads(out.tool_calls[0].arguments) == {"city": "Paris", "unit": "c"}
    assert out.tool_calls[1].arguments == '{"q": "a \\"quoted\\" } brace", "n": [1, {"x": 2}]}'  # as the model wrote it
    same_streamed_and_whole(lambda: make_tool_parser("hermes", TOOLS), HERMES)


@pytest.mark.parametrize("text, content, ncalls", [
    ("no calls here, only <b>text</b> and a < sign", "no calls here, only <b>text</b> and a < sign", 0),
    ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", 0),
    ('<tool_call>{"arguments": {"a": 1}, "name": "search"}</tool_call>', "", 1),  # name after the arguments
    ('<tool_call>{"name": "search", "arguments": {"q": "cut off', "", 1),  # max_tokens hit inside the call
    ("text then <tool_ca", "text then <tool_ca", 0),  # a tag prefix at the end is text
])
def test_hermes_edge_cases(text: str, content: str, ncalls: int) -> None:
    out = parse_all(make_tool_parser("hermes", TOOLS), text)
    assert out.content == content and len(out.tool_calls) == ncalls
    same_streamed_and_whole(lambda: make_tool_parser("hermes", TOOLS), text)


def test_hermes_streams_arguments_as_they_are_written() -> None:
    p = make_tool_parser("hermes", TOOLS)
    assert p.feed("Sure. <tool_") == [ContentEvent("Sure. ")]
    assert p.feed('call>{"name": "get_wea') == []
    start, = p.feed('ther", "arguments": ')
    assert isinstance(start, ToolCallStart) and start.name == "get_weather" and start.index == 0
    assert p.feed('{"city": "Pa') == [ToolCallArguments(0, '{"city": "Pa')]
    assert p.feed('ris"}}</tool_call>') == [ToolCallArguments(0, 'ris"}')]
    assert p.finish() == []


LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "search", "parameters": {"q": "x"}}'


def test_llama3_json() -> None:
    out = parse_all(make_tool_parser("llama3_json", TOOLS), LLAMA)
    assert out.content == "" and [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("get_weather", {"city": "Oslo"}), ("search", {"q": "x"})]
    same_streamed_and_whole(lambda: make_tool_parser("llama3_json", TOOLS), LLAMA)
    for text in ('{"name": "Bob", "age": 3}',  # a JSON answer whose "name" is no tool: content
                 "The weather is fine.", '{"age": 3}', "  {not json"):
        out = parse_all(make_tool_parser("llama3_json", TOOLS), text)
        assert out.content == text.lstrip() and out.tool_calls == [], text
        same_streamed_and_whole(lambda: make_tool_parser("llama3_json", TOOLS), text)


def test_forced_formats() -> None:
    text = '[{"name":"search","parameters":{"q":"a]b"}},{"name":"get_weather","parameters":{"city":"Rome"}}]'
    out = parse_all(JsonArrayToolParser(TOOLS), text)
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("search", '{"q":"a]b"}'), ("get_weather", '{"city":"Rome"}')]
    same_streamed_and_whole(lambda: JsonArrayToolParser(TOOLS), text)
    out = parse_all(NamedToolParser("search"), '{"q":"x"}')
    assert out.content == "" and [(c.name, c.arguments) for c in out.tool_calls] == [("search", '{"q":"x"}')]
    same_streamed_and_whole(lambda: NamedToolParser("search"), '{"q":"x"}')
    with pytest.raises(ValueError, match="tool_call_parser"):
        make_tool_parser("mistral")


def split_think(text: str, prompt: str = "", pieces: int = 0) -> tuple[str, str]:
    s = ThinkSplitter(prompt)
    rng = random.Random(pieces)
    r, c, i = "", "", 0
    while i < len(text):
        k = rng.choice([1, 2, 5]) if pieces else len(text)
        a, b = s.feed(text[i:i + k])
        r, c, i = r + a, c + b, i + k
    a, b = s.finish()
    return r + a, c + b


@pytest.mark.parametrize("text, prompt, reasoning, content", [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", "<|im_start|>assistant\n", "Let me think.\n", "The answer is 4."),
    ("Let me think.\n</think>\n\n4", "<|assistant|><think>\n", "Let me think.\n", "4"),  # the template opened it
    ("4, plainly. <think> is a tag", "<|assistant|>", "", "4, plainly. <think> is a tag"),  # no think block: all answer
    ("<think>\ncut off by max_tok", "", "cut off by max_tok", ""),
    ("<thi", "", "", "<thi"),
])
def test_think_split(text: str, prompt: str, reasoning: str, content: str) -> None:
    assert split_think(text, prompt) == (reasoning, content)
    for seed in range(1, 15):
        assert split_think(text, prompt, seed) == (reasoning, content), seed
    with pytest.raises(ValueError, match="reasoning_parser"):
        make_reasoning_parser("o1")
