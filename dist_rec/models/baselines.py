"""Baselines: MostPop (all-time counts) and RecentPop (counts in the hours before `now`) for
ranking, and the rolling average for next-event values (HRNN-meta's value head).

The popularity baselines are not encoders: they rank the catalog by event counts, the same ranking
for every row of a batch, through the evaluation `Ranker` methods (topk, target_ranks,
candidate_scores), so the protocols evaluate them like models. Ties are broken by the lower item id
in `topk` and count against the target in `target_ranks`, as for the models; item 0 (padding) is
never ranked. The value baseline has the value head's interface (`hidden`, `predict_values`), so
`evaluation.next_value_rmse` scores it like a model.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dist_rec.batch import SequenceBatch


class PopularityRanker:
    """Ranks items 1..num_items by how often they occur in the events given to `fit`.

    window_hours None counts every event (MostPop); otherwise only events with
    now - window <= timestamp < now (RecentPop).
    """

    def __init__(self, num_items: int, window_hours: float | None = None):
        if window_hours is not None and window_hours <= 0:
            raise ValueError(f"PopularityRanker: window_hours must be > 0, got {window_hours}")
        self.num_items = num_items
        self.window_hours = window_hours
        self.counts: torch.Tensor | None = None       # (N + 1,) float64, counts[0] = -inf
        self._order: torch.Tensor | None = None       # (N,) ids, most popular first
        self._sorted: torch.Tensor | None = None      # (N,) counts of ids 1..N, ascending

    def fit(self, items, timestamps=None, now: int | None = None) -> "PopularityRanker":
        """items (M,) dense ids (0 = padding, ignored), timestamps (M,) unix seconds (RecentPop
        only); `now` defaults to just after the last event. Arrays or tensors."""
        items = torch.as_tensor(items, dtype=torch.int64).reshape(-1).cpu()
        if items.numel() and (int(items.min()) < 0 or int(items.max()) > self.num_items):
            raise ValueError(f"PopularityRanker.fit: item ids must be in 0..{self.num_items}, "
                             f"got {int(items.min())}..{int(items.max())}")
        if self.window_hours is not None:
            if timestamps is None:
                raise ValueError("PopularityRanker.fit: a recent window needs timestamps")
            timestamps = torch.as_tensor(timestamps, dtype=torch.int64).reshape(-1).cpu()
            if timestamps.shape != items.shape:
                raise ValueError(f"PopularityRanker.fit: {items.numel()} items but "
                                 f"{timestamps.numel()} timestamps")
            if now is None:
                now = int(timestamps.max()) + 1 if timestamps.numel() else 0
            start = now - self.window_hours * 3600
            items = items[(timestamps >= start) & (timestamps < now)]
        return self.fit_counts(torch.bincount(items, minlength=self.num_items + 1))

    def fit_counts(self, counts) -> "PopularityRanker":
        """counts (num_items + 1,) events per id, entry 0 (padding) ignored: the counts without
        the events, e.g. PreparedData.item_counts."""
        counts = torch.as_tensor(counts).to(torch.float64).reshape(-1).cpu().clone()
        if counts.numel() != self.num_items + 1:
            raise ValueError(f"PopularityRanker.fit_counts: {counts.numel()} counts for "
                             f"{self.num_items} items and the padding id")
        if bool((counts[1:] < 0).any()):
            raise ValueError("PopularityRanker.fit_counts: counts must be >= 0")
        counts[0] = float("-inf")
        self.counts = counts
        # Stable descending sort: equal counts keep increasing id order.
        self._order = torch.sort(counts[1:], descending=True, stable=True).indices + 1
        self._sorted = torch.sort(counts[1:]).values
        return self

    def _fitted(self) -> torch.Tensor:
        if self.counts is None:
            raise RuntimeError("PopularityRanker: call fit() before ranking")
        return self.counts

    def topk(self, batch: SequenceBatch, k: int, exclude: torch.Tensor | None = None
             ) -> torch.Tensor:
        """-> (B, k) int64 ids, most popular first; `exclude` (B, M) ids (0 = none) are skipped.
        Where fewer than k items remain the row ends in 0s."""
        self._fitted()
        rows = batch.items.shape[0]
        width = min(k + (0 if exclude is None else exclude.shape[1]), self.num_items)
        candidates = self._order[:width].expand(rows, -1)                 # (B, k + M)
        if exclude is None:
            out = candidates[:, :k]
        else:
            excluded = (candidates.unsqueeze(2) == exclude.cpu().unsqueeze(1)).any(2)
            # A stable sort on the excluded flag moves kept candidates first, in rank order.
            keep_first = torch.sort(excluded.to(torch.int8), dim=1, stable=True).indices[:, :k]
            out = candidates.gather(1, keep_first).masked_fill(excluded.gather(1, keep_first), 0)
        return torch.nn.functional.pad(out, (0, k - out.shape[1]))

    def target_ranks(self, batch: SequenceBatch, targets: torch.Tensor,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
        """targets (B,) ids >= 1 -> (B,) int64 #{j != target, j not in exclude : count_j >=
        count_target}; `exclude` (B, M) ids (0 = none), repeats counted once."""
        counts = self._fitted()
        targets = targets.cpu()
        if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) > self.num_items):
            raise ValueError(f"PopularityRanker.target_ranks: targets must be in "
                             f"1..{self.num_items}")
        target_counts = counts[targets]
        ranks = self.num_items - torch.searchsorted(self._sorted, target_counts, right=False) - 1
        if exclude is not None:
            excluded = exclude.cpu().sort(1).values                          # (B, M)
            first = torch.ones_like(excluded, dtype=torch.bool)
            first[:, 1:] = excluded[:, 1:] != excluded[:, :-1]
            competing = (first & (excluded > 0) & (excluded != targets.unsqueeze(1))
                         & (counts[excluded] >= target_counts.unsqueeze(1)))
            ranks -= competing.sum(1)
        return ranks

    def candidate_scores(self, batch: SequenceBatch, candidates: torch.Tensor) -> torch.Tensor:
        """candidates (B, C) ids -> (B, C) float64 counts (exact; padding 0 scores -inf)."""
        return self._fitted()[candidates.cpu()]


def most_pop(num_items: int) -> PopularityRanker:
    """MostPop: all-time counts."""
    return PopularityRanker(num_items)


def recent_pop(num_items: int, hours: float = 24.0) -> PopularityRanker:
    """RecentPop: counts over the `hours` before `now` (given to fit)."""
    return PopularityRanker(num_items, window_hours=hours)


class RollingAverageValues(nn.Module):
    """The next event's value as the mean of the user's average value so far and the item's
    average value in training (the training average for items without one): the baseline of the
    HRNN-meta paper's Table 4.

    `hidden(batch)` (B, T, 1) is the user's running average over the window's values up to step
    t; `predict_values(hidden (N, 1), next items (N,))` -> (N,).
    """

    predicts_values = True

    def __init__(self, item_means: torch.Tensor):
        super().__init__()
        self.register_buffer("item_means", item_means.to(torch.float32))    # (N + 1,)

    @staticmethod
    def fit(items: np.ndarray, values: np.ndarray, num_items: int) -> "RollingAverageValues":
        """Training events' dense item ids and values (M,) (item 0 = padding, ignored)."""
        items, values = np.asarray(items, np.int64), np.asarray(values, np.float64)
        real = items > 0
        sums = np.bincount(items[real], values[real], minlength=num_items + 1)
        counts = np.bincount(items[real], minlength=num_items + 1)
        overall = values[real].mean() if real.any() else 0.0
        means = np.where(counts > 0, sums / np.maximum(counts, 1), overall)
        return RollingAverageValues(torch.as_tensor(means))

    def hidden(self, batch: SequenceBatch) -> torch.Tensor:
        if batch.values is None:
            raise ValueError("RollingAverageValues: the batch has no values")
        real = (batch.items > 0).to(torch.float32)
        seen = real.cumsum(1).clamp(min=1)
        return ((batch.values * real).cumsum(1) / seen).unsqueeze(-1)

    def predict_values(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * (hidden[:, 0] + self.item_means[targets])
