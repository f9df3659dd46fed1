"""The CPU C kernels next to attention (executors/torch/attention/cpu_kernel.py): RoPE + the
KV write of one step equals the torch ops bit for bit, on the layouts the models pass (q, k, v
as views of the fused qkv output), with padding slots (-1) left unwritten; cases outside the
kernel's domain take the torch ops."""
from __future__ import annotations

import pytest
import torch

from aiosched.executors.model_config import RopeConfig
from aiosched.executors.torch.attention import cpu_kernel
from aiosched.executors.torch.attention.torch_paged import AttentionMetadata
from aiosched.executors.torch.layers import RotaryAt, _c_rope_applies, rope_and_store, rope_cos_sin, torch_rope_and_store

needs_kernel = pytest.mark.skipif(cpu_kernel.load() is None, reason="the CPU kernel did not build (no C compiler?)")


def _step(T: int, hq: int, hkv: int, d: int, seed: int, pad: bool = False):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=g) * 3
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d)
    bs = 4
    nb = T // bs + 8
    slots = torch.randperm(nb * bs, generator=g)[:T]
    if pad:
        slots[T // 2] = -1
    pos = torch.randint(0, 100, (T,), generator=g)
    table = rope_cos_sin(RopeConfig(theta=10000.0), d, 128, "cpu")
    meta = AttentionMetadata(slots, [0, T], [T], [list(range(nb))], bs)
    caches = [torch.randn(nb, bs, hkv, d, generator=g) for _ in range(2)]
    return q, k, v, RotaryAt(table, pos), meta, caches


@needs_kernel
@pytest.mark.parametrize("T,hq,hkv,d", [(1, 4, 4, 64), (37, 8, 2, 64), (5, 12, 4, 16), (130, 16, 16, 64)])
@pytest.mark.parametrize("pad", [False, True])
def test_rope_and_store_equals_the_torch_ops_bitwise(T: int, hq: int, hkv: int, d: int, pad: bool) -> None:
    q, k, v, rope, meta, (kc, vc) = _step(T, hq, hkv, d, seed=T + hq, pad=pad)
    kc2, vc2 = kc.clone(), vc.clone()
    assert _c_rope_applies(q, k, v, rope, meta, kc, vc)
    qo, ko = rope_and_store(q, k, v, rope, meta, kc, vc)
    if pad:  # torch's index_copy_ has no padding slot: the reference writes the other rows only
        keep = meta.slot_mapping >= 0
        sub = AttentionMetadata(meta.slot_mapping[keep], [0, int(keep.sum())], [int(keep.sum())], meta.block_tables, 4)
        rq, rk = torch_rope_and_store(q[keep], k[keep], v[keep], RotaryAt(rope.table, rope.positions[keep]), sub, kc2, vc2)
        assert torch.equal(qo[keep], rq) and torch.equal(ko[keep], rk)
    else:
        rq, rk = torch_rope_and_store(q, k, v, RotaryAt(rope.table, rope.positions), meta, kc2, vc2)
        assert torch.equal(qo, rq) and torch.equal(ko, rk)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # same slots written, same values; nothing else touched


def test_outside_the_kernel_domain_the_torch_ops_run() -> None:
    q, k, v, rope, meta, (kc, vc) = _step(6, 4, 2, 16, seed=1)
    assert not _c_rope_applies(q.double(), k.double(), v.double(), rope, meta, kc.double(), vc.double())
    bad = RotaryAt(rope.table, rope.positions.clone().fill_(500))  # past the table: the kernel would read out of bounds
    assert not _c_rope_applies(q, k, v, bad, meta, kc, vc)
    meta.slot_mapping[0] = kc.shape[0] * kc.shape[1]  # a slot past the cache
    assert not _c_rope_applies(q, k, v, rope, meta, kc, vc)
