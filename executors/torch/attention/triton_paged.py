"""Paged attention in Triton for CUDA: a split-K decode kernel and a varlen kernel.

Both read K/V through block tables from any paged layout with a unit stride on the
head dim: the caller passes `k_cache`, `v_cache` as 3- or 4-d views indexed
[block, offset in block, kv head, dim] (e.g. `cache[..., 0::2, :]` for a layout with
K and V interleaved on the head axis); only their strides are used.

- `paged_decode_attention`: one query token per request (decode-only steps, the CUDA
  graph path). Grid (requests, kv heads, splits): each program handles the G = Hq/Hkv
  query heads of one KV head (GQA packed into the rows of one `tl.dot`) over one
  chunk of the context (flash-decoding). The split count is a function of the batch
  size only, so a graph captured for a batch size stays valid for any sequence
  lengths; the chunk size is computed on the device from each request's length. With
  more than one split a second small kernel merges the partial softmaxes.
- `paged_varlen_attention`: any mix of prefill chunks and decodes (causal, over the
  cached prefix and this step's tokens, which must already be in the cache). Grid
  (query tiles, kv heads); a tile is up to BLOCK_Q consecutive query tokens of one
  request times the G heads of one KV head. The tile -> request map is built on the
  host from the query lengths (`varlen_tiles`).

Kernels accumulate in float32; inputs may be fp16/bf16/fp32. The two decode kernels
follow fused_ops' opt-in PDL switch (`fused_ops.pdl_kwargs`); the varlen kernel does not
(mixed steps run eagerly, where launch latency is not the cost).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from aiosched.executors.torch.fused_ops import pdl_kwargs

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the module imports, the kernels are unavailable
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

_LOG2E = 1.4426950408889634


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_decode_splits(batch: int, num_kv_heads: int, num_sms: int = 132, max_splits: int = 16) -> int:
    """Splits of the context per (request, kv head): enough programs to fill the SMs twice."""
    return max(1, min(max_splits, (2 * num_sms) // max(1, batch * num_kv_heads)))


if HAVE_TRITON:
    from aiosched.executors.torch.fused_ops import _pdl_prologue

    @triton.jit
    def _softcap(s, cap):
        """cap * tanh(s / cap), tanh(u) = 2 sigmoid(2u) - 1 (Gemma 2's attention soft-capping)."""
        return cap * (2.0 * tl.sigmoid(2.0 * s / cap) - 1.0)

    @triton.jit
    def _split_bounds(lens_ptr, rows_ptr, b, sp, window, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      HAS_ROWS: tl.constexpr, HAS_WINDOW: tl.constexpr):
        """Request b's block-table row and split sp's key range [start, end): the context in
        NUM_SPLITS chunks of whole BLOCK_N tiles, computed on the device from its length."""
        seq_len = tl.load(lens_ptr + b)
        if HAS_ROWS:  # block-table row of each request (persistent tables indexed by request slot)
            bt_row = tl.load(rows_ptr + b).to(tl.int64)
        else:
            bt_row = b
        chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = sp * chunk
        end = tl.minimum(start + chunk, seq_len)
        if HAS_WINDOW:  # the query (at seq_len - 1) sees keys >= seq_len - window only; a split may see none
            start = tl.maximum(start, seq_len - window)
        return bt_row, start, end

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, rows_ptr, out_ptr, part_ptr, ml_ptr,
        sm_scale, window, softcap,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_bt,
        stride_ob, stride_oh,
        G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr, PREC: tl.constexpr,
        HAS_WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False, HEADS_FAST: tl.constexpr = False,
        PDL: tl.constexpr = False,
    ):
        _pdl_prologue(PDL)  # before the first read (q, lens: the previous kernels' outputs)
        if HEADS_FAST:  # grid (kv heads, requests, splits): neighbours read neighbouring heads of the same tokens
            kvh = tl.program_id(0)
            b = tl.program_id(1)
        else:
            b = tl.program_id(0)
            kvh = tl.program_id(1)
        sp = tl.program_id(2)
        bt_row, start, end = _split_bounds(lens_ptr, rows_ptr, b, sp, window, BLOCK_N, NUM_SPLITS, HAS_ROWS, HAS_WINDOW)

        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < G
        heads = kvh * G + offs_h
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
        qk_scale = sm_scale * 1.4426950408889634

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            blk = tl.load(bt_ptr + bt_row * stride_bt + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
            off = offs_n % PAGE
            k = tl.load(k_ptr + blk[None, :] * stride_kb + off[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                        mask=nmask[None, :], other=0.0)  # [D, BLOCK_N]
            if SOFTCAP:
                s = _softcap(tl.dot(q, k.to(q.dtype), input_precision=PREC).to(tl.float32) * sm_scale, softcap) * 1.4426950408889634
            else:
                s = tl.dot(q, k.to(q.dtype), input_precision=PREC).to(tl.float32) * qk_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if HAS_WINDOW:  # a split whose keys are all outside the window: m stays -inf, nothing added
                m_new_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            else:
                m_new_safe = m_new
            alpha = tl.exp2(m_i - m_new_safe)
            p = tl.exp2(s - m_new_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                        mask=nmask[:, None], other=0.0)  # [BLOCK_N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC).to(tl.float32)
            m_i = m_new

        if NUM_SPLITS == 1:
            o = acc / l_i[:, None]
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
        else:
            # partials: [B, Hq, NUM_SPLITS, D] and (m, l): [B, Hq, NUM_SPLITS, 2], contiguous
            num_kv = tl.num_programs(0) if HEADS_FAST else tl.num_programs(1)
            row = (b * (G * num_kv) + heads) * NUM_SPLITS + sp
            tl.store(part_ptr + row[:, None] * D + offs_d[None, :], acc, mask=hmask[:, None])
            tl.store(ml_ptr + row * 2, m_i, mask=hmask)
            tl.store(ml_ptr + row * 2 + 1, l_i, mask=hmask)

    @triton.jit
    def _decode_all_heads_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, rows_ptr, out_ptr, part_ptr, ml_ptr,
        sm_scale, window, softcap,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_bt,
        stride_ob, stride_oh,
        HKV: tl.constexpr, BLOCK_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr, PREC: tl.constexpr,
        HAS_WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False, PDL: tl.constexpr = False,
    ):
        """`_decode_kernel` with every kv head of a request in one program (grid (requests,
        splits)): a tile loads BLOCK_N tokens' whole K (and V) rows, all kv heads side by
        side ([kv heads, D, tokens]: one contiguous Hkv * D run per token in the runner's
        layout, against one D-long run per program there), and the scores of each kv
        head's G query heads are one batched `tl.dot` over the kv-head axis. Same online
        softmax, same partials layout for the merge kernel."""
        _pdl_prologue(PDL)
        b = tl.program_id(0)
        sp = tl.program_id(1)
        bt_row, start, end = _split_bounds(lens_ptr, rows_ptr, b, sp, window, BLOCK_N, NUM_SPLITS, HAS_ROWS, HAS_WINDOW)

        offs_kv = tl.arange(0, BLOCK_KV)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        kvmask = offs_kv < HKV
        heads = offs_kv[:, None] * G + offs_g[None, :]  # [BLOCK_KV, BLOCK_G] query head numbers
        hmask = kvmask[:, None] & (offs_g < G)[None, :]
        q = tl.load(q_ptr + b * stride_qb + heads[:, :, None] * stride_qh + offs_d[None, None, :], mask=hmask[:, :, None], other=0.0)
        qk_scale = sm_scale * 1.4426950408889634

        m_i = tl.full([BLOCK_KV, BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_KV, BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_KV, BLOCK_G, D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            blk = tl.load(bt_ptr + bt_row * stride_bt + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
            off = offs_n % PAGE
            kmask = kvmask[:, None, None] & nmask[None, None, :]
            k = tl.load(k_ptr + (blk * stride_kb + off * stride_kt)[None, None, :] + offs_kv[:, None, None] * stride_kh
                        + offs_d[None, :, None], mask=kmask, other=0.0)  # [BLOCK_KV, D, BLOCK_N]
            if SOFTCAP:
                s = _softcap(tl.dot(q, k.to(q.dtype), input_precision=PREC).to(tl.float32) * sm_scale, softcap) * 1.4426950408889634
            else:
                s = tl.dot(q, k.to(q.dtype), input_precision=PREC).to(tl.float32) * qk_scale  # [BLOCK_KV, BLOCK_G, BLOCK_N]
            s = tl.where(nmask[None, None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 2))
            if HAS_WINDOW:
                m_new_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            else:
                m_new_safe = m_new
            alpha = tl.exp2(m_i - m_new_safe)
            p = tl.exp2(s - m_new_safe[:, :, None])
            l_i = l_i * alpha + tl.sum(p, 2)
            vmask = kvmask[:, None, None] & nmask[None, :, None]
            v = tl.load(v_ptr + (blk * stride_vb + off * stride_vt)[None, :, None] + offs_kv[:, None, None] * stride_vh
                        + offs_d[None, None, :], mask=vmask, other=0.0)  # [BLOCK_KV, BLOCK_N, D]
            acc = acc * alpha[:, :, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC).to(tl.float32)
            m_i = m_new

        if NUM_SPLITS == 1:
            o = acc / l_i[:, :, None]
            tl.store(out_ptr + b * stride_ob + heads[:, :, None] * stride_oh + offs_d[None, None, :], o.to(out_ptr.dtype.element_ty),
                     mask=hmask[:, :, None])
        else:
            row = (b * (G * HKV) + heads) * NUM_SPLITS + sp  # the merge kernel's layout, as `_decode_kernel`
            tl.store(part_ptr + row[:, :, None] * D + offs_d[None, None, :], acc, mask=hmask[:, :, None])
            tl.store(ml_ptr + row * 2, m_i, mask=hmask)
            tl.store(ml_ptr + row * 2 + 1, l_i, mask=hmask)

    @triton.jit
    def _decode_reduce_kernel(part_ptr, ml_ptr, out_ptr, stride_ob, stride_oh,
                              D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_prologue(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        nh = tl.num_programs(1)
        offs_s = tl.arange(0, BLOCK_S)
        smask = offs_s < NUM_SPLITS
        offs_d = tl.arange(0, D)
        row = (b * nh + h) * NUM_SPLITS + offs_s
        m = tl.load(ml_ptr + row * 2, mask=smask, other=float("-inf"))
        l = tl.load(ml_ptr + row * 2 + 1, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
        acc = tl.load(part_ptr + row[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _varlen_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, cuq_ptr, tiles_ptr, rows_ptr, out_ptr,
        sm_scale, window, softcap,
        stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_bt,
        stride_ot, stride_oh,
        G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr, HAS_ROWS: tl.constexpr, PREC: tl.constexpr,
        HAS_WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    ):
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        r = tl.load(tiles_ptr + tile * 2)
        if HAS_ROWS:
            bt_row = tl.load(rows_ptr + r).to(tl.int64)
        else:
            bt_row = r.to(tl.int64)
        q0 = tl.load(tiles_ptr + tile * 2 + 1)  # first query of the tile, relative to the request
        q_start = tl.load(cuq_ptr + r)
        q_len = tl.load(cuq_ptr + r + 1) - q_start
        seq_len = tl.load(lens_ptr + r)
        ctx = seq_len - q_len  # tokens before this step's queries

        rows = tl.arange(0, BLOCK_M)
        qi = q0 + rows // G
        head = kvh * G + rows % G
        rmask = (qi < q_len) & (rows < BLOCK_Q * G)
        offs_d = tl.arange(0, D)
        tok = (q_start + qi).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=rmask[:, None], other=0.0)
        qpos = ctx + qi  # absolute position of each row's query
        qk_scale = sm_scale * 1.4426950408889634

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        last = tl.minimum(ctx + q0 + BLOCK_Q, seq_len)  # keys beyond the tile's last query are masked anyway
        first = 0
        if HAS_WINDOW:  # keys before the tile's first query's window are masked for every row
            first = tl.maximum(ctx + q0 + 1 - window, 0)
        for n0 in range(first, last, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < last
            blk = tl.load(bt_ptr + bt_row * stride_bt + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
            off = offs_n % PAGE
            k = tl.load(k_ptr + blk[None, :] * stride_kb + off[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                        mask=nmask[None, :], other=0.0)
            if SOFTCAP:
                s = _softcap(tl.dot(q, k.to(q.dtype), input_precision=PREC).to(tl.float32) * sm_scale, softcap) * 1.4426950408889634
            else:
                s = tl.dot(q, k.to(q.dtype), input_precision=PREC).to(tl.float32) * qk_scale
            causal = (offs_n[None, :] <= qpos[:, None]) & nmask[None, :]
            if HAS_WINDOW:
                causal = causal & (offs_n[None, :] > qpos[:, None] - window)
            s = tl.where(causal, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with no key yet (masked rows)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                        mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC).to(tl.float32)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None])


def _kv_strides(cache: torch.Tensor) -> tuple[int, int, int]:
    if cache.dim() != 4 or cache.stride(-1) != 1:
        raise ValueError("kv cache view must be [blocks, block_size, kv_heads, head_dim] with a unit stride on head_dim")
    return cache.stride(0), cache.stride(1), cache.stride(2)


class DecodeWorkspace:
    """Preallocated split-K partials for up to `max_batch` requests (graph-safe: no allocation per call)."""

    def __init__(self, max_batch: int, num_heads: int, head_dim: int, max_splits: int, device: Any) -> None:
        self.part = torch.empty(max_batch * num_heads * max_splits * head_dim, dtype=torch.float32, device=device)
        self.ml = torch.empty(max_batch * num_heads * max_splits * 2, dtype=torch.float32, device=device)
        self.max_batch, self.num_heads, self.max_splits = max_batch, num_heads, max_splits


class DecodeConfig(NamedTuple):
    """Launch shape of the decode kernel (benchmarks/attention_tune.py sweeps these)."""
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2
    heads_fast: bool = False  # grid (kv heads, requests, splits) instead of (requests, kv heads, splits)
    all_heads: bool = False  # grid (requests, splits): every kv head of a request in one program (`heads_fast` unused)


# The all-heads grid (one program per request and split) from this batch size on; None: never.
# Measured on two H100s (attention_tune --quick, 300-token context): at batch 256 one program
# per request reads the KV at 2.76-2.78 TB/s against 2.55-2.65 per kv head (0.92-0.96x per
# layer call; the decode step 2.518 -> 2.446 ms, 2026-12-08), at batch 64 (four splits) it
# loses (21.6 vs 19.5 us). From 160 on it runs one split (programs = requests >= the SMs), the
# regime measured at 256. Not yet measured on an H200. AIOSCHED_ATTN_ALL_HEADS=N (or "off"),
# or `set_all_heads_min_batch(N)` before graphs are captured (a graph keeps the launch it captured).
ALL_HEADS_DEFAULT_MIN_BATCH = 160


def _all_heads_from_env(value: str | None) -> int | None:
    if value is None or value == "":
        return ALL_HEADS_DEFAULT_MIN_BATCH
    if value.lower() in ("off", "none", "never"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"AIOSCHED_ATTN_ALL_HEADS: a batch size or 'off', got {value!r}") from None


_ALL_HEADS_MIN_BATCH: int | None = _all_heads_from_env(os.environ.get("AIOSCHED_ATTN_ALL_HEADS"))
ALL_HEADS_CONFIG = DecodeConfig(16, 4, 3, all_heads=True)  # attention_tune --quick, H100, batch 256: 57.2 us vs 59.5 per kv head


def set_all_heads_min_batch(n: int | None) -> None:
    global _ALL_HEADS_MIN_BATCH
    _ALL_HEADS_MIN_BATCH = n


def uses_all_heads(batch: int) -> bool:
    return _ALL_HEADS_MIN_BATCH is not None and batch >= _ALL_HEADS_MIN_BATCH


def default_decode_config(num_splits: int) -> DecodeConfig:
    """Unsplit (large batches, the KV-bound case): 64-token tiles and the kv heads of a request
    on neighbouring programs, so that together they read each token's K/V rows whole. On the
    H200 at batch 256 / 300-token context this reads the KV at 3.53 TB/s against 3.00 for
    (32, 4, 2, requests first) (benchmarks/attention_tune.py, 2026-12-03). Split (small
    batches, latency-bound): no config beat the (32, 4, 2) tile at batch 1 or 3."""
    return DecodeConfig(64, 4, 2, True) if num_splits == 1 else DecodeConfig()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None, num_splits: int | None = None,
                           workspace: DecodeWorkspace | None = None, rows: torch.Tensor | None = None,
                           window: int | None = None, softcap: float | None = None,
                           config: DecodeConfig | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one token per request; its K/V already written) -> out [B, Hq, D].

    block_tables: [B, max_blocks], or with `rows` [B] any [R, max_blocks] table whose row
    rows[b] belongs to request b (persistent per-slot tables: nothing gathered per step).
    window: only the last `window` keys (HF's sliding window); softcap: scores bounded to
    cap * tanh(s / cap) (both as `torch_paged.paged_attention`)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    page = k_cache.shape[1]
    if Hq % Hkv or D & (D - 1) or D < 16:
        raise ValueError(f"unsupported shape: {Hq} heads over {Hkv} kv heads, head_dim {D}")
    G = Hq // Hkv
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    all_heads = config.all_heads if config is not None else uses_all_heads(B)
    if num_splits is None:  # a function of the batch size only: a captured graph stays valid
        num_splits = num_decode_splits(B, 1 if all_heads else Hkv, _num_sms(q.device))
    sk = _kv_strides(k_cache)
    sv = _kv_strides(v_cache)
    if num_splits > 1:
        if workspace is not None and B <= workspace.max_batch and Hq == workspace.num_heads and num_splits <= workspace.max_splits:
            part, ml = workspace.part, workspace.ml
        else:
            part = torch.empty(B * Hq * num_splits * D, dtype=torch.float32, device=q.device)
            ml = torch.empty(B * Hq * num_splits * 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = out  # unused
    cfg = config or (ALL_HEADS_CONFIG if all_heads else default_decode_config(num_splits))
    if cfg.all_heads:
        _decode_all_heads_kernel[(B, num_splits)](
            q, k_cache, v_cache, block_tables, seq_lens, rows if rows is not None else seq_lens, out, part, ml, scale,
            window or 0, softcap or 1.0,
            q.stride(0), q.stride(1), *sk, *sv, block_tables.stride(0), out.stride(0), out.stride(1),
            HKV=Hkv, BLOCK_KV=_next_pow2(Hkv), G=G, BLOCK_G=max(16, _next_pow2(G)), D=D, BLOCK_N=cfg.block_n, PAGE=page,
            NUM_SPLITS=num_splits, HAS_ROWS=rows is not None, PREC=_prec(q), HAS_WINDOW=window is not None,
            SOFTCAP=softcap is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kwargs(q.device),
        )
    else:
        _decode_one_head(q, k_cache, v_cache, block_tables, seq_lens, rows, out, part, ml, scale, window, softcap, sk, sv,
                         G, D, page, num_splits, cfg)
    if num_splits > 1:
        _decode_reduce_kernel[(B, Hq)](part, ml, out, out.stride(0), out.stride(1), D=D, NUM_SPLITS=num_splits,
                                       BLOCK_S=_next_pow2(num_splits), num_warps=1,
                                       **pdl_kwargs(q.device))
    return out


def _decode_one_head(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, rows: torch.Tensor | None, out: torch.Tensor, part: torch.Tensor, ml: torch.Tensor,
                     scale: float, window: int | None, softcap: float | None, sk: tuple[int, int, int], sv: tuple[int, int, int],
                     G: int, D: int, page: int, num_splits: int, cfg: DecodeConfig) -> None:
    """`_decode_kernel`'s launch: one program per (request, kv head, split)."""
    B, Hkv = q.shape[0], k_cache.shape[2]
    grid = (Hkv, B, num_splits) if cfg.heads_fast else (B, Hkv, num_splits)
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, rows if rows is not None else seq_lens, out, part, ml, scale,
        window or 0, softcap or 1.0,
        q.stride(0), q.stride(1), *sk, *sv, block_tables.stride(0), out.stride(0), out.stride(1),
        G=G, BLOCK_H=max(16, _next_pow2(G)), D=D, BLOCK_N=cfg.block_n, PAGE=page, NUM_SPLITS=num_splits,
        HAS_ROWS=rows is not None, PREC=_prec(q), HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
        HEADS_FAST=cfg.heads_fast, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kwargs(q.device),
    )


def varlen_tiles(query_lens: list[int], block_q: int) -> list[int]:
    """Flat [request, first query] pairs of every query tile (host side)."""
    tiles: list[int] = []
    for r, n in enumerate(query_lens):
        for q0 in range(0, n, block_q):
            tiles += (r, q0)
    return tiles


def varlen_block_q(num_q_heads: int, num_kv_heads: int, max_query_len: int) -> int:
    """Query tokens per tile: 64 rows per tile for prefill, one token for decode-only."""
    G = num_q_heads // num_kv_heads
    if max_query_len <= 1:
        return 1
    return max(1, 64 // G) if G <= 64 else 1


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, cu_query_lens: torch.Tensor, tiles: torch.Tensor, block_q: int, scale: float,
                           out: torch.Tensor | None = None, block_n: int = 64, rows: torch.Tensor | None = None,
                           num_tiles: int | None = None, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [T, Hq, D] (all requests' query tokens, packed) -> out [T, Hq, D]; window / softcap as
    `paged_decode_attention`.

    seq_lens[r]: request r's tokens in the cache after this step (context + its queries);
    cu_query_lens [R + 1]; tiles: int32 flat pairs from `varlen_tiles(query_lens, block_q)`."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    if out is None:
        out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    if num_tiles is None:
        num_tiles = tiles.numel() // 2
    if num_tiles == 0:
        return out
    block_m = max(16, _next_pow2(block_q * G))
    _varlen_kernel[(num_tiles, Hkv)](
        q, k_cache, v_cache, block_tables, seq_lens, cu_query_lens, tiles, rows if rows is not None else seq_lens, out, scale,
        window or 0, softcap or 1.0,
        q.stride(0), q.stride(1), *_kv_strides(k_cache), *_kv_strides(v_cache), block_tables.stride(0), out.stride(0), out.stride(1),
        G=G, BLOCK_Q=block_q, BLOCK_M=block_m, D=D, BLOCK_N=block_n, PAGE=k_cache.shape[1],
        HAS_ROWS=rows is not None, PREC=_prec(q), HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
        num_warps=4, num_stages=2,
    )
    return out


def _prec(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 exact; bf16/fp16 ignore it


_SMS: dict[Any, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


# ---------------------------------------------------------------- float32 reference (tests)


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                              seq_lens: list[int], query_lens: list[int], scale: float, window: int | None = None,
                              softcap: float | None = None) -> torch.Tensor:
    """Causal attention in float32, request by request, gathering K/V through the block tables
    (window and softcap as HF applies them)."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    page = k_cache.shape[1]
    G = Hq // Hkv
    out = torch.empty(T, Hq, D, dtype=torch.float32, device=q.device)
    t = 0
    for r, (L, n) in enumerate(zip(seq_lens, query_lens)):
        pos = torch.arange(L, device=q.device)
        blocks = block_tables[r, pos // page].long()
        k = k_cache[blocks, pos % page].float()  # [L, Hkv, D]
        v = v_cache[blocks, pos % page].float()
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
        qr = q[t:t + n].float()  # [n, Hq, D]
        s = torch.einsum("qhd,khd->hqk", qr, k) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        qpos = torch.arange(L - n, L, device=q.device)
        hidden = pos[None, None, :] > qpos[None, :, None]
        if window is not None:
            hidden = hidden | (pos[None, None, :] <= qpos[None, :, None] - window)
        s = s.masked_fill(hidden, float("-inf"))
        out[t:t + n] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
        t += n
    return out

