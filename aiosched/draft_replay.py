"""How many n-gram drafts would be accepted, replayed from tokens already generated (issue 18).

Greedy verification accepts a draft token exactly when it equals the token the model
produces at that position. The tokens a request has generated therefore tell, without a
single verify step, what drafting would have yielded on its text: at a position p,
propose drafts from tokens[:p] as the worker's n-gram proposer does, count how many of
them equal tokens[p], tokens[p + 1], ...: a verify step there would have produced those
matches plus one token. (With sampling a point-mass draft d is accepted with probability
p(d), the chance the sampled token equals d: the count estimates acceptance there too.)

The replay walks the history the way decoding with drafts would: a step at p yields
1 + m tokens (m leading matches, at most k), the next step starts at p + 1 + m. Tokens
per step over the walk is then what speculation would produce on this text, E, the
figure `SpecPolicy` weighs against the cost of a verify step. (A mean of 1 + m over
every position would overweight repetitive stretches: each is visited at every
position but decoded in a few steps.)

Proposer semantics (those of `propose_ngram` in executors/torch/spec_decode.py, checked
against it by the tests): the most recent earlier occurrence of the history's last n
tokens, n from ngram_max down to ngram_min, within the last `LOOKBACK` tokens; the up to
k tokens that followed it. Calling that proposer at every step would redo O(history)
work per position; `_Index` instead keeps the most recent end of every n-gram in a dict
filled as the walk advances (bulk `dict.update` over precomputed tuple keys, in C), so
a request costs O((positions + lookback) x sizes) once. Pure Python, no numpy: the
engine process stays free of it (tests/test_layering.py), and the cost is bounded by
the caller choosing at most `REQUESTS` requests and `POSITIONS` positions each;
benchmarks/replay_cost.py measures it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

# The torch runner's proposer matches within each request's last this-many tokens
# (executors/torch/spec_decode.py, NGRAM_LOOKBACK; a test checks that they agree).
LOOKBACK = 1024
# What one estimate replays. It runs on the event loop, between two steps: 16 requests x
# 256 positions over the full lookback cost 3-10 ms per call on the CPU (2026-12-04,
# `benchmarks/replay_cost.py`), and on an H200 at concurrency 256 the auto policy that
# made ~3 such calls per 128-token run lost 5% to "off" (never drafting); 8 x 128 over
# the last ESTIMATE_LOOKBACK tokens costs 0.8-1.9 ms and still sees ~1000 request-steps
# where nothing repeats.
POSITIONS = 128  # a request's last generated positions that are replayed
REQUESTS = 8  # requests replayed per estimate (spread over the batch: `spread`)
ESTIMATE_LOOKBACK = 512  # matches older than this are left out of an estimate (the worker looks back LOOKBACK)

T = TypeVar("T")


class _Index:
    """Proposals for one history at increasing positions: the most recent end of each
    n-gram (ngram_min <= n <= ngram_max) seen so far, indexed as positions advance."""

    def __init__(self, tokens: list[int], ngram_min: int, ngram_max: int, lookback: int, first: int) -> None:
        """first: the first position that will be proposed for (every n-gram ending before
        its last token is indexed at once, in bulk)."""
        self.t, self.lookback, self.nmin = tokens, lookback, ngram_min
        # (n, keys): keys[i] is the n tokens from i on; longest n first, as the proposer tries them.
        # Tuples of different lengths never compare equal: one dict holds every size.
        self.sizes = [(n, list(zip(*(tokens[o:] for o in range(n))))) for n in range(ngram_max, ngram_min - 1, -1)]
        self.smallest = self.sizes[-1][1]
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> its most recent end indexed so far
        stop = max(first - 1, 0)
        for n, keys in self.sizes:  # later ends overwrite earlier ones: the most recent wins
            if n - 1 < stop:
                self.last.update(zip(keys[: stop - n + 1], range(n - 1, stop)))
        self.indexed = stop  # ends below this are in `last`

    def propose(self, p: int) -> int:
        """Where the drafts for the history tokens[:p] start (they are tokens[s:min(s + k, p)]),
        -1 when none of its last n-grams occurred before within the lookback window."""
        last, sizes = self.last, self.sizes
        for j in range(self.indexed, p - 1):  # earlier occurrences end before the history's last token
            for n, keys in sizes:
                if j >= n - 1:
                    last[keys[j - n + 1]] = j
        self.indexed = max(self.indexed, p - 1)
        lo = p - self.lookback if p > self.lookback else 0  # the proposer reads tokens[lo:p]
        # Every longer match ends where its shortest suffix occurs too, and the most recent
        # occurrence of that suffix is at least as recent: none in the window, no match (one
        # lookup where text rarely repeats).
        nmin = self.nmin
        if nmin >= p - lo or last.get(self.smallest[p - nmin], -1) - nmin + 1 < lo:
            return -1
        for n, keys in sizes:
            if n < p - lo:  # an earlier n-gram fits in the window
                j = last.get(keys[p - n], -1)
                if j - n + 1 >= lo:  # the most recent occurrence is in the window (else none is)
                    return j + 1
        return -1


def proposals(tokens: Sequence[int], positions: Iterable[int], k: int, ngram_min: int, ngram_max: int,
              lookback: int = LOOKBACK) -> list[list[int]]:
    """The drafts proposed for tokens[:p] at each of `positions` (increasing): what
    `propose_ngram(tokens[max(0, p - lookback):p], k, ngram_min, ngram_max)` returns."""
    t, ps = list(tokens), list(positions)
    idx = _Index(t, ngram_min, ngram_max, lookback, ps[0] if ps else 0)
    out = []
    for p in ps:
        s = idx.propose(p)
        out.append(t[s : min(s + k, p)] if s >= 0 and k > 0 else [])
    return out


def replay(tokens: Sequence[int], begin: int, k: int, ngram_min: int, ngram_max: int,
           lookback: int = LOOKBACK) -> tuple[int, int]:
    """Decode tokens[begin:] again with drafts of k tokens: (verify steps, tokens they yield).

    Steps start where all k drafts can be checked (p + k <= len(tokens)); tokens / steps
    is E, 1.0 when no draft would ever be accepted, up to 1 + k."""
    first = max(0, begin - lookback)  # nothing earlier is read by any proposal
    t = list(tokens[first:])
    p, end = begin - first, len(t) - k
    idx = _Index(t, ngram_min, ngram_max, lookback, p)
    steps = produced = 0
    while p <= end:
        m, s = 0, idx.propose(p)
        if s >= 0:
            stop = min(s + k, p)  # drafts are tokens[s:stop]
            while s + m < stop and t[s + m] == t[p + m]:
                m += 1
        steps, produced, p = steps + 1, produced + 1 + m, p + 1 + m
    return steps, produced


def replay_batch(histories: Iterable[tuple[Sequence[int], int]], k: int, ngram_min: int, ngram_max: int,
                 positions: int = POSITIONS, lookback: int = LOOKBACK) -> tuple[int, int]:
    """(steps, tokens) summed over requests given as (token history, prompt length): each
    replays its last `positions` generated positions (prompt tokens are not the model's:
    they are matched against, never replayed)."""
    steps = produced = 0
    for tokens, prompt_len in histories:
        s, n = replay(tokens, max(prompt_len, len(tokens) - positions), k, ngram_min, ngram_max, lookback)
        steps, produced = steps + s, produced + n
    return steps, produced


def spread(items: Sequence[T], n: int = REQUESTS) -> list[T]:
    """At most n items evenly spaced over `items`, deterministically (the first always):
    a batch's old and new requests alike, without looking at every one."""
    m = len(items)
    return list(items) if m <= n else [items[i * m // n] for i in range(n)]
