"""The optional per-request sampling features of the torch runner, in one place:
penalties, logit bias, bad tokens, structured-output masks, logprobs, prompt logprobs.

The runner calls four hooks per step; with no request using a feature, each is a
couple of Python checks and launches nothing:

    ctx = extras.begin(so, states)                        # after the forward pass is launched
    logits = extras.process(ctx, raw_logits, token_buffer)  # penalties, bias, grammar mask
    tokens = sample(logits, batch)
    tensors = extras.device_outputs(ctx, raw_logits, tokens, logits_at)  # logprobs on the device
    ... copy `tokens` and `tensors` to pinned host memory (one event) ...
    extras.note_step(ctx, host_tokens, event)             # constrained rows: token source for next step
    extras.finish(out, ctx, host_tensors)                 # fills RunnerOutput.logprobs / prompt_logprobs

`states` are the runner's per-request states of the rows that sample, in batch order,
each with `.row` (token-buffer row), `.prompt_len`, `.num_tokens` (tokens before the one
being sampled) and `.data` (the NewRequestData).

Structured output under async scheduling (docs/architecture.md): the grammar must see
step N's token before masking step N+1. `note_step` tells the grammar manager where
step N's sampled ids land on the host (the pinned copy the runner makes anyway);
`process` for step N+1, which runs after step N+1's forward was launched, waits for
that copy only when the step has constrained rows, advances their matchers, fills
their bitmask rows on the CPU and applies them on the device. Rows of other requests
are untouched. The host histories and the samples in flight are the manager's
(executors/structured_output.py), so `free` drops them with the matcher.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from aiosched.protocol import Logprobs, NewRequestData, RunnerOutput, SchedulerOutput
from aiosched.executors.torch.logits_processors import (
    BiasBatch,
    PenaltyBatch,
    apply_bias,
    apply_penalties,
    build_bias_batch,
    build_penalty_batch,
    compute_logprobs,
    has_penalties,
)
from aiosched.executors.structured_output import StructuredOutputManager, allocate_bitmask, apply_token_bitmask


@dataclass
class StepContext:
    """What one step needs from begin() to finish()."""

    req_ids: list[str]
    penalties: PenaltyBatch | None = None
    bias: BiasBatch | None = None
    grammar_rows: list[tuple[int, str, int]] = field(default_factory=list)  # (sample row, req id, position)
    lp_rows: list[int] = field(default_factory=list)  # sample rows that asked for logprobs
    lp_k: list[int] = field(default_factory=list)
    # prompt logprobs: per request (req_id, k, first flat row, count); flat rows index the forward's hidden states
    plp: list[tuple[str, int, int, int]] = field(default_factory=list)
    plp_flat_rows: list[int] = field(default_factory=list)
    plp_next_pos: list[tuple[int, int]] = field(default_factory=list)  # (buffer row, position of the predicted token)
    num_host_tensors: int = 0


class SamplingExtras:
    def __init__(self, model_dir: str | None, vocab_size: int, max_num_seqs: int, device: torch.device) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.structured = StructuredOutputManager.for_model_dir(model_dir, vocab_size)
        self._bitmask: torch.Tensor | None = None
        self._dev_bitmask: torch.Tensor | None = None
        self._bitmask_np: Any = None
        # Grammar masks prefetched off the launch thread (default). "0" keeps the old path
        # (all masks filled on the launch thread when the step samples) for the
        # before/after benchmark of issue 18 only.
        self.prefetch_masks = os.environ.get("AIOSCHED_GRAMMAR_PREFETCH", "1") != "0"
        self._max_rows = max_num_seqs
        self.active: set[str] = set()  # live requests that use any feature here

    def step_uses_extras(self, so: SchedulerOutput) -> bool:
        """Whether any request of this step uses a feature here (a fast path that does not
        implement them must hand such steps to the reference path)."""
        return bool(self.active) and any(sr.req_id in self.active for sr in so.scheduled)

    @property
    def features(self) -> list[str]:
        f = ["logprobs", "prompt_logprobs", "penalties"]
        if self.structured is not None:
            f.append("structured_output")
        return f

    # ---- request lifecycle ----

    def add_request(self, new: NewRequestData) -> None:
        sp = new.sampling
        if (sp.structured is not None or sp.logprobs is not None or sp.prompt_logprobs is not None or sp.logit_bias
                or sp.bad_token_ids or has_penalties(sp)):
            self.active.add(new.req_id)
        if sp.structured is None:
            return
        if self.structured is None:
            raise ValueError("structured: this worker has no tokenizer.json (or no llguidance)")
        self.structured.add_request(new)

    def free(self, req_id: str) -> None:
        self.active.discard(req_id)
        if self.structured is not None:
            self.structured.free(req_id)  # with its samples in flight: a resumed request comes back under this id

    def grammar_terminated(self, req_id: str) -> bool:
        """The request's grammar is complete: only EOS is allowed (min_tokens yields)."""
        if self.structured is None:
            return False
        rg = self.structured.get(req_id)
        return rg is not None and rg.is_terminated

    # ---- per step ----

    def begin(self, so: SchedulerOutput, states: Sequence[Any]) -> StepContext | None:
        """None when no row uses any feature (the unchanged path)."""
        sps = [st.data.sampling for st in states]
        ctx = StepContext([st.data.req_id for st in states])
        ctx.penalties = build_penalty_batch(sps, [st.row for st in states], [st.prompt_len for st in states],
                                            [st.num_tokens for st in states], self.device)
        ctx.bias = build_bias_batch(sps, self.device)
        if self.structured is not None and len(self.structured):
            ctx.grammar_rows = self.structured.constrained_rows(so)
        for i, sp in enumerate(sps):
            if sp.logprobs is not None:
                ctx.lp_rows.append(i)
                ctx.lp_k.append(sp.logprobs)
        if ctx.penalties is None and ctx.bias is None and not ctx.grammar_rows and not ctx.lp_rows:
            return None
        return ctx

    def plan_prompt_logprobs(self, ctx: StepContext | None, so: SchedulerOutput, req_states: dict[str, Any],
                             flat_offsets: dict[str, int]) -> StepContext | None:
        """Rows of the forward's hidden states whose logits give prompt logprobs this step.

        `flat_offsets[req_id]` is the flat index of the first token the step computes for it."""
        for sr in so.scheduled:
            st = req_states[sr.req_id]
            k = st.data.sampling.prompt_logprobs
            if k is None:
                continue
            start, end = sr.num_computed_tokens, sr.num_computed_tokens + sr.num_tokens
            stop = min(end, st.prompt_len - 1)  # logits at q predict prompt token q + 1
            if stop <= start:
                continue
            if ctx is None:
                ctx = StepContext([])
            base = flat_offsets[sr.req_id]
            ctx.plp.append((sr.req_id, k, len(ctx.plp_flat_rows), stop - start))
            ctx.plp_flat_rows.extend(base + q - start for q in range(start, stop))
            ctx.plp_next_pos.extend((st.row, q + 1) for q in range(start, stop))
        return ctx

    def process(self, ctx: StepContext | None, logits: torch.Tensor, token_buffer: torch.Tensor) -> torch.Tensor:
        """Penalties, bias and bans, then the grammar mask. Never modifies `logits` in place."""
        if ctx is None:
            return logits
        if ctx.penalties is not None:
            logits = apply_penalties(logits, token_buffer, ctx.penalties)
        if ctx.bias is not None:
            logits = apply_bias(logits, ctx.bias)
        if ctx.grammar_rows:
            fresh = ctx.penalties is not None or ctx.bias is not None  # already a copy: mask it in place
            logits = self._apply_grammar(ctx, logits if fresh else logits.clone())
        return logits

    def _apply_grammar(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        """In place on `logits` (the caller's copy). The step's masks, mostly filled already by the job `note_step` started one step
        earlier (off this thread), go to the device in one copy into a persistent buffer;
        one index upload says which mask slot masks which logits row."""
        mgr = self.structured
        assert mgr is not None
        host = self._host_bitmask()
        # Waits only for what the prefetch job has left (or, for rows it did not have, for
        # the previous step's sampled ids and the fill here).
        slots = mgr.masks_for(ctx.grammar_rows, self._bitmask_np)
        n = max(slots) + 1
        dev = self._dev_bitmask[:n]
        dev.copy_(host[:n], non_blocking=True)
        idx = torch.tensor(slots + [r for r, _, _ in ctx.grammar_rows], dtype=torch.int64).to(self.device, non_blocking=True)
        k = len(slots)
        apply_token_bitmask(logits, dev.index_select(0, idx[:k]) if slots != list(range(k)) else dev[:k], idx[k:])
        return logits

    def _host_bitmask(self) -> torch.Tensor:
        """The pinned host bitmask (and its device twin), allocated on first use. Reusing one
        pair is safe: a step's mask upload is queued before its sampling, and the job that
        next writes the host buffer first waits for that sampling's copy to the host."""
        if self._bitmask is None:
            vocab = self.structured.vocab_size
            self._bitmask = allocate_bitmask(self._max_rows, vocab, pin_memory=self.device.type == "cuda")
            self._bitmask_np = self._bitmask.numpy()  # one view: the manager knows its job's buffer by identity
            self._dev_bitmask = torch.empty_like(self._bitmask, device=self.device)
        return self._bitmask

    def device_outputs(self, ctx: StepContext | None, raw_logits: torch.Tensor, tokens: torch.Tensor,
                       logits_at: Callable[[torch.Tensor], torch.Tensor] | None, token_buffer: torch.Tensor) -> list[torch.Tensor]:
        """Logprob tensors to copy to the host with the sampled ids (empty when none asked)."""
        if ctx is None:
            return []
        out: list[torch.Tensor] = []
        if ctx.lp_rows:
            idx = torch.tensor(ctx.lp_rows, dtype=torch.int64).to(self.device, non_blocking=True)
            chosen, top_ids, top_lp = compute_logprobs(raw_logits.index_select(0, idx), tokens.index_select(0, idx), max(ctx.lp_k))
            out += [chosen, top_ids, top_lp]
        if ctx.plp_flat_rows:
            assert logits_at is not None
            flat = torch.tensor(ctx.plp_flat_rows, dtype=torch.int64).to(self.device, non_blocking=True)
            rows, pos = zip(*ctx.plp_next_pos)
            nxt = token_buffer[torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True),
                               torch.tensor(pos, dtype=torch.int64).to(self.device, non_blocking=True)]
            chosen, top_ids, top_lp = compute_logprobs(logits_at(flat), nxt, max(k for _, k, _, _ in ctx.plp))
            out += [chosen, top_ids, top_lp]
        ctx.num_host_tensors = len(out)
        return out

    def note_step(self, ctx: StepContext | None, host_tokens: Any, event: Any) -> None:
        """Where this step's sampled ids appear on the host (for the grammars of its constrained rows)."""
        if ctx is not None and ctx.grammar_rows:
            # Prefetch: these requests' masks for the next step start filling as soon as
            # this step's ids reach the host, while the launch thread goes on.
            self.structured.note_sampled(host_tokens, event, [(r, rid) for r, rid, _ in ctx.grammar_rows],
                                         prefetch=self._host_numpy() if self.prefetch_masks else None)

    def _host_numpy(self) -> Any:
        self._host_bitmask()
        return self._bitmask_np

    def close(self) -> None:
        if self.structured is not None:
            self.structured.close()

    def finish(self, out: RunnerOutput, ctx: StepContext | None, host: list[torch.Tensor]) -> None:
        """Fill `out.logprobs` (aligned with out.req_ids) and `out.prompt_logprobs` from host copies."""
        if ctx is None or not host:
            return
        i = 0
        if ctx.lp_rows:
            chosen, top_ids, top_lp = (t.tolist() for t in host[0:3])
            i = 3
            lps: list[Logprobs | None] = [None] * len(out.req_ids)
            for j, (row, k) in enumerate(zip(ctx.lp_rows, ctx.lp_k)):
                lps[row] = Logprobs([chosen[j]], [top_ids[j][:k]], [top_lp[j][:k]])
            out.logprobs = lps
        if ctx.plp:
            chosen, top_ids, top_lp = (t.tolist() for t in host[i : i + 3])
            plp: dict[str, Logprobs] = {}
            for rid, k, first, count in ctx.plp:
                sl = slice(first, first + count)
                plp[rid] = Logprobs(chosen[sl], [r[:k] for r in top_ids[sl]], [r[:k] for r in top_lp[sl]])
            out.prompt_logprobs = plp
