"""On-device sampling for the JAX runner, with the semantics of the torch runner's
`executors/torch/sampler.py` and `executors/torch/logits_processors.py`.

Order: repetition / frequency / presence penalties (from the device token buffer),
logit_bias and bad tokens, min_tokens bans (EOS and stop ids), greedy argmax; for
random rows: temperature, min-p, top-k, top-p (rank-based: exactly the k best, the
smallest set reaching top_p), then Gumbel-max. The Gumbel noise is the torch
sampler's counter-based hash of (seed, position, vocab index), bit for bit, so a
seeded request samples the same token in either runner unless two candidates are
within float rounding of each other (torch adds the noise in float64, JAX here in
float32 with the transform arranged to lose no precision near u = 1; the logits
themselves differ by rounding between the two implementations too).

Every row is a function of (its logits, its parameters, seed, position) only: no
generator state, so batch composition, preemption and sync vs async do not change it.
32-bit integer arithmetic only (JAX runs without x64 by default).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

_NEG_INF = float("-inf")


class SamplingMetadata(NamedTuple):
    """Per sampled row ([S] each; padding rows are greedy)."""

    temperature: jax.Array  # f32; 0 = greedy
    top_k: jax.Array  # i32; <= 0 disabled
    top_p: jax.Array  # f32; 1 disabled
    min_p: jax.Array  # f32; 0 disabled
    seed_lo: jax.Array  # u32: low 32 bits of the seed (two's complement)
    seed_hi: jax.Array  # u32: high 32 bits
    position: jax.Array  # i32: position of the token being sampled (= tokens before it)
    bias_ids: jax.Array  # [S, M] i32: token ids whose logits get `bias_val` added (padding: id 0, value 0)
    bias_val: jax.Array  # [S, M] f32 (-inf bans: bad_token_ids, min_tokens)
    presence: jax.Array  # f32; 0 disabled
    frequency: jax.Array  # f32; 0 disabled
    repetition: jax.Array  # f32; 1 disabled
    prompt_len: jax.Array  # i32: history[:prompt_len] is the prompt, history[prompt_len:position] the outputs


# ---------------------------------------------------------------- the noise


def _u32(c: int) -> jax.Array:
    return jnp.uint32(c & 0xFFFFFFFF)


def _fmix32(x: jax.Array) -> jax.Array:
    """murmur3 fmix32 on uint32 (wrapping multiplies)."""
    x = x ^ (x >> 16)
    x = x * _u32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * _u32(0xC2B2AE35)
    return x ^ (x >> 16)


def _fmix32_33(low: jax.Array, carry: jax.Array) -> jax.Array:
    """fmix32 of the 33-bit value carry * 2^32 + low, as the torch sampler computes it in
    int64 (`hi + 0x9E3779B9` is not reduced mod 2^32 there): bit 32 reaches bit 16 through
    the first shift, and nothing above bit 31 survives the first masked multiply."""
    x = low ^ (low >> 16) ^ (carry << 16)
    x = x * _u32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * _u32(0xC2B2AE35)
    return x ^ (x >> 16)


def noise_bits(seed_lo: jax.Array, seed_hi: jax.Array, position: jax.Array, vocab: int) -> jax.Array:
    """[S, vocab] uint32: the torch sampler's hash of (seed, position, vocab index)."""
    hi = seed_hi.astype(jnp.uint32)
    s = hi + _u32(0x9E3779B9)
    carry = (s < hi).astype(jnp.uint32)
    pos = position.astype(jnp.uint32) * _u32(0x27D4EB2F)
    row = _fmix32(_fmix32(seed_lo.astype(jnp.uint32) ^ _fmix32_33(s, carry)) ^ pos)
    cols = jnp.arange(vocab, dtype=jnp.uint32)
    return _fmix32(_fmix32(row[:, None] ^ cols[None, :]) + _u32(0x165667B1))


def gumbel_noise(seed_lo: jax.Array, seed_hi: jax.Array, position: jax.Array, vocab: int) -> jax.Array:
    """-log(-log(u)) with u = (bits + 0.5) / 2^32, in float32 without losing the tail:
    for u >= 1/2, -log(u) is computed as -log1p(-(1 - u)) with 1 - u formed from the
    integer 2^32 - 1 - bits, so u close to 1 does not round to 1 (which would give +inf)."""
    x = noise_bits(seed_lo, seed_hi, position, vocab)
    scale = 1.0 / 4294967296.0
    upper = x >= _u32(0x80000000)
    u = (x.astype(jnp.float32) + 0.5) * scale
    w = ((_u32(0xFFFFFFFF) - x).astype(jnp.float32) + 0.5) * scale  # 1 - u
    e = jnp.where(upper, -jnp.log1p(-w), -jnp.log(u))
    return -jnp.log(e)


# ---------------------------------------------------------------- logits processors


def apply_penalties(logits: jax.Array, history: jax.Array, m: SamplingMetadata) -> jax.Array:
    """Repetition (tokens seen in the prompt or the output: positive logits divided,
    others multiplied), then frequency (x count in the output) and presence (x seen in
    the output) subtracted."""
    S, V = logits.shape
    rows = jnp.arange(S)[:, None]
    pos = jnp.arange(history.shape[1], dtype=jnp.int32)[None, :]
    in_hist = pos < m.position[:, None]
    in_out = in_hist & (pos >= m.prompt_len[:, None])
    counts = jnp.zeros((S, V), jnp.float32).at[rows, history].add(in_out.astype(jnp.float32), mode="drop")
    seen = jnp.zeros((S, V), jnp.bool_).at[rows, history].max(in_hist, mode="drop")
    rp = m.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - m.frequency[:, None] * counts - m.presence[:, None] * (counts > 0)


def apply_min_p_top_k_top_p(x: jax.Array, m: SamplingMetadata) -> jax.Array:
    """Mask (to -inf) tokens outside each row's min-p set, then its top-k and nucleus."""
    S, V = x.shape
    probs = jax.nn.softmax(x, axis=-1)
    keep = probs >= m.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    x = jnp.where(keep, x, _NEG_INF)
    order = jnp.argsort(-x, axis=-1)
    srt = jnp.take_along_axis(x, order, axis=-1)
    ranks = jnp.arange(V, dtype=jnp.int32)[None, :]
    drop = ranks >= jnp.where(m.top_k > 0, m.top_k, V)[:, None]
    p = jax.nn.softmax(jnp.where(drop, _NEG_INF, srt), axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # mass strictly before this token
    drop = drop | ((before >= m.top_p[:, None]) & (m.top_p < 1.0)[:, None])  # rows without top-p keep their tail
    srt = jnp.where(drop, _NEG_INF, srt)
    return jnp.zeros_like(x).at[jnp.arange(S)[:, None], order].set(srt)


def sample(logits: jax.Array, m: SamplingMetadata, history: Callable[[], jax.Array] | None = None, *,
           random: bool = True, filters: bool = True, penalties: bool = True) -> jax.Array:
    """logits [S, V] float32 -> token ids [S] int32.

    The flags are static (the host knows them when it builds the batch, as the torch
    sampler's `all_greedy` / `any_top_k` ...): a greedy-only batch compiles to an argmax,
    with no sort, no noise and no branch on the device. A row without a feature is
    unchanged by it (top_k 0, top_p 1, min_p 0, penalties neutral), so a flag only has
    to be set when some row needs it. `history()` -> [S, W]: each row's token history."""
    S, V = logits.shape
    if penalties and history is not None:
        logits = apply_penalties(logits, history(), m)
    logits = logits.at[jnp.arange(S)[:, None], m.bias_ids].add(m.bias_val)
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not random:
        return greedy_tok
    greedy = m.temperature <= 0.0
    x = logits / jnp.where(greedy, 1.0, m.temperature)[:, None]
    if filters:
        x = apply_min_p_top_k_top_p(x, m)
    rand_tok = jnp.argmax(x + gumbel_noise(m.seed_lo, m.seed_hi, m.position, V), axis=-1).astype(jnp.int32)
    return jnp.where(greedy, greedy_tok, rand_tok)
