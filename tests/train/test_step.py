"""train_step with the real loss stack: HRNN learns a planted pattern; resumed == uninterrupted,
dropout included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_rec.batch import SequenceBatch
from dist_rec.config import JobConfig, ModelConfig, SamplerConfig
from dist_rec.embeddings.optim import RowWiseAdagrad
from dist_rec.evaluation.protocols import ModelRanker
from dist_rec.losses import build_loss
from dist_rec.models import Dimensions, build_model
from dist_rec.models.baselines import most_pop
from dist_rec.train import state
from dist_rec.train.step import Optimizers, seed_epoch, train_step

NUM_ITEMS = 300
DIMS = Dimensions(num_items=NUM_ITEMS, num_users=64, num_delta_buckets=16, num_event_types=4)


def successor(items: np.ndarray) -> np.ndarray:
    return (items * 7 + 3) % NUM_ITEMS + 1


def planted_batch(rng: np.random.Generator, rows: int = 64, steps: int = 12) -> SequenceBatch:
    """Item i is followed by successor(i) 90% of the time, else a uniform item."""
    items = np.zeros((rows, steps + 1), np.int64)
    items[:, 0] = rng.integers(1, NUM_ITEMS + 1, rows)
    for t in range(1, steps + 1):
        follow = rng.random(rows) < 0.9
        items[:, t] = np.where(follow, successor(items[:, t - 1]),
                               rng.integers(1, NUM_ITEMS + 1, rows))
    ones = np.ones((rows, steps), np.int64)
    return SequenceBatch.from_numpy({
        "items": items[:, :-1], "targets": items[:, 1:], "deltas": ones * 3,
        "session_starts": np.zeros((rows, steps), bool), "event_types": ones,
        "target_types": ones, "users": rng.integers(1, 65, rows)})


def parts(seed: int, loss: str = "sampled_softmax", negatives: int = 64, dropout: float = 0.0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="hrnn", embedding_dim=32, hidden_dim=32, dropout=dropout,
                                    delta_embedding_dim=4, type_embedding_dim=4), DIMS)
    counts = np.r_[0, np.ones(NUM_ITEMS, np.int64)]
    loss_fn = build_loss(SamplerConfig(loss=loss, num_negatives=negatives), counts)
    optimizers = Optimizers(torch.optim.Adam(model.dense_parameters(), lr=3e-3),
                            RowWiseAdagrad(model.sparse_parameters(), lr=0.1))
    return model, loss_fn, optimizers, torch.Generator().manual_seed(seed)


def test_hrnn_learns_planted_pattern_with_sampled_softmax():
    rng = np.random.default_rng(0)
    model, loss_fn, optimizers, generator = parts(seed=0)
    losses = [train_step(model, planted_batch(rng), loss_fn, optimizers, generator)
              for _ in range(150)]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])

    test = planted_batch(np.random.default_rng(1), rows=400)
    targets = test.targets[:, -1]          # rankers score the last step of each row
    hr_model = (ModelRanker(model).target_ranks(test, targets) < 10).float().mean().item()
    train_items = planted_batch(np.random.default_rng(2), rows=400).targets.flatten()
    popular = most_pop(NUM_ITEMS).fit(train_items.numpy())
    hr_pop = (popular.target_ranks(test, targets) < 10).float().mean().item()
    # 90% of targets are the successor: a model that learned the map gets ~0.9.
    assert hr_model > 0.8
    assert hr_pop < 0.1


@pytest.mark.parametrize("loss", ["sampled_softmax", "full_softmax"])
def test_resumed_equals_uninterrupted(tmp_path, loss):
    """Two epochs of 3 batches with dropout, as train/loop.py runs them (seed_epoch at each epoch
    start); the stopped run checkpoints after epoch 0 and a fresh model restores it."""
    batches = [planted_batch(np.random.default_rng(10 + i), rows=16) for i in range(6)]
    epochs = {0: batches[:3], 1: batches[3:]}
    config = JobConfig().replace(storage={"uri": str(tmp_path)}, run_name="resume")

    def train_epoch(model, loss_fn, optimizers, generator, epoch, reseed=True):
        if reseed:
            seed_epoch(3, epoch, rank=0)
        return [train_step(model, b, loss_fn, optimizers, generator) for b in epochs[epoch]]

    model, loss_fn, optimizers, generator = parts(seed=3, loss=loss, dropout=0.3)
    straight = [x for epoch in (0, 1) for x in train_epoch(model, loss_fn, optimizers, generator, epoch)]

    first, loss_fn, first_optimizers, first_generator = parts(seed=3, loss=loss, dropout=0.3)
    before = train_epoch(first, loss_fn, first_optimizers, first_generator, 0)
    counts = np.r_[0, np.arange(1, NUM_ITEMS + 1)]
    path = state.save(config, 3, 1, first.encoder, first.tables, first_optimizers,
                      first_generator, rank=0, world_size=1, vocab_hash="v", barrier=lambda: None,
                      item_counts=counts)

    def resume(reseed: bool):
        resumed, loss_fn, optimizers, generator = parts(seed=99, loss=loss, dropout=0.3)
        position = state.restore(config, path, resumed.encoder, resumed.tables, optimizers,
                                 generator, vocab_hash="v")
        return resumed, position, train_epoch(resumed, loss_fn, optimizers, generator, 1, reseed)

    resumed, position, after = resume(reseed=True)
    assert (position["step"], position["epoch"]) == (3, 1)
    assert np.array_equal(position["item_counts"].numpy(), counts)
    assert before + after == straight
    for (name, expected), actual in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, actual), name
    # The dropout masks come from the global generator, which no checkpoint holds: without the
    # epoch's reseed the resumed run draws other masks and ends elsewhere.
    assert before + resume(reseed=False)[2] != straight


def test_restore_refuses_another_vocabulary(tmp_path):
    config = JobConfig().replace(storage={"uri": str(tmp_path)}, run_name="vocab")
    model, _, optimizers, generator = parts(seed=0)
    path = state.save(config, 1, 0, model.encoder, model.tables, optimizers, generator,
                      rank=0, world_size=1, vocab_hash="old", barrier=lambda: None)
    with pytest.raises(ValueError, match="vocabulary"):
        state.restore(config, path, model.encoder, model.tables, optimizers, generator, "new")
