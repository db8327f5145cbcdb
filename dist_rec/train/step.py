"""One training step and its bookkeeping. No Ray here: the loop (loop.py) and the benchmarks call it.

A step reads a SequenceBatch, runs the encoder over the item tables, scores the masked steps with
the shared loss (sampled or full softmax...), and updates the dense parameters (Adam, under DDP when
distributed) and the item tables (row-wise Adagrad on the touched rows only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_rec.batch import SequenceBatch
from dist_rec.embeddings.replicated import all_reduce_table_gradients
from dist_rec.models.base import NextItemModel


@dataclass
class Optimizers:
    dense: torch.optim.Optimizer     # encoder parameters
    sparse: torch.optim.Optimizer    # item tables

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        self.sparse.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.dense.step()
        self.sparse.step()


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch's global generator for one epoch on one rank.

    Dropout masks and HRNN-meta's per-step lambda draw from the global generator, which no
    checkpoint holds; seeding it from (seed, epoch, rank) at each epoch start makes a run resumed
    at an epoch boundary draw what the uninterrupted run drew, and gives each rank its own masks.
    """
    mixed = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0]
    torch.manual_seed(int(mixed))


def train_step(model: NextItemModel, batch: SequenceBatch, loss_fn, optimizers: Optimizers,
               generator: torch.Generator, event_weights: torch.Tensor | None = None,
               replicated_tables: bool = False, bf16: bool = False) -> float:
    """One optimizer step on `batch`; returns the loss.

    event_weights: (num_event_types + 1,) reward per target type code, or None for uniform.
    replicated_tables: average the tables' gradients over ranks (sharding: none, world > 1).
    """
    mask = batch.mask                                                 # (B, T)
    targets = batch.targets[mask]                                     # (N,)
    weights = None if event_weights is None else event_weights[batch.target_types[mask]]
    with torch.autocast(batch.items.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.hidden(batch)[mask]                            # (N, D)
    # The loss runs outside autocast: its fused logits kernel is written for fp32.
    loss = loss_fn(hidden.float(), targets, model.scorer, weights, generator)
    extra = model.auxiliary_loss(batch, hidden.float())
    if extra is not None:
        loss = loss + extra
    optimizers.zero_grad()
    loss.backward()
    if replicated_tables:
        all_reduce_table_gradients(model.tables)
    optimizers.step()
    return loss.item()
