import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from dist_rec.sampling.alias import AliasSampler


def implied_probabilities(sampler: AliasSampler) -> np.ndarray:
    """The exact distribution a table encodes: column i gives i w.p. prob[i], else alias[i]."""
    prob = sampler.prob.double().numpy()
    n = prob.shape[0]
    return (prob + np.bincount(sampler.alias.numpy(), weights=1.0 - prob, minlength=n)) / n


def draw_counts(sampler: AliasSampler, num: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return np.bincount(sampler.sample(num, generator).numpy(), minlength=sampler.num_items)


@pytest.mark.parametrize("weights", [
    np.array([0.0, 1, 2, 0, 10, 0.5, 100, 3, 0, 7]),
    np.r_[0.0, np.ones(6)],                                      # uniform but one zero
    np.random.default_rng(0).pareto(0.8, 5000),                   # heavy tail
    np.arange(1, 4097, dtype=float) ** -1.2,                      # Zipf
])
def test_table_encodes_exactly_the_weights(weights):
    sampler = AliasSampler.from_weights(weights)
    np.testing.assert_allclose(implied_probabilities(sampler), weights / weights.sum(), atol=1e-7)
    np.testing.assert_allclose(sampler.log_q.exp().numpy(), weights / weights.sum(), rtol=1e-5)
    assert torch.equal(torch.isinf(sampler.log_q), torch.from_numpy(weights == 0))


def test_chi_square_skewed_small_catalog():
    weights = np.array([0.0, 1, 2, 0, 10, 0.5, 100, 3, 0, 7])
    counts = draw_counts(AliasSampler.from_weights(weights), 400_000, seed=1)
    assert counts[weights == 0].sum() == 0
    positive = weights > 0
    expected = 400_000 * weights[positive] / weights.sum()
    assert chisquare(counts[positive], expected).pvalue > 1e-3


def test_chi_square_million_item_zipf():
    n, draws = 1_000_000, 4_000_000
    weights = np.r_[0.0, np.arange(1, n, dtype=float) ** -1.0]
    sampler = AliasSampler.from_weights(weights)
    counts = draw_counts(sampler, draws, seed=2)
    assert counts[0] == 0
    p = weights / weights.sum()
    # Equal-mass bins over the rank order: head items get a bin each, the tail is pooled.
    start = np.cumsum(p[1:]) - p[1:]
    bins = np.unique(np.floor(start * 20_000).astype(np.int64), return_inverse=True)[1]
    expected = np.bincount(bins, weights=p[1:]) * draws
    observed = np.bincount(bins, weights=counts[1:])
    assert expected.min() >= 5 and expected.size > 10_000
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3
    # A sampler that ignored the tail (or the head) would be off by far more than this.
    assert abs(counts[1] / draws - p[1]) < 5 * np.sqrt(p[1] / draws)


def test_zero_weight_never_drawn_and_counts_helpers():
    counts = np.array([50, 0, 4, 0, 1, 9, 0, 16])  # row 0 is padding: never drawn despite its count
    sampler = AliasSampler.from_counts(counts, alpha=0.5)
    drawn = draw_counts(sampler, 200_000, seed=3)
    assert drawn[[0, 1, 3, 6]].sum() == 0
    expected = np.array([0, 0, 2, 0, 1, 3, 0, 4]) / 10
    np.testing.assert_allclose(implied_probabilities(sampler), expected, atol=1e-7)
    uniform = AliasSampler.from_counts(counts, alpha=0.0)
    np.testing.assert_allclose(implied_probabilities(uniform), np.array([0, 0, 1, 0, 1, 1, 0, 1]) / 4,
                               atol=1e-7)


@pytest.mark.parametrize("weights, message", [
    (np.zeros(5), "all weights are zero"),
    (np.array([1.0, -0.5, 2.0]), r"weights\[1\] = -0.5"),
    (np.array([1.0, np.nan]), r"weights\[1\] = nan"),
    (np.array([1.0, np.inf]), r"weights\[1\] = inf"),
    (np.ones((2, 2)), "1-D"),
    (np.array([]), "non-empty"),
])
def test_bad_weights_raise(weights, message):
    with pytest.raises(ValueError, match=message):
        AliasSampler.from_weights(weights)


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="no item"):
        AliasSampler.from_counts(np.array([10, 0, 0]))  # only padding has a count
    with pytest.raises(ValueError, match="alpha"):
        AliasSampler.from_counts(np.array([0, 1, 2]), alpha=-1.0)


def test_state_dict_round_trip_gives_identical_draws(tmp_path):
    sampler = AliasSampler.from_counts(np.random.default_rng(4).integers(0, 100, 1000), alpha=0.75)
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    restored = AliasSampler.from_counts(np.array([0, 1]))
    restored.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    assert restored.alpha == 0.75 and restored.num_items == 1000
    first = sampler.sample(10_000, torch.Generator().manual_seed(7))
    second = restored.sample(10_000, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert torch.equal(restored.log_q, sampler.log_q)
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"prob": sampler.prob})


def test_rebuild_grows_the_catalog_and_keeps_alpha():
    sampler = AliasSampler.from_counts(np.array([0, 4, 1]), alpha=0.5)
    sampler.rebuild(np.array([0, 4, 1, 0, 9]))
    assert sampler.num_items == 5
    np.testing.assert_allclose(implied_probabilities(sampler), np.array([0, 2, 1, 0, 3]) / 6, atol=1e-7)


@pytest.mark.parametrize("num", [1000, 40_000])  # one piece; several CPU chunks
def test_same_seed_same_draws_and_to_device(num):
    sampler = AliasSampler.from_weights(np.arange(100, dtype=float)).to("cpu")
    a = sampler.sample(num, torch.Generator().manual_seed(11))
    b = sampler.sample(num, torch.Generator().manual_seed(11))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (num,)
    assert not torch.equal(a, sampler.sample(num, torch.Generator().manual_seed(12)))
    assert a.min() >= 1 and a.max() <= 99
