"""Protocols on tiny hand-made data with a ranker whose ranks are known by heart.

`Successor` scores the 6-item catalog from the row's last input item i: the best item is i+1,
then i+2, ... cyclically, so the rank of item j is (j - i - 1) mod 6, with no ties.
"""
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.data.vocab import UNKNOWN_ITEM
from dist_rec.embeddings.table import ItemTables
from dist_rec.evaluation import protocols
from dist_rec.evaluation.histories import Histories, as_histories
from dist_rec.evaluation.protocols import (ModelRanker, next_hour, session_every_position,
                                           session_last_item, split_leave_one_out,
                                           tdm_first_half, user_leave_one_out)
from dist_rec.config import ModelConfig
from dist_rec.models import Dimensions, build_model
from dist_rec.models.base import NextItemModel
from dist_rec.models.baselines import most_pop

V = 6


def successor_scores(last: torch.Tensor) -> torch.Tensor:
    """last (...,) item ids -> (..., V + 1) scores; column 0 (padding) is never ranked."""
    ranks = (torch.arange(V + 1) - last.unsqueeze(-1) - 1) % V
    scores = (V - ranks).double()
    scores[..., 0] = -math.inf
    return scores


class Successor:
    num_items = V

    def __init__(self):
        self.batches: list[SequenceBatch] = []
        self.candidates: list[torch.Tensor] = []

    def _scores(self, batch):
        self.batches.append(batch)
        return successor_scores(batch.items[:, -1])

    def topk(self, batch, k, exclude=None):
        return self._scores(batch).topk(k, dim=1).indices

    def target_ranks(self, batch, targets, exclude=None):
        scores = self._scores(batch)
        mine = scores.gather(1, targets[:, None])
        if exclude is not None:   # excluded items score -inf, the target keeps its score
            scores = scores.scatter(1, exclude, -math.inf).scatter(1, targets[:, None], mine)
        return (scores >= mine).sum(1) - 1

    def candidate_scores(self, batch, candidates):
        self.candidates.append(candidates)
        return self._scores(batch).gather(1, candidates)

    def target_log_likelihoods(self, batch, targets):
        return successor_scores(batch.items[:, -1]).log_softmax(1).gather(1, targets[:, None])[:, 0]


class CausalSuccessor(Successor):
    def step_ranks(self, batch):
        self.batches.append(batch)
        scores = successor_scores(batch.items)                               # (B, T, V + 1)
        ranks = (scores >= scores.gather(2, batch.targets[..., None])).sum(2) - 1
        return torch.where(batch.mask, ranks, -1)

    def step_log_likelihoods(self, batch):
        logs = successor_scores(batch.items).log_softmax(2).gather(2, batch.targets[..., None])
        return torch.where(batch.mask, logs[..., 0], math.nan)


def successor_perplexity(ranks: list[int]) -> float:
    """The successor's softmax gives a target of rank r the score V - r over scores 1..V."""
    log_partition = math.log(sum(math.exp(score) for score in range(1, V + 1)))
    return math.exp(log_partition - np.mean([V - r for r in ranks]))


def real_inputs(batch: SequenceBatch) -> list[list[int]]:
    return [row[row > 0].tolist() for row in batch.items]


@pytest.fixture
def now_spy(monkeypatch):
    """Records the `now` passed with every batch built by the protocols."""
    seen = []
    real = protocols.history_batch

    def spy(items, timestamps, event_types, now, *args, **kwargs):
        seen.extend(np.asarray(now).tolist())
        return real(items, timestamps, event_types, now, *args, **kwargs)

    monkeypatch.setattr(protocols, "history_batch", spy)
    return seen


def test_session_last_item_by_hand():
    ranker = Successor()
    sessions = [[1, 2, 3], [5, 4], [0, 0, 2, 6, 3], [4]]   # padded row; a 1-item session is skipped
    out = session_last_item(ranker, sessions, ks=[1, 3, 5], batch_size=2, progress=False)
    # inputs [1,2] -> 3: rank 0; [5] -> 4: rank 4; [2,6] -> 3: rank 2
    assert out["count"] == 3
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["hr@3"] == pytest.approx(2 / 3)
    assert out["hr@5"] == pytest.approx(1.0)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert out["mrr@5"] == pytest.approx((1 + 1 / 5 + 1 / 3) / 3)
    assert out["perplexity"] == pytest.approx(successor_perplexity([0, 4, 2]))   # 3.87
    selection = session_last_item(Successor(), sessions, ks=[1, 3, 5], progress=False,
                                  perplexity=False)
    assert selection == {k: v for k, v in out.items() if k != "perplexity"}
    # Batches take the inputs shortest first (stable), each as wide as its longest row.
    assert [real_inputs(b) for b in ranker.batches] == [[[5], [1, 2]], [[2, 6]]]
    assert [b.items.shape[1] for b in ranker.batches] == [2, 2]


def test_session_last_item_truncates_to_last_30_and_keeps_seen_items():
    session = np.arange(40) % V + 1                      # 40 items; the target 4 was seen before
    ranker = Successor()
    out = session_last_item(ranker, [session], ks=[1], progress=False)
    assert real_inputs(ranker.batches[0]) == [session[9:39].tolist()]
    assert ranker.batches[0].items.shape[1] == 30
    assert out["hr@1"] == 1.0                           # 3 -> 4: not excluded although seen


@pytest.mark.parametrize("ranker", [Successor(), CausalSuccessor()], ids=["prefixes", "steps"])
def test_session_every_position_by_hand(ranker):
    out = session_every_position(ranker, [[1, 2, 4], [0, 3, 5], [6]], ks=[1, 2], progress=False)
    # [1] -> 2: rank 0; [1,2] -> 4: rank 1; [3] -> 5: rank 1; averaged over the 3 events
    assert out == pytest.approx({"recall@1": 1 / 3, "recall@2": 1.0, "mrr@1": 1 / 3,
                                 "mrr@2": (1 + 0.5 + 0.5) / 3, "count": 3.0,
                                 "perplexity": successor_perplexity([0, 1, 1])})


def test_session_every_position_truncates_prefixes():
    ranker = CausalSuccessor()   # with max_length the one-pass path does not apply: prefix rows
    session_every_position(ranker, [[1, 2, 3, 4]], max_length=2, progress=False)
    assert real_inputs(ranker.batches[0]) == [[1], [1, 2], [2, 3]]


def test_session_every_position_keeps_to_the_models_positions():
    """SASRec with 5 learned positions, on a session of 8: each prefix reads its last 5 items,
    as a protocol's max_length of 5 would have it (the one-pass path would read 7 and fail)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="sasrec", embedding_dim=8, hidden_dim=8,
                                    options={"max_length": 5}), Dimensions(V, 0, 4, 1))
    sessions = [np.array([1, 2, 3, 4, 5, 6, 1, 2]), np.array([3, 4])]
    got = session_every_position(ModelRanker(model), sessions, ks=[1, 3], progress=False)
    want = session_every_position(ModelRanker(model), sessions, ks=[1, 3], max_length=5, progress=False)
    assert got == pytest.approx(want, rel=1e-6) and got["count"] == 8   # float sums in another order


def histories_for_loo():
    return Histories.from_items([[1, 2, 3, 4], [5, 6], [2, 5, 1]],
                                timestamps=[[10, 20, 30, 40], [1, 2], [7, 8, 9]],
                                users=[11, 12, 13])


def test_split_leave_one_out():
    train, valid, test = split_leave_one_out(histories_for_loo())
    assert [x.tolist() for x in train.items] == [[1, 2], [5, 6], [2]]
    assert train.users.tolist() == [11, 12, 13]
    assert [x.tolist() for x in valid.items] == [[3], [5]]
    assert [x.tolist() for x in test.items] == [[4], [1]]
    assert valid.users.tolist() == test.users.tolist() == [11, 13]
    assert [x.tolist() for x in test.timestamps] == [[40], [9]]


def test_leave_one_out_by_hand(now_spy):
    ranker = Successor()
    out = user_leave_one_out(ranker, histories_for_loo(), ks=[1, 10], num_negatives=100,
                             progress=False)
    # user 11: [1,2,3] -> 4, rank 0; user 13: [2,5] -> 1, rank 1 (6 scores best after 5).
    # The batch takes the users shortest input first.
    assert real_inputs(ranker.batches[0]) == [[2, 5], [1, 2, 3]]
    assert ranker.batches[0].users.tolist() == [13, 11]
    assert now_spy == [9, 40]
    assert out["count"] == 2
    assert out["full_hr@1"] == 0.5
    assert out["full_perplexity"] == pytest.approx(successor_perplexity([0, 1]))
    assert out["full_ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    candidates = ranker.candidates[0]
    assert candidates.shape == (2, 101)
    assert candidates[:, 0].tolist() == [1, 4]
    # Negatives come only from items the user never touched: {3, 4, 6} and {5, 6}.
    assert set(candidates[0, 1:].tolist()) <= {3, 4, 6}
    assert set(candidates[1, 1:].tolist()) <= {5, 6}
    # User 13's target is beaten by exactly the negatives equal to 6; user 11's by none.
    sixes = int((candidates[0, 1:] == 6).sum())
    assert 0 < sixes < 100
    assert out["sampled_hr@1"] == 0.5
    assert out["sampled_mrr@10"] == pytest.approx((1 + (1 / (sixes + 1) if sixes < 10 else 0)) / 2)


def test_leave_one_out_full_ranking_over_unseen_items():
    ranker = Successor()
    out = user_leave_one_out(ranker, [[3, 1, 5, 4]], ks=[3, 101], progress=False)
    # [3, 1, 5] -> 4: after 5 the order is 6, 1, 2, 3, 4, so rank 4 over the catalog; without the
    # user's own 3, 1 and 5 only 6 and 2 compete: rank 2.
    assert out["full_hr@3"] == 0.0
    assert out["full_unseen_hr@3"] == 1.0
    assert out["full_unseen_ndcg@3"] == pytest.approx(1 / math.log2(4))
    # The 100 sampled negatives come from the same unseen items, 2 and 6, and all beat 4.
    assert out["sampled_mrr@101"] == pytest.approx(1 / 101)


def test_leave_one_out_validation_does_not_know_the_test_item():
    """[3, 1, 5, 4, 2]: valid target 4 after [3, 1, 5]; the test item 2 is in its future, so it
    competes in the full ranking over unseen items and can be drawn as a negative."""
    ranker = Successor()
    out = user_leave_one_out(ranker, [[3, 1, 5, 4, 2]], ks=[2, 3], target="valid", progress=False)
    # After 5 the order is 6, 1, 2, 3, 4: without the seen 3, 1 and 5, items 6 and 2 are ahead.
    assert out["full_unseen_hr@2"] == 0.0 and out["full_unseen_mrr@3"] == pytest.approx(1 / 3)
    assert set(ranker.candidates[0][0, 1:].tolist()) == {2, 6}


def test_leave_one_out_sampled_only_skips_the_catalog():
    everything = user_leave_one_out(Successor(), histories_for_loo(), ks=[1, 10], progress=False)
    ranker = Successor()
    sampled = user_leave_one_out(ranker, histories_for_loo(), ks=[1, 10], progress=False,
                                 full_ranking=False)
    assert sampled == {k: v for k, v in everything.items() if not k.startswith("full_")}
    assert len(ranker.batches) == len(ranker.candidates) == 1      # candidate_scores only


def test_leave_one_out_unknown_items_are_misses_never_inputs():
    ranker = Successor()
    out = user_leave_one_out(ranker, [[1, UNKNOWN_ITEM, 2, 3], [1, 2, 3, UNKNOWN_ITEM],
                                      [UNKNOWN_ITEM] * 3], ks=[1, 6, 101, 10**6], progress=False)
    # [1, ?, 2] reads as [1, 2] -> 3: rank 0. The second user's target is unknown, and so is
    # everything of the third: misses in every ranking, even at cutoffs beyond the whole catalog
    # or all 101 candidates.
    assert real_inputs(ranker.batches[0]) == [[], [1, 2], [1, 2, 3]]
    for name in ("sampled_hr@1", "sampled_hr@101", "sampled_hr@1000000", "full_hr@1", "full_hr@6",
                 "full_unseen_hr@6", "full_unseen_ndcg@1000000"):
        assert out[name] == pytest.approx(1 / 3), name
    assert set(ranker.candidates[0][2, 1:].tolist()) <= {4, 5, 6}
    # An unknown target has no probability: perplexity is over the one known target.
    assert out["full_perplexity"] == pytest.approx(successor_perplexity([0]))


def test_tdm_unknown_items_count_in_the_ground_truth_and_never_hit():
    ranker = Successor()
    users = [[1, UNKNOWN_ITEM, 2, 3, 4, 5, UNKNOWN_ITEM, 6, 1, 2],
             [2, 3, 4, 5, 1, UNKNOWN_ITEM, 2, 3, 4, 5]]
    out = tdm_first_half(ranker, users, k=2, num_users=None, progress=False)
    # User 1 reads [1, 2, 3, 4]: top 2 = 5, 6, both in its 5-event truth (one unknown): recall 2/5.
    # User 2 reads [2, 3, 4, 5, 1]: top 2 = 2, 3: recall 2/5; its first truth event is unknown, so
    # NDCG and MRR miss.
    assert sorted(real_inputs(ranker.batches[0])) == [[1, 2, 3, 4], [2, 3, 4, 5, 1]]
    assert out["recall@2"] == pytest.approx(0.4)
    assert out["precision@2"] == pytest.approx(1.0)
    assert out["ndcg@2"] == pytest.approx(0.5)
    assert out["mrr@2"] == pytest.approx(0.5)


def test_leave_one_out_valid_target():
    ranker = Successor()
    out = user_leave_one_out(ranker, histories_for_loo(), ks=[1], target="valid", progress=False)
    # user 11: [1,2] -> 3, rank 0; user 13: [2] -> 5, rank (5-2-1) % 6 = 2
    assert real_inputs(ranker.batches[0]) == [[2], [1, 2]]          # shortest first
    assert out["full_hr@1"] == 0.5
    # User 13: never its target 5 or the seen 2; its test item 1, in the target's future, can be.
    assert set(ranker.candidates[0][0, 1:].tolist()) == {1, 3, 4, 6}


def test_leave_one_out_negatives_uniform_seeded_and_batch_free():
    history = Histories.from_items([np.array([1, 2, 5])])  # allowed negatives: 3, 4, 6
    first, second, third = Successor(), Successor(), Successor()
    user_leave_one_out(first, history, num_negatives=3000, seed=5, progress=False)
    user_leave_one_out(second, history, num_negatives=3000, seed=5, batch_size=1, progress=False)
    user_leave_one_out(third, history, num_negatives=3000, seed=6, progress=False)
    drawn = first.candidates[0][0, 1:]
    assert torch.equal(drawn, second.candidates[0][0, 1:])
    assert not torch.equal(drawn, third.candidates[0][0, 1:])
    counts = np.bincount(drawn.numpy(), minlength=V + 1)
    assert counts[[0, 1, 2, 5]].sum() == 0
    assert chisquare(counts[[3, 4, 6]]).pvalue > 1e-3


def test_leave_one_out_user_sampling_seeded():
    # Ten users whose first item tells them apart; users 3 and 7 have 2 events: 8 qualify.
    items = [[u % V + 1, 1, 2, 3][: 2 if u in (3, 7) else 4] for u in range(10)]

    def first_items(seed):
        ranker = Successor()
        assert user_leave_one_out(ranker, items, max_users=4, seed=seed,
                                  progress=False)["count"] == 4
        return ranker.batches[0].items[:, -3].tolist()

    eligible = np.array([0, 1, 2, 4, 5, 6, 8, 9])
    for seed in (3, 4):
        expected = np.sort(np.random.default_rng(seed).choice(eligible, 4, replace=False))
        assert first_items(seed) == [u % V + 1 for u in expected]


def test_leave_one_out_rejects_out_of_catalog_items():
    with pytest.raises(ValueError, match="outside 1..6"):
        user_leave_one_out(Successor(), [[1, 2, 9]], progress=False)


def tdm_histories() -> Histories:
    # User 0 (10 events, given out of time order), user 1 (11 events), user 2 (9: too few).
    order = np.array([3, 9, 0, 7, 1, 8, 2, 6, 4, 5])
    items0 = np.array([1, 2, 3, 4, 5, 4, 6, 6, 3, 4])[order]
    times0 = (100 + 10 * np.arange(10))[order]
    return Histories.from_items(
        [items0, [2, 2, 2, 2, 1, 3, 5, 5, 1, 6, 1], [1] * 9],
        timestamps=[times0, 1000 + np.arange(11), 2000 + np.arange(9)],
        event_types=[np.ones(10), np.full(11, 2), np.ones(9)], users=[7, 8, 9])


def check_tdm(out):
    # User 0: input 1..5 -> top-3 [6, 1, 2]; truth [4, 6, 6, 3, 4]: 2 hits; first truth 4 missed.
    # User 1: input ends with 1 -> top-3 [2, 3, 4]; truth [3, 5, 5, 1, 6, 1]: 1 hit; 3 at place 1.
    assert out == pytest.approx({
        "precision@3": (2 / 3 + 1 / 3) / 2, "recall@3": (2 / 5 + 1 / 6) / 2, "hr@3": 1.0,
        "ndcg@3": (0 + 1 / math.log2(3)) / 2, "mrr@3": (0 + 1 / 2) / 2, "count": 2.0})


def test_tdm_first_half_by_hand(now_spy):
    ranker = Successor()
    check_tdm(tdm_first_half(ranker, tdm_histories(), k=3, progress=False))
    assert real_inputs(ranker.batches[0]) == [[1, 2, 3, 4, 5], [2, 2, 2, 2, 1]]
    assert now_spy == [150, 1005]                         # first ground-truth timestamps
    assert ranker.batches[0].event_types[1, -1] == 2
    with pytest.raises(ValueError, match=r"ks=\[2, 5\] must be <= k=3"):
        tdm_first_half(ranker, tdm_histories(), k=3, ks=(2, 5), progress=False)


class FixedScores(Successor):
    """The same scores whatever the input: items 1..6 score 5, 4, 4, 3, 3, 1 (ties at 4 and 3)."""

    def _scores(self, batch):
        self.batches.append(batch)
        return torch.tensor([-math.inf, 5, 4, 4, 3, 3, 1]).expand(len(batch.items), -1)


def test_tdm_ties_count_against_the_ground_truth():
    """Input [1, 6], truth [2, 1, 4]. At k = 2, item 2 ties with item 3 at the cut (rank 2 with
    ties against it): a miss whichever of the two a top-k list puts first. At k = 3 it is a
    hit at rank 2; item 4 ties with item 5 at the cut and misses."""
    users = Histories.from_items([[1, 6, 2, 1, 4]], timestamps=[[1, 2, 3, 4, 5]])
    out = tdm_first_half(FixedScores(), users, k=3, ks=(2,), min_events=5, progress=False)
    assert out == pytest.approx({
        "precision@2": 1 / 2, "recall@2": 1 / 3, "hr@2": 1.0, "ndcg@2": 0.0, "mrr@2": 0.0,
        "precision@3": 2 / 3, "recall@3": 2 / 3, "hr@3": 1.0, "ndcg@3": 1 / math.log2(4),
        "mrr@3": 1 / 3, "count": 1.0})
    # A scorer that knows nothing (every item ties) hits nothing, at any k.
    blind = most_pop(V).fit(np.zeros(0, np.int64))
    out = tdm_first_half(blind, users, k=3, ks=(1,), min_events=5, progress=False)
    assert out["recall@3"] == out["recall@1"] == out["ndcg@3"] == out["mrr@3"] == 0.0
    # A catalog no larger than k: every item is in the list, and ranks are still exact.
    out = next_hour(FixedScores(), users, hour_start=3, k=V, progress=False)
    assert out["precision@6"] == pytest.approx(3 / 6) and out["mrr@6"] == pytest.approx(1 / 3)


def test_tdm_first_half_from_table_truncated_and_sampled():
    h = tdm_histories()
    table = pa.table({"user": h.users, "items": [x.tolist() for x in h.items],
                      "timestamps": [x.tolist() for x in h.timestamps],
                      "event_types": [x.tolist() for x in h.event_types]})
    assert [x.tolist() for x in as_histories(table).items] == [x.tolist() for x in h.items]
    check_tdm(tdm_first_half(Successor(), table, k=3, progress=False))
    ranker = Successor()
    tdm_first_half(ranker, table, k=3, max_length=3, progress=False)
    assert real_inputs(ranker.batches[0]) == [[3, 4, 5], [2, 2, 1]]
    picked = np.random.default_rng(1).choice([0, 1], 1, replace=False)[0]
    ranker = Successor()
    assert tdm_first_half(ranker, table, k=3, num_users=1, seed=1, progress=False)["count"] == 1
    assert real_inputs(ranker.batches[0]) == [[[1, 2, 3, 4, 5], [2, 2, 2, 2, 1]][picked]]


def test_protocols_hand_values_and_request_contexts_to_the_model():
    """Events sorted by time carry their values and contexts along; the prediction's context is
    the predicted event's (leave-one-out) or the first ground-truth event's (TDM)."""
    table = pa.table({"user": [1], "items": [[1, 2, 4, 3, 5]], "timestamps": [[0, 1, 3, 2, 4]],
                      "values": pa.array([[0.5, 1.5, 3.5, 2.5, 4.5]], pa.list_(pa.float32())),
                      "contexts": [[1, 2, 4, 3, 1]]})
    ranker = Successor()
    tdm_first_half(ranker, table, k=3, min_events=5, progress=False)
    batch = ranker.batches[0]     # time order 1, 2, 3, 4, 5: input 1, 2; truth 3, 4, 5
    assert real_inputs(batch) == [[1, 2]]
    assert batch.values.tolist() == [[0.5, 1.5]] and batch.target_values.tolist() == [[1.5, 0]]
    assert batch.contexts.tolist() == [[2, 3]]              # event 2's, then the request's (3)
    ranker = Successor()
    user_leave_one_out(ranker, table, num_negatives=2, progress=False)
    assert real_inputs(ranker.batches[0]) == [[1, 2, 4, 3]]  # test = the last line (5)
    assert ranker.batches[0].contexts.tolist() == [[2, 4, 3, 1]]


def test_histories_table_errors():
    with pytest.raises(ValueError, match="missing column 'items'"):
        as_histories(pa.table({"user": [1]}))
    with pytest.raises(ValueError, match="row 0 has 2 items but 1 timestamps"):
        as_histories(pa.table({"user": [1], "items": [[1, 2]], "timestamps": [[5]]}))
    with pytest.raises(ValueError, match="row 1 has item id 0"):
        as_histories(pa.table({"user": [1, 2], "items": [[1, 2], [3, 0]]}))
    with pytest.raises(ValueError, match="row 1 has 1 items but 1 timestamps and 2 event_types"):
        Histories.from_items([[1, 2], [3]], event_types=[[1, 1], [1, 1]])


def test_next_hour_by_hand(now_spy):
    hour = 36_000
    h = Histories.from_items(
        [[3, 2, 1, 3], [4, 5], [1], [4, 5, 1, 2]],
        timestamps=[[hour + 100, 100, hour + 4000, hour + 5], [hour + 1, hour + 2], [7],
                    [hour + 9, 50, 60, hour + 3599]])
    ranker = Successor()
    out = next_hour(ranker, h, hour_start=hour, k=2, progress=False)
    # User 0: [2] -> top-2 [3, 4]; truth [3, 3] (the event of the next hour ignored): 2 hits.
    # User 3: [5, 1] -> top-2 [2, 3]; truth [4, 2]: 1 hit; first truth 4 missed.
    # Users 1 (no history) and 2 (no event in the hour) are skipped.
    assert real_inputs(ranker.batches[0]) == [[2], [5, 1]]
    assert now_spy == [hour + 5, hour + 9]
    assert out == pytest.approx({"precision@2": (1 + 0.5) / 2, "recall@2": (1 + 0.5) / 2,
                                 "hr@2": 1.0, "ndcg@2": 0.5, "mrr@2": 0.5, "count": 2.0})


# --- ModelRanker on a NextItemModel whose scores can be computed by hand ---------------------

class CumulativeEncoder(nn.Module):
    """Causal: hidden[t] = sum of the item vectors up to t (padding vectors are zero)."""

    def forward(self, batch, item_vectors):
        return item_vectors.cumsum(1)


def toy_model(seed=0) -> NextItemModel:
    tables = ItemTables(V, 4, 4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tables.input.weight[1:] = torch.randn(V, 4, generator=generator)
        tables.output.weight.copy_(torch.randn(V + 1, 4, generator=generator))
        tables.bias.weight.copy_(torch.randn(V + 1, 1, generator=generator))
    return NextItemModel(tables, CumulativeEncoder())


def brute_scores(model, inputs) -> torch.Tensor:
    """(B, V + 1) scores of each input list: output rows @ sum of input vectors + bias."""
    t = model.tables
    states = torch.stack([t.input.weight[torch.tensor(x)].sum(0) for x in inputs])
    return (states @ t.output.weight.T + t.bias.weight.T).detach()


def test_model_ranker_matches_brute_force():
    model = toy_model()
    model.train()
    ranker = ModelRanker(model)
    inputs = [[1, 2], [3], [6, 6, 5]]
    batch = protocols.history_batch([np.array(x) for x in inputs],
                                    [np.zeros(len(x)) for x in inputs],
                                    [np.ones(len(x)) for x in inputs], np.zeros(3),
                                    protocols.DataConfig(), 3)
    scores = brute_scores(model, inputs)[:, 1:]
    targets = torch.tensor([4, 1, 6])
    expected = (scores >= scores.gather(1, targets[:, None] - 1)).sum(1) - 1
    assert torch.equal(ranker.target_ranks(batch, targets), expected)
    exclude = torch.tensor([[1, 2, 4], [3, 0, 0], [6, 5, 5]])     # rows 0 and 2 list the target
    kept = torch.ones(3, 7, dtype=torch.bool).scatter(1, exclude, False)[:, 1:]
    kept[torch.arange(3), targets - 1] = True                       # the target always counts
    expected = ((scores >= scores.gather(1, targets[:, None] - 1)) & kept).sum(1) - 1
    assert torch.equal(ranker.target_ranks(batch, targets, exclude), expected)
    assert torch.equal(ranker.topk(batch, 3), scores.topk(3, dim=1).indices + 1)
    excluded = ranker.topk(batch, 3, exclude=torch.tensor([[1, 2], [3, 0], [0, 0]]))
    assert not (excluded[0, :, None] == torch.tensor([1, 2])).any() and 3 not in excluded[1]
    candidates = torch.tensor([[4, 1], [2, 2], [6, 5]])
    assert torch.allclose(ranker.candidate_scores(batch, candidates),
                          scores.gather(1, candidates - 1), atol=1e-5)
    log_likelihoods = ranker.target_log_likelihoods(batch, targets)
    assert log_likelihoods.dtype == torch.float64
    torch.testing.assert_close(log_likelihoods, scores.double().log_softmax(1)
                               .gather(1, targets[:, None] - 1)[:, 0], rtol=0, atol=1e-5)
    assert model.training                                     # mode restored after evaluation


def test_perplexity_of_a_uniform_model_is_the_catalog_size():
    """Equal scores for every item: each target has probability 1/V, whatever the protocol."""
    model = toy_model()
    with torch.no_grad():
        model.tables.output.weight.zero_()
        model.tables.bias.weight.zero_()
    sessions = [[1, 2, 4, 3], [5, 6], [2, 2, 2, 6, 1]]
    ranker = ModelRanker(model)
    assert session_last_item(ranker, sessions, progress=False)["perplexity"] == pytest.approx(V)
    assert session_every_position(ranker, sessions, progress=False)["perplexity"] == \
        pytest.approx(V)
    assert user_leave_one_out(ranker, sessions, progress=False)["full_perplexity"] == \
        pytest.approx(V)


def test_model_ranker_ties_count_against_target():
    model = toy_model()
    with torch.no_grad():
        model.tables.input.weight[1] = 0.0         # hidden 0 after item 1: scores = bias, exactly
        model.tables.bias.weight[:, 0] = torch.tensor([0.0, 0.9, 0.5, 0.5, 0.1, 0.5, 0.7])
        model.tables.output.weight[[2, 5]] = model.tables.output.weight[3].clone()
    ranker = ModelRanker(model)
    batch = protocols.history_batch([np.array([1])], [np.zeros(1)], [np.ones(1)], np.zeros(1),
                                    protocols.DataConfig(), 1)
    # Item 3 is beaten by 1 and 6 and tied with 2 and 5: rank 4, not 2.
    assert ranker.target_ranks(batch, torch.tensor([3])).item() == 4
    # Sampled: the only allowed negatives, 2 and 5, have item 3's output row and bias: all ties.
    out = user_leave_one_out(ranker, [[1, 4, 6, 3, 1, 3]], ks=[1, 100, 101], progress=False)
    assert (out["sampled_hr@1"], out["sampled_hr@100"], out["sampled_hr@101"]) == (0.0, 0.0, 1.0)


def test_model_ranker_one_pass_equals_prefixes():
    model = toy_model(seed=3)
    sessions = [[1, 2, 4, 3], [5, 6], [2, 2, 2, 6, 1]]
    one_pass = session_every_position(ModelRanker(model), sessions, ks=[1, 2, 3], progress=False)

    class PrefixOnly(ModelRanker):
        step_ranks = None
    by_prefix = session_every_position(PrefixOnly(model), sessions, ks=[1, 2, 3], progress=False)
    assert one_pass == pytest.approx(by_prefix, rel=1e-6)    # perplexity: float rounding apart
    assert {k: v for k, v in one_pass.items() if k != "perplexity"} == \
        {k: v for k, v in by_prefix.items() if k != "perplexity"}
    scores = [brute_scores(model, [x[:t]])[0, 1:].double() for x in sessions for t in range(1, len(x))]
    targets = [x[t] - 1 for x in sessions for t in range(1, len(x))]
    ranks = [(s >= s[t]).sum().item() - 1 for s, t in zip(scores, targets)]
    assert one_pass["count"] == 8
    assert one_pass["recall@2"] == pytest.approx(np.mean(np.array(ranks) < 2))
    log_likelihoods = [s.log_softmax(0)[t].item() for s, t in zip(scores, targets)]
    assert one_pass["perplexity"] == pytest.approx(math.exp(-np.mean(log_likelihoods)), rel=1e-5)


class NextItemIdAsValue(nn.Module):
    """A value head that predicts each next event's value as the next item's id."""

    predicts_values = True

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))   # where the protocol puts the batches

    def hidden(self, batch: SequenceBatch) -> torch.Tensor:
        return torch.zeros(*batch.items.shape, 1)

    def predict_values(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return targets.double()


def test_next_value_rmse_by_hand():
    table = pa.table({"user": [1, 2, 3], "items": [[1, 2, 3], [4, 1], [2, 2, 2, 5]],
                      "values": pa.array([[0.5, 2.5, 2.0], [1, 3], [9, 9, 1, 4]],
                                         pa.list_(pa.float32()))})
    # Predicted = next item id. User 1: 2 vs 2.5, 3 vs 2.0; user 2: 1 vs 3; user 3 keeps its
    # last 3 events (max_length), so 2 vs 1 and 5 vs 4: squared errors .25 + 1 + 4 + 1 + 1.
    result = protocols.next_value_rmse(NextItemIdAsValue(), table, max_length=3)
    assert result == {"rmse": pytest.approx(math.sqrt(7.25 / 5)), "count": 5.0}
    with pytest.raises(ValueError, match="carry no values"):
        protocols.next_value_rmse(NextItemIdAsValue(), table.drop_columns(["values"]))
