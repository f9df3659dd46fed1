"""TorchModelRunner driven by hand-built SchedulerOutputs, no engine.

A tiny scheduler stand-in (`Driver`) allocates shuffled KV blocks and builds each step's
diff the way the real scheduler does. Checked: greedy tokens equal HF `generate`; steps
pipelined async-style (step N+1 launched before N's result is read, its input being
the token N sampled on the device) equal the synchronous run; seeded sampling is
batch-invariant and survives preemption; min_tokens masks EOS; rows are recycled.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import random
from dataclasses import dataclass, field

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aiosched.config import EngineConfig  # noqa: E402
from aiosched.protocol import NewRequestData, RunnerOutput, ScheduledRequest, SchedulerOutput  # noqa: E402
from aiosched.sampling_params import SamplingParams  # noqa: E402
from aiosched.executors.torch.random_checkpoint import write_random_checkpoint  # noqa: E402
from aiosched.executors.runner import PendingOutput  # noqa: E402
from aiosched.executors.runner import create_runner  # noqa: E402
from aiosched.executors.torch.runner import TorchModelRunner  # noqa: E402

DEVICE = os.environ.get("AIOSCHED_TEST_DEVICE", "cpu")  # "cuda": the same checks on a GPU (float32)
BLOCK = 4
MAX_SEQS = 4
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("llama"), arch="llama", seed=5, num_kv_heads=1)


def make_runner(path: pathlib.Path, **kw) -> TorchModelRunner:
    kw = {"num_kv_blocks": 160, "max_model_len": 128, **kw}
    cfg = EngineConfig(model=str(path), runner="torch", device=DEVICE, dtype="float32", block_size=BLOCK,
                       max_num_seqs=MAX_SEQS, **kw)
    runner = create_runner(cfg)
    assert isinstance(runner, TorchModelRunner)
    runner.load()
    return runner


@dataclass
class _Req:
    prompt: list[int]
    sampling: SamplingParams
    seed: int
    eos: list[int]
    num_computed: int = 0  # tokens whose KV is in the cache
    num_known: int = 0  # tokens that exist (prompt + sampled, possibly still on the device)
    blocks: list[int] = field(default_factory=list)
    sent: bool = False  # the worker has its state


class Driver:
    """Just enough scheduler: new requests, chunked prefill, decodes, frees, resumption."""

    def __init__(self, runner: TorchModelRunner, seed: int = 0) -> None:
        self.runner = runner
        self.free_blocks = list(range(runner.num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.reqs: dict[str, _Req] = {}
        self.outputs: dict[str, list[int]] = {}
        self.step_id = 0
        self.to_free: list[str] = []

    def add(self, rid: str, prompt: list[int], sampling: SamplingParams, seed: int = 0, eos: list[int] | None = None) -> None:
        self.reqs[rid] = _Req(prompt, sampling, seed, eos or [], num_known=len(prompt))
        self.outputs[rid] = []

    def preempt(self, rid: str) -> None:
        """Free the worker state and blocks; the request resumes from prompt + outputs."""
        r = self.reqs[rid]
        self.free_blocks += r.blocks
        r.blocks, r.num_computed, r.sent = [], 0, False
        self.to_free.append(rid)

    def finish(self, rid: str) -> None:
        self.free_blocks += self.reqs.pop(rid).blocks
        self.to_free.append(rid)

    def schedule(self, budget: dict[str, int] | None = None) -> SchedulerOutput:
        """One step: every request computes its missing tokens (at most budget[rid])."""
        new, scheduled = [], []
        for rid, r in self.reqs.items():
            n = r.num_known - r.num_computed
            n = min(n, (budget or {}).get(rid, n))
            if n <= 0:
                continue
            if not r.sent:
                tokens = r.prompt + self.outputs[rid]
                new.append(NewRequestData(rid, tokens, len(r.prompt), r.sampling, r.seed, r.eos))
                r.sent = True
            end = r.num_computed + n
            need = math.ceil(end / BLOCK) - len(r.blocks)
            blocks = [self.free_blocks.pop() for _ in range(need)]
            r.blocks += blocks
            sample = end == r.num_known
            scheduled.append(ScheduledRequest(rid, n, r.num_computed, blocks, sample))
            r.num_computed = end
            if sample:
                r.num_known += 1  # its token exists from now on (on the device until read)
        self.step_id += 1
        so = SchedulerOutput(self.step_id, new, scheduled, self.to_free, sum(s.num_tokens for s in scheduled))
        self.to_free = []
        return so

    def apply(self, out: RunnerOutput) -> None:
        assert len(out.req_ids) == len(out.sampled_token_ids)
        for rid, toks in zip(out.req_ids, out.sampled_token_ids):
            assert len(toks) == 1
            self.outputs[rid].extend(toks)

    def run_sync(self, steps: int, budget: dict[str, int] | None = None) -> None:
        for _ in range(steps):
            self.apply(self.runner.execute(self.schedule(budget)).result())

    def run_async(self, steps: int) -> None:
        """Step N+1 is scheduled and launched before step N's result is read."""
        pending: PendingOutput | None = None
        for _ in range(steps):
            nxt = self.runner.execute(self.schedule())
            if pending is not None:
                self.apply(pending.result())
            pending = nxt
        if pending is not None:
            self.apply(pending.result())


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)


def test_load_reports_worker_info(ckpt) -> None:
    runner = make_runner(ckpt, num_kv_blocks=None, kv_cache_memory_gb=64.0)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert runner.max_model_len == 128
    # Sized from memory, capped at what max_num_seqs full-length requests can use.
    assert runner.num_blocks == MAX_SEQS * math.ceil(128 / BLOCK) + 1
    info = create_runner(EngineConfig(model=str(ckpt), device=DEVICE, max_model_len=100_000, num_kv_blocks=8)).load()
    assert (info.runner, info.vocab_size, info.max_model_len) == ("torch", cfg["vocab_size"], cfg["max_position_embeddings"])


def test_greedy_matches_hf_generate(ckpt) -> None:
    runner = make_runner(ckpt)
    prompts = _prompts(runner.model.args.vocab_size, [3, 11, 20])
    drv = Driver(runner)
    for i, p in enumerate(prompts):
        drv.add(f"r{i}", p, GREEDY)
    drv.run_sync(NEW_TOKENS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert drv.outputs[f"r{i}"] == ref[0, len(p):].tolist(), f"request {i}"


def _mixed_run(ckpt: pathlib.Path, mode: str) -> dict[str, list[int]]:
    """A greedy and two seeded sampling requests, then a third joins with a long prompt."""
    runner = make_runner(ckpt)
    vocab = runner.model.args.vocab_size
    a, b, c, d = _prompts(vocab, [6, 9, 2, 37], seed=3)
    drv = Driver(runner)
    drv.add("greedy", a, GREEDY)
    drv.add("hot", b, SamplingParams(temperature=1.0, max_tokens=64), seed=1234)
    drv.add("nucleus", c, SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=64), seed=-7)
    run = drv.run_async if mode == "async" else drv.run_sync
    run(5)
    drv.add("late", d, SamplingParams(temperature=1.0, min_p=0.05, max_tokens=64), seed=99)
    run(12)
    return drv.outputs


def test_async_pipelined_steps_equal_sync(ckpt) -> None:
    sync, async_ = _mixed_run(ckpt, "sync"), _mixed_run(ckpt, "async")
    assert sync == async_
    assert all(len(v) >= 12 for v in sync.values())


def test_seeded_sampling_ignores_batch_and_chunking(ckpt) -> None:
    """Each request alone, with its prompt prefilled in 3-token chunks, gives the tokens
    it got in the mixed batch."""
    together = _mixed_run(ckpt, "sync")
    runner = make_runner(ckpt)
    a, b, c, d = _prompts(runner.model.args.vocab_size, [6, 9, 2, 37], seed=3)
    params = {"hot": (b, SamplingParams(temperature=1.0), 1234), "late": (d, SamplingParams(temperature=1.0, min_p=0.05), 99)}
    for rid, (prompt, sp, seed) in params.items():
        drv = Driver(runner, seed=len(rid))
        drv.add(rid, prompt, sp, seed=seed)
        n = len(together[rid])
        steps = math.ceil(len(prompt) / 3) + n - 1
        drv.run_sync(steps, budget={rid: 3})
        assert drv.outputs[rid] == together[rid], rid
        drv.finish(rid)
        drv.run_sync(1)  # applies the free


def test_preemption_resumes_with_the_same_tokens(ckpt) -> None:
    runner = make_runner(ckpt)
    (prompt,) = _prompts(runner.model.args.vocab_size, [10], seed=8)
    sp = SamplingParams(temperature=0.9, max_tokens=64)
    ref = Driver(runner)
    ref.add("x", prompt, sp, seed=42)
    ref.run_sync(16)
    ref.finish("x")
    ref.run_sync(1)
    drv = Driver(runner, seed=1)
    drv.add("x", prompt, sp, seed=42)
    drv.run_async(7)
    drv.preempt("x")  # freed and re-sent with prompt + 7 outputs in the same step
    drv.run_async(9)
    assert drv.outputs["x"] == ref.outputs["x"]


def test_min_tokens_masks_eos_and_stop_ids(ckpt) -> None:
    runner = make_runner(ckpt)
    (prompt,) = _prompts(runner.model.args.vocab_size, [7], seed=2)
    drv = Driver(runner)
    drv.add("free", prompt, GREEDY)
    drv.run_sync(3)
    first, second = drv.outputs["free"][:2]
    drv.add("eos", prompt, SamplingParams(temperature=0.0, min_tokens=1), eos=[first])
    drv.add("stop", prompt, SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[first, second]))
    drv.add("done", prompt, SamplingParams(temperature=0.0, min_tokens=0), eos=[first])
    drv.run_sync(3)
    assert drv.outputs["eos"][0] != first
    assert first not in drv.outputs["stop"][:2] and second not in drv.outputs["stop"][:2]
    assert drv.outputs["done"][0] == first  # min_tokens = 0: nothing masked


def test_freed_requests_release_rows_and_empty_steps(ckpt) -> None:
    runner = make_runner(ckpt)
    prompts = _prompts(runner.model.args.vocab_size, [5] * MAX_SEQS)
    drv = Driver(runner)
    for round_ in range(3):  # more requests over time than rows
        for i, p in enumerate(prompts):
            drv.add(f"{round_}-{i}", p, GREEDY)
        drv.run_sync(2)
        assert len(runner.batch.free_rows) == 0
        for i in range(MAX_SEQS):
            drv.finish(f"{round_}-{i}")
        so = drv.schedule()
        assert so.scheduled == [] and len(so.freed_req_ids) == MAX_SEQS
        out = runner.execute(so).result()
        assert out.req_ids == [] and out.sampled_token_ids == []
        assert len(runner.batch.free_rows) == MAX_SEQS and not runner.batch.reqs
    assert drv.outputs["0-0"] == drv.outputs["2-0"]  # a recycled row holds no stale tokens


def test_unsupported_architecture_is_named(tmp_path) -> None:
    path = write_random_checkpoint(tmp_path, arch="llama")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        make_runner(path)


def test_more_live_requests_than_rows_is_a_clear_error(ckpt) -> None:
    runner = make_runner(ckpt)
    (prompt,) = _prompts(runner.model.args.vocab_size, [3])
    news = [NewRequestData(f"r{i}", prompt, len(prompt), GREEDY, 0) for i in range(MAX_SEQS + 1)]
    with pytest.raises(RuntimeError, match="max_num_seqs"):
        runner.execute(SchedulerOutput(1, news, [], [], 0))


def test_top_k_requests_sample_like_the_full_vocabulary_path(ckpt, monkeypatch) -> None:
    """All random rows with a top-k take the candidate path (max_top_k); forcing the
    full-vocabulary path gives the same tokens."""
    import aiosched.executors.torch.sampler as sampler_mod

    def run() -> dict[str, list[int]]:
        runner = make_runner(ckpt)
        drv = Driver(runner)
        for i, p in enumerate(_prompts(runner.model.args.vocab_size, [4, 9, 1], seed=11)):
            drv.add(f"k{i}", p, SamplingParams(temperature=1.2, top_k=5 + 10 * i, top_p=0.95 if i else 1.0), seed=i)
        drv.add("g", p, GREEDY)
        drv.run_async(10)
        return drv.outputs

    fast = run()
    real_sample = sampler_mod.sample

    def full_path(logits, b):
        assert b.max_top_k == 25
        b.max_top_k = 0
        return real_sample(logits, b)

    monkeypatch.setattr("aiosched.executors.torch.runner.sample", full_path)
    assert run() == fast


def request_state_left(root: object, req_ids: set[str]) -> list[str]:
    """Where anything reachable from `root` (the runner's own objects, their dicts, sets,
    lists and tuples; not tensors or the model) still names one of `req_ids`."""
    found: list[str] = []
    seen: set[int] = set()
    todo: list[tuple[str, object]] = [("runner", root)]
    while todo:
        path, obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (torch.Tensor, torch.nn.Module)):
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            if obj in req_ids:
                found.append(path)
        elif isinstance(obj, dict):
            todo += [(f"{path}[{k!r}]", k) for k in obj] + [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            todo += [(f"{path}[]", v) for v in obj]
        elif type(obj).__module__.startswith("aiosched") and hasattr(obj, "__dict__"):
            todo += [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    return found


def check_free_only_steps_leave_no_request_state(runner: TorchModelRunner) -> None:
    """Requests that ran (prefill, decodes; penalties, logprobs) and then leave through
    steps that carry only frees: no object of the runner remembers them."""
    prompts = _prompts(runner.model.args.vocab_size, [5, 9, 3, 14], seed=4)
    drv = Driver(runner)
    params = [GREEDY, SamplingParams(temperature=0.7, max_tokens=8), SamplingParams(temperature=0.0, presence_penalty=0.5, logprobs=2),
              SamplingParams(temperature=0.0, min_tokens=3, prompt_logprobs=1)]
    for i, (p, sp) in enumerate(zip(prompts, params)):
        drv.add(f"leak-{i}", p, sp, seed=i, eos=[1])
    drv.run_sync(4)
    ids = set(drv.reqs)
    for i, rid in enumerate(sorted(ids)):  # one free per step: each step carries only a free
        drv.finish(rid)
        so = drv.schedule(budget={r: 0 for r in ids})  # the others stay live but idle
        assert so.scheduled == [] and so.freed_req_ids == [rid]
        assert runner.execute(so).result().req_ids == []
    assert request_state_left(runner, ids) == []
    assert len(runner.batch.free_rows) == MAX_SEQS


def test_free_only_steps_leave_no_request_state(ckpt) -> None:
    check_free_only_steps_leave_no_request_state(make_runner(ckpt))


def _batch_with_two_requests():
    from aiosched.executors.torch.input_batch import InputBatch

    batch = InputBatch(max_rows=3, row_len=40, block_size=BLOCK, max_tokens=32, device=torch.device("cpu"))
    batch.add(NewRequestData("a", list(range(100, 110)), 10, GREEDY, 0))
    batch.add(NewRequestData("b", list(range(200, 203)), 3, GREEDY, 0))
    # a: prefill chunk [6, 10) with its last 2 blocks new; b: its whole prompt
    so = SchedulerOutput(1, [], [ScheduledRequest("a", 4, 6, [7, 3, 9], True), ScheduledRequest("b", 3, 0, [5], True)], [], 7)
    batch.reqs["a"].block_table = [11]  # a's first block arrived in an earlier step (not yet on the device)
    return batch, batch.schedule(so, {})


def test_input_batch_derives_ids_positions_and_slots_on_the_device() -> None:
    """The packed step gives the forward the token ids of the buffer rows, the positions
    and the KV slots through the device block table, and the logits rows / write slots."""
    batch, step = _batch_with_two_requests()
    assert step.upd_val == [11, 7, 3, 9, 5]  # every table entry the device lacks, once
    layout = batch.exact_layout(step, 1, tiles=False)
    inputs = batch.device_inputs(batch.upload(step, layout), layout, fused=False, host=step)
    assert inputs.input_ids.tolist() == [106, 107, 108, 109, 200, 201, 202]
    assert inputs.positions.tolist() == [6, 7, 8, 9, 0, 1, 2]
    a_table, b_table = [11, 7, 3, 9], [5]
    want = [a_table[p // BLOCK] * BLOCK + p % BLOCK for p in range(6, 10)] + [b_table[0] * BLOCK + p for p in range(3)]
    assert inputs.meta.slot_mapping.tolist() == want
    assert inputs.meta.query_start_loc == [0, 4, 7] and inputs.meta.seq_lens == [10, 3]
    assert inputs.logit_rows.tolist() == [3, 6]
    a, b = batch.reqs["a"], batch.reqs["b"]
    assert inputs.dst.tolist() == [a.row * 40 + 10, b.row * 40 + 3]


def test_padded_layout_pads_with_harmless_rows() -> None:
    """A graph's padded layout: padding tokens read the scratch row and write no KV
    (slot -1); spare logits rows write their token to the scratch slot."""
    batch, step = _batch_with_two_requests()
    layout = batch.padded_layout(16, decode=False, block_q=4)
    inputs = batch.device_inputs(batch.upload(step, layout), layout, fused=False)
    slots = inputs.meta.slot_mapping.tolist()
    assert slots[7:] == [-1] * 9 and min(slots[:7]) >= 0
    assert inputs.positions.tolist()[7:] == [0] * 9
    assert inputs.logit_rows.tolist()[:2] == [3, 6] and len(inputs.logit_rows) == layout.S == 3
    assert inputs.dst.tolist()[2:] == [batch.scratch_slot]


def test_a_verify_layout_has_room_for_every_draft_row() -> None:
    """A speculative step verifies 1 + k logits rows per request: its padded layout has
    min(T, max_rows * (1 + k)) logits rows and min(T, max_rows) request slots. Up to
    max_rows tokens it is the mixed-step layout itself (one graph serves both); a prefill
    step never takes it (its LM head would run on every token)."""
    from aiosched.executors.torch.input_batch import InputBatch

    batch = InputBatch(max_rows=4, row_len=40, block_size=BLOCK, max_tokens=32, device=torch.device("cpu"))
    batch.spec_k1 = 4  # k = 3
    for T in (2, 4):
        assert batch.padded_layout(T, False, 4, verify=True) == batch.padded_layout(T, False, 4)
    for T, S in ((8, 8), (16, 16), (32, 16)):
        v, m = batch.padded_layout(T, False, 4, verify=True), batch.padded_layout(T, False, 4)
        assert (v.S, v.P) == (S, 4) and (m.S, m.P) == (4, 4)
        assert v.o_spec + 3 * v.P + v.S == v.end  # the speculative section: rows, k, set, then a slot per logits row


def test_one_sampling_translation_with_min_tokens_bans() -> None:
    """SamplingParams -> device tensors once, for 1 + drafts rows per request: row j
    samples position num_tokens + j; the min_tokens ban covers the rows still short of it."""
    from aiosched.executors.torch.input_batch import InputBatch

    batch = InputBatch(max_rows=2, row_len=40, block_size=BLOCK, max_tokens=32, device=torch.device("cpu"))
    hot = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_tokens=2, stop_token_ids=[4])
    a = batch.add(NewRequestData("a", [9, 9, 9], 3, hot, 77, [2]))
    b = batch.add(NewRequestData("b", [8, 8], 2, GREEDY, 5))
    batch.flush_new()  # (a step's upload writes them)
    sb = batch.sampling_batch([a, b], [3, 1], lambda rid: False)
    assert sb.positions.tolist() == [3, 4, 5, 2]
    assert sb.seeds.tolist() == [77, 77, 77, 5] and sb.top_k.tolist() == [5, 5, 5, 0]
    assert sb.ban_rows.tolist() == [0, 0, 1, 1] and sb.ban_tokens.tolist() == [2, 4, 2, 4]  # outputs 0 and 1 only
    assert batch.sampling_batch([a], [1], lambda rid: True).ban_rows is None  # a finished grammar allows EOS
    assert not batch.greedy([a, b]) and batch.greedy([b])
