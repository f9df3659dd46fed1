"""Device sampling: exact masks, batch-invariant seeded draws that follow softmax."""
from __future__ import annotations

import math

import pytest
import torch

from aiosched.executors.torch.sampler import SamplingBatch, apply_top_k_top_p_min_p, sample


def batch(n: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
          seeds: list[int] | None = None, positions: list[int] | None = None) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((n,), temperature), top_k=torch.full((n,), top_k), top_p=torch.full((n,), top_p),
        min_p=torch.full((n,), min_p), seeds=torch.tensor(seeds or list(range(n))), positions=torch.tensor(positions or [0] * n),
        all_greedy=temperature == 0, any_top_k=top_k > 0, any_top_p=top_p < 1, any_min_p=min_p > 0)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits, batch(5, temperature=0.0)), logits.argmax(-1))


def test_top_k_top_p_min_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda b: (apply_top_k_top_p_min_p(logits, b) > float("-inf")).tolist()[0]  # noqa: E731
    assert kept(batch(1, top_k=2)) == [True, True, False, False, False]
    assert kept(batch(1, top_p=0.7)) == [True, True, False, False, False]  # 0.5 + 0.2 reaches 0.7
    assert kept(batch(1, top_p=0.71)) == [True, True, True, False, False]
    assert kept(batch(1, min_p=0.3)) == [True, True, True, False, False]  # >= 0.3 * 0.5


def test_seeded_draws_ignore_batch_composition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    full = sample(logits, batch(8, seeds=[11 * i for i in range(8)], positions=[3] * 8))
    for i in range(8):
        alone = sample(logits[i : i + 1], batch(1, seeds=[11 * i], positions=[3]))
        assert alone.item() == full[i].item()
    other_pos = sample(logits, batch(8, seeds=[11 * i for i in range(8)], positions=[4] * 8))
    assert not torch.equal(full, other_pos)


def test_min_tokens_ban_masks_eos() -> None:
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    b = batch(1, temperature=0.0)
    b.ban_rows, b.ban_tokens = torch.tensor([0]), torch.tensor([1])
    assert sample(logits, b).item() != 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_seeded_gumbel_sampling_follows_softmax(temperature: float) -> None:
    """Chi-square over many seeds: the draw frequencies match softmax(logits / T)."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 4000
    draws = sample(logits.expand(n, -1).contiguous(), batch(n, temperature=temperature, seeds=list(range(n)), positions=[7] * n))
    counts = torch.bincount(draws, minlength=6).double()
    expected = torch.softmax(logits / temperature, -1).double() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, chi2  # p = 0.001 for 5 degrees of freedom
    assert math.isfinite(chi2)


def test_mixed_greedy_and_random_rows() -> None:
    """Greedy rows stay argmax next to random rows; top_k = 0 and -1 both mean off."""
    torch.manual_seed(3)
    logits = torch.randn(4, 40)
    b = batch(4, seeds=[1, 2, 3, 4], positions=[9] * 4)
    b.temperature = torch.tensor([0.0, 1.0, 0.0, 0.5])
    b.all_greedy = False
    out = sample(logits, b)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert out[1] == sample(logits[1:2], batch(1, seeds=[2], positions=[9])).item()
    off = apply_top_k_top_p_min_p(logits, batch(4, top_k=0))
    assert torch.equal(off, logits)
    disabled = batch(4)
    disabled.top_k, disabled.any_top_k = torch.tensor([-1, 0, 3, -1]), True
    masked = apply_top_k_top_p_min_p(logits, disabled)
    assert torch.isfinite(masked[[0, 1, 3]]).all()
    assert int(torch.isfinite(masked[2]).sum()) == 3


def test_combined_filters_keep_the_intersection() -> None:
    """top-k, then top-p over the survivors (renormalised), and min-p: per row, exact sets."""
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04], [0.04, 0.06, 0.2, 0.3, 0.4]])
    logits = probs.log()
    b = batch(2, top_k=3, top_p=0.6)  # top-3 renormalised: 0.444, 0.333, 0.222 -> two reach 0.6
    kept = (apply_top_k_top_p_min_p(logits, b) > float("-inf")).tolist()
    assert kept == [[True, True, False, False, False], [False, False, False, True, True]]
    b = batch(2, min_p=0.45)  # >= 0.18 survive
    kept = (apply_top_k_top_p_min_p(logits, b) > float("-inf")).tolist()
    assert kept == [[True, True, True, False, False], [False, False, True, True, True]]
    b = batch(2, min_p=0.45, top_k=2)  # and then the 2 best of those
    kept = (apply_top_k_top_p_min_p(logits, b) > float("-inf")).tolist()
    assert kept == [[True, True, False, False, False], [False, False, False, True, True]]
    # Per-row parameters: row 0 top_k 1, row 1 unrestricted.
    b = batch(2)
    b.top_k, b.any_top_k = torch.tensor([1, 0]), True
    kept = (apply_top_k_top_p_min_p(logits, b) > float("-inf")).tolist()
    assert kept == [[True, False, False, False, False], [True] * 5]


def test_sampled_tokens_stay_inside_the_filtered_set() -> None:
    logits = torch.randn(1, 64).expand(500, -1).contiguous()
    allowed = set(logits[0].topk(5).indices.tolist())
    out = sample(logits, batch(500, top_k=5, seeds=list(range(500)), positions=[1] * 500))
    assert set(out.tolist()) <= allowed and len(set(out.tolist())) > 1


def test_noise_depends_on_all_seed_bits_and_is_uniform() -> None:
    from aiosched.executors.torch.sampler import uniform_noise

    seeds = torch.tensor([5, 5 + (1 << 32), -5, 5, 5])
    u = uniform_noise(seeds, torch.tensor([0, 0, 0, 1, 0]), 4096)
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2]) and not torch.equal(u[0], u[3])
    assert torch.equal(u[0], u[4])  # a pure function of (seed, position, index)
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    # Uniform: each decile holds about a tenth of the 20480 draws.
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert float((counts - 2048).abs().max()) < 200


@pytest.mark.parametrize("min_p", [0.0, 0.05])
def test_top_k_candidate_path_equals_the_full_path(min_p: float) -> None:
    """With max_top_k set, sampling hashes only the top-k columns: same tokens."""
    torch.manual_seed(5)
    R, V = 64, 3000
    logits = torch.randn(R, V) * 3
    b = batch(R, top_p=0.8, min_p=min_p, seeds=[7 * i - 100 for i in range(R)], positions=list(range(R)))
    b.top_k, b.any_top_k = torch.randint(1, 40, (R,)), True
    b.temperature = torch.where(torch.arange(R) % 5 == 0, 0.0, 0.9)  # some greedy rows
    b.all_greedy = False
    full = sample(logits, b)
    b.max_top_k = 40
    assert torch.equal(sample(logits, b), full)


def test_noise_chunking_does_not_change_draws(monkeypatch) -> None:
    import aiosched.executors.torch.sampler as sampler_mod

    logits = torch.randn(9, 100)
    b = batch(9, seeds=list(range(9)), positions=[2] * 9)
    whole = sample(logits, b)
    monkeypatch.setattr(sampler_mod, "_NOISE_CHUNK", 250)  # 2 rows per chunk
    assert torch.equal(sample(logits, b), whole)
