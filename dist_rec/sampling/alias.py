"""Vose's alias method: a vectorised O(n) build and O(1) draws in torch from an explicit Generator.

The table has one column per item. Column i keeps item i with probability prob[i] and otherwise
yields alias[i]; a draw picks a column uniformly and flips one biased coin, so its cost does not
depend on the catalog size (torch.multinomial and a CDF search pay O(log n) per draw).

The build reproduces the sequential Vose pairing without a Python loop. Scale the weights to mean 1;
items below 1 ("small") have a deficit 1 - p, items above ("large") an excess p - 1. The greedy
order gives small k to the first large whose cumulative excess covers the cumulative deficit before
k; a large whose excess runs out becomes small itself and is aliased to the next large. Both are
one cumulative sum and one `searchsorted`, so 1M items build in a fraction of a second.
"""
from __future__ import annotations

import numpy as np
import torch

# Draws per chunk on CPU: under torch's 32768-element grain, so every op of a chunk runs on the
# calling thread and its temporaries stay in cache. The draws are random gathers; spreading them
# over threads lost more to thread synchronisation than it gained on the shared 2-core machine
# (2^20 draws on 2 threads: 21M/s in one piece, 33M/s in chunks; equal on 1 thread).
_CPU_CHUNK = 2 ** 14


class AliasSampler:
    """Draws item ids i with probability weights[i] / sum(weights); zero-weight ids are never drawn.

    The table is one (n, 2) int32 tensor, row i = (prob[i]'s float32 bits, alias[i]), so a draw
    reads one 8-byte entry instead of two 4-byte ones from two tables (one cache miss, not two).
    `prob` (n,) float32 and `alias` (n,) int32 are views of it; log_q (n,) float32 lives on the
    same device.
    """

    def __init__(self, prob: torch.Tensor, alias: torch.Tensor, log_q: torch.Tensor,
                 alpha: float = 1.0):
        self.table = torch.stack([prob.to(torch.float32).view(torch.int32), alias.to(torch.int32)], 1)
        self.log_q, self.alpha = log_q, alpha

    @property
    def prob(self) -> torch.Tensor:
        return self.table[:, 0].view(torch.float32)

    @property
    def alias(self) -> torch.Tensor:
        return self.table[:, 1]

    @classmethod
    def from_weights(cls, weights: np.ndarray | torch.Tensor) -> "AliasSampler":
        """weights (n,) finite, >= 0, not all zero: index i is drawn w.p. weights[i] / sum."""
        w = _checked(weights, "weights")
        if not w.any():
            raise ValueError("alias sampler: all weights are zero; nothing can be drawn")
        prob, alias = _vose(w)
        with np.errstate(divide="ignore"):
            log_q = np.log(w) - np.log(w.sum())
        return cls(torch.from_numpy(prob), torch.from_numpy(alias.astype(np.int32)),
                   torch.from_numpy(log_q.astype(np.float32)))

    @classmethod
    def from_counts(cls, counts: np.ndarray | torch.Tensor, alpha: float = 0.75) -> "AliasSampler":
        """counts (C,) per dense item id -> q ∝ count^alpha over items with count > 0.

        Row 0 is padding and always gets weight 0; alpha = 0 is uniform over the seen items.
        """
        c = _checked(counts, "counts")
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alias sampler: alpha must be finite and >= 0, got {alpha}")
        weights = np.zeros_like(c)
        seen = c > 0
        seen[0] = False
        weights[seen] = c[seen] ** alpha
        if not weights.any():
            raise ValueError("alias sampler: no item (ids >= 1) has a positive count")
        sampler = cls.from_weights(weights)
        sampler.alpha = float(alpha)
        return sampler

    def rebuild(self, counts: np.ndarray | torch.Tensor) -> None:
        """Replace the table in place from new counts (same alpha, same device); C may grow."""
        fresh = AliasSampler.from_counts(counts, self.alpha).to(self.device)
        self.table, self.log_q = fresh.table, fresh.log_q

    @property
    def num_items(self) -> int:
        return self.table.shape[0]

    @property
    def device(self) -> torch.device:
        return self.table.device

    def sample(self, num: int, generator: torch.Generator) -> torch.Tensor:
        """-> (num,) int64 ids on the sampler's device; the generator must live there too."""
        if self.device.type != "cpu" or num <= _CPU_CHUNK:
            return self._draw(num, generator)
        return torch.cat([self._draw(min(_CPU_CHUNK, num - start), generator)
                          for start in range(0, num, _CPU_CHUNK)])

    def _draw(self, num: int, generator: torch.Generator) -> torch.Tensor:
        """-> (num,) int64: a uniform column per draw, kept or swapped for its alias by a coin."""
        columns = torch.randint(self.num_items, (num,), generator=generator, device=self.device)
        coins = torch.rand(num, generator=generator, device=self.device)
        # One int64 gather fetches both halves of each row (index_select is markedly faster than
        # advanced indexing for a 1-D gather on CPU).
        entries = self.table.view(torch.int64).squeeze(1).index_select(0, columns).view(torch.int32)
        keep = coins < entries[0::2].view(torch.float32)
        return torch.where(keep, columns, entries[1::2], out=columns)

    def to(self, device: torch.device | str) -> "AliasSampler":
        return AliasSampler(self.prob.to(device), self.alias.to(device), self.log_q.to(device),
                            self.alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors, copies rather than views of the table: torch.load(weights_only=True) works."""
        return {"prob": self.prob.contiguous(), "alias": self.alias.contiguous(), "log_q": self.log_q,
                "alpha": torch.tensor(self.alpha, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"prob", "alias", "log_q", "alpha"} - set(state)
        if missing:
            raise ValueError(f"alias sampler state: missing {sorted(missing)}")
        sizes = {state[k].shape for k in ("prob", "alias", "log_q")}
        if len(sizes) != 1 or len(sizes.pop()) != 1:
            raise ValueError("alias sampler state: prob, alias and log_q must be 1-D of one length")
        restored = AliasSampler(state["prob"].to(self.device), state["alias"].to(self.device),
                                state["log_q"].to(self.device, torch.float32))
        self.table, self.log_q = restored.table, restored.log_q
        self.alpha = float(state["alpha"])


def _checked(values: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """-> float64 numpy copy of a 1-D, finite, non-negative, non-empty vector, or ValueError."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"alias sampler: {name} must be a non-empty 1-D vector, "
                         f"got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array) | (array < 0))
    if bad.size:
        raise ValueError(f"alias sampler: {name}[{bad[0]}] = {array[bad[0]]} "
                         f"({bad.size} bad entries); must be finite and >= 0")
    return array.copy()


def _vose(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weights (n,) float64 -> (prob (n,) float32, alias (n,) int64)."""
    n = weights.shape[0]
    scaled = weights * (n / weights.sum())
    small = np.flatnonzero(scaled < 1.0)
    large = np.flatnonzero(scaled >= 1.0)
    prob = np.ones(n)
    alias = np.arange(n)
    if small.size == 0:  # exactly uniform
        return prob.astype(np.float32), alias

    deficit = 1.0 - scaled[small]
    owed = np.concatenate([[0.0], np.cumsum(deficit)])  # owed[k]: deficit of smalls before k
    covered = np.cumsum(scaled[large] - 1.0)             # excess of larges 0..j
    # Small k goes to the first large whose cumulative excess reaches owed[k]. Rounding can
    # leave the last few smalls past the end; they go to the last large (error ~ 1e-12).
    owner = np.minimum(np.searchsorted(covered, owed[:-1], side="left"), large.size - 1)
    prob[small] = scaled[small]
    alias[small] = large[owner]

    # Large j serves the smalls with owed <= covered[j]; what they took beyond its excess is its
    # overflow, paid by large j + 1. Its own column keeps 1 - overflow.
    served = np.searchsorted(owed[:-1], covered, side="right")
    overflow = owed[served] - covered
    spill = overflow[:-1] > 0  # the last large absorbs the rounding and keeps prob 1
    spilling = large[:-1][spill]
    prob[spilling] = np.clip(1.0 - overflow[:-1][spill], 0.0, 1.0)
    alias[spilling] = large[1:][spill]
    return prob.astype(np.float32), alias
