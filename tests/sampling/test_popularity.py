import numpy as np
import pytest
import torch

from dist_rec.sampling.popularity import (HOUR, DecayedCounts, GlobalCounts, StreamingFrequency,
                                          WindowCounts)

# A hand-made stream over 4 items: (item, hour of the event).
ITEMS = np.array([1, 1, 2, 3, 1, 2, 2, 4, 4, 4])
HOURS = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
TIMES = HOURS * HOUR + 60


def test_global_counts_probabilities_and_log_q():
    counts = GlobalCounts(5)
    counts.update(torch.from_numpy(ITEMS[:4]))
    counts.update(ITEMS[4:])
    np.testing.assert_array_equal(counts.counts(), [0, 3, 3, 1, 3, 0])
    np.testing.assert_allclose(counts.probabilities(), [0, 0.3, 0.3, 0.1, 0.3, 0])
    np.testing.assert_allclose(counts.probabilities(smoothing=1.0), np.array([0, 4, 4, 2, 4, 1]) / 15)
    log_q = counts.log_q()
    assert log_q.dtype == torch.float32 and torch.isinf(log_q[[0, 5]]).all()
    np.testing.assert_allclose(log_q[1:5].numpy(), np.log([0.3, 0.3, 0.1, 0.3]), rtol=1e-6)


def test_window_counts_hour_buckets():
    window = WindowCounts(4, hours=2)
    window.update(ITEMS[:6], TIMES[:6])          # hours 0..2; hour 0 leaves the window of hour 2
    np.testing.assert_array_equal(window.counts(), [0, 1, 1, 1, 0])        # hours 1, 2
    window.update(ITEMS[6:], TIMES[6:])          # hour 3
    np.testing.assert_array_equal(window.counts(), [0, 1, 2, 0, 3])        # hours 2, 3
    np.testing.assert_array_equal(window.counts(now=2 * HOUR + 5), [0, 1, 1, 0, 0])  # hour 1 evicted
    np.testing.assert_array_equal(window.counts(now=5 * HOUR), [0, 0, 0, 0, 0])
    window.update([2], [0])                      # far too old for the window: ignored
    np.testing.assert_array_equal(window.counts(), [0, 1, 2, 0, 3])
    window.grow(6)
    np.testing.assert_allclose(window.probabilities(), np.array([0, 1, 2, 0, 3, 0, 0]) / 6)


def test_decayed_counts_half_life():
    decayed = DecayedCounts(4, half_life_hours=1.0)
    decayed.update(ITEMS[:3], TIMES[:3])         # items 1, 1, 2 at hour 0
    decayed.update(ITEMS[3:], TIMES[3:])         # the rest, up to hour 3
    now = 3 * HOUR + 60
    # weight of an event h hours old is 2^-h
    expected = [0, 2 * 2**-3 + 2**-1, 2**-3 + 2**-1 + 1, 2**-2, 3]
    np.testing.assert_allclose(decayed.counts(now), expected, rtol=1e-12)
    np.testing.assert_allclose(decayed.counts(now + 2 * HOUR), np.array(expected) / 4, rtol=1e-12)
    np.testing.assert_allclose(decayed.probabilities(now + 5 * HOUR), np.array(expected) / sum(expected))
    with pytest.raises(ValueError, match="before the latest event"):
        decayed.counts(now - HOUR)


def sequential_yi(items, steps, num_items, rate):
    """Algorithm 1 of Yi et al. as written, one sighting at a time (first gap initialises B)."""
    last, gap, seen = np.zeros(num_items + 1), np.zeros(num_items + 1), np.zeros(num_items + 1, bool)
    for step in np.unique(steps):
        for item in np.unique(items[steps == step]):
            delta = step - last[item]
            gap[item] = (1 - rate) * gap[item] + rate * delta if seen[item] else delta
            last[item], seen[item] = step, True
    return np.where(seen, 1 / np.where(seen, gap, 1), 0.0)


def test_streaming_frequency_matches_the_sequential_algorithm():
    rng = np.random.default_rng(0)
    items = rng.integers(1, 21, 600)
    steps = np.sort(rng.integers(1, 150, 600))
    estimator = StreamingFrequency(20, learning_rate=0.1)
    split = np.searchsorted(steps, 75)           # calls split at a step boundary ...
    estimator.update(items[:split], steps[:split])
    estimator.update(items[split:split + 7], steps[split:split + 7])
    estimator.update(items[split + 7:], steps[split + 7:])  # ... and inside a step
    expected = sequential_yi(items, steps, 20, 0.1)
    expected[0] = 0
    np.testing.assert_allclose(estimator.counts(), expected, rtol=1e-12)


def test_streaming_frequency_converges_on_a_stationary_stream():
    rng = np.random.default_rng(1)
    p = 1.0 / np.arange(1, 11)
    p /= p.sum()
    items = rng.choice(np.arange(1, 11), size=300_000, p=p)
    exact = StreamingFrequency(10, learning_rate=0.001)
    exact.update(items, np.arange(1, items.size + 1))    # one event per step: q -> p
    np.testing.assert_allclose(exact.counts()[1:], p, rtol=0.08)
    np.testing.assert_allclose(exact.probabilities()[1:], p, rtol=0.08)
    # Batches of 8 events: q -> P(item in a batch) = 1 - (1 - p)^8, duplicates counted once.
    batched = StreamingFrequency(10, learning_rate=0.001)
    batched.update(items, np.arange(items.size) // 8 + 1)
    np.testing.assert_allclose(batched.counts()[1:], 1 - (1 - p) ** 8, rtol=0.08)
    # Hashing into fewer buckets than items merges colliding items' gaps.
    hashed = StreamingFrequency(10, learning_rate=0.001, num_buckets=4)
    hashed.update(items, np.arange(1, items.size + 1))
    buckets = hashed.buckets(np.arange(1, 11))
    merged = np.bincount(buckets, weights=p, minlength=4)[buckets]
    np.testing.assert_allclose(hashed.counts()[1:], merged, rtol=0.08)


def test_growth_keeps_estimates_and_starts_new_items_at_zero():
    streaming = StreamingFrequency(2, learning_rate=0.5)
    streaming.update([1, 2], [1, 1])                 # first gaps: 1 step each
    streaming.grow(3)                                # item 3 enters the stream at step 1
    streaming.update([3, 1], [5, 5])
    # item 1: B = 0.5 * 1 + 0.5 * 4 = 2.5; item 2: B = 1; item 3: first gap 5 - 1 = 4
    np.testing.assert_allclose(streaming.counts(), [0, 1 / 2.5, 1, 1 / 4])
    decayed = DecayedCounts(2, half_life_hours=1.0)
    decayed.update([1, 2, 2], [0, 0, 0])
    decayed.grow(4)
    decayed.update([4], [HOUR])
    np.testing.assert_allclose(decayed.counts(HOUR), [0, 0.5, 1.0, 0, 1.0])
    counts = GlobalCounts(2)
    counts.update([2, 2])
    counts.grow(3)
    counts.update([3])
    np.testing.assert_array_equal(counts.counts(), [0, 0, 2, 1])


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"item id 0 outside 1..4"):
        GlobalCounts(4).update(np.array([1, 0]))
    with pytest.raises(ValueError, match=r"item id 5 outside 1..4 .*grow"):
        WindowCounts(4, hours=1).update(np.array([5]), np.array([0]))
    with pytest.raises(ValueError, match="2 items but 1 timestamps"):
        DecayedCounts(4, 1.0).update(np.array([1, 2]), np.array([0]))
    with pytest.raises(ValueError, match="no events"):
        GlobalCounts(4).probabilities()
    with pytest.raises(ValueError, match="cannot shrink"):
        GlobalCounts(4).grow(3)
