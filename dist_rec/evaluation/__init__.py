"""Evaluation: ranking metrics and the protocols of the papers we compare with.

metrics.py    HR/recall, precision, NDCG, MRR from 0-based ranks; perplexity; TDM multi-target p/r
histories.py  Histories: per-user event arrays (items, times, types; values, contexts when carried)
protocols.py  Ranker (what a model or baseline exposes), ModelRanker, and the protocols:
              session_last_item, session_every_position, user_leave_one_out (+ split_leave_one_out),
              tdm_first_half, next_hour, next_value_rmse
"""
from dist_rec.evaluation.metrics import (hits, multi_target_precision_recall,
                                         ndcg, perplexity, precision, rank_metrics,
                                         reciprocal_rank)
from dist_rec.evaluation.histories import Histories, as_histories
from dist_rec.evaluation.protocols import (ModelRanker, Ranker, next_hour, next_value_rmse,
                                           session_every_position, session_last_item,
                                           split_leave_one_out, tdm_first_half,
                                           user_leave_one_out)

__all__ = ["Histories", "ModelRanker", "Ranker", "as_histories", "hits", "multi_target_precision_recall",
           "ndcg", "next_hour", "next_value_rmse", "perplexity", "precision",
           "rank_metrics", "reciprocal_rank", "session_every_position", "session_last_item",
           "split_leave_one_out", "tdm_first_half", "user_leave_one_out"]
