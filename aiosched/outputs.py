"""What `generate()` hands back: cumulative text/tokens plus the delta since the last output.

Inside the engine every output is a delta; the cumulative `text`/`token_ids`/`logprobs`
are views of the sample's append-only history, built when first read (so a consumer
that reads only `new_text` costs O(new tokens) per output, at any output length).

Shaped like vLLM's: a RequestOutput holds one CompletionOutput per parallel sample
(`n > 1`); the common single-sample fields are also reachable directly on it
(`out.text`, `out.new_text`, `out.token_ids`, `out.finish_reason`, ...).
"""
from __future__ import annotations

import msgspec

from aiosched.token_ids import TokenIds


class RequestMetrics(msgspec.Struct, gc=False):
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0


class TokenLogprob(msgspec.Struct, gc=False, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


PIECES_PER_CHUNK = 256  # text pieces joined into one chunk: bounds what text nobody reads holds


class SampleHistory:
    """Append-only cumulative state of one sample (engine side). Every output of the
    sample is a view of a prefix of it, so building an output costs O(new tokens), not
    a copy of everything so far; the cumulative lists and text are built only when read."""

    __slots__ = ("token_ids", "logprobs", "num_chars", "_chunks", "pieces")

    def __init__(self) -> None:
        self.token_ids = TokenIds()  # one buffer, nothing inside for the GC to visit
        self.logprobs: list[TokenLogprob] = []
        self.num_chars = 0
        self._chunks: list[str] = []  # joined text; all of it becomes one string when read
        self.pieces: list[str] = []  # text pieces since the last join (the engine appends here)

    def add_text(self, text: str) -> None:
        tail = self.pieces
        tail.append(text)
        self.num_chars += len(text)
        if len(tail) >= PIECES_PER_CHUNK:  # O(1) per piece
            self.join_pieces()

    def join_pieces(self) -> None:
        """The pieces since the last join become one chunk (the engine's one-pass path
        appends to `pieces` itself and calls this at the same bound as `add_text`)."""
        self._chunks.append("".join(self.pieces))
        self.pieces.clear()

    def text(self, num_chars: int) -> str:
        chunks = self._chunks
        if self.pieces:
            chunks.append("".join(self.pieces))
            self.pieces.clear()
        if len(chunks) > 1:
            chunks[:] = ["".join(chunks)]
        whole = chunks[0] if chunks else ""
        return whole if num_chars == len(whole) else whole[:num_chars]


class CompletionOutput(msgspec.Struct, gc=False):
    """One sample's output. `text`, `token_ids` and `logprobs` are cumulative and built
    on first read (then kept); `new_text` and `new_token_ids` are the delta since the
    previous output of this sample. Build one with `CompletionOutput.of(...)`."""

    index: int  # which parallel sample
    new_text: str  # since the previous output of this sample
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    cumulative_logprob: float | None = None
    # The cumulative view: a prefix of the sample's history (or the values themselves).
    _history: SampleHistory | None = None
    _num_tokens: int = 0
    _num_chars: int = 0
    _num_logprobs: int = -1  # -1: no logprobs asked for
    _text: str | None = None
    _token_ids: list[int] | None = None
    _logprobs: list[TokenLogprob] | None = None

    @classmethod
    def of(cls, index: int, text: str, token_ids: list[int], new_text: str, new_token_ids: list[int],
           finish_reason: str | None = None, stop_reason: int | str | None = None,
           logprobs: list[TokenLogprob] | None = None, cumulative_logprob: float | None = None) -> "CompletionOutput":
        """From cumulative values (the field order of the former struct)."""
        return cls(index, new_text, new_token_ids, finish_reason, stop_reason, cumulative_logprob, None, len(token_ids),
                   len(text), -1 if logprobs is None else len(logprobs), text, token_ids, logprobs)

    @property
    def text(self) -> str:  # cumulative
        t = self._text
        if t is None:
            assert self._history is not None
            t = self._text = self._history.text(self._num_chars)
        return t

    @property
    def token_ids(self) -> list[int]:  # cumulative
        t = self._token_ids
        if t is None:
            assert self._history is not None
            t = self._token_ids = self._history.token_ids[: self._num_tokens].tolist()
        return t

    @property
    def logprobs(self) -> list[TokenLogprob] | None:  # cumulative, when asked for
        if self._num_logprobs < 0:
            return None
        lp = self._logprobs
        if lp is None:
            assert self._history is not None
            lp = self._logprobs = self._history.logprobs[: self._num_logprobs]
        return lp

    @property
    def new_logprobs(self) -> list[TokenLogprob] | None:
        """The logprobs of `new_token_ids` (a slice of `logprobs`, without building it)."""
        if self._num_logprobs < 0:
            return None
        n_new = len(self.new_token_ids)
        if not n_new:
            return []
        end = self._num_logprobs
        src = self._logprobs if self._logprobs is not None else self._history.logprobs  # type: ignore[union-attr]
        return src[end - n_new : end]

    @property
    def num_tokens(self) -> int:
        """len(token_ids), without building the list."""
        return self._num_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def replace(self, **changes: object) -> "CompletionOutput":
        """A copy with the given public fields changed (index, new_text, new_token_ids, ...)."""
        return msgspec.structs.replace(self, **changes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompletionOutput):
            return NotImplemented
        return (self.index, self.text, self.token_ids, self.new_text, self.new_token_ids, self.finish_reason, self.stop_reason,
                self.logprobs, self.cumulative_logprob) == (other.index, other.text, other.token_ids, other.new_text,
                                                            other.new_token_ids, other.finish_reason, other.stop_reason,
                                                            other.logprobs, other.cumulative_logprob)

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, new_text={self.new_text!r}, "
                f"new_token_ids={self.new_token_ids}, finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r}, "
                f"logprobs={self.logprobs}, cumulative_logprob={self.cumulative_logprob})")


class RequestOutput(msgspec.Struct, gc=False):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # streamed: the samples that changed; final: all, by index
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    # Single-sample shortcuts (the first sample in this output).
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def new_text(self) -> str:
        return self.outputs[0].new_text

    @property
    def new_token_ids(self) -> list[int]:
        return self.outputs[0].new_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self.outputs[0].stop_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.outputs[0].logprobs
