"""What `generate()` hands back: cumulative text/tokens plus the delta since the last output.

Shaped like vLLM's: a RequestOutput holds one CompletionOutput per parallel sample
(`n > 1`); the common single-sample fields are also reachable directly on it
(`out.text`, `out.new_text`, `out.token_ids`, `out.finish_reason`, ...).
"""
from __future__ import annotations

import msgspec


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


class CompletionOutput(msgspec.Struct, gc=False):
    index: int  # which parallel sample
    text: str  # cumulative
    token_ids: list[int]  # cumulative
    new_text: str  # since the previous output of this sample
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    logprobs: list[TokenLogprob] | None = None  # cumulative, when asked for
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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
