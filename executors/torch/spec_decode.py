"""N-gram (prompt lookup) speculative decoding, on the worker (docs/architecture.md,
"Speculative decoding under async scheduling").

The scheduler only reserves room: a decode step of a speculating request carries
`num_draft_slots = k` (KV blocks for 1 + k tokens) and, in async mode, only an upper
bound of the request's position. The worker's true length of the request lives on the
device (`InputBatch.num_tokens_dev`), so a step is built and launched without waiting
for the previous step's accepted count; the request always computes 1 + k rows:

1. `propose_into_buffer`: up to k drafts from its history, on the device over the token
   buffer (`propose_ngram_batch`; `propose_ngram` is the host reference), written into
   the buffer right after its known tokens (missing drafts: -1, never accepted);
2. the target model runs over [last token, drafts] in the step's forward pass, at
   positions derived on the device from the device count (`InputBatch.schedule`);
3. `verify_on_device` verifies (`verify_drafts`): greedy accepts the longest prefix equal to the target
   argmax; sampling uses rejection sampling for a point-mass draft (accept d with
   probability p(d), else sample from p without d, renormalised), which draws exactly
   from the target distribution. Randomness is the sampler's counter hash of
   (seed, position, vocab index), so it stays seeded and batch-invariant;
4. appends the accepted drafts plus one corrected/bonus token to the history and the
   device count, on the device; the emitted tokens and counts go to the host on the
   side stream (`SpecHost`), as a pending output like any step's.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def propose_ngram(tokens: "list[int] | np.ndarray", k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the history's
    last n tokens, trying n from ngram_max down to ngram_min; [] when none occurs."""
    arr = np.asarray(tokens, dtype=np.int64)
    L = len(arr)
    if k <= 0 or L < 2:
        return []
    ends = np.flatnonzero(arr[:-1] == arr[-1])  # j: an earlier token equal to the last one
    if len(ends) == 0:
        return []
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        ok = ends >= n - 1
        for o in range(1, n):
            ok &= arr[np.maximum(ends - o, 0)] == arr[L - 1 - o]
        hits = ends[ok]
        if len(hits):
            j = int(hits[-1])  # most recent
            return arr[j + 1 : j + 1 + k].tolist()
    return []


def propose_ngram_batch(hist: Any, lengths: Any, k: int, ngram_min: int, ngram_max: int) -> tuple[Any, Any]:
    """`propose_ngram` for a batch of histories at once, as tensor ops on their device (no
    per-request Python, no copy of the histories to the host): [R, W] histories whose
    first lengths[r] tokens are known -> ([R, k] drafts, -1 past each row's count; [R] counts).

    All n-gram sizes in one pass, a fixed ~20 kernels whatever ngram_max (a loop per n
    and per offset launched ~150 small kernels, 1.8 ms of host time per step on the
    H200's host): eq[r, j, o] says whether the token o places before column j equals
    the one o places before the last; its running AND over o is the match length at j;
    the score n * W + j of every (size, end) that matches picks the largest n, then the
    most recent end, as the reference's loop does."""
    import torch

    R, W = hist.shape
    dev = hist.device
    N = ngram_max
    last = lengths - 1  # index of each row's last known token
    # windows[r, j, i] = hist[r, j - (N - 1) + i], left-padded (a view, no copy); flipped, i -> o = N - 1 - i
    windows = torch.nn.functional.pad(hist, (N - 1, 0), value=-1).unfold(1, N, 1).flip(-1)
    offs = torch.arange(N, device=dev)
    tails = hist.gather(1, (last.unsqueeze(1) - offs).clamp(min=0))  # [R, N]: the token o places before the last
    run = (windows == tails.unsqueeze(1)).to(torch.uint8).cummin(dim=-1).values  # [R, W, N]: tokens 0..o all equal
    ns = torch.arange(ngram_min, ngram_max + 1, device=dev)
    cols = torch.arange(W, device=dev).view(1, W, 1)
    # j ends an earlier occurrence of the last n tokens: j < last, j >= n - 1, the first n offsets equal
    ok = run[:, :, ngram_min - 1:].bool() & (cols >= ns - 1) & (cols < last.view(R, 1, 1))
    score = torch.where(ok, ns * W + cols, -1).amax(dim=(1, 2))
    found = score >= 0
    best = torch.where(found, score % W, -1)  # j: end of the chosen earlier occurrence
    idx = best.unsqueeze(1) + 1 + torch.arange(k, device=dev)
    valid = found.unsqueeze(1) & (idx < lengths.unsqueeze(1))
    drafts = torch.where(valid, hist.gather(1, idx.clamp(min=0, max=W - 1)), -1)
    return drafts, valid.sum(dim=1)


def verify_drafts(logits: Any, b: Any, drafts: Any) -> tuple[Any, Any]:
    """[R, V] logits, a SamplingBatch of R rows (positions: the token each row samples),
    [R] drafts (-1: none) -> ([R] tokens, [R] accepted). A row with a draft yields the
    draft when accepted, else a token from the target without the draft (greedy: the
    argmax); a row without one samples exactly like `aiosched.executors.torch.sampler.sample`."""
    import torch

    from aiosched.executors.torch.sampler import apply_top_k_top_p_min_p, uniform_noise

    if b.ban_rows is not None and b.ban_rows.numel():
        logits = logits.index_put((b.ban_rows, b.ban_tokens), torch.tensor(float("-inf"), device=logits.device))
    has = drafts >= 0
    d = drafts.clamp(min=0).unsqueeze(1)
    greedy = logits.argmax(dim=-1)
    greedy_acc = has & (greedy == drafts)
    if b.all_greedy:
        return greedy, greedy_acc
    temp = torch.where(b.temperature > 0, b.temperature, 1.0).unsqueeze(1)
    scaled = apply_top_k_top_p_min_p(logits / temp, b).double()
    u = uniform_noise(b.seeds, b.positions, logits.shape[-1])
    p_d = torch.softmax(scaled, dim=-1).gather(1, d).squeeze(1)
    acc = has & (u.gather(1, d).squeeze(1) < p_d)  # P(accept d) = p(d)
    noisy = scaled + -torch.log(-torch.log(u))  # Gumbel-max over the target
    # Rejected: argmax without d = a draw from p restricted to v != d, renormalised; the
    # noise of the other columns is independent of u[d], which decided the rejection.
    noisy = torch.where(has.unsqueeze(1), noisy.scatter(1, d, float("-inf")), noisy)
    sampled = torch.where(acc, drafts, noisy.argmax(dim=-1))
    is_sampled = b.temperature > 0
    return torch.where(is_sampled, sampled, greedy), torch.where(is_sampled, acc, greedy_acc)


def accept_rows(tokens: Any, accepted: Any, num_rows: list[int], slot: Any = None) -> tuple[Any, Any]:
    """Per request (num_rows[q] consecutive rows: 1 + its drafts), on the device: keep
    the drafts while accepted, then the first non-accepted row's token (correction, or
    the bonus after all drafts; the last row has no draft, so it is never accepted).
    [N] tokens, [N] accepted -> ([Q, K1] tokens by request, padded with -1; [Q] counts)."""
    import torch

    Q, K1 = len(num_rows), max(num_rows)
    dev = tokens.device
    # Flat row i of request q, step j sits at q * K1 + j of the padded layout.
    # (`slot`: that index on the device already, as the verifier has it)
    if slot is None:
        slot = torch.tensor([q * K1 + j for q, n in enumerate(num_rows) for j in range(n)], dtype=torch.int64).to(dev, non_blocking=True)
    tok = torch.full((Q * K1,), -1, dtype=tokens.dtype, device=dev).index_copy_(0, slot, tokens).view(Q, K1)
    acc = torch.zeros(Q * K1, dtype=torch.int64, device=dev).index_copy_(0, slot, accepted.long()).view(Q, K1)
    counts = acc.cumprod(dim=1).sum(dim=1) + 1  # leading accepted drafts + the one token after them
    keep = torch.arange(K1, device=dev).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(keep, tok, -1), counts


# ---- the torch runner's speculative step (the forward is the runner's, over InputBatch) ----


class SpecHost:
    """A verified step's emitted tokens on their way to the host: one [Q, K1 + 2] int64
    tensor (per verified request: its tokens padded with -1, its count, its drafts),
    pinned and copied on the side stream on CUDA (`event`), the device tensor itself on
    the CPU. `delivered` is set once the step's output was handed out (its result());
    the launch thread reads counts from here only for a request that needs its exact
    host count (InputBatch.settle)."""

    def __init__(self, host: Any, event: Any = None) -> None:
        self.host, self.event = host, event
        self.delivered = False
        self._rows: list[list[int]] | None = None

    def ready(self) -> bool:
        return self.delivered or (self.event is not None and self.event.query())

    def rows(self) -> list[list[int]]:
        if self._rows is None:
            if self.event is not None:
                self.event.synchronize()
            self._rows = self.host.tolist()  # (two threads may both convert: the same values)
        return self._rows

    def count(self, q: int) -> int:
        return self.rows()[q][-2]


def propose_into_buffer(batch: Any, states: list[Any], ks: list[int], bounds: list[int], spec: Any) -> Any:
    """Drafts for the speculative requests `states` (k = ks[i] slots each), proposed on
    the device over the token buffer at each row's device count (`propose_ngram_batch`)
    and written into the buffer right after its known tokens: nothing comes to the host.
    bounds[i]: an upper bound of the request's length (the scheduler's). Returns the
    [R, K] drafts (-1: none; K = max(ks)); their buffer slots hold 0 there."""
    import torch

    dev = batch.tokens.device
    R, K = len(states), max(ks)
    meta = torch.tensor([st.row for st in states] + ks, dtype=torch.int64).to(dev, non_blocking=True)
    rows, kt = meta[:R], meta[R:]
    lengths = batch.num_tokens_dev[rows]
    j = torch.arange(K, device=dev).unsqueeze(0)
    if spec is None:
        drafts = torch.full((R, K), -1, dtype=torch.int64, device=dev)
    else:
        W = min(max(bounds), batch.row_len)
        drafts, _ = propose_ngram_batch(batch.tokens[rows, :W], lengths, K, spec.ngram_min, spec.ngram_max)
        drafts = torch.where(j < kt.unsqueeze(1), drafts, -1)  # at most k_i of them (the first k_i: the match does not depend on k)
    # The k_i slots after each row's known tokens get its drafts (0 for none); the rest of
    # the [R, K] grid goes to the scratch slot.
    dst = torch.where(j < kt.unsqueeze(1), (rows * batch.row_len + lengths).unsqueeze(1) + j, batch.scratch_slot)
    batch.write_tokens(dst.view(-1), drafts.clamp(min=0).view(-1))
    return drafts


def verify_on_device(batch: Any, states: list[Any], num_rows: list[int], spec_of: list[int], drafts: Any, logits: Any,
                     sampling: Any) -> tuple[Any, Any]:
    """Verify the logits rows of the requests `states` (num_rows[q] consecutive rows each;
    spec_of[q]: the request's row in `drafts`, or -1 for a plain one-row request) and
    append the accepted drafts plus the corrected/bonus token to each request's history,
    all on the device: the token buffer at the request's device count, which then grows
    by what it emitted. Nothing waits for the host. Returns the [Q, K1 + 2] emitted
    tokens / counts / drafts tensor (device) and the [Q] counts."""
    import torch

    dev = logits.device
    Q, K1 = len(states), max(num_rows)
    K = drafts.shape[1] if drafts is not None else 0
    none = drafts.numel() if drafts is not None else 0  # the index of a -1 appended to the flat drafts
    # One host list -> one copy: per logits row its draft's flat index and its padded slot
    # q * K1 + j; per request its buffer row.
    d_idx, slot = [], []
    for q, (n, s) in enumerate(zip(num_rows, spec_of)):
        for jj in range(n):
            d_idx.append(s * K + jj if s >= 0 and jj < n - 1 else none)
            slot.append(q * K1 + jj)
    N = len(slot)
    meta = torch.tensor(d_idx + slot + [st.row for st in states], dtype=torch.int64).to(dev, non_blocking=True)
    flat = torch.cat([drafts.view(-1), drafts.new_full((1,), -1)]) if drafts is not None else torch.full((1,), -1, dtype=torch.int64, device=dev)
    row_drafts = flat[meta[:N]]
    rows = meta[2 * N:]
    tok_t, acc_t = verify_drafts(logits, sampling, row_drafts)
    tok, counts = accept_rows(tok_t.long(), acc_t, num_rows, slot=meta[N:2 * N])
    j = torch.arange(K1, device=dev).unsqueeze(0)
    base = rows * batch.row_len + batch.num_tokens_dev[rows]
    dst = torch.where(tok >= 0, base.unsqueeze(1) + j, batch.scratch_slot)
    batch.write_tokens(dst.view(-1), tok.clamp(min=0).view(-1))
    batch.num_tokens_dev.index_add_(0, rows, counts)
    ndrafts = torch.zeros(Q * K1, dtype=torch.int64, device=dev).index_copy_(0, meta[N:2 * N], (row_drafts >= 0).long())
    ndrafts = ndrafts.view(Q, K1).sum(dim=1)
    return torch.cat([tok, counts.unsqueeze(1), ndrafts.unsqueeze(1)], dim=1), counts
