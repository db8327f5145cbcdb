"""Item popularity estimators: global, sliding hour window, exponentially decayed, streaming.

Every estimator takes events as dense item ids (1..num_items, 0 = padding) with timestamps in
seconds (or steps, for the streaming one), numpy or torch, and answers
    counts(now)         (num_items + 1,) float64, row 0 = 0
    probabilities(now)  the same normalised to sum 1 (optional pseudo-count smoothing)
    log_q(now)          torch float32 log-probabilities, -inf where zero
The log-probabilities feed the sampled-softmax log-Q correction and popularity debiasing (inverse
propensity weights, item-trend decomposition: HRNN paper sec. 3.2). Catalog growth: `grow(n)`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

HOUR = 3600


class Popularity(ABC):
    """Shared parts; each estimator implements `update`, `counts` and `_grow`."""

    def __init__(self, num_items: int):
        self.num_items = num_items

    @abstractmethod
    def counts(self, now: float | None = None) -> np.ndarray:
        """(num_items + 1,) float64 popularity at `now`; row 0 = 0."""

    def grow(self, num_items: int) -> None:
        """Append zero rows for new item ids (the vocabulary only grows)."""
        if num_items < self.num_items:
            raise ValueError(f"popularity: cannot shrink from {self.num_items} to {num_items} items")
        self._grow(num_items - self.num_items)
        self.num_items = num_items

    @abstractmethod
    def _grow(self, extra: int) -> None:
        """Make room for `extra` new item ids at the end."""

    def probabilities(self, now: float | None = None, smoothing: float = 0.0) -> np.ndarray:
        """(num_items + 1,) float64: (counts + smoothing) normalised over ids >= 1; row 0 = 0."""
        mass = self.counts(now) + smoothing
        mass[0] = 0.0
        total = mass.sum()
        if total <= 0:
            raise ValueError("popularity: no events (and no smoothing) to normalise")
        return mass / total

    def log_q(self, now: float | None = None, smoothing: float = 0.0) -> torch.Tensor:
        """(num_items + 1,) float32 log-probabilities; -inf for padding and never-seen items."""
        with np.errstate(divide="ignore"):
            return torch.from_numpy(np.log(self.probabilities(now, smoothing)).astype(np.float32))

    def _ids(self, items: np.ndarray | torch.Tensor) -> np.ndarray:
        ids = _numpy(items).astype(np.int64, copy=False).ravel()
        if ids.size and (ids.min() < 1 or ids.max() > self.num_items):
            bad = ids[(ids < 1) | (ids > self.num_items)][0]
            raise ValueError(f"popularity: item id {bad} outside 1..{self.num_items} "
                             f"(padding 0 must be dropped; call grow() for new items)")
        return ids


class GlobalCounts(Popularity):
    """Event counts over everything seen; `now` is ignored."""

    def __init__(self, num_items: int):
        super().__init__(num_items)
        self._counts = np.zeros(num_items + 1)

    def update(self, items: np.ndarray | torch.Tensor, timestamps=None) -> None:
        self._counts += np.bincount(self._ids(items), minlength=self.num_items + 1)

    def counts(self, now: float | None = None) -> np.ndarray:
        return self._counts.copy()

    def _grow(self, extra: int) -> None:
        self._counts = np.concatenate([self._counts, np.zeros(extra)])


class WindowCounts(Popularity):
    """Counts over the last `hours` whole hours, bucketed by hour index floor(t / 3600).

    counts(now) sums the buckets h with hour(now) - hours < h <= hour(now), i.e. the hour that
    contains `now` and the hours before it (events later than `now` inside that hour count too:
    hour granularity). `now=None` means the latest hour seen. Buckets that fall out of the window
    of the latest hour are dropped, so memory is `hours` arrays of num_items + 1.
    """

    def __init__(self, num_items: int, hours: int):
        super().__init__(num_items)
        if hours < 1:
            raise ValueError(f"popularity window: hours must be >= 1, got {hours}")
        self.hours = hours
        self._buckets: dict[int, np.ndarray] = {}

    def update(self, items: np.ndarray | torch.Tensor, timestamps: np.ndarray | torch.Tensor) -> None:
        ids = self._ids(items)
        hours = np.floor_divide(_numpy(timestamps).astype(np.int64).ravel(), HOUR)
        if hours.shape != ids.shape:
            raise ValueError(f"popularity: {ids.size} items but {hours.size} timestamps")
        if not hours.size:
            return
        latest = max([*self._buckets, int(hours.max())])
        recent = hours > latest - self.hours
        order = np.argsort(hours[recent], kind="stable")
        distinct, starts = np.unique(hours[recent][order], return_index=True)
        for hour, chunk in zip(distinct, np.split(ids[recent][order], starts[1:])):
            counts = np.bincount(chunk, minlength=self.num_items + 1).astype(np.float64)
            self._buckets[int(hour)] = self._buckets.get(int(hour), 0) + counts
        for hour in [h for h in self._buckets if h <= latest - self.hours]:
            del self._buckets[hour]

    def counts(self, now: float | None = None) -> np.ndarray:
        if now is None:
            current = max(self._buckets, default=0)
        else:
            current = int(now) // HOUR
        total = np.zeros(self.num_items + 1)
        for hour, counts in self._buckets.items():
            if current - self.hours < hour <= current:
                total += counts
        return total

    def _grow(self, extra: int) -> None:
        for hour, counts in self._buckets.items():
            self._buckets[hour] = np.concatenate([counts, np.zeros(extra)])


class DecayedCounts(Popularity):
    """Exponentially decayed counts: an event at time s weighs 2^(-(now - s) / half_life) at now.

    Kept as counts at a reference time (the latest event) so an update costs one pass over the
    catalog plus a bincount; counts(now) scales them to `now` (now >= the latest event).
    """

    def __init__(self, num_items: int, half_life_hours: float):
        super().__init__(num_items)
        if not half_life_hours > 0:
            raise ValueError(f"popularity decay: half_life_hours must be > 0, got {half_life_hours}")
        self.half_life = half_life_hours * HOUR
        self.reference = None
        self._counts = np.zeros(num_items + 1)

    def update(self, items: np.ndarray | torch.Tensor, timestamps: np.ndarray | torch.Tensor) -> None:
        ids = self._ids(items)
        times = _numpy(timestamps).astype(np.float64).ravel()
        if times.shape != ids.shape:
            raise ValueError(f"popularity: {ids.size} items but {times.size} timestamps")
        if not times.size:
            return
        reference = times.max() if self.reference is None else max(self.reference, times.max())
        if self.reference is not None:
            self._counts *= self._decay(reference - self.reference)
        self._counts += np.bincount(ids, weights=self._decay(reference - times),
                                    minlength=self.num_items + 1)
        self.reference = reference

    def counts(self, now: float | None = None) -> np.ndarray:
        if self.reference is None or now is None:
            return self._counts.copy()
        if now < self.reference:
            raise ValueError(f"popularity decay: now={now} is before the latest event "
                             f"{self.reference}; later events would be counted")
        return self._counts * self._decay(now - self.reference)

    def _decay(self, elapsed: np.ndarray | float) -> np.ndarray | float:
        return np.exp2(-np.asarray(elapsed) / self.half_life)

    def _grow(self, extra: int) -> None:
        self._counts = np.concatenate([self._counts, np.zeros(extra)])


class StreamingFrequency(Popularity):
    """Yi et al., RecSys 2019 ("Sampling-bias-corrected neural modeling"), Algorithm 1.

    Per hash bucket: A = the last step the bucket was seen, B = a moving average of the gap between
    sightings, B <- (1 - a) B + a (t - A); the estimate is q = 1 / B, the probability that the item
    appears in a step. A step is whatever the caller counts (a batch, or one event: then q -> the
    item's event frequency). Steps must be > start_step; duplicates within a step count once, and
    a sighting at or before the bucket's last step is ignored. Events are applied in step order,
    exactly as the sequential algorithm would, but vectorised. One deviation, for a usable
    start: the first sighting sets B to its gap (from `start_step`, or from the step the catalog
    grew) instead of averaging it with B = 0. Never-seen buckets give q = 0. `now` is ignored.
    """

    def __init__(self, num_items: int, learning_rate: float = 0.01,
                 num_buckets: int | None = None, start_step: int = 0):
        super().__init__(num_items)
        if not 0 < learning_rate <= 1:
            raise ValueError(f"streaming frequency: learning_rate must be in (0, 1], got {learning_rate}")
        self.learning_rate = learning_rate
        # Without num_buckets the hash is the identity: one bucket per id, no collisions.
        self.hashed = num_buckets is not None
        size = num_buckets if self.hashed else num_items + 1
        self.step = float(start_step)  # the latest step seen
        self.last_step = np.full(size, self.step)
        self.gap = np.zeros(size)
        self.seen = np.zeros(size, dtype=bool)

    def buckets(self, ids: np.ndarray) -> np.ndarray:
        """ids (M,) -> hash bucket of each (M,)."""
        if not self.hashed:
            return ids
        # Fibonacci hashing spreads consecutive dense ids over the buckets.
        mixed = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return (mixed % np.uint64(self.gap.size)).astype(np.int64)

    def update(self, items: np.ndarray | torch.Tensor, steps: np.ndarray | torch.Tensor) -> None:
        ids = self._ids(items)
        steps = _numpy(steps).astype(np.float64).ravel()
        if steps.shape != ids.shape:
            raise ValueError(f"streaming frequency: {ids.size} items but {steps.size} steps")
        if not ids.size:
            return
        # One sighting per (bucket, step), sorted by bucket, then step.
        buckets = self.buckets(ids)
        order = np.lexsort((steps, buckets))
        buckets, steps = buckets[order], steps[order]
        distinct = np.r_[True, (buckets[1:] != buckets[:-1]) | (steps[1:] != steps[:-1])]
        buckets, steps = buckets[distinct], steps[distinct]
        # A step split across calls, or a late event, was already counted: gaps must be > 0.
        fresh = steps > self.last_step[buckets]
        buckets, steps = buckets[fresh], steps[fresh]
        if not buckets.size:
            return
        first = np.r_[True, buckets[1:] != buckets[:-1]]
        gaps = steps - np.where(first, self.last_step[buckets], np.r_[0.0, steps[:-1]])
        # A run of k sightings of one bucket unrolls to B_k = (1-a)^k B_0 + sum_j a (1-a)^(k-j) g_j;
        # for a never-seen bucket B_0 = 0 and its first gap enters with weight 1 instead of a.
        run = np.cumsum(first) - 1
        starts = np.flatnonzero(first)
        ends = np.r_[starts[1:], buckets.size]
        later = ends[run] - 1 - np.arange(buckets.size)  # sightings after this one in its run
        keep = 1.0 - self.learning_rate
        opening = first & ~self.seen[buckets]
        share = np.where(opening, 1.0, self.learning_rate) * keep ** later
        touched = buckets[starts]
        self.gap[touched] = (self.gap[touched] * keep ** (ends - starts)
                             + np.bincount(run, weights=share * gaps, minlength=starts.size))
        self.last_step[touched] = steps[ends - 1]
        self.seen[touched] = True
        self.step = max(self.step, steps.max())

    def counts(self, now: float | None = None) -> np.ndarray:
        buckets = self.buckets(np.arange(self.num_items + 1))
        gap = self.gap[buckets]
        q = np.zeros_like(gap)
        np.divide(1.0, gap, out=q, where=self.seen[buckets] & (gap > 0))
        q[0] = 0.0
        return q

    def _grow(self, extra: int) -> None:
        if not self.hashed:  # new ids enter the stream now
            self.last_step = np.concatenate([self.last_step, np.full(extra, self.step)])
            self.gap = np.concatenate([self.gap, np.zeros(extra)])
            self.seen = np.concatenate([self.seen, np.zeros(extra, dtype=bool)])


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
