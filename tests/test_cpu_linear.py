"""CPU float32 linears through oneDNN (layers.linear) and the two-pass CPU greedy argmax
(sampler.greedy_argmax): same results as F.linear / torch.argmax, the env switch back to
F.linear, and a model whose LM head takes oneDNN still gives HF transformers' logits and
greedy tokens (the parity tests' vocab of 512 is too narrow for the oneDNN path, so this
file runs one with a 20,000-token vocabulary)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from aiosched.executors.torch import layers
from aiosched.executors.torch.layers import CPU_LINEAR_ENV, Linear, PackedWeight, linear, onednn_pays
from aiosched.executors.torch.sampler import ARGMAX_CHUNK, greedy_argmax

needs_onednn = pytest.mark.skipif(not layers._ONEDNN, reason="no oneDNN linear ops in this torch / not x86")
WIDE = 20000  # >= layers.ONEDNN_MIN_OUT: a vocabulary-wide layer, the one oneDNN takes


def _ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear(rows: int, bias: bool, monkeypatch) -> None:
    monkeypatch.delenv(CPU_LINEAR_ENV, raising=False)
    g = torch.Generator().manual_seed(rows)
    lin = Linear(256, WIDE, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
        if bias:
            lin.bias.normal_(0, 0.05, generator=g)
    x = torch.randn(rows, 256, generator=g)
    with torch.inference_mode():
        ops = _ops(lambda: lin(x))
        out = lin(x)
    assert "mkldnn::_linear_pointwise" in ops  # the oneDNN GEMM ran, not MKL's
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
    assert out.shape == (rows, WIDE)


@needs_onednn
def test_env_flag_selects_f_linear(monkeypatch) -> None:
    lin = Linear(256, WIDE, bias=False)
    x = torch.randn(64, 256)
    monkeypatch.setenv(CPU_LINEAR_ENV, "torch")
    with torch.inference_mode():
        ops = _ops(lambda: lin(x))
        out = lin(x)
    assert "mkldnn::_linear_pointwise" not in ops
    assert torch.equal(out, F.linear(x, lin.weight))  # the very same op: bitwise
    monkeypatch.delenv(CPU_LINEAR_ENV)
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in _ops(lambda: lin(x))


@needs_onednn
def test_narrow_layers_grad_and_other_dtypes_keep_f_linear(monkeypatch) -> None:
    monkeypatch.delenv(CPU_LINEAR_ENV, raising=False)
    narrow, wide = Linear(256, 768), Linear(256, WIDE)
    x = torch.randn(64, 256)
    assert not onednn_pays(64, 256, 768) and onednn_pays(64, 256, WIDE)
    assert not onednn_pays(1, 2048, 32000)  # one row over a wide input: MKL was faster
    # projections of hidden >= 512 models from 8 rows on; not at one row, not 256 wide
    assert onednn_pays(8, 512, 1536) and onednn_pays(512, 1408, 512) and onednn_pays(64, 1024, 5632)
    assert not onednn_pays(7, 512, 1536) and not onednn_pays(64, 704, 256) and not onednn_pays(512, 256, 1408)
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: narrow(x))
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: wide.to(torch.bfloat16)(x.bfloat16()))
    wide = Linear(256, WIDE)
    y = wide(x)  # autograd on: oneDNN's op has no backward here, F.linear keeps it differentiable
    y.sum().backward()
    assert wide.weight.grad is not None


@needs_onednn
def test_packed_weight_follows_in_place_loads(monkeypatch) -> None:
    monkeypatch.delenv(CPU_LINEAR_ENV, raising=False)
    lin = Linear(64, WIDE, bias=False)
    x = torch.randn(16, 64)
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(WIDE, 64))  # as the loader writes a checkpoint tensor
    with torch.inference_mode():
        after = lin(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, F.linear(x, lin.weight), atol=1e-4, rtol=1e-4)
    # The functional form with a shared cache (the tied LM head) does the same.
    cache, w = PackedWeight(), torch.randn(WIDE, 64)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, None, cache), x @ w.t(), atol=1e-4, rtol=1e-4)


@needs_onednn
def test_model_through_onednn_gives_hf_logits_and_greedy_tokens(tmp_path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    from aiosched.executors.torch.random_checkpoint import write_random_checkpoint
    from paged_model import PagedModel

    monkeypatch.delenv(CPU_LINEAR_ENV, raising=False)
    path = write_random_checkpoint(tmp_path / "wide", seed=3, vocab_size=WIDE)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = PagedModel(path, 96, 4, 512)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, WIDE, (n,), generator=g).tolist() for n in (1, 9, 17)]
    with torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = ours.step([(i, s, 0) for i, s in enumerate(seqs)])
        ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_linear_pointwise" in ops
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf(torch.tensor([s])).logits[0].float()
        torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=1e-4)
        assert torch.equal(out[i].argmax(-1), ref.argmax(-1))


@needs_onednn
def test_hidden_512_projections_through_onednn_give_hf_tokens(tmp_path, monkeypatch) -> None:
    """A hidden-512 GQA model: its projections take oneDNN on steps of >= 8 rows (a prefill
    chunk, then 9 decode rows through the decode attention kernel); HF's logits and greedy tokens."""
    transformers = pytest.importorskip("transformers")
    from aiosched.executors.torch.random_checkpoint import write_random_checkpoint
    from paged_model import PagedModel

    monkeypatch.delenv(CPU_LINEAR_ENV, raising=False)
    path = write_random_checkpoint(tmp_path / "h512", seed=4, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                                   intermediate_size=1024)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = PagedModel(path, 96, 4, 512)
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 9, 12, 5, 7, 16, 2, 10, 11)]
    with torch.inference_mode():
        ours.step([(i, s[:-1], 0) for i, s in enumerate(seqs)])  # the prompts but their last token
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = ours.step([(i, s[-1:], len(s) - 1) for i, s in enumerate(seqs)])  # 9 decode rows
        ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_linear_pointwise" in ops
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf(torch.tensor([s])).logits[0, -1:].float()
        torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=1e-4)
        assert torch.equal(out[i].argmax(-1), ref.argmax(-1))


# ---------------------------------------------------------------------------
# The CPU greedy argmax
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 32000), (8, 32001), (9, 2 * ARGMAX_CHUNK), (3, 32000), (16, 700), (130, 5000)])
def test_greedy_argmax_equals_torch_argmax(shape: tuple[int, int]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    assert torch.equal(greedy_argmax(x), x.argmax(-1))
    out = torch.empty(shape[0], dtype=torch.long)
    assert greedy_argmax(x, out=out) is out and torch.equal(out, x.argmax(-1))


def test_greedy_argmax_ties_nan_and_inf_as_torch() -> None:
    V = 10 * ARGMAX_CHUNK + 37  # a ragged tail chunk
    x = torch.randn(12, V, generator=torch.Generator().manual_seed(1))
    x[0, 5 * ARGMAX_CHUNK + 3] = x[0, 2 * ARGMAX_CHUNK + 9] = 50.0  # tie across chunks: the first wins
    x[1, 7] = x[1, 8] = 50.0  # tie inside a chunk
    x[2, V - 1] = 50.0  # the max in the tail
    x[3] = float("-inf")  # every token banned
    x[4] = 1.0  # a constant row
    x[5, -3:] = 60.0  # tie in the tail only, clamped duplicates after it
    assert torch.equal(greedy_argmax(x), x.argmax(-1))
    x[6, 11] = float("nan")
    assert torch.equal(greedy_argmax(x), x.argmax(-1))
    assert torch.equal(greedy_argmax(x[:, 1:]), x[:, 1:].argmax(-1))  # a strided view


def test_argmax_env_flag_selects_torch_argmax(monkeypatch) -> None:
    x = torch.randn(64, 32000)
    monkeypatch.setenv("AIOSCHED_CPU_ARGMAX", "torch")
    with torch.inference_mode():
        assert "aten::amax" not in _ops(lambda: greedy_argmax(x))
    monkeypatch.delenv("AIOSCHED_CPU_ARGMAX")
    with torch.inference_mode():
        assert "aten::amax" in _ops(lambda: greedy_argmax(x))  # the two-pass path ran


@needs_onednn
def test_layer_built_under_inference_mode(monkeypatch) -> None:
    monkeypatch.delenv(CPU_LINEAR_ENV, raising=False)
    with torch.inference_mode():  # its weight is an inference tensor: no version counter
        lin = Linear(64, WIDE, bias=True)
        x = torch.randn(32, 64)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
