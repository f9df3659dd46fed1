"""Tiny random checkpoints in Hugging Face layout, and the shapes benchmarks use.

Tests build their own models with this (no downloads): config.json, model.safetensors,
a byte-level BPE tokenizer.json trained on a few KB of built-in text,
tokenizer_config.json (with a chat template) and generation_config.json. Parameter
names follow HF, so transformers loads the same dir as a parity reference.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
          "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}

_CORPUS = """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

import asyncio

async def main() -> None:
    await asyncio.sleep(1)
    print("hello, world")

class Stack:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
    def pop(self):
        return self.items.pop()

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")
Once upon a time there was a little engine that could. It pulled the train over the mountain, one step at a time.
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|end|>"]


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return tok


def hf_config(arch: str = "llama", hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
              intermediate_size: int = 128, vocab_size: int = 512, max_position_embeddings: int = 1024,
              tie_word_embeddings: bool | None = None, rope_scaling: dict[str, Any] | None = None,
              head_dim: int | None = None, rope_theta: float = 10000.0) -> dict[str, Any]:
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    name, model_type = _ARCHS[arch]
    cfg: dict[str, Any] = {
        "architectures": [name], "model_type": model_type, "hidden_size": hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size, "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6, "rope_theta": rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": arch in ("qwen3",) if tie_word_embeddings is None else tie_word_embeddings,
        "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
    }
    if head_dim is not None or arch == "qwen3":
        cfg["head_dim"] = head_dim or hidden_size // num_heads
    if arch == "qwen2":
        cfg["attention_bias"] = True
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    return cfg


def random_state_dict(cfg: dict[str, Any], seed: int = 0, std: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh

    def rnd(*shape: int, s: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    sd = {"model.embed_tokens.weight": rnd(v, h, s=1.0), "model.norm.weight": 1.0 + rnd(h, s=0.05)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
            p + "self_attn.v_proj.weight": rnd(nkv * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
            p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
            p + "mlp.down_proj.weight": rnd(h, inter),
            p + "input_layernorm.weight": 1.0 + rnd(h, s=0.05), p + "post_attention_layernorm.weight": 1.0 + rnd(h, s=0.05),
        })
        if cfg.get("attention_bias"):
            sd.update({p + "self_attn.q_proj.bias": rnd(nh * hd), p + "self_attn.k_proj.bias": rnd(nkv * hd),
                       p + "self_attn.v_proj.bias": rnd(nkv * hd)})
        if cfg["architectures"][0] == "Qwen3ForCausalLM":
            sd.update({p + "self_attn.q_norm.weight": 1.0 + rnd(hd, s=0.05), p + "self_attn.k_norm.weight": 1.0 + rnd(hd, s=0.05)})
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = rnd(v, h)
    return sd


def write_random_checkpoint(path: str | os.PathLike[str], arch: str = "llama", seed: int = 0, dtype: str = "float32",
                            vocab_size: int | None = None, **shape: Any) -> Path:
    """Write a complete tiny HF-layout model dir; returns its path."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    vocab = max(vocab_size or 0, tok.get_vocab_size())
    cfg = hf_config(arch, vocab_size=vocab, **shape)
    eos = tok.token_to_id("<|endoftext|>")
    cfg["bos_token_id"] = cfg["eos_token_id"] = eos
    cfg["torch_dtype"] = dtype
    sd = random_state_dict(cfg, seed)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    save_file({k: t.to(torch_dtype).contiguous() for k, t in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "model_max_length": cfg["max_position_embeddings"], "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
    }, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos}))
    return d


_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(arch="llama", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                         vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True, head_dim=64,
                         rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=3072,
                       vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=True, head_dim=128, rope_theta=1000000.0),
}


def shape_config(name: str) -> dict[str, Any]:
    """config.json contents for a named benchmark shape (random weights)."""
    if name not in _SHAPES:
        raise ValueError(f"shape must be one of {sorted(_SHAPES)}, got {name!r}")
    cfg = hf_config(**_SHAPES[name])
    cfg["torch_dtype"] = "bfloat16"
    return cfg
