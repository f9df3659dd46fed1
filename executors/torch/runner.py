"""The torch model runner: model, paged KV cache, and the walk of one SchedulerOutput.

A step, top down (`execute`):
1. apply the diff: frees, new requests (`InputBatch`, executors/torch/input_batch.py);
2. speculative rows: exact positions and n-gram drafts (executors/torch/spec_decode.py);
3. `InputBatch.schedule`: block-table deltas and the step's rows, positions, logits rows;
4. the forward: on CUDA a graph of the model's own step when one fits the step's padded
   size (executors/torch/cuda_path.py), else the step packed exactly and the model run
   eagerly (fused kernels on CUDA, the torch/C kernels on the CPU); both derive the
   model's inputs with the same `InputBatch.device_inputs`;
5. verify drafts, or sample (extras: penalties, bias, grammar masks, logprobs), and
   write the tokens into the device token buffer;
6. copy the ids to the host (a side stream on CUDA) -> RunnerOutput.

Every request's tokens live in the device token buffer, so step N+1 can use step N's
token without it ever visiting the host: this is what lets the scheduler run one step
ahead (async scheduling).

Tensor parallelism (rank/world_size from the multiproc executor): each rank holds its
shard of the weights and the KV cache of its kv heads only; every rank runs the same
step on the same SchedulerOutput and, the logits being all-gathered, samples the same
token, so the token buffers stay identical. The executor uses rank 0's output.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from aiosched.protocol import PROTOCOL_VERSION, NewRequestData, RunnerOutput, SchedulerOutput, WorkerInfo
from aiosched.executors.runner import ModelRunner, PendingOutput, ReadyOutput
from aiosched.executors.torch import cpu_split, fused_ops
from aiosched.executors.torch.input_batch import InputBatch, Layout, ScheduledStep, SpecRows, StepInputs
from aiosched.executors.torch.loader import build_model
from aiosched.executors.torch.parallel import SINGLE, agree_min, destroy_group, init_group
from aiosched.executors.torch.sampler import greedy_argmax, sample
from aiosched.executors.torch.sampling_extras import SamplingExtras, StepContext

_SPARE_TOKENS = 16  # room past max_model_len in a buffer row (speculative drafts)
log = logging.getLogger("aiosched.worker")


@dataclass
class _Forward:
    """What a step's forward left: hidden states (eager steps: prompt logprobs read them),
    the logits rows, their greedy tokens (already in the token buffer) and where each
    row's token goes in the buffer."""

    hidden: torch.Tensor | None
    logits: torch.Tensor | None
    tokens: torch.Tensor | None
    dst: torch.Tensor | None
    layout: Layout | None = None  # (speculative steps) where the step is staged, and the staged buffer
    staged: torch.Tensor | None = None
    all_logits: torch.Tensor | None = None  # (speculative steps) every logits row of the layout (S), and their argmax
    all_tokens: torch.Tensor | None = None


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


@dataclass
class _SpecStep:
    """A speculative step's plan (`_plan_spec`, host only): the samplers verified on the
    device and those sampled through the extras (indices into ScheduledStep.samplers); per
    verified request (its slot q) its buffer row, draft slots (0: a plain row) and the
    host count to set on the device first (-1: exact there); whether every verified row
    takes the argmax; the scheduler's length bounds; and, when trimmed (CPU: proposed
    before the layout), the draft rows laid out per speculative request."""

    ver: list[int]
    ext: list[int]
    rows: list[int]
    ks: list[int]
    setv: list[int]
    greedy: bool
    bound: int
    trimmed: list[int] | None = None  # draft rows laid out per speculative request (None: all its slots)


class _SpecPending(PendingOutput):
    """A verified step's output: the emitted tokens of the verified requests arrive through
    `host` (a SpecHost: pinned memory and an event on CUDA), those of the extras rows
    (and any logprobs) through their own pending output."""

    def __init__(self, output: RunnerOutput, host: "Any", ver: list[int], ext: list[int], ext_out: PendingOutput | None,
                 num_samplers: int) -> None:
        self._output, self._host, self._ver, self._ext, self._ext_out = output, host, ver, ext, ext_out
        self._n = num_samplers

    def result(self) -> RunnerOutput:
        out = self._output
        tokens: list[list[int]] = [[] for _ in range(self._n)]
        if self._host is not None:
            drafted = accepted = 0
            for i, h in zip(self._ver, self._host.rows()):
                c = h[-2]
                tokens[i] = h[:c]
                drafted += h[-1]
                accepted += c - 1
            out.num_draft_tokens, out.num_accepted_tokens = drafted, accepted
            self._host.delivered = True
        if self._ext_out is not None:  # the extras rows, sampled as in a plain step
            sub = self._ext_out.result()
            for i, t in zip(self._ext, sub.sampled_token_ids):
                tokens[i] = t
            out.prompt_logprobs = sub.prompt_logprobs
            if sub.logprobs is not None:  # aligned with out.req_ids: None for the other rows
                lps = [None] * len(out.req_ids)
                for i, lp in zip(self._ext, sub.logprobs):
                    lps[i] = lp
                out.logprobs = lps
        out.sampled_token_ids = tokens
        return out


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
        # The class comes from executors/model_registry.py (by config.json's architecture).
        self.model = build_model(cfg.resolved_model, cfg.resolved_dtype, str(self.device), cfg.load_format,
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
        self.batch = InputBatch(cfg.max_num_seqs, self.row_len, self.block_size, cfg.max_num_batched_tokens, self.device)
        self.is_cuda = self.device.type == "cuda"
        self.launch_handoff = self.is_cuda  # execute queues the step and returns; on_launched marks the forward queued
        # Speculative rows: on a GPU always 1 + k (their drafts are found on the device
        # while the previous step may still run); on the CPU the device is the host, so the
        # step lays out only the drafts found (no wasted rows, nothing to wait for).
        self.trim_draft_rows = self.device.type == "cpu"
        # The speculative step's fixed-shape device buffers (spec_decode.SpecBuffers): 1 + k steps per request slot.
        self.spec_bufs = None
        if cfg.speculative is not None:
            from aiosched.executors.torch.spec_decode import SpecBuffers

            self.spec_bufs = SpecBuffers(cfg.max_num_seqs, cfg.speculative.num_tokens + 1, self.device)
            self.batch.spec_k1 = self.spec_bufs.k1
        if self.is_cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
        # CPU: a step's requests in two parts, run at once on two cores (executors/torch/cpu_split.py).
        self.splitter = None
        if self.device.type == "cpu" and not self.tp.active and cpu_split.split_enabled(torch.get_num_threads()):
            self.splitter = cpu_split.PairRunner(torch.get_num_threads())
            self.split_choice = cpu_split.SplitChoice() if cpu_split.split_choice_on() else None
        # Penalties, bias, bans, structured output, logprobs (idle unless a request uses them).
        self.extras = SamplingExtras(cfg.resolved_model, a.vocab_size, cfg.max_num_seqs, self.device)
        self.prompt_lp_reqs: set[str] = set()
        # CUDA: fused kernels in the model's layers and CUDA graphs of its step (executors/torch/cuda_path.py).
        self.fast = None
        if self.is_cuda and self.tp.active:
            # The fused kernels and graphs assume the whole model on one device.
            log.warning("tensor_parallel_size = %d: the CUDA fast path (Triton kernels, CUDA graphs) is off; "
                        "steps run on the eager path", self.world_size)
        elif self.is_cuda and not getattr(self.model, "cuda_fast_path", False):
            # Families whose layers have no fused kernels yet (Gemma's windows and softcaps,
            # the MoE blocks) run their forward unfused and without graphs.
            log.info("%s: no fused CUDA kernels or graphs for this family; steps run the model's unfused forward", a.arch)
        elif self.is_cuda:
            from aiosched.executors.torch.cuda_path import FastPath

            self.fast = FastPath(self)
        return WorkerInfo(PROTOCOL_VERSION, self.num_blocks, self.block_size, a.vocab_size, self.max_model_len,
                          str(self.device), cfg.resolved_dtype, "torch", features=self.extras.features,
                          cuda_graphs=self.fast.num_graphs if self.fast is not None else 0)

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

    @property
    def reqs(self) -> dict:
        """Live requests by id (their state is the input batch's)."""
        return self.batch.reqs

    def _add(self, new: NewRequestData) -> None:
        self.batch.add(new)
        self.extras.add_request(new)
        if new.sampling.prompt_logprobs is not None:
            self.prompt_lp_reqs.add(new.req_id)

    def _free(self, req_id: str) -> None:
        if self.batch.free(req_id):
            self.extras.free(req_id)
            self.prompt_lp_reqs.discard(req_id)

    # ---- a step, top down ----

    def execute(self, so: SchedulerOutput) -> PendingOutput:
        t = time.perf_counter()
        for rid in so.freed_req_ids:
            self._free(rid)
        for new in so.new_requests:
            self._add(new)
        out = RunnerOutput(step_id=so.step_id, req_ids=[], sampled_token_ids=[])
        if not so.scheduled:
            return ReadyOutput(out)
        with torch.inference_mode():
            if self.fast is not None:  # idle_probe: CUDA events around the step
                return self.fast.timed(self._step, so, out, add_s=time.perf_counter() - t)
            return self._step(so, out)

    def _step(self, so: SchedulerOutput, out: RunnerOutput) -> PendingOutput:
        spec = self._plan_spec(so) if any(sr.num_draft_slots for sr in so.scheduled) else None
        if spec is not None and self.trim_draft_rows:
            self.batch.flush_new()  # the proposer reads the token buffer before the step's upload
            self._propose(spec, None, None)  # before the layout: it lays out only the drafts found
        step = self.batch.schedule(so, spec_rows=spec.trimmed if spec is not None else None, has_spec=spec is not None)
        out.req_ids = [sr.req_id for sr in so.scheduled if sr.sample]
        extras_on = self.extras.step_uses_extras(so)
        if spec is not None:
            step.verify = self._spec_rows(step, spec)
            # every row of a speculative step writes its argmax to the scratch slot: harmless for the extras rows
            greedy = spec.greedy
        else:
            greedy = not extras_on and self.batch.greedy(step.samplers)
        fwd = self._forward(step, greedy, eager_only=extras_on and bool(self.prompt_lp_reqs), spec=spec)
        if self.on_launched is not None:  # the forward is queued: the executor's caller may go on
            self.on_launched()
        if spec is not None:
            return self._verify(step, fwd, extras_on, out, spec)
        return self._sample(step, fwd, extras_on, out)

    def _plan_spec(self, so: SchedulerOutput) -> _SpecStep:
        """A step with speculative rows, on the host, before it is laid out: which samplers
        are verified on the device (all but those with sampling extras, which sample their
        one row through the extras) and, per verified request, what the propose phase
        reads: its row, draft slots and, when its device count is stale (its last step
        sampled on the host's count), the host's exact count."""
        reqs, active = self.batch.reqs, self.extras.active
        if self.spec_bufs is None:
            raise RuntimeError("draft slots scheduled but the runner has no speculative config")
        samplers = [sr for sr in so.scheduled if sr.sample]
        spec = _SpecStep([], [], [], [], [], True, 1)
        for i, sr in enumerate(samplers):
            if sr.req_id in active:
                if sr.num_draft_slots:  # the scheduler never speculates these (scheduler._uses_spec)
                    raise RuntimeError(f"{sr.req_id}: draft slots for a request with sampling extras")
                spec.ext.append(i)
                continue
            if sr.num_draft_slots >= self.spec_bufs.k1:
                raise RuntimeError(f"{sr.req_id}: {sr.num_draft_slots} draft slots, the runner speculates {self.spec_bufs.k1 - 1}")
            st = reqs[sr.req_id]
            assert st.dev_exact or not st.spec_pending
            spec.ver.append(i)
            spec.rows.append(st.row)
            spec.ks.append(sr.num_draft_slots)
            spec.setv.append(-1 if st.dev_exact else st.num_tokens)
            st.dev_exact = True  # (the propose phase sets it)
            spec.greedy = spec.greedy and st.data.sampling.temperature == 0.0 and not st.ban_ids
            spec.bound = max(spec.bound, sr.num_computed_tokens + sr.num_tokens)  # its length is at most that
        return spec

    def _spec_rows(self, step: ScheduledStep, spec: _SpecStep) -> SpecRows:
        """The staged form of the plan: each logits row's slot q * K1 + j on the verify grid (-1: an extras row)."""
        K1 = self.spec_bufs.k1
        q_of = {i: q for q, i in enumerate(spec.ver)}
        slot: list[int] = []
        for i, n in enumerate(step.num_logits):
            q = q_of.get(i)
            slot.extend(range(q * K1, q * K1 + n) if q is not None else [-1] * n)
        return SpecRows(spec.rows, spec.ks, spec.setv, slot)

    def _propose(self, spec: _SpecStep, staged: torch.Tensor | None, layout: Layout | None) -> None:
        """The propose phase (executors/torch/spec_decode.py): drafts into the token buffer
        and the SpecBuffers, on the device. On a padded layout the graph's own code (a
        replay on CUDA); on an exact one the same ops eagerly. `staged` None (CPU,
        `trim_draft_rows`: the device is the host, so reading costs nothing): before the
        layout, from the plan's lists, and the rows laid out are the drafts found."""
        from aiosched.executors.torch.spec_decode import propose_step, window

        batch, cfg = self.batch, self.config.speculative
        if layout is not None and layout.padded:
            self.fast.spec_propose(layout)
            return
        W = window(spec.bound, batch.row_len)
        if staged is not None:
            rows, ks, setv, _ = batch.spec_views(staged, layout)
            propose_step(batch, self.spec_bufs, rows, ks, setv, W, cfg)
            return
        meta = torch.tensor([spec.rows, spec.ks, spec.setv], dtype=torch.int64, device=self.device)
        drafts = propose_step(batch, self.spec_bufs, meta[0], meta[1], meta[2], W, cfg)
        found = (drafts >= 0).sum(dim=1).tolist()
        spec.trimmed = [n for n, k in zip(found, spec.ks) if k]
        spec.setv = [-1] * len(spec.setv)  # applied

    def _forward(self, step: ScheduledStep, greedy: bool, eager_only: bool, spec: _SpecStep | None = None) -> _Forward:
        """A CUDA graph replay when one fits the step, else the model's forward on the exactly packed step.
        greedy: take each logits row's argmax (written into the token buffer at once).
        spec: a speculative step, whose propose phase runs between the upload and the forward
        (unless done before the layout) over the staged speculative section."""
        fast, batch = self.fast, self.batch
        n = len(step.logit_rows)
        layout = fast.graph_layout(step, eager_only) if fast is not None else None
        if layout is not None:
            dev = batch.upload(step, layout)
            if spec is not None:
                self._propose(spec, dev, layout)
                logits, tokens = fast.replay(layout)
                return _Forward(None, logits[:n], None, dev[layout.o_dst:layout.o_dst + n], layout, dev, logits, tokens)
            logits, tokens = fast.replay(layout)
            return _Forward(None, logits[:n], tokens[:n].clone() if greedy else None, dev[layout.o_dst:layout.o_dst + n])
        fused = fast is not None
        layout = batch.exact_layout(step, fast.block_q(step) if fused else 1, tiles=fused)
        dev = batch.upload(step, layout)
        if spec is not None and spec.trimmed is None:
            self._propose(spec, dev, layout)
        inputs = batch.device_inputs(dev, layout, fused, fast.decode_workspace if fused else None, host=step)
        if fused:
            fast.stats["eager_steps"] += 1
        split = cpu_split.split_inputs(inputs, self.splitter.frac) if self.splitter is not None and not step.spec else None
        if split is not None:
            # split or not: whichever way ran this kind of step faster lately (cpu_split.SplitChoice)
            kind = "decode" if inputs.input_ids.shape[0] == inputs.meta.num_reqs else "mixed"
            use = self.split_choice is None or self.split_choice.split(kind)
            t0 = time.perf_counter()
            if use:
                hidden, logits, tokens = self._split_step(inputs, *split, argmax=greedy)
            else:
                hidden, logits, tokens = self.model_step(inputs, argmax=greedy)
            if self.split_choice is not None:
                self.split_choice.record(kind, use, sum(split[1]), time.perf_counter() - t0)
        else:
            hidden, logits, tokens = self.model_step(inputs, argmax=greedy)
        return _Forward(hidden, logits, tokens, inputs.dst, layout, dev, logits, tokens)

    def _split_step(self, inputs: StepInputs, parts: tuple[StepInputs, StepInputs], work: tuple[float, float],
                    argmax: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`model_step` on the CPU as two sub-steps of whole requests at once (cpu_split):
        the same rows, logits and tokens, in the same order."""
        def part(p: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
            hidden = self.model(p.input_ids, p.positions, p.meta, self.kv_caches)
            if not p.logit_rows.numel():
                return hidden, None, None
            logits = self.model.compute_logits(hidden[p.logit_rows], dtype=torch.float32)
            return hidden, logits, greedy_argmax(logits) if argmax else None

        a, b = self.splitter.run(lambda: part(parts[0]), lambda: part(parts[1]), work)
        hidden = torch.cat([a[0], b[0]])
        if not inputs.logit_rows.numel():
            return hidden, None, None
        if not argmax:
            return hidden, torch.cat([x[1] for x in (a, b) if x[1] is not None]), None
        # Greedy: the tokens are all a step reads (`_sample`); the logits (8 MB at 64 rows
        # of a 32000 vocab) are not joined.
        tokens = torch.cat([x[2] for x in (a, b) if x[2] is not None])
        self.batch.write_tokens(inputs.dst, tokens)
        return hidden, None, tokens

    def model_step(self, inputs: StepInputs, argmax: bool, logits_out: torch.Tensor | None = None,
                   tokens_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The model's forward, the LM head on the logits rows and (argmax) the greedy token
        of each row written into the token buffer. The CUDA graphs capture exactly this,
        with persistent `*_out` buffers for what outlives the replay."""
        fused = inputs.meta.fused
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches)
        if not inputs.logit_rows.numel():
            return hidden, None, None
        rows = hidden if inputs.meta.device is not None and inputs.meta.device.decode else hidden[inputs.logit_rows]
        # float32 for the samplers; on the fused path the weights' dtype (argmax needs no upcast; sampling upcasts)
        out = logits_out[:rows.shape[0]] if logits_out is not None else None
        logits = self.model.compute_logits(rows, dtype=None if fused else torch.float32, fused=fused, out=out)
        tokens = None
        if argmax:
            out = tokens_out[:logits.shape[0]] if tokens_out is not None else None
            tokens = (greedy_argmax(logits, out=out) if logits.device.type == "cpu"  # two-pass CPU argmax
                      else fused_ops.argmax_rows(logits, out=out, workspace=self.fast.argmax_workspace if fused else None))
            self.batch.write_tokens(inputs.dst, tokens)
        return hidden, logits, tokens

    def _logits_at(self, fwd: _Forward) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """float32 logits of the forward's hidden rows at flat token indices (prompt
        logprobs read positions that were not logits rows), or None without hidden states."""
        if fwd.hidden is None:
            return None
        hidden, fused = fwd.hidden, self.fast is not None
        return lambda flat: self.model.compute_logits(hidden[flat], fused=fused)

    def _sample(self, step: ScheduledStep, fwd: _Forward, extras_on: bool, out: RunnerOutput) -> PendingOutput:
        samplers, tokens_buf = step.samplers, self.batch.tokens
        # The forward pass is launched: now the host-side work of the optional features
        # (grammar masks wait here for the previous step's ids; see sampling_extras).
        ctx = self.extras.begin(step.so, samplers) if extras_on and samplers else None
        if extras_on and self.prompt_lp_reqs:
            ctx = self.extras.plan_prompt_logprobs(ctx, step.so, self.batch.reqs, step.flat_offsets)
        logits_at = self._logits_at(fwd)
        if not samplers:
            if ctx is None:
                return ReadyOutput(out)
            return self._pending(out, None, self.extras.device_outputs(ctx, None, None, logits_at, tokens_buf), ctx)
        extra: list[torch.Tensor] = []
        tokens = fwd.tokens
        if tokens is None:  # sampling, or a step with extras: on float32 logits, after penalties / bias / grammar masks
            raw = fwd.logits.float()
            logits = self.extras.process(ctx, raw, tokens_buf)  # grammar: waits for the previous step's ids here
            tokens = sample(logits, self.batch.sampling_batch(samplers, step.num_logits, self.extras.grammar_terminated))
            extra = self.extras.device_outputs(ctx, raw, tokens, logits_at, tokens_buf)
            self.batch.write_tokens(fwd.dst, tokens)  # the token joins the request's history on the device
        for st in samplers:
            st.num_tokens += 1
            st.dev_exact = False  # num_tokens_dev is set from the host before its next speculative step
        return self._pending(out, tokens, extra, ctx)

    def _verify(self, step: ScheduledStep, fwd: _Forward, extras_on: bool, out: RunnerOutput, spec: "_SpecStep") -> PendingOutput:
        """Speculative verification of the logits rows, on the device: the accepted tokens
        join the histories and the device counts there, and the emitted tokens come back
        as a pending output (the launch thread does not wait for them; the next step is
        laid out relative to the device counts). Requests with sampling extras have one
        logits row and no drafts: they sample through the extras (`_sample_extras_rows`)."""
        if self.fast is not None:
            self.fast.stats["spec_steps"] += 1
        ver, ext = spec.ver, spec.ext
        # The logits rows of each sampler, in order.
        first, r = [], 0
        for n in step.num_logits:
            first.append(r)
            r += n
        host = None
        logits = None
        if ver:
            emitted = self._verify_rows(step, fwd, spec, first)
            host = self._to_host(emitted[:len(ver)].clone())  # (the buffer is the next step's)
            for q, i in enumerate(ver):
                st = step.samplers[i]
                if spec.ks[q]:
                    st.spec_pending.append((host, q))  # its host count grows when this lands
                else:
                    st.num_tokens += 1  # a plain row emits one token (the device count grew by it too)
        ext_out = None
        if ext or (extras_on and self.prompt_lp_reqs):  # prompt chunks of the step may want prompt logprobs
            logits = fwd.logits.float()
            ext_out = self._sample_extras_rows(step, fwd, logits, ext, [first[i] for i in ext], out)
        return _SpecPending(out, host, ver, ext, ext_out, len(step.samplers))

    def _verify_rows(self, step: ScheduledStep, fwd: _Forward, spec: _SpecStep, first: list[int]) -> torch.Tensor:
        """The verify phase over every logits row of the staged layout (a fixed shape): greedy
        steps compare the forward's argmax with the drafts (on a padded layout the graph's
        own code: a replay on CUDA); sampling steps run rejection sampling (`verify_drafts`).
        Returns the [P, K1 + 2] emitted tokens / counts / drafts found."""
        from aiosched.executors.torch.spec_decode import greedy_accepts, verify_drafts, verify_step

        batch, bufs, L, d = self.batch, self.spec_bufs, fwd.layout, fwd.staged
        if spec.greedy and L.padded:
            return self.fast.spec_verify(L)
        rows, _, _, slot = batch.spec_views(d, L)
        if spec.greedy:
            tok = fwd.all_tokens
            acc = greedy_accepts(bufs, tok, slot)
        else:
            states = [step.samplers[i] for i in spec.ver]
            sb = batch.verify_sampling(d, L, states, [first[i] for i in spec.ver], [step.num_logits[i] for i in spec.ver],
                                       self.extras.grammar_terminated)
            tok, acc = verify_drafts(fwd.all_logits.float(), sb, bufs.drafts[slot])
        return verify_step(batch, bufs, tok, acc, rows, slot)

    def _to_host(self, t: torch.Tensor) -> "SpecHost":
        """The verified step's emitted tokens toward the host: pinned, on the side stream (CUDA)."""
        from aiosched.executors.torch.spec_decode import SpecHost

        if not self.is_cuda:
            return SpecHost(t)
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        done = torch.cuda.Event()
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            h.copy_(t, non_blocking=True)
            t.record_stream(self.copy_stream)
            done.record()
        return SpecHost(h, done)

    def _sample_extras_rows(self, step: ScheduledStep, fwd: _Forward, logits: torch.Tensor, ext: list[int],
                            ext_rows: list[int], out: RunnerOutput) -> PendingOutput:
        """Sample the one-row requests of a verified step that use sampling extras, exactly
        as `_sample` would in a step without drafts (penalties, bias, grammar masks,
        logprobs; prompt logprobs of the step's prompt chunks too). Their tokens and
        logprobs come back like a plain step's (`_pending`: on CUDA a copy on the side
        stream); the returned output holds them for the ext samplers, in order."""
        states = [step.samplers[i] for i in ext]
        ids = {st.data.req_id for st in states}
        # The extras address rows by their index among the sampled requests of `so`.
        sub_so = msgspec.structs.replace(step.so, scheduled=[sr for sr in step.so.scheduled if sr.sample and sr.req_id in ids])
        ctx = self.extras.begin(sub_so, states) if states else None
        if self.prompt_lp_reqs:
            ctx = self.extras.plan_prompt_logprobs(ctx, step.so, self.batch.reqs, step.flat_offsets)
        logits_at = self._logits_at(fwd)
        tokens_buf = self.batch.tokens
        raw = tokens = None
        if states:
            raw = logits[torch.tensor(ext_rows, dtype=torch.int64).to(logits.device, non_blocking=True)]
            processed = self.extras.process(ctx, raw, tokens_buf)
            tokens = sample(processed, self.batch.sampling_batch(states, [1] * len(states), self.extras.grammar_terminated))
            self.batch.write_tokens([st.row * self.batch.row_len + st.num_tokens for st in states], tokens)
            for st in states:
                st.num_tokens += 1
                st.dev_exact = False
        extra = self.extras.device_outputs(ctx, raw, tokens, logits_at, tokens_buf)
        sub_out = RunnerOutput(step_id=out.step_id, req_ids=[st.data.req_id for st in states], sampled_token_ids=[])
        return self._pending(sub_out, tokens, extra, ctx)

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
        if getattr(self, "splitter", None) is not None:
            self.splitter.close()
            self.splitter = None
        if getattr(self, "extras", None) is not None:
            self.extras.close()  # the grammar mask thread
        if getattr(self, "batch", None) is not None:
            self.batch.reqs = {}
        self.kv_caches = []
        destroy_group(getattr(self, "tp", SINGLE))
        if getattr(self, "is_cuda", False):
            torch.cuda.empty_cache()
