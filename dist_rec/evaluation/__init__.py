"""Evaluation: ranking metrics and the protocols of the papers we compare with.

metrics.py    HR/recall, precision, NDCG, MRR from 0-based ranks; perplexity; TDM multi-target p/r
protocols.py  Ranker (what a model or baseline exposes), ModelRanker, Histories, and the protocols:
              session_last_item, session_every_position, user_leave_one_out (+ split_leave_one_out),
              tdm_first_half, next_hour
"""
from dist_rec.evaluation.metrics import (hits, multi_target_hits, multi_target_precision_recall,
                                         ndcg, perplexity, precision, rank_metrics,
                                         reciprocal_rank)
from dist_rec.evaluation.protocols import (Histories, ModelRanker, Ranker, as_histories,
                                           next_hour, session_every_position, session_last_item,
                                           split_leave_one_out, tdm_first_half,
                                           user_leave_one_out)

__all__ = ["Histories", "ModelRanker", "Ranker", "as_histories", "hits", "multi_target_hits",
           "multi_target_precision_recall", "ndcg", "next_hour", "perplexity", "precision",
           "rank_metrics", "reciprocal_rank", "session_every_position", "session_last_item",
           "split_leave_one_out", "tdm_first_half", "user_leave_one_out"]
