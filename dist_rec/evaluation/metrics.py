"""Ranking metrics, vectorised over test events.

Single-target metrics read 0-based ranks: rank = #{other items scored >= the target}, so a tie
with the target counts against it (an all-equal scorer gets rank N-1, never a lucky 0). The
per-event functions return (N,) float64 tensors; `rank_metrics` averages them into a dict.

Multi-target metrics (TDM protocol) read a top-k list and a ground truth of several events.
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


def multi_target_hits(topk_items: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Ground-truth events whose item is in the top-k list, duplicates counted.

    topk_items (B, k) int64 recommended ids (0 = empty slot, never a hit);
    truth (B, M) int64 ground-truth item ids, one column per event, 0 = padding, negative =
    an item no model has a row for (histories.UNKNOWN_ITEM: never a hit)
    -> hits (B,) int64.
    """
    ordered, _ = topk_items.sort(dim=1)
    position = torch.searchsorted(ordered, truth).clamp(max=ordered.shape[1] - 1)
    found = (ordered.gather(1, position) == truth) & (truth > 0)
    return found.sum(1)


def multi_target_precision_recall(topk_items: torch.Tensor, truth: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision@k and recall@k of the TDM protocol, per user.

    Interpretation of "precision@200 = hits/200, recall@200 = hits/len(ground truth)" with
    "duplicates kept" (TDM, KDD 2018, as used by the HRNN paper): the ground truth is the list of
    the user's future *events*, so an item bought twice is two ground-truth entries; hits = number
    of ground-truth events whose item appears in the top k (`multi_target_hits`).
    recall@k = hits / number of ground-truth events, precision@k = hits / k. Because a repeated
    item can hit several times, precision can exceed |top-k ∩ truth items| / k (and, in the
    degenerate case of more repeats than k, exceed 1).

    topk_items (B, k), truth (B, M) 0-padded -> (precision (B,), recall (B,)) float64. Unknown
    items (negative ids) count in the ground truth and are never hit.
    Rows with an empty ground truth are an error: recall is undefined for them.
    """
    sizes = (truth != 0).sum(1)
    if (sizes == 0).any():
        raise ValueError("multi_target_precision_recall: a row has an empty ground truth")
    found = multi_target_hits(topk_items, truth).double()
    return found / topk_items.shape[1], found / sizes.double()
