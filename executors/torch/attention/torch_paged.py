"""Paged attention on the CPU: the tested reference, and the path the CPU runner uses.

Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]. A request's
token at position p lives in slot block_table[p // block_size] * block_size + p % block_size.
`store_kv` writes the whole batch's new K/V before any request reads the cache, so two
requests sharing prefix blocks in one step (the second reading what the first writes)
see the same values a later step would.

Two implementations, equal on every input (tests/test_paged_attention.py):
- the C kernel (attention/cpu_kernel.py) for float32 on the CPU: it walks the block
  tables and reads each K/V row in place, once; GQA by grouping the query heads of a KV
  head, never by expanding K/V. Built at first use and cached.
- plain torch, everywhere else (other dtypes, other devices, no compiler): gathers each
  request's blocks, then matmuls. Clear, and the fallback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from aiosched.executors.torch.attention import cpu_kernel

_Q_TILE = 16  # prefill query tokens per kernel work item: a [16 * groups, context] score tile stays in cache


@dataclass
class DeviceAttention:
    """The step as the Triton kernels read it (executors/torch/attention/triton_paged.py):
    device tensors only, so a CUDA graph can replay it. Built by the input batch."""

    block_table: torch.Tensor  # [slots, max_blocks] persistent, one row per request slot
    rows: torch.Tensor  # [R] each request's row of block_table
    seq_lens: torch.Tensor  # [R] tokens in context after this step
    cu_query_lens: torch.Tensor  # [R + 1]
    tiles: torch.Tensor  # [2 * num_tiles] (request, first query) pairs (varlen kernel)
    num_tiles: int
    block_q: int
    decode: bool  # one query per request: the split-K decode kernel
    workspace: Any = None  # the decode kernel's preallocated partials

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        from aiosched.executors.torch.attention import triton_paged as tp

        if self.decode:
            return tp.paged_decode_attention(q, k_cache, v_cache, self.block_table, self.seq_lens, scale,
                                             workspace=self.workspace, rows=self.rows)
        return tp.paged_varlen_attention(q, k_cache, v_cache, self.block_table, self.seq_lens, self.cu_query_lens, self.tiles,
                                         self.block_q, scale, rows=self.rows, num_tiles=self.num_tiles)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: a padding token, no write)
    query_start_loc: list[int]  # [B + 1] host ints: request i's tokens are [qsl[i], qsl[i+1])
    seq_lens: list[int]  # [B] tokens in context after this step (cached + new)
    block_tables: list[list[int]]  # [B] host block ids
    block_size: int
    # Device copies for kernels (filled by the runner when a kernel backend needs them).
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    # fused: the layers take the fused CUDA ops (executors/torch/fused_ops.py); device: the
    # Triton kernels' view of the step (None: the host lists above, for the CPU paths).
    # A padded step (CUDA graphs) has only the device view: its host lists are empty.
    fused: bool = False
    device: DeviceAttention | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: list[int], seq_len: int) -> torch.Tensor:
    """[seq_len, kv_heads, head_dim] for one request, read through its block table."""
    bs = cache.shape[1]
    nblocks = -(-seq_len // bs)
    idx = torch.tensor(block_table[:nblocks], device=cache.device)
    return cache.index_select(0, idx).flatten(0, 1)[:seq_len]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of each request's new queries over its whole cached context.

    q: [T, Hq, D] -> [T, Hq, D]. Query j of request i sits at position
    seq_len - q_len + j and sees keys at positions <= its own; with `window`, only the
    last `window` of them (HF's sliding window). `softcap` bounds the scores to
    cap * tanh(s / cap) before the mask (Gemma 2). The C kernel covers neither: such
    layers take the torch path, and so do they on a step with Triton kernels."""
    if meta.device is not None and window is None and softcap is None:
        return meta.device.attend(q, k_cache, v_cache, scale)
    if not meta.seq_lens:
        raise ValueError("paged attention: a padded (CUDA graph) step has no host block tables; "
                         "sliding-window and soft-capped layers need the eager step")
    if window is None and softcap is None and kernel_applies(q, k_cache, v_cache) and (lib := cpu_kernel.load()) is not None:
        return _kernel_attention(lib, q, k_cache, v_cache, meta, scale)
    return torch_paged_attention(q, k_cache, v_cache, meta, scale, window, softcap)


def kernel_applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The C kernel's domain: float32 tensors in host memory with the cache laid out contiguously."""
    return (q.device.type == "cpu" and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
            and k_cache.is_contiguous() and v_cache.is_contiguous() and q.shape[1] % k_cache.shape[2] == 0)


def _kernel_inputs(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables (padded, int32), seq_lens and query_start_loc as host tensors: built by the
    first layer of a step and reused by the others (the metadata is per step)."""
    if "cpu_tables" not in meta.extra:
        width = max(1, max(-(-n // meta.block_size) for n in meta.seq_lens))
        flat: list[int] = []
        for t, n in zip(meta.block_tables, meta.seq_lens):
            used = t[: -(-n // meta.block_size)]
            flat += used + [0] * (width - len(used))
        meta.extra["cpu_tables"] = torch.tensor(flat, dtype=torch.int32).view(meta.num_reqs, width)
        meta.extra["cpu_seq_lens"] = torch.tensor(meta.seq_lens, dtype=torch.int64)
        meta.extra["cpu_qsl"] = torch.tensor(meta.query_start_loc, dtype=torch.int64)
    return meta.extra["cpu_tables"], meta.extra["cpu_seq_lens"], meta.extra["cpu_qsl"]


def _kernel_attention(lib, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    tables, seq_lens, qsl = _kernel_inputs(meta)
    q = q.contiguous()
    out = torch.empty_like(q)
    _, bs, hkv, d = k_cache.shape
    rc = lib.aiosched_paged_attention_f32(
        q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), seq_lens.data_ptr(),
        qsl.data_ptr(), meta.num_reqs, tables.shape[1], q.shape[1], hkv, d, bs, scale, 0, _Q_TILE, cpu_kernel.threads())
    if rc != 0:
        raise MemoryError("paged attention (CPU kernel): out of memory for the score buffers")
    return out


def torch_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """The plain-torch path (any dtype and device)."""
    if len(q) == meta.num_reqs:  # decode-only step: one batched computation
        return _decode_attention(q, k_cache, v_cache, meta, scale, window, softcap)
    out = torch.empty_like(q)
    for i in range(meta.num_reqs):
        s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        k = gather_kv(k_cache, meta.block_tables[i], meta.seq_lens[i])
        v = gather_kv(v_cache, meta.block_tables[i], meta.seq_lens[i])
        out[s:e] = _causal_attention(q[s:e], k, v, scale, window, softcap)
    return out


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [q_len, Hq, D] at the last q_len positions of k/v: [seq_len, Hkv, D]; GQA by
    grouping the query heads (K/V are not expanded). Plain math in float32 (CPU SDPA picks
    a path that is ~1000x slower on these small shapes)."""
    q_len, seq_len, hkv = q.shape[0], k.shape[0], k.shape[1]
    qg = q.float().view(q_len, hkv, q.shape[1] // hkv, q.shape[2])
    scores = _capped(torch.einsum("qhgd,khd->hgqk", qg, k.float()) * scale, softcap)
    if q_len > 1 or window is not None:
        qpos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        kpos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        hidden = kpos > qpos
        if window is not None:
            hidden |= kpos <= qpos - window
        scores.masked_fill_(hidden, float("-inf"))
    out = torch.einsum("hgqk,khd->qhgd", scores.softmax(dim=-1), v.float())
    return out.reshape(q.shape).to(q.dtype)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                      window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One query per request: gather every request's blocks padded to the longest, mask the tail."""
    B, bs = meta.num_reqs, k_cache.shape[1]
    max_blocks = -(-max(meta.seq_lens) // bs)
    table = torch.tensor([t[:max_blocks] + [0] * (max_blocks - min(len(t), max_blocks)) for t in meta.block_tables], device=q.device)
    k = k_cache[table].flatten(1, 2).float()  # [B, L, Hkv, D]
    v = v_cache[table].flatten(1, 2).float()
    groups = q.shape[1] // k.shape[2]
    qg = q.float().view(B, k.shape[2], groups, q.shape[2])  # [B, Hkv, G, D]
    scores = _capped(torch.einsum("bhgd,blhd->bhgl", qg, k) * scale, softcap)
    lens = torch.tensor(meta.seq_lens, device=q.device).unsqueeze(1)
    kpos = torch.arange(k.shape[1], device=q.device).unsqueeze(0)
    pad = kpos >= lens  # [B, L]
    if window is not None:  # the query sits at lens - 1
        pad |= kpos <= lens - 1 - window
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,blhd->bhgd", scores.softmax(dim=-1), v)
    return out.reshape(B, q.shape[1], q.shape[2]).to(q.dtype)
