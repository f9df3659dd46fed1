"""Both CPU paged attentions (the C kernel and plain torch) equal dense causal attention,
through any block table: GQA and plain multi-head, partial blocks, mixed batches."""
from __future__ import annotations

import random
from typing import Callable

import pytest
import torch

from aiosched.executors.torch.attention import cpu_kernel
from aiosched.executors.torch.attention.torch_paged import (AttentionMetadata, _kernel_attention, paged_attention,
                                                            store_kv, torch_paged_attention)

AttnFn = Callable[..., torch.Tensor]


def _kernel(q, kc, vc, meta, scale):  # type: ignore[no-untyped-def]
    lib = cpu_kernel.load()
    assert lib is not None, "the CPU kernel did not build (is a C compiler installed?)"
    return _kernel_attention(lib, q, kc, vc, meta, scale)


PATHS = [pytest.param(_kernel, id="kernel"), pytest.param(torch_paged_attention, id="torch"),
         pytest.param(paged_attention, id="dispatch")]


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [q_len, Hq, D] at the end of k/v: [L, Hkv, D]; plain causal softmax attention."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    L, ql = k.shape[0], q.shape[0]
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.arange(L)[None, :] > torch.arange(L - ql, L)[:, None]
    return torch.einsum("hqk,khd->qhd", s.masked_fill(mask, float("-inf")).softmax(-1), v)


def _case(q_lens: list[int], ctx_lens: list[int], bs: int = 4, hq: int = 8, hkv: int = 2, d: int = 16, seed: int = 0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    nblocks = sum(-(-c // bs) for c in ctx_lens) + 8
    kc, vc = torch.zeros(nblocks, bs, hkv, d), torch.zeros(nblocks, bs, hkv, d)
    free = list(range(nblocks))
    rng.shuffle(free)  # non-contiguous block tables
    tables, full_k, full_v, qs, slots = [], [], [], [], []
    for ql, c in zip(q_lens, ctx_lens):
        table = [free.pop() for _ in range(-(-c // bs))]
        k, v = torch.randn(c, hkv, d), torch.randn(c, hkv, d)
        # The cached prefix is already in the cache; this step's tokens are stored by store_kv.
        for p in range(c - ql):
            kc[table[p // bs], p % bs], vc[table[p // bs], p % bs] = k[p], v[p]
        slots += [table[p // bs] * bs + p % bs for p in range(c - ql, c)]
        tables.append(table)
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(ql, hq, d))
    new_k = torch.cat([k[c - ql :] for k, ql, c in zip(full_k, q_lens, ctx_lens)])
    new_v = torch.cat([v[c - ql :] for v, ql, c in zip(full_v, q_lens, ctx_lens)])
    qsl = [0]
    for ql in q_lens:
        qsl.append(qsl[-1] + ql)
    meta = AttentionMetadata(torch.tensor(slots), qsl, list(ctx_lens), tables, bs)
    return torch.cat(qs), new_k, new_v, kc, vc, meta, qs, full_k, full_v


def _check(attn: AttnFn, q_lens: list[int], ctx_lens: list[int], **shape: int) -> None:
    q, nk, nv, kc, vc, meta, qs, ks, vs = _case(q_lens, ctx_lens, **shape)
    store_kv(nk, nv, kc, vc, meta.slot_mapping)
    out = attn(q, kc, vc, meta, 0.25)
    for i, (qi, k, v) in enumerate(zip(qs, ks, vs)):
        s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        torch.testing.assert_close(out[s:e], _dense(qi, k, v, 0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", PATHS)
def test_mixed_prefill_chunks_and_decodes(attn: AttnFn) -> None:
    _check(attn, [5, 1, 9, 1, 3], [5, 17, 20, 1, 30])


@pytest.mark.parametrize("attn", PATHS)
def test_decode_only_batch_uses_the_batched_path(attn: AttnFn) -> None:
    _check(attn, [1] * 7, [1, 2, 4, 5, 16, 33, 9])


@pytest.mark.parametrize("attn", PATHS)
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 1), (12, 4)])
def test_head_layouts_and_partial_blocks(attn: AttnFn, hq: int, hkv: int) -> None:
    """Multi-head, multi-query and GQA; block size 16 so most requests end inside a block;
    prompts longer than the kernel's query tile (16)."""
    _check(attn, [1, 40, 1, 17, 1], [1, 40, 63, 50, 16], bs=16, hq=hq, hkv=hkv, d=64, seed=3)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_result_does_not_depend_on_the_thread_count(threads: int) -> None:
    q, nk, nv, kc, vc, meta, *_ = _case([1] * 9 + [20], [3, 9, 17, 4, 8, 12, 33, 1, 5, 20], bs=8, hq=8, hkv=2, d=32, seed=5)
    store_kv(nk, nv, kc, vc, meta.slot_mapping)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _kernel(q, kc, vc, meta, 0.125)
        cpu_kernel.set_threads(threads)  # the kernel's own count; torch's stays 1
        torch.testing.assert_close(_kernel(q, kc, vc, meta, 0.125), one, rtol=0, atol=0)
        assert torch.get_num_threads() == 1  # the kernel's thread count does not leak into torch's
        cpu_kernel.set_threads(None)
        torch.set_num_threads(threads)  # torch's count, which the kernel follows by default
        assert cpu_kernel.threads() == threads
        torch.testing.assert_close(_kernel(q, kc, vc, meta, 0.125), one, rtol=0, atol=0)
    finally:
        cpu_kernel.set_threads(None)
        torch.set_num_threads(before)


def test_dispatch_uses_the_kernel_for_float32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """paged_attention calls the kernel for float32 host tensors and plain torch for other dtypes."""
    calls: list[str] = []
    import aiosched.executors.torch.attention.torch_paged as tp

    real_kernel, real_torch = tp._kernel_attention, tp.torch_paged_attention
    monkeypatch.setattr(tp, "_kernel_attention", lambda *a: calls.append("kernel") or real_kernel(*a))
    monkeypatch.setattr(tp, "torch_paged_attention", lambda *a: calls.append("torch") or real_torch(*a))
    q, nk, nv, kc, vc, meta, *_ = _case([1, 1], [5, 9])
    store_kv(nk, nv, kc, vc, meta.slot_mapping)
    out32 = tp.paged_attention(q, kc, vc, meta, 0.25)
    out64 = tp.paged_attention(q.double(), kc.double(), vc.double(), meta, 0.25)
    assert calls == ["kernel", "torch"]
    torch.testing.assert_close(out64.float(), out32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", PATHS)
def test_shared_prefix_blocks_written_in_the_same_step(attn: AttnFn) -> None:
    """Request B reads prefix blocks that request A writes in this very step."""
    bs, hkv, d = 4, 2, 16
    torch.manual_seed(1)
    prefix_k, prefix_v = torch.randn(8, hkv, d), torch.randn(8, hkv, d)
    kc, vc = torch.zeros(6, bs, hkv, d), torch.zeros(6, bs, hkv, d)
    a_table, b_table = [3, 1, 4], [3, 1, 5]  # blocks 3 and 1 shared
    b_tail_k, b_tail_v = torch.randn(2, hkv, d), torch.randn(2, hkv, d)
    a_tail_k, a_tail_v = torch.randn(1, hkv, d), torch.randn(1, hkv, d)
    # A computes its whole prompt (prefix + 1); B only its 2 tokens after the shared prefix.
    slots = [a_table[p // bs] * bs + p % bs for p in range(9)] + [b_table[p // bs] * bs + p % bs for p in range(8, 10)]
    nk = torch.cat([prefix_k, a_tail_k, b_tail_k])
    nv = torch.cat([prefix_v, a_tail_v, b_tail_v])
    q = torch.randn(11, 8, d)
    meta = AttentionMetadata(torch.tensor(slots), [0, 9, 11], [9, 10], [a_table, b_table], bs)
    store_kv(nk, nv, kc, vc, meta.slot_mapping)
    out = attn(q, kc, vc, meta, 0.25)
    kb, vb = torch.cat([prefix_k, b_tail_k]), torch.cat([prefix_v, b_tail_v])
    torch.testing.assert_close(out[9:], _dense(q[9:], kb, vb, 0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value, want", [(None, "default"), ("", "default"), ("off", None), ("never", None), ("64", 64)])
def test_all_heads_switch_reads_a_batch_size_or_off(value: str | None, want: object) -> None:
    """AIOSCHED_ATTN_ALL_HEADS: unset means the measured default (one program per request
    from the batch where it runs one split), a number moves it, "off" turns it off."""
    from aiosched.executors.torch.attention import triton_paged as tp

    assert tp._all_heads_from_env(value) == (tp.ALL_HEADS_DEFAULT_MIN_BATCH if want == "default" else want)


def test_all_heads_switch_rejects_other_values() -> None:
    from aiosched.executors.torch.attention import triton_paged as tp

    with pytest.raises(ValueError, match="AIOSCHED_ATTN_ALL_HEADS"):
        tp._all_heads_from_env("sometimes")
