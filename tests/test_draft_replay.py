"""Replaying the n-gram proposer over generated tokens estimates what drafting would
yield (issue 18): greedy verification accepts a draft exactly when it equals the token
the model produced, so the history itself says how many would have been accepted."""
from __future__ import annotations

import random

import pytest

from aiosched.draft_replay import LOOKBACK, proposals, replay, replay_batch, spread
from aiosched.token_ids import TokenIds


def tokens_per_step(tokens: list[int], begin: int, k: int = 4, ngram_min: int = 1, ngram_max: int = 4) -> float:
    steps, produced = replay(tokens, begin, k, ngram_min, ngram_max)
    assert steps > 0
    return produced / steps


def test_a_repeating_text_accepts_every_draft() -> None:
    """After the first period every step finds its last 4 tokens one period back and the
    4 that followed are the next 4: 1 + k tokens per step."""
    text = list(range(10, 17)) * 40
    assert tokens_per_step(text, begin=14) == 5.0
    assert tokens_per_step(text, begin=14, k=2) == 3.0


def test_a_text_that_never_repeats_accepts_nothing() -> None:
    assert tokens_per_step(list(range(300)), begin=20) == 1.0
    rng = random.Random(7)
    ids = [rng.randrange(50_000) for _ in range(400)]  # random-ish ids: a 1-gram may recur, its successor does not
    assert tokens_per_step(ids, begin=100) == 1.0


def test_drafts_stop_at_the_end_of_the_history_as_the_proposers_do() -> None:
    """A constant text: the most recent earlier 4-gram ends one token back, so only one
    token follows it (the proposer's [7, 7, 7] -> [7]): two tokens per step, not 1 + k."""
    assert tokens_per_step([7] * 100, begin=10) == 2.0


def test_a_partly_repetitive_text_counts_steps_as_decoding_would() -> None:
    """100 copied tokens (5 a step) then 100 new ones (1 a step): E is tokens / steps
    over the walk, the rate speculation would decode at (197 tokens in 117 steps), not
    the mean of 1 + matches over every position (~3, the copied half counted 5 times over)."""
    phrase = list(range(1000, 1020))
    text = phrase * 6 + list(range(3000, 3100))
    assert replay(text, 20, 4, 1, 4) == (117, 197)  # steps start where 4 drafts can be checked: up to 216 of 220


def test_the_smallest_ngram_is_respected() -> None:
    hist = [5, 9, 1, 2, 5]  # "5" occurred before, no longer suffix did
    assert proposals(hist, [5], 3, 1, 3) == [[9, 1, 2]]
    assert proposals(hist, [5], 3, 2, 3) == [[]]


def test_the_longest_ngram_wins_over_a_more_recent_shorter_one() -> None:
    hist = [1, 2, 3, 40, 41, 9, 3, 50, 51, 1, 2, 3]  # "1 2 3" at 0..2, a more recent "3" at 6
    assert proposals(hist, [len(hist)], 2, 1, 3) == [[40, 41]]
    assert proposals(hist, [len(hist)], 2, 1, 1) == [[50, 51]]  # ngram_max 1: the most recent "3"


def test_matches_older_than_the_lookback_are_not_proposed() -> None:
    hist = [8, 20, 21] + list(range(100, 110)) + [8]
    assert proposals(hist, [len(hist)], 2, 1, 2, lookback=len(hist)) == [[20, 21]]
    assert proposals(hist, [len(hist)], 2, 1, 2, lookback=len(hist) - 1) == [[]]


@pytest.mark.parametrize("seed", range(6))
def test_the_same_proposals_as_the_workers_proposer(seed: int) -> None:
    """Any history, any positions from any start, any sizes and lookback: what
    `propose_ngram` gives for the tokens before each position (its lookback window)."""
    from aiosched.executors.torch.spec_decode import propose_ngram

    rng = random.Random(seed)
    for _ in range(40):
        vocab = rng.choice([2, 3, 6, 40])
        hist = [rng.randrange(vocab) for _ in range(rng.randint(1, 150))]
        k, nmin = rng.randint(1, 5), rng.randint(1, 3)
        nmax, lookback = nmin + rng.randint(0, 3), rng.choice([LOOKBACK, 9, 30])
        start = rng.randint(0, len(hist))
        ps = list(range(start, len(hist) + 1))
        want = [propose_ngram(hist[max(0, p - lookback):p], k, nmin, nmax) for p in ps]
        assert proposals(hist, ps, k, nmin, nmax, lookback) == want


def test_the_lookback_is_the_torch_runners() -> None:
    from aiosched.executors.torch.spec_decode import NGRAM_LOOKBACK

    assert LOOKBACK == NGRAM_LOOKBACK


def test_prompt_tokens_are_matched_against_but_not_replayed() -> None:
    """A repetitive prompt with new output: nothing to accept. Output that copies the
    prompt: every draft accepted. A request's history is (tokens, prompt length)."""
    prompt = list(range(10, 30)) * 3
    new_output = list(range(500, 600))
    copied = list(range(10, 30)) * 5
    assert replay_batch([(prompt + new_output, len(prompt))], 4, 1, 4) == (97, 97)
    steps, produced = replay_batch([(TokenIds(prompt + copied), len(prompt))], 4, 1, 4)
    assert produced == 5 * steps
    # Only the last `positions` generated positions are replayed.
    assert replay_batch([(prompt + new_output, len(prompt))], 4, 1, 4, positions=30) == (27, 27)
    # Requests add up.
    assert replay_batch([(prompt + new_output, len(prompt))] * 3, 4, 1, 4) == (3 * 97, 3 * 97)


def test_spread_picks_at_most_n_evenly_and_deterministically() -> None:
    assert spread(list(range(5)), 16) == [0, 1, 2, 3, 4]
    assert spread(list(range(256)), 16) == list(range(0, 256, 16))
    assert spread(list(range(20)), 4) == [0, 5, 10, 15]
