"""Scheduler-side state of one request (plain dataclass, no torch)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from aiosched.sampling_params import SamplingParams
from aiosched.token_ids import TokenIds


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


# eq=False: requests compare by identity, so removing one from the running/waiting
# lists (finish, abort, preemption) does not compare every field of every request it passes.
@dataclass(eq=False, slots=True)
class Request:
    req_id: str  # internal, unique for the engine's lifetime
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int
    eos_token_ids: list[int]
    arrival_time: float = field(default_factory=time.monotonic)
    # Prompt + outputs in one int64 buffer (not a list of ints the GC walks every collection).
    all_token_ids: TokenIds = field(default_factory=TokenIds)
    num_computed_tokens: int = 0  # tokens whose KV is computed or scheduled
    # Async scheduling: tokens scheduled to be sampled whose value has not arrived.
    num_output_placeholders: int = 0
    # Speculative decoding: draft slots of this request's steps in flight (each may add
    # up to that many tokens beyond its one placeholder; an upper bound until it lands).
    num_spec_slack: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Fixed for the request's lifetime; plain attributes because the scheduler reads
    # them for every running request on every step.
    num_prompt_tokens: int = field(init=False, default=0)
    max_total_tokens: int = field(init=False, default=0)  # token count at which it stops for length (before max_model_len)
    stop_length: int = field(init=False, default=0)  # min(max_total_tokens, max_model_len): set by the scheduler on admission
    # Every token id that may stop it (EOS and stop_token_ids): a token outside it, before
    # stop_length, cannot stop the request, so the per-token stop check is one lookup.
    stop_token_set: frozenset[int] = field(init=False, default=frozenset())
    # Kept by the KV cache manager: the known-and-computed token count at which its next
    # block becomes full (until then cache_full_blocks has nothing to do; 0: unknown).
    next_full_block_at: int = field(init=False, default=0)
    # Kept by the KV cache manager: tokens its blocks hold (block table length x block
    # size; 0 when it holds none). A step that stays within it needs no allocation.
    num_kv_slots: int = field(init=False, default=0)
    # Its sampling uses no feature the speculative verifier lacks: drafts may be verified
    # for it (when speculation is configured). Read for every running request every step.
    may_speculate: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = TokenIds(self.prompt_token_ids)
        elif not isinstance(self.all_token_ids, TokenIds):
            self.all_token_ids = TokenIds(self.all_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.max_total_tokens = self.num_prompt_tokens + self.sampling.max_tokens
        self.stop_token_set = frozenset(self.eos_token_ids) | frozenset(self.sampling.stop_token_ids)
        sp = self.sampling
        self.may_speculate = bool(
            sp.speculative and sp.structured is None and sp.logprobs is None and sp.prompt_logprobs is None
            and sp.min_tokens == 0 and not sp.logit_bias and not sp.bad_token_ids and sp.presence_penalty == 0.0
            and sp.frequency_penalty == 0.0 and sp.repetition_penalty == 1.0)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :].tolist()

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
