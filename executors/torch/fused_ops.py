"""Fused elementwise ops for the CUDA path (Triton), with plain-torch equivalents.

Each op here replaces several torch kernels (and their intermediates in device
memory) by one pass:
- `rms_norm(x, w, eps)`                      x -> x * rsqrt(mean(x^2) + eps) * w
- `add_rms_norm(x, residual, w, eps)`        residual += x; x = rms_norm(residual)   (in place, one read of each)
- `silu_and_mul(gate_up)`                    [T, 2I] -> silu(gate) * up              [T, I]
- `rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slots)`
  rotates q and k in place (rotate-half / NeoX layout, as HF Llama and Qwen) and
  writes k, v into their paged-cache slots (slot = block * block_size + offset; a
  negative slot skips the write, for padded rows).
- `step_inputs(d, T, tokens, block_table, block_size, ntok, ...)`: a packed step's input ids, clamped
  positions and KV slots, gathered from the device token buffer and block table in one
  launch (about ten small torch kernels otherwise, each a few microseconds of a decode step);
  with `ntok`, relative (speculative) rows get their positions and attention lengths
  from each row's token count on the device.
- `skinny_linear(x, w, out, norm_weight, epilogue)`: y = rms_norm?(x) @ w.T for a few rows
  (decode), the norm as prologue and store / residual add / SiLU*up as epilogue; per shape
  (`skinny_config`) a column tile and a K split (split-K: the last split of a tile to
  finish sums the fp32 partials in a preallocated workspace and applies the epilogue).

The Triton versions are used when the tensors are on a CUDA device and Triton is
importable (or TRITON_INTERPRET=1 for tests on CPU); `*_ref` are the torch versions.
Statistics are computed in float32 whatever the input dtype.

Programmatic Dependent Launch (Hopper+, on by default; AIOSCHED_PDL=0 or `set_pdl(False)`
turns it off): every decode-path kernel here and in attention/triton_paged.py is compiled
with PDL=True and launched with launch_pdl=True (`pdl_kwargs`, see the switch). Measured on
an H100 (2026-12-07, benchmarks/decode_step.py, graph replay): the decode step 0.97x at batch
1 and 256, 0.94x at batch 3, idle inside the batch-1 replay 5.2% -> 1.5%.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and (t.is_cuda or _INTERPRET)


# ---------------------------------------------------------------- Programmatic Dependent Launch (issue 21)
#
# With the switch on, each decode-path Triton kernel is launched with launch_pdl=True
# (Triton 3.6: the CUDA option `launch_pdl` puts CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
# on its cuLaunchKernelEx, triton/backends/nvidia/driver.py) and compiled with the constexpr
# PDL=True, which makes it run `_pdl_prologue` before it touches global memory:
# - griddepcontrol.wait (`gdc_wait`) blocks until the prerequisite grid (the previous kernel
#   in the stream) has completed and its memory is visible (PTX ISA, griddepcontrol; CUDA
#   Programming Guide 4.5, "Programmatic Dependent Launch and Synchronization",
#   docs.nvidia.com/cuda/cuda-programming-guide/04-special-topics/programmatic-dependent-launch.html).
#   It waits for completion, not for the trigger, so where a kernel triggers never affects
#   what the next one reads. When the kernel was not launched early (no PDL predecessor)
#   the wait returns at once; Triton's gdc.py: "safe to execute when programmatic dependent
#   launch is disabled".
# - griddepcontrol.launch_dependents (`gdc_launch_dependents`) lets the next PDL-launched
#   kernel be scheduled once every program of this one has issued it or exited; a kernel
#   that never issues it (cuBLAS, torch's own kernels) triggers implicitly at completion.
#   So the attribute on a launch after a non-PDL kernel only allows an overlap "if that
#   kernel requests the overlap" (CUDA driver API, CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION):
#   a cuBLAS GEMM between two Triton kernels just breaks the chain, the next launch behaves
#   like a normal one.
#   Completion is transitive: every kernel here waits before its first global access (reads
#   and writes: a write before the wait could clobber what the previous kernel still reads),
#   so kernel N's wait returning implies N-1 completed, which implied N-2 completed, etc.
# - CUDA graphs (executors/torch/cuda_graphs.py captures these launches): stream capture
#   keeps the attribute as a programmatic dependency edge between the two kernel nodes
#   (CUDA >= 12.3: graph edge data, cudaGraphKernelNodePortProgrammatic /
#   cudaGraphDependencyTypeProgrammatic; CUDA Programming Guide 4.2 "CUDA Graphs", edge
#   data: "the only use for non-default edge data is enabling Programmatic Dependent
#   Launch"; and the PDL section's "use in CUDA Graphs", via stream capture or edge data).
#   Measured on an H100: benchmarks/decode_step.py --no-pdl / --pdl (run_gpu.sh stage `pdl`).
# griddepcontrol is sm_90+ PTX, so devices before Hopper never get PDL=True; the
# interpreter has no inline asm (NotImplementedError), so TRITON_INTERPRET=1 forces the
# switch off. PDL=False compiles exactly the kernels of before.
_PDL = os.environ.get("AIOSCHED_PDL", "1") != "0"


def set_pdl(on: bool) -> None:
    """Turn PDL launches on or off (before building graphs: captured graphs keep their launches)."""
    global _PDL
    _PDL = bool(on)


def pdl_enabled() -> bool:
    """The switch as it applies: never under the interpreter."""
    return _PDL and HAVE_TRITON and not _INTERPRET


_PDL_CAPABLE: dict[int, bool] = {}


def _pdl_capable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_CAPABLE:
        _PDL_CAPABLE[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL_CAPABLE[idx]


def pdl_kwargs(device: torch.device) -> dict[str, bool]:
    """Extra launch keywords of a decode-path kernel on `device`: {} (today's launch) or PDL."""
    if not (pdl_enabled() and _pdl_capable(device)):
        return {}
    return {"PDL": True, "launch_pdl": True}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------- references


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    r = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm_ref(r, w, eps), r


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, dim=-1)
    return (torch.nn.functional.silu(g.float()) * u.float()).to(gate_up.dtype)


def rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos_sin [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2])."""
    D = x.shape[-1]
    cs = cos_sin[positions.long()].float()
    cos, sin = cs[:, None, : D // 2], cs[:, None, D // 2 :]
    x1, x2 = x.float()[..., : D // 2], x.float()[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def step_inputs_ref(d: torch.Tensor, T: int, tokens: torch.Tensor, block_table: torch.Tensor, block_size: int,
                    ntok: torch.Tensor | None = None, R: int = 0, o_rows: int = 0,
                    o_seq: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d[:T] token-buffer rows, d[T:2T] positions (-1: padding) -> (ids, positions >= 0, slots; -1 for padding).

    With `ntok` (each buffer row's token count, on the device), positions <= -2 are
    relative (speculative rows): -2 - j is query j at ntok[row] - 1 + j; and the R
    attention lengths d[o_seq:o_seq + R] of the requests in rows d[o_rows:o_rows + R]
    that are negative (-n: n relative queries) become ntok[row] - 1 + n, in place."""
    rows, pos = d[:T], d[T:2 * T]
    if ntok is not None:
        pos = torch.where(pos <= -2, ntok[rows] - 1 + (-2 - pos), pos)
        seq = d[o_seq:o_seq + R]
        seq.copy_(torch.where(seq < 0, ntok[d[o_rows:o_rows + R]] - 1 - seq, seq))
    p = pos.clamp(min=0)
    ids = tokens.view(-1)[rows * tokens.shape[1] + p]
    slots = block_table[rows, p // block_size] * block_size + p % block_size
    return ids, p, torch.where(pos >= 0, slots, -1)


# ---------------------------------------------------------------- kernels

if HAVE_TRITON:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _pdl_prologue(PDL: tl.constexpr):
        """First statement of a decode-path kernel (see `pdl_kwargs`). The wait comes before any
        global read or write. The trigger right after it only lets the next kernel's programs be
        scheduled (they wait for this grid's completion themselves): they then fill the SMs
        this grid's last wave leaves idle, instead of starting only after it drains."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    # The sizes and offsets change from step to step: not specialised (Triton would compile a
    # variant per divisibility-by-16 / ==1 pattern of them, in the middle of a run).
    @triton.jit(do_not_specialize=["T", "R", "o_rows", "o_seq"])
    def _step_inputs_kernel(d_ptr, tok_ptr, bt_ptr, ntok_ptr, ids_ptr, p_ptr, slot_ptr, T, R, o_rows, o_seq, row_len, stride_bt,
                            PAGE: tl.constexpr, BLOCK: tl.constexpr, REL: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_prologue(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < T
        row = tl.load(d_ptr + offs, mask=m, other=0)
        pos = tl.load(d_ptr + T + offs, mask=m, other=0)
        if REL:  # relative (speculative) rows: -2 - j -> ntok[row] - 1 + j
            rel = m & (pos <= -2)
            base = tl.load(ntok_ptr + row, mask=rel, other=1)
            pos = tl.where(rel, base - 1 + (-2 - pos), pos)
        p = tl.maximum(pos, 0)
        ids = tl.load(tok_ptr + row * row_len + p, mask=m, other=0)
        blk = tl.load(bt_ptr + row * stride_bt + p // PAGE, mask=m, other=0)
        slot = tl.where(pos >= 0, blk * PAGE + p % PAGE, -1)
        tl.store(ids_ptr + offs, ids, mask=m)
        tl.store(p_ptr + offs, p, mask=m)
        tl.store(slot_ptr + offs, slot, mask=m)
        if REL:  # relative attention lengths (-n -> ntok[row] - 1 + n), in place
            mr = offs < R
            seq = tl.load(d_ptr + o_seq + offs, mask=mr, other=0)
            neg = mr & (seq < 0)
            srow = tl.load(d_ptr + o_rows + offs, mask=neg, other=0)
            sbase = tl.load(ntok_ptr + srow, mask=neg, other=1)
            tl.store(d_ptr + o_seq + offs, sbase - 1 - seq, mask=neg)

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, N, eps,
                         BLOCK: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_prologue(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            x = x + r
            xr = x.to(r_ptr.dtype.element_ty)
            tl.store(r_ptr + row * stride_r + offs, xr, mask=mask)
            x = xr.to(tl.float32)
        var = tl.sum(x * x, 0) / N
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = x * tl.rsqrt(var + eps) * w
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_prologue(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                           stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
                           HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                           HALF: tl.constexpr, PAGE: tl.constexpr, WRITE_CACHE: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_prologue(PDL)
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs_d = tl.arange(0, HALF)
        cos = tl.load(cs_ptr + pos * stride_cs + offs_d).to(tl.float32)
        sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d).to(tl.float32)

        hq = tl.arange(0, BLOCK_HQ)
        mq = hq < HQ
        qp = q_ptr + t * stride_qt + hq[:, None] * stride_qh + offs_d[None, :]
        q1 = tl.load(qp, mask=mq[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qp + HALF, mask=mq[:, None], other=0.0).to(tl.float32)
        tl.store(qp, (q1 * cos[None, :] - q2 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mq[:, None])
        tl.store(qp + HALF, (q2 * cos[None, :] + q1 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mq[:, None])

        hk = tl.arange(0, BLOCK_HKV)
        mk = hk < HKV
        kp = k_ptr + t * stride_kt + hk[:, None] * stride_kh + offs_d[None, :]
        k1 = tl.load(kp, mask=mk[:, None], other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=mk[:, None], other=0.0).to(tl.float32)
        r1 = k1 * cos[None, :] - k2 * sin[None, :]
        r2 = k2 * cos[None, :] + k1 * sin[None, :]
        tl.store(kp, r1.to(k_ptr.dtype.element_ty), mask=mk[:, None])
        tl.store(kp + HALF, r2.to(k_ptr.dtype.element_ty), mask=mk[:, None])
        if WRITE_CACHE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                blk = slot // PAGE
                off = slot % PAGE
                kc = kc_ptr + blk * stride_kcb + off * stride_kco + hk[:, None] * stride_kch + offs_d[None, :]
                tl.store(kc, r1.to(kc_ptr.dtype.element_ty), mask=mk[:, None])
                tl.store(kc + HALF, r2.to(kc_ptr.dtype.element_ty), mask=mk[:, None])
                vp = v_ptr + t * stride_vt + hk[:, None] * stride_vh + offs_d[None, :]
                vc = vc_ptr + blk * stride_vcb + off * stride_vco + hk[:, None] * stride_vch + offs_d[None, :]
                tl.store(vc, tl.load(vp, mask=mk[:, None], other=0.0).to(vc_ptr.dtype.element_ty), mask=mk[:, None])
                tl.store(vc + HALF, tl.load(vp + HALF, mask=mk[:, None], other=0.0).to(vc_ptr.dtype.element_ty), mask=mk[:, None])

    @triton.jit
    def _skinny_epilogue(acc, acc2, out_ptr, o_ptrs, omask, EPI: tl.constexpr):
        """Write the tile's fp32 result: EPI 0 store, 1 add into out (in place), 2 silu(acc) * acc2."""
        if EPI == 1:
            r = tl.load(o_ptrs, mask=omask, other=0.0).to(tl.float32)
            y = r + acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        elif EPI == 2:
            g = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
            y = g / (1.0 + tl.exp(-g)) * acc2.to(out_ptr.dtype.element_ty).to(tl.float32)
        else:
            y = acc
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _skinny_gemm_kernel(x_ptr, w_ptr, out_ptr, lnw_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn, stride_om, eps,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            NORM: tl.constexpr, EPI: tl.constexpr, PREC: tl.constexpr, SPLIT_K: tl.constexpr,
                            PDL: tl.constexpr = False):
        """out = f(rms_norm?(x) @ W.T) for few rows (M <= BLOCK_M, padded to 16 for the MMA).

        NORM: x rows are RMS-normalised (times lnw) in the prologue (each program recomputes
        the row statistics over all of K: cheap next to its weight tile). EPI 0: store; 1: out += y
        (the residual stream, in place); 2: W is [gate; up] stacked, out = silu(gate) * up (N = rows / 2).

        SPLIT_K > 1 (grid axis 1): program (n, s) takes the s-th of SPLIT_K near-equal runs of
        K blocks, writes its fp32 partial tile(s) to part_ptr [SPLIT_K, M, 2N or N] and bumps
        tile n's counter; the split that arrives last sums the partials in split order (the
        same result whichever arrives last), applies the epilogue and zeroes the counter, so
        the workspace is ready for the next launch (a CUDA graph replay) without a memset.

        PDL: the wait precedes every access (x, out, the split-K partials and counters: the
        previous skinny GEMM's last split may still be summing and resetting them). The early
        trigger is safe with split-K: no program ever waits for another (the last to arrive
        does the epilogue), so the next kernel's programs spinning in their own wait cannot
        starve this grid, and they read nothing before it has completed."""
        _pdl_prologue(PDL)
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        mmask = offs_m < M
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        if NORM:
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_rows + (k0 + offs_k)[None, :], mask=mmask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(xk * xk, 1)
            rstd = tl.rsqrt(ss / K + eps)
        if SPLIT_K == 1:
            k_lo = 0
            k_hi = K
        else:  # this split's run of K blocks: [s * nb / S, (s + 1) * nb / S) (may be empty when S > nb)
            nblk = tl.cdiv(K, BLOCK_K)
            k_lo = (tl.program_id(1) * nblk // SPLIT_K) * BLOCK_K
            k_hi = tl.minimum(((tl.program_id(1) + 1) * nblk // SPLIT_K) * BLOCK_K, K)
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = acc  # the up half's accumulator (EPI 2 only)
        if EPI == 2:
            u_rows = w_ptr + (offs_n + N)[:, None].to(tl.int64) * stride_wn
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < K
            xk = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            if NORM:
                lw = tl.load(lnw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                xk = (xk.to(tl.float32) * rstd[:, None] * lw[None, :]).to(w_ptr.dtype.element_ty)
            else:
                xk = xk.to(w_ptr.dtype.element_ty)
            w = tl.load(w_rows + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc += tl.dot(xk, tl.trans(w), input_precision=PREC)
            if EPI == 2:
                u = tl.load(u_rows + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
                acc2 += tl.dot(xk, tl.trans(u), input_precision=PREC)
        o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        omask = mmask[:, None] & nmask[None, :]
        if SPLIT_K == 1:
            _skinny_epilogue(acc, acc2, out_ptr, o_ptrs, omask, EPI)
        else:
            NW = 2 * N if EPI == 2 else N  # partial row length: gate then up for EPI 2
            p_tile = part_ptr + offs_m[:, None] * NW + offs_n[None, :]
            split_stride = M * NW
            p_own = p_tile + tl.program_id(1) * split_stride
            tl.store(p_own, acc, mask=omask)
            if EPI == 2:
                tl.store(p_own + N, acc2, mask=omask)
            # every thread's partial stores before the (one-thread) release increment
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:  # the last split: the others' partials are visible
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                acc2 = acc
                for s in range(SPLIT_K):  # fixed order: deterministic sums
                    # .cg: read from L2, never a stale L1 line of another SM's write
                    acc += tl.load(p_tile + s * split_stride, mask=omask, other=0.0, cache_modifier=".cg")
                    if EPI == 2:
                        acc2 += tl.load(p_tile + s * split_stride + N, mask=omask, other=0.0, cache_modifier=".cg")
                _skinny_epilogue(acc, acc2, out_ptr, o_ptrs, omask, EPI)
                tl.atomic_xchg(cnt_ptr + pid, 0)  # ready for the next launch


    @triton.jit
    def _argmax_partial_kernel(x_ptr, val_ptr, idx_ptr, N, stride_x, NUM_CHUNKS, BLOCK: tl.constexpr,
                               PDL: tl.constexpr = False):
        _pdl_prologue(PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        i = tl.min(tl.where(x == m, offs, N), 0)  # first index of the max
        tl.store(val_ptr + row * NUM_CHUNKS + c, m)
        tl.store(idx_ptr + row * NUM_CHUNKS + c, i)

    @triton.jit
    def _argmax_final_kernel(val_ptr, idx_ptr, out_ptr, NUM_CHUNKS, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_prologue(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_C)
        mask = offs < NUM_CHUNKS
        v = tl.load(val_ptr + row * NUM_CHUNKS + offs, mask=mask, other=float("-inf"))
        i = tl.load(idx_ptr + row * NUM_CHUNKS + offs, mask=mask, other=2147483647)
        m = tl.max(v, 0)
        best = tl.min(tl.where(v == m, i, 2147483647), 0)
        tl.store(out_ptr + row, best.to(out_ptr.dtype.element_ty))

# ---------------------------------------------------------------- wrappers


_STEP_INPUTS_BLOCK = 256


def step_inputs(d: torch.Tensor, T: int, tokens: torch.Tensor, block_table: torch.Tensor, block_size: int,
                ntok: torch.Tensor | None = None, R: int = 0, o_rows: int = 0,
                o_seq: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`step_inputs_ref` in one kernel (int64 throughout, contiguous token buffer)."""
    if not use_triton(d) or (T == 0 and (ntok is None or R == 0)):
        return step_inputs_ref(d, T, tokens, block_table, block_size, ntok, R, o_rows, o_seq)
    ids = torch.empty(T, dtype=tokens.dtype, device=d.device)
    p = torch.empty(T, dtype=d.dtype, device=d.device)
    slots = torch.empty(T, dtype=block_table.dtype, device=d.device)
    rel = ntok is not None
    n = max(T, R) if rel else T
    # One tile size for every step size: one compiled kernel (per REL), none compiled mid-run.
    BLOCK = _STEP_INPUTS_BLOCK
    _step_inputs_kernel[(triton.cdiv(n, BLOCK),)](d, tokens, block_table, ntok if rel else d, ids, p, slots, T, R if rel else 0,
                                                  o_rows, o_seq, tokens.stride(0), block_table.stride(0),
                                                  PAGE=block_size, BLOCK=BLOCK, REL=rel, num_warps=4,
                                                  **pdl_kwargs(d.device))
    return ids, p, slots


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    if not use_triton(x):
        y = rms_norm_ref(x, w, eps)
        return out.copy_(y) if out is not None else y
    x2 = x.reshape(-1, x.shape[-1])
    o = torch.empty_like(x2) if out is None else out.view(-1, x.shape[-1])
    N = x2.shape[1]
    _rms_norm_kernel[(x2.shape[0],)](x2, x2, w, o, x2.stride(0), x2.stride(0), o.stride(0), N, eps,
                                     BLOCK=_next_pow2(N), ADD=False, num_warps=_norm_warps(N), **pdl_kwargs(x.device))
    return o.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; x = rms_norm(residual) * w. Both in place; returns (x, residual)."""
    if not use_triton(x):
        y, r = add_rms_norm_ref(x, residual, w, eps)
        residual.copy_(r)
        x.copy_(y)
        return x, residual
    N = x.shape[-1]
    x2, r2 = x.view(-1, N), residual.view(-1, N)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, w, x2, x2.stride(0), r2.stride(0), x2.stride(0), N, eps,
                                     BLOCK=_next_pow2(N), ADD=True, num_warps=_norm_warps(N), **pdl_kwargs(x.device))
    return x, residual


def _norm_warps(n: int) -> int:
    return 4 if n <= 2048 else 8


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if not use_triton(gate_up):
        y = silu_and_mul_ref(gate_up)
        return out.copy_(y) if out is not None else y
    x2 = gate_up.reshape(-1, gate_up.shape[-1])
    N = x2.shape[1] // 2
    o = torch.empty(x2.shape[0], N, dtype=gate_up.dtype, device=gate_up.device) if out is None else out.view(-1, N)
    BLOCK = 1024
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(N, BLOCK))](x2, o, x2.stride(0), o.stride(0), N, BLOCK=BLOCK, num_warps=4,
                                                           **pdl_kwargs(gate_up.device))
    return o.view(*gate_up.shape[:-1], N)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                   k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> None:
    """q [T, Hq, D], k/v [T, Hkv, D] (views into the qkv projection are fine: unit stride
    on D). Rotates q, k in place; writes k, v to the cache views [blocks, page, Hkv, D]."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    write = k_cache is not None
    if not use_triton(q):
        q.copy_(rope_ref(q, positions, cos_sin))
        k.copy_(rope_ref(k, positions, cos_sin))
        if write:
            assert v_cache is not None and slots is not None
            keep = slots >= 0
            s = slots[keep].long()
            page = k_cache.shape[1]
            k_cache[s // page, s % page] = k[keep].to(k_cache.dtype)
            v_cache[s // page, s % page] = v[keep].to(v_cache.dtype)
        return
    if T == 0:
        return
    if write:
        assert v_cache is not None and slots is not None
        kc, vc, sl = k_cache, v_cache, slots
        skc = (kc.stride(0), kc.stride(1), kc.stride(2))
        svc = (vc.stride(0), vc.stride(1), vc.stride(2))
        page = kc.shape[1]
    else:
        kc = vc = k
        sl = positions
        skc = svc = (0, 0, 0)
        page = 1
    _rope_cache_kernel[(T,)](q, k, v, positions, cos_sin, kc, vc, sl,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
                             *skc, *svc, HQ=Hq, HKV=Hkv, BLOCK_HQ=_next_pow2(Hq), BLOCK_HKV=_next_pow2(Hkv), HALF=D // 2,
                             PAGE=page, WRITE_CACHE=write, num_warps=4, **pdl_kwargs(q.device))


# ---------------------------------------------------------------- skinny GEMM (decode at small batch)

SKINNY_MAX_M = 16  # rows handled by `skinny_linear`; larger batches go to cuBLAS
# Where the skinny kernel beats cuBLAS + separate norm/act/add kernels (H100, Llama-3.2-1B shape,
# benchmarks/decode_step.py): one row (decode step 1.26 vs 1.39 ms); at 3 rows they tie.
SKINNY_PREFERRED_MAX_M = 2
# skinny_linear's epilogue names -> the kernel's EPI constexpr (and the config table's key)
SKINNY_EPILOGUES = {"store": 0, "residual": 1, "silu_mul": 2}
SkinnyConfig = tuple[int, int, int, int, int]  # (BLOCK_N, BLOCK_K, num_warps, num_stages, split_k)
_SKINNY_CFG: dict[tuple[int, int, int], SkinnyConfig] = {}


def skinny_config(n: int, k: int, epi: int) -> SkinnyConfig:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, split_k). Defaults are the H100 sweep's winners
    (decode_step.py --tune): gate_up+SiLU (64, 128, 8, 4), LM head (64, 256, 8, 3),
    o / down projections (16, 512, 4, 3); split_k 1 (one program per column tile), except a
    long reduction over few columns (the down projection, K >= 4N): there one program per
    16 columns streams the whole K alone, 128 programs on 132 SMs, and four splits of 32-column
    tiles won the H200 sweep (2026-12-06: Llama-3.2-1B down, 2048 x 8192, 14.0 -> 12.1 us per
    layer, 2.41 -> 2.78 TB/s; the batch-1 decode step 1.036 -> 1.006 ms)."""
    cfg = _SKINNY_CFG.get((n, k, epi))
    if cfg is not None:
        return cfg
    if epi == 2:
        return (64, 128 if k >= 128 else _next_pow2(k), 8, 4, 1)
    if n >= 32768:
        return (64, 256 if k >= 256 else _next_pow2(k), 8, 3, 1)
    if k >= 4 * n and k >= 4096:
        return (32, 128, 4, 4, 4)
    return (16, 512 if k >= 512 else _next_pow2(k), 4, 3, 1)


def set_skinny_config(n: int, k: int, epi: int, cfg: SkinnyConfig) -> None:
    if len(cfg) != 5 or cfg[4] < 1:
        raise ValueError(f"skinny config {cfg}: want (BLOCK_N, BLOCK_K, num_warps, num_stages, split_k >= 1)")
    _SKINNY_CFG[(n, k, epi)] = tuple(cfg)  # type: ignore[assignment]


# Split-K scratch per device: fp32 partial tiles and one int32 arrival counter per column
# tile. Launches on one stream run one after another, so every projection (and every graph
# replay) shares them; the kernel leaves the counters at zero. Grown only eagerly (the
# warm-up before a CUDA graph capture runs the same shapes), never inside a capture; a
# grown-out pair is kept alive, not freed, since captured graphs and queued launches may
# still use it (each launch resets its own counters, so either pair stays consistent).
_SPLITK_WS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_SPLITK_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []


def _splitk_workspace(device: torch.device, n_partial: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    ws = _SPLITK_WS.get(device)
    if ws is not None and ws[0].numel() >= n_partial and ws[1].numel() >= n_tiles:
        return ws
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"skinny split-K workspace too small ({n_partial} partials, {n_tiles} counters) inside a CUDA "
                           "graph capture: run the same call eagerly first (a warm-up) so it is allocated outside")
    if ws is not None:
        _SPLITK_RETIRED.append(ws)
        n_partial, n_tiles = max(n_partial, ws[0].numel()), max(n_tiles, ws[1].numel())
    # powers of two: a few shapes of one model grow it at most a few times
    ws = (torch.empty(_next_pow2(n_partial), dtype=torch.float32, device=device),
          torch.zeros(_next_pow2(n_tiles), dtype=torch.int32, device=device))
    _SPLITK_WS[device] = ws
    return ws


def skinny_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, epilogue: str = "store") -> torch.Tensor:
    """y = rms_norm?(x) @ w.T for x [M <= 16, K], w [N, K] (contiguous rows), one Triton kernel.

    epilogue "store": out = y; "residual": out += y (in place); "silu_mul": w is [gate; up]
    ([2N, K]) and out = silu(gate) * up. With `norm_weight`, x is RMS-normalised first.
    The shape's `skinny_config` picks the tile and the K split (split > 1: see the kernel)."""
    M, K = x.shape
    epi = SKINNY_EPILOGUES[epilogue]
    N = w.shape[0] // 2 if epi == 2 else w.shape[0]
    if not use_triton(x) or M > SKINNY_MAX_M:
        h = rms_norm_ref(x, norm_weight, eps) if norm_weight is not None else x
        y = torch.nn.functional.linear(h, w)
        if epi == 2:
            y = silu_and_mul_ref(y)
        if epi == 1:
            assert out is not None
            return out.add_(y)
        return out.copy_(y) if out is not None else y
    if out is None:
        assert epi != 1, "the residual epilogue needs `out`"
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bn, bk, nw, ns, split = skinny_config(N, K, epi)
    split = min(split, triton.cdiv(K, bk))  # more splits than K blocks would only add empty programs
    tiles = triton.cdiv(N, bn)
    if split > 1:
        part, cnt = _splitk_workspace(x.device, split * M * w.shape[0], tiles)
    else:
        part = cnt = w  # unused (SPLIT_K == 1 compiles today's kernel)
    _skinny_gemm_kernel[(tiles, split)](x, w, out, norm_weight if norm_weight is not None else w, part, cnt, M, N, K,
                                        x.stride(0), w.stride(0), out.stride(0), eps,
                                        BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, NORM=norm_weight is not None, EPI=epi,
                                        PREC="ieee" if w.dtype == torch.float32 else "tf32", SPLIT_K=split,
                                        num_warps=nw, num_stages=ns, **pdl_kwargs(x.device))
    return out


# ---------------------------------------------------------------- argmax over a wide row (greedy / Gumbel-max sampling)

_ARGMAX_BLOCK = 4096


def argmax_workspace(max_rows: int, n: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = (n + _ARGMAX_BLOCK - 1) // _ARGMAX_BLOCK
    return (torch.empty(max_rows * chunks, dtype=torch.float32, device=device),
            torch.empty(max_rows * chunks, dtype=torch.int32, device=device))


def argmax_rows(x: torch.Tensor, out: torch.Tensor | None = None,
                workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Index of each row's maximum (first on ties), for [M, N] with large N: one program per
    (row, 4096-wide chunk), then one per row; torch's argmax runs one block per row."""
    M, N = x.shape
    if out is None:
        out = torch.empty(M, dtype=torch.long, device=x.device)
    if not use_triton(x):
        return out.copy_(x.argmax(-1))
    chunks = (N + _ARGMAX_BLOCK - 1) // _ARGMAX_BLOCK
    if workspace is not None and workspace[0].numel() >= M * chunks:
        vals, idxs = workspace
    else:
        vals, idxs = argmax_workspace(M, N, x.device)
    _argmax_partial_kernel[(M, chunks)](x, vals, idxs, N, x.stride(0), chunks, BLOCK=_ARGMAX_BLOCK, num_warps=8,
                                        **pdl_kwargs(x.device))
    _argmax_final_kernel[(M,)](vals, idxs, out, chunks, BLOCK_C=_next_pow2(chunks), num_warps=1,
                                      **pdl_kwargs(x.device))
    return out
