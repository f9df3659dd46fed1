"""The torch model runner: model, paged KV cache and per-request worker state.

Every request's tokens live in a device token buffer (one row per live request).
Prompt tokens are written from the host once; each sampled token is written on the
device by the step that sampled it. A step's input ids are gathered from the buffer,
so step N+1 can use step N's token without it ever visiting the host: this is what
lets the scheduler run one step ahead (async scheduling).

Tensor parallelism (rank/world_size from the multiproc executor): each rank holds its
shard of the weights and the KV cache of its kv heads only; every rank runs the same
step on the same SchedulerOutput and, the logits being all-gathered, samples the same
token, so the token buffers stay identical. The executor uses rank 0's output.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from aiosched.config import EngineConfig
from aiosched.protocol import PROTOCOL_VERSION, NewRequestData, RunnerOutput, SchedulerOutput, WorkerInfo
from aiosched.executors.torch.attention.torch_paged import AttentionMetadata
from aiosched.executors.torch.loader import build_model
from aiosched.executors.torch.models.llama import LlamaForCausalLM
from aiosched.executors.torch.parallel import SINGLE, agree_min, destroy_group, init_group
from aiosched.executors.runner import ModelRunner, PendingOutput, ReadyOutput
from aiosched.executors.torch.sampler import SamplingBatch, sample
from aiosched.executors.torch.sampling_extras import SamplingExtras, StepContext

_SPARE_TOKENS = 16  # room past max_model_len in a buffer row (speculative drafts)
log = logging.getLogger("aiosched.worker")


@dataclass
class _ReqState:
    row: int
    prompt_len: int
    num_tokens: int  # tokens in the buffer row (prompt + sampled)
    data: NewRequestData
    ban_ids: list[int] = field(default_factory=list)  # masked until min_tokens are out
    block_table: list[int] = field(default_factory=list)
    # Entries of block_table already in the CUDA path's device block table. Kept on the
    # state (not in a map by request id) so it dies with the request, whatever the step.
    device_blocks: int = 0


class _DevicePending(PendingOutput):
    """Sampled ids (and any logprobs) copied to pinned host memory on a side stream; result() waits on its event."""

    def __init__(self, output: RunnerOutput, host: torch.Tensor | None, event: torch.cuda.Event, extras: SamplingExtras,
                 ctx: StepContext | None, host_extra: list[torch.Tensor]) -> None:
        self._output, self._host, self._event = output, host, event
        self._extras, self._ctx, self._host_extra = extras, ctx, host_extra

    def result(self) -> RunnerOutput:
        self._event.synchronize()
        if self._host is not None:
            self._output.sampled_token_ids = [[t] for t in self._host.tolist()]
        self._extras.finish(self._output, self._ctx, self._host_extra)
        return self._output


class TorchModelRunner(ModelRunner):
    def load(self) -> WorkerInfo:
        cfg = self.config
        if cfg.resolved_model is None:
            raise ValueError("model: no model dir given and no embedded default model is installed")
        if cfg.tensor_parallel_size != self.world_size:  # e.g. the inproc executor, which runs one rank
            raise ValueError(f"tensor_parallel_size = {cfg.tensor_parallel_size} needs executor = 'multiproc' "
                             f"(one worker per rank); this runner was started as rank {self.rank} of {self.world_size}")
        self.device = self._rank_device(cfg.device)
        if self.device.type == "cpu":
            # Leave a core to the event loop: OpenMP workers that spin on every core
            # make each small op wait for the scheduler (100x slower steps measured).
            # Under TP the ranks share the cores.
            torch.set_num_threads(cfg.cpu_threads or max(1, ((os.cpu_count() or 2) - 1) // self.world_size))
        torch.manual_seed(cfg.seed)
        # Build (and check that the model splits) before joining the group: loading needs no collectives.
        self.model: LlamaForCausalLM = build_model(cfg.resolved_model, cfg.resolved_dtype, str(self.device), cfg.load_format,
                                                   cfg.seed, rank=self.rank, world_size=self.world_size)
        self.tp = init_group(self.rank, self.world_size, self.device)
        a = self.model.args
        kv_heads = a.num_kv_heads // self.world_size  # this rank's share of the KV cache
        self.max_model_len = min(cfg.max_model_len or a.max_position_embeddings, a.max_position_embeddings)
        self.model.init_rope(self.max_model_len + _SPARE_TOKENS)
        self.block_size = cfg.block_size
        # Every rank must offer the same block ids (the handshake checks it): the tightest rank decides.
        self.num_blocks = agree_min(self._num_kv_blocks(kv_heads), self.tp, self.device)
        dtype = self.model.embed_tokens.weight.dtype
        shape = (self.num_blocks, self.block_size, kv_heads, a.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
                          for _ in range(a.num_layers)]
        self.row_len = self.max_model_len + _SPARE_TOKENS
        self.tokens = torch.zeros((cfg.max_num_seqs, self.row_len), dtype=torch.int64, device=self.device)
        self.free_rows = list(range(cfg.max_num_seqs - 1, -1, -1))
        # Sampling parameters by row, written once when a request arrives and gathered
        # per step by row index (one small host->device copy per step, not one per field).
        self.row_f = torch.zeros((cfg.max_num_seqs, 3), dtype=torch.float32, device=self.device)  # temperature, top_p, min_p
        self.row_i = torch.zeros((cfg.max_num_seqs, 2), dtype=torch.int64, device=self.device)  # top_k (0 = off), seed
        self.reqs: dict[str, _ReqState] = {}
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
        # CUDA: Triton kernels, persistent step buffers and decode CUDA graphs (executors/torch/cuda_path.py).
        self.fast = None
        if self.is_cuda and self.tp.active:
            # The fast path's fused kernels and graphs assume the whole model on one device.
            log.warning("tensor_parallel_size = %d: the CUDA fast path (Triton kernels, CUDA graphs) is off; "
                        "steps run on the eager path", self.world_size)
        elif self.is_cuda and not getattr(self.model, "cuda_fast_path", False):
            # The fast path re-implements the Llama forward; other families run their own forward.
            log.info("%s: the CUDA fast path (Triton attention, CUDA graphs) is Llama-only; steps run the model's forward",
                     a.arch)
        elif self.is_cuda:
            from aiosched.executors.torch.cuda_path import CudaStepRunner

            self.fast = CudaStepRunner(self)
        # Penalties, bias, bans, structured output, logprobs (idle unless a request uses them).
        self.extras = SamplingExtras(cfg.resolved_model, a.vocab_size, cfg.max_num_seqs, self.device)
        self.prompt_lp_reqs: set[str] = set()
        graphs = [getattr(self.fast, name, None) for name in ("graphs", "mixed")]
        return WorkerInfo(PROTOCOL_VERSION, self.num_blocks, self.block_size, a.vocab_size, self.max_model_len,
                          str(self.device), cfg.resolved_dtype, "torch", features=self.extras.features,
                          cuda_graphs=sum(len(g.graphs) for g in graphs if g is not None))

    def _rank_device(self, device: str) -> torch.device:
        """This rank's device: under TP on CUDA, rank r uses the r-th GPU after the configured one."""
        dev = torch.device(device)
        # The Ray executor pins each rank's process to its own GPU (CUDA_VISIBLE_DEVICES): no offset then.
        if dev.type == "cuda" and self.world_size > 1 and not os.environ.get("AIOSCHED_RANK_LOCAL_DEVICE"):
            return torch.device("cuda", (dev.index or 0) + self.rank)
        return dev

    def _num_kv_blocks(self, kv_heads: int) -> int:
        cfg, a = self.config, self.model.args
        cap = cfg.max_num_seqs * math.ceil(self.max_model_len / self.block_size) + 1
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        elem = self.model.embed_tokens.weight.element_size()
        per_block = 2 * a.num_layers * self.block_size * kv_heads * a.head_dim * elem
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1 - cfg.gpu_memory_utilization) - 2 * 2**30  # headroom for activations
        else:
            budget = cfg.kv_cache_memory_gb * 2**30
        return max(1, min(cap, int(budget // per_block)))

    # ---- per-request state ----

    def _add(self, new: NewRequestData) -> None:
        if new.req_id in self.reqs:
            raise RuntimeError(f"request {new.req_id} is already live in the worker")
        if not self.free_rows:
            raise RuntimeError(f"request {new.req_id}: all {self.config.max_num_seqs} token-buffer rows are live (max_num_seqs)")
        n = len(new.token_ids)
        if n >= self.row_len:
            raise RuntimeError(f"request {new.req_id}: {n} tokens do not fit in max_model_len {self.max_model_len}")
        row = self.free_rows.pop()
        self.tokens[row, :n] = torch.tensor(new.token_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        sp = new.sampling
        self.row_f[row] = torch.tensor([sp.temperature, sp.top_p, sp.min_p], dtype=torch.float32).to(self.device, non_blocking=True)
        self.row_i[row] = torch.tensor([max(sp.top_k, 0), new.seed], dtype=torch.int64).to(self.device, non_blocking=True)
        ban = sorted(set(new.eos_token_ids) | set(new.sampling.stop_token_ids)) if new.sampling.min_tokens else []
        self.reqs[new.req_id] = _ReqState(row, new.prompt_len, n, new, ban)
        self.extras.add_request(new)
        if new.sampling.prompt_logprobs is not None:
            self.prompt_lp_reqs.add(new.req_id)

    def _free(self, req_id: str) -> None:
        st = self.reqs.pop(req_id, None)
        if st is not None:
            self.free_rows.append(st.row)
            self.extras.free(req_id)
            self.prompt_lp_reqs.discard(req_id)

    # ---- a step ----

    def execute(self, so: SchedulerOutput) -> PendingOutput:
        for rid in so.freed_req_ids:
            self._free(rid)
        for new in so.new_requests:
            self._add(new)
        out = RunnerOutput(step_id=so.step_id, req_ids=[], sampled_token_ids=[])
        if not so.scheduled:
            return ReadyOutput(out)
        with torch.inference_mode():
            return self._run(so, out)

    def _run(self, so: SchedulerOutput, out: RunnerOutput) -> PendingOutput:
        if any(sr.num_draft_slots for sr in so.scheduled):  # speculative decoding: executors/torch/spec_decode.py
            from aiosched.executors.torch.spec_decode import prepare_spec_step, run_spec_step

            so, drafts = prepare_spec_step(self, so)  # exact positions from this worker's history
            if drafts:
                return run_spec_step(self, so, out, drafts)
        if getattr(self, "fast", None) is not None:
            return self.fast.run(so, out)
        bs, row_len = self.block_size, self.row_len
        flat_idx: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []  # index into the flattened batch of each sampling request's last token
        samplers: list[_ReqState] = []
        flat_offsets: dict[str, int] = {}
        for sr in so.scheduled:
            st = self.reqs[sr.req_id]
            st.block_table.extend(sr.new_block_ids)
            start, end = sr.num_computed_tokens, sr.num_computed_tokens + sr.num_tokens
            if end > st.num_tokens:
                raise RuntimeError(f"{sr.req_id}: step needs tokens up to {end} but the worker has {st.num_tokens}")
            pos = range(start, end)
            positions.extend(pos)
            flat_idx.extend(st.row * row_len + p for p in pos)
            table = st.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            flat_offsets[sr.req_id] = qsl[-1]
            qsl.append(qsl[-1] + sr.num_tokens)
            seq_lens.append(end)
            tables.append(table)
            if sr.sample:
                if end != st.num_tokens:
                    raise RuntimeError(f"{sr.req_id}: sampling at {end} but the worker has {st.num_tokens} tokens")
                sample_rows.append(qsl[-1] - 1)
                samplers.append(st)
                out.req_ids.append(sr.req_id)
        dev = self.device
        input_ids = self.tokens.view(-1)[torch.tensor(flat_idx, dtype=torch.int64).to(dev, non_blocking=True)]
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True), qsl, seq_lens, tables, bs)
        pos_t = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        hidden = self.model(input_ids, pos_t, meta, self.kv_caches)
        # The forward pass is launched: now the host-side work of the optional features
        # (grammar masks wait here for the previous step's ids; see sampling_extras).
        ctx = self.extras.begin(so, samplers) if samplers else None
        if self.prompt_lp_reqs:
            ctx = self.extras.plan_prompt_logprobs(ctx, so, self.reqs, flat_offsets)

        def logits_at(flat: torch.Tensor) -> torch.Tensor:
            return self.model.compute_logits(hidden[flat])

        if not samplers:
            if ctx is None:
                return ReadyOutput(out)
            return self._pending(out, None, self.extras.device_outputs(ctx, None, None, logits_at, self.tokens), ctx)
        raw = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
        logits = self.extras.process(ctx, raw, self.tokens)
        tokens = sample(logits, self._sampling_batch(samplers))
        extra = self.extras.device_outputs(ctx, raw, tokens, logits_at, self.tokens)
        # The sampled token joins the request's history on the device (async scheduling reads it next step).
        dst = torch.tensor([st.row * row_len + st.num_tokens for st in samplers], dtype=torch.int64).to(dev, non_blocking=True)
        self.tokens.view(-1).index_copy_(0, dst, tokens)
        for st in samplers:
            st.num_tokens += 1
        return self._pending(out, tokens, extra, ctx)

    def _sampling_batch(self, states: list[_ReqState]) -> SamplingBatch:
        sps = [st.data.sampling for st in states]
        dev = self.device

        def t(vals: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(vals, dtype=dtype).to(dev, non_blocking=True)

        ban_rows, ban_tokens = [], []
        for i, st in enumerate(states):
            if (st.ban_ids and st.num_tokens - st.prompt_len < st.data.sampling.min_tokens
                    and not self.extras.grammar_terminated(st.data.req_id)):  # a complete grammar allows only EOS
                ban_rows.extend([i] * len(st.ban_ids))
                ban_tokens.extend(st.ban_ids)
        rows_pos = t([st.row for st in states] + [st.num_tokens for st in states], torch.int64).view(2, -1)
        f, i = self.row_f[rows_pos[0]], self.row_i[rows_pos[0]]
        random_k = [sp.top_k for sp in sps if sp.temperature > 0]
        return SamplingBatch(
            temperature=f[:, 0],
            top_k=i[:, 0],
            top_p=f[:, 1],
            min_p=f[:, 2],
            seeds=i[:, 1],
            positions=rows_pos[1],
            max_top_k=max(random_k) if random_k and min(random_k) > 0 else 0,
            all_greedy=all(sp.temperature == 0 for sp in sps),
            any_top_k=any(sp.top_k > 0 for sp in sps),
            any_top_p=any(sp.top_p < 1.0 for sp in sps),
            any_min_p=any(sp.min_p > 0 for sp in sps),
            ban_rows=t(ban_rows, torch.int64) if ban_rows else None,
            ban_tokens=t(ban_tokens, torch.int64) if ban_tokens else None,
        )

    def _pending(self, out: RunnerOutput, tokens: torch.Tensor | None, extra: list[torch.Tensor] | None = None,
                 ctx: StepContext | None = None) -> PendingOutput:
        extra = extra or []
        if not self.is_cuda:
            if tokens is not None:
                ids = tokens.tolist()
                out.sampled_token_ids = [[t] for t in ids]
                self.extras.note_step(ctx, ids, None)
            self.extras.finish(out, ctx, extra)
            return ReadyOutput(out)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True) if tokens is not None else None
        host_extra = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in extra]
        done = torch.cuda.Event()
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for src, dst in zip(([tokens] if tokens is not None else []) + extra, ([host] if host is not None else []) + host_extra):
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.copy_stream)
            done.record()
        self.extras.note_step(ctx, host, done)
        return _DevicePending(out, host, done, self.extras, ctx, host_extra)

    def shutdown(self) -> None:
        self.fast = None
        self.reqs = {}
        self.kv_caches = []
        destroy_group(getattr(self, "tp", SINGLE))
        if getattr(self, "is_cuda", False):
            torch.cuda.empty_cache()
