"""A 2-worker Ray Train run on a local Ray: completes, checkpoints, and a new job resumes from it."""
from __future__ import annotations

import pytest
import torch

from dist_rec import checkpoint
from dist_rec.config import JobConfig
from dist_rec.data import synthetic
from dist_rec.data.prepare import prepare
from dist_rec.train.launch import run_training

pytestmark = pytest.mark.ray


def test_two_workers_train_checkpoint_and_resume(ray_cluster, tmp_path):
    events = synthetic.generate_events(
        synthetic.SyntheticConfig(num_users=600, num_items=2_000, num_categories=20,
                                  num_events=20_000), progress=False)
    synthetic.write_user_behavior_csv(events, str(tmp_path / "UserBehavior.csv"))
    config = JobConfig().replace(
        data={"events_uri": str(tmp_path / "UserBehavior.csv"), "work_dir": str(tmp_path / "data")},
        model={"hidden_dim": 16, "embedding_dim": 16},
        sampler={"num_negatives": 128},
        train={"num_workers": 2, "epochs": 1, "batch_size": 64},
        storage={"uri": str(tmp_path / "runs"), "keep_last": 5}, run_name="ray_test")
    prepared = prepare(config.data, str(tmp_path / "prepared"), test_users=60, seed=0)

    first = run_training(config, prepared.uri, max_failures=0)
    assert first.error is None
    assert first.metrics["epoch"] == 1
    assert 0 < first.metrics["recall@200"] <= 1
    path = first.metrics["checkpoint"]
    manifest = checkpoint.read_manifest(config.storage, path)
    assert manifest["world_size"] == 2
    assert manifest["num_rows"] == prepared.dimensions.num_items + 1
    assert manifest["vocab_hash"] == prepared.vocab_hash

    # A new job with 2 epochs finds the 1-epoch checkpoint and trains only the second epoch.
    second = run_training(config.replace(train={"epochs": 2}), prepared.uri, max_failures=0)
    assert second.error is None
    assert second.metrics["epoch"] == 2
    assert second.metrics["step"] == 2 * first.metrics["step"]
    assert checkpoint.latest_checkpoint(config.storage, "ray_test") == second.metrics["checkpoint"]

    # The 2-worker checkpoint gathers on one process, and training moved the tables.
    before = checkpoint.gather_full_table(config.storage, path)
    after = checkpoint.gather_full_table(config.storage, second.metrics["checkpoint"])
    assert before["input"].shape == (prepared.dimensions.num_items + 1, 16)
    assert not torch.equal(before["input"], after["input"])
