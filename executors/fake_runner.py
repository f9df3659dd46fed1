"""A fast deterministic stand-in for a model, for testing the scheduler and engine.

Its "model": the next token is a hash of the request's *entire* token history (and
its seed when sampling), so any lost, duplicated or reordered token changes every
later token. It also simulates the paged KV cache: computing a position writes
(token, position) into that slot, and every step checks that all earlier positions
of the request read back exactly through its block table. A scheduler bug in block
tables, prefix caching or preemption therefore fails loudly instead of silently.

Structured output: with a tokenizer.json in the model dir (and llguidance), requests
with `structured` are masked exactly as the torch runner masks them (the same
`aiosched.executors.structured_output` manager, batched CPU bitmask fill); a masked-out hash
token is replaced by an allowed one picked by the same hash. The grammar learns a
step's sampled tokens the way the torch runner's does, through the manager's
samples-in-flight queue (`note_sampled`, drained by the next constrained step), not
from this runner's own history: a lifecycle bug there (a sample that outlives its
request's free and is consumed again after resumption) changes the tokens here too,
and the state machine test's oracle (`reference_tokens` with the grammar, the request
alone) catches it.

Penalties (repetition / presence / frequency, `penalize`): a request with any of them
gets a small score vector instead of the bare hash token. The candidates are the hash
token (raw score 1.0, the best: penalties that do not bite leave the output as it is
without them), the request's last token, two hash-picked tokens of its history and
two more hash tokens, each with a hash score in [-0.5, 0.999]. The penalties are
applied to those scores exactly as defined in `SamplingParams` (repetition over
prompt + outputs, then frequency, then presence over the outputs), from the worker's
own, complete history, and the best candidate wins. The last token is always a
candidate and counts, so a history that lags one step (the token of the previous
step missing, as in an async scheduler that builds step N+1 before step N's token
arrives) changes the tokens and fails the `reference_tokens` oracle. Penalties that
favour repetition (repetition < 1, negative presence / frequency) bite over any
vocabulary; those against it only when the hash token itself repeats, which needs a
small vocabulary. With neutral penalties (1 / 0 / 0) none of this runs: the tokens
are the plain hash tokens, exactly as without penalties.
"""
from __future__ import annotations

import array
import json
import math
import os

import numpy as np

from aiosched.config import EngineConfig
from aiosched.token_ids import TokenIds
from aiosched.protocol import PROTOCOL_VERSION, Logprobs, NewRequestData, RunnerOutput, SchedulerOutput, WorkerInfo
from aiosched.executors.runner import ModelRunner, PendingOutput, ReadyOutput
from aiosched.executors.structured_output import StructuredOutputManager, allowed_token_ids, bitmask_words

_MOD = (1 << 61) - 1
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """A 64-bit finalizer (splitmix-style): spreads a hash over all bits."""
    x = ((x ^ (x >> 31)) * 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 29)) * 0xBF58476D1CE4E5B9) & _M64
    return x ^ (x >> 32)


def has_penalties(sp) -> bool:
    return sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0


def penalty_candidates(h: int, history: list[int], vocab_size: int) -> list[tuple[int, float]]:
    """The fake model's score vector for a penalized request: (token, raw score) pairs,
    distinct tokens, the hash token `h % vocab_size` first with the best score 1.0."""
    tok0 = h % vocab_size
    x = _mix(h)
    picks = [tok0, history[-1]]  # the last token: the one a one-step-lagging history lacks
    for _ in range(2):  # two tokens of the history, picked by the hash
        x = _mix(x + 1)
        picks.append(history[x % len(history)])
    for _ in range(2):  # two fresh hash tokens
        x = _mix(x + 1)
        picks.append(x % vocab_size)
    out = [(tok0, 1.0)]
    seen = {tok0}
    for t in picks[1:]:
        x = _mix(x + 1)
        if t not in seen:
            seen.add(t)
            out.append((t, ((x >> 11) % 1500 - 500) / 1000.0))
    return out


def penalize(cands: list[tuple[int, float]], history: list[int], prompt_len: int, sp) -> int:
    """The best candidate once the penalties are applied to the scores, per their
    definitions: repetition_penalty r over prompt + outputs (a positive score divided by
    r, a negative one multiplied), then frequency_penalty f (minus f x the count in the
    outputs) and presence_penalty p (minus p once if in the outputs). `history` is
    everything before the token being chosen: prompt first, then every output so far.
    Ties go to the earlier candidate."""
    seen = set(history)
    counts: dict[int, int] = {}
    for t in history[prompt_len:]:
        counts[t] = counts.get(t, 0) + 1
    r, f, p = sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty
    best_tok, best = -1, -math.inf
    for tok, v in cands:
        if tok in seen:
            v = v / r if v > 0 else v * r
        c = counts.get(tok, 0)
        if c:
            v -= f * c
            v -= p
        if v > best:
            best_tok, best = tok, v
    return best_tok


class FakeKVError(AssertionError):
    """The simulated KV cache read back something the request never wrote."""


class _State:
    def __init__(self, new: NewRequestData) -> None:
        # Both grow by one per step for the request's life: int64 buffers, not lists of
        # ints that every full collection in this process would walk.
        self.tokens = TokenIds(new.token_ids)
        self.prompt_len = new.prompt_len
        self.seed = new.seed
        self.sampling = new.sampling
        self.masked = set(new.eos_token_ids) | set(new.sampling.stop_token_ids)
        self.penalized = has_penalties(new.sampling)
        self.blocks: list[int] = []
        self.num_computed = 0
        self.prefix_hash = array.array("q", [0])  # prefix_hash[i] = hash of tokens[:i] (< 2**61)

    def hash_upto(self, n: int) -> int:
        ph = self.prefix_hash
        if len(ph) <= n:
            toks, h = self.tokens, ph[-1]
            for i in range(len(ph) - 1, n):
                h = (h * 1_000_003 + toks[i] + 1) % _MOD
                ph.append(h)
        return ph[n]


class FakeModelRunner(ModelRunner):
    # config.json "fake_context_tokens": w > 0 makes the next token a hash of the last w
    # tokens only (a w-gram model: greedy output falls into cycles that n-gram
    # speculation can copy). 0: the whole history.
    context = 0

    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(config, rank, world_size)
        self.vocab_size = 512
        self.max_model_len = config.max_model_len or 4096
        if config.model and os.path.isfile(os.path.join(config.model, "config.json")):
            with open(os.path.join(config.model, "config.json")) as f:
                cfg = json.load(f)
            self.vocab_size = cfg.get("vocab_size", self.vocab_size)
            self.max_model_len = min(self.max_model_len, cfg.get("max_position_embeddings", self.max_model_len))
            self.context = int(cfg.get("fake_context_tokens", 0))
        self.num_blocks = config.num_kv_blocks or 1024
        self.bs = config.block_size
        self.slots: list[tuple[int, int] | None] = [None] * (self.num_blocks * self.bs)
        self.reqs: dict[str, _State] = {}
        self.steps = 0
        self.tokens_computed = 0
        self.structured: StructuredOutputManager | None = None

    def load(self) -> WorkerInfo:
        self.structured = StructuredOutputManager.for_model_dir(self.config.model, self.vocab_size)
        features = ["logprobs", "prompt_logprobs", "penalties"] + (["structured_output"] if self.structured is not None else [])
        return WorkerInfo(PROTOCOL_VERSION, self.num_blocks, self.bs, self.vocab_size, self.max_model_len, "cpu", "none", "fake",
                          features=features)

    def _slot(self, st: _State, pos: int) -> int:
        return st.blocks[pos // self.bs] * self.bs + pos % self.bs

    def _next_token(self, st: _State, n: int, allowed: "np.ndarray | None" = None, grammar_done: bool = False) -> int:
        if self.context:
            h = 0
            for t in st.tokens[max(0, n - self.context) : n]:
                h = (h * 1_000_003 + t + 1) % _MOD
                h = ((h ^ (h >> 29)) * 0x9E3779B97F4A7C15) % _MOD
        else:
            h = st.hash_upto(n)
        if not st.sampling.greedy:
            h = (h * 31 + st.seed * 7 + n) % _MOD
        if st.penalized:
            cands = penalty_candidates(h, st.tokens[:n], self.vocab_size)
            tok = penalize(cands, self._penalty_history(st, n), st.prompt_len, st.sampling)
        else:
            tok = h % self.vocab_size
        if allowed is not None:  # grammar mask: min_tokens yields to a completed grammar
            ok = allowed if grammar_done or n - st.prompt_len >= st.sampling.min_tokens else allowed[~np.isin(allowed, list(st.masked))]
            if len(ok) == 0:
                ok = allowed
            if tok not in ok:
                tok = int(ok[(h // self.vocab_size) % len(ok)])
            return tok
        if n - st.prompt_len < st.sampling.min_tokens:
            while tok in st.masked:
                tok = (tok + 1) % self.vocab_size
        return tok

    def _penalty_history(self, st: _State, n: int) -> list[int]:
        """The history the penalties count: every token before position n (the tests
        override this to show that a lagging one is caught)."""
        return st.tokens[:n]

    def execute(self, so: SchedulerOutput) -> PendingOutput:
        for rid in so.freed_req_ids:
            self.reqs.pop(rid, None)
            if self.structured is not None:
                self.structured.free(rid)
        for new in so.new_requests:
            if new.req_id in self.reqs:
                raise FakeKVError(f"{new.req_id}: sent as new but the worker already has it")
            self.reqs[new.req_id] = _State(new)
            if new.sampling.structured is not None:
                if self.structured is None:
                    raise ValueError("structured: this worker has no tokenizer.json or no llguidance")
                self.structured.add_request(new)
        grammar_rows = self.structured.constrained_rows(so) if self.structured is not None else []
        masks = self._grammar_masks(grammar_rows)
        out = RunnerOutput(step_id=so.step_id, req_ids=[], sampled_token_ids=[])
        for sr in so.scheduled:
            st = self.reqs[sr.req_id]
            st.blocks.extend(sr.new_block_ids)
            if sr.num_draft_slots:
                if sr.req_id in masks:
                    raise FakeKVError(f"{sr.req_id}: draft slots for a constrained request (the scheduler never speculates them)")
                self._spec_step(sr, st, out)
                continue
            start, end = sr.num_computed_tokens, sr.num_computed_tokens + sr.num_tokens
            if end > len(st.tokens):
                raise FakeKVError(f"{sr.req_id}: scheduled up to position {end} but only {len(st.tokens)} tokens exist")
            if len(st.blocks) * self.bs < end:
                raise FakeKVError(f"{sr.req_id}: {len(st.blocks)} blocks cannot hold {end} tokens")
            toks = st.tokens.tolist()  # this step's reads, as plain ints (one C copy, not a lookup per position)
            for p in range(start, end):
                self.slots[self._slot(st, p)] = (toks[p], p)
            self._check_prefix(sr.req_id, st, toks, start)
            st.num_computed = end
            self.tokens_computed += sr.num_tokens
            if st.sampling.prompt_logprobs is not None and start + 1 < st.prompt_len:
                k = st.sampling.prompt_logprobs
                plp = [self._fake_logprob(st, p, st.tokens[p]) for p in range(start + 1, min(end + 1, st.prompt_len))]
                if plp:
                    lp = Logprobs([v for v, _, _ in plp], [ids for _, ids, _ in plp], [vals for _, _, vals in plp])
                    out.prompt_logprobs = out.prompt_logprobs or {}
                    out.prompt_logprobs[sr.req_id] = lp
            if sr.sample:
                if end != len(st.tokens):
                    raise FakeKVError(f"{sr.req_id}: sampling at {end} but history has {len(st.tokens)} tokens")
                mask = masks.get(sr.req_id)
                tok = self._next_token(st, end) if mask is None else self._next_token(st, end, *mask)
                st.tokens.append(tok)
                out.req_ids.append(sr.req_id)
                out.sampled_token_ids.append([tok])
                if st.sampling.logprobs is not None:
                    v, ids, vals = self._fake_logprob(st, end, tok)
                    out.logprobs = out.logprobs or []
                    out.logprobs.extend([None] * (len(out.req_ids) - 1 - len(out.logprobs)))
                    out.logprobs.append(Logprobs([v], [ids], [vals]))
        if out.logprobs is not None:
            out.logprobs.extend([None] * (len(out.req_ids) - len(out.logprobs)))
        if grammar_rows:
            assert self.structured is not None
            self.structured.note_sampled([t[0] for t in out.sampled_token_ids], None, [(r, rid) for r, rid, _ in grammar_rows])
        self.steps += 1
        return ReadyOutput(out)

    def _spec_step(self, sr, st: _State, out: RunnerOutput) -> None:
        """Speculative decode: the position is the worker's own (the scheduler's is an upper
        bound in async mode); drafts from the history; verify against the point-mass model."""
        from aiosched.executors.torch.spec_decode import propose_ngram

        spec = self.config.speculative
        start = len(st.tokens) - 1
        if start > sr.num_computed_tokens:
            raise FakeKVError(f"{sr.req_id}: worker at position {start}, past the scheduler's bound {sr.num_computed_tokens}")
        room = min(sr.num_draft_slots, len(st.blocks) * self.bs - start - 1)
        if room < sr.num_draft_slots and len(st.blocks) * self.bs < sr.num_computed_tokens + sr.num_tokens:
            raise FakeKVError(f"{sr.req_id}: {len(st.blocks)} blocks cannot hold the {sr.num_tokens} reserved tokens")
        drafts = propose_ngram(st.tokens, room, spec.ngram_min, spec.ngram_max) if spec is not None else []
        seq = st.tokens[start:] + drafts
        for i, t in enumerate(seq):  # KV of the last token and the drafts (rejected ones are overwritten later)
            self.slots[self._slot(st, start + i)] = (t, start + i)
        self._check_prefix(sr.req_id, st, st.tokens.tolist(), start)
        self.tokens_computed += len(seq)
        emitted: list[int] = []
        for j in range(len(drafts) + 1):
            tok = self._next_token(st, len(st.tokens))
            st.tokens.append(tok)
            emitted.append(tok)
            if j == len(drafts) or drafts[j] != tok:
                break
        st.num_computed = len(st.tokens) - 1
        out.req_ids.append(sr.req_id)
        out.sampled_token_ids.append(emitted)
        out.num_draft_tokens += len(drafts)
        out.num_accepted_tokens += len(emitted) - 1

    def _check_prefix(self, req_id: str, st: _State, toks: list[int], start: int) -> None:
        """ "Attention" reads the whole prefix: every position before `start` must read back."""
        slots = self.slots
        for p in range(0, start):
            if slots[self._slot(st, p)] != (toks[p], p):
                raise FakeKVError(f"{req_id}: KV at position {p} is {slots[self._slot(st, p)]}, expected {(toks[p], p)}")

    def _fake_logprob(self, st: _State, n: int, tok: int) -> tuple[float, list[int], list[float]]:
        """A deterministic stand-in for log p(token at n | history): (logprob, top ids, top logprobs)."""
        h = (st.hash_upto(n) * 0x9E3779B1 + tok * 7919) % _MOD
        v = -((h >> 7) % 4000) / 1000.0 - 0.001
        k = st.sampling.logprobs if n >= st.prompt_len else st.sampling.prompt_logprobs
        ids = [(tok + j) % self.vocab_size for j in range(k or 0)]
        return v, ids, [v - 0.5 * j for j in range(len(ids))]

    def _grammar_masks(self, rows: list[tuple[int, str, int]]) -> "dict[str, tuple[np.ndarray, bool]]":
        """Allowed tokens per constrained sampled request, filled as one batch (like the torch runner)."""
        if not rows:
            return {}
        mgr = self.structured
        assert mgr is not None
        mgr.advance(rows)  # the previous steps' samples, from the queue the runner fed
        bitmask = np.zeros((len(rows), bitmask_words(mgr.vocab_size)), dtype=np.int32)
        mgr.fill_bitmask(bitmask, [(i, rid) for i, (_, rid, _) in enumerate(rows)])
        return {rid: (allowed_token_ids(bitmask[i], self.vocab_size), mgr.grammars[rid].is_terminated) for i, (_, rid, _) in enumerate(rows)}


def reference_tokens(prompt: list[int], max_tokens: int, vocab_size: int = 512, seed: int = 0, greedy: bool = True,
                     min_tokens: int = 0, masked: set[int] | None = None, *, repetition_penalty: float = 1.0,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> list[int]:
    """What the fake model generates for one request alone, ignoring stop conditions."""
    from aiosched.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 1.0, min_tokens=min_tokens,
                        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty)
    st = _State(NewRequestData("ref", list(prompt), len(prompt), sp, seed, sorted(masked or ())))
    runner = FakeModelRunner.__new__(FakeModelRunner)
    runner.vocab_size = vocab_size
    out = []
    for _ in range(max_tokens):
        tok = runner._next_token(st, len(st.tokens))
        st.tokens.append(tok)
        out.append(tok)
    return out
