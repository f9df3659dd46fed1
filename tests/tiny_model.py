"""A tiny model directory for server and example tests.

With `aiosched.executors.torch.random_checkpoint` available (the tiny random torch model), the dir
is a real HF-layout checkpoint run by the torch runner. Without it, the dir holds
only config.json + tokenizer.json + tokenizer_config.json (a byte-level BPE with a
chat template) and is run by the fake runner, which needs no weights. `fake(cfg)`
runs either dir with the fake runner (same tokenizer), for tests that need many
fast steps rather than a real model.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
           "import asyncio\nasync def main() -> None:\n    await asyncio.sleep(1)\n"
           "Hello world! The quick brown fox jumps over the lazy dog. naïve café 日本語 🙂\n") * 10


def has_real_tiny_model() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("aiosched.executors.torch.random_checkpoint", "aiosched.executors.torch.runner"))


def _write_tokenizer_only(path: pathlib.Path, max_model_len: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator([_CORPUS], trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "max_position_embeddings": max_model_len, "bos_token_id": 0, "eos_token_id": 1,
    }))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE,
    }))


def fake(model: dict[str, Any]) -> dict[str, Any]:
    """The same dir (tokenizer, config.json) run by the fake runner: for load tests."""
    return {"model": model["model"], "runner": "fake"}


def write_tiny_model(path: pathlib.Path, max_model_len: int = 512) -> dict[str, Any]:
    """Write the dir; return the engine config (dict) that runs it on CPU."""
    path.mkdir(parents=True, exist_ok=True)
    if has_real_tiny_model():
        from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

        write_random_checkpoint(path, arch="llama", seed=1)
        return {"model": str(path), "runner": "torch", "device": "cpu", "max_model_len": max_model_len}
    _write_tokenizer_only(path, max_model_len)
    return {"model": str(path), "runner": "fake"}


# ---------------------------------------------------------------------------
# Tiny checkpoints of the other families, written by transformers itself
# ---------------------------------------------------------------------------

_SLIDING, _FULL = "sliding_attention", "full_attention"

# Tiny configs: the window (8) is shorter than the test prompts, so the sliding layers
# really drop keys; Gemma 2 soft-caps scores and logits; Gemma 3 has its own local rope
# base and linear scaling on the global layers; the MoE has a dense layer among sparse ones.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma2": dict(cls="Gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                   attn_logit_softcapping=5.0, final_logit_softcapping=30.0),
    "gemma3": dict(cls="Gemma3", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                   layer_types=[_SLIDING, _SLIDING, _FULL, _SLIDING],
                   rope_parameters={_FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                                    _SLIDING: {"rope_type": "default", "rope_theta": 10000.0}}),
    "phi3": dict(cls="Phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=8),
    "qwen3_moe": dict(cls="Qwen3Moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1]),
}


def write_hf_family_checkpoint(path: pathlib.Path, family: str, seed: int = 0, **overrides: Any) -> pathlib.Path:
    """A tiny float32 checkpoint of `family` (FAMILY_CONFIGS) saved by transformers' own
    save_pretrained, with weights redrawn at a scale where greedy tokens are well separated
    (HF's init of std 0.02 gives near-uniform logits), plus the tokenizer files."""
    import torch
    import transformers
    from aiosched.executors.torch.random_checkpoint import CHAT_TEMPLATE as RC_TEMPLATE, train_tokenizer

    kw = {**FAMILY_CONFIGS[family], **overrides}
    cls = kw.pop("cls")
    tok = train_tokenizer()
    eos = tok.token_to_id("<|endoftext|>")
    config_cls = getattr(transformers, f"{cls}TextConfig" if cls == "Gemma3" else f"{cls}Config")
    cfg = config_cls(vocab_size=512, max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                     rms_norm_eps=1e-6, **kw)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    zero_centred = cls.startswith("Gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if zero_centred else 1.0) + 0.05 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if zero_centred else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "model_max_length": 256, "chat_template": RC_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return path
