"""Tokenizer and generation defaults read from a local HF-layout checkpoint dir.

Uses the `tokenizers` library (tokenizer.json); no network, no transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from aiosched.chat_template import load_chat_template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, list) else [v])]


def _token_text(v: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v


GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"model: {d} has no tokenizer.json")
        self._tok = _HFTokenizer.from_file(str(path))
        self.model_config = _read_json(d / "config.json")
        self.tokenizer_config = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")
        eos = _as_list(gen.get("eos_token_id")) or _as_list(self.model_config.get("eos_token_id"))
        if not eos:
            text = _token_text(self.tokenizer_config.get("eos_token"))
            tid = self._tok.token_to_id(text) if text else None
            eos = [tid] if tid is not None else []
        self.eos_token_ids: list[int] = eos
        bos = _as_list(gen.get("bos_token_id")) or _as_list(self.model_config.get("bos_token_id"))
        self.bos_token_id: int | None = bos[0] if bos else None
        # Sampling defaults the checkpoint recommends (as vLLM's `--generation-config auto`):
        # used for every field a request leaves unset.
        self.generation_defaults: dict[str, float | int] = {k: gen[k] for k in GENERATION_DEFAULT_FIELDS if k in gen}
        # chat_template.jinja, chat_template.json or tokenizer_config.json (aiosched.chat_template).
        self.chat_template: str | list[dict[str, str]] | None = load_chat_template(d, self.tokenizer_config)
        self.special_tokens = {k: _token_text(self.tokenizer_config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """decode() of each sequence, in one call into the Rust side."""
        return self._tok.decode_batch(seqs, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)
