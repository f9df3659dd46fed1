"""Per-request sampling parameters.

A msgspec Struct so the same object travels to workers unchanged (msgpack on the
wire, passed as-is in process). `validate()` raises `ValueError` naming the field.
"""
from __future__ import annotations

import math

import msgspec

_MAX_LOGPROBS = 20


class StructuredOutputParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Constrained decoding: exactly one of the fields is set."""

    json_schema: str | None = None  # JSON text of the schema
    json_object: bool = False  # any valid JSON object
    regex: str | None = None
    grammar: str | None = None  # EBNF / GBNF text

    def validate(self) -> None:
        chosen = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        if self.json_object:
            chosen.append("json_object")
        if len(chosen) != 1:
            raise ValueError(f"structured: exactly one of json_schema, json_object, regex, grammar must be set, got {chosen or 'none'}")


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    max_tokens: int = 16  # most tokens to generate
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    seed: int | None = None  # same seed, same output whatever the batch
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are out
    stop: list[str] = []  # stop strings; the match is cut from the text unless include_stop_str_in_output
    stop_token_ids: list[int] = []  # token ids that end the request (besides EOS)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    skip_special_tokens: bool = True  # leave special tokens out of the text
    # Penalties and biases (applied on the device from the worker's token history).
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated (-2..2)
    frequency_penalty: float = 0.0  # subtracted per occurrence of a generated token (-2..2)
    repetition_penalty: float = 1.0  # tokens seen in prompt or output: positive logits divided, negative multiplied (1 = off)
    logit_bias: dict[int, float] = {}  # token id -> bias added to its logit (-100..100)
    bad_token_ids: list[int] = []  # token ids that are never sampled
    # Logprobs: None = none; k >= 0 = sampled token's logprob plus top-k alternatives.
    logprobs: int | None = None  # 0..20
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens, with top-k alternatives (0..20)
    # Parallel samples.
    n: int = 1  # samples per prompt (they share the prompt's KV blocks)
    best_of: int | None = None  # None or n
    structured: StructuredOutputParams | None = None  # constrained decoding: a JSON schema, any JSON object, a regex or a grammar
    # Speculative decoding opt-out for this request.
    speculative: bool = True  # false: no speculative decoding for this request

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field."""
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_float("temperature", self.temperature, lo=0.0, hi=100.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0)
        if self.top_p <= 0.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, lo=-1)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(2**63), hi=2**63 - 1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError("stop: every stop string must be a non-empty string")
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("bad_token_ids", self.bad_token_ids)):
            for t in ids:
                _check_token(name, t, vocab_size)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, hi=100.0)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for t, b in self.logit_bias.items():
            _check_token("logit_bias", t, vocab_size)
            _check_float("logit_bias", b, lo=-100.0, hi=100.0)
        for name, k in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if k is not None:
                _check_int(name, k, lo=0, hi=_MAX_LOGPROBS)
        _check_int("n", self.n, lo=1, hi=128)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, lo=1, hi=128)
            if self.best_of < self.n:
                raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.structured is not None:
            self.structured.validate()


def _check_int(name: str, v: object, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")


def _check_float(name: str, v: object, lo: float, hi: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")


def _check_token(name: str, t: object, vocab_size: int | None) -> None:
    _check_int(name, t, lo=0)
    if vocab_size is not None and t >= vocab_size:  # type: ignore[operator]
        raise ValueError(f"{name}: token id {t} is out of range for vocab size {vocab_size}")
