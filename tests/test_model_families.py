"""Gemma 2, Gemma 3 (text), Phi-3 and Qwen3-MoE give transformers' results.

Each family's tiny float32 checkpoint is written by transformers itself
(`tiny_model.write_hf_family_checkpoint`): Gemma's sliding window (8) is shorter than the
prompts, so the windowed layers drop keys; Gemma 2 soft-caps attention scores and final
logits; Gemma 3 has q/k norms, a local rope base and linear scaling on the global layers;
Phi-3's checkpoint holds fused qkv_proj / gate_up_proj; the MoE has 8 experts, top-2 with
norm_topk_prob, and a dense layer (mlp_only_layers) between sparse ones.

- logits: our model over the paged cache (ragged prefill, decode from the cache, a prompt
  prefilled in chunks that cross the window) against HF on the full sequences;
- tokens: greedy output through the engine (sync and async scheduling, chunked prefill,
  prefix caching with a shared prefix) and through the offline `LLM` equals HF's;
- each family through the JAX runner too; what we cannot run is refused by name: a MoE with dense layers in JAX, Phi-3 long-context rope, partial
  rotary, Gemma 3 attention soft-capping, bidirectional attention, MoE tensor parallelism.
"""
from __future__ import annotations

import asyncio
import json
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_model import write_hf_family_checkpoint  # noqa: E402
from paged_model import PagedModel  # noqa: E402

from aiosched import SamplingParams  # noqa: E402
from aiosched.executors.model_config import ModelConfig  # noqa: E402
from aiosched.executors.torch.loader import build_model  # noqa: E402

FAMILIES = ["gemma2", "gemma3", "phi3", "qwen3_moe"]
BLOCK = 4
ATOL = 2e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, pathlib.Path, torch.nn.Module]:
    path = write_hf_family_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return request.param, path, hf


def Paged(path: pathlib.Path, num_blocks: int = 64) -> PagedModel:
    """Our model with a paged KV cache over shuffled (non-contiguous) blocks, stepped like the runner."""
    return PagedModel(path, num_blocks, BLOCK, 256)


def _seqs(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def _hf_logits(hf: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


def _hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(hf(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


# ---------------------------------------------------------------- logits


def test_config_is_read_as_transformers_reads_it(family) -> None:
    name, path, hf = family
    a = ModelConfig.from_dir(path)
    c = hf.config
    if name.startswith("gemma"):
        assert a.layer_types == tuple(c.layer_types) and a.sliding_window == 8 and a.attn_scale == c.query_pre_attn_scalar ** -0.5
        assert a.final_logit_softcap == c.final_logit_softcapping and a.attn_logit_softcap == c.attn_logit_softcapping
    if name == "gemma3":
        assert a.rope.kind == "linear" and a.rope.factor == 4.0 and a.rope.theta == 1e6 and a.rope_local.theta == 1e4
    if name == "phi3":
        assert all(a.window_of(i) == 8 for i in range(a.num_layers))
    if name == "qwen3_moe":
        assert (a.num_experts, a.num_experts_per_tok, a.norm_topk_prob, a.moe_layers) == (8, 2, True, (True, False, True))


def test_ragged_prefill_then_decode_match_hf_logits(family) -> None:
    _, path, hf = family
    ours = Paged(path)
    lens, steps = [1, 7, 13, 22], 4
    seqs = _seqs([n + steps for n in lens])
    ref = [_hf_logits(hf, s) for s in seqs]
    out = ours.step([(i, s[:n], 0) for i, (s, n) in enumerate(zip(seqs, lens))])
    for i, n in enumerate(lens):
        torch.testing.assert_close(out[i], ref[i][:n], atol=ATOL, rtol=1e-4)
    for d in range(steps - 1):  # decode: one token each, the rest (and the window) read from the cache
        out = ours.step([(i, [s[n + d]], n + d) for i, (s, n) in enumerate(zip(seqs, lens))])
        for i, n in enumerate(lens):
            torch.testing.assert_close(out[i][0], ref[i][n + d], atol=ATOL, rtol=1e-4)


def test_chunked_prefill_across_the_window_matches_hf(family) -> None:
    """Chunks of 5 then 11 then 9 tokens (window 8): the second chunk's queries see keys of
    the first only within the window; another request decodes in the same steps."""
    _, path, hf = family
    ours = Paged(path)
    a, b = _seqs([25, 12], seed=1)
    ref_a, ref_b = _hf_logits(hf, a), _hf_logits(hf, b)
    out = ours.step([(0, a[:5], 0), (1, b[:10], 0)])
    torch.testing.assert_close(out[0], ref_a[:5], atol=ATOL, rtol=1e-4)
    out = ours.step([(1, b[10:11], 10), (0, a[5:16], 5)])
    torch.testing.assert_close(out[0][0], ref_b[10], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[1], ref_a[5:16], atol=ATOL, rtol=1e-4)
    out = ours.step([(0, a[16:], 16), (1, b[11:12], 11)])
    torch.testing.assert_close(out[0], ref_a[16:], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[1][0], ref_b[11], atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------- through the engine

NEW = 12


def _engine_prompts() -> list[list[int]]:
    p = _seqs([1, 6, 19, 30])
    p.append(p[3][:20] + _seqs([7], seed=5)[0])  # shares 20 tokens (5 blocks) with the 4th: a prefix-cache hit
    return p


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_engine_greedy_matches_hf(make_engine, family, async_scheduling: bool) -> None:
    _, path, hf = family
    prompts = _engine_prompts()
    expected = [_hf_greedy(hf, p, NEW) for p in prompts]
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    # 16-token steps: the long prompts prefill in chunks, next to other requests' decodes
    async with make_engine(model=str(path), device="cpu", dtype="float32", async_scheduling=async_scheduling, num_kv_blocks=96,
                           block_size=BLOCK, max_num_batched_tokens=16, enable_prefix_caching=True) as eng:
        first = await asyncio.gather(*[eng.generate(p, params) for p in prompts[:4]])
        last = await eng.generate(prompts[4], params)  # after the 4th finished: its prefix blocks are cached
        assert eng.stats()["prefix_cache_hits"] > 0
    assert [o.token_ids for o in first] + [last.token_ids] == expected


def test_offline_llm_matches_hf(tmp_path) -> None:
    from aiosched import LLM

    path = write_hf_family_checkpoint(tmp_path / "g2", "gemma2", seed=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = _seqs([3, 17])
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    with LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=64, block_size=BLOCK) as llm:
        outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [_hf_greedy(hf, p, 10) for p in prompts]


# ---------------------------------------------------------------- loading and refusals


def test_moe_stacked_expert_layout_loads_like_per_expert(tmp_path) -> None:
    """transformers >= 5 holds experts stacked ([E, 2I, H] / [E, H, I]); a checkpoint in that
    layout loads to the same model as the hub's one-matrix-per-expert layout. A missing
    expert matrix is named."""
    from safetensors.torch import load_file, save_file

    path = write_hf_family_checkpoint(tmp_path / "moe", "qwen3_moe", seed=1)
    sd = load_file(str(path / "model.safetensors"))
    per_expert = build_model(str(path), "float32", "cpu")
    stacked = {k: v for k, v in sd.items() if ".experts." not in k}
    for layer in (0, 2):
        p = f"model.layers.{layer}.mlp.experts."
        stacked[p + "gate_up_proj"] = torch.stack([torch.cat([sd[f"{p}{e}.gate_proj.weight"], sd[f"{p}{e}.up_proj.weight"]])
                                                   for e in range(8)])
        stacked[p + "down_proj"] = torch.stack([sd[f"{p}{e}.down_proj.weight"] for e in range(8)])
    save_file(stacked, str(path / "model.safetensors"), metadata={"format": "pt"})
    other = build_model(str(path), "float32", "cpu")
    for (n, p), (_, q) in zip(per_expert.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)
    missing = dict(sd)
    del missing["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(missing, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.experts\.gate_up_proj"):
        build_model(str(path), "float32", "cpu")


def test_phi3_fused_weights_shard_by_part_under_tensor_parallelism(tmp_path) -> None:
    """Rank r of 2 holds its q heads, its k heads and its v heads (not a slice of the fused
    rows), and its halves of gate and of up."""
    path = write_hf_family_checkpoint(tmp_path / "phi3", "phi3", seed=2)
    full = build_model(str(path), "float32", "cpu")
    a = full.args
    q, kv, inter = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
    w_qkv, w_gu = full.layers[0].self_attn.qkv_proj.weight, full.layers[0].mlp.gate_up_proj.weight
    for rank in range(2):
        shard = build_model(str(path), "float32", "cpu", rank=rank, world_size=2)

        def part(w: torch.Tensor, start: int, size: int) -> torch.Tensor:
            return w[start + rank * size // 2: start + (rank + 1) * size // 2]

        want_qkv = torch.cat([part(w_qkv, 0, q), part(w_qkv, q, kv), part(w_qkv, q + kv, kv)])
        torch.testing.assert_close(shard.layers[0].self_attn.qkv_proj.weight, want_qkv, atol=0, rtol=0)
        want_gu = torch.cat([part(w_gu, 0, inter), part(w_gu, inter, inter)])
        torch.testing.assert_close(shard.layers[0].mlp.gate_up_proj.weight, want_gu, atol=0, rtol=0)


def _config(tmp_path: pathlib.Path, family: str) -> dict:
    path = write_hf_family_checkpoint(tmp_path / family, family)
    return json.loads((path / "config.json").read_text())


async def test_jax_runner_refuses_what_it_lacks_by_name(make_engine, tmp_path) -> None:
    """The JAX layers are scanned with one parameter layout: a MoE with dense layers among the
    sparse ones (mlp_only_layers) is refused through the engine, naming the field; an
    architecture without a JAX implementation is refused by name."""
    pytest.importorskip("jax")
    from aiosched.executors import model_registry

    path = write_hf_family_checkpoint(tmp_path / "moe", "qwen3_moe")  # mlp_only_layers = [1]
    with pytest.raises(ValueError, match="mlp_only_layers .* is not supported by the jax runner"):
        async with make_engine(model=str(path), runner="jax", device="cpu"):
            pass
    entry = model_registry.REGISTRY["Phi3ForCausalLM"]
    with pytest.MonkeyPatch.context() as m:
        m.setitem(model_registry.REGISTRY, "Phi3ForCausalLM", model_registry.ModelEntry(entry.parser, entry.torch_class, None))
        with pytest.raises(ValueError, match="architecture 'Phi3ForCausalLM' is not supported by the jax runner"):
            async with make_engine(model=str(write_hf_family_checkpoint(tmp_path / "phi3", "phi3")), runner="jax", device="cpu"):
                pass


@pytest.mark.parametrize("family_name, async_scheduling",
                         [("phi3", False), ("gemma2", False), ("gemma3", True), ("qwen3_moe", True)],
                         ids=["phi3-sync", "gemma2-sync", "gemma3-async", "qwen3_moe-async"])
async def test_jax_runner_greedy_matches_hf(make_engine, tmp_path, monkeypatch, family_name: str, async_scheduling: bool) -> None:
    """Through the JAX runner: Phi-3's fused checkpoint weights and window on every layer;
    Gemma's sandwich norms, soft-caps, per-layer windows (traced under the layer scan) and
    Gemma 3's local rope table; the MoE's grouped experts (lax.ragged_dot); prompts longer
    than the window, chunked prefill."""
    pytest.importorskip("jax")
    monkeypatch.setenv("AIOSCHED_JAX_FAST_COMPILE", "1")
    monkeypatch.setenv("AIOSCHED_JAX_SCAN_LAYERS", "1")  # compiles fast (the unrolled path: test_jax_runner.py)
    extra = {"mlp_only_layers": []} if family_name == "qwen3_moe" else {}  # every layer sparse (the JAX layout)
    path = write_hf_family_checkpoint(tmp_path / family_name, family_name, seed=3, **extra)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = _engine_prompts()[:4]
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    async with make_engine(model=str(path), runner="jax", executor="inproc", device="cpu", dtype="float32",
                           async_scheduling=async_scheduling, num_kv_blocks=16, block_size=8, max_num_batched_tokens=16,
                           max_num_seqs=4, max_model_len=128) as eng:
        outs = await asyncio.gather(*[eng.generate(p, params) for p in prompts])
        # Logits, not only tokens (soft-caps, local rope, routing weights): logprobs of the 30-token
        # prompt (chunked) and of the samples. Phi-3's window already changes its tokens.
        lp_params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
        lp = await eng.generate(prompts[3], lp_params) if family_name != "phi3" else None
    assert [o.token_ids for o in outs] == [_hf_greedy(hf, p, NEW) for p in prompts]
    if lp is None:
        return
    seq = prompts[3] + lp.outputs[0].token_ids
    ref = torch.log_softmax(_hf_logits(hf, seq).double(), -1)
    got = [x.logprob for x in lp.prompt_logprobs[1:]] + [x.logprob for x in lp.outputs[0].logprobs]
    want = [ref[j - 1][seq[j]].item() for j in range(1, len(seq))]
    assert got == pytest.approx(want, abs=2e-4)


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
     "rope_scaling type 'longrope'"),
    ({"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}, "rope_scaling type 'su'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
], ids=["longrope", "su", "partial-rotary"])
def test_phi3_unsupported_rope_is_refused_by_name(tmp_path, change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf({**_config(tmp_path, "phi3"), **change})


def test_gemma_unsupported_fields_are_refused_by_name(tmp_path) -> None:
    g3 = _config(tmp_path, "gemma3")
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        ModelConfig.from_hf({**g3, "attn_logit_softcapping": 50.0})
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        ModelConfig.from_hf({**g3, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="layer_types has 3 entries for 4 layers"):
        ModelConfig.from_hf({**g3, "layer_types": g3["layer_types"][:3]})
    # Without layer_types, Gemma 3's default pattern: every 6th layer (here from the old field) full.
    no_types = {k: v for k, v in g3.items() if k != "layer_types"}
    assert ModelConfig.from_hf({**no_types, "sliding_window_pattern": 2}).layer_types == (
        "sliding_attention", "full_attention", "sliding_attention", "full_attention")


def test_moe_refusals_name_the_field(tmp_path) -> None:
    cfg = _config(tmp_path, "qwen3_moe")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf({**cfg, "num_experts_per_tok": 9})
    with pytest.raises(ValueError, match="mlp_only_layers"):
        ModelConfig.from_hf({**cfg, "mlp_only_layers": [7]})
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        build_model(str(tmp_path / "qwen3_moe"), "float32", "cpu", rank=0, world_size=2)
    # transformers >= 5 writes num_local_experts, the hub's configs num_experts: both are read
    hub = {k: v for k, v in cfg.items() if k != "num_local_experts"}
    assert ModelConfig.from_hf({**hub, "num_experts": 8}).num_experts == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family_name", ["gemma2", "phi3", "qwen3_moe"])
async def test_cuda_engine_runs_the_family_forward(make_engine, tmp_path, family_name: str) -> None:
    """On CUDA the runner keeps the Llama-only fast path away from these models (their own
    forward runs: torch paged attention for windows / soft-caps, the Triton MoE kernel),
    and the greedy tokens are HF's (float32)."""
    path = write_hf_family_checkpoint(tmp_path / family_name, family_name, seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = _engine_prompts()[:4]
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    async with make_engine(model=str(path), device="cuda", dtype="float32", num_kv_blocks=96, block_size=BLOCK,
                           max_num_batched_tokens=16) as eng:
        outs = await asyncio.gather(*[eng.generate(p, params) for p in prompts])
    assert [o.token_ids for o in outs] == [_hf_greedy(hf, p, NEW) for p in prompts]
