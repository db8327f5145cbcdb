"""Metrics against rankings computed by hand."""
import math

import pytest
import torch

from dist_rec.evaluation.metrics import (hits, multi_target_precision_recall, ndcg, perplexity,
                                         precision, rank_metrics, reciprocal_rank)


def test_single_target_metrics_by_hand():
    ranks = torch.tensor([0, 3, 25])
    out = rank_metrics(ranks, [1, 10, 26], ("hr", "recall", "precision", "ndcg", "mrr"))
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["hr@10"] == pytest.approx(2 / 3)
    assert out["recall@10"] == pytest.approx(2 / 3)
    assert out["hr@26"] == pytest.approx(1.0)          # rank 25 is the 26th place
    assert out["precision@10"] == pytest.approx(2 / 3 / 10)
    assert out["ndcg@1"] == pytest.approx(1 / 3)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert out["ndcg@26"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(27)) / 3)
    assert out["mrr@10"] == pytest.approx((1 + 1 / 4) / 3)
    assert out["mrr@26"] == pytest.approx((1 + 1 / 4 + 1 / 26) / 3)


def test_per_event_values_and_boundaries():
    ranks = torch.tensor([0, 1, 9, 10])
    assert hits(ranks, 10).tolist() == [1.0, 1.0, 1.0, 0.0]       # rank k-1 is in, rank k is out
    assert precision(ranks, 5).tolist() == [0.2, 0.2, 0.0, 0.0]
    assert ndcg(ranks, 10).tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11), 0])
    assert reciprocal_rank(ranks, 10).tolist() == pytest.approx([1.0, 0.5, 0.1, 0.0])


def test_prefix_and_bad_input():
    assert rank_metrics([2], [2], ("hr",), prefix="full_") == {"full_hr@2": 0.0}   # a tie at rank 2
    assert math.isnan(rank_metrics(torch.zeros(0, dtype=torch.int64), [5])["hr@5"])
    with pytest.raises(ValueError, match="non-negative"):
        rank_metrics([-1, 2], [5])
    with pytest.raises(ValueError, match="unknown metric"):
        rank_metrics([1], [5], ("auc",))


def test_perplexity():
    assert perplexity(math.log(1 / 1000)) == pytest.approx(1000)
    assert perplexity(0.0) == 1.0


def test_multi_target_duplicates_kept():
    # Row 0: truth events 3, 3, 7, 5 (+ padding) at ranks 1, 1, 4, 0: 3 of 4 events in the top 3.
    # Row 1: truth 4 at rank 3 and padding whose rank (0 here) must not count.
    ranks = torch.tensor([[1, 1, 4, 0, 0], [3, 0, 0, 0, 0]])
    truth = torch.tensor([[3, 3, 7, 5, 0], [4, 0, 0, 0, 0]])
    p, r = multi_target_precision_recall(ranks, truth, 3)
    assert p.tolist() == pytest.approx([3 / 3, 0.0])
    assert r.tolist() == pytest.approx([3 / 4, 0.0])
    p, r = multi_target_precision_recall(ranks, truth, 4)
    assert p.tolist() == pytest.approx([3 / 4, 1 / 4])
    assert r.tolist() == pytest.approx([3 / 4, 1.0])


def test_multi_target_empty_truth_is_an_error():
    with pytest.raises(ValueError, match="empty ground truth"):
        multi_target_precision_recall(torch.tensor([[1, 2]]), torch.tensor([[0, 0]]), 2)
