"""The one wire format between the scheduler and model workers (msgspec Structs).

In process these Structs are passed as-is; across a process or host boundary they
are msgpack-encoded with the typed encoder/decoder below. No pickle anywhere.

Contract between scheduler and worker (see docs/architecture.md):
- `SchedulerOutput` carries only the diff since the last step: requests new to the
  worker in full (`new_requests`), then every scheduled request as a small delta
  (`scheduled`), and ids the worker must forget (`freed_req_ids`: finished, aborted
  or preempted). The worker applies `freed_req_ids` first, then `new_requests`.
- The worker keeps each request's token history itself. Tokens it sampled are
  written there on the device, so a step may schedule positions whose token the
  scheduler has not seen yet (async "output placeholders"): the worker reads them
  from its own history without a host round trip.
- Steps are executed in submission order on one stream. The scheduler relies on
  this to reuse freed KV blocks at once.
"""
from __future__ import annotations

from typing import Any

import msgspec

from aiosched.config import EngineConfig
from aiosched.sampling_params import SamplingParams

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024  # frames larger than this are rejected before decoding


class NewRequestData(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A request the worker has no state for (first schedule or resumption after preemption)."""

    req_id: str
    token_ids: list[int]  # every known token: prompt, then outputs so far (on resumption)
    prompt_len: int  # token_ids[prompt_len:] are outputs (penalties, logprobs)
    sampling: SamplingParams
    seed: int  # always set: the engine draws one when the user gave none
    eos_token_ids: list[int] = []  # masked (with stop_token_ids) until min_tokens are out


class ScheduledRequest(msgspec.Struct, gc=False, array_like=True, forbid_unknown_fields=True):
    """One request's share of a step."""

    req_id: str
    num_tokens: int  # tokens to compute this step, starting at num_computed_tokens
    num_computed_tokens: int  # position of the first token computed this step
    new_block_ids: list[int]  # appended to the worker's block table for this request
    sample: bool  # True when this step reaches the end of the sequence: sample a token
    draft_token_ids: list[int] = []  # speculative drafts (worker-side proposer fills in)
    # Speculative decode step: room reserved for up to this many draft tokens after the
    # last token. The worker then ignores num_computed_tokens/num_tokens (an upper bound
    # in async mode) and computes [its last token, its own drafts] from its own history.
    num_draft_slots: int = 0


class SchedulerOutput(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    step_id: int
    new_requests: list[NewRequestData]
    scheduled: list[ScheduledRequest]  # batch order
    freed_req_ids: list[str]
    total_num_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Logprobs(msgspec.Struct, gc=False, array_like=True, forbid_unknown_fields=True):
    """Per generated token: the sampled token's logprob and the top-k alternatives."""

    token_logprobs: list[float]  # one per sampled token
    top_token_ids: list[list[int]]  # [num_tokens][k]
    top_logprobs: list[list[float]]


class RunnerOutput(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """What a step produced, host side. Only requests with `sample=True` appear."""

    step_id: int
    req_ids: list[str]
    sampled_token_ids: list[list[int]]  # usually one token each; more with speculation
    # Aligned with req_ids when any asked (`sampling.logprobs` set): log_softmax of the raw
    # model logits (before penalties, bias, grammar mask, temperature).
    logprobs: list[Logprobs | None] | None = None
    # For each scheduled request with `sampling.prompt_logprobs` whose chunk [start, end)
    # covers prompt positions: entry i is the logprob of prompt token start + 1 + i
    # (for start + 1 + i < prompt_len), from the logits at position start + i.
    prompt_logprobs: dict[str, Logprobs] | None = None
    num_draft_tokens: int = 0  # speculative metrics for this step
    num_accepted_tokens: int = 0


class WorkerInfo(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """Sent by the worker after loading: what the scheduler must size itself to."""

    protocol_version: int
    num_kv_blocks: int
    block_size: int
    vocab_size: int
    max_model_len: int
    device: str
    dtype: str
    runner: str  # "torch" | "jax" | "fake"
    # Optional request features this worker implements ("structured_output", "logprobs",
    # "prompt_logprobs"); the engine rejects requests that need one it lacks.
    features: list[str] = []
    cuda_graphs: int = 0  # CUDA graphs captured at load (decode batch sizes + mixed-step token counts); for the startup log


# --- control messages for out-of-process executors (multiproc, remote) ---


class Hello(msgspec.Struct, gc=False, tag=True, forbid_unknown_fields=True):
    protocol_version: int
    config: EngineConfig
    rank: int = 0


class Execute(msgspec.Struct, gc=False, tag=True, forbid_unknown_fields=True):
    output: SchedulerOutput


class Heartbeat(msgspec.Struct, gc=False, tag=True, forbid_unknown_fields=True):
    seq: int


class Shutdown(msgspec.Struct, gc=False, tag=True, forbid_unknown_fields=True):
    pass


class Ready(msgspec.Struct, gc=False, tag=True, forbid_unknown_fields=True):
    info: WorkerInfo


class StepResult(msgspec.Struct, gc=False, tag=True, forbid_unknown_fields=True):
    output: RunnerOutput


class WorkerError(msgspec.Struct, gc=False, tag=True, forbid_unknown_fields=True):
    message: str
    fatal: bool = True


ToWorker = Hello | Execute | Heartbeat | Shutdown
FromWorker = Ready | StepResult | Heartbeat | WorkerError

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


def _check_size(frame: bytes | memoryview, limit: int) -> None:
    if len(frame) > limit:
        raise ValueError(f"frame of {len(frame)} bytes exceeds the limit of {limit} bytes")


def decode_to_worker(frame: bytes | memoryview, limit: int = MAX_FRAME_BYTES) -> ToWorker:
    """Strict, typed decode; raises ValueError on anything malformed or oversized."""
    _check_size(frame, limit)
    try:
        return _to_worker.decode(frame)
    except msgspec.DecodeError as e:
        raise ValueError(f"malformed message to worker: {e}") from None


def decode_from_worker(frame: bytes | memoryview, limit: int = MAX_FRAME_BYTES) -> FromWorker:
    _check_size(frame, limit)
    try:
        return _from_worker.decode(frame)
    except msgspec.DecodeError as e:
        raise ValueError(f"malformed message from worker: {e}") from None
