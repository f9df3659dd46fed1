"""Reasoning (`<think>...</think>`) split out of generated text, as `reasoning_content`.

`--reasoning-parser qwen3` (alias `deepseek_r1`): Qwen3, QwQ and DeepSeek-R1 write
their reasoning between `<think>` and `</think>`, then the answer. Where the reasoning
starts depends on the chat template:

- the output itself opens it (`<think>` as its first text: Qwen3 in thinking mode);
- the rendered prompt already opened it (the generation prompt ends in `<think>`:
  DeepSeek-R1, Qwen3-Thinking-2507), so the output is reasoning up to `</think>`;
- neither (Qwen3 with `enable_thinking=False` gets an empty think block in the
  prompt): the output is all answer.

`ThinkSplitter` is a stream parser: `feed(text)` returns (reasoning, content) for that
piece, holding back only what could still be the start of a tag; `finish()` flushes.
Non-streamed responses use the same parser over the whole text.
"""
from __future__ import annotations

from collections.abc import Callable


def _held_prefix(text: str, tag: str) -> int:
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ThinkSplitter:
    START, END = "<think>", "</think>"

    def __init__(self, prompt_text: str = "") -> None:
        opened = prompt_text.rfind(self.START)
        in_prompt = opened >= 0 and prompt_text.rfind(self.END) < opened
        self._mode = "reasoning" if in_prompt else "start"  # start | reasoning | after | content
        self._pending = ""
        self._reasoning_started = False

    def feed(self, text: str) -> tuple[str, str]:
        self._pending += text
        reasoning, content = "", ""
        while self._pending:
            p = self._pending
            if self._mode == "start":
                s = p.lstrip()
                if not s or self.START.startswith(s) and len(s) < len(self.START):
                    break  # could still open a think block
                if s.startswith(self.START):
                    self._pending, self._mode = s[len(self.START):], "reasoning"
                else:
                    self._mode = "content"
            elif self._mode == "reasoning":
                i = p.find(self.END)
                if i < 0:
                    keep = _held_prefix(p, self.END)
                    reasoning += p[:len(p) - keep]
                    self._pending = p[len(p) - keep:]
                    break
                reasoning += p[:i]
                self._pending, self._mode = p[i + len(self.END):], "after"
            elif self._mode == "after":  # the blank line(s) between reasoning and answer
                s = p.lstrip()
                if not s:
                    self._pending = ""
                    break
                self._pending, self._mode = s, "content"
            else:
                content += p
                self._pending = ""
        return self._layout(reasoning), content

    def finish(self) -> tuple[str, str]:
        p, self._pending = self._pending, ""
        if self._mode == "reasoning":
            return self._layout(p), ""
        if self._mode == "after":
            return "", ""
        return "", p

    def _layout(self, reasoning: str) -> str:
        """`<think>\\n` is the tag's layout: the reasoning text starts after the newline."""
        if reasoning and not self._reasoning_started:
            self._reasoning_started = True
            return reasoning.removeprefix("\n")
        return reasoning


REASONING_PARSERS: dict[str, Callable[[str], ThinkSplitter]] = {
    "qwen3": ThinkSplitter,
    "deepseek_r1": ThinkSplitter,
}


def make_reasoning_parser(name: str, prompt_text: str = "") -> ThinkSplitter:
    try:
        return REASONING_PARSERS[name](prompt_text)
    except KeyError:
        raise ValueError(f"reasoning_parser: must be one of {sorted(REASONING_PARSERS)}, got {name!r}") from None


def check_reasoning_parser(name: str | None) -> None:
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser: must be one of {sorted(REASONING_PARSERS)}, got {name!r}")
