"""The JAX runner: greedy output equals HF transformers (engine, sync and async), and
runner-level steps built by hand (chunked prefill, async reference to the previous
step's sampled token, freed requests, mixed batches, seeded sampling).

Skipped when jax is not installed: it is the optional `[jax]` extra, not part of `[dev]`
(the CPU wheels are ~125 MB to download, ~500 MB installed); `pip install -e '.[dev,jax]'`.
All tests share one engine shape per checkpoint so compiled programs are reused.
"""
from __future__ import annotations

import asyncio
import os
import pathlib

import msgspec
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (optional extra: pip install -e '.[jax]')")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from aiosched import SamplingParams  # noqa: E402
from aiosched.config import EngineConfig  # noqa: E402
from aiosched.protocol import NewRequestData, ScheduledRequest, SchedulerOutput  # noqa: E402
from aiosched.executors.jax import paged_attention as jax_paged  # noqa: E402
from aiosched.executors.jax import runner as jax_runner  # noqa: E402

# Tiny models: compile time dominates, so compile at XLA backend optimisation level 0.
os.environ.setdefault("AIOSCHED_JAX_FAST_COMPILE", "1")

BS = 8
# One shape for every engine and runner here, so compiled programs are shared; the pool
# (16 blocks of 8 = 128 tokens) is small enough for the engine tests to preempt.
ENGINE_KW = dict(runner="jax", executor="inproc", device="cpu", num_kv_blocks=16, block_size=BS, max_num_batched_tokens=64,
                 max_num_seqs=4, max_model_len=128)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


# ---------------------------------------------------------------- checkpoints

SHAPES = {
    # llama3 rope scaling (short original context so it matters here) and tied embeddings
    "llama": dict(tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen3": dict(head_dim=32),  # q/k norm, head_dim != hidden / heads, tied embeddings
    "qwen2": dict(),  # qkv bias, untied head
}


def make_checkpoint(path: pathlib.Path, arch: str) -> pathlib.Path:
    from aiosched.executors.torch.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(path, arch=arch, seed=11, **SHAPES[arch])


@pytest.fixture(scope="module", params=["llama", "qwen3", "qwen2"])
def checkpoint(request, tmp_path_factory) -> pathlib.Path:
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> pathlib.Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama-rt"), "llama")


_HF: dict[str, object] = {}


def hf_greedy(path: pathlib.Path, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by transformers (full recompute each token; no HF cache)."""
    key = str(path)
    if key not in _HF:
        _HF[key] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = _HF[key]
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (1, 5, 17, 33, 47)]


def vocab_of(path: pathlib.Path) -> int:
    return transformers.AutoConfig.from_pretrained(path).vocab_size


# ---------------------------------------------------------------- through the engine


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_engine_greedy_matches_hf(make_engine, checkpoint, async_scheduling: bool) -> None:
    prompts = prompts_for(vocab_of(checkpoint))
    expected = [hf_greedy(checkpoint, p, GREEDY.max_tokens) for p in prompts]
    async with make_engine(model=str(checkpoint), async_scheduling=async_scheduling, **ENGINE_KW) as eng:
        assert eng.info.runner == "jax"
        outs = await asyncio.gather(*[eng.generate(p, GREEDY) for p in prompts])
    for got, want in zip(outs, expected):
        assert got.token_ids == want


async def test_engine_text_prompt_prefix_sharing_and_preemption(make_engine, llama) -> None:
    """Two requests with one long shared prefix in one batch (shared KV blocks written
    in the same step), a text prompt, and a pool small enough to preempt."""
    vocab = vocab_of(llama)
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, vocab, (24,), generator=g).tolist()
    prompts = [shared + [7], shared + [9, 10]] + [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (30, 12, 40, 25)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)  # long enough to outgrow the pool
    expected = [hf_greedy(llama, p, params.max_tokens) for p in prompts]
    for mode in (False, True):
        async with make_engine(model=str(llama), async_scheduling=mode, **ENGINE_KW) as eng:
            outs = await asyncio.gather(*[eng.generate(p, params) for p in prompts])
            stats = eng.stats()
            text = await eng.generate("def f(x):", GREEDY)
        assert [o.token_ids for o in outs] == expected, f"async={mode}"
        assert stats["prefix_cache_hits"] > 0 and stats["preemptions"] > 0
        assert text.token_ids == hf_greedy(llama, eng.tokenizer.encode("def f(x):"), GREEDY.max_tokens)


async def test_engine_matches_torch_runner_greedy_and_seeded(make_engine, llama) -> None:
    """Same checkpoint, same requests: the JAX runner gives the torch runner's tokens,
    greedy and seeded (the same counter-based Gumbel noise, bit for bit; temperature,
    top-k, top-p, min-p). Penalties and logit_bias are checked against their formulas
    below (test_runner_penalties_match_reference, test_runner_min_tokens_masks_eos_and_bias)."""
    pytest.importorskip("aiosched.executors.torch.runner")
    prompts = prompts_for(vocab_of(llama))
    # High temperatures: these checkpoints are peaked (see the test below).
    params = [GREEDY, SamplingParams(max_tokens=10, temperature=30.0, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=40.0, top_k=20, top_p=0.9, min_p=0.05, seed=2**62 + 5, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=25.0, seed=-3, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=35.0, top_p=0.5, seed=11, ignore_eos=True)]
    outs = {}
    for runner in ("torch", "jax"):
        async with make_engine(model=str(llama), async_scheduling=True, **dict(ENGINE_KW, runner=runner)) as eng:
            outs[runner] = [o.token_ids for o in await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(prompts, params)])]
    assert outs["jax"] == outs["torch"]
    assert sum(o != hf_greedy(llama, p, 10) for o, p in zip(outs["jax"][1:], prompts[1:])) >= 3, "the seeded rows must sample"


async def test_engine_seeded_sampling_is_reproducible(make_engine, llama) -> None:
    vocab = vocab_of(llama)
    prompts = prompts_for(vocab)
    # The random checkpoints are peaked (tied embeddings of std 1 favour repeating the last
    # token by a wide margin): a high temperature makes sampling matter.
    seeded = SamplingParams(max_tokens=8, temperature=40.0, top_k=50, top_p=0.95, min_p=0.01, seed=123, ignore_eos=True)
    reseeded = msgspec.structs.replace(seeded, seed=124)
    runs = []
    for mode, n in ((True, 1), (False, 5), (True, 5)):
        async with make_engine(model=str(llama), async_scheduling=mode, **ENGINE_KW) as eng:
            outs = await asyncio.gather(*[eng.generate(p, seeded) for p in prompts[:n]])
            runs.append([o.token_ids for o in outs])
            others = await asyncio.gather(*[eng.generate(p, reseeded) for p in prompts[:n]])
            top1 = await eng.generate(prompts[2], SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=9, ignore_eos=True))
    assert runs[1] == runs[2], "sync and async must sample the same tokens"
    assert runs[0][0] == runs[1][0], "a request's samples must not depend on its batch"
    assert [o.token_ids for o in others] != runs[2], "another seed, other samples"
    assert runs[2] != [hf_greedy(llama, p, 8) for p in prompts], "this temperature should not be greedy"
    assert top1.token_ids == hf_greedy(llama, prompts[2], 8)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_engine_logprobs_match_hf(make_engine, llama, async_scheduling: bool) -> None:
    """Raw model logprobs of sampled tokens (top-k too) and of prompt tokens (chunked
    prefill: the 40-token prompt spans several steps), equal to transformers' log_softmax."""
    model = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab_of(llama), (n,), generator=g).tolist() for n in (1, 6, 19, 40)]
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=3),
              SamplingParams(max_tokens=6, temperature=30.0, seed=4, ignore_eos=True, logprobs=20, repetition_penalty=1.3),
              SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0),
              SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=4, frequency_penalty=0.5)]
    async with make_engine(model=str(llama), async_scheduling=async_scheduling, **ENGINE_KW) as eng:
        assert {"logprobs", "prompt_logprobs", "penalties"} <= set(eng.info.features)
        outs = await asyncio.gather(*[eng.generate(p, sp) for p, sp in zip(prompts, params)])
        best = await eng.generate(prompts[1], SamplingParams(max_tokens=4, n=1, best_of=3, temperature=30.0, seed=2, ignore_eos=True))
    assert best.outputs[0].token_ids
    for p, sp, out in zip(prompts, params, outs):
        c = out.outputs[0]
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p + c.token_ids])).logits[0].double(), -1)
        assert len(c.logprobs) == len(c.token_ids) == 6
        for i, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            row = ref[len(p) - 1 + i]
            assert lp.token_id == tok and lp.logprob == pytest.approx(row[tok].item(), abs=2e-4)
            assert [t for t, _ in lp.top] == row.topk(sp.logprobs).indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(row.topk(sp.logprobs).values.tolist(), abs=2e-4)
        if sp.prompt_logprobs is not None:
            plp = out.prompt_logprobs
            assert len(plp) == len(p) and plp[0] is None
            for j in range(1, len(p)):
                assert plp[j].token_id == p[j] and plp[j].logprob == pytest.approx(ref[j - 1][p[j]].item(), abs=2e-4)
                assert [t for t, _ in plp[j].top] == ref[j - 1].topk(sp.prompt_logprobs).indices.tolist()


# ---------------------------------------------------------------- the runner, steps built by hand


class Driver:
    """A minimal scheduler stand-in: block allocation and SchedulerOutput construction."""

    def __init__(self, path: pathlib.Path, **runner_kw) -> None:
        cfg = EngineConfig.load(dict(ENGINE_KW, model=str(path)))
        self.runner = jax_runner.JaxModelRunner(cfg, **runner_kw)
        self.info = self.runner.load()
        self.free = list(range(self.info.num_kv_blocks))
        self.blocks: dict[str, list[int]] = {}
        self.step_id = 0

    def new(self, rid: str, tokens: list[int], sampling: SamplingParams = GREEDY, seed: int = 0) -> NewRequestData:
        return NewRequestData(req_id=rid, token_ids=list(tokens), prompt_len=len(tokens), sampling=sampling, seed=seed)

    def sched(self, rid: str, start: int, n: int, sample: bool) -> ScheduledRequest:
        have = self.blocks.setdefault(rid, [])
        need = -(-(start + n) // BS) - len(have)
        new = [self.free.pop(0) for _ in range(max(need, 0))]
        have.extend(new)
        return ScheduledRequest(req_id=rid, num_tokens=n, num_computed_tokens=start, new_block_ids=new, sample=sample)

    def release(self, rid: str) -> None:
        self.free.extend(self.blocks.pop(rid))

    def step(self, scheduled: list[ScheduledRequest], new: list[NewRequestData] = (), freed: list[str] = ()):
        self.step_id += 1
        so = SchedulerOutput(step_id=self.step_id, new_requests=list(new), scheduled=scheduled, freed_req_ids=list(freed),
                             total_num_tokens=sum(s.num_tokens for s in scheduled))
        return self.runner.execute(so)


def _tokens(pending) -> dict[str, int]:
    out = pending.result()
    return {rid: toks[0] for rid, toks in zip(out.req_ids, out.sampled_token_ids)}


def test_runner_chunked_prefill_async_reference_and_free(llama) -> None:
    d = Driver(llama)
    vocab = vocab_of(llama)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(3, vocab, (45,), generator=g).tolist()
    b = torch.randint(3, vocab, (6,), generator=g).tolist()
    c = torch.randint(3, vocab, (20,), generator=g).tolist()
    want_a, want_b, want_c = (hf_greedy(llama, p, 5) for p in (a, b, c))

    # a: prefill in chunks of 16, 16, 13 (sample only on the last); b joins in step 2.
    p1 = d.step([d.sched("a", 0, 16, False)], new=[d.new("a", a)])
    p2 = d.step([d.sched("a", 16, 16, False), d.sched("b", 0, 6, True)], new=[d.new("b", b)])
    p3 = d.step([d.sched("b", 6, 1, True), d.sched("a", 32, 13, True)])  # b's input is step 2's sample
    # Async: schedule the next decode of both before reading any result.
    p4 = d.step([d.sched("a", 45, 1, True), d.sched("b", 7, 1, True)])
    assert _tokens(p1) == {}
    t2, t3, t4 = _tokens(p2), _tokens(p3), _tokens(p4)
    assert [t2["b"], t3["b"], t4["b"]] == want_b[:3]
    assert [t3["a"], t4["a"]] == want_a[:2]

    # Free b (its blocks and token row go to c), decode a alongside c's prefill.
    d.release("b")
    p5 = d.step([d.sched("a", 46, 1, True), d.sched("c", 0, 20, True)], new=[d.new("c", c)], freed=["b"])
    p6 = d.step([d.sched("c", 20, 1, True), d.sched("a", 47, 1, True)])
    t5, t6 = _tokens(p5), _tokens(p6)
    assert [t5["a"], t6["a"]] == want_a[2:4]
    assert [t5["c"], t6["c"]] == want_c[:2]
    assert "b" not in d.runner.reqs and len(d.runner.reqs) == 2
    # An empty step that only frees.
    d.release("a")
    d.release("c")
    assert d.step([], freed=["a", "c"]).result().req_ids == []
    assert d.runner.reqs == {}


def test_runner_resumed_request_and_unrolled_layers(llama) -> None:
    """A request resumed after preemption arrives with prompt + outputs so far; the
    unrolled-layers path (per-layer caches, used on TPU) gives the same tokens."""
    vocab = vocab_of(llama)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, vocab, (19,), generator=g).tolist()
    want = hf_greedy(llama, prompt, 6)
    for scan in (True, False):
        d = Driver(llama, scan_layers=scan)
        assert d.runner.scan_layers is scan
        got = [_tokens(d.step([d.sched("r", 0, 19, True)], new=[d.new("r", prompt)]))["r"]]
        got.append(_tokens(d.step([d.sched("r", 19, 1, True)]))["r"])
        d.release("r")
        d.step([], freed=["r"]).result()
        resumed = prompt + got  # known tokens: prompt + 2 outputs; recompute all of them
        new = NewRequestData(req_id="r", token_ids=resumed, prompt_len=len(prompt), sampling=GREEDY, seed=0)
        got.append(_tokens(d.step([d.sched("r", 0, len(resumed), True)], new=[new]))["r"])
        for i in range(3):
            got.append(_tokens(d.step([d.sched("r", len(resumed) + i, 1, True)]))["r"])
        assert got == want, f"scan_layers={scan}"


def test_runner_min_tokens_masks_eos_and_bias(llama) -> None:
    d = Driver(llama)
    prompt = prompts_for(vocab_of(llama))[2]
    greedy_first = hf_greedy(llama, prompt, 1)[0]
    # The greedy token is an "EOS": masked while min_tokens are not out yet.
    sp = SamplingParams(max_tokens=4, temperature=0.0, min_tokens=2)
    new = NewRequestData(req_id="m", token_ids=prompt, prompt_len=len(prompt), sampling=sp, seed=0, eos_token_ids=[greedy_first])
    t = _tokens(d.step([d.sched("m", 0, len(prompt), True)], new=[new]))["m"]
    assert t != greedy_first
    # bad_token_ids and logit_bias
    sp2 = SamplingParams(max_tokens=4, temperature=0.0, bad_token_ids=[greedy_first])
    t2 = _tokens(d.step([d.sched("n", 0, len(prompt), True)], new=[d.new("n", prompt, sp2)]))["n"]
    assert t2 != greedy_first
    sp3 = SamplingParams(max_tokens=4, temperature=0.0, logit_bias={5: 100.0})
    t3 = _tokens(d.step([d.sched("o", 0, len(prompt), True)], new=[d.new("o", prompt, sp3)]))["o"]
    assert t3 == 5


def test_runner_penalties_match_reference(llama) -> None:
    """Greedy with presence/frequency/repetition penalties equals the vLLM formula applied
    to transformers' logits (the history, prompt included, comes from the device buffer)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    pres, freq, rep = 3.0, 4.0, 4.0
    sp = SamplingParams(max_tokens=6, temperature=0.0, presence_penalty=pres, frequency_penalty=freq, repetition_penalty=rep)
    d = Driver(llama)
    changed = 0
    for k, prompt in enumerate(prompts_for(vocab_of(llama))[3:]):  # 33 and 47 tokens: one prefill bucket
        want: list[int] = []
        with torch.no_grad():
            for _ in range(6):
                logits = model(torch.tensor([prompt + want])).logits[0, -1].clone()
                counts = torch.zeros_like(logits)
                for t in want:
                    counts[t] += 1
                seen = torch.zeros_like(logits, dtype=torch.bool)
                seen[torch.tensor(prompt + want)] = True
                logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
                logits = logits - freq * counts - pres * (counts > 0).float()
                want.append(int(logits.argmax()))
        rid = f"p{k}"
        got = [_tokens(d.step([d.sched(rid, 0, len(prompt), True)], new=[d.new(rid, prompt, sp)]))[rid]]
        pending = [d.step([d.sched(rid, len(prompt) + i, 1, True)]) for i in range(5)]  # async-style: no result read in between
        got += [_tokens(p)[rid] for p in pending]
        assert got == want
        d.release(rid)
        d.step([], freed=[rid]).result()
        changed += want != hf_greedy(llama, prompt, 6)
    assert changed, "the penalties should change some greedy continuation"


def test_bucketing_bounds_compiled_programs(llama) -> None:
    d = Driver(llama)
    shapes = d.runner.all_shapes()
    # tokens 16..64 (3), requests 4 (1), blocks 16 (1), plus one decode shape: bounded, independent of traffic
    assert len(shapes) == 3 + 1
    assert all(s.T in (4, 16, 32, 64) and s.R == 4 and s.P == 16 for s in shapes)
    before = jax_runner.compile_stats()["programs"]
    shape = d.runner._shape(40, 3, 5, False, 0)
    assert shape.T == 64 and shape.R == 4 and shape.P == 16 and shape.Qt == d.runner.tile_size
    d.runner.precompile([shape])
    after = jax_runner.compile_stats()
    assert after["programs"] <= before + 1 and after["compile_s"] > 0


def test_attention_kernel_hook_selects_pallas_only_on_tpu() -> None:
    name, fn = jax_paged.select_attention("tpu")
    assert name == "pallas-tpu-ragged-paged" and fn is jax_paged._pallas_tpu_attention  # not called off TPU
    for platform in ("cpu", "gpu", "cuda", None):
        name, fn = jax_paged.select_attention(platform) if platform else jax_paged.select_attention()
        if platform is None and jax.devices()[0].platform == "tpu":
            continue
        assert name == "jnp-paged" and fn is jax_paged.paged_attention


def test_jax_bench_script_runs(tmp_path) -> None:
    """benchmarks/jax_bench.py end to end on a tiny random-weight shape (sync and async)."""
    import importlib.util
    import json

    from aiosched.executors.torch.random_checkpoint import hf_config

    spec = importlib.util.spec_from_file_location("jax_bench", pathlib.Path(__file__).parent.parent / "benchmarks" / "jax_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(hf_config("llama")))
    out = tmp_path / "r.json"
    report = mod.main(["--shape", str(shape), "--num-prompts", "3", "--input-len", "20", "--output-len", "4", "--num-warmups", "1",
                       "--max-model-len", "64", "--max-num-seqs", "4", "--no-precompile", "--json", str(out)])
    for mode in ("sync", "async"):
        m = report["runs"][mode]
        assert m["completed"] == 3 and m["total_output_tokens"] == 12 and m["engine"]["runner"] == "jax"
    assert report["jax"]["compile"]["programs"] > 0 and json.loads(out.read_text())["jax"]["backend"] == "cpu"
