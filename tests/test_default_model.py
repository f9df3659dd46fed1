"""The embedded default model (aiosched/default_model/), trained by tools/train_default_model.py.

Checks the shipped files (size, HF layout, tensor names and dtypes), that `tokenizers` and
HF transformers load them, and the held-out loss on a small held-out sample shipped with
the package (xml/dom/minidom.py's first ~6 KB: a file the model never trained on).

The engine-level checks at the end: the engine picks this model when no `model` is
given, and greedy generation is deterministic and identical in sync and async mode.
"""
from __future__ import annotations

import json
import pathlib

import pytest

import aiosched

DEFAULT_MODEL_DIR = pathlib.Path(aiosched.__file__).parent / "default_model"
MAX_BYTES = 25 * 1000 * 1000
EOT = "<|endoftext|>"
# Measured 2026-11-22 with transformers 5.23 in float32 on CPU: 1.957 nats/token
# (1524 predicted tokens, windows of 512). The bound leaves room for other versions/BLAS.
HELDOUT_SAMPLE_LOSS_BOUND = 2.05
WINDOW = 512
HF_NAMES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
            "input_layernorm.weight", "post_attention_layernorm.weight")


def _config() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())


def test_shipped_dir_exists_and_is_small() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "heldout_sample.txt"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file())
    assert total < MAX_BYTES, total


def test_config_is_llama_tied_bf16() -> None:
    cfg = _config()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is True
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["max_position_embeddings"] in (1024, 2048)
    gen = json.loads((DEFAULT_MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == cfg["eos_token_id"] == 0
    tc = json.loads((DEFAULT_MODEL_DIR / "tokenizer_config.json").read_text())
    assert tc["bos_token"] == tc["eos_token"] == tc["pad_token"] == EOT
    assert tc["model_max_length"] == cfg["max_position_embeddings"]
    assert "{{ bos_token }}" in tc["chat_template"]


def test_safetensors_has_hf_llama_names() -> None:
    from safetensors import safe_open

    cfg = _config()
    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        expected = {"model.embed_tokens.weight", "model.norm.weight"}
        expected |= {f"model.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in HF_NAMES}
        assert keys == expected  # tied: no lm_head.weight
        emb = f.get_tensor("model.embed_tokens.weight")
        assert tuple(emb.shape) == (cfg["vocab_size"], cfg["hidden_size"])
        assert str(emb.dtype) == "torch.bfloat16"
        n = sum(_numel(f.get_slice(k).get_shape()) for k in keys)
    assert 5_000_000 <= n <= 11_000_000, n


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def test_tokenizers_loads_and_round_trips() -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    assert 4096 <= tok.get_vocab_size() <= 8192
    assert tok.token_to_id(EOT) == 0
    text = (DEFAULT_MODEL_DIR / "heldout_sample.txt").read_text(encoding="utf-8")
    enc = tok.encode(text)
    assert enc.ids[0] == 0  # BOS, added like Llama's tokenizer does
    assert tok.decode(enc.ids, skip_special_tokens=True) == text
    assert tok.encode("def f():\n    return 1\n", add_special_tokens=False).ids[0] != 0


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    return torch, model, tok


def test_hf_tokenizer_matches_tokenizers(hf) -> None:
    from tokenizers import Tokenizer

    _, _, hf_tok = hf
    tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    text = (DEFAULT_MODEL_DIR / "heldout_sample.txt").read_text(encoding="utf-8")[:2000]
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == hf_tok.pad_token_id == 0


def test_heldout_sample_loss(hf) -> None:
    """Mean next-token loss over the sample (BOS + text), in non-overlapping windows of 512."""
    torch, model, tok = hf
    ids = tok((DEFAULT_MODEL_DIR / "heldout_sample.txt").read_text(encoding="utf-8"))["input_ids"]
    assert len(ids) > 1000
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, WINDOW):
            w = torch.tensor([ids[i:i + WINDOW + 1]])
            logits = model(w[:, :-1]).logits[0].float()
            total += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
    loss = total / count
    assert loss < HELDOUT_SAMPLE_LOSS_BOUND, loss


def test_greedy_generation_looks_like_python(hf) -> None:
    torch, model, tok = hf
    prompt = "def fibonacci(n):"
    x = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(prompt)
    body = text[len(prompt):]
    assert body.startswith("\n    "), repr(text)  # an indented function body follows


@pytest.mark.parametrize("prompt", ["def fibonacci(n):", "import os\n\nclass Config:"])
async def test_engine_uses_it_by_default_and_sync_equals_async(make_engine, prompt: str) -> None:
    from aiosched import SamplingParams

    params = SamplingParams(max_tokens=48, temperature=0.0)
    texts = []
    for mode in (False, True, True):
        async with make_engine(async_scheduling=mode) as eng:  # no model: the embedded default
            assert pathlib.Path(eng.config.resolved_model) == DEFAULT_MODEL_DIR
            out = await eng.generate(prompt, params)
            texts.append((out.token_ids, out.text))
    assert texts[0] == texts[1] == texts[2]
    assert texts[0][1].strip(), "the model writes something"
