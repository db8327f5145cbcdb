"""Training state <-> checkpoint: what a rank saves and how it comes back, on any world size.

Item tables (and their row-wise optimizer accumulators) are saved in the row-wise modulo layout:
rank r of W writes global rows {i : i % W == r}. Replicated tables (`sharding: none`) are sliced
that way on save and gathered whole on load, so one format serves every sharding and every world
size. Rank 0 adds the dense state: encoder, dense optimizer, sampler generator, data position.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_rec import checkpoint
from dist_rec.config import JobConfig
from dist_rec.embeddings.sharded import ShardedItemTables
from dist_rec.models.base import Dimensions
from dist_rec.train.step import Optimizers

logger = logging.getLogger(__name__)


def table_rows(tables: nn.Module, sparse_optimizer: torch.optim.Optimizer,
               rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """{name: (local rows, ...)} of this rank: every table tensor and its accumulator.

    Sharded tables already hold exactly this rank's rows; replicated ones are sliced.
    """
    local = slice(None) if isinstance(tables, ShardedItemTables) else slice(rank, None, world_size)
    rows: dict[str, torch.Tensor] = {}
    for name, parameter in tables.named_parameters():
        key = name.removesuffix(".weight")
        rows[key] = parameter.detach()[local].cpu()
        rows[f"{key}.accumulator"] = sparse_optimizer.state[parameter]["sum"][local].cpu()
    return rows


def load_table_rows(tables: nn.Module, sparse_optimizer: torch.optim.Optimizer,
                    rows: dict[str, torch.Tensor]) -> None:
    """Load `rows` shaped like this rank's tables (all rows, or its shard's rows)."""
    with torch.no_grad():
        for name, parameter in tables.named_parameters():
            key = name.removesuffix(".weight")
            parameter.copy_(rows[key].to(parameter.device))
            sparse_optimizer.state[parameter]["sum"].copy_(rows[f"{key}.accumulator"])


def save(config: JobConfig, step: int, epoch: int, encoder: nn.Module, tables: nn.Module,
         optimizers: Optimizers, generator: torch.Generator, rank: int, world_size: int,
         vocab_hash: str, barrier, item_counts=None, dimensions: Dimensions | None = None) -> str:
    """Every rank writes its files, then (after `barrier()`) rank 0 commits the manifest.

    item_counts (num_items + 1,): the sampler's counts, so a resumed run draws from the same q.
    dimensions: the data's sizes the model was built with, recorded in the manifest.
    """
    dense = None
    if rank == 0:
        dense = {"encoder": encoder.state_dict(), "dense_optimizer": optimizers.dense.state_dict(),
                 "generator": generator.get_state(), "step": step, "epoch": epoch}
        if item_counts is not None:
            dense["item_counts"] = torch.as_tensor(item_counts)
    rows = table_rows(tables, optimizers.sparse, rank, world_size)
    path = checkpoint.write_rank_files(config.storage, config.run_name, step, rank, world_size,
                                       rows, dense)
    barrier()
    if rank == 0:
        checkpoint.commit(config.storage, config.run_name, step, world_size, epoch=epoch,
                          vocab_hash=vocab_hash, config=config.to_dict(redact=True),
                          dimensions=dataclasses.asdict(dimensions) if dimensions else None)
        checkpoint.prune(config.storage, config.run_name, config.storage.keep_last)
    barrier()
    return path


def restore(config: JobConfig, path: str, encoder: nn.Module, tables: nn.Module,
            optimizers: Optimizers, generator: torch.Generator, vocab_hash: str) -> dict[str, Any]:
    """Load `path` (written on any world size) into this rank.

    Returns {"step", "epoch", "item_counts" (the sampler's counts, or None if not saved)}.

    Sharded tables get their modulo rows resharded from whatever world size wrote them;
    replicated tables get every row.
    """
    return _apply(_read(config, path, tables, vocab_hash), encoder, tables, optimizers, generator)


def restore_newest(config: JobConfig, encoder: nn.Module, tables: nn.Module,
                   optimizers: Optimizers, generator: torch.Generator, vocab_hash: str,
                   world_size: int) -> tuple[str | None, dict[str, Any]]:
    """Restore the run's newest checkpoint that reads intact on every rank; a collective.

    Returns (its path, `restore`'s position), or (None, step 0 / epoch 0) for a fresh start.
    Rank 0 lists the committed checkpoints whose files have their manifest's sizes (no bytes read)
    and sends the list to every rank. Newest first, each rank reads its part (the shards its rows
    come from, the dense state) and checks each file's sha256 as it reads it; a corrupt or missing
    file on any rank sends every rank to the next older checkpoint, and nothing is loaded into the
    model until all ranks have read theirs. So each file is read once by each rank that needs it;
    verifying the whole checkpoint before loading it would read every byte twice.
    """
    rank = dist.get_rank() if world_size > 1 else 0
    device = next(encoder.parameters()).device
    candidates = [checkpoint.list_checkpoints(config.storage, config.run_name) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(candidates, src=0)
    for path in candidates[0]:
        try:
            loaded = _read(config, path, tables, vocab_hash)
        except (checkpoint.CorruptFile, FileNotFoundError) as error:
            logger.warning("rank %d skips checkpoint %s: %s", rank, path, error)
            loaded = None
        intact = torch.tensor([loaded is not None], dtype=torch.int32, device=device)
        if world_size > 1:
            dist.all_reduce(intact, dist.ReduceOp.MIN)
        if intact.item():
            return path, _apply(loaded, encoder, tables, optimizers, generator)
    return None, {"step": 0, "epoch": 0, "item_counts": None}


def _read(config: JobConfig, path: str, tables: nn.Module, vocab_hash: str) -> checkpoint.Loaded:
    """This rank's part of the checkpoint at `path`, every file checked as it is read; nothing is
    loaded into the model yet. Raises checkpoint.CorruptFile naming a file that fails its check."""
    rank, world_size = ((tables.rank, tables.world_size) if isinstance(tables, ShardedItemTables)
                        else (0, 1))
    loaded = checkpoint.load_checkpoint(config.storage, path, rank, world_size)
    if loaded.manifest.get("vocab_hash") != vocab_hash:
        raise ValueError(f"{path}: written for vocabulary {loaded.manifest.get('vocab_hash')}, "
                         f"this run's vocabulary is {vocab_hash}")
    return loaded


def _apply(loaded: checkpoint.Loaded, encoder: nn.Module, tables: nn.Module,
           optimizers: Optimizers, generator: torch.Generator) -> dict[str, Any]:
    load_table_rows(tables, optimizers.sparse, loaded.tables)
    encoder.load_state_dict(loaded.dense["encoder"])
    optimizers.dense.load_state_dict(loaded.dense["dense_optimizer"])
    generator.set_state(loaded.dense["generator"])
    return {"step": int(loaded.dense["step"]), "epoch": int(loaded.dense["epoch"]),
            "item_counts": loaded.dense.get("item_counts")}
