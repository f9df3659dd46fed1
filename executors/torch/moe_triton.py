"""Grouped-expert MLP on CUDA in Triton: the MoE block's experts in two kernel launches.

Same contract as the reference `grouped_experts` (executors/torch/layers.py):
x [T, H], gate_up [E, 2I, H] (gate rows first), down [E, H, I], expert_ids / weights [T, K].

1. `align_pairs` sorts the T*K (token, k) pairs by expert on the device and pads each
   expert's run to a multiple of BLOCK_M, so every BLOCK_M-row tile belongs to one expert
   (`tile_expert`; -1 past the last used tile). Sizes are upper bounds computed from T, K
   and E alone: no host synchronisation, so the step can be captured in a CUDA graph.
2. `_grouped_gemm` (GLU=True): each program takes one tile of pairs and one BLOCK_N slice of
   the intermediate size, gathers the tokens' rows of x, multiplies them by the expert's gate
   and up rows at once and writes act(gate) * up for those pairs ([T*K, I]).
3. `_grouped_gemm` (GLU=False): the same tiles times the expert's down matrix, scaled by the
   pair's routing weight in the epilogue ([T*K, H], float32).
4. The K terms of each token are summed (float32) and cast to x's dtype.

Padding rows carry the sentinel pair id T*K: their loads are masked and nothing is stored.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path runs instead
    triton = None
    tl = None

_ACTS = {"silu": 0, "gelu_pytorch_tanh": 1}


def available(x: torch.Tensor, act: str) -> bool:
    """This kernel's domain: a CUDA tensor, Triton importable, an activation it implements."""
    return triton is not None and x.is_cuda and act in _ACTS


def align_pairs(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair ids sorted by expert, padded per expert to block_m with the sentinel T*K;
    the expert of each block_m tile, -1 for unused tiles). All on expert_ids' device."""
    flat = expert_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    # scatter_add, not bincount: bincount sizes its output from the data (a device sync on CUDA)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)  # inclusive end of each expert's padded run
    pad_start = pad_end - padded
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    run_start = torch.cumsum(counts, 0) - counts
    dest = pad_start[sorted_e] + torch.arange(n, device=dev) - run_start[sorted_e]
    max_tiles = (n + num_experts * (block_m - 1) + block_m - 1) // block_m
    sorted_ids = torch.full((max_tiles * block_m,), n, dtype=torch.int64, device=dev)
    sorted_ids[dest] = order
    tile_start = torch.arange(max_tiles, device=dev) * block_m
    tile_expert = torch.searchsorted(pad_end, tile_start, right=True)
    tile_expert = torch.where(tile_start < pad_end[-1], tile_expert, torch.full_like(tile_expert, -1))
    return sorted_ids, tile_expert


if triton is not None:

    @triton.jit
    def _grouped_gemm(
        a_ptr, w_ptr, out_ptr, sorted_ids_ptr, tile_expert_ptr, weight_ptr,
        num_pairs, N, Kdim, top_k,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
        GLU: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, A_BY_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[pair, n] = sum_k a[row(pair), k] * w[e, n, k] (GLU: act(gate) * up with the
        up rows at n + N); row(pair) = pair // top_k when A_BY_TOKEN (x is per token), else pair."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_expert_ptr + pid_m)
        if e < 0:
            return
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        if A_BY_TOKEN:
            rows = pairs // top_k
        else:
            rows = pairs
        rows = tl.where(valid, rows, 0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_base = w_ptr + e.to(tl.int64) * stride_we
        w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GLU:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, Kdim, BLOCK_K):
            mask_k = offs_k + k0 < Kdim
            a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc += tl.dot(a, w.to(a.dtype), input_precision=PREC)
            if GLU:
                w_up = tl.load(w_ptrs + N * stride_wn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc_up += tl.dot(a, w_up.to(a.dtype), input_precision=PREC)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        if GLU:
            if ACT == 0:  # silu
                act = acc * tl.sigmoid(acc)
            else:  # gelu, tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
                u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
                act = 0.5 * acc * (2.0 * tl.sigmoid(2.0 * u))
            # HF rounds act(gate) to the model dtype before the product with up
            acc = act.to(a_ptr.dtype.element_ty).to(tl.float32) * acc_up
        if MUL_WEIGHT:
            wt = tl.load(weight_ptr + tl.where(valid, pairs, 0), mask=valid, other=0.0).to(tl.float32)
            acc = acc * wt[:, None]
        out_ptrs = out_ptr + tl.where(valid, pairs, 0)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


def _block_sizes(num_pairs: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small M tiles for decode-sized batches, where most
    experts get a token or two; larger ones when each expert sees many pairs."""
    return (16 if num_pairs <= 256 else 64), 64, 32


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, expert_ids: torch.Tensor,
                  weights: torch.Tensor, act: str = "silu", block_sizes: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The grouped expert MLPs of `grouped_experts`, on the Triton kernel (x must be a CUDA tensor,
    or run under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("fused_experts needs Triton (the reference is layers.grouped_experts)")
    if act not in _ACTS:
        raise ValueError(f"config.json: hidden_act {act!r} is not supported by the Triton MoE kernel (supported: {', '.join(_ACTS)})")
    T, H = x.shape
    E, two_i, _ = gate_up.shape
    inter = two_i // 2
    K = expert_ids.shape[1]
    n = T * K
    bm, bn, bk = block_sizes or _block_sizes(n)
    sorted_ids, tile_expert = align_pairs(expert_ids, E, bm)
    tiles = tile_expert.numel()
    x = x.contiguous()
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # float32: exact products (no TF32 rounding)
    h = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    w = weights.reshape(-1).contiguous()
    _grouped_gemm[(tiles, triton.cdiv(inter, bn))](
        x, gate_up, h, sorted_ids, tile_expert, w, n, inter, H, K,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), h.stride(0), h.stride(1),
        GLU=True, ACT=_ACTS[act], PREC=prec, A_BY_TOKEN=True, MUL_WEIGHT=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    out = torch.empty((n, H), dtype=torch.float32, device=x.device)
    _grouped_gemm[(tiles, triton.cdiv(H, bn))](
        h, down, out, sorted_ids, tile_expert, w, n, H, inter, K,
        h.stride(0), h.stride(1), down.stride(0), down.stride(1), down.stride(2), out.stride(0), out.stride(1),
        GLU=False, ACT=0, PREC=prec, A_BY_TOKEN=False, MUL_WEIGHT=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return out.view(T, K, H).sum(dim=1).to(x.dtype)
