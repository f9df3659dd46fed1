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
