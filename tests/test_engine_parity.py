"""End to end on tiny random checkpoints: the engine's greedy output equals HF transformers,
in sync and async mode, and async equals sync under preemption and chunked prefill."""
from __future__ import annotations

import asyncio
import pathlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
random_checkpoint = pytest.importorskip("aiosched.executors.torch.random_checkpoint")

from aiosched import SamplingParams  # noqa: E402

NEW_TOKENS = 32


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp(request.param)
    random_checkpoint.write_random_checkpoint(path, arch=request.param, seed=3)
    return path


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [1, 5, 17, 33, 64, 9]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


_HF_CACHE: dict[str, list[list[int]]] = {}


def _hf_greedy(path: pathlib.Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """HF's greedy tokens (full recompute each step: the simplest trustworthy reference)."""
    if str(path) in _HF_CACHE:
        return _HF_CACHE[str(path)]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = []
            for _ in range(n):
                nxt = int(model(ids).logits[0, -1].argmax())
                gen.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            outs.append(gen)
    _HF_CACHE[str(path)] = outs
    return outs


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_greedy_matches_hf_transformers(make_engine, checkpoint, async_scheduling: bool) -> None:
    vocab = transformers.AutoConfig.from_pretrained(checkpoint).vocab_size
    prompts = _prompts(vocab)
    expected = _hf_greedy(checkpoint, prompts, NEW_TOKENS)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    async with make_engine(model=str(checkpoint), async_scheduling=async_scheduling, num_kv_blocks=128, block_size=16) as eng:
        outs = await asyncio.gather(*[eng.generate(p, params) for p in prompts])
    for got, want in zip(outs, expected):
        assert got.token_ids == want


async def test_async_equals_sync_under_preemption_and_chunked_prefill(make_engine, tmp_path) -> None:
    random_checkpoint.write_random_checkpoint(tmp_path, arch="llama", seed=5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (64,), generator=g)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    results = {}
    for mode in (False, True):
        async with make_engine(model=str(tmp_path), async_scheduling=mode, num_kv_blocks=40, block_size=4,
                               max_num_batched_tokens=32, max_num_seqs=32) as eng:
            outs = await asyncio.gather(*[eng.generate(p, params) for p in prompts])
            results[mode] = [o.token_ids for o in outs]
            assert eng.stats()["preemptions"] > 0
    assert results[False] == results[True]


async def test_text_prompt_and_stop_string(make_engine, tmp_path) -> None:
    random_checkpoint.write_random_checkpoint(tmp_path, arch="llama", seed=7)
    async with make_engine(model=str(tmp_path)) as eng:
        full = await eng.generate("def f(x):", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
        assert full.text and full.token_ids
        stop = full.text[3:6]
        if stop.strip():
            cut = await eng.generate("def f(x):", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop]))
            assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
