"""HRNN-meta's metadata on the product path: Parquet events with a request context and a value ->
prepare -> window shards -> training batches -> the training loop's evaluation.

The world makes each signal necessary: an event's device decides which half of the catalog its
item comes from (so only a model that reads the request's context can rank the right half), and
each user rates with a personal offset (so only feedback encoding can predict the next value).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dist_rec.config import DataConfig, JobConfig, ModelConfig
from dist_rec.data.prepare import PreparedData, prepare
from dist_rec.data.sequences import windows_to_batch
from dist_rec.evaluation.protocols import ModelRanker, user_leave_one_out
from dist_rec.models import build_model
from dist_rec.train import loop
from tests.distributed_helpers import run_ranks
from tests.models.toy_training import fit

ITEMS, USERS, EVENTS_PER_USER = 40, 400, 12


def write_world(path, num_users: int = USERS, seed: int = 0, varied_lengths: bool = False) -> None:
    """Device "app" -> items 1..20, "web" -> items 21..40, drawn uniformly; value = the user's
    offset (sd 1) + noise (sd 0.2); segment = the user id's parity; brand = item id mod 3. Every
    user has EVENTS_PER_USER events, or 10 to 30 with `varied_lengths`."""
    rng = np.random.default_rng(seed)
    lengths = (rng.integers(10, 31, num_users) if varied_lengths
               else np.full(num_users, EVENTS_PER_USER))
    users = np.repeat(np.arange(1, num_users + 1), lengths)
    on_web = rng.random(len(users)) < 0.5
    items = rng.integers(1, ITEMS // 2 + 1, len(users)) + np.where(on_web, ITEMS // 2, 0)
    values = rng.normal(0, 1, num_users + 1)[users] + rng.normal(0, 0.2, len(users))
    pq.write_table(pa.table({
        "user_id": users, "item_id": items, "timestamp": np.arange(len(users)) - np.repeat(np.cumsum(lengths) - lengths, lengths),
        "event_type": ["pv"] * len(users), "category_id": np.ones(len(users), np.int64),
        "value": values.astype(np.float32), "device": np.where(on_web, "web", "app"),
        "segment": np.where(users % 2 == 1, "odd", "even"),
        "brand": np.array(["acme", "bolt", "corp"])[items % 3]}), path)


def train(tmp_path, context_column: str) -> tuple:
    config = JobConfig(data=DataConfig(events_uri=str(tmp_path / "events.parquet"),
                                       window_length=11, carry_values=True,
                                       context_column=context_column,
                                       user_feature_columns=("segment",)),
                       model=ModelConfig(name="hrnn_meta", embedding_dim=16, hidden_dim=32,
                                         options={"value_feedback": True, "value_head": True,
                                                  "feature_dim": 8}))
    prepared = prepare(config.data, str(tmp_path / f"prepared-{context_column or 'none'}"),
                       test_users=150, seed=0)
    windows = pq.read_table(str(tmp_path / f"prepared-{context_column or 'none'}" / "windows"))
    batches = [windows_to_batch(windows.slice(start, 50)) for start in range(0, windows.num_rows, 50)]
    torch.manual_seed(0)
    model = build_model(config.model, prepared.dimensions)
    loop.load_item_data(model, prepared)       # as the training loop does
    assert torch.equal(model.encoder.user_features, torch.as_tensor(prepared.user_features))
    assert torch.equal(model.encoder.item_features, torch.as_tensor(prepared.item_features))
    model, _ = fit(model, batches, steps=250)
    return model, prepared, config


def test_request_context_and_feedback_values_are_learned_through_prepared_data(tmp_path):
    write_world(tmp_path / "events.parquet")
    with_context, prepared, config = train(tmp_path, "device")
    without_context, blind, _ = train(tmp_path, "")
    assert prepared.dimensions.num_contexts == 2 and blind.dimensions.num_contexts == 0
    assert prepared.dimensions.user_feature_sizes == (2,)          # even, odd
    training_users = prepared.vocabulary().users          # dense ids 1..250; test users follow
    odd = training_users.decode(np.arange(1, len(training_users) + 1)) % 2 == 1
    assert prepared.user_features[1:len(odd) + 1, 0].tolist() == np.where(odd, 2, 1).tolist()

    def full_hr(model, data: PreparedData) -> float:
        result = user_leave_one_out(ModelRanker(model), data.test_histories(), ks=(10,),
                                    max_users=None, progress=False)
        return result["full_hr@10"]

    # The right half of the catalog holds 20 items: a model that knows it puts the target in its
    # top 10 half the time; a blind one a quarter of the time (150 users: sd ~0.04).
    seeing, blind_hr = full_hr(with_context, prepared), full_hr(without_context, blind)
    assert seeing > 0.40 and blind_hr < 0.33 and seeing > blind_hr + 0.12, (seeing, blind_hr)

    # The training loop's evaluation reports the value head's RMSE on the test users: the offsets
    # (sd 1) are read from the values seen so far; noise sd 0.2 is the floor.
    metrics = loop._evaluate(with_context, prepared, config, rank=0, world_size=1, sharded=False)
    assert 0.2 < metrics["value_rmse"] < 0.5, metrics
    assert metrics["hr@20"] > 0


def _evaluate_on_rank(rank: int, world_size: int, directory: str) -> None:
    prepared = PreparedData.load(f"{directory}/prepared")
    config = JobConfig.from_dict(json.loads(open(f"{directory}/config.json").read()))
    torch.manual_seed(0)                       # the same (untrained) weights on every rank
    model = build_model(config.model, prepared.dimensions)
    loop.load_item_data(model, prepared)
    metrics = loop._evaluate(model, prepared, config, rank, world_size, sharded=False)
    with open(f"{directory}/rank{rank}.json", "w") as f:
        json.dump(metrics, f)


def test_two_ranks_evaluate_what_one_rank_does(tmp_path):
    """Each rank scores its share of the test users and the means are all-reduced: the ranking
    metrics weighted by users, the value RMSE by events (users have 10 to 30 events here, and
    51 test users split 26 / 25, so a wrong weighting shows)."""
    write_world(tmp_path / "events.parquet", num_users=200, varied_lengths=True)
    config = JobConfig(data=DataConfig(events_uri=str(tmp_path / "events.parquet"),
                                       window_length=11, carry_values=True,
                                       context_column="device"),
                       model=ModelConfig(name="hrnn_meta", embedding_dim=16, hidden_dim=16,
                                         options={"value_feedback": True, "value_head": True}))
    prepare(config.data, str(tmp_path / "prepared"), test_users=51, seed=0)
    (tmp_path / "config.json").write_text(config.to_json())
    _evaluate_on_rank(0, 1, str(tmp_path))
    alone = json.loads((tmp_path / "rank0.json").read_text())
    run_ranks(_evaluate_on_rank, 2, str(tmp_path))
    shared = json.loads((tmp_path / "rank0.json").read_text())
    assert shared == json.loads((tmp_path / "rank1.json").read_text())
    assert set(shared) == set(alone) and "value_rmse" in alone
    for name, value in alone.items():
        assert shared[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
