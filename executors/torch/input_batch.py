"""The torch worker's persistent batch state, and every step's inputs built in one place.

`InputBatch` owns what outlives a step:
- the device token buffer, one row per live request (+ a scratch row for padding):
  prompt tokens are written once from the host, each sampled token on the device by
  the step that sampled it, so step N+1 reads step N's token without a host round
  trip (async scheduling);
- the request rows (`ReqState`: row, tokens in the buffer, host block table) and the
  per-row sampling parameters on the device;
- each row's token count on the device (`num_tokens_dev`): a speculative step yields
  1..1+k tokens, and only the device knows how many until its output is copied back.
  Speculative rows are laid out *relative* to it (see `schedule`), so the step after
  a speculative one is built and launched without waiting for its accepted count;
- the device block table (one row per request slot), sent as deltas only;
- a ring of pinned staging buffers: one packed int64 array per step, one H2D copy.

`schedule(so)` walks a SchedulerOutput once on the host (block-table deltas,
bounds checks, token rows and positions, logits rows, token-buffer write slots) into a
`ScheduledStep`; `upload(step, layout)` packs it at the offsets of a `Layout` (one H2D
copy) and `device_inputs` derives the `StepInputs` that the model's forward reads. The layout is either exact
(eager steps, any device) or padded to a captured size (CUDA graphs: the padding
tokens sit at the scratch row with position -1 = no KV write, padding requests have no
queries and no keys, spare logits rows write their argmax to a scratch slot). The
graphs run `device_inputs` on the same layout inside the capture, so the eager and
the graph step are the same code.

`sampling_batch` is the one translation of SamplingParams into device tensors, for
normal sampling and speculative verification alike (`bans_now` is the min_tokens rule).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from aiosched.protocol import NewRequestData, SchedulerOutput
from aiosched.executors.torch import fused_ops
from aiosched.executors.torch.attention.torch_paged import AttentionMetadata, DeviceAttention
from aiosched.executors.torch.sampler import SamplingBatch

_RING = 4  # pinned staging buffers in rotation (steps in flight are at most 2)


@dataclass
class ReqState:
    row: int
    prompt_len: int
    # Tokens in the buffer row (prompt + sampled); the next sampled token's position. Exact
    # unless speculative steps are in flight (`spec_pending`): then a lower bound, and the
    # true count is on the device (`InputBatch.num_tokens_dev`).
    num_tokens: int
    data: NewRequestData
    ban_ids: list[int] = field(default_factory=list)  # masked until min_tokens are out
    block_table: list[int] = field(default_factory=list)
    # Entries of block_table already in the device block table. Kept on the state (not
    # in a map by request id) so it dies with the request, whatever the step.
    device_blocks: int = 0
    # InputBatch.num_tokens_dev[row] (once the work enqueued so far has run) is the true
    # count. False after a plain step sampled on the host's count (the device count is
    # then set from the host before the next speculative step).
    dev_exact: bool = True
    # Speculative steps launched whose emitted counts num_tokens does not include yet:
    # (SpecHost, index of this request in it), in launch order (spec_decode.SpecHost).
    spec_pending: list[Any] = field(default_factory=list)

    def bans_now(self, position: int) -> bool:
        """min_tokens: EOS and stop ids are masked for the token at `position` (before the grammar check)."""
        return bool(self.ban_ids) and position - self.prompt_len < self.data.sampling.min_tokens


@dataclass
class ScheduledStep:
    """One SchedulerOutput on the host, in batch order."""

    so: SchedulerOutput
    states: list[ReqState]  # per scheduled request
    starts: list[int]  # first position computed
    qlens: list[int]  # tokens computed
    samplers: list[ReqState]  # requests that sample, in batch order
    num_logits: list[int]  # per sampler: logits rows (1 + its draft slots)
    logit_rows: list[int]  # flat token index of every logits row
    dst: list[int]  # per logits row: where its argmax goes in the token buffer (scratch when verifying)
    upd_idx: list[int]  # device block-table deltas (flat index, block id)
    upd_val: list[int]
    # Every request computes one token and samples it (set by InputBatch.schedule; None: not known)
    one_each: bool | None = None
    # Speculative requests (relative rows: positions from the device count), in batch
    # order: their index in `samplers` and their draft slots k (1 + k query rows each).
    spec: list[int] = field(default_factory=list)
    spec_k: list[int] = field(default_factory=list)
    rel: list[bool] | None = None  # per scheduled request: relative rows (None: none in this step)
    verify: "SpecRows | None" = None  # a speculative step's verified requests (the runner's; staged with the step)

    @property
    def num_tokens(self) -> int:
        return sum(self.qlens)

    @property
    def decode_only(self) -> bool:
        """Every request computes one token and samples it (no drafts)."""
        if self.spec:
            return False
        if self.one_each is not None:
            return self.one_each
        return all(n == 1 for n in self.qlens) and len(self.samplers) == len(self.states)

    @property
    def flat_offsets(self) -> dict[str, int]:
        """Flat index of each request's first token (prompt logprobs only: built when asked)."""
        out, flat = {}, 0
        for st, n in zip(self.states, self.qlens):
            out[st.data.req_id] = flat
            flat += n
        return out


@dataclass
class SpecRows:
    """The verified requests of a speculative step, as the propose and verify phases read
    them from the staging buffer (`Layout.o_spec`): per request slot q its buffer row, its
    draft slots (0: a plain row) and the host count to set on the device first (-1: the
    device count is exact); per logits row its slot q * K1 + j on the verify grid (-1:
    not verified, an extras row)."""

    rows: list[int]
    ks: list[int]
    setv: list[int]
    slot: list[int]


@dataclass(frozen=True)
class Layout:
    """Offsets of one step in the staging buffer:
    tok_rows[T] tok_pos[T] rows[R] seq[R] cu[R+1] tiles[2*NT] sidx[S] dst[S]
    and, with P > 0 (speculative steps), spec_rows[P] spec_k[P] spec_set[P] spec_slot[S].
    Padded layouts (CUDA graphs) have fixed sizes; request slot R-1 is then always padding."""

    T: int
    R: int
    NT: int
    S: int
    block_q: int
    decode: bool  # one query per request (the decode kernel)
    padded: bool
    P: int = 0  # verified request slots of a speculative step (padded layouts: min(T, max_rows))

    @property
    def o_rows(self) -> int:
        return 2 * self.T

    @property
    def o_seq(self) -> int:
        return 2 * self.T + self.R

    @property
    def o_cu(self) -> int:
        return 2 * self.T + 2 * self.R

    @property
    def o_tiles(self) -> int:
        return 2 * self.T + 3 * self.R + 1

    @property
    def o_sidx(self) -> int:
        return self.o_tiles + 2 * self.NT

    @property
    def o_dst(self) -> int:
        return self.o_sidx + self.S

    @property
    def o_spec(self) -> int:
        return self.o_dst + self.S

    @property
    def end(self) -> int:
        return self.o_spec + (3 * self.P + self.S if self.P else 0)


@dataclass
class StepInputs:
    """What the model's forward and the LM head read (device tensors)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] (padding: 0)
    meta: AttentionMetadata
    logit_rows: torch.Tensor  # [S] flat token index of each logits row
    dst: torch.Tensor  # [S] token-buffer index each row's token is written to


class _Staging:
    """A ring of pinned int64 host buffers, each reused only after its H2D copy finished."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.host = [torch.zeros(capacity, dtype=torch.int64, pin_memory=pin) for _ in range(_RING)]
        self.np = [h.numpy() for h in self.host]
        self.events: list[Any] = [None] * _RING
        self.dev = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.i = 0
        self.capacity = capacity

    def next(self) -> np.ndarray:
        self.i = (self.i + 1) % _RING
        ev = self.events[self.i]
        if ev is not None:
            ev.synchronize()
        return self.np[self.i]

    def upload(self, n: int) -> torch.Tensor:
        self.dev[:n].copy_(self.host[self.i][:n], non_blocking=True)
        if self.dev.is_cuda:
            ev = torch.cuda.Event()
            ev.record()
            self.events[self.i] = ev
        return self.dev


def _not_greedy(st: ReqState) -> bool:
    """The request may not take the plain argmax at some step (InputBatch.greedy)."""
    return st.data.sampling.temperature != 0.0 or bool(st.ban_ids)


def _tensor(vals: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(vals, dtype=dtype).to(device, non_blocking=True)


class InputBatch:
    def __init__(self, max_rows: int, row_len: int, block_size: int, max_tokens: int, device: torch.device) -> None:
        self.max_rows, self.row_len, self.block_size, self.device = max_rows, row_len, block_size, device
        self.scratch_row = max_rows  # token-buffer / block-table row of padding (never a request's)
        self.scratch_slot = self.scratch_row * row_len + 1  # where padding rows' argmax goes
        self.tokens = torch.zeros((max_rows + 1, row_len), dtype=torch.int64, device=device)
        self.max_blocks = -(-row_len // block_size)
        self.block_table = torch.zeros((max_rows + 1, self.max_blocks), dtype=torch.int64, device=device)
        # Tokens of each row on the device (the scratch row: 1, so padding reads a valid slot).
        self.num_tokens_dev = torch.ones(max_rows + 1, dtype=torch.int64, device=device)
        # Host waits of the launch thread for a speculative step's counts (a plain row of a
        # request whose speculative step had not landed: the scheduler never does that).
        self.host_waits = 0
        # The fused eager step also runs host-list attention (layers with windows or soft
        # caps: FastPath sets this from the model): relative rows' lengths are then read back.
        self.fused_host_lists = True
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.reqs: dict[str, ReqState] = {}
        self.num_not_greedy = 0  # live requests with a temperature or min_tokens bans (greedy())
        # Requests added since the last upload: (row, request). Their token rows, device counts
        # and sampling parameters go to the device with the step's upload, in the same copy
        # (`_stage_new`): one small host-to-device copy each cost the launch thread ~0.1 ms on
        # the GPU host, ~12 per prefill step at c256 (2026-12-08: 1.6 ms per step adding requests).
        self._new: list[tuple[int, NewRequestData]] = []
        # Sampling parameters by row, written once when a request arrives and gathered
        # per step by row index (one small host->device copy per step, not one per field).
        self.row_f = torch.zeros((max_rows, 3), dtype=torch.float32, device=device)  # temperature, top_p, min_p
        self.row_i = torch.zeros((max_rows, 2), dtype=torch.int64, device=device)  # top_k (0 = off), seed
        self.max_tokens = max(max_tokens, max_rows) + 64
        T, R1 = self.max_tokens, max_rows + 1
        # the largest layout (NT <= T + R1 tiles, S <= T logits rows) and block-table deltas
        # (+ the speculative section: P <= max(T, R1) slots, S <= T rows)
        self.stage = _Staging(2 * T + 3 * R1 + 1 + 2 * (T + R1) + 2 * T + 4 * T + 3 * R1 + 2 * (T + 2 * R1) + 64, device)
        # 1 + k steps per verified request when the runner speculates (0: never; set by the runner)
        self.spec_k1 = 0

    # ---- request lifecycle ----

    def add(self, new: NewRequestData) -> ReqState:
        if new.req_id in self.reqs:
            raise RuntimeError(f"request {new.req_id} is already live in the worker")
        if not self.free_rows:
            raise RuntimeError(f"request {new.req_id}: all {self.max_rows} token-buffer rows are live (max_num_seqs)")
        n = len(new.token_ids)
        if n >= self.row_len:
            raise RuntimeError(f"request {new.req_id}: {n} tokens do not fit in max_model_len {self.row_len}")
        row = self.free_rows.pop()
        self._new.append((row, new))  # on the device with the next upload (flush_new: before any other read)
        sp = new.sampling
        ban = sorted(set(new.eos_token_ids) | set(sp.stop_token_ids)) if sp.min_tokens else []
        st = self.reqs[new.req_id] = ReqState(row, new.prompt_len, n, new, ban)
        self.num_not_greedy += _not_greedy(st)
        return st

    def free(self, req_id: str) -> bool:
        st = self.reqs.pop(req_id, None)
        if st is None:
            return False
        self.free_rows.append(st.row)
        self.num_not_greedy -= _not_greedy(st)
        if self._new:  # freed before its row reached the device: the row may be someone else's next
            self._new = [(r, n) for r, n in self._new if r != st.row]
        return True

    def _new_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The queued requests' device writes: token-buffer flat indices and ids, rows, counts,
        (top_k, seed) and (temperature, top_p, min_p) per row."""
        L = self.row_len
        idx = np.concatenate([np.arange(r * L, r * L + len(n.token_ids), dtype=np.int64) for r, n in self._new])
        ids = np.fromiter(itertools.chain.from_iterable(n.token_ids for _, n in self._new), dtype=np.int64, count=len(idx))
        rows = np.array([r for r, _ in self._new], dtype=np.int64)
        counts = np.array([len(n.token_ids) for _, n in self._new], dtype=np.int64)
        ints = np.array([(max(n.sampling.top_k, 0), n.seed) for _, n in self._new], dtype=np.int64).reshape(-1)
        floats = np.array([(n.sampling.temperature, n.sampling.top_p, n.sampling.min_p) for _, n in self._new], dtype=np.float64).reshape(-1)
        return idx, ids, rows, counts, ints, floats

    def _write_new(self, idx: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, ints: torch.Tensor,
                   floats: torch.Tensor) -> None:
        """Apply the queued requests' writes (device tensors) and forget them."""
        k = rows.numel()
        self.tokens.view(-1).index_copy_(0, idx, ids)
        self.num_tokens_dev.index_copy_(0, rows, counts)
        self.row_i.index_copy_(0, rows, ints.view(k, 2))
        self.row_f.index_copy_(0, rows, floats.view(k, 3).to(torch.float32))
        self._new = []

    def flush_new(self) -> None:
        """Write the queued requests to the device now, in their own copies (a read of the
        token buffer before the step's upload: the CPU runner's drafts)."""
        if self._new:
            # (pageable sources: the copy has read them when it returns, as the former per-request copies)
            self._write_new(*(torch.from_numpy(a).to(self.device, non_blocking=True) for a in self._new_arrays()))

    def _stage_new(self, buf: np.ndarray, o: int) -> list[int]:
        """Stage the queued requests' writes (`_new_arrays`, in order) at buf[o:] when they
        fit and return their lengths; else write them in their own copies (returns [])."""
        if not self._new:
            return []
        parts = self._new_arrays()
        sizes = [len(a) for a in parts]
        if o + sum(sizes) > self.stage.capacity:  # a long resumed history: its own copies
            self.flush_new()
            return []
        for a, n in zip(parts[:-1], sizes):
            buf[o:o + n] = a
            o += n
        buf[o:o + sizes[-1]].view(np.float64)[:] = parts[-1]  # float64 bits in the int64 staging buffer
        return sizes

    # ---- a step, host side ----

    def schedule(self, so: SchedulerOutput, drafts: None = None, spec_rows: list[int] | None = None,
                 has_spec: bool | None = None) -> ScheduledStep:
        """Apply the step's block-table deltas and lay it out (one walk over so.scheduled).

        A speculative request (`num_draft_slots = k > 0`) computes 1 + k query rows
        [its last token, k drafts] and has 1 + k logits rows, *relative* to its count on
        the device: row j sits at position num_tokens_dev[row] - 1 + j. The host does not
        know that count while a speculative step of the request is in flight (the
        scheduler's position is then an upper bound), and does not need it: the positions,
        KV slots and attention lengths of these rows are derived on the device
        (`fused_ops.step_inputs`), the drafts are proposed and written there, and the
        verification appends the accepted tokens there. Drafts the proposer did not find
        are -1 rows, never accepted. Every other row is exact, from the host's count.
        spec_rows: per speculative request (batch order), the draft rows to lay out
        (<= its slots; the CPU runner trims them to the drafts found); None: all k.
        has_spec: whether any request has draft slots, when the caller knows already."""
        assert not drafts, "drafts are proposed on the device (spec_decode.propose_step)"
        bs, mb, row_len = self.block_size, self.max_blocks, self.row_len
        step = ScheduledStep(so, [], [], [], [], [], [], [], [], [])
        # A step with speculative rows samples all its rows after the forward (verified):
        # no row's token is written by the forward's argmax.
        if has_spec is None:
            has_spec = any(sr.num_draft_slots for sr in so.scheduled)
        if has_spec:
            step.rel = []
        flat = 0
        n_spec = 0
        # Hot loop (every request, every step): lists hoisted; a plain row appends to the
        # per-row lists only (its one logits row is counted at the end when no row drafts).
        reqs, scratch = self.reqs, self.scratch_slot
        states, starts, qlens, samplers = step.states, step.starts, step.qlens, step.samplers
        logit_rows, dst = step.logit_rows, step.dst
        one_each = True
        for sr in so.scheduled:
            st = reqs[sr.req_id]
            if sr.new_block_ids:
                st.block_table.extend(sr.new_block_ids)
            have, n_bt = st.device_blocks, len(st.block_table)
            if n_bt > have:  # the device table gets every entry it lacks
                step.upd_idx.extend(range(st.row * mb + have, st.row * mb + n_bt))
                step.upd_val.extend(st.block_table[have:n_bt])
                st.device_blocks = n_bt
            n = sr.num_tokens
            start = sr.num_computed_tokens
            end = start + n
            k = sr.num_draft_slots
            if k:
                # The scheduler's bound: the true start is at most num_computed_tokens, so
                # 1 + k rows from it stay inside the blocks reserved for them.
                if not sr.sample or sr.num_tokens != 1 + k or end > n_bt * bs or sr.num_computed_tokens + 1 + k >= row_len:
                    raise RuntimeError(f"{sr.req_id}: speculative step of {sr.num_tokens} tokens from {sr.num_computed_tokens} "
                                       f"with {k} draft slots does not fit its {n_bt} blocks")
                while st.spec_pending and st.spec_pending[0][0].delivered:  # counts already handed out: keep the host close
                    host, q = st.spec_pending.pop(0)
                    st.num_tokens += host.count(q)
                if spec_rows is not None:
                    k = min(k, spec_rows[n_spec])
                n_spec += 1
                step.rel.append(True)
                states.append(st)
                starts.append(sr.num_computed_tokens)  # an upper bound: the device knows the start
                qlens.append(1 + k)
                flat += 1 + k
                step.spec.append(len(step.samplers))
                step.spec_k.append(k)
                step.samplers.append(st)
                step.num_logits.append(1 + k)
                step.logit_rows.extend(range(flat - 1 - k, flat))
                step.dst.extend([self.scratch_slot] * (1 + k))  # written after acceptance, not by the argmax
                continue
            if st.spec_pending:
                self.settle(st)  # a plain row needs the exact count (the scheduler's steps have landed: no wait)
            if end > st.num_tokens or end > n_bt * bs:
                raise RuntimeError(f"{sr.req_id}: step needs tokens up to {end} but the worker has {st.num_tokens}")
            if has_spec:
                step.rel.append(False)
            states.append(st)
            starts.append(start)
            qlens.append(n)
            flat += n
            if sr.sample:
                if end != st.num_tokens:
                    raise RuntimeError(f"{sr.req_id}: sampling at {end} but the worker has {st.num_tokens} tokens")
                samplers.append(st)
                if has_spec:
                    step.num_logits.append(1)
                logit_rows.append(flat - 1)
                dst.append(scratch if has_spec else st.row * row_len + end)
                if n != 1:
                    one_each = False
            else:
                one_each = False
        if not has_spec:
            step.num_logits = [1] * len(samplers)
        step.one_each = one_each and not step.spec
        return step

    def settle(self, st: ReqState) -> None:
        """Make st.num_tokens exact: add the counts of its speculative steps in flight
        (waits for their copies; counted in host_waits when one had not landed)."""
        for host, q in st.spec_pending:
            if not host.ready():
                self.host_waits += 1
            st.num_tokens += host.count(q)
        st.spec_pending.clear()

    def exact_layout(self, step: ScheduledStep, block_q: int, tiles: bool) -> Layout:
        """The unpadded layout of an eager step (tiles: for the Triton varlen kernel)."""
        NT = sum(-(-n // block_q) for n in step.qlens) if tiles else 0
        P = len(step.verify.rows) if step.verify is not None else 0
        return Layout(step.num_tokens, len(step.states), NT, len(step.logit_rows), block_q, decode=False, padded=False, P=P)

    def padded_layout(self, T: int, decode: bool, block_q: int, verify: bool = False) -> Layout:
        """A CUDA graph's layout for T tokens: decode graphs have one request per token;
        mixed-step graphs have every request slot (+1, always padding) and the worst
        tile count; the LM head runs on a fixed number of rows: one per request slot at
        most (a prompt chunk samples its last token only).
        verify: the layout of a speculative step, whose verified requests have 1 + k
        logits rows each, so up to min(T, max_rows * (1 + k)) rows. Only steps with draft
        slots take it: a prefill step on it would run the LM head on every token."""
        if decode:
            return Layout(T, T, 0, T, 1, decode=True, padded=True)
        R1 = self.max_rows + 1
        P = min(T, self.max_rows)  # a speculative step of this size verifies at most P requests
        S = min(T, self.max_rows * self.spec_k1) if verify else P
        return Layout(T, R1, T // block_q + R1, S, block_q, decode=False, padded=True, P=P if self.spec_k1 else 0)

    def upload(self, step: ScheduledStep | None, layout: Layout) -> torch.Tensor:
        """Pack the step (None: padding only, for graph capture), send it in one copy and
        apply its block-table deltas on the device; returns the device staging buffer."""
        buf = self.stage.next()
        self._pack(buf, layout, step)
        upd_idx, upd_val = (step.upd_idx, step.upd_val) if step is not None else ([], [])
        U = len(upd_idx)
        room = (self.stage.capacity - layout.end) // 2
        staged = U if U <= room else 0
        o = layout.end
        buf[o:o + staged] = upd_idx[:staged]
        buf[o + staged:o + 2 * staged] = upd_val[:staged]
        o_new = o + 2 * staged
        sizes = self._stage_new(buf, o_new)
        end = o_new + sum(sizes)
        dev = self.stage.upload(end)
        if sizes:  # the new requests' rows, counts and sampling parameters, from the same copy
            bounds = list(itertools.accumulate(sizes, initial=o_new))
            *parts, floats = (dev[a:b] for a, b in itertools.pairwise(bounds))
            self._write_new(*parts, floats.view(torch.float64))
        if staged:
            self.block_table.view(-1).index_copy_(0, dev[o:o + staged], dev[o + staged:o + 2 * staged])
        elif U:  # more deltas than the staging room (a long resumed request): a direct copy
            self.block_table.view(-1).index_copy_(0, _tensor(upd_idx, torch.int64, self.device),
                                                  _tensor(upd_val, torch.int64, self.device))
        return dev

    def _pack(self, buf: np.ndarray, L: Layout, step: ScheduledStep | None) -> None:
        """The real requests first, then harmless padding up to the layout's sizes."""
        states = step.states if step is not None else []
        starts = step.starts if step is not None else []
        qlens = step.qlens if step is not None else []
        R, T = len(states), sum(qlens)
        rel = step.rel if step is not None else None
        # Per query token its buffer row and position, in whole-array operations (a loop of
        # slice writes cost ~1 us per request per step on the launch thread).
        rows = np.fromiter([st.row for st in states], dtype=np.int64, count=R)
        start = np.fromiter(starts, dtype=np.int64, count=R)
        if T == R:  # one token each (decode)
            buf[:T] = rows
            buf[L.T:L.T + T] = start
        elif R:
            q = np.fromiter(qlens, dtype=np.int64, count=R)
            buf[:T] = np.repeat(rows, q)
            # token j of request i sits at start_i + j: the flat index minus the request's first flat index
            first = np.cumsum(q) - q
            buf[L.T:L.T + T] = np.arange(T) + np.repeat(start - first, q)
        buf[T:L.T] = self.scratch_row
        buf[L.T + T:2 * L.T] = -1  # no KV write
        o = L.o_rows
        buf[o:o + R] = rows
        buf[o + R:o + L.R] = self.scratch_row
        o = L.o_seq
        buf[o:o + R] = start + (1 if T == R else np.fromiter(qlens, dtype=np.int64, count=R))
        if rel is not None:
            # Relative rows (speculative requests): position -2 - j is query j at
            # num_tokens_dev[row] - 1 + j; attention length -n is num_tokens_dev[row] - 1 + n.
            # The device resolves both (fused_ops.step_inputs); -1 stays "padding".
            t = 0
            for i, (r, n) in enumerate(zip(rel, qlens)):
                if r:
                    buf[L.T + t:L.T + t + n] = -2 - np.arange(n)
                    buf[L.o_seq + i] = -n
                t += n
        buf[o + R:o + L.R] = 1 if L.decode else 0  # decode padding reads one scratch key; varlen padding none
        o = L.o_cu
        buf[o] = 0
        np.cumsum(qlens, out=buf[o + 1:o + 1 + R])
        buf[o + 1 + R:o + L.R + 1] = T
        if L.NT:
            from aiosched.executors.torch.attention.triton_paged import varlen_tiles

            tiles = varlen_tiles(qlens, L.block_q)
            o = L.o_tiles
            buf[o:o + len(tiles)] = tiles
            pad = buf[o + len(tiles):o + 2 * L.NT].reshape(-1, 2)
            pad[:, 0] = L.R - 1  # spare tiles point at an empty request slot: they exit at once
            pad[:, 1] = 0
        rows = step.logit_rows if step is not None else []
        dst = step.dst if step is not None else []
        o = L.o_sidx
        buf[o:o + len(rows)] = rows
        buf[o + len(rows):o + L.S] = 0
        o = L.o_dst
        buf[o:o + len(dst)] = dst
        buf[o + len(dst):o + L.S] = self.scratch_slot
        if L.P:
            self._pack_spec(buf, L, step.verify if step is not None else None)

    def _pack_spec(self, buf: np.ndarray, L: Layout, v: SpecRows | None) -> None:
        """The speculative section: the real slots first, then padding (the scratch row,
        no drafts, its count kept; logits rows beyond the real ones verify into the dump slot)."""
        Q = len(v.rows) if v is not None else 0
        dump = L.P * self.spec_k1
        o = L.o_spec
        for vals, pad in ((v.rows if v else [], self.scratch_row), (v.ks if v else [], 0), (v.setv if v else [], -1)):
            buf[o:o + Q] = vals
            buf[o + Q:o + L.P] = pad
            o += L.P
        slot = v.slot if v is not None else []
        buf[o:o + len(slot)] = slot
        seg = buf[o:o + len(slot)]
        seg[seg < 0] = dump
        buf[o + len(slot):o + L.S] = dump

    def spec_views(self, d: torch.Tensor, L: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, ks, setv [P], slot [S]) of a packed speculative step on the device (views)."""
        o, P = L.o_spec, L.P
        return d[o:o + P], d[o + P:o + 2 * P], d[o + 2 * P:o + 3 * P], d[o + 3 * P:o + 3 * P + L.S]

    def device_inputs(self, d: torch.Tensor, L: Layout, fused: bool, workspace: Any = None,
                      host: ScheduledStep | None = None) -> StepInputs:
        """The forward's inputs from a packed step on the device: input ids from the
        token buffer, KV slots from the device block table. The CUDA graphs call this
        inside their capture. `host` (exact layouts) adds the host lists for the CPU kernels."""
        bs = self.block_size
        rel = fused or (host is not None and host.rel is not None)  # padded layouts (graphs) serve every step
        ntok = self.num_tokens_dev if rel else None
        if fused:  # one kernel on CUDA (decode steps are short: each launch counts)
            ids, p, slots = fused_ops.step_inputs(d, L.T, self.tokens, self.block_table, bs, ntok, L.R, L.o_rows, L.o_seq)
        else:
            ids, p, slots = fused_ops.step_inputs_ref(d, L.T, self.tokens, self.block_table, bs, ntok, L.R, L.o_rows, L.o_seq)
        dev_attn = None
        if fused:
            dev_attn = DeviceAttention(self.block_table, d[L.o_rows:L.o_rows + L.R], d[L.o_seq:L.o_seq + L.R],
                                       d[L.o_cu:L.o_cu + L.R + 1], d[L.o_tiles:L.o_tiles + 2 * L.NT], L.NT, L.block_q,
                                       L.decode, workspace)
        if host is not None:
            qsl = [0, *np.cumsum(host.qlens).tolist()]
            if host.rel is not None and (not fused or self.fused_host_lists):
                # The host kernels (CPU attention, sliding-window layers) read host lengths:
                # those of the relative rows come from the device (a read of memory on the
                # CPU; a sync on CUDA, only without the fused attention kernels).
                seq_lens = d[L.o_seq:L.o_seq + len(host.qlens)].tolist()
            else:  # (relative rows on the fused path: upper bounds, which the device kernels do not read)
                seq_lens = [s + n for s, n in zip(host.starts, host.qlens)]
            meta = AttentionMetadata(slots, qsl, seq_lens, [st.block_table for st in host.states], bs, fused=fused, device=dev_attn)
        else:
            meta = AttentionMetadata(slots, [], [], [], bs, fused=fused, device=dev_attn)
        return StepInputs(ids, p, meta, d[L.o_sidx:L.o_sidx + L.S], d[L.o_dst:L.o_dst + L.S])

    # ---- sampling ----

    def sampling_batch(self, states: list[ReqState], num_rows: list[int], grammar_done: Callable[[str], bool]) -> SamplingBatch:
        """Per-row sampling tensors for `states` in order, num_rows[i] consecutive rows each:
        row j of a request yields its token at position num_tokens + j.
        grammar_done(req_id): a complete grammar allows only EOS, so min_tokens yields."""
        rows: list[int] = []
        positions: list[int] = []
        ban_rows: list[int] = []
        ban_tokens: list[int] = []
        for st, n in zip(states, num_rows):
            for j in range(n):
                p = st.num_tokens + j
                if st.bans_now(p) and not grammar_done(st.data.req_id):
                    ban_rows.extend([len(rows)] * len(st.ban_ids))
                    ban_tokens.extend(st.ban_ids)
                rows.append(st.row)
                positions.append(p)
        rows_pos = _tensor(rows + positions, torch.int64, self.device).view(2, -1)
        return self._sampling_tensors(states, rows_pos[0], rows_pos[1], ban_rows, ban_tokens)

    def verify_sampling(self, d: torch.Tensor, L: Layout, states: list[ReqState], first: list[int], num_rows: list[int],
                        grammar_done: Callable[[str], bool]) -> SamplingBatch:
        """Sampling tensors for every logits row of a staged speculative step (L.S rows, a
        fixed shape): each row reads its verified request's parameters through its grid
        slot, on the device, at position num_tokens_dev[row] + j (the device count: exact
        for every verified request; the host's may lag). Rows not verified (extras rows,
        padding) read some slot's parameters: their results go to the dump slot.
        states[q]: verified request q, its first logits row first[q] and num_rows[q] rows;
        min_tokens bans use the host's count, exact for the only requests that have them
        (never speculative)."""
        rows, _, _, slot = self.spec_views(d, L)
        q = torch.div(slot, self.spec_k1, rounding_mode="floor").clamp_(max=L.P - 1)
        r = rows[q]
        positions = self.num_tokens_dev[r] + slot % self.spec_k1
        ban_rows: list[int] = []
        ban_tokens: list[int] = []
        for st, f0, n in zip(states, first, num_rows):
            for j in range(n):
                if st.bans_now(st.num_tokens + j) and not grammar_done(st.data.req_id):
                    ban_rows.extend([f0 + j] * len(st.ban_ids))
                    ban_tokens.extend(st.ban_ids)
        return self._sampling_tensors(states, r.clamp(max=self.max_rows - 1), positions, ban_rows, ban_tokens)

    def _sampling_tensors(self, states: list[ReqState], rows: torch.Tensor, positions: torch.Tensor, ban_rows: list[int],
                          ban_tokens: list[int]) -> SamplingBatch:
        """A SamplingBatch gathered from the per-row parameters at `rows` (device), the host flags from `states`."""
        assert not self._new, "requests added since the last upload: their parameters are not on the device yet (flush_new)"
        f, i = self.row_f[rows], self.row_i[rows]
        sps = [st.data.sampling for st in states]
        random_k = [sp.top_k for sp in sps if sp.temperature > 0]
        return SamplingBatch(
            temperature=f[:, 0], top_k=i[:, 0], top_p=f[:, 1], min_p=f[:, 2], seeds=i[:, 1], positions=positions,
            max_top_k=max(random_k) if random_k and min(random_k) > 0 else 0,
            all_greedy=all(sp.temperature == 0 for sp in sps),
            any_top_k=any(sp.top_k > 0 for sp in sps),
            any_top_p=any(sp.top_p < 1.0 for sp in sps),
            any_min_p=any(sp.min_p > 0 for sp in sps),
            ban_rows=_tensor(ban_rows, torch.int64, self.device) if ban_rows else None,
            ban_tokens=_tensor(ban_tokens, torch.int64, self.device) if ban_tokens else None,
        )

    def greedy(self, states: list[ReqState]) -> bool:
        """Every row takes the plain argmax (no temperature, no min_tokens ban). O(1) while
        every live request is greedy without bans (counted at add/free), else one walk."""
        if not self.num_not_greedy:
            return True
        return all(st.data.sampling.temperature == 0.0 and not st.bans_now(st.num_tokens) for st in states)

    def write_tokens(self, dst: torch.Tensor | list[int], tokens: torch.Tensor | list[int]) -> None:
        """Sampled tokens join their requests' histories on the device (flat buffer indices)."""
        if isinstance(dst, list):
            dst = _tensor(dst, torch.int64, self.device)
        if isinstance(tokens, list):
            tokens = _tensor(tokens, torch.int64, self.device)
        self.tokens.view(-1).index_copy_(0, dst, tokens)
