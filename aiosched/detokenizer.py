"""Incremental detokenization and stop strings.

Text is produced by decoding a sliding window of tokens and emitting only the part
that is stable: a trailing U+FFFD means a multi-byte character is still incomplete,
so nothing is emitted until it completes. Text that could be the start of a stop
string is held back, so a stop string spanning several tokens never leaks out.
"""
from __future__ import annotations

import weakref

from aiosched.tokenizer import Tokenizer

_WINDOW = 6  # tokens of context before the unread ones (byte-level BPE merges span few tokens)

# Text of single tokens, per tokenizer and skip_special_tokens. Decoding is a pure function
# of (ids, skip_special_tokens), and once a request is decoding, every step decodes the
# previous token alone (the stable prefix) and then it with the new one: the first of
# the two decodes is then a dict lookup. Bounded by the vocabulary size.
_single: "weakref.WeakKeyDictionary[Tokenizer, dict[bool, dict[int, str]]]" = weakref.WeakKeyDictionary()


def _single_token_cache(tok: Tokenizer, skip_special: bool) -> dict[int, str]:
    per_tok = _single.get(tok)
    if per_tok is None:
        per_tok = _single[tok] = {}
    return per_tok.setdefault(skip_special, {})


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool = True, include_stop: bool = False) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.skip_special = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far (including held-back text)
        self.stop_hit: str | None = None
        self.emitted = 0  # characters of self.text already handed out
        self._one = _single_token_cache(tokenizer, skip_special_tokens)

    def _decode_new(self, final: bool = False) -> str:
        ids, start, read = self.ids, self.prefix_offset, self.read_offset
        if read - start == 1:  # steady state: the stable prefix is the previous token alone
            prefix = self._one.get(ids[start])
            if prefix is None:
                prefix = self._one[ids[start]] = self.tok.decode(ids[start:read], self.skip_special)
        else:
            prefix = self.tok.decode(ids[start:read], self.skip_special)
        full = self.tok.decode(ids[start:], self.skip_special)
        if full.endswith("\ufffd") and not final:
            return ""  # incomplete character: wait for more tokens
        # A prompt (or earlier output) ending inside a character decodes with a trailing
        # U+FFFD that the completed text replaces: align on the part before it.
        stable = prefix.rstrip("\ufffd")
        if full.startswith(stable):
            new = full[len(stable) :]
        else:  # cannot align (unusual tokenizers): never stall
            new = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new

    def add_tokens(self, new_ids: list[int]) -> tuple[str, str | None]:
        """Feed tokens; return (new stable text, matched stop string or None)."""
        if len(new_ids) == 1 and not self.stop:  # hot path: one token a step, nothing held back
            self.ids.append(new_ids[0])
            self.text += self._decode_new()
            return self._take(len(self.text)), None
        for t in new_ids:
            self.ids.append(t)
            self.text += self._decode_new()
            hit = self._find_stop()
            if hit is not None:
                return self._take(len(self.text)), hit
        return self._take(max(self.emitted, len(self.text) - self.holdback)), None

    def flush(self) -> str:
        """At the end of the request: decode what is pending and release held-back text."""
        if self.read_offset < len(self.ids) and self.stop_hit is None:
            self.text += self._decode_new(final=True)
        return self._take(len(self.text))

    def _find_stop(self) -> str | None:
        if not self.stop:
            return None
        start = max(0, self.emitted - self.holdback - 8)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.stop_hit = s
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
