"""N-gram (prompt lookup) speculative decoding, on the worker (docs/architecture.md,
"Speculative decoding under async scheduling").

The scheduler only reserves room: a decode step of a speculating request carries
`num_draft_slots = k` (KV blocks for 1 + k tokens) and, in async mode, only an upper
bound of the request's position. The worker knows the request's real length (its own
token history), so it:

1. proposes up to k drafts from that history (`propose_ngram`),
2. writes them into the token buffer past the known tokens and runs the target model
   over [last token, drafts] in one forward pass,
3. verifies (`verify_drafts`): greedy accepts the longest prefix equal to the target
   argmax; sampling uses rejection sampling for a point-mass draft (accept d with
   probability p(d), else sample from p without d, renormalised), which draws exactly
   from the target distribution. Randomness is the sampler's counter hash of
   (seed, position, vocab index), so it stays seeded and batch-invariant,
4. appends the accepted drafts plus one corrected/bonus token to the history, on the
   device (`accept_rows`); one copy brings the emitted tokens to the host.
"""
from __future__ import annotations

from typing import Any, Collection

import msgspec
import numpy as np

from aiosched.protocol import SchedulerOutput


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
    first lengths[r] tokens are known -> ([R, k] drafts, -1 past each row's count; [R] counts)."""
    import torch

    R, W = hist.shape
    dev = hist.device
    cols = torch.arange(W, device=dev)
    last = lengths - 1  # index of each row's last known token
    found = torch.zeros(R, dtype=torch.bool, device=dev)
    best = torch.full((R,), -1, dtype=torch.int64, device=dev)  # j: end of the chosen earlier occurrence
    for n in range(ngram_max, ngram_min - 1, -1):
        # j ends an earlier occurrence of the last n tokens: hist[j - o] == hist[last - o] for o < n
        ok = (cols < last.unsqueeze(1)) & (cols >= n - 1)
        for o in range(n):
            tail = hist.gather(1, (last - o).clamp(min=0).unsqueeze(1))
            ok &= torch.roll(hist, o, dims=1) == tail  # column j holds hist[j - o] (j < o wraps: masked above)
        j = torch.where(ok, cols, -1).amax(dim=1)  # the most recent
        take = ~found & (j >= 0)
        best = torch.where(take, j, best)
        found |= take
    idx = best.unsqueeze(1) + 1 + torch.arange(k, device=dev)
    valid = found.unsqueeze(1) & (idx < lengths.unsqueeze(1))
    drafts = torch.where(valid, hist.gather(1, idx.clamp(max=W - 1)), -1)
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


def accept_rows(tokens: Any, accepted: Any, num_rows: list[int]) -> tuple[Any, Any]:
    """Per request (num_rows[q] consecutive rows: 1 + its drafts), on the device: keep
    the drafts while accepted, then the first non-accepted row's token (correction, or
    the bonus after all drafts; the last row has no draft, so it is never accepted).
    [N] tokens, [N] accepted -> ([Q, K1] tokens by request, padded with -1; [Q] counts)."""
    import torch

    Q, K1 = len(num_rows), max(num_rows)
    dev = tokens.device
    # Flat row i of request q, step j sits at q * K1 + j of the padded layout.
    slot = torch.tensor([q * K1 + j for q, n in enumerate(num_rows) for j in range(n)], dtype=torch.int64).to(dev, non_blocking=True)
    tok = torch.full((Q * K1,), -1, dtype=tokens.dtype, device=dev).index_copy_(0, slot, tokens).view(Q, K1)
    acc = torch.zeros(Q * K1, dtype=torch.int64, device=dev).index_copy_(0, slot, accepted.long()).view(Q, K1)
    counts = acc.cumprod(dim=1).sum(dim=1) + 1  # leading accepted drafts + the one token after them
    keep = torch.arange(K1, device=dev).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(keep, tok, -1), counts


# ---- the torch runner's speculative step (the forward is the runner's, over InputBatch) ----


def prepare_spec_step(batch: Any, so: SchedulerOutput, spec: Any,
                      no_drafts: Collection[str] = ()) -> tuple[SchedulerOutput, dict[str, list[int]]]:
    """Resolve each speculative row at the worker's real position and propose its drafts
    (written into the token buffer past the known tokens). Returns the step rewritten
    with exact positions (rows without drafts become plain one-token decodes, so a step
    with no drafts at all runs on the unchanged path, CUDA graphs included) and the
    drafts by request. spec None: no drafts; requests in `no_drafts` (those with sampling
    extras the verifier does not implement) get none either, the others keep theirs.
    `batch` is the runner's InputBatch (executors/torch/input_batch.py)."""
    import torch

    spec_rows = [(sr, batch.reqs[sr.req_id]) for sr in so.scheduled if sr.num_draft_slots]
    drafting = [(sr, st) for sr, st in spec_rows if spec is not None and sr.req_id not in no_drafts]
    proposed: dict[str, list[int]] = {}
    if drafting:
        # Proposed on the device over the token buffer, for every drafting row at once;
        # only the [R, k] drafts and counts come to the host (one small copy).
        dev = batch.tokens.device
        longest = max(st.num_tokens for _, st in drafting)
        rows_len = torch.tensor([st.row for _, st in drafting] + [st.num_tokens for _, st in drafting], dtype=torch.int64).to(dev)
        R = len(drafting)
        k = max(sr.num_draft_slots for sr, _ in drafting)
        d_t, c_t = propose_ngram_batch(batch.tokens[rows_len[:R], :longest], rows_len[R:], k, spec.ngram_min, spec.ngram_max)
        host = torch.cat([d_t, c_t.unsqueeze(1)], dim=1).tolist()
        proposed = {sr.req_id: h[:h[-1]] for (sr, _), h in zip(drafting, host)}
    proposals: dict[str, list[int]] = {}
    for sr, st in spec_rows:
        start = st.num_tokens - 1
        if start > sr.num_computed_tokens:
            raise RuntimeError(f"{sr.req_id}: worker at position {start}, past the scheduler's bound {sr.num_computed_tokens}")
        room = min(sr.num_draft_slots, (len(st.block_table) + len(sr.new_block_ids)) * batch.block_size - start - 1,
                   batch.row_len - st.num_tokens)
        ds = proposed.get(sr.req_id, [])[:max(room, 0)]  # the first `room` of k: the match does not depend on k
        if ds:
            proposals[sr.req_id] = ds
    # Drafts go into the token buffer past the known tokens, in one copy.
    dst = [st.row * batch.row_len + st.num_tokens + j for sr, st in spec_rows for j in range(len(proposals.get(sr.req_id, ())))]
    if dst:
        batch.write_tokens(dst, [t for sr, _ in spec_rows for t in proposals.get(sr.req_id, ())])
    scheduled = []
    for sr in so.scheduled:
        if not sr.num_draft_slots:
            scheduled.append(sr)
            continue
        st = batch.reqs[sr.req_id]
        m = len(proposals.get(sr.req_id, ()))
        scheduled.append(msgspec.structs.replace(sr, num_computed_tokens=st.num_tokens - 1, num_tokens=1 + m, num_draft_slots=m))
    return msgspec.structs.replace(so, new_requests=[], freed_req_ids=[], scheduled=scheduled), proposals


def accept_drafts(batch: Any, states: list[Any], num_logits: list[int], drafts: dict[str, list[int]], logits: Any,
                  sampling: Any) -> tuple[list[list[int]], int, int]:
    """Verify the 1 + m logits rows of each request in `states` (`logits`: their rows, in
    order; `sampling`: InputBatch.sampling_batch of the same rows) and append the accepted
    drafts plus the corrected/bonus token to the token buffer, on the device; then one
    copy of the emitted tokens to the host (synchronous). Returns each request's emitted
    tokens, the drafts verified and the drafts accepted."""
    import torch

    dev = logits.device
    draft_of_row = []
    for st, n in zip(states, num_logits):
        ds = drafts.get(st.data.req_id, [])
        draft_of_row.extend(ds[j] if j < len(ds) else -1 for j in range(n))
    tok_t, acc_t = verify_drafts(logits, sampling, torch.tensor(draft_of_row, dtype=torch.int64).to(dev, non_blocking=True))
    tok, counts = accept_rows(tok_t, acc_t, num_logits)
    # Emitted token j of a request goes to its row at num_tokens + j; the padding to a scratch slot.
    base = torch.tensor([st.row * batch.row_len + st.num_tokens for st in states], dtype=torch.int64).to(dev, non_blocking=True)
    dst = torch.where(tok >= 0, base.unsqueeze(1) + torch.arange(tok.shape[1], device=dev), batch.scratch_slot)
    batch.write_tokens(dst.view(-1), tok.clamp(min=0).view(-1))
    host = torch.cat([tok, counts.unsqueeze(1)], dim=1).tolist()
    emitted_all = [h[:h[-1]] for h in host]
    for st, e in zip(states, emitted_all):
        st.num_tokens += len(e)
    num_drafts = sum(num_logits) - len(num_logits)
    return emitted_all, num_drafts, sum(len(e) for e in emitted_all) - len(emitted_all)
