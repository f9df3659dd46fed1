"""Paged attention over a ragged batch, in portable `jax.numpy`, plus a TPU kernel hook.

The batch is flat: T tokens (padded to a bucket), each request's tokens contiguous.
Attention is computed per *query tile*: a tile holds up to Qt consecutive query tokens
of one request (Qt = 1 for decode-only steps), and reads that request's KV blocks
through its block table. So a long prefill becomes several tiles and a decode one
tile of one row: the work is ~ tiles x Qt x (blocks x block_size), never
(all tokens) x (all requests' keys).

KV cache layout (per layer): [num_blocks, block_size, 2 * kv_heads, head_dim], K and V
interleaved on the head axis (K at even, V at odd). With stacked layers there is a
leading [L] axis and `layer` is an index (traced under `lax.scan`); unrolled layers
pass `layer=None` and a per-layer array. The last block is scratch: padded tokens
write there and padded block-table entries point there.

`select_attention()` picks the implementation. On TPU (`jax.devices()[0].platform ==
"tpu"`) it returns an adapter around the Pallas ragged paged attention kernel
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`, imported lazily, only
there); everywhere else (CPU, GPU) the portable `paged_attention` below. The TPU path
is never exercised on CPU/GPU and is untested here.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

_MASK = -1e30


class AttentionMetadata(NamedTuple):
    """Device arrays describing one step's ragged batch (all int32)."""

    slot_block: jax.Array  # [T] block each token's K/V is written to (scratch for padding)
    slot_offset: jax.Array  # [T] offset inside that block
    tile_token: jax.Array  # [NT, Qt] flat token index of each tile row (0 for empty rows)
    tile_pos: jax.Array  # [NT, Qt] query position of each row; -1 for empty rows
    tile_blocks: jax.Array  # [NT, P] the tile's request block table (scratch-padded)
    token_row: jax.Array  # [T] index of each token's row in the flattened [NT * Qt] tiles
    # Per-request view (for kernels that take ragged metadata directly, e.g. Pallas TPU):
    req_blocks: jax.Array  # [R, P] block table of each request (scratch-padded)
    req_kv_len: jax.Array  # [R] tokens in the cache after this step (0 for padding)
    cu_q_len: jax.Array  # [R + 1] cumulative query lengths
    num_reqs: jax.Array  # [1]


def write_kv(cache: jax.Array, layer: Any, k: jax.Array, v: jax.Array, meta: AttentionMetadata) -> jax.Array:
    """Scatter this step's K/V [T, kv_heads, D] into their slots (in place under donation)."""
    T, Hkv, D = k.shape
    kv = jnp.stack([k, v], axis=2).reshape(T, 2 * Hkv, D).astype(cache.dtype)
    if layer is None:
        return cache.at[meta.slot_block, meta.slot_offset].set(kv, mode="promise_in_bounds")
    return cache.at[layer, meta.slot_block, meta.slot_offset].set(kv, mode="promise_in_bounds")


def paged_attention(q: jax.Array, cache: jax.Array, layer: Any, meta: AttentionMetadata, *, scale: float,
                    window: Any = None, softcap: float | None = None) -> jax.Array:
    """Causal attention of q [T, Hq, D] over each request's cached keys (this step's included);
    with `window` (an int or a traced per-layer scalar), only the last `window` keys up to the
    query's own (HF's sliding window); `softcap` bounds the scores to cap * tanh(s / cap) (Gemma 2)."""
    T, Hq, D = q.shape
    NT, Qt = meta.tile_token.shape
    pages = cache[meta.tile_blocks] if layer is None else cache[layer, meta.tile_blocks]  # [NT, P, BS, 2Hkv, D]
    _, P, BS, H2, _ = pages.shape
    Hkv = H2 // 2
    G = Hq // Hkv
    K = P * BS
    pages = pages.reshape(NT, K, H2, D)
    k, v = pages[:, :, 0::2], pages[:, :, 1::2]  # [NT, K, Hkv, D]
    qt = q[meta.tile_token].reshape(NT, Qt, Hkv, G, D)
    s = jnp.einsum("nqhgd,nkhd->nhgqk", qt, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    kpos = jnp.arange(K, dtype=jnp.int32)[None, None, :]
    mask = kpos <= meta.tile_pos[:, :, None]  # [NT, Qt, K]
    if window is not None:
        mask &= kpos > meta.tile_pos[:, :, None] - window
    s = jnp.where(mask[:, None, None], s, _MASK)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    o = jnp.einsum("nhgqk,nkhd->nqhgd", p, v.astype(q.dtype))
    return o.reshape(NT * Qt, Hq, D)[meta.token_row]


def _pallas_tpu_attention(q: jax.Array, cache: jax.Array, layer: Any, meta: AttentionMetadata, *, scale: float,
                          window: Any = None, softcap: float | None = None) -> jax.Array:
    """TPU only: the Pallas ragged paged attention kernel over the per-layer cache."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    # The kernel's sliding_window / soft_cap conventions are untested against HF's: refused, not guessed.
    if window is not None:
        raise ValueError("config.json: sliding_window is not supported by the jax runner's TPU attention kernel")
    if softcap is not None:
        raise ValueError("config.json: attn_logit_softcapping is not supported by the jax runner's TPU attention kernel")

    if layer is not None:  # a stacked cache would need a per-layer copy: use unrolled layers on TPU
        cache = cache[layer]
    return ragged_paged_attention(q, cache, meta.req_kv_len, meta.req_blocks, meta.cu_q_len, meta.num_reqs, sm_scale=scale)


def select_attention(platform: str | None = None) -> tuple[str, Callable[..., jax.Array]]:
    """(name, fn): the Pallas kernel on TPU, the portable jnp implementation elsewhere."""
    platform = platform or jax.devices()[0].platform
    if platform == "tpu":
        return "pallas-tpu-ragged-paged", _pallas_tpu_attention
    return "jnp-paged", paged_attention
