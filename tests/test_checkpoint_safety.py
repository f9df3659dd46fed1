"""Checkpoints we cannot run are refused by name, in torch and JAX alike (issue 16 item 3):
a quantization_config, a tensor no parameter takes; a Llama attention_bias checkpoint
saved by transformers runs with its o_proj bias (HF's logits)."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from aiosched.executors.model_config import ModelConfig  # noqa: E402
from aiosched.executors.torch.loader import build_model  # noqa: E402
from aiosched.executors.torch.random_checkpoint import write_random_checkpoint  # noqa: E402


def test_fp8_quantization_config_is_refused_by_name(tmp_path: pathlib.Path) -> None:
    path = write_random_checkpoint(tmp_path, arch="llama", seed=1)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(path / "model.safetensors"))
    w = "model.layers.0.mlp.down_proj.weight"
    sd[w] = sd[w].to(torch.float8_e4m3fn)
    sd[w.replace(".weight", ".weight_scale_inv")] = torch.ones(1, 1)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="quantization 'fp8' is not supported"):
        build_model(str(path), "float32", "cpu")
    with pytest.raises(ValueError, match="quantization 'fp8' is not supported"):
        ModelConfig.from_dir(path)  # the JAX runner's parser is the same one


def test_a_tensor_matching_no_parameter_is_an_error_naming_it(tmp_path: pathlib.Path) -> None:
    path = write_random_checkpoint(tmp_path, arch="llama", seed=1)
    sd = load_file(str(path / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # allow-listed: a RoPE cache
    save_file(sd, str(path / "model.safetensors"))
    build_model(str(path), "float32", "cpu")
    sd["model.layers.1.self_attn.o_proj.weight_scale_inv"] = torch.ones(1)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight_scale_inv"):
        build_model(str(path), "float32", "cpu")


def test_llama_attention_bias_checkpoint_applies_o_proj_bias(tmp_path: pathlib.Path) -> None:
    """Saved by transformers itself; torch and JAX parse the same biases from it."""
    hf_cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.5)  # HF inits biases to zero; make them matter
    hf.save_pretrained(tmp_path)
    mc = ModelConfig.from_dir(tmp_path)
    assert mc.qkv_bias and mc.o_bias and mc.mlp_bias
    from aiosched.executors.torch.attention.torch_paged import AttentionMetadata

    model = build_model(str(tmp_path), "float32", "cpu")
    model.init_rope(64)
    seq = [3, 1, 4, 1, 5, 9, 2, 6]
    n, shape = len(seq), (4, 4, mc.num_kv_heads, mc.head_dim)
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(mc.num_layers)]
    meta = AttentionMetadata(torch.arange(n), [0, n], [n], [list(range(4))], 4)
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(seq), torch.arange(n), meta, kv))
        ref = hf(torch.tensor([seq])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
