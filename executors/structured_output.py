"""Worker-side structured output: grammar matchers, CPU bitmask fill, device bitmask apply.

The grammar state lives in the worker, next to the token history, so it works the
same under sync and one-step-ahead (async) scheduling; docs/architecture.md,
"Structured output under async scheduling", has the timeline and its cost. A runner
uses this module in four places:

1. `add_request(new)` / `free(req_id)` with the step's diff (a resumed request is
   fast-forwarded over the outputs it already has). `free` drops *everything* the
   manager holds for the request, its samples still on their way to the host
   included: a request preempted and resumed comes back under the same id with its
   whole history, and a stale sample of its first life would be consumed twice;
2. `rows = manager.constrained_rows(so)`: the sampled rows whose request has a
   grammar. Empty -> the runner takes its unchanged path: no wait, no mask;
3. after launching the forward pass: `manager.advance(rows)`, which appends the
   samples of earlier steps to their requests' host histories (in async mode it
   waits for the previous step's host copy, recorded by `note_sampled`) and advances
   each matcher over the tokens it has not seen; then `manager.fill_bitmask(bitmask,
   rows)` on the CPU (parallel over requests, GIL released);
4. `apply_token_bitmask(logits, bitmask_on_device, row_index)` right before sampling:
   disallowed tokens get -inf; then `manager.note_sampled(host_ids, event, rows)`:
   where the step's sampled ids will be on the host.

Compiled grammars are cached per (tokenizer, grammar text): a new request with a
known spec deep-copies a prototype matcher (~10-40 us) instead of compiling.

Grammar engine: llguidance (docs/structured_output.md). The packed bitmask is
int32 [rows, ceil(vocab / 32)], bit `t % 32` of word `t // 32` set when token `t`
is allowed, the layout llguidance and xgrammar both use.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from aiosched.protocol import NewRequestData, SchedulerOutput
from aiosched.sampling_params import StructuredOutputParams
from aiosched.structured import grammar_for

if TYPE_CHECKING:
    import torch

log = logging.getLogger("aiosched.structured")

# A step's masks are filled by llguidance's thread pool from this many rows on, below it in
# one thread. H200 host, 128k-token vocab, fresh states (benchmarks/grammar_parallel.py,
# 2026-12-04): 16 masks 627 us alone vs 588 with 8 threads (and 1.27 vs 1.50 ms per step
# inside the engine at 25% of 64 requests); 64 masks 2775 vs 1221 us.
PARALLEL_FILL_ROWS = 32

COMPILE_CACHE_SIZE = 256

# llguidance's "slices": token classes whose membership in a mask is decided once per class
# (when the lexer state accepts the class's whole language) instead of by walking the token
# trie. Its defaults split string-safe tokens at lengths 10 and 30 only, so inside a string
# with a `maxLength` (fewer than 10 characters left) no class applies and the fill walks the
# trie: 0.4-1.3 ms per mask against ~20 us elsewhere, and the slowest row bounds a parallel
# fill. Classes by length 1..6, 8, 10, 12, 16, 20, 30 keep most of those tokens in classes
# (benchmarks/grammar_parallel.py, 128k vocab, bounded schema, 64 rows, this machine:
# 3,641 -> 1,952 us per step, the slowest mask 582 -> 353 us; unbounded unchanged).
# Slices change the cost of a mask, never its bits (tests/test_structured_output.py).
_STRING_CHAR = r'[^"\\\x00-\x1F\x7F]'
STRING_SLICES = ([r"[\x20\x0A\x0D\x09]+"] + [_STRING_CHAR + "{1,%d}" % n for n in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 30)]
                 + [_STRING_CHAR + "+"])


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


# ---- tokenizer + compile cache ----


class GrammarTokenizer:
    """The tokenizer as the grammar engine sees it (token -> bytes trie). Build once per worker."""

    def __init__(self, tokenizer_json: str, vocab_size: int | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        import llguidance

        self._llg = llguidance
        eos = list(eos_token_ids) or None
        # AIOSCHED_LLG_SLICES=default: llguidance's own slices (the before/after measurement only)
        self.slices = llguidance.LLTokenizer.general_slices() if os.environ.get("AIOSCHED_LLG_SLICES") == "default" else STRING_SLICES
        n_vocab = None
        if vocab_size is not None:
            # The model's vocab may be padded past the tokenizer's (padded ids are never
            # allowed): a first build without slices reads the tokenizer's own size.
            own = llguidance.LLTokenizer(tokenizer_json, eos_token=eos, slices=[]).vocab_size
            n_vocab = vocab_size if vocab_size > own else None
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=eos, slices=self.slices)  # the slicer, once
        self.vocab_size = self.tok.vocab_size
        self.eos_token_ids = list(self.tok.eos_tokens)
        h = hashlib.sha256(tokenizer_json.encode())
        h.update(f"|{self.vocab_size}|{self.eos_token_ids}".encode())
        self.key = h.hexdigest()[:16]

    @classmethod
    def from_model_dir(cls, model_dir: str, vocab_size: int | None = None, eos_token_ids: Sequence[int] | None = None) -> "GrammarTokenizer":
        with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
            text = f.read()
        if eos_token_ids is None:
            from aiosched.tokenizer import Tokenizer

            eos_token_ids = Tokenizer(model_dir).eos_token_ids
        return cls(text, vocab_size, eos_token_ids)


_cache_lock = threading.Lock()
_compile_cache: OrderedDict[tuple[str, str], Any] = OrderedDict()


def compile_grammar(tok: GrammarTokenizer, spec: StructuredOutputParams) -> Any:
    """A fresh matcher at the grammar's start state. Compiles once per (tokenizer, spec)."""
    grammar = grammar_for(spec)  # validated; ValueError names the field
    key = (tok.key, grammar)
    with _cache_lock:
        proto = _compile_cache.get(key)
        if proto is not None:
            _compile_cache.move_to_end(key)
    if proto is None:
        proto = tok._llg.LLMatcher(tok.tok, grammar, log_level=0)
        if proto.is_error():
            raise ValueError(f"structured: the grammar does not compile for this tokenizer: {proto.get_error()[:500]}")
        with _cache_lock:
            _compile_cache[key] = proto
            while len(_compile_cache) > COMPILE_CACHE_SIZE:
                _compile_cache.popitem(last=False)
    return proto.deep_copy()


def clear_compile_cache() -> None:
    with _cache_lock:
        _compile_cache.clear()


# ---- one request ----


class RequestGrammar:
    """A request's matcher, its outputs known on the host, and how many of them the matcher consumed."""

    __slots__ = ("req_id", "matcher", "prompt_len", "outputs", "num_consumed", "_warned")

    def __init__(self, req_id: str, matcher: Any, prompt_len: int) -> None:
        self.req_id = req_id
        self.matcher = matcher
        self.prompt_len = prompt_len
        self.outputs: list[int] = []  # every sampled token known on the host, in order
        self.num_consumed = 0
        self._warned = False

    def accept_token(self, token: int) -> bool:
        """Advance over one sampled token. A rejected token (a bug elsewhere, or a token
        forced past the grammar) puts the matcher in its error state, whose mask allows
        only EOS: the request then ends instead of producing garbage."""
        self.num_consumed += 1
        ok = bool(self.matcher.consume_token(int(token)))
        if not ok:
            self.note_rejected(token)
        return ok

    def note_rejected(self, token: int) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s: token %d rejected by the grammar: %s", self.req_id, token, self.matcher.get_error()[:300])

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete (or failed): only EOS is allowed from here on."""
        return bool(self.matcher.is_stopped())

    @property
    def is_error(self) -> bool:
        return bool(self.matcher.is_error())


class _Pending:
    """One step's sampled ids on their way to the host: `host[i]` is the token of `rows`' request."""

    __slots__ = ("host", "event", "rows")

    def __init__(self, host: Any, event: Any, rows: list[tuple[int, RequestGrammar]]) -> None:
        self.host, self.event, self.rows = host, event, rows


class MaskExecutor(Protocol):
    """Where prefetch jobs run: `concurrent.futures.ThreadPoolExecutor` (the default, one
    thread) or anything with its `submit` (tests inject one that runs jobs when told)."""

    def submit(self, fn: Callable[[], None]) -> "Future[None]": ...


class _MaskJob:
    """The next step's masks, being filled off the launch thread: slot i of `bitmask`
    is the mask of `targets[i]` = (request, position of the token it masks)."""

    __slots__ = ("targets", "bitmask", "future")

    def __init__(self, targets: list[tuple[RequestGrammar, int]], bitmask: np.ndarray) -> None:
        self.targets, self.bitmask = targets, bitmask
        self.future: Future[None] | None = None


# ---- the worker's manager ----


class StructuredOutputManager:
    """All grammar state of one worker. Called from the runner's launch thread only; a
    prefetch job (`note_sampled(..., prefetch=...)`) runs on `mask_executor` and owns the
    matchers it advances until `_join()`: every method that reads or advances a matcher
    joins it first, the others (add, free, constrained_rows) touch only the dicts."""

    def __init__(self, tokenizer: "GrammarTokenizer | Callable[[], GrammarTokenizer]", num_threads: int | None = None,
                 mask_executor: MaskExecutor | None = None) -> None:
        self._tok: GrammarTokenizer | None = None
        self._tok_error: BaseException | None = None
        self._tok_ready = threading.Event()
        if isinstance(tokenizer, GrammarTokenizer):
            self._set_tok(tokenizer)
        else:
            # Building the token trie takes ~0.5-2 s for a 64k-128k vocab: do it in the
            # background from load() so the first constrained request rarely waits.
            threading.Thread(target=self._build_tok, args=(tokenizer,), name="aiosched-grammar-tok", daemon=True).start()
        # Mask fills run on llguidance's own Rust pool; AIOSCHED_GRAMMAR_THREADS overrides the default.
        env = os.environ.get("AIOSCHED_GRAMMAR_THREADS")
        self._num_threads = num_threads or (int(env) if env else max(1, min(8, (os.cpu_count() or 2) - 1)))
        # (tests lower it to run the pool on a few rows; AIOSCHED_GRAMMAR_PARALLEL_ROWS: benchmarks/structured_bench.py)
        self.parallel_fill_rows = int(os.environ.get("AIOSCHED_GRAMMAR_PARALLEL_ROWS") or PARALLEL_FILL_ROWS)
        self._executor: Any = None
        self.grammars: dict[str, RequestGrammar] = {}
        # Steps whose sampled ids are not on the host yet (async scheduling), oldest first.
        # Rows point at the RequestGrammar object, not its id: an id is reused when a
        # preempted request comes back, its object never is.
        self._pending: deque[_Pending] = deque()
        self._mask_executor: MaskExecutor | None = mask_executor
        self._job: _MaskJob | None = None
        # rows whose mask came from a prefetch job / was filled on the launch thread; seconds
        # the launch thread spent in masks_for (waiting for the job + its own fills), and
        # seconds of job work on the mask thread (waiting for the device copy included)
        # seconds of job work on the mask thread: job_s in all, of which waiting for the
        # previous step's ids (the device copy) job_wait_s, advancing the matchers
        # job_consume_s and filling the masks job_fill_s
        self.stats = {"prefetched_rows": 0, "launch_thread_rows": 0, "mask_steps": 0, "launch_thread_s": 0.0, "job_s": 0.0,
                      "job_wait_s": 0.0, "job_consume_s": 0.0, "job_fill_s": 0.0, "job_rows": 0}

    @classmethod
    def for_model_dir(cls, model_dir: str | None, vocab_size: int | None = None) -> "StructuredOutputManager | None":
        """A manager whose tokenizer builds in the background, or None when structured
        output is unavailable (no tokenizer.json, or llguidance not installed)."""
        if not model_dir or not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            return None
        try:
            import llguidance  # noqa: F401
        except ImportError:
            return None
        return cls(lambda: GrammarTokenizer.from_model_dir(model_dir, vocab_size))

    def _set_tok(self, tok: GrammarTokenizer) -> None:
        self._tok = tok
        self._tok_ready.set()

    def _build_tok(self, factory: Callable[[], GrammarTokenizer]) -> None:
        try:
            self._set_tok(factory())
        except BaseException as e:  # surfaced on first use
            self._tok_error = e
            self._tok_ready.set()

    @property
    def tokenizer(self) -> GrammarTokenizer:
        self._tok_ready.wait()
        if self._tok is None:
            raise RuntimeError(f"structured output: building the grammar tokenizer failed: {self._tok_error!r}")
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # -- request lifecycle --

    def add_request(self, new: NewRequestData) -> RequestGrammar | None:
        spec = new.sampling.structured
        if spec is None:
            return None
        if new.req_id in self.grammars:
            raise RuntimeError(f"{new.req_id}: added twice without a free in between")
        rg = RequestGrammar(new.req_id, compile_grammar(self.tokenizer, spec), new.prompt_len)
        rg.outputs = list(new.token_ids[new.prompt_len :])
        for t in rg.outputs:  # resumed after preemption: fast-forward
            rg.accept_token(t)
        self.grammars[new.req_id] = rg
        return rg

    def free(self, req_id: str) -> None:
        """Forget the request entirely: its matcher, history and samples still in flight
        (they belong to this incarnation; a resumed one is sent with all of them)."""
        rg = self.grammars.pop(req_id, None)
        if rg is None or not self._pending:
            return
        kept: deque[_Pending] = deque()
        for p in self._pending:
            p.rows = [(i, g) for i, g in p.rows if g is not rg]
            if p.rows:
                kept.append(p)
        self._pending = kept

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.grammars

    def __len__(self) -> int:
        return len(self.grammars)

    def get(self, req_id: str) -> RequestGrammar | None:
        """The request's grammar, its matcher ours to read (waits for a prefetch job)."""
        self._join()
        return self.grammars.get(req_id)

    def held_request_ids(self) -> set[str]:
        """Every request the manager holds any state for (empty once all are freed)."""
        self._join()
        return set(self.grammars) | {g.req_id for p in self._pending for _, g in p.rows}

    # -- per step --

    def constrained_rows(self, so: SchedulerOutput) -> list[tuple[int, str, int]]:
        """(sample row, req_id, position of the token to sample) for each sampled request
        with a grammar. Sample rows count only `sample=True` requests, in batch order."""
        if not self.grammars:
            return []
        rows: list[tuple[int, str, int]] = []
        row = 0
        for sr in so.scheduled:
            if not sr.sample:
                continue
            if sr.req_id in self.grammars:
                rows.append((row, sr.req_id, sr.num_computed_tokens + sr.num_tokens))
            row += 1
        return rows

    def note_sampled(self, host: Any, event: Any, rows: Sequence[tuple[int, str]],
                     prefetch: np.ndarray | None = None) -> None:
        """A step sampled for constrained requests: `host[i]` (a list, or a host tensor that
        is complete once `event` has) will be the token of request `rid`, for (i, rid) in `rows`.

        `prefetch` (an int32 bitmask, as for `fill_bitmask`): start filling, off this
        thread, each of these requests' mask for the position after the one just sampled,
        into `prefetch[0..len(rows))`. The job waits for `event` itself, so the caller
        returns at once and launches the next step while the device runs this one; the
        next step takes the masks with `masks_for`. The caller must not reuse `prefetch`
        before then, and must have queued every read of its previous contents before
        `event` (the runner's mask upload precedes its sampling, which precedes the copy)."""
        if not rows:
            return
        p = _Pending(host, event, [(i, self.grammars[rid]) for i, rid in rows])
        self._pending.append(p)
        if prefetch is None:
            return
        self._check_bitmask(prefetch, [(j, "") for j in range(len(rows))])
        self._join()  # one job at a time: the previous one's matchers are ours again
        job = _MaskJob([(rg, rg.prompt_len + len(rg.outputs) + self._in_flight(rg)) for _, rg in p.rows], prefetch)
        pending, self._pending = self._pending, deque()  # the job appends these samples, in order
        if self._mask_executor is None:
            self._mask_executor = ThreadPoolExecutor(1, thread_name_prefix="aiosched-grammar")
        self._job = job
        job.future = self._mask_executor.submit(lambda: self._run_job(job, pending))

    def _in_flight(self, rg: RequestGrammar) -> int:
        """Samples of `rg` still on their way to the host (the one just noted included)."""
        return sum(1 for p in self._pending for _, g in p.rows if g is rg)

    def _run_job(self, job: _MaskJob, pending: deque[_Pending]) -> None:
        """On the mask thread: wait for the samples, advance the matchers, fill the masks
        (llguidance computes in Rust with the interpreter lock released)."""
        t0 = time.perf_counter()
        self._drain(pending)
        t1 = time.perf_counter()
        self._consume([(rg, pos) for rg, pos in job.targets])
        t2 = time.perf_counter()
        self._fill([(rg.matcher, j) for j, (rg, _) in enumerate(job.targets)], job.bitmask)
        t3 = time.perf_counter()
        st = self.stats
        st["job_s"] += t3 - t0
        st["job_wait_s"] += t1 - t0
        st["job_consume_s"] += t2 - t1
        st["job_fill_s"] += t3 - t2
        st["job_rows"] += len(job.targets)

    def _join(self) -> _MaskJob | None:
        """Wait for the prefetch job, if any (its errors surface here); returns it."""
        job, self._job = self._job, None
        if job is not None and job.future is not None:
            job.future.result()
        return job

    def masks_for(self, rows: Sequence[tuple[int, str, int]], bitmask: np.ndarray) -> list[int]:
        """The step's masks in `bitmask`: for each (sample row, req_id, position), the slot
        of `bitmask` that holds its mask. A prefetched mask is used where the job had that
        request at that position; the others (new requests, the first sample after a
        prefill) are filled here, into slots this step's prefetched rows do not use."""
        t0 = time.perf_counter()
        job = self._join()
        slot_of: dict[tuple[int, int], int] = {}
        if job is not None and job.bitmask is bitmask:
            slot_of = {(id(rg), pos): j for j, (rg, pos) in enumerate(job.targets)}
        slots: list[int | None] = [slot_of.get((id(self.grammars[rid]), pos)) for _, rid, pos in rows]
        # Rows the job did not have: the lowest slots no row of this step uses (a job's
        # slot whose request is not in this step is free again).
        used = {j for j in slots if j is not None}
        free = (j for j in range(bitmask.shape[0]) if j not in used)
        todo: list[tuple[int, str]] = []
        for k, (_, rid, pos) in enumerate(rows):
            if slots[k] is None:
                j = next(free, None)
                if j is None:
                    raise IndexError(f"bitmask has {bitmask.shape[0]} rows for {len(rows)} constrained rows")
                slots[k] = j
                todo.append((j, rid))
                self.sync(rid, pos)
        self.stats["prefetched_rows"] += len(rows) - len(todo)
        self.stats["launch_thread_rows"] += len(todo)
        self.fill_bitmask(bitmask, todo)
        self.stats["mask_steps"] += 1
        self.stats["launch_thread_s"] += time.perf_counter() - t0
        return [j for j in slots if j is not None]

    def _drain(self, pending: deque[_Pending] | None = None) -> None:
        """Append the samples of earlier steps to their requests' histories (waits for their copies)."""
        queue = self._pending if pending is None else pending
        while queue:
            p = queue.popleft()
            if p.event is not None:
                p.event.synchronize()
            vals = p.host.tolist() if hasattr(p.host, "tolist") else p.host
            for i, rg in p.rows:
                rg.outputs.append(int(vals[i]))

    def advance(self, rows: Sequence[tuple[int, str, int]]) -> None:
        """Bring the matcher of each (sample row, req_id, position) to `position`: every
        token before it consumed, so its mask is the one for the token at `position`."""
        self._join()
        self._drain()
        for _, rid, pos in rows:
            self.sync(rid, pos)

    def sync(self, req_id: str, position: int) -> RequestGrammar:
        """Advance the matcher over the known tokens [.., position) it has not consumed."""
        self._join()
        self._drain()
        rg = self.grammars[req_id]
        self._consume([(rg, position)])
        return rg

    def _consume(self, targets: Sequence[tuple[RequestGrammar, int]]) -> None:
        """Advance each matcher to its position, token by token, in this thread. (Not
        llguidance's batched `consume_token_par`: on the H200 host it took 13.2 us per token
        at 16 matchers and 5.8 at 64, against 2.5-3.5 for this loop; in the structured bench
        at 25% of 64 requests the mask job's consume went 0.42 -> 0.04 ms per step;
        benchmarks/grammar_parallel.py, 2026-12-04.)"""
        for rg, position in targets:
            start = rg.prompt_len + rg.num_consumed
            known = rg.prompt_len + len(rg.outputs)
            if not start <= position <= known:
                # The scheduler never rewinds a live request, and the previous step's sample
                # was drained above: anything else is a lifecycle bug, not a grammar matter.
                raise RuntimeError(f"{rg.req_id}: asked to mask position {position}; the matcher is at {start}, "
                                   f"the host knows {known} tokens")
            for t in rg.outputs[rg.num_consumed : position - rg.prompt_len]:
                rg.accept_token(t)

    def _pool(self) -> Any:
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor(num_threads=self._num_threads)
        return self._executor

    def _check_bitmask(self, bitmask: np.ndarray, rows: Sequence[tuple[int, str]]) -> None:
        if bitmask.dtype != np.int32 or bitmask.ndim != 2 or not bitmask.flags.c_contiguous:
            raise ValueError("bitmask must be a C-contiguous int32 [batch, words] array")
        batch, words = bitmask.shape
        if words * 32 < self.vocab_size:
            raise ValueError(f"bitmask has {words} words per row; the vocab needs {bitmask_words(self.vocab_size)}")
        for row, _ in rows:
            if not 0 <= row < batch:
                raise IndexError(f"bitmask row {row} out of range for {batch} rows")

    def fill_bitmask(self, bitmask: np.ndarray, rows: Sequence[tuple[int, str]]) -> None:
        """Write each request's next-token mask into `bitmask[row]` (int32, C-contiguous,
        [batch, ceil(vocab / 32)]; a pinned torch tensor's `.numpy()` view works)."""
        if not rows:
            return
        self._check_bitmask(bitmask, rows)
        self._join()
        self._fill([(self.grammars[rid].matcher, row) for row, rid in rows], bitmask)

    def _fill(self, items: list[tuple[Any, int]], bitmask: np.ndarray) -> None:
        if not items:
            return
        batch, words = bitmask.shape
        nbytes = words * 4
        ptr = bitmask.ctypes.data
        if len(items) < self.parallel_fill_rows or self._num_threads <= 1:
            # Few rows, or no spare core: in this thread (a pool's spinning workers would
            # compete with the model's own threads for the CPU). Each call releases the GIL.
            for matcher, row in items:
                matcher.unsafe_compute_mask_ptr(ptr + row * nbytes, nbytes)
            return
        self._pool().unsafe_compute_mask_ptr(items, ptr, nbytes, batch)

    def close(self) -> None:
        """Wait for the prefetch job and stop the mask thread (a runner's shutdown)."""
        try:
            self._join()
        finally:
            ex, self._mask_executor = self._mask_executor, None
            if isinstance(ex, ThreadPoolExecutor):
                ex.shutdown(wait=True)


# ---- bitmask helpers ----


def allowed_token_ids(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids whose bit is set (host side; for CPU runners and tests)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask_row, dtype=np.int32).view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])


def allocate_bitmask(batch: int, vocab_size: int, pin_memory: bool = False) -> "torch.Tensor":
    """A host int32 bitmask, all tokens allowed; pinned for a non-blocking upload."""
    import torch

    return torch.full((batch, bitmask_words(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory)


_SHIFTS: dict[Any, "torch.Tensor"] = {}


def unpack_bitmask(bitmask: "torch.Tensor", vocab_size: int) -> "torch.Tensor":
    """int32 [R, W] packed -> bool [R, vocab_size] (True = allowed), on the bitmask's device.

    Unpacks through a uint8 view (memory is little-endian on every supported device),
    so the temporary is one byte per token. Tokens past 32 * W are disallowed."""
    import torch

    rows, words = bitmask.shape
    by = bitmask.contiguous().view(torch.uint8)  # [R, 4W], token t = byte t // 8, bit t % 8
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = ((by.unsqueeze(-1) >> shifts) & 1).view(rows, words * 32).bool()
    if words * 32 >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros((rows, vocab_size - words * 32), dtype=torch.bool, device=bitmask.device)
    return torch.cat([bits, pad], dim=1)


def apply_token_bitmask(logits: "torch.Tensor", bitmask: "torch.Tensor", rows: "torch.Tensor | None" = None) -> None:
    """In place: logits[rows[i], t] = -inf where bit t of bitmask[i] is clear.

    `logits` [B, V] float; `bitmask` int32 [R, W] on the logits' device; `rows` long [R]
    (the logits rows the bitmask rows apply to), or None when R == B."""
    allowed = unpack_bitmask(bitmask, logits.shape[-1])
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    sub = logits.index_select(0, rows)
    sub.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, sub)
