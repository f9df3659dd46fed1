"""Logits processors on the device: penalties, logit bias, banned tokens; logprobs.

All take the logits of the rows that sample this step ([R, V] float32) and per-row
parameters built once per step. The token statistics the penalties need come from the
worker's device token buffer (each request's full history, sampled tokens written
there on the device by the step that sampled them), gathered here with on-device
index arithmetic: under async scheduling the token sampled by step N is counted by
step N+1 with no host round trip and no one-step lag.

Reference formulas (those of vLLM / the OpenAI API / HF transformers):

- repetition_penalty r (tokens seen in the prompt or the output so far):
  logit > 0 -> logit / r, else logit * r
- frequency_penalty f: logit -= f * (times the token occurs in the output)
- presence_penalty p:  logit -= p * (1 if the token occurs in the output)
- logit_bias: logit += bias[token]
- bad_token_ids: logit = -inf

Order: repetition, frequency, presence, logit_bias, bad tokens; then (in the sampler)
the grammar bitmask, min_tokens bans, temperature, top-k/top-p/min-p, sampling.

Logprobs are `log_softmax` of the **raw model logits** (before penalties, bias,
grammar masks and temperature), as vLLM returns by default ("raw_logprobs"): they
describe the model, not the sampling procedure, and are what a reference
implementation's logits give. The sampled token's rank among the top-k is not needed;
its logprob is gathered directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aiosched.sampling_params import SamplingParams


@dataclass
class PenaltyBatch:
    """Per-row penalty parameters for the rows that sample this step, on the device.

    `rows` indexes the sampling rows that have any penalty (repetition != 1, presence
    or frequency != 0); the token statistics are gathered for those rows only."""

    rows: torch.Tensor  # [P] int64, into the [R] sampling rows
    buffer_rows: torch.Tensor  # [P] int64, the request's row in the token buffer
    prompt_lens: torch.Tensor  # [P] int64
    num_tokens: torch.Tensor  # [P] int64, tokens in the history before the one being sampled
    max_tokens: int  # max of num_tokens (host int: sizes the gather)
    repetition: torch.Tensor  # [P] float32
    frequency: torch.Tensor  # [P] float32
    presence: torch.Tensor  # [P] float32
    any_repetition: bool
    any_frequency_presence: bool


@dataclass
class BiasBatch:
    """Sparse (row, token, value) additions; value -inf bans the token."""

    rows: torch.Tensor  # [N] int64
    tokens: torch.Tensor  # [N] int64
    values: torch.Tensor  # [N] float32


def has_penalties(sp: SamplingParams) -> bool:
    return sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0


def build_penalty_batch(params: list[SamplingParams], buffer_rows: list[int], prompt_lens: list[int], num_tokens: list[int],
                        device: torch.device) -> PenaltyBatch | None:
    """None when no row has a penalty (the common case costs nothing)."""
    idx = [i for i, sp in enumerate(params) if has_penalties(sp)]
    if not idx:
        return None

    def t(vals: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(vals, dtype=dtype).to(device, non_blocking=True)

    sps = [params[i] for i in idx]
    return PenaltyBatch(
        rows=t(idx, torch.int64),
        buffer_rows=t([buffer_rows[i] for i in idx], torch.int64),
        prompt_lens=t([prompt_lens[i] for i in idx], torch.int64),
        num_tokens=t([num_tokens[i] for i in idx], torch.int64),
        max_tokens=max(num_tokens[i] for i in idx),
        repetition=t([sp.repetition_penalty for sp in sps], torch.float32),
        frequency=t([sp.frequency_penalty for sp in sps], torch.float32),
        presence=t([sp.presence_penalty for sp in sps], torch.float32),
        any_repetition=any(sp.repetition_penalty != 1.0 for sp in sps),
        any_frequency_presence=any(sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0 for sp in sps),
    )


def build_bias_batch(params: list[SamplingParams], device: torch.device) -> BiasBatch | None:
    rows: list[int] = []
    tokens: list[int] = []
    values: list[float] = []
    for i, sp in enumerate(params):
        for tok, b in sp.logit_bias.items():
            rows.append(i)
            tokens.append(int(tok))
            values.append(float(b))
        for tok in sp.bad_token_ids:
            rows.append(i)
            tokens.append(int(tok))
            values.append(float("-inf"))
    if not rows:
        return None
    return BiasBatch(torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True),
                     torch.tensor(tokens, dtype=torch.int64).to(device, non_blocking=True),
                     torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True))


def token_stats(token_buffer: torch.Tensor, b: PenaltyBatch, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output counts [P, V] int32, seen in prompt or output [P, V] bool) from the device token buffer."""
    dev = token_buffer.device
    pos = torch.arange(max(b.max_tokens, 1), device=dev).unsqueeze(0)  # [1, L]
    hist = token_buffer[b.buffer_rows][:, : pos.shape[1]]  # [P, L]
    in_hist = pos < b.num_tokens.unsqueeze(1)
    is_out = in_hist & (pos >= b.prompt_lens.unsqueeze(1))
    sink = torch.full_like(hist, vocab)  # out-of-range entries land in a dropped column
    counts = torch.zeros((hist.shape[0], vocab + 1), dtype=torch.int32, device=dev)
    counts.scatter_add_(1, torch.where(is_out, hist, sink), torch.ones_like(hist, dtype=torch.int32))
    seen = torch.zeros((hist.shape[0], vocab + 1), dtype=torch.bool, device=dev)
    seen.scatter_(1, torch.where(in_hist, hist, sink), True)
    return counts[:, :vocab], seen[:, :vocab]


def apply_penalties(logits: torch.Tensor, token_buffer: torch.Tensor, b: PenaltyBatch) -> torch.Tensor:
    """Out of place on the penalized rows; returns the new logits."""
    vocab = logits.shape[-1]
    counts, seen = token_stats(token_buffer, b, vocab)
    sub = logits.index_select(0, b.rows)
    if b.any_repetition:
        r = b.repetition.unsqueeze(1)
        sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
    if b.any_frequency_presence:
        sub = sub - b.frequency.unsqueeze(1) * counts.to(sub.dtype) - b.presence.unsqueeze(1) * (counts > 0).to(sub.dtype)
    return logits.index_copy(0, b.rows, sub)


def apply_bias(logits: torch.Tensor, b: BiasBatch) -> torch.Tensor:
    """logit_bias adds; bad_token_ids (value -inf) ban. Repeated (row, token) pairs accumulate."""
    return logits.index_put((b.rows, b.tokens), b.values, accumulate=True)


# ---- logprobs ----


def compute_logprobs(logits: torch.Tensor, sampled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-model logprobs for the rows that asked.

    logits [A, V] (raw), sampled [A] int64 -> (sampled token's logprob [A] float32,
    top-k token ids [A, k] int64, top-k logprobs [A, k] float32), best first."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, sampled.view(-1, 1)).squeeze(1)
    if k > 0:
        top_lp, top_ids = lp.topk(k, dim=-1)
    else:
        top_lp = lp.new_empty((lp.shape[0], 0))
        top_ids = torch.empty((lp.shape[0], 0), dtype=torch.int64, device=lp.device)
    return chosen, top_ids, top_lp
