"""Incremental detokenization and stop strings: O(new tokens) per step.

Text is produced by decoding a sliding window of tokens and emitting only the part
that is stable: a trailing U+FFFD means a multi-byte character is still incomplete,
so nothing is emitted until it completes. Text that could be the start of a stop
string is held back, so a stop string spanning several tokens never leaks out.

The output text is the decode of the output tokens: a prompt (given as ids) that ends
inside a character keeps its dangling bytes; they are never credited to the output.

Byte-level tokenizers (GPT-2 style `ByteLevel` decoder: the text of a sequence is the
UTF-8 decode of its tokens' bytes, concatenated) take a fast path: at a character
boundary, a token that is complete UTF-8 on its own adds exactly its own text, a dict
lookup instead of two decodes.

Nothing here grows with the tokens so far: the window is trimmed, and only the text
not yet handed out (at most the longest stop string) is kept.
"""
from __future__ import annotations

import weakref

from aiosched.tokenizer import Tokenizer

_WINDOW = 6  # tokens of context before the unread ones (byte-level BPE merges span few tokens)
_TRIM = 64  # drop window tokens that no decode can read any more once there are this many


# Text of single tokens, per tokenizer and skip_special_tokens. Decoding is a pure function
# of (ids, skip_special_tokens), and once a request is decoding, every step decodes the
# previous token alone (the stable prefix) and then it with the new one: the first of
# the two decodes is then a dict lookup. Bounded by the vocabulary size.
_single: "weakref.WeakKeyDictionary[Tokenizer, dict[bool, dict[int, str]]]" = weakref.WeakKeyDictionary()
# Byte-level tokenizers only: token -> its text when that is complete UTF-8 on its own
# (None: a partial character, which takes the window path).
_clean: "weakref.WeakKeyDictionary[Tokenizer, dict[bool, dict[int, str | None]]]" = weakref.WeakKeyDictionary()


def _per_tokenizer(table: "weakref.WeakKeyDictionary[Tokenizer, dict]", tok: Tokenizer, skip_special: bool) -> dict:
    per_tok = table.get(tok)
    if per_tok is None:
        per_tok = table[tok] = {}
    return per_tok.setdefault(skip_special, {})


def warm(tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
    """Fill the single-token tables for the whole vocabulary at once: one batched decode in
    the Rust side (8,192 tokens in 6.5 ms on the 2-core CI machine; a 128k vocabulary ~0.1 s,
    once, at engine start). Without it each token's first appearance costs a decode on the
    event loop, for as long as the server keeps meeting new tokens. Same texts as the lazy
    path (`_learn`, `_decode_new`)."""
    texts = tokenizer.decode_batch([[t] for t in range(tokenizer.vocab_size)], skip_special_tokens)
    _per_tokenizer(_single, tokenizer, skip_special_tokens).update(enumerate(texts))
    if _is_byte_level(tokenizer):
        _per_tokenizer(_clean, tokenizer, skip_special_tokens).update((t, _clean_text(text)) for t, text in enumerate(texts))


def _clean_text(text: str) -> str | None:
    """A single token's text as the fast path keeps it: None for a partial character (or a
    real U+FFFD), which the window path decides."""
    return None if "\ufffd" in text else text


def _is_byte_level(tok: Tokenizer) -> bool:
    """True when decoding is the UTF-8 decode of the tokens' concatenated bytes."""
    try:
        from tokenizers import decoders

        return isinstance(tok._tok.decoder, decoders.ByteLevel)
    except (AttributeError, ImportError):
        return False


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool = True, include_stop: bool = False) -> None:
        self.tok = tokenizer
        self.skip_special = skip_special_tokens
        window = list(prompt_ids[-_WINDOW:])
        if window and tokenizer.decode(window, skip_special_tokens).endswith("\ufffd"):
            # The prompt ends inside a character (or with U+FFFD): those bytes are the
            # prompt's. Decoding the output on their own keeps out.text == decode(out ids).
            window = []
        self.ids: list[int] = window
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.pending = ""  # decoded text not handed out yet (stop-string hold-back)
        self.stop_hit: str | None = None
        self._one: dict[int, str] = _per_tokenizer(_single, tokenizer, skip_special_tokens)
        self.clean: dict[int, str | None] | None = (
            _per_tokenizer(_clean, tokenizer, skip_special_tokens) if _is_byte_level(tokenizer) else None)
        # At a character boundary of a byte-level tokenizer, a clean token's text is a dict
        # lookup and the only state a later decode needs is that token (the prefix of the
        # next decode): `fast` says the window is in that state, `last` holds the token
        # (None: no clean token since the window was last used; `ids` is still current).
        # The engine inlines this path: `if d.fast and (text := d.clean.get(t)) is not None: d.last = t`.
        self.fast = self.clean is not None
        self.last: int | None = None

    def _learn(self, t: int) -> str | None:
        assert self.clean is not None
        text = self.clean[t] = _clean_text(self.tok.decode([t], self.skip_special))
        return text

    def push(self, t: int) -> str:
        """Append one token; return the new stable text (possibly empty). Without stop
        strings this is all of add_tokens([t]) (the engine's per-token hot path)."""
        if self.fast:
            clean = self.clean
            assert clean is not None
            text = clean.get(t)
            if text is None and t not in clean:
                text = self._learn(t)
            if text is not None:
                self.last = t
                return text
            self._leave_fast()
        self.ids.append(t)
        text = self._decode_new()
        self.fast = self.clean is not None and self.read_offset == len(self.ids)
        return text

    def _leave_fast(self) -> None:
        """The window path takes over: the last clean token (if any) becomes the window."""
        self.fast = False
        if self.last is not None:
            self.ids = [self.last]
            self.prefix_offset, self.read_offset = 0, 1
            self.last = None

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
        # Earlier output ending inside a character decodes with a trailing U+FFFD that
        # the completed text replaces: align on the part before it.
        stable = prefix.rstrip("\ufffd")
        if full.startswith(stable):
            new = full[len(stable) :]
        else:  # cannot align (unusual tokenizers): never stall
            new = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(ids)
        if self.prefix_offset >= _TRIM:  # tokens before the prefix are never read again
            del ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return new

    def add_tokens(self, new_ids: list[int]) -> tuple[str, str | None]:
        """Feed tokens; return (new stable text, matched stop string or None)."""
        if not self.stop:  # hot path: nothing held back
            if len(new_ids) == 1:
                return self.push(new_ids[0]), None
            return "".join([self.push(t) for t in new_ids]), None
        for t in new_ids:
            self.pending += self.push(t)
            hit = self._find_stop()
            if hit is not None:
                return self._take(len(self.pending)), hit
        return self._take(len(self.pending) - self.holdback), None

    def flush(self) -> str:
        """At the end of the request: decode what is pending and release held-back text."""
        if self.read_offset < len(self.ids) and self.stop_hit is None:
            self.pending += self._decode_new(final=True)
        return self._take(len(self.pending))

    def _find_stop(self) -> str | None:
        # Every earlier position was searched when its text arrived, and text is handed
        # out only once no stop string can start in it: a match lies in `pending`.
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.pending.find(s)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.stop_hit = s
        self.pending = self.pending[: i + len(s)] if self.include_stop else self.pending[:i]
        return s

    def _take(self, upto: int) -> str:
        if upto <= 0:
            return ""
        out, self.pending = self.pending[:upto], self.pending[upto:]
        return out
