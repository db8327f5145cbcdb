"""Time gaps change intent: HRNN, which reads the gap to the moment of prediction, beats the
time-blind GRU4Rec, and its top-1 for a fixed history changes with the gap (paper Table 2).

The toy world: items 1..60 in 6 categories of 10 (item i in category (i - 1) // 10). Every user
has two favourite categories. Inside a session the next item is the fixed successor of the
previous one (same category); after a long gap a new session starts in the *other* favourite
category. Which of the two happens is visible only in the gap to the next event.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.evaluation.metrics import ndcg
from dist_rec.evaluation.protocols import ModelRanker
from dist_rec.models import Dimensions, build_model
from tests.models.toy_training import fit

NUM_ITEMS, PER_CATEGORY, STEPS = 60, 10, 16
SHORT, LONG = 3, 14                       # delta buckets: ~8 s and ~2-4 hours
DIMS = Dimensions(num_items=NUM_ITEMS, num_users=1, num_delta_buckets=16, num_event_types=1)


def successor(items: np.ndarray) -> np.ndarray:
    """The next item of a session: a fixed permutation inside each category."""
    category, slot = (items - 1) // PER_CATEGORY, (items - 1) % PER_CATEGORY
    return category * PER_CATEGORY + (3 * slot + 1) % PER_CATEGORY + 1


def sessions(rng: np.random.Generator, rows: int) -> SequenceBatch:
    """(rows, STEPS) windows; a new session (long gap) with probability 0.25 at each step."""
    favourites = np.stack([rng.choice(NUM_ITEMS // PER_CATEGORY, 2, replace=False) for _ in range(rows)])
    current = np.zeros(rows, np.int64)            # index into favourites of the session's category
    items = np.zeros((rows, STEPS + 1), np.int64)
    items[:, 0] = favourites[:, 0] * PER_CATEGORY + rng.integers(1, PER_CATEGORY + 1, rows)
    gaps = np.where(rng.random((rows, STEPS)) < 0.25, LONG, SHORT)
    for t in range(STEPS):
        switch = gaps[:, t] == LONG
        current = np.where(switch, 1 - current, current)
        fresh = favourites[np.arange(rows), current] * PER_CATEGORY + rng.integers(1, PER_CATEGORY + 1, rows)
        items[:, t + 1] = np.where(switch, fresh, successor(items[:, t]))
    starts = np.zeros((rows, STEPS), bool)
    starts[:, 0] = True
    starts[:, 1:] = gaps[:, :-1] == LONG          # input t opens a session if the gap before it was long
    ones = np.ones((rows, STEPS), np.int64)
    return SequenceBatch.from_numpy({"items": items[:, :-1], "targets": items[:, 1:], "deltas": gaps,
                                     "session_starts": starts, "event_types": ones, "target_types": ones,
                                     "users": np.zeros(rows, np.int64)})


@functools.cache
def trained(name: str):
    """Trained once per test session: remembering the other favourite category across a session
    takes HRNN about 1,200 steps here (new-session NDCG@20 0.19 after 900, 0.33 after 1,200)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, embedding_dim=16, hidden_dim=32), DIMS)
    rng = np.random.default_rng(0)
    model, _ = fit(model, [sessions(rng, 64) for _ in range(32)], steps=1500)
    return model


def test_hrnn_beats_time_blind_gru4rec_where_the_gap_changes_intent():
    test = sessions(np.random.default_rng(1), 500)
    mask, switch = test.mask, test.deltas == LONG
    scores = {}
    for name in ("hrnn", "gru4rec"):
        ranks = ModelRanker(trained(name)).step_ranks(test)
        scores[name] = {"all": ndcg(ranks[mask], 20).mean().item(),
                        "new session": ndcg(ranks[mask & switch], 20).mean().item(),
                        "same session": ndcg(ranks[mask & ~switch], 20).mean().item()}
    hrnn, gru = scores["hrnn"], scores["gru4rec"]
    # Inside a session both follow the successor chain. At a new session only HRNN knows the
    # category switches: to the user's other favourite once it has been seen (1 of 10 items),
    # to any other category before (1 of 50). Measured: new session 0.34 vs 0.11, all 0.836 vs 0.781.
    assert hrnn["same session"] > 0.95 and gru["same session"] > 0.95, scores
    assert hrnn["new session"] > gru["new session"] + 0.15, scores
    assert hrnn["all"] > gru["all"] + 0.03, scores


def test_hrnn_top1_for_a_fixed_history_changes_with_the_gap():
    """Paper Table 2: the same history, recommended at different times after its last event."""
    model = trained("hrnn")
    histories = sessions(np.random.default_rng(2), 200)
    last_category = (histories.items[:, -1] - 1) // PER_CATEGORY
    top1 = {}
    for gap in (SHORT, LONG):
        at = SequenceBatch(**{**histories.__dict__, "deltas": histories.deltas.clone()})
        at.deltas[:, -1] = gap                        # the gap from the last event to "now"
        top1[gap] = ModelRanker(model).topk(at, 1)[:, 0]
    changed = (top1[SHORT] != top1[LONG]).float().mean().item()
    stays = {gap: (((items - 1) // PER_CATEGORY) == last_category).float().mean().item()
             for gap, items in top1.items()}
    assert changed > 0.9, changed
    # Soon after: the successor of the last item, in its category. Hours later: another category.
    assert stays[SHORT] > 0.95 and stays[LONG] < 0.1, stays
    assert (top1[SHORT] == torch.as_tensor(successor(histories.items[:, -1].numpy()))).float().mean() > 0.9
