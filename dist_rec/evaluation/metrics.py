"""Ranking metrics, vectorised over test events.

Single-target metrics read 0-based ranks: rank = #{other items scored >= the target}, so a tie
with the target counts against it (an all-equal scorer gets rank N-1, never a lucky 0). The
per-event functions return (N,) float64 tensors; `rank_metrics` averages them into a dict.

Multi-target metrics (TDM protocol) read the ranks of a ground truth of several events.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

# The rank of a target no model can score (an item unknown to the vocabulary): a miss at any k.
NEVER_RANKED = torch.iinfo(torch.int64).max


def _ranks(ranks) -> torch.Tensor:
    ranks = torch.as_tensor(ranks)
    if ranks.dtype.is_floating_point or (ranks < 0).any():
        raise ValueError("ranks must be non-negative integers (0 = target scored best)")
    return ranks


def hits(ranks, k: int) -> torch.Tensor:
    """ranks (N,) -> (N,) 1.0 where the target is in the top k. Mean = HR@k = recall@k."""
    return (_ranks(ranks) < k).double()


def precision(ranks, k: int) -> torch.Tensor:
    """ranks (N,) -> (N,) hit / k: precision@k with one relevant item per event."""
    return hits(ranks, k) / k


def ndcg(ranks, k: int) -> torch.Tensor:
    """ranks (N,) -> (N,) 1 / log2(rank + 2) for hits, 0 otherwise (one relevant item: IDCG = 1)."""
    ranks = _ranks(ranks)
    return torch.where(ranks < k, 1.0 / torch.log2(ranks.double() + 2), 0.0).double()


def reciprocal_rank(ranks, k: int) -> torch.Tensor:
    """ranks (N,) -> (N,) 1 / (rank + 1) for hits, 0 otherwise. Mean = MRR@k."""
    ranks = _ranks(ranks)
    return torch.where(ranks < k, 1.0 / (ranks.double() + 1), 0.0).double()


_RANK_METRICS = {"hr": hits, "recall": hits, "precision": precision, "ndcg": ndcg,
                 "mrr": reciprocal_rank}


def rank_metrics(ranks, ks: Iterable[int], names: Iterable[str] = ("hr", "ndcg", "mrr"),
                 prefix: str = "") -> dict[str, float]:
    """ranks (N,) -> {f"{prefix}{name}@{k}": mean over the N events}; names from
    hr, recall, precision, ndcg, mrr. An empty `ranks` gives NaN."""
    ranks = _ranks(ranks)
    out = {}
    for name in names:
        if name not in _RANK_METRICS:
            raise ValueError(f"unknown metric {name!r}; known: {sorted(_RANK_METRICS)}")
        for k in ks:
            values = _RANK_METRICS[name](ranks, k)
            out[f"{prefix}{name}@{k}"] = values.mean().item() if len(values) else math.nan
    return out


def perplexity(mean_log_likelihood: float) -> float:
    """exp(-mean natural-log likelihood of the targets); a uniform model over N items gives N."""
    return math.exp(-float(mean_log_likelihood))


def multi_target_precision_recall(ranks: torch.Tensor, truth: torch.Tensor, k: int
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision@k and recall@k of the TDM protocol, per user.

    Interpretation of "precision@200 = hits/200, recall@200 = hits/len(ground truth)" with
    "duplicates kept" (TDM, KDD 2018, as used by the HRNN paper): the ground truth is the list of
    the user's future *events*, so an item bought twice is two ground-truth entries; hits = number
    of ground-truth events whose item ranks in the top k. recall@k = hits / number of ground-truth
    events, precision@k = hits / k. Because a repeated item can hit several times, precision can
    exceed |top-k ∩ truth items| / k (and, in the degenerate case of more repeats than k, exceed 1).

    ranks (B, M) int64 0-based rank of each ground-truth event's item, ties counted against it;
    truth (B, M) int64 ids, one column per event, 0 = padding (its rank is ignored), negative = an
    item no model has a row for (give it a rank >= k) -> (precision (B,), recall (B,)) float64.
    Rows with an empty ground truth are an error: recall is undefined for them.
    """
    sizes = (truth != 0).sum(1)
    if (sizes == 0).any():
        raise ValueError("multi_target_precision_recall: a row has an empty ground truth")
    found = ((_ranks(ranks) < k) & (truth != 0)).sum(1).double()
    return found / k, found / sizes.double()
