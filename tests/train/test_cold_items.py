"""Cold items on the product path: an item catalog -> prepare -> the model's ranking.

The world: every user keeps to one category. Users with fewer than 10 events train; users with
10+ are all held out for the TDM test, and the second half of each test history is on items that
no training user touched (in the catalog, with their category). HRNN-meta (lambda = 1 for cold
items, paper sec. 2.3 and Table 7) ranks them from their category; plain HRNN has only untrained
rows for them and leaves them out.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dist_rec.config import DataConfig, ModelConfig
from dist_rec.data.prepare import prepare
from dist_rec.data.sequences import windows_to_batch
from dist_rec.evaluation.protocols import ModelRanker, tdm_first_half
from dist_rec.models import build_model
from dist_rec.train import loop
from tests.models.toy_training import fit

CATEGORIES, WARM, COLD = 6, 12, 4            # items per category: raw id 100 c + j
TRAIN_USERS, TEST_USERS = 600, 60


def item_ids(category: int, cold: bool) -> np.ndarray:
    first = 100 * category + (WARM if cold else 0)
    return np.arange(first, first + (COLD if cold else WARM))


def write_world(directory) -> None:
    """events.parquet (training users: 9 events on their category's warm items; test users: 6 on
    warm items, then 6 on cold ones) and catalog.parquet (every item, its category)."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(1, TRAIN_USERS + TEST_USERS + 1):
        category = user % CATEGORIES
        test = user > TRAIN_USERS
        items = rng.choice(item_ids(category, cold=False), 6 if test else 9)
        if test:
            items = np.concatenate([items, rng.choice(item_ids(category, cold=True), 6)])
        rows += [(user, int(item), t, category + 1) for t, item in enumerate(items)]
    users, items, times, categories = map(np.array, zip(*rows))
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times,
                             "event_type": ["pv"] * len(users), "category_id": categories}),
                   directory / "events.parquet")
    every = np.concatenate([item_ids(c, cold) for c in range(CATEGORIES) for cold in (False, True)])
    pq.write_table(pa.table({"item_id": every, "category_id": every // 100 + 1}),
                   directory / "catalog.parquet")


def prepared_world(tmp_path):
    write_world(tmp_path)
    config = DataConfig(events_uri=str(tmp_path / "events.parquet"), window_length=8,
                        item_catalog_uri=str(tmp_path / "catalog.parquet"))
    return config, prepare(config, str(tmp_path / "prepared"), test_users=TEST_USERS, seed=0)


def test_catalog_items_without_events_join_the_vocabulary_as_cold_items(tmp_path):
    config, prepared = prepared_world(tmp_path)
    vocab = prepared.vocabulary()
    warm = np.concatenate([item_ids(c, cold=False) for c in range(CATEGORIES)])
    cold = np.concatenate([item_ids(c, cold=True) for c in range(CATEGORIES)])
    # The items with training events first, then the cold ones in ascending raw id.
    assert vocab.items.raw_ids.tolist() == sorted(warm) + sorted(cold)
    assert prepared.cold_items.tolist() == [False] * (1 + len(warm)) + [True] * len(cold)
    assert prepared.item_counts[1 + len(warm):].sum() == 0
    # Their category comes from the catalog (codes 1..6 for categories 1..6).
    assert prepared.item_features[1:, 0].tolist() == (vocab.items.raw_ids // 100 + 1).tolist()
    # A test user's events on them keep their ids: the TDM ground truth a model can hit.
    second_halves = [items[6:] for items in prepared.test_histories()["items"].to_pylist()]
    assert set(np.concatenate(second_halves)) == set(vocab.items.encode(cold))


def train(config, prepared, name):
    windows = pq.read_table(prepared.uri + "/windows")
    batches = [windows_to_batch(windows.slice(start, 64))
               for start in range(0, windows.num_rows, 64)]
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, embedding_dim=16, hidden_dim=16), prepared.dimensions)
    loop.load_item_data(model, prepared)
    return fit(model, batches, loss="sampled_softmax", steps=300)[0]


def test_hrnn_meta_ranks_cold_items_from_their_category_and_hrnn_leaves_them_out(tmp_path):
    config, prepared = prepared_world(tmp_path)
    histories = prepared.test_histories()

    def recall(model) -> float:
        # The second halves are all cold: 6 events on the user's category's 4 cold items.
        return tdm_first_half(ModelRanker(model), histories, k=20, num_users=None,
                              data_config=config, progress=False)["recall@20"]

    meta, plain = train(config, prepared, "hrnn_meta"), train(config, prepared, "hrnn")
    # Top 20 of 96 items: the category's 16 items fit; a random ranking finds 20/96 of them.
    assert recall(meta) > 0.9
    assert recall(plain) == 0.0      # not one cold item in any top 20


def test_a_cold_row_never_outranks_a_trained_one_whatever_its_weights():
    """Plain models: a cold item's row is its initialisation (never a target), so it is left out
    of the ranking, however high it would score; in training the full softmax keeps it."""
    from dist_rec.models.base import Dimensions
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="gru4rec", embedding_dim=8, hidden_dim=8),
                        Dimensions(num_items=10, num_users=1, num_delta_buckets=4, num_event_types=4))
    cold = torch.zeros(11, dtype=torch.bool)
    cold[[3, 7]] = True
    model.set_cold_items(cold)
    with torch.no_grad():
        model.tables.bias.weight[[3, 7]] = 100.0
    hidden = torch.randn(5, 8)
    model.eval()
    scores, items = model.scorer.topk(hidden, k=10)
    assert set(items[:, :8].flatten().tolist()) == set(range(1, 11)) - {3, 7}
    assert torch.isinf(scores[:, 8:]).all()
    ranks = model.scorer.target_ranks(hidden, torch.full((5,), 3))
    assert (ranks == 9).all()          # behind everything: a miss at any cutoff
    model.train()
    assert model.scorer is model.tables
