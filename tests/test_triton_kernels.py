"""Triton kernels (paged attention, fused ops) against float32 references.

Run on a CUDA device; skipped cleanly on CPU (unless TRITON_INTERPRET=1 with Triton
installed, which runs the same kernels in Triton's interpreter). Every check draws
fresh random inputs and poisons the output first, so unwritten elements fail.
"""
from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("Triton kernels need a CUDA device (or TRITON_INTERPRET=1)", allow_module_level=True)

if INTERPRET and not torch.cuda.is_available():
    # numpy >= 2.4 refuses int() of a 1-element array, which the interpreter does for loop bounds
    import triton.runtime.interpreter as _ti

    _orig_patch = _ti._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _ti._patch_lang_tensor = _patch_lang_tensor

    # the interpreter keeps bfloat16 as its uint16 bits and its tl.dot multiplies those
    # integers; widen bf16 operands to float32 first (exact), as the hardware MMA does
    import numpy as _np

    _orig_dot = _ti.InterpreterBuilder.create_dot

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        def widen(h):  # type: ignore[no-untyped-def]
            if h.dtype.scalar != triton.language.bfloat16:
                return h
            return _ti.TensorHandle((h.data.astype(_np.uint32) << 16).view(_np.float32), triton.language.float32)

        return _orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    _ti.InterpreterBuilder.create_dot = _create_dot

    # and its float32 -> bfloat16 casts truncate; the GPU rounds to nearest even: round here too
    _orig_cast = _ti.InterpreterBuilder.cast_impl

    def _cast_impl(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar == triton.language.float32 and dst_type.scalar == triton.language.bfloat16:
            u = src.data.astype(_np.float32).view(_np.uint32)
            rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(_np.uint16)
            nan = _np.isnan(src.data)
            rounded[nan] = 0x7FC0
            return _ti.TensorHandle(rounded, dst_type.scalar)
        return _orig_cast(self, src, dst_type)

    _ti.InterpreterBuilder.cast_impl = _cast_impl

from aiosched.executors.torch import fused_ops  # noqa: E402
from aiosched.executors.torch.attention import triton_paged as tp  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEV == "cuda" else [torch.float32]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def make_cache(num_blocks: int, page: int, hkv: int, d: int, dtype: torch.dtype, interleaved: bool):
    if interleaved:  # [blocks, page, 2*Hkv, D], K at even heads, V at odd
        c = torch.randn(num_blocks, page, 2 * hkv, d, device=DEV).to(dtype)
        return c, c[:, :, 0::2], c[:, :, 1::2]
    kv = torch.randn(2, num_blocks, page, hkv, d, device=DEV).to(dtype)
    return kv, kv[0], kv[1]


def random_tables(lens: list[int], page: int, num_blocks: int, rng: random.Random) -> torch.Tensor:
    need = [(n + page - 1) // page for n in lens]
    ids = rng.sample(range(num_blocks), sum(need))
    width = max(need)
    bt = torch.zeros(len(lens), width, dtype=torch.int32)
    i = 0
    for r, n in enumerate(need):
        bt[r, :n] = torch.tensor(ids[i:i + n], dtype=torch.int32)
        i += n
    return bt.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,hq,hkv,d,page,interleaved", [(1, 32, 8, 64, 16, False), (3, 8, 2, 64, 16, True), (5, 4, 4, 32, 8, False),
                                                             (2, 14, 2, 128, 16, False)])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_decode_attention(dtype, batch, hq, hkv, d, page, interleaved, splits) -> None:
    rng = random.Random(batch * 100 + hq + d)
    lens = [rng.randint(1, 200) for _ in range(batch)]
    lens[0] = 1
    num_blocks = sum((n + page - 1) // page for n in lens) + 7
    _, kc, vc = make_cache(num_blocks, page, hkv, d, dtype, interleaved)
    bt = random_tables(lens, page, num_blocks, rng)
    q = torch.randn(batch, hq, d, device=DEV).to(dtype)
    out = torch.full_like(q, float("nan"))
    seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = d ** -0.5
    tp.paged_decode_attention(q, kc, vc, bt, seq, scale, out=out, num_splits=splits)
    ref = tp.reference_paged_attention(q, kc, vc, bt, lens, [1] * batch, scale)
    assert rel_err(out, ref) < tol(dtype)


@pytest.mark.parametrize("cfg", [tp.DecodeConfig(heads_fast=True), tp.DecodeConfig(64, 8, 3, True), tp.DecodeConfig(16, 2, 1, False)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_any_launch_config(cfg, splits) -> None:
    """Every launch shape the tuner may pick (tile, warps, stages, grid order) computes the same attention."""
    rng = random.Random(5 + splits)
    lens = [rng.randint(1, 150) for _ in range(5)]
    num_blocks = sum((n + 15) // 16 for n in lens) + 3
    _, kc, vc = make_cache(num_blocks, 16, 2, 64, DTYPES[0], False)
    bt = random_tables(lens, 16, num_blocks, rng)
    q = torch.randn(5, 8, 64, device=DEV).to(DTYPES[0])
    out = tp.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=DEV), 0.125,
                                    num_splits=splits, config=cfg)
    ref = tp.reference_paged_attention(q, kc, vc, bt, lens, [1] * 5, 0.125)
    assert rel_err(out, ref) < tol(DTYPES[0])


@pytest.mark.parametrize("batch,hq,hkv,d,page,interleaved", [(1, 32, 8, 64, 16, False), (3, 8, 2, 64, 16, True), (5, 4, 4, 32, 8, False),
                                                             (2, 14, 2, 128, 16, False), (3, 12, 3, 64, 16, False)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("block_n", [16, 32])
def test_decode_attention_all_heads_in_one_program(batch, hq, hkv, d, page, interleaved, splits, block_n) -> None:
    """The all-heads launch (every kv head of a request in one program, one batched dot over
    the kv-head axis) computes the same attention, GQA groups and kv-head counts that are
    not powers of two included, on the runner's layout and on an interleaved K/V one."""
    rng = random.Random(batch * 31 + hq + d + splits)
    lens = [rng.randint(1, 120) for _ in range(batch)]
    lens[0] = 1
    num_blocks = sum((n + page - 1) // page for n in lens) + 5
    _, kc, vc = make_cache(num_blocks, page, hkv, d, DTYPES[0], interleaved)
    bt = random_tables(lens, page, num_blocks, rng)
    q = torch.randn(batch, hq, d, device=DEV).to(DTYPES[0])
    out = torch.full_like(q, float("nan"))
    tp.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=DEV), d ** -0.5, out=out,
                              num_splits=splits, config=tp.DecodeConfig(block_n, 4, 2, all_heads=True))
    ref = tp.reference_paged_attention(q, kc, vc, bt, lens, [1] * batch, d ** -0.5)
    assert rel_err(out, ref) < tol(DTYPES[0])


def test_all_heads_switch_picks_the_kernel_and_its_split_count_by_batch_size(monkeypatch) -> None:
    """From the switch's batch size on, a launch without a config takes the all-heads grid
    (requests, splits) with the splits of one program per request; below it, and with the
    switch off, the per-kv-head grid. Both compute the same attention."""
    launches: list[tuple[str, tuple]] = []

    def spy(name: str, kernel):  # type: ignore[no-untyped-def]
        class Spy:
            def __getitem__(self, grid):  # type: ignore[no-untyped-def]
                launches.append((name, tuple(grid)))
                return kernel[grid]
        return Spy()

    monkeypatch.setattr(tp, "_decode_kernel", spy("one_head", tp._decode_kernel))
    monkeypatch.setattr(tp, "_decode_all_heads_kernel", spy("all_heads", tp._decode_all_heads_kernel))
    rng = random.Random(11)
    for min_batch, batch, want in ((None, 3, "one_head"), (4, 3, "one_head"), (3, 3, "all_heads")):
        monkeypatch.setattr(tp, "_ALL_HEADS_MIN_BATCH", None)
        tp.set_all_heads_min_batch(min_batch)
        lens = [rng.randint(1, 90) for _ in range(batch)]
        num_blocks = sum((n + 15) // 16 for n in lens) + 2
        _, kc, vc = make_cache(num_blocks, 16, 2, 64, DTYPES[0], False)
        bt = random_tables(lens, 16, num_blocks, rng)
        q = torch.randn(batch, 8, 64, device=DEV).to(DTYPES[0])
        launches.clear()
        out = tp.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=DEV), 0.125)
        sms = tp._num_sms(q.device)
        assert launches == [(want, (batch, tp.num_decode_splits(batch, 1, sms)) if want == "all_heads"
                             else (batch, 2, tp.num_decode_splits(batch, 2, sms)))]
        assert rel_err(out, tp.reference_paged_attention(q, kc, vc, bt, lens, [1] * batch, 0.125)) < tol(DTYPES[0])


def test_decode_workspace_is_reused() -> None:
    rng = random.Random(7)
    lens = [37, 90]
    _, kc, vc = make_cache(20, 16, 2, 64, DTYPES[0], False)
    bt = random_tables(lens, 16, 20, rng)
    ws = tp.DecodeWorkspace(4, 8, 64, 8, DEV)
    q = torch.randn(2, 8, 64, device=DEV).to(DTYPES[0])
    out = tp.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=DEV), 0.125, num_splits=8, workspace=ws)
    ref = tp.reference_paged_attention(q, kc, vc, bt, lens, [1, 1], 0.125)
    assert rel_err(out, ref) < tol(DTYPES[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,page,interleaved", [(32, 8, 64, 16, False), (8, 2, 64, 16, True), (4, 4, 32, 8, False)])
def test_varlen_attention_mixed_batch(dtype, hq, hkv, d, page, interleaved) -> None:
    rng = random.Random(hq * 7 + d)
    # (context already cached, queries this step): a fresh prefill, a chunk after a cached prefix, decodes
    spec = [(0, 37), (20, 45), (63, 1), (5, 1), (0, 1), (16, 16)]
    lens = [c + n for c, n in spec]
    qlens = [n for _, n in spec]
    num_blocks = sum((n + page - 1) // page for n in lens) + 5
    _, kc, vc = make_cache(num_blocks, page, hkv, d, dtype, interleaved)
    bt = random_tables(lens, page, num_blocks, rng)
    T = sum(qlens)
    q = torch.randn(T, hq, d, device=DEV).to(dtype)
    out = torch.full_like(q, float("nan"))
    bq = tp.varlen_block_q(hq, hkv, max(qlens))
    tiles = torch.tensor(tp.varlen_tiles(qlens, bq), dtype=torch.int32, device=DEV)
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32, device=DEV)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
    tp.paged_varlen_attention(q, kc, vc, bt, seq, cu, tiles, bq, d ** -0.5, out=out)
    ref = tp.reference_paged_attention(q, kc, vc, bt, lens, qlens, d ** -0.5)
    assert rel_err(out, ref) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 2048, 1000])
def test_rms_norm_and_fused_residual(dtype, n) -> None:
    x = torch.randn(5, n, device=DEV).to(dtype)
    w = (torch.rand(n, device=DEV) + 0.5).to(dtype)
    out = torch.full_like(x, float("nan"))
    fused_ops.rms_norm(x, w, 1e-5, out=out)
    ref = fused_ops.rms_norm_ref(x.double(), w.double(), 1e-5)
    assert rel_err(out, ref) < tol(dtype)

    res = torch.randn(5, n, device=DEV).to(dtype)
    x2, r2 = x.clone(), res.clone()
    fused_ops.add_rms_norm(x2, r2, w, 1e-5)
    r_ref = x.double() + res.double()
    assert rel_err(r2, r_ref) < tol(dtype)
    assert rel_err(x2, fused_ops.rms_norm_ref(r_ref, w.double(), 1e-5)) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype) -> None:
    x = torch.randn(7, 2 * 1408, device=DEV).to(dtype)
    out = torch.full((7, 1408), float("nan"), device=DEV, dtype=dtype)
    fused_ops.silu_and_mul(x, out=out)
    assert rel_err(out, fused_ops.silu_and_mul_ref(x.double())) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 64), (14, 2, 128)])
def test_rope_and_cache_write(dtype, hq, hkv, d) -> None:
    T, page, nb = 9, 16, 12
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device=DEV).to(dtype)
    q = qkv[:, : hq * d].view(T, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    pos = torch.randint(0, 500, (T,), device=DEV)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    ang = torch.arange(512, device=DEV).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1)
    _, kc, vc = make_cache(nb, page, hkv, d, dtype, True)
    kc.fill_(float("nan"))
    vc.fill_(float("nan"))
    slots = torch.tensor(random.Random(1).sample(range(nb * page), T), device=DEV)
    slots[3] = -1  # a padded row: no write
    fused_ops.rope_and_cache(q, k, v, pos, cos_sin, kc, vc, slots)
    q_ref = fused_ops.rope_ref(q0.double(), pos, cos_sin.double())
    k_ref = fused_ops.rope_ref(k0.double(), pos, cos_sin.double())
    assert rel_err(q, q_ref) < tol(dtype) and rel_err(k, k_ref) < tol(dtype)
    keep = slots >= 0
    s = slots[keep]
    assert rel_err(kc[s // page, s % page], k_ref[keep]) < tol(dtype)
    assert torch.equal(vc[s // page, s % page], v0[keep])
    assert torch.isnan(kc).sum().item() == (nb * page - (T - 1)) * hkv * d  # nothing else written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("epilogue,norm", [("store", True), ("store", False), ("residual", False), ("silu_mul", True)])
def test_skinny_linear(dtype, m, epilogue, norm) -> None:
    K, N = 320, 96
    x = torch.randn(m, K, device=DEV).to(dtype)
    w = (torch.randn(2 * N if epilogue == "silu_mul" else N, K, device=DEV) * 0.05).to(dtype)
    lnw = (torch.rand(K, device=DEV) + 0.5).to(dtype) if norm else None
    h = fused_ops.rms_norm_ref(x.double(), lnw.double(), 1e-5) if norm else x.double()
    y = h @ w.double().T
    if epilogue == "silu_mul":
        y = fused_ops.silu_and_mul_ref(y)
    if epilogue == "residual":
        res = torch.randn(m, N, device=DEV).to(dtype)
        ref = res.double() + y
        out = res.clone()
    else:
        ref = y
        out = torch.full((m, N), float("nan"), device=DEV, dtype=dtype)
    fused_ops.skinny_linear(x, w, out=out, norm_weight=lnw, eps=1e-5, epilogue=epilogue)
    assert rel_err(out, ref) < tol(dtype)


@pytest.fixture
def skinny_cfg():
    """Set skinny-GEMM configs for a test; the module's table is restored afterwards."""
    saved = dict(fused_ops._SKINNY_CFG)
    yield fused_ops.set_skinny_config
    fused_ops._SKINNY_CFG.clear()
    fused_ops._SKINNY_CFG.update(saved)


SPLITK_DTYPES = [torch.bfloat16, torch.float16] if DEV == "cuda" else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", SPLITK_DTYPES)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("split", [1, 2, 4, 3, 16])
@pytest.mark.parametrize("epilogue,norm", [("store", True), ("store", False), ("residual", False), ("silu_mul", True)])
def test_skinny_linear_split_k(skinny_cfg, dtype, m, split, epilogue, norm) -> None:
    """Split-K against the float64 reference: K = 600 is 10 blocks of 64 (the last one partial),
    so splits 4 and 3 cut it unevenly and 16 is clamped to one block per split; N = 80 leaves
    the last 32-column tile half masked. The same call runs twice (as a graph replays): the
    arrival counters must be back at zero and the result bit-identical."""
    K, N = 600, 80
    epi = fused_ops.SKINNY_EPILOGUES[epilogue]
    skinny_cfg(N, K, epi, (32, 64, 4, 2, split))
    x = torch.randn(m, K, device=DEV).to(dtype)
    w = (torch.randn(2 * N if epilogue == "silu_mul" else N, K, device=DEV) * 0.05).to(dtype)
    lnw = (torch.rand(K, device=DEV) + 0.5).to(dtype) if norm else None
    # rounded to the weights' dtype where the kernel rounds: the normed x, gate and up
    h = fused_ops.rms_norm_ref(x.double(), lnw.double(), 1e-5).to(dtype).double() if norm else x.double()
    y = h @ w.double().T
    if epilogue == "silu_mul":
        y = fused_ops.silu_and_mul_ref(y.to(dtype).double())
    res = torch.randn(m, N, device=DEV).to(dtype)
    ref = res.double() + y if epilogue == "residual" else y
    limit = tol(dtype)
    outs, bufs = [], []
    for _ in range(2):
        out = res.clone() if epilogue == "residual" else torch.full((m, N), float("nan"), device=DEV, dtype=dtype)
        fused_ops.skinny_linear(x, w, out=out, norm_weight=lnw, eps=1e-5, epilogue=epilogue)
        assert rel_err(out, ref) < limit
        if split > 1:
            part, cnt = fused_ops._SPLITK_WS[x.device]  # keyed by the tensors' device (cuda:0, not cuda)
            assert int(cnt.abs().sum()) == 0, "split-K arrival counters not reset"
            bufs.append((part.data_ptr(), cnt.data_ptr()))
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert len(set(bufs)) <= 1, "the second call allocated a new workspace"


def test_skinny_split_k_workspace_grows_without_freeing(skinny_cfg) -> None:
    """A larger split-K call grows the workspace; the smaller pair stays alive (a captured
    graph may still point at it) and both shapes stay correct afterwards."""
    dev = torch.empty(0, device=DEV).device  # with its index, as the workspace is keyed
    fused_ops._SPLITK_WS.pop(dev, None)
    shapes = [(64, 256), (512, 1024), (64, 256)]  # (N, K): small, large (grows), small again
    for n, k in shapes:
        skinny_cfg(n, k, 0, (16, 64, 4, 2, 4))
        x = torch.randn(2, k, device=DEV)
        w = torch.randn(n, k, device=DEV) * 0.05
        out = fused_ops.skinny_linear(x, w)
        assert rel_err(out, x.double() @ w.double().T) < tol(torch.float32)
    part, cnt = fused_ops._SPLITK_WS[dev]
    assert part.numel() >= 4 * 2 * 512 and cnt.numel() >= 512 // 16
    old = fused_ops._SPLITK_RETIRED[-1]
    assert old[0].numel() < part.numel() and int(old[1].abs().sum()) == 0 and int(cnt.abs().sum()) == 0


def test_skinny_config_has_a_split_field(skinny_cfg) -> None:
    """One program per column tile by default; four splits for a long reduction over few
    columns (Llama-3.2-1B's down projection: the H200 sweep's winner)."""
    assert all(len(fused_ops.skinny_config(n, k, e)) == 5 and fused_ops.skinny_config(n, k, e)[4] == 1
               for n, k, e in [(2048, 2048, 1), (8192, 2048, 2), (3072, 2048, 0), (128256, 2048, 0)])
    assert fused_ops.skinny_config(2048, 8192, 1) == (32, 128, 4, 4, 4)
    with pytest.raises(ValueError):
        skinny_cfg(2048, 2048, 1, (16, 512, 4, 3))


@pytest.mark.parametrize("m,n", [(1, 128256), (5, 1000), (3, 4096)])
def test_argmax_rows(m, n) -> None:
    x = torch.randn(m, n, device=DEV).to(DTYPES[0])
    x[0, n // 3] = 100.0  # a clear winner
    x[-1, 7] = x[-1, n - 1] = 200.0  # a tie: the first index wins
    out = torch.full((m,), -1, dtype=torch.long, device=DEV)
    fused_ops.argmax_rows(x, out=out)
    assert out[-1].item() == 7 and (m == 1 or out[0].item() == n // 3)
    assert torch.equal(out, x.float().argmax(-1))


@pytest.mark.parametrize("T", [1, 3, 256, 1500])
def test_step_inputs_gathers_ids_positions_and_slots(T) -> None:
    """The packed step (rows, positions; -1 = padding) -> input ids from the token buffer,
    clamped positions and KV slots through the block table: equal to the torch gathers."""
    rows_n, row_len, page, max_blocks = 9, 200, 16, 13
    tokens = torch.randint(0, 50_000, (rows_n, row_len), device=DEV)
    bt = torch.randint(0, 4_000, (rows_n, max_blocks), device=DEV)
    rows = torch.randint(0, rows_n, (T,), device=DEV)
    pos = torch.randint(0, row_len, (T,), device=DEV)
    pos[::7] = -1  # padding tokens
    d = torch.cat([rows, pos, torch.full((5,), 12345, device=DEV)])  # more packed fields follow in the real stage
    got = fused_ops.step_inputs(d, T, tokens, bt, page)
    want = fused_ops.step_inputs_ref(d, T, tokens, bt, page)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert (got[2][pos < 0] == -1).all() and (got[1] >= 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts compiled kernels (the interpreter compiles none)")
def test_step_inputs_compiles_one_kernel_for_every_step_size() -> None:
    """A mixed step of any size (eager, past the captured graphs) must not compile a new
    kernel in the middle of a run: the sizes and offsets are not specialised on."""
    rows_n, row_len, page, max_blocks = 9, 200, 16, 13
    tokens = torch.randint(0, 50_000, (rows_n, row_len), device=DEV)
    bt = torch.randint(0, 4_000, (rows_n, max_blocks), device=DEV)
    kernel = fused_ops._step_inputs_kernel
    before = sum(len(c[0]) for c in kernel.device_caches.values())
    for T in (1, 3, 16, 17, 255, 256, 1024, 1500, 2048):
        d = torch.cat([torch.randint(0, rows_n, (T,), device=DEV), torch.randint(0, row_len, (T,), device=DEV)])
        fused_ops.step_inputs(d, T, tokens, bt, page)
    assert sum(len(c[0]) for c in kernel.device_caches.values()) - before <= 1


def test_decode_and_varlen_read_block_tables_through_rows() -> None:
    """Persistent per-slot block tables: request b uses table row rows[b]."""
    rng = random.Random(11)
    dtype = DTYPES[0]
    lens = [50, 3, 77]
    page, nb = 16, 40
    _, kc, vc = make_cache(nb, page, 2, 64, dtype, False)
    bt = random_tables(lens, page, nb, rng)
    big = torch.zeros(9, bt.shape[1], dtype=torch.int32, device=DEV)
    rows = torch.tensor([6, 0, 3], dtype=torch.int32, device=DEV)
    big[rows.long()] = bt
    q = torch.randn(3, 8, 64, device=DEV).to(dtype)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ref = tp.reference_paged_attention(q, kc, vc, bt, lens, [1, 1, 1], 0.125)
    for splits in (1, 4):
        out = tp.paged_decode_attention(q, kc, vc, big, seq, 0.125, num_splits=splits, rows=rows)
        assert rel_err(out, ref) < tol(dtype)
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEV)
    tiles = torch.tensor(tp.varlen_tiles([1, 1, 1], 1), dtype=torch.int32, device=DEV)
    out = tp.paged_varlen_attention(q, kc, vc, big, seq, cu, tiles, 1, 0.125, rows=rows)
    assert rel_err(out, ref) < tol(dtype)


# ---------------------------------------------------------------- MoE grouped experts (executors/torch/moe_triton.py)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_moe_grouped_experts_match_the_reference(dtype, tokens, act) -> None:
    """The Triton grouped-expert MLP equals layers.grouped_experts (the CPU path) on skewed
    routing (some experts unused, one hot), with sizes that are not tile multiples; the
    router's weights are applied once per (token, k) pair."""
    from aiosched.executors.torch import moe_triton
    from aiosched.executors.torch.layers import grouped_experts, route_topk

    g = torch.Generator().manual_seed(tokens)
    E, K, H, inter = 8, 2, 80, 96
    x = torch.randn(tokens, H, generator=g).to(DEV, dtype)
    gate_up = (torch.randn(E, 2 * inter, H, generator=g) * 0.1).to(DEV, dtype)
    down = (torch.randn(E, H, inter, generator=g) * 0.1).to(DEV, dtype)
    logits = torch.randn(tokens, E, generator=g)
    logits[:, 3] += 2.0  # a hot expert
    logits[:, 6] -= 50.0  # never chosen
    weights, ids = route_topk(logits.to(DEV, dtype), K, renormalize=True)
    ref = grouped_experts(x.float(), gate_up.float(), down.float(), ids, weights.float(), act)
    for blocks in (None, (16, 32, 16)):
        out = moe_triton.fused_experts(x, gate_up, down, ids, weights, act, block_sizes=blocks)
        assert out.shape == x.shape and out.dtype == dtype
        assert rel_err(out, ref) < tol(dtype) * 2


def test_moe_align_pairs_covers_every_pair_once_per_expert_tile() -> None:
    from aiosched.executors.torch import moe_triton

    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [5, 3]], device=DEV)
    sorted_ids, tile_expert = moe_triton.align_pairs(ids, num_experts=8, block_m=4)
    n = ids.numel()
    flat = ids.reshape(-1).cpu()
    s, te = sorted_ids.cpu(), tile_expert.cpu()
    real = s[s < n]
    assert sorted(real.tolist()) == list(range(n))  # every (token, k) pair exactly once
    for tile, e in enumerate(te.tolist()):
        pairs = s[tile * 4:(tile + 1) * 4]
        pairs = pairs[pairs < n]
        if e < 0:
            assert len(pairs) == 0
        else:
            assert len(pairs) > 0 and all(flat[p] == e for p in pairs.tolist())
    assert te.tolist()[:4] == [0, 1, 3, 5]  # experts 0, 1, 3 (4 pairs: one tile), 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the model's CUDA dispatch needs a CUDA device")
def test_moe_model_layer_on_cuda_uses_the_kernel_and_matches_cpu(monkeypatch) -> None:
    from aiosched.executors.torch import moe_triton
    from aiosched.executors.torch.models.qwen3_moe import SparseMoeBlock
    from aiosched.executors.model_config import ModelConfig, RopeConfig

    args = ModelConfig(arch="Qwen3MoeForCausalLM", model_type="qwen3_moe", vocab_size=64, hidden_size=64, intermediate_size=96,
                       num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope=RopeConfig(),
                       max_position_embeddings=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       norm_topk_prob=True, moe_layers=(True,))
    torch.manual_seed(0)
    block = SparseMoeBlock(args)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(33, 64)
    with torch.no_grad():
        ref = block(x)
        calls = []
        real = moe_triton.fused_experts
        monkeypatch.setattr(moe_triton, "fused_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
        out = block.cuda()(x.cuda())
    assert calls and rel_err(out.cpu(), ref) < 1e-4


# ---------------------------------------------------------------- sliding window and soft-capping (Gemma, Phi-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,softcap", [(24, None), (None, 0.7), (9, 0.7)])
def test_window_and_softcap_decode_and_varlen(dtype, window, softcap) -> None:
    """Decode (1 and 4 splits: with a window some splits see no key) and varlen tiles (a chunk
    after a cached prefix, decodes) equal the float32 reference, which equals the torch paged
    attention the models run elsewhere (attention/torch_paged.py)."""
    from aiosched.executors.torch.attention import torch_paged

    rng = random.Random(window or 3)
    page, hq, hkv, d = 8, 8, 2, 64
    spec = [(0, 37), (20, 45), (63, 1), (5, 1), (0, 1)]
    lens, qlens = [c + n for c, n in spec], [n for _, n in spec]
    num_blocks = sum((n + page - 1) // page for n in lens) + 5
    _, kc, vc = make_cache(num_blocks, page, hkv, d, dtype, False)
    bt = random_tables(lens, page, num_blocks, rng)
    T, scale = sum(qlens), d ** -0.5
    q = torch.randn(T, hq, d, device=DEV).to(dtype) * 2
    ref = tp.reference_paged_attention(q, kc, vc, bt, lens, qlens, scale, window=window, softcap=softcap)
    if dtype == torch.float32:
        tables = [bt[r].tolist() for r in range(len(lens))]
        meta = torch_paged.AttentionMetadata(torch.zeros(T, dtype=torch.int64), [0] + torch.tensor(qlens).cumsum(0).tolist(),
                                             lens, tables, page)
        model_path = torch_paged.torch_paged_attention(q.cpu(), kc.cpu(), vc.cpu(), meta, scale, window, softcap)
        assert rel_err(model_path, ref.cpu()) < 1e-5
    out = torch.full_like(q, float("nan"))
    bq = tp.varlen_block_q(hq, hkv, max(qlens))
    tiles = torch.tensor(tp.varlen_tiles(qlens, bq), dtype=torch.int32, device=DEV)
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32, device=DEV)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
    tp.paged_varlen_attention(q, kc, vc, bt, seq, cu, tiles, bq, scale, out=out, window=window, softcap=softcap)
    assert rel_err(out, ref) < tol(dtype)
    # decode: the last token of every request
    last = [sum(qlens[:r + 1]) - 1 for r in range(len(lens))]
    qd = q[last].contiguous()
    ref_d = tp.reference_paged_attention(qd, kc, vc, bt, lens, [1] * len(lens), scale, window=window, softcap=softcap)
    for splits, cfg in itertools.product((1, 4), (None, tp.DecodeConfig(16, 4, 2, all_heads=True))):
        out_d = tp.paged_decode_attention(qd, kc, vc, bt, seq, scale, num_splits=splits, window=window, softcap=softcap, config=cfg)
        assert rel_err(out_d, ref_d) < tol(dtype), (splits, cfg)


# ---------------------------------------------------------------- opt-in PDL (issue 21)

PDL_KERNELS = {
    fused_ops: ["_step_inputs_kernel", "_rms_norm_kernel", "_silu_mul_kernel", "_rope_cache_kernel",
                "_skinny_gemm_kernel", "_argmax_partial_kernel", "_argmax_final_kernel"],
    tp: ["_decode_kernel", "_decode_all_heads_kernel", "_decode_reduce_kernel"],
}


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` records (name, kw), runs nothing."""

    def __init__(self, name: str, calls: list[tuple[str, dict]]) -> None:
        self.name, self.calls = name, calls

    def __getitem__(self, grid):  # type: ignore[no-untyped-def]
        return lambda *args, **kw: self.calls.append((self.name, kw))


def _every_decode_launch() -> None:
    """One call of each wrapper whose kernel is on the decode path (outputs unused)."""
    f32 = torch.float32
    d = torch.tensor([0, 1, 1, 5, 7, -1], device=DEV)
    fused_ops.step_inputs(d, 3, torch.zeros(2, 16, dtype=torch.long, device=DEV), torch.zeros(2, 4, dtype=torch.long, device=DEV), 4)
    x, w = torch.randn(3, 64, device=DEV), torch.ones(64, device=DEV)
    fused_ops.rms_norm(x, w, 1e-5)
    fused_ops.add_rms_norm(x, x.clone(), w, 1e-5)
    fused_ops.silu_and_mul(torch.randn(3, 128, device=DEV))
    q, k = torch.randn(3, 4, 32, device=DEV), torch.randn(3, 2, 32, device=DEV)
    _, kc, vc = make_cache(4, 8, 2, 32, f32, False)
    fused_ops.rope_and_cache(q, k, k.clone(), torch.arange(3, device=DEV), torch.randn(16, 32, device=DEV), kc, vc,
                             torch.arange(3, device=DEV))
    fused_ops.skinny_linear(torch.randn(1, 64, device=DEV), torch.randn(32, 64, device=DEV))
    fused_ops.argmax_rows(torch.randn(2, 5000, device=DEV))
    bt = torch.zeros(3, 2, dtype=torch.int32, device=DEV)
    tp.paged_decode_attention(q, kc, vc, bt, torch.full((3,), 9, dtype=torch.int32, device=DEV), 0.2, num_splits=2)
    tp.paged_decode_attention(q, kc, vc, bt, torch.full((3,), 9, dtype=torch.int32, device=DEV), 0.2, num_splits=1,
                              config=tp.DecodeConfig(16, 4, 2, all_heads=True))


@pytest.mark.parametrize("on", [False, True])
def test_pdl_switch_sets_launch_pdl_and_the_constexpr_on_every_decode_kernel(monkeypatch, on) -> None:
    """Switch on (on a Hopper device, outside the interpreter): every decode-path kernel is
    launched with PDL=True and launch_pdl=True; off: with neither (today's launch)."""
    calls: list[tuple[str, dict]] = []
    for mod, names in PDL_KERNELS.items():
        for name in names:
            monkeypatch.setattr(mod, name, _LaunchRecorder(name, calls))
    monkeypatch.setattr(fused_ops, "_INTERPRET", False)  # what a GPU run sees
    monkeypatch.setattr(fused_ops, "use_triton", lambda t: True)
    monkeypatch.setattr(fused_ops, "_pdl_capable", lambda device: True)
    monkeypatch.setattr(fused_ops, "_PDL", False)
    fused_ops.set_pdl(on)
    assert fused_ops.pdl_enabled() is on
    with torch.random.fork_rng():  # leave the other tests' random draws as they were
        _every_decode_launch()
    assert {n for n, _ in calls} == {n for names in PDL_KERNELS.values() for n in names}
    for name, kw in calls:
        if on:
            assert kw.get("PDL") is True and kw.get("launch_pdl") is True, name
        else:
            assert "PDL" not in kw and "launch_pdl" not in kw, name


def test_pdl_needs_hopper(monkeypatch) -> None:
    """griddepcontrol is sm_90 PTX: other devices (and the CPU) keep today's launch."""
    monkeypatch.setattr(fused_ops, "_INTERPRET", False)
    monkeypatch.setattr(fused_ops, "_PDL", True)
    assert fused_ops.pdl_kwargs(torch.device("cpu")) == {}
    monkeypatch.setattr(fused_ops, "_pdl_capable", lambda device: True)
    assert fused_ops.pdl_kwargs(torch.device("cpu")) == {"PDL": True, "launch_pdl": True}


def test_pdl_switch_reads_the_environment_once() -> None:
    import subprocess
    import sys

    code = "from aiosched.executors.torch import fused_ops as f; print(f._PDL)"
    for val, want in (("1", "True"), ("0", "False"), (None, "True")):  # on unless turned off
        env = {k: v for k, v in os.environ.items() if k != "AIOSCHED_PDL"}
        if val is not None:
            env["AIOSCHED_PDL"] = val
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert out.strip() == want


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="PDL launches need a Hopper (sm_90+) device")
def test_pdl_launches_compute_the_same_bits_on_the_gpu(monkeypatch) -> None:
    """PDL only moves when a kernel may start: every decode-path kernel gives the same bits
    with it on and off (split-K partial sums and split decode merges included)."""
    monkeypatch.setattr(fused_ops, "_PDL", False)
    with torch.random.fork_rng():
        off = _decode_path_results()
        fused_ops.set_pdl(True)
        assert fused_ops.pdl_kwargs(torch.device(DEV)) == {"PDL": True, "launch_pdl": True}
        on = _decode_path_results()
    assert all(torch.equal(a, b) for a, b in zip(off, on))


def _decode_path_results() -> list[torch.Tensor]:
    """Outputs of the covered kernels on fixed inputs (split-K skinny GEMM and split decode included)."""
    torch.manual_seed(5)  # make_cache draws from the global generator too
    dt = DTYPES[0]
    rnd = lambda *s: torch.randn(*s, device=DEV).to(dt)  # noqa: E731
    x, w = rnd(3, 256), rnd(256).abs() + 0.5
    out = [fused_ops.rms_norm(x, w, 1e-5)]
    xa, ra = x.clone(), rnd(3, 256)
    out += list(fused_ops.add_rms_norm(xa, ra, w, 1e-5))
    out.append(fused_ops.silu_and_mul(rnd(3, 512)))
    saved = dict(fused_ops._SKINNY_CFG)
    try:
        fused_ops.set_skinny_config(64, 512, 1, (16, 64, 4, 2, 3))  # three K splits
        res = rnd(2, 64)
        out.append(fused_ops.skinny_linear(rnd(2, 512), rnd(64, 512), out=res, epilogue="residual"))
    finally:
        fused_ops._SKINNY_CFG.clear()
        fused_ops._SKINNY_CFG.update(saved)
    out.append(fused_ops.argmax_rows(rnd(2, 9000)))
    lens = [20, 9]
    _, kc, vc = make_cache(8, 8, 2, 32, dt, False)
    bt = random_tables(lens, 8, 8, random.Random(2))
    out.append(tp.paged_decode_attention(rnd(2, 4, 32), kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=DEV), 0.2,
                                         num_splits=3))
    return out


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's forced-off switch")
def test_pdl_is_forced_off_under_the_interpreter(monkeypatch) -> None:
    """The interpreter has no griddepcontrol (inline asm): with the switch set, nothing
    changes; the kernels run as today and give the same bits."""
    monkeypatch.setattr(fused_ops, "_pdl_capable", lambda device: True)  # even where the device would allow it
    monkeypatch.setattr(fused_ops, "_PDL", False)
    with torch.random.fork_rng():  # leave the other tests' random draws as they were
        off = _decode_path_results()
        fused_ops.set_pdl(True)
        assert not fused_ops.pdl_enabled() and fused_ops.pdl_kwargs(torch.device(DEV)) == {}
        on = _decode_path_results()
    assert all(torch.equal(a, b) for a, b in zip(off, on))
