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
4. appends the accepted drafts plus one corrected/bonus token to the history.
"""
from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from aiosched.protocol import RunnerOutput, SchedulerOutput


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


def accept_walk(tokens: list[int], accepted: list[bool], m: int) -> list[int]:
    """Rows 0..m of one request: keep drafts while accepted, then the first non-accepted
    row's token (correction, or the bonus after m accepted drafts)."""
    out = []
    for j in range(m + 1):
        out.append(tokens[j])
        if j == m or not accepted[j]:
            break
    return out


# ---- the torch runner's speculative step ----


def prepare_spec_step(r: Any, so: SchedulerOutput) -> tuple[SchedulerOutput, dict[str, list[int]]]:
    """Resolve each speculative row at the worker's real position and propose its drafts
    (written into the token buffer past the known tokens). Returns the step rewritten
    with exact positions (rows without drafts become plain one-token decodes, so a step
    with no drafts at all runs on the unchanged path, CUDA graphs included) and the
    drafts by request."""
    import torch

    spec = r.config.speculative
    extras = getattr(r, "extras", None)
    allow = spec is not None and (extras is None or not extras.step_uses_extras(so))
    # Every speculating request's history in one device->host copy (not one per request).
    spec_rows = [(sr, r.reqs[sr.req_id]) for sr in so.scheduled if sr.num_draft_slots]
    hist = None
    if allow and spec_rows:
        longest = max(st.num_tokens for _, st in spec_rows)
        idx = torch.tensor([st.row for _, st in spec_rows], dtype=torch.int64, device=r.tokens.device)
        hist = r.tokens[idx, :longest].cpu().numpy()
    proposals: dict[str, list[int]] = {}
    for i, (sr, st) in enumerate(spec_rows):
        start = st.num_tokens - 1
        if start > sr.num_computed_tokens:
            raise RuntimeError(f"{sr.req_id}: worker at position {start}, past the scheduler's bound {sr.num_computed_tokens}")
        room = min(sr.num_draft_slots, (len(st.block_table) + len(sr.new_block_ids)) * r.block_size - start - 1, r.row_len - st.num_tokens)
        if hist is not None and room > 0:
            ds = propose_ngram(hist[i, : st.num_tokens], room, spec.ngram_min, spec.ngram_max)
            if ds:
                proposals[sr.req_id] = ds
    # Drafts go into the token buffer past the known tokens, in one copy.
    dst = [st.row * r.row_len + st.num_tokens + j for sr, st in spec_rows for j in range(len(proposals.get(sr.req_id, ())))]
    if dst:
        vals = [t for sr, _ in spec_rows for t in proposals.get(sr.req_id, ())]
        r.tokens.view(-1).index_copy_(0, torch.tensor(dst, dtype=torch.int64).to(r.tokens.device),
                                      torch.tensor(vals, dtype=torch.int64).to(r.tokens.device))
    scheduled = []
    drafts: dict[str, list[int]] = {}
    for sr in so.scheduled:
        if not sr.num_draft_slots:
            scheduled.append(sr)
            continue
        st = r.reqs[sr.req_id]
        ds = proposals.get(sr.req_id, [])
        if ds:
            drafts[sr.req_id] = ds
        scheduled.append(msgspec.structs.replace(sr, num_computed_tokens=st.num_tokens - 1, num_tokens=1 + len(ds), num_draft_slots=len(ds)))
    return msgspec.structs.replace(so, new_requests=[], freed_req_ids=[], scheduled=scheduled), drafts


def run_spec_step(r: Any, so: SchedulerOutput, out: RunnerOutput, drafts: dict[str, list[int]]) -> Any:
    """One forward pass over the whole batch (prefill chunks, decodes, [last token +
    drafts] rows; on CUDA the mixed-step graph), then verification. Synchronous: the
    accepted count decides the request's next position, which the worker needs before
    launching the next step, so this step waits for its tokens."""
    import torch

    from aiosched.executors.torch.attention.torch_paged import AttentionMetadata
    from aiosched.executors.runner import ReadyOutput
    from aiosched.executors.torch.sampler import SamplingBatch

    bs, row_len, dev = r.block_size, r.row_len, r.device
    fast = getattr(r, "fast", None)
    flat_idx: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    rows: list[int] = []  # flattened-batch index of every logits row
    groups: list[tuple[Any, int]] = []  # (state, drafts) per sampling request
    states: list[Any] = []
    for sr in so.scheduled:
        st = r.reqs[sr.req_id]
        if sr.new_block_ids and fast is not None:  # keep the CUDA path's device block table in step
            base = st.row * fast.max_blocks + len(st.block_table)
            fast.bt.view(-1)[base : base + len(sr.new_block_ids)] = torch.tensor(sr.new_block_ids, dtype=fast.bt.dtype, device=dev)
        st.block_table.extend(sr.new_block_ids)
        states.append(st)
        m = sr.num_draft_slots
        start, end = sr.num_computed_tokens, sr.num_computed_tokens + sr.num_tokens
        if end > st.num_tokens + m or end > len(st.block_table) * bs:
            raise RuntimeError(f"{sr.req_id}: step needs tokens up to {end} but the worker has {st.num_tokens} (+{m} drafts)")
        qsl.append(qsl[-1] + sr.num_tokens)
        if fast is None:  # the reference forward's per-token inputs (the CUDA path derives them on the device)
            pos = range(start, end)
            positions.extend(pos)
            flat_idx.extend(st.row * row_len + p for p in pos)
            table = st.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            seq_lens.append(end)
            tables.append(table)
        if sr.sample:
            if end != st.num_tokens + m:
                raise RuntimeError(f"{sr.req_id}: sampling at {end} but the worker has {st.num_tokens} tokens (+{m} drafts)")
            rows.extend(range(qsl[-1] - 1 - m, qsl[-1]))
            groups.append((st, m))
            out.req_ids.append(sr.req_id)
    if fast is not None:  # CUDA: the mixed-step graph (or the fused eager forward), logits of `rows` only
        logits = fast.verify_logits(states, [sr.num_computed_tokens for sr in so.scheduled],
                                    [sr.num_tokens for sr in so.scheduled], rows)
    else:
        input_ids = r.tokens.view(-1)[torch.tensor(flat_idx, dtype=torch.int64).to(dev)]
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.int64).to(dev), qsl, seq_lens, tables, bs)
        hidden = r.model(input_ids, torch.tensor(positions, dtype=torch.int64).to(dev), meta, r.kv_caches)
        logits = r.model.compute_logits(hidden[torch.tensor(rows, device=dev)]) if groups else None
    if not groups:
        return ReadyOutput(out)

    temp, top_k, top_p, min_p, seeds, pos_s, dr = [], [], [], [], [], [], []
    ban_rows: list[int] = []
    ban_tokens: list[int] = []
    for st, m in groups:
        sp = st.data.sampling
        ds = drafts.get(st.data.req_id, [])
        if m == 0 and st.ban_ids and st.num_tokens - st.prompt_len < sp.min_tokens:
            ban_rows.extend([len(temp)] * len(st.ban_ids))
            ban_tokens.extend(st.ban_ids)
        for j in range(m + 1):
            temp.append(sp.temperature)
            top_k.append(sp.top_k if sp.top_k > 0 else 0)
            top_p.append(sp.top_p)
            min_p.append(sp.min_p)
            seeds.append(st.data.seed)
            pos_s.append(st.num_tokens + j)  # the position of the token this row yields
            dr.append(ds[j] if j < m else -1)

    def t(vals: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(vals, dtype=dtype).to(dev)

    sps = [st.data.sampling for st, _ in groups]
    batch = SamplingBatch(
        temperature=t(temp, torch.float32), top_k=t(top_k, torch.int64), top_p=t(top_p, torch.float32), min_p=t(min_p, torch.float32),
        seeds=t(seeds, torch.int64), positions=t(pos_s, torch.int64),
        all_greedy=all(sp.temperature == 0 for sp in sps), any_top_k=any(sp.top_k > 0 for sp in sps),
        any_top_p=any(sp.top_p < 1.0 for sp in sps), any_min_p=any(sp.min_p > 0 for sp in sps),
        ban_rows=t(ban_rows, torch.int64) if ban_rows else None, ban_tokens=t(ban_tokens, torch.int64) if ban_tokens else None,
    )
    tok_t, acc_t = verify_drafts(logits, batch, t(dr, torch.int64))
    toks, accs = tok_t.tolist(), acc_t.tolist()
    dst: list[int] = []
    vals: list[int] = []
    i = 0
    for st, m in groups:
        emitted = accept_walk(toks[i : i + m + 1], accs[i : i + m + 1], m)
        i += m + 1
        out.sampled_token_ids.append(emitted)
        out.num_draft_tokens += m
        out.num_accepted_tokens += len(emitted) - 1
        dst.extend(st.row * row_len + st.num_tokens + j for j in range(len(emitted)))
        vals.extend(emitted)
        st.num_tokens += len(emitted)
    r.tokens.view(-1).index_copy_(0, t(dst, torch.int64), t(vals, torch.int64))
    return ReadyOutput(out)
