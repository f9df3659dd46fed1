"""Our torch model over the paged KV cache gives HF transformers' logits.

Tiny random float32 checkpoints of each supported architecture are run through
`aiosched.executors.torch.models.llama` exactly as the runner runs them (one flattened ragged batch,
non-contiguous block tables, several requests per step) and compared with
`AutoModelForCausalLM` run on each full sequence at once: a mixed-length prefill, then
decode steps that read everything from the cache, and a prompt prefilled in two chunks.
"""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aiosched.executors.torch.attention.torch_paged import AttentionMetadata  # noqa: E402
from aiosched.executors.torch.loader import build_model  # noqa: E402
from aiosched.executors.torch.models.llama import LlamaForCausalLM  # noqa: E402
from aiosched.executors.torch.random_checkpoint import write_random_checkpoint  # noqa: E402
from paged_model import PagedModel  # noqa: E402

BLOCK = 4
NUM_BLOCKS = 96
DECODE_STEPS = 4
ATOL = 2e-4

# llama3 RoPE scaling with a short original context so it changes most frequencies here.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
CASES = {
    "llama": dict(arch="llama"),
    "llama-rope-llama3": dict(arch="llama", rope_scaling=LLAMA3_SCALING),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32),  # head_dim != hidden / heads, as in Qwen3
    "mistral": dict(arch="mistral", num_kv_heads=1),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> tuple[pathlib.Path, torch.nn.Module]:
    path = write_random_checkpoint(tmp_path_factory.mktemp(request.param), seed=7, **CASES[request.param])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def _sequences(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_logits(hf: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


def test_ragged_prefill_then_decode(case) -> None:
    path, hf = case
    ours = PagedModel(path, NUM_BLOCKS, BLOCK, 512)
    prompts_len = [1, 7, 13, 4, 22]
    seqs = _sequences(ours.model.args.vocab_size, [n + DECODE_STEPS for n in prompts_len])
    ref = [_hf_logits(hf, s) for s in seqs]
    # Prefill every prompt in one ragged step; all positions' logits must match.
    out = ours.step([(i, s[:n], 0) for i, (s, n) in enumerate(zip(seqs, prompts_len))])
    for i, n in enumerate(prompts_len):
        torch.testing.assert_close(out[i], ref[i][:n], atol=ATOL, rtol=1e-4)
    # Decode: one token per request per step, everything else comes from the cache.
    for d in range(DECODE_STEPS - 1):
        out = ours.step([(i, [s[n + d]], n + d) for i, (s, n) in enumerate(zip(seqs, prompts_len))])
        for i, n in enumerate(prompts_len):
            torch.testing.assert_close(out[i][0], ref[i][n + d], atol=ATOL, rtol=1e-4)


def test_chunked_prefill_mixed_with_decodes(case) -> None:
    """A prompt prefilled in two chunks (next to other requests' prefills and decodes)
    gives the logits of the unchunked run."""
    path, hf = case
    ours = PagedModel(path, NUM_BLOCKS, BLOCK, 512)
    a, b = _sequences(ours.model.args.vocab_size, [19, 9], seed=1)
    ref_a, ref_b = _hf_logits(hf, a), _hf_logits(hf, b)
    out = ours.step([(0, a[:11], 0), (1, b[:8], 0)])
    torch.testing.assert_close(out[0], ref_a[:11], atol=ATOL, rtol=1e-4)
    out = ours.step([(1, b[8:9], 8), (0, a[11:], 11)])  # b decodes while a's second chunk runs
    torch.testing.assert_close(out[0][0], ref_b[8], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[1], ref_a[11:], atol=ATOL, rtol=1e-4)


def test_transformers_v5_config_layout(tmp_path) -> None:
    """transformers >= 5 writes `rope_parameters` (theta and scaling in one dict) instead of
    `rope_theta` / `rope_scaling`: a save_pretrained dir must load with the same RoPE."""
    src = write_random_checkpoint(tmp_path / "src", arch="llama", seed=2, rope_theta=5000.0, rope_scaling=LLAMA3_SCALING)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "v5")
    saved = json.loads((tmp_path / "v5" / "config.json").read_text())
    if "rope_parameters" not in saved:
        pytest.skip("this transformers writes the old rope layout")
    ours = PagedModel(tmp_path / "v5", NUM_BLOCKS, BLOCK, 512)
    assert ours.model.args.rope.theta == 5000.0 and ours.model.args.rope.kind == "llama3"
    (seq,) = _sequences(ours.model.args.vocab_size, [30])
    torch.testing.assert_close(ours.step([(0, seq, 0)])[0], _hf_logits(hf, seq), atol=ATOL, rtol=1e-4)


def test_missing_lm_head_ties_to_the_embedding(tmp_path) -> None:
    """A checkpoint without lm_head.weight uses the embedding as the head, as HF does."""
    from safetensors.torch import load_file, save_file

    path = write_random_checkpoint(tmp_path, arch="llama", seed=4, tie_word_embeddings=False)
    sd = load_file(str(path / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    ours = PagedModel(path, NUM_BLOCKS, BLOCK, 512)
    assert ours.model.lm_head is None
    (seq,) = _sequences(ours.model.args.vocab_size, [5])
    hidden_logits = ours.step([(0, seq, 0)])[0]
    assert hidden_logits.shape == (5, ours.model.args.vocab_size)


def test_mistral_sliding_window_caps_the_context(tmp_path) -> None:
    from aiosched.executors.torch.models.llama import ModelArgs

    path = write_random_checkpoint(tmp_path, arch="mistral", max_position_embeddings=1024)
    cfg = json.loads((path / "config.json").read_text())
    assert ModelArgs.from_hf({**cfg, "sliding_window": 256}).max_position_embeddings == 256
    assert ModelArgs.from_hf({**cfg, "sliding_window": None}).max_position_embeddings == 1024
    qwen = {**cfg, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 256, "use_sliding_window": False}
    assert ModelArgs.from_hf(qwen).max_position_embeddings == 1024


def test_unsupported_architecture_is_named(tmp_path) -> None:
    path = write_random_checkpoint(tmp_path, arch="llama")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        build_model(str(path), "float32", "cpu")


def _logits_of(path: pathlib.Path, seq: list[int], dtype: str = "float32") -> torch.Tensor:
    model = build_model(str(path), dtype, "cpu")
    model.init_rope(64)
    a = model.args
    shape, dt = (8, BLOCK, a.num_kv_heads, a.head_dim), model.embed_tokens.weight.dtype
    kv = [(torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt)) for _ in range(a.num_layers)]
    n = len(seq)
    meta = AttentionMetadata(torch.arange(n), [0, n], [n], [list(range(8))], BLOCK)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(seq), torch.arange(n), meta, kv))


def test_sharded_checkpoint_and_dtype_conversion(tmp_path) -> None:
    """model.safetensors.index.json with two shards loads like the single file; a bf16
    checkpoint loads into float32 (and float32 into bf16) by conversion."""
    from safetensors.torch import load_file, save_file

    path = write_random_checkpoint(tmp_path, arch="qwen2", seed=6)
    seq = [3, 1, 4, 1, 5, 9, 2, 6]
    single = _logits_of(path, seq)
    sd = load_file(str(path / "model.safetensors"))
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(path / fname), metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(_logits_of(path, seq), single, atol=0, rtol=0)
    bf16 = _logits_of(path, seq, "bfloat16")
    assert bf16.dtype == torch.float32 and (bf16 - single).abs().max() < 0.5  # bf16 weights, float32 logits

    bf_dir = write_random_checkpoint(tmp_path / "bf16", arch="qwen2", seed=6, dtype="bfloat16")
    m = build_model(str(bf_dir), "float32", "cpu")
    assert m.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(m.embed_tokens.weight, sd["model.embed_tokens.weight"].bfloat16().float())


def test_checkpoint_errors_name_the_problem(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    path = write_random_checkpoint(tmp_path, arch="llama", seed=1)
    sd = load_file(str(path / "model.safetensors"))
    bad = dict(sd)
    del bad["model.layers.1.mlp.down_proj.weight"]
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj"):
        build_model(str(path), "float32", "cpu")
    bad = dict(sd)
    bad["model.layers.0.self_attn.k_proj.weight"] = bad["model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape"):
        build_model(str(path), "float32", "cpu")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        build_model(str(path), "float32", "cpu")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "missing.safetensors"}}))
    with pytest.raises(ValueError, match="missing.safetensors"):
        build_model(str(path), "float32", "cpu")
    with pytest.raises(ValueError, match="config.json"):
        build_model(str(tmp_path / "nowhere"), "float32", "cpu")
