"""Tool calls parsed out of generated text, incrementally (streaming) or whole.

Formats (`--tool-call-parser`, `build_app(tool_call_parser=...)`):

- `hermes` (alias `qwen`): Hermes / Qwen 2.5 / Qwen 3 chat templates. Each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; text outside the tags
  is content.
- `llama3_json`: Llama 3.1 / 3.2 / 3.3 JSON tool calling. An output that starts with
  `{` (after an optional `<|python_tag|>`) is one or more `{"name": ..., "parameters":
  {...}}` objects separated by `;`; an object whose name is not one of the request's
  tools is content, not a call (plain JSON answers stay answers).

Two more formats are what the grammar makes the model write when a call is forced
(`tool_choice="required"` or a named function, see `aiosched.tool_choice`):
`json_array` (`[{"name": ..., "parameters": {...}}, ...]`) and `named` (the output is
the arguments object of one known function).

Every parser is a stream parser: `feed(text)` returns the events that text completes,
`finish()` the rest at the end of the output. Non-streamed responses run the same
parser over the whole text (`parse_all`), so streamed and whole answers agree. A
call's `arguments` is the JSON text exactly as the model wrote it, streamed as it is
generated (OpenAI's shape: the first delta of a call has its id, type and name, the
next ones pieces of `arguments`).
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ContentEvent:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallArguments:
    index: int
    text: str


Event = ContentEvent | ToolCallStart | ToolCallArguments


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class ParsedOutput:
    content: str
    tool_calls: list[ParsedToolCall] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------- one call object


class _CallObject:
    """Scans one JSON object `{"name": ..., "arguments": ...}` as its text arrives.

    Tracks nesting and strings, records the raw text of each top-level value, and
    exposes the arguments value as far as it has been written. `bad` when the text
    is not a JSON object."""

    def __init__(self) -> None:
        self.raw = ""
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.state = "open"  # open -> key -> colon -> value_start -> value -> (key | done)
        self.key = ""
        self.key_start = 0
        self.value_start = 0
        self.values: dict[str, str] = {}
        self.done = False
        self.bad = False

    def feed(self, text: str) -> int:
        """Consume text; returns how many characters belong to this object."""
        for i, ch in enumerate(text):
            if self.done or self.bad:
                return i
            self.raw += ch
            self._step(ch, len(self.raw) - 1)
        return len(text)

    def _step(self, ch: str, pos: int) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.state == "key" and self.depth == 1:
                    self.key = json.loads(self.raw[self.key_start:pos + 1])
                    self.state = "colon"
            return
        if self.state == "open":
            if ch == "{":
                self.depth, self.state = 1, "key"
            elif not ch.isspace():
                self.bad = True
            return
        if self.state == "key":
            if ch == '"':
                self.in_string, self.key_start = True, pos
            elif ch == "}":
                self.depth, self.done = 0, True
            elif not ch.isspace() and ch != ",":
                self.bad = True
            return
        if self.state == "colon":
            if ch == ":":
                self.state = "value_start"
            elif not ch.isspace():
                self.bad = True
            return
        if self.state == "value_start":
            if ch.isspace():
                return
            self.state, self.value_start = "value", pos
        # state == "value"
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]" and self.depth > 1:
            self.depth -= 1
        elif self.depth == 1 and ch in ",}":
            self.values[self.key] = self.raw[self.value_start:pos].rstrip()
            if ch == ",":
                self.state = "key"
            else:
                self.depth, self.done = 0, True

    @property
    def name(self) -> str | None:
        raw = self.values.get("name")
        if raw is None:
            return None
        try:
            v = json.loads(raw)
        except json.JSONDecodeError:
            return None
        return v if isinstance(v, str) else None

    def arguments_so_far(self) -> str | None:
        """The arguments value as written so far (trailing blanks held back); None before it starts."""
        for k in ARGUMENT_KEYS:
            if k in self.values:
                return self.values[k]
        if self.state == "value" and self.key in ARGUMENT_KEYS:
            text = self.raw[self.value_start:]
            return text if self.in_string else text.rstrip()
        return None

    def complete_arguments(self) -> str:
        return self.arguments_so_far() or "{}"


# ---------------------------------------------------------------- parsers


class ToolParser:
    """Base: turns text into events; subclasses decide where calls are."""

    def __init__(self, tool_names: Iterable[str] = ()) -> None:
        self.tool_names = set(tool_names)
        self.num_calls = 0
        self._call: _CallObject | None = None
        self._started = False  # the current call's ToolCallStart was sent
        self._sent_args = 0

    # --- the current call object ---

    def _begin_call(self) -> None:
        self._call, self._started, self._sent_args = _CallObject(), False, 0

    def _call_events(self, final: bool = False) -> list[Event]:
        """Start / argument events for what the current call has gained."""
        c = self._call
        assert c is not None
        out: list[Event] = []
        if not self._started:
            name = c.name
            if name is None or not self._accept_name(name):
                return out
            self._started = True
            out.append(ToolCallStart(self.num_calls, new_call_id(), name))
            self.num_calls += 1
        args = c.complete_arguments() if final else c.arguments_so_far()
        if args is not None and len(args) > self._sent_args:
            out.append(ToolCallArguments(self.num_calls - 1, args[self._sent_args:]))
            self._sent_args = len(args)
        return out

    def _accept_name(self, name: str) -> bool:
        return True

    # --- interface ---

    def feed(self, text: str) -> list[Event]:
        raise NotImplementedError

    def finish(self) -> list[Event]:
        raise NotImplementedError


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class HermesToolParser(ToolParser):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, tool_names: Iterable[str] = ()) -> None:
        super().__init__(tool_names)
        self._mode = "content"  # content | call | close
        self._pending = ""  # text not yet classified
        self._raw_call = ""  # the current call's text, for a malformed one

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        out: list[Event] = []
        while self._pending:
            if self._mode == "content":
                i = self._pending.find(self.START)
                if i < 0:
                    keep = _held_prefix(self._pending, self.START)
                    self._content(self._pending[:len(self._pending) - keep], out)
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                self._content(self._pending[:i], out)
                self._pending = self._pending[i + len(self.START):]
                self._mode, self._raw_call = "call", ""
                self._begin_call()
            elif self._mode == "call":
                assert self._call is not None
                n = self._call.feed(self._pending)
                self._raw_call += self._pending[:n]
                self._pending = self._pending[n:]
                if self._call.bad:
                    self._mode = "malformed"
                    continue
                out += self._call_events(final=self._call.done)
                if not self._call.done:
                    break
                if not self._started:  # a complete object without a name: not a call
                    self._content(self.START + self._raw_call, out)
                self._mode = "close"
            elif self._mode == "close":  # skip to the end tag
                i = self._pending.find(self.END)
                if i < 0:
                    keep = _held_prefix(self._pending, self.END)
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                self._pending = self._pending[i + len(self.END):]
                self._mode = "content"
            else:  # malformed: whatever is inside the tags is content
                i = self._pending.find(self.END)
                if i < 0:
                    keep = _held_prefix(self._pending, self.END)
                    self._raw_call += self._pending[:len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                self._content(self.START + self._raw_call + self._pending[:i + len(self.END)], out)
                self._pending = self._pending[i + len(self.END):]
                self._mode = "content"
        return out

    def _content(self, text: str, out: list[Event]) -> None:
        # Blank text between and after calls is layout, not an answer.
        if text and (self.num_calls == 0 or text.strip()):
            out.append(ContentEvent(text))

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._mode == "content":
            self._content(self._pending, out)
        elif self._mode in ("call", "malformed") and not self._started:
            self._content(self.START + self._raw_call + self._pending, out)  # cut off before it was a call
        self._pending = ""
        return out


class Llama3JsonToolParser(ToolParser):
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, tool_names: Iterable[str] = ()) -> None:
        super().__init__(tool_names)
        self._mode = "start"  # start | call | between | content
        self._pending = ""
        self._raw_call = ""

    def _accept_name(self, name: str) -> bool:
        return not self.tool_names or name in self.tool_names

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        out: list[Event] = []
        while self._pending:
            if self._mode == "content":
                out.append(ContentEvent(self._pending))
                self._pending = ""
            elif self._mode == "start":
                s = self._pending.lstrip()
                if not s or self.PYTHON_TAG.startswith(s):
                    break  # undecided yet
                s = s.removeprefix(self.PYTHON_TAG).lstrip()
                if not s:
                    break
                if s[0] != "{":
                    self._mode = "content"
                    continue
                self._pending, self._raw_call = s, ""
                self._mode = "call"
                self._begin_call()
            elif self._mode == "call":
                c = self._call
                assert c is not None
                n = c.feed(self._pending)
                self._raw_call += self._pending[:n]
                self._pending = self._pending[n:]
                if not c.bad:
                    out += self._call_events(final=c.done)
                name = c.name
                if c.bad or (name is not None and not self._started) or (c.done and not self._started):
                    # Not a call (plain JSON, or a name that is no tool): the rest is content.
                    self._pending = self._raw_call + self._pending
                    self._mode = "content"
                    continue
                if not c.done:
                    break
                self._mode = "between"
            else:  # between calls: `;` and blanks, then the next `{`, or content
                s = self._pending.lstrip().lstrip(";").lstrip()
                if not s:
                    self._pending = ""
                    break
                self._pending = s
                if s[0] == "{":
                    self._mode, self._raw_call = "call", ""
                    self._begin_call()
                else:
                    self._mode = "content"
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._mode == "call" and not self._started:
            out.append(ContentEvent(self._raw_call + self._pending))
        elif self._mode in ("start", "content") and self._pending:
            out.append(ContentEvent(self._pending))
        self._pending = ""
        return out


class JsonArrayToolParser(ToolParser):
    """`[{"name": ..., "parameters": {...}}, ...]`: what `tool_choice="required"` makes the model write."""

    def __init__(self, tool_names: Iterable[str] = ()) -> None:
        super().__init__(tool_names)
        self._mode = "open"  # open | item | between | end
        self._pending = ""

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        out: list[Event] = []
        while self._pending:
            if self._mode == "open":
                s = self._pending.lstrip()
                if not s:
                    self._pending = ""
                    break
                self._pending = s[1:] if s[0] == "[" else s
                self._mode = "between"
            elif self._mode == "between":
                s = self._pending.lstrip().lstrip(",").lstrip()
                if not s:
                    self._pending = ""
                    break
                if s[0] != "{":
                    self._mode, self._pending = "end", ""
                    break
                self._pending = s
                self._mode = "item"
                self._begin_call()
            elif self._mode == "item":
                assert self._call is not None
                n = self._call.feed(self._pending)
                self._pending = self._pending[n:]
                if self._call.bad:
                    self._mode, self._pending = "end", ""
                    break
                out += self._call_events(final=self._call.done)
                if not self._call.done:
                    break
                self._mode = "between"
            else:
                self._pending = ""
        return out

    def finish(self) -> list[Event]:
        return []


class NamedToolParser(ToolParser):
    """The whole output is the arguments of one function: what a named `tool_choice` makes the model write."""

    def __init__(self, name: str) -> None:
        super().__init__((name,))
        self.name = name
        self._args = ""

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        if self.num_calls == 0:
            out.append(ToolCallStart(0, new_call_id(), self.name))
            self.num_calls = 1
        piece = text if self._args else text.lstrip()
        if piece:
            self._args += piece
            out.append(ToolCallArguments(0, piece))
        return out

    def finish(self) -> list[Event]:
        return self.feed("") if self.num_calls == 0 else []


TOOL_PARSERS: dict[str, Callable[[Iterable[str]], ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def make_tool_parser(name: str, tool_names: Iterable[str] = ()) -> ToolParser:
    try:
        return TOOL_PARSERS[name](tool_names)
    except KeyError:
        raise ValueError(f"tool_call_parser: must be one of {sorted(TOOL_PARSERS)}, got {name!r}") from None


def collect(events: Iterable[Event]) -> ParsedOutput:
    """Fold events into the whole message: content and complete calls."""
    content: list[str] = []
    calls: dict[int, ParsedToolCall] = {}
    for e in events:
        if isinstance(e, ContentEvent):
            content.append(e.text)
        elif isinstance(e, ToolCallStart):
            calls[e.index] = ParsedToolCall(e.id, e.name, "")
        else:
            calls[e.index].arguments += e.text
    return ParsedOutput("".join(content), [calls[i] for i in sorted(calls)])


def parse_all(parser: ToolParser, text: str) -> ParsedOutput:
    return collect([*parser.feed(text), *parser.finish()])
