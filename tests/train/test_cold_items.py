"""Cold items on the product path: an item catalog -> prepare -> the model's ranking.

The world: every user keeps to one category. Users with fewer than 10 events train; users with
10+ are all held out for the TDM test, and the second half of each test history is on items that
no training user touched (in the catalog, with their category). HRNN-meta (lambda = 1 for cold
items, paper sec. 2.3 and Table 7) ranks them from their category; plain HRNN has only untrained
rows for them and leaves them out.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch

from dist_rec.batch import SequenceBatch
from dist_rec.config import DataConfig, JobConfig, ModelConfig, StorageConfig
from dist_rec.data.prepare import prepare
from dist_rec.data.sequences import windows_to_batch
from dist_rec.embeddings.table import WithoutItems, needs_precise
from dist_rec.evaluation.protocols import (ModelRanker, _perplexity, session_every_position,
                                           session_last_item, tdm_first_half)
from dist_rec.models import Dimensions, build_model
from dist_rec.train import loop, state
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

    # Read as inputs (each history reversed in time: the first halves are all cold), cold items
    # are left out of a plain model's history, exactly as if unknown; HRNN-meta reads them.
    cold = prepared.cold_items
    items = histories["items"].to_pylist()
    reversed_in_time = histories.set_column(
        2, "timestamps", pa.array([[100 - t for t in row] for row in
                                   histories["timestamps"].to_pylist()], pa.list_(pa.int64())))
    as_unknown = reversed_in_time.set_column(1, "items", pa.array(
        [[-1 if cold[i] else i for i in row] for row in items], pa.list_(pa.int64())))

    def tdm(model, table) -> dict:
        return tdm_first_half(ModelRanker(model), table, k=20, num_users=None,
                              data_config=config, progress=False)

    assert tdm(plain, reversed_in_time) == tdm(plain, as_unknown)
    assert tdm(meta, reversed_in_time) != tdm(meta, as_unknown)

    # Without the cold flags HRNN-meta scores them by their untrained ID rows (lambda 0).
    meta.set_cold_items(torch.zeros_like(meta.cold_items))
    assert recall(meta) < 0.1


def write_small_world(directory, catalog: dict) -> DataConfig:
    """30 users with 12 events each on items 1..5 (category 10 + item), and one event on item 9
    (category 19): with min_item_count 2, item 9 is too rare to train."""
    users = np.repeat(np.arange(1, 31), 12)
    items = (users + np.tile(np.arange(12), 30)) % 5 + 1
    users, items = np.append(users, 1), np.append(items, 9)
    pq.write_table(pa.table({"user_id": users, "item_id": items,
                             "timestamp": np.arange(len(users)), "event_type": ["pv"] * len(users),
                             "category_id": items + 10}), directory / "events.parquet")
    pq.write_table(pa.table(catalog), directory / "catalog.parquet")
    return DataConfig(events_uri=str(directory / "events.parquet"), window_length=8,
                      min_item_count=2, item_catalog_uri=str(directory / "catalog.parquet"))


def test_the_catalogs_values_win_the_events_fill_in_and_rare_items_stay_cold(tmp_path):
    config = write_small_world(tmp_path, {"item_id": [1, 2, 3, 4, 5, 9, 500],
                                          "category_id": [12, None, 13, 14, 15, 19, 19]})
    prepared = prepare(config, str(tmp_path / "prepared"), test_users=0, seed=0)
    assert prepared.vocabulary().items.raw_ids.tolist() == [1, 2, 3, 4, 5, 9, 500]
    # Item 9 is listed but has 1 event of the 2 min_item_count asks: cold, and never trained on.
    assert prepared.item_counts[6:].tolist() == [0, 0] and prepared.cold_items.sum() == 2
    windows = pq.read_table(prepared.uri + "/windows")
    assert 6 not in set(pa.compute.list_flatten(windows["items"]).to_pylist())
    # Codes 1..6 for categories 11, 12, 13, 14, 15, 19 (the training events' values): item 1 takes
    # the catalog's 12 over its events' 11, item 2 keeps its events' 12 where the catalog has none.
    assert prepared.item_features[1:, 0].tolist() == [2, 2, 3, 4, 5, 6, 6]


def test_a_bad_catalog_is_refused_naming_it(tmp_path):
    config = write_small_world(tmp_path, {"item_id": [1, 500], "category_id": ["a", "b"]})
    with pytest.raises(ValueError, match=r"catalog.parquet: column 'category_id' is string"):
        prepare(config, str(tmp_path / "prepared"), test_users=0, seed=0)
    config = write_small_world(tmp_path, {"item_id": ["x", None], "category_id": [11, 12]})
    with pytest.raises(ValueError, match=r"catalog.parquet: the item catalog has no row with a "
                                         r"valid item_id \(2 quarantined\)"):
        prepare(config, str(tmp_path / "prepared"), test_users=0, seed=0)
    inside = dataclasses.replace(config, item_catalog_uri=str(tmp_path / "prepared" / "c.parquet"))
    with pytest.raises(ValueError, match="the item catalog path .* is inside the output directory"):
        prepare(inside, str(tmp_path / "prepared"), test_users=0, seed=0)


def tiny_model(name: str = "gru4rec", **sizes):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, embedding_dim=8, hidden_dim=8),
                        Dimensions(num_items=10, num_users=1, num_delta_buckets=4,
                                   num_event_types=4, **sizes))
    cold = torch.zeros(11, dtype=torch.bool)
    cold[[3, 7]] = True
    model.set_cold_items(cold)
    return model.eval()


def test_a_cold_row_never_outranks_a_trained_one_whatever_its_weights():
    """Plain models: a cold item's row was never a target, so it is left out of the ranking,
    however high it would score, and of the softmax's probabilities; in training the full
    softmax keeps it."""
    model = tiny_model()
    with torch.no_grad():
        model.tables.bias.weight[[3, 7]] = 100.0
    hidden = torch.randn(5, 8)
    scores, items = model.scorer.topk(hidden, k=10)
    assert set(items[:, :8].flatten().tolist()) == set(range(1, 11)) - {3, 7}
    assert torch.isinf(scores[:, 8:]).all()
    ranks = model.scorer.target_ranks(hidden, torch.full((5,), 3))
    assert (ranks == 9).all()          # behind everything: a miss at any cutoff
    warm = torch.tensor([1, 2, 4, 5, 6, 8, 9, 10])
    weight, bias = model.tables.output_weight()
    expected = torch.log_softmax(hidden.double() @ weight[warm].double().T + bias[warm].double(), 1)
    torch.testing.assert_close(model.scorer.target_log_likelihoods(hidden, torch.full((5,), 4)),
                               expected[:, 2])
    model.train()
    assert model.scorer is model.tables


def test_a_cold_item_as_input_reads_as_a_zero_vector():
    """Whatever its (untrained) input row holds, a cold item in a history gives the same hidden
    state; a warm item's row counts."""
    model = tiny_model()
    items = torch.tensor([[1, 3, 2]])
    ones = torch.ones_like(items)
    batch = SequenceBatch(items=items, targets=torch.tensor([[3, 2, 5]]), deltas=ones,
                          session_starts=items == 1, event_types=ones, target_types=ones,
                          users=torch.tensor([1]))
    before = model.hidden(batch)
    with torch.no_grad():
        model.tables.input.weight[3] = 50.0
    assert torch.equal(model.hidden(batch), before)
    with torch.no_grad():
        model.tables.input.weight[2] = 50.0
    assert not torch.equal(model.hidden(batch), before)


def test_hrnn_meta_leaves_out_a_cold_item_without_a_known_feature(caplog):
    """At lambda = 1 a cold item with no known code would score a constant 0 for every user."""
    with caplog.at_level("WARNING", logger="dist_rec.models.hrnn_meta"):
        model = tiny_model("hrnn_meta", item_feature_sizes=(2,))
    assert "2 cold items score by their feature view (lambda 1) and warm items by their ID view " \
           "(eval_lambda 0)" in caplog.text
    codes = torch.tensor([[0], [1], [2], [1], [2], [1], [2], [0], [1], [2], [1]])   # item 7: none
    model.encoder.set_item_features(codes)
    scores, items = model.scorer.topk(torch.randn(4, 8), k=10)
    assert not (items[:, :9] == 7).any() and torch.isinf(scores[:, 9]).all()
    assert (items == 3).any()          # the cold item with a code ranks


def test_the_session_protocols_count_cold_targets_as_misses_on_either_path():
    """Every position of a session: the one-pass path would drop the cold events as targets
    along with the inputs, so a model that leaves cold items out is scored per prefix (its cold
    inputs left out, its cold targets misses), as with max_length. Perplexity is over the
    targets it gives a probability."""
    model = tiny_model()
    sessions = [np.array([1, 3, 2, 4]), np.array([3, 5, 6]), np.array([2, 7]), np.array([5, 8, 9])]
    ranker = ModelRanker(model)
    one_pass = session_every_position(ranker, sessions, ks=[5], progress=False)
    per_prefix = session_every_position(ranker, sessions, ks=[5], max_length=50, progress=False)
    # approx: the two paths sum in different orders, and float32 sums differ in the last bits.
    assert one_pass == pytest.approx(per_prefix, rel=1e-6) and one_pass["count"] == 8
    last = session_last_item(ranker, sessions, ks=[5], progress=False)   # targets 4, 6, 7, 9
    warm = session_last_item(ranker, [sessions[i] for i in (0, 1, 3)], ks=[5], progress=False)
    assert math.isfinite(last["perplexity"]) and last["perplexity"] == pytest.approx(warm["perplexity"], rel=1e-6)
    assert not needs_precise(WithoutItems(model.cold_items))     # the float32 top-k path


def test_the_small_guards_around_cold_items():
    """The ranker reads the model's flags when asked, not when built; a NaN log-likelihood still
    makes perplexity NaN (only -inf, a left-out cold target, is skipped); HRNN-meta's value head
    reads a cold target as a zero vector, whatever its untrained row holds."""
    model = tiny_model()
    ranker = ModelRanker(model)
    model.set_cold_items(torch.zeros_like(model.cold_items))
    assert ranker.unreadable_items is None
    model.set_cold_items(torch.arange(11) == 5)
    assert ranker.unreadable_items.nonzero().flatten().tolist() == [5]

    assert _perplexity(torch.tensor([-1.0, -math.inf]))["perplexity"] == pytest.approx(math.e)
    assert math.isnan(_perplexity(torch.tensor([-1.0, math.nan]))["perplexity"])

    torch.manual_seed(0)
    meta = build_model(ModelConfig(name="hrnn_meta", embedding_dim=8, hidden_dim=8,
                                   options={"value_head": True}),
                       Dimensions(num_items=10, num_users=1, num_delta_buckets=4,
                                  num_event_types=4, item_feature_sizes=(2,)))
    meta.encoder.set_item_features(torch.arange(11).unsqueeze(1) % 2 + 1)
    meta.set_cold_items(torch.arange(11) == 3)
    hidden, targets = torch.randn(2, 8), torch.tensor([3, 4])
    before = meta.predict_values(hidden, targets)
    with torch.no_grad():
        meta.tables.input.weight[[3, 4]] = 50.0
    after = meta.predict_values(hidden, targets)
    assert after[0] == before[0] and after[1] != before[1]


def test_a_resumed_worker_takes_the_items_as_the_data_has_them_not_as_its_checkpoint_saved_them(
        tmp_path):
    """HRNN-meta's checkpoint holds its code tables and cold flags; a resume must end with the
    data's, which may be newer (an item's first events, a catalog's new attribute)."""
    data_config, prepared = prepared_world(tmp_path)
    job = JobConfig(data=data_config, model=ModelConfig(name="hrnn_meta", embedding_dim=16,
                                                        hidden_dim=16),
                    storage=StorageConfig(uri=str(tmp_path / "runs")), run_name="cold")
    cpu = torch.device("cpu")
    stale = loop.build_parts(job, prepared, cpu, world_size=1)
    assert stale.resume_path is None
    stale.model.encoder.cold_items.zero_()          # as saved by older code, or of older data
    stale.model.encoder.item_features.zero_()
    sampler_counts = np.arange(len(prepared.item_counts))
    path = state.save(job, 3, 1, stale.model.encoder, stale.model.tables, stale.optimizers,
                      stale.generator, 0, 1, prepared.vocab_hash, lambda: None, sampler_counts,
                      prepared.dimensions)

    resumed = loop.build_parts(job, prepared, cpu, world_size=1)
    assert resumed.resume_path == path and resumed.position["step"] == 3
    assert resumed.item_counts.tolist() == sampler_counts.tolist()     # the checkpoint's sampler
    cold = torch.as_tensor(prepared.cold_items)
    assert cold.sum() == CATEGORIES * COLD
    assert torch.equal(resumed.model.cold_items, cold)
    assert torch.equal(resumed.model.encoder.cold_items, cold)
    assert torch.equal(resumed.model.encoder.item_features, torch.as_tensor(prepared.item_features))
