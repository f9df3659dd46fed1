"""A chat choice's generated text as OpenAI message fields: content, reasoning_content, tool_calls.

The pipeline per choice: text -> reasoning splitter (optional, `--reasoning-parser`)
-> tool-call parser (optional: the request's tools with `--tool-call-parser`, or the
forced format of `tool_choice="required"` / a named function). Streaming feeds each
new piece of text and turns what comes out into one delta; a whole response feeds
the whole text. Both run the same parsers, so they agree.

Also here: the JSON schema a forced `tool_choice` is enforced with, through the
structured-output grammar (`aiosched.structured`), so that the output always is a
valid call of the request's tools.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiosched.openai_protocol import (
    ChatResponseMessage,
    ChatTool,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    NamedToolChoice,
    ResponseFunction,
    ResponseToolCall,
)
from aiosched.reasoning_parser import ThinkSplitter
from aiosched.tool_parsers import (
    ContentEvent,
    Event,
    JsonArrayToolParser,
    NamedToolParser,
    ToolCallArguments,
    ToolCallStart,
    ToolParser,
    collect,
)


@dataclass
class Piece:
    """What one feed produced."""

    reasoning: str = ""
    content: str = ""
    tool_events: list[Event] = field(default_factory=list)


class ChoiceParser:
    def __init__(self, reasoning: ThinkSplitter | None = None, tools: ToolParser | None = None) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.called = False  # any tool call started

    def feed(self, text: str) -> Piece:
        return self._split(*(self.reasoning.feed(text) if self.reasoning is not None else ("", text)), final=False)

    def finish(self) -> Piece:
        r, c = self.reasoning.finish() if self.reasoning is not None else ("", "")
        return self._split(r, c, final=True)

    def _split(self, reasoning: str, content: str, final: bool) -> Piece:
        if self.tools is None:
            return Piece(reasoning, content)
        events = self.tools.feed(content) if content else []
        if final:
            events += self.tools.finish()
        text = "".join(e.text for e in events if isinstance(e, ContentEvent))
        calls = [e for e in events if not isinstance(e, ContentEvent)]
        self.called = self.called or any(isinstance(e, ToolCallStart) for e in calls)
        return Piece(reasoning, text, calls)


def delta_of(piece: Piece, role: str | None = None) -> DeltaMessage:
    """One stream delta; `content: ""` when the piece is empty (a token whose text is not out yet)."""
    calls: list[DeltaToolCall] = []
    for e in piece.tool_events:
        if isinstance(e, ToolCallStart):
            calls.append(DeltaToolCall(e.index, e.id, "function", DeltaFunction(e.name, "")))
        else:
            assert isinstance(e, ToolCallArguments)
            last = calls[-1] if calls else None
            if last is not None and last.index == e.index and last.function is not None:
                last.function.arguments = (last.function.arguments or "") + e.text
            else:
                calls.append(DeltaToolCall(e.index, function=DeltaFunction(arguments=e.text)))
    content: str | None = piece.content
    if not content and (calls or piece.reasoning):
        content = None
    return DeltaMessage(role=role, content=content, reasoning_content=piece.reasoning or None, tool_calls=calls or None)


def message_of(parser: ChoiceParser, text: str) -> ChatResponseMessage:
    """The whole assistant message for a finished choice."""
    a, b = parser.feed(text), parser.finish()
    reasoning = a.reasoning + b.reasoning
    parsed = collect([*a.tool_events, *b.tool_events])
    content = a.content + b.content
    calls = [ResponseToolCall(c.id, ResponseFunction(c.name, c.arguments)) for c in parsed.tool_calls]
    if calls and not content.strip():
        content_out: str | None = None
    else:
        content_out = content
    return ChatResponseMessage("assistant", content_out, reasoning or None, calls)


def finish_reason(reason: str | None, parser: ChoiceParser, named: bool) -> str | None:
    """OpenAI's: `tool_calls` when the model stopped after calling tools (a named tool_choice stays `stop`)."""
    if reason == "stop" and parser.called and not named:
        return "tool_calls"
    return reason


# ---------------------------------------------------------------- forced tool calls


def forced_schema(tools: list[ChatTool], choice: str | NamedToolChoice, parallel: bool) -> dict[str, Any]:
    """The JSON schema the output must follow for `tool_choice="required"` or a named function."""
    if isinstance(choice, NamedToolChoice):
        fn = next(t.function for t in tools if t.function.name == choice.function.name)
        return fn.parameters or {"type": "object"}
    items = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": t.function.parameters or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def forced_parser(tools: list[ChatTool], choice: str | NamedToolChoice) -> ToolParser:
    if isinstance(choice, NamedToolChoice):
        return NamedToolParser(choice.function.name)
    return JsonArrayToolParser([t.function.name for t in tools])


def tool_dicts(tools: list[ChatTool]) -> list[dict[str, Any]]:
    """The request's tools as the chat template gets them (OpenAI's shape)."""
    out = []
    for t in tools:
        fn: dict[str, Any] = {"name": t.function.name}
        if t.function.description is not None:
            fn["description"] = t.function.description
        fn["parameters"] = t.function.parameters if t.function.parameters is not None else {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


def schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"))
