"""Sampling on the device, with no host sync.

Seeded sampling is batch-invariant and reproducible: each row draws Gumbel noise from
a counter-based hash of (request seed, absolute position, vocab index) and takes
argmax(logits / T + noise), which samples exactly from softmax(logits / T). The same
request therefore gets the same tokens whatever else is in the batch, after a
preemption, and in sync or async mode. top-k / top-p / min-p mask logits first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row parameters of the rows that sample this step (built once per step)."""

    temperature: torch.Tensor  # [R] float32; 0 = greedy
    top_k: torch.Tensor  # [R] int64; 0 = off
    top_p: torch.Tensor  # [R] float32
    min_p: torch.Tensor  # [R] float32
    seeds: torch.Tensor  # [R] int64
    positions: torch.Tensor  # [R] int64: position of the token being sampled
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    # (row, token) pairs forced to -inf (min_tokens: EOS and stop ids not allowed yet).
    ban_rows: torch.Tensor | None = None
    ban_tokens: torch.Tensor | None = None
    # Host hint: > 0 when every random row has 0 < top_k <= max_top_k. Sampling then works
    # on each row's max_top_k best logits (topk, noise for those columns only) instead of
    # sorting and hashing the whole vocabulary. 0: the full path.
    max_top_k: int = 0


_NOISE_CHUNK = 1 << 24  # most noise elements alive at once (bounds the [R, V] int64/float64 temporaries)


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 finalizer on values held in int64 in [0, 2^32): wraps keep the low bits.
    In place on `x` (callers pass a fresh tensor) to keep [R, V] temporaries few."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x &= _M32
    x ^= x >> 13
    x *= 0xC2B2AE35
    x &= _M32
    x ^= x >> 16
    return x


def _row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R] per-row hash of (seed, position): the counter's row part."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    return _fmix32(_fmix32(lo ^ _fmix32(hi + 0x9E3779B9)) ^ ((positions * 0x27D4EB2F) & _M32))


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, V] float64 uniforms in (0, 1), a pure function of (seed, position, vocab index)."""
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    return uniform_noise_at(seeds, positions, cols.unsqueeze(0))


def uniform_noise_at(seeds: torch.Tensor, positions: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The same uniforms at chosen vocab indices `cols` ([R, K] or [1, K])."""
    row = _row_keys(seeds, positions)
    x = _fmix32(row.unsqueeze(1) ^ cols)
    x += 0x165667B1
    x &= _M32
    x = _fmix32(x).double()
    x += 0.5
    return x.div_(4294967296.0)


def gumbel_argmax(scaled: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R] argmax(scaled + Gumbel noise): one draw from softmax(scaled) per row. Rows are
    processed in chunks so the float64 noise never holds more than _NOISE_CHUNK elements."""
    R, V = scaled.shape
    step = max(1, _NOISE_CHUNK // max(V, 1))
    if R <= step:
        return _gumbel_argmax_rows(scaled, seeds, positions)
    return torch.cat([_gumbel_argmax_rows(scaled[s : s + step], seeds[s : s + step], positions[s : s + step])
                      for s in range(0, R, step)])


def _gumbel_argmax_rows(scaled: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    g = uniform_noise(seeds, positions, scaled.shape[-1])
    g.log_().neg_().log_().neg_()  # -log(-log(u))
    return g.add_(scaled).argmax(dim=-1)


def apply_top_k_top_p_min_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, nucleus and min-p sets."""
    if b.any_min_p:
        probs = torch.softmax(logits, dim=-1)
        keep = probs >= b.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(~keep, float("-inf"))
    if not (b.any_top_k or b.any_top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if b.any_top_k:
        k = torch.where(b.top_k > 0, b.top_k, vocab).unsqueeze(1)
        drop |= ranks >= k
    if b.any_top_p:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before this token
        drop |= before >= b.top_p.unsqueeze(1)  # keeps the smallest set reaching top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


# CPU greedy argmax in two vectorised passes: torch's CPU argmax keeps an index per lane
# and runs ~1.6 GB/s here, while amax streams at memory speed. [64, 32000] float32 on the
# AVX2 sandbox, 1 thread: 4.2 ms -> 0.8 ms (docs/benchmarks.md, issue 23, 2026-12-03); a
# few rows lose to the setup cost (1 row: 36 us -> 72 us), so they keep torch's argmax.
# AIOSCHED_CPU_ARGMAX=torch keeps torch.argmax (the before/after switch of the benchmark).
CPU_ARGMAX_ENV = "AIOSCHED_CPU_ARGMAX"
ARGMAX_CHUNK = 512
ARGMAX_MIN_ROWS = 8


def greedy_argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[R, V] -> [R] int64: each row's first index of its maximum (torch.argmax's result,
    ties and NaN included). On the CPU for >= ARGMAX_MIN_ROWS float32 rows: the max of each
    ARGMAX_CHUNK-wide chunk (amax), the first chunk holding the row's max, then argmax
    inside that chunk only; elsewhere torch.argmax."""
    R, V = logits.shape
    n = V // ARGMAX_CHUNK
    if (logits.device.type != "cpu" or logits.dtype != torch.float32 or R < ARGMAX_MIN_ROWS or n < 2
            or logits.stride(-1) != 1 or os.environ.get(CPU_ARGMAX_ENV) == "torch"):
        ids = logits.argmax(dim=-1)
        return ids if out is None else out.copy_(ids)
    chunk_max = logits[:, : n * ARGMAX_CHUNK].unflatten(1, (n, ARGMAX_CHUNK)).amax(dim=-1)  # [R, n]
    if V > n * ARGMAX_CHUNK:  # the ragged tail is one more chunk
        chunk_max = torch.cat([chunk_max, logits[:, n * ARGMAX_CHUNK:].amax(dim=-1, keepdim=True)], dim=1)
    row_max = chunk_max.amax(dim=-1, keepdim=True)
    if torch.isnan(row_max).any():  # argmax takes the first NaN; equality never matches one
        ids = logits.argmax(dim=-1)
        return ids if out is None else out.copy_(ids)
    first = (chunk_max == row_max).to(torch.uint8).argmax(dim=-1)  # first chunk holding the max
    start = first * ARGMAX_CHUNK
    # The chunk's columns; the tail chunk's are clamped to V - 1, repeats after the real
    # columns, so the first maximum found is still the row's first.
    cols = (start.unsqueeze(1) + torch.arange(ARGMAX_CHUNK, device=logits.device)).clamp_(max=V - 1)
    ids = start + logits.gather(1, cols).argmax(dim=-1)
    return ids if out is None else out.copy_(ids)


def sample(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """[R, V] float32 logits -> [R] int64 token ids, on the device."""
    if b.ban_rows is not None and b.ban_rows.numel():
        logits = logits.index_put((b.ban_rows, b.ban_tokens), torch.tensor(float("-inf"), device=logits.device))
    greedy = greedy_argmax(logits)
    if b.all_greedy:
        return greedy
    temp = torch.where(b.temperature > 0, b.temperature, 1.0).unsqueeze(1)
    if 0 < b.max_top_k < logits.shape[-1]:
        sampled = _sample_top_k_candidates(logits / temp, b)
    else:
        scaled = apply_top_k_top_p_min_p(logits / temp, b)
        sampled = gumbel_argmax(scaled, b.seeds, b.positions)
    return torch.where(b.temperature > 0, sampled, greedy)


def _sample_top_k_candidates(scaled: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """`sample` when every random row has a top-k of at most b.max_top_k: the same
    masks and the same noise (hashed at the candidates' vocab indices), on [R, K]."""
    if b.any_min_p:  # relative to the full distribution's top probability
        probs = torch.softmax(scaled, dim=-1)
        keep = probs >= b.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        scaled = scaled.masked_fill(~keep, float("-inf"))
    K = b.max_top_k
    vals, idx = scaled.topk(K, dim=-1)  # sorted, best first
    ranks = torch.arange(K, device=scaled.device).unsqueeze(0)
    drop = ranks >= torch.where(b.top_k > 0, b.top_k, K).unsqueeze(1)
    if b.any_top_p:
        probs = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
        drop |= probs.cumsum(dim=-1) - probs >= b.top_p.unsqueeze(1)
    g = uniform_noise_at(b.seeds, b.positions, idx)
    g.log_().neg_().log_().neg_()
    best = g.add_(vals.masked_fill(drop, float("-inf"))).argmax(dim=-1, keepdim=True)
    return idx.gather(1, best).squeeze(1)
