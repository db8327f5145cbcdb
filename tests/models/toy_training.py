"""Train a model on a handful of toy batches with the real step, loss and optimizers."""
from __future__ import annotations

import numpy as np
import torch

from dist_rec.batch import SequenceBatch
from dist_rec.config import SamplerConfig
from dist_rec.embeddings.optim import RowWiseAdagrad
from dist_rec.losses import build_loss
from dist_rec.models import NextItemModel
from dist_rec.train.step import Optimizers, train_step


def fit(model: NextItemModel, batches: list[SequenceBatch], loss: str = "full_softmax", steps: int = 300,
        seed: int = 0) -> tuple[NextItemModel, list[float]]:
    """`steps` train_steps on batches drawn at random (uniform counts for sampled losses);
    returns the model in eval mode and the losses."""
    counts = np.ones(model.tables.num_items + 1)
    counts[0] = 0
    loss_fn = build_loss(SamplerConfig(loss=loss, num_negatives=64), counts)
    optimizers = Optimizers(dense=torch.optim.Adam(model.dense_parameters(), lr=0.01),
                            sparse=RowWiseAdagrad(model.sparse_parameters(), lr=0.1))
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    losses = [train_step(model, batches[rng.integers(len(batches))], loss_fn, optimizers, generator)
              for _ in range(steps)]
    return model.eval(), losses
