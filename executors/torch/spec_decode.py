"""N-gram (prompt lookup) speculative decoding, on the worker (docs/architecture.md,
"Speculative decoding under async scheduling").

The scheduler only reserves room: a decode step of a speculating request carries
`num_draft_slots = k` (KV blocks for 1 + k tokens) and, in async mode, only an upper
bound of the request's position. The worker's true length of the request lives on the
device (`InputBatch.num_tokens_dev`), so a step is built and launched without waiting
for the previous step's accepted count; the request always computes 1 + k rows:

1. `propose_step`: up to k drafts from its history, on the device over the token
   buffer (`propose_ngram_batch`; `propose_ngram` is the host reference), written into
   the buffer right after its known tokens (missing drafts: -1, never accepted);
2. the target model runs over [last token, drafts] in the step's forward pass, at
   positions derived on the device from the device count (`InputBatch.schedule`);
3. `verify_step` accepts (`greedy_accepts`, or `verify_drafts` when sampling): greedy
   accepts the longest prefix equal to the target argmax; sampling uses rejection sampling for a point-mass draft (accept d with
   probability p(d), else sample from p without d, renormalised), which draws exactly
   from the target distribution. Randomness is the sampler's counter hash of
   (seed, position, vocab index), so it stays seeded and batch-invariant;
4. appends the accepted drafts plus one corrected/bonus token to the history and the
   device count, on the device; the emitted tokens and counts go to the host on the
   side stream (`SpecHost`), as a pending output like any step's.

Both phases run at fixed shapes read from the staged step (`InputBatch.spec_views`: P
request slots, S logits rows, padding harmless) into preallocated `SpecBuffers`, with no
host read and no shape that depends on a device value: on CUDA each replays a graph per
padded size (executors/torch/cuda_path.py), elsewhere the same ops run eagerly.
"""
from __future__ import annotations

from collections.abc import Callable
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

    All n-gram sizes in one pass, a fixed ~25 ops whatever ngram_max and whatever the
    shapes (constants cached per (W, k, sizes): `_consts`), so the same ops run eagerly
    and inside a CUDA graph: eq[r, j, o] says whether the token o places before column j
    equals the one o places before the last; its running AND over o (N - 1 in-place
    products, N = ngram_max) is the match length at j; the score n * W + j + 1 of every
    (size, end) that matches picks the largest n, then the most recent end, as the
    reference's loop does."""
    import torch

    R, W = hist.shape
    c = _consts(hist.device, W, k, ngram_min, ngram_max)
    last = lengths - 1  # index of each row's last known token
    tails = hist.gather(1, (last.unsqueeze(1) - c.offs).clamp_(min=0))  # [R, N]: the token o places before the last
    # windows[r, j, o] = hist[r, max(j - o, 0)]: a clamped column (j < o) only meets sizes
    # n > j + 1, which the score excludes (`c.score`: 0 for j < n - 1)
    run = (hist[:, c.widx] == tails.unsqueeze(1)).to(torch.uint8)  # [R, W, N]: token o equal ...
    for o in range(1, run.shape[-1]):  # ... and, running AND over o, tokens 0..o all equal
        # (not `cummin(dim=-1)`: torch's scan over a 4-wide innermost dim took ~1 ms per
        # call at 128 x 1024 rows on an H200, 57% of a c16 speculative step's device time)
        run[..., o].mul_(run[..., o - 1])
    # j ends an earlier occurrence of the last n tokens: j < last, j >= n - 1, the first n offsets equal
    score = (run[:, :, ngram_min - 1:] * c.score).mul_(c.cols < last.view(R, 1, 1)).amax(dim=(1, 2))
    # j: end of the chosen earlier occurrence; with none (score 0: j = W - 1) idx starts at W >= every length
    idx = ((score - 1) % W).unsqueeze(1) + c.steps
    valid = idx < lengths.unsqueeze(1)
    drafts = torch.where(valid, hist.gather(1, idx.clamp_(max=W - 1)), -1)
    return drafts, valid.sum(dim=1)


class _Consts:
    """The index constants of `propose_ngram_batch` for one (device, W, k, sizes)."""

    def __init__(self, dev: Any, W: int, k: int, ngram_min: int, ngram_max: int) -> None:
        import torch

        N = ngram_max
        self.offs = torch.arange(N, device=dev)
        cols = torch.arange(W, device=dev)
        self.widx = (cols.unsqueeze(1) - self.offs).clamp_(min=0)  # [W, N]
        ns = torch.arange(ngram_min, ngram_max + 1, device=dev)
        self.cols = cols.view(1, W, 1)
        self.score = torch.where(self.cols >= ns - 1, ns * W + self.cols + 1, 0)  # [1, W, sizes]; 0: j too early for n
        self.steps = torch.arange(1, k + 1, device=dev)  # the draft after the match end, and the next k - 1


_DEVICE_CONSTS: dict[tuple, Any] = {}


def _device_const(dev: Any, key: tuple, build: Callable[[], Any]) -> Any:
    """A constant on `dev`, built once per key (before a capture: its warm-up builds it),
    so a step launches no arange or host-to-device copy for it."""
    k = (str(dev), *key)
    c = _DEVICE_CONSTS.get(k)
    if c is None:
        c = _DEVICE_CONSTS[k] = build()
    return c


def _consts(dev: Any, W: int, k: int, ngram_min: int, ngram_max: int) -> _Consts:
    """The proposer's constants for one shape. Callers bucket W (`window`), which bounds the cache."""
    return _device_const(dev, ("ngram", W, k, ngram_min, ngram_max), lambda: _Consts(dev, W, k, ngram_min, ngram_max))


def _minus_one(dev: Any) -> Any:
    """A 0-dim -1 on `dev` (`torch.where(..., out=)` takes no Python scalar)."""
    import torch

    return _device_const(dev, ("minus_one",), lambda: torch.tensor(-1, dtype=torch.int64, device=dev))


def _steps(dev: Any, n: int) -> Any:
    """arange(n) on `dev`."""
    import torch

    return _device_const(dev, ("arange", n), lambda: torch.arange(n, device=dev))


def window(bound: int, row_len: int) -> int:
    """The history width a proposer reads for lengths <= bound: the next power of two
    (>= 64), at most the buffer row; a width past the known tokens is never read."""
    return min(row_len, max(64, 1 << max(0, bound - 1).bit_length()))


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


def accept_grid(tok: Any, acc: Any) -> tuple[Any, Any]:
    """[Q, K1] tokens (-1: no row) and accepted flags (int) by request and step -> (the
    emitted tokens, -1 past each count; [Q] counts = leading accepted drafts + the one after)."""
    import torch

    counts = acc.cumprod(dim=1).sum(dim=1).add_(1)
    keep = _steps(tok.device, tok.shape[1]) < counts.unsqueeze(1)
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


class SpecBuffers:
    """What a speculative step leaves on the device for the next phase, preallocated for
    the largest padded layout (max_slots request slots of K1 = 1 + k steps), so the
    propose and verify phases write into fixed addresses: the same code runs eagerly and
    inside a CUDA graph. drafts: [P, K1] per request slot (-1: none; column k always -1,
    the last row has no draft) plus one spare row that padding logits rows may read;
    emitted: [P, K1 + 2] (tokens padded with -1, count, drafts found)."""

    def __init__(self, max_slots: int, k1: int, device: Any) -> None:
        import torch

        self.k1 = k1
        self.drafts = torch.full(((max_slots + 1) * k1,), -1, dtype=torch.int64, device=device)
        self.emitted = torch.zeros((max_slots + 1, k1 + 2), dtype=torch.int64, device=device)


# The n-gram proposer looks for matches in each request's last this-many tokens (all of
# them in shorter requests): bounded work per step whatever max_model_len is.
NGRAM_LOOKBACK = 1024


def propose_step(batch: Any, bufs: SpecBuffers, rows: Any, ks: Any, setv: Any, W: int, spec: Any) -> Any:
    """The propose phase at a fixed shape: P request slots (padding: the scratch row, k 0).
    rows/ks/setv: [P] buffer rows, draft slots, host counts to set first (-1: the device
    count is exact; stale after a plain step). Drafts are proposed over the first W tokens
    of each row at its device count (`propose_ngram_batch`; W > NGRAM_LOOKBACK: over its
    last NGRAM_LOOKBACK known tokens), kept for the first k of each slot, written into the
    token buffer right after the known tokens (0 for none) and into bufs.drafts; returns
    that [P, K1] view. No host value is read, nothing is allocated
    by shape-dependent host logic: capturable."""
    import torch

    P, K1 = rows.shape[0], bufs.k1
    ntok = batch.num_tokens_dev
    lengths = torch.where(setv >= 0, setv, ntok[rows])
    ntok.index_copy_(0, rows, lengths)  # (padding slots write the scratch row's own count back)
    out = bufs.drafts[:P * K1].view(P, K1)
    steps = _steps(rows.device, K1)
    mine = steps < ks.unsqueeze(1)  # the first k_i steps are the slot's drafts (the match does not depend on k)
    if spec is None:
        out.fill_(-1)
    else:
        if W > NGRAM_LOOKBACK:
            # Only the last NGRAM_LOOKBACK tokens of each row: the proposer's work is
            # O(width x ngram_max) per row, and a graph's width is the whole row
            # (max_model_len: 131,072 for Llama-3.2 made a speculative step ~136 ms on an H200).
            start = (lengths - NGRAM_LOOKBACK).clamp_(min=0)
            hist = batch.tokens[rows.unsqueeze(1), start.unsqueeze(1) + _steps(rows.device, NGRAM_LOOKBACK)]
            drafts, _ = propose_ngram_batch(hist, lengths - start, K1, spec.ngram_min, spec.ngram_max)
        else:
            drafts, _ = propose_ngram_batch(batch.tokens[:, :W][rows], lengths, K1, spec.ngram_min, spec.ngram_max)
        torch.where(mine, drafts, _minus_one(rows.device), out=out)
    # The k_i slots after each row's known tokens get its drafts (0 for none); the rest of
    # the grid goes to the scratch slot.
    dst = torch.where(mine, (rows * batch.row_len + lengths).unsqueeze(1) + steps, batch.scratch_slot)
    batch.write_tokens(dst.view(-1), out.clamp(min=0).view(-1))
    return out


def greedy_accepts(bufs: SpecBuffers, tok: Any, slot: Any) -> Any:
    """[S] argmax tokens of the logits rows and their grid slots -> [S] accepted: the row's
    draft equals the target's argmax (no draft: -1, never equal)."""
    return tok == bufs.drafts[slot]


def verify_step(batch: Any, bufs: SpecBuffers, tok: Any, acc: Any, rows: Any, slot: Any) -> Any:
    """The acceptance phase at a fixed shape: [S] tokens and accepted flags of the logits
    rows, [S] their slots q * K1 + j on the [P, K1] grid (P * K1: a dump for rows that are
    not verified: padding, extras rows), [P] the slots' buffer rows. Appends each slot's
    accepted drafts plus the corrected/bonus token to its history and device count,
    on the device. Returns the [P, K1 + 2] emitted tokens / counts / drafts found
    (bufs.emitted; padding slots: count 1, never read)."""
    import torch

    P, K1 = rows.shape[0], bufs.k1
    ntok = batch.num_tokens_dev
    grid = torch.full((P * K1 + 1, 2), -1, dtype=torch.int64, device=tok.device)
    grid.index_copy_(0, slot, torch.stack([tok.long(), acc.long()], dim=1))
    grid = grid[:P * K1].view(P, K1, 2)
    emitted, counts = accept_grid(grid[..., 0], grid[..., 1].clamp(min=0))
    steps = _steps(tok.device, K1)
    base = rows * batch.row_len + ntok[rows]
    dst = torch.where(emitted >= 0, base.unsqueeze(1) + steps, batch.scratch_slot)
    batch.write_tokens(dst.view(-1), emitted.clamp(min=0).view(-1))
    ntok.index_add_(0, rows, counts)
    # padding slots added to the scratch row: it keeps its one token (fill_: `[i] = 1` is a
    # blocking host-to-device copy, which a CUDA graph cannot capture)
    ntok[batch.scratch_row:batch.scratch_row + 1].fill_(1)
    found = (bufs.drafts[:P * K1].view(P, K1) >= 0).sum(dim=1)
    return torch.cat([emitted, counts.unsqueeze(1), found.unsqueeze(1)], dim=1, out=bufs.emitted[:P])
