"""MostPop and RecentPop rankings on hand-made counts, ties, exclusions and time windows; the
rolling-average value baseline by hand."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from dist_rec.batch import SequenceBatch
from dist_rec.evaluation.protocols import next_value_rmse
from dist_rec.models.baselines import PopularityRanker, RollingAverageValues, most_pop, recent_pop


def batch_of(rows: int) -> SequenceBatch:
    items = torch.ones(rows, 3, dtype=torch.int64)
    return SequenceBatch(items=items, targets=items, deltas=items, session_starts=items > 0,
                         event_types=items, target_types=items,
                         users=torch.zeros(rows, dtype=torch.int64))


# counts: item 1 -> 2, 2 -> 1, 3 -> 3, 4 -> 0, 5 -> 2, 6 -> 0; padding 0 is ignored.
EVENTS = [3, 3, 3, 1, 1, 2, 5, 5, 0, 0, 0, 0]


def test_most_pop_order_with_ties_by_lower_id():
    ranker = most_pop(6).fit(EVENTS)
    assert ranker.topk(batch_of(2), 6).tolist() == [[3, 1, 5, 2, 4, 6]] * 2
    assert ranker.topk(batch_of(1), 3).tolist() == [[3, 1, 5]]


def test_target_ranks_count_ties_against_the_target():
    ranker = most_pop(6).fit(np.array(EVENTS))
    targets = torch.tensor([3, 1, 5, 2, 4, 6])
    # 3 is alone on top; 1 and 5 (count 2) each lose to 3 and to each other; 4 and 6 (count 0)
    # lose to all five others. Item 0 never counts, though it occurs four times.
    assert ranker.target_ranks(batch_of(6), targets).tolist() == [0, 2, 2, 3, 5, 5]


def test_target_ranks_skip_excluded_items_once_each():
    ranker = most_pop(6).fit(np.array(EVENTS))
    targets = torch.tensor([4, 4, 1, 2])
    # Item 4 (count 0) loses to all five others; excluding 3 and 5 (5 listed twice; padding 0 and
    # the target itself ignored) leaves 1, 2 and 6: rank 3. Item 1 loses to 3 and ties with 5:
    # excluding 5 leaves 3 alone. Item 2 loses to 3, 1, 5: excluding 6 changes nothing.
    exclude = torch.tensor([[3, 5, 5, 0, 4], [0, 0, 0, 0, 0], [5, 4, 1, 0, 0], [6, 0, 0, 0, 0]])
    assert ranker.target_ranks(batch_of(4), targets, exclude).tolist() == [3, 5, 1, 3]


def test_exclude_skips_items_and_pads_when_the_catalog_runs_out():
    ranker = most_pop(6).fit(torch.tensor(EVENTS))
    exclude = torch.tensor([[3, 0, 0], [1, 5, 0], [1, 2, 3]])
    assert ranker.topk(batch_of(3), 3, exclude).tolist() == [[1, 5, 2], [3, 2, 4], [5, 4, 6]]
    assert ranker.topk(batch_of(1), 5, torch.tensor([[1, 2, 3]])).tolist() == [[5, 4, 6, 0, 0]]
    assert ranker.topk(batch_of(1), 8).tolist() == [[3, 1, 5, 2, 4, 6, 0, 0]]


def test_candidate_scores_are_counts():
    ranker = most_pop(6).fit(EVENTS)
    scores = ranker.candidate_scores(batch_of(1), torch.tensor([[5, 4, 3, 0]]))
    assert scores.tolist() == [[2.0, 0.0, 3.0, float("-inf")]]


def test_recent_pop_counts_only_the_window_before_now():
    hour = 3600
    now = 100 * hour
    items = [1, 1, 1, 2, 2, 3, 4, 4]
    times = [now - 3 * hour,                        # too old for a 2-hour window
             now - 2 * hour - 1,                    # one second too old
             now - 2 * hour,                        # first second of the window: counts
             now - 10, now - 1,                     # counts
             now,                                   # the prediction time itself: excluded
             now + 5, now + 6]                      # the future: excluded
    ranker = recent_pop(4, hours=2).fit(items, times, now=now)
    assert ranker.counts[1:].tolist() == [1.0, 2.0, 0.0, 0.0]
    assert ranker.topk(batch_of(1), 4).tolist() == [[2, 1, 3, 4]]
    assert ranker.target_ranks(batch_of(2), torch.tensor([1, 3])).tolist() == [1, 3]
    # Without `now`, the window ends just after the last event.
    assert recent_pop(4, hours=2).fit(items, times).counts[1:].tolist() == [0.0, 2.0, 1.0, 2.0]
    # MostPop ignores time altogether.
    assert most_pop(4).fit(items, times).counts[1:].tolist() == [3.0, 2.0, 1.0, 2.0]
    # The same counts given as counts rank the same (padding's count ignored).
    from_counts = most_pop(4).fit_counts(np.array([9, 3, 2, 1, 2]))
    assert torch.equal(from_counts.counts, most_pop(4).fit(items).counts)
    assert from_counts.topk(batch_of(1), 4).tolist() == [[1, 2, 4, 3]]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"item ids must be in 0\.\.4, got 0\.\.7"):
        most_pop(4).fit([0, 7])
    with pytest.raises(ValueError, match="needs timestamps"):
        recent_pop(4).fit([1, 2])
    with pytest.raises(ValueError, match="2 items but 1 timestamps"):
        recent_pop(4).fit([1, 2], [5])
    with pytest.raises(ValueError, match="window_hours must be > 0"):
        PopularityRanker(4, window_hours=0)
    with pytest.raises(RuntimeError, match="call fit"):
        most_pop(4).topk(batch_of(1), 2)
    with pytest.raises(ValueError, match="4 counts for 4 items and the padding id"):
        most_pop(4).fit_counts([0, 1, 2, 3])
    with pytest.raises(ValueError, match="counts must be >= 0"):
        most_pop(2).fit_counts([0, 1, -1])
    with pytest.raises(ValueError, match=r"targets must be in 1\.\.4"):
        most_pop(4).fit([1]).target_ranks(batch_of(1), torch.tensor([0]))


def test_rolling_average_values_by_hand():
    """Item averages from training (item 3 has none: the overall average 8/3; padding's 9 is
    ignored), the user's running average over the window: prediction = the mean of the two."""
    baseline = RollingAverageValues.fit(np.array([1, 1, 2, 0]), np.array([1.0, 3.0, 4.0, 9.0]), 3)
    assert baseline.item_means[1:].tolist() == pytest.approx([2.0, 4.0, 8 / 3])
    table = pa.table({"user": [1], "items": [[2, 1, 3]],
                      "values": pa.array([[5.0, 1.0, 2.0]], pa.list_(pa.float32()))})
    # Next item 1 after values (5): 0.5 (5 + 2) = 3.5 vs 1; next item 3 after (5, 1): 0.5 (3 + 8/3)
    # = 17/6 vs 2. RMSE = sqrt((2.5^2 + (5/6)^2) / 2).
    result = next_value_rmse(baseline, table)
    assert result["count"] == 2
    assert result["rmse"] == pytest.approx(math.sqrt((2.5 ** 2 + (5 / 6) ** 2) / 2), rel=1e-6)
