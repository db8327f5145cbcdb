"""The Ray Train worker: train_loop_per_worker(config dict) runs on every rank.

Rebuild the config, build the parts (model, loss, optimizers), restore the newest checkpoint if
any, then per epoch: stream this rank's windows through train_step, evaluate the test users (a
share per rank with replicated tables; all of them, collectively, with sharded ones), checkpoint
(every rank its table rows, rank 0 the dense state) and report.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode
from torch.nn.parallel import DistributedDataParallel

from dist_rec import checkpoint
from dist_rec.config import JobConfig
from dist_rec.data.prepare import PreparedData
from dist_rec.data.streaming import iterate_batches
from dist_rec.embeddings.optim import RowWiseAdagrad
from dist_rec.evaluation.protocols import ModelRanker, next_value_rmse, tdm_first_half
from dist_rec.losses import build_loss, event_weights
from dist_rec.models import NextItemModel, build_model
from dist_rec.storage import pyarrow_filesystem
from dist_rec.train import state
from dist_rec.train.step import Optimizers, seed_epoch, train_step

logger = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict) -> None:
    config = JobConfig.from_dict(loop_config["job"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    device = ray.train.torch.get_device()
    prepared = PreparedData.load(loop_config["prepared_uri"], config.storage.storage_options())

    parts = build_parts(config, prepared, device, world_size)
    model, loss_fn, optimizers = parts.model, parts.loss_fn, parts.optimizers
    resume_path, position = parts.resume_path, parts.position
    sharded = config.train.sharding == "row"
    if resume_path:
        logger.info("rank %d resumed from %s at epoch %d step %d", rank, resume_path,
                    position["epoch"], position["step"])
    if rank == 0:   # what is newer than the resumed step is unusable, and would block its replay
        checkpoint.discard_newer(config.storage, config.run_name, position["step"])
    _barrier()
    encoder = model.encoder
    if world_size > 1:
        model.encoder = DistributedDataParallel(encoder)

    shard = ray.train.get_dataset_shard("train")
    step, reported = position["step"], False
    for epoch in range(position["epoch"], config.train.epochs):
        if _reached(config, step):     # a retry of a run that already hit --max-steps
            break
        started, events, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
        model.train()
        seed_epoch(config.train.seed, epoch, rank)
        for batch in iterate_batches(shard, config.train.batch_size, config.train.seed, epoch):
            if _reached(config, step):
                break
            batch = batch.to(device, non_blocking=True)
            loss_sum += train_step(model, batch, loss_fn, optimizers, parts.generator,
                                   parts.event_weights, bf16=config.train.bf16,
                                   replicated_tables=world_size > 1 and not sharded)
            events += batch.num_events
            batches += 1
            step += 1
            if rank == 0 and step % config.train.log_every == 0:
                logger.info("epoch %d step %d loss %.4f, %.0f events/s on rank 0", epoch, step,
                            loss_sum / batches, events / (time.perf_counter() - started))
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "step": step, "loss": loss_sum / max(batches, 1),
                   "events_per_second": events * world_size / seconds, "train_seconds": seconds,
                   **_evaluate(model, prepared, config, rank, world_size, sharded)}
        path = state.save(config, step, epoch + 1, encoder, model.tables, optimizers,
                          parts.generator, rank, world_size, prepared.vocab_hash, _barrier,
                          parts.item_counts, prepared.dimensions)
        _report({**metrics, "checkpoint": path}, config)
        reported = True
    if not reported and resume_path:
        # Nothing left to train: a retry after the last checkpoint was committed but before it
        # was reported (or a rerun of a complete run without its summary). Report the restored
        # checkpoint's evaluation, or the job would end without its result.
        _report({"epoch": position["epoch"], "step": step, "checkpoint": resume_path,
                 **_evaluate(model, prepared, config, rank, world_size, sharded)}, config)


@dataclasses.dataclass
class WorkerParts:
    """What a rank trains with, restored from the run's newest checkpoint if it has one."""
    model: NextItemModel
    loss_fn: torch.nn.Module
    optimizers: Optimizers
    generator: torch.Generator            # the shared negatives' draws: the same on every rank
    event_weights: torch.Tensor           # (num_event_types + 1,) reward per target type code
    item_counts: np.ndarray               # (num_items + 1,) the sampler's counts
    resume_path: str | None               # the checkpoint restored, None for a fresh start
    position: dict                        # its step and epoch (0 and 0 for a fresh start)


def build_parts(config: JobConfig, prepared: PreparedData, device: torch.device,
                world_size: int) -> WorkerParts:
    """Build the model, loss and optimizers, restore the newest intact checkpoint (a collective
    when world_size > 1), then load what the data says of the items (`load_item_data`)."""
    torch.manual_seed(config.train.seed)      # identical encoder (and replicated tables) everywhere
    model = build_model(config.model, prepared.dimensions, config.train.sharding,
                        config.train.seed).to(device)
    loss_fn = build_loss(config.sampler, prepared.item_counts).to(device)
    # Reward per target type code (HRNN sec. 3.3), looked up per event in train_step.
    type_codes = torch.arange(len(config.data.event_types) + 1, device=device)
    weights = event_weights(type_codes, config.data.event_types, config.sampler.event_weights)
    optimizers = Optimizers(
        dense=torch.optim.Adam(model.dense_parameters(), lr=config.train.dense_lr),
        sparse=RowWiseAdagrad(model.sparse_parameters(), lr=config.train.sparse_lr))
    # Same seed on every rank: the shared negatives of a step are the same everywhere.
    generator = torch.Generator(device=device).manual_seed(config.train.seed)

    # Not ray.train.get_checkpoint(): on a retry it is the last checkpoint *reported*, which can
    # be older than our newest commit (a worker may die between the commit and the report).
    resume_path, position = state.restore_newest(config, model.encoder, model.tables, optimizers,
                                                 generator, prepared.vocab_hash, world_size)
    # After the restore, which loads HRNN-meta's code tables and cold flags as they were saved:
    # the data's are current (a checkpoint of older code saved none, and data prepared again under
    # the same vocabulary may have given a cold item its first events).
    load_item_data(model, prepared)
    item_counts = prepared.item_counts
    if resume_path and position["item_counts"] is not None:
        item_counts = position["item_counts"].numpy()
        loss_fn.update_counts(item_counts)
    return WorkerParts(model, loss_fn, optimizers, generator, weights, item_counts, resume_path,
                       position)


def _report(metrics: dict, config: JobConfig) -> None:
    ray.train.report(metrics, checkpoint=_ray_checkpoint(metrics["checkpoint"], config),
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _reached(config: JobConfig, step: int) -> bool:
    """Whether --max-steps is set and `step` steps are done. The epoch it cuts short still counts
    as done: its checkpoint resumes at the next epoch, the cut epoch's other batches untrained."""
    return bool(config.train.max_steps) and step >= config.train.max_steps


def load_item_data(model: NextItemModel, prepared: PreparedData) -> None:
    """What the model reads from the data beside the windows: the cold items (catalog items
    without a training event), and HRNN-meta's per-item and per-user code tables when the
    prepared data has them."""
    model.set_cold_items(torch.as_tensor(prepared.cold_items))
    for kind in ("item", "user"):
        codes = getattr(prepared, f"{kind}_features")
        setter = getattr(model.encoder, f"set_{kind}_features", None)
        if codes is not None and setter is not None:
            setter(torch.as_tensor(codes))


def check_test_users(num_test_users: int, config: JobConfig) -> None:
    """With replicated tables every worker evaluates its own share of the test users: each
    needs one at least."""
    workers = config.train.num_workers
    if config.train.sharding == "none" and num_test_users < workers:
        raise ValueError(f"{num_test_users} test users for {workers} workers, which evaluate a "
                         f"share each: hold out at least {workers} (--test-users)")


def _evaluate(model, prepared: PreparedData, config: JobConfig, rank: int, world_size: int,
              sharded: bool) -> dict[str, float]:
    """TDM first-half/second-half on the test users.

    Replicated tables: each rank ranks its share of the users and the sums are all-reduced.
    Sharded tables: ranking is a collective (each shard scores its rows for every rank's queries),
    so every rank passes all users, the same batches in the same order, and gets the same result.
    """
    users = prepared.test_histories()
    if not sharded:
        check_test_users(users.num_rows, config)  # the same on every rank: all raise, none waits
        users = users.take(list(range(rank, users.num_rows, world_size)))
    ranking = tdm_first_half(ModelRanker(model), users, k=200, ks=(20,), num_users=None,
                             data_config=config.data, progress=False)
    parts = [ranking]
    if model.predicts_values:
        # HRNN-meta's value head (paper Tables 4-5): RMSE averaged as a mean squared error.
        values = next_value_rmse(model, users, data_config=config.data)
        parts.append({"value_mse": values["rmse"] ** 2, "count": values["count"]})
    if not sharded and world_size > 1:
        device = next(model.parameters()).device      # NCCL reduces CUDA tensors only
        parts = [_all_reduce_means(part, device) for part in parts]
    result = {name: value for part in parts for name, value in part.items() if name != "count"}
    if "value_mse" in result:
        result["value_rmse"] = math.sqrt(result.pop("value_mse"))
    return result


def _all_reduce_means(means: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-rank means over `count` items -> the means over every rank's items."""
    names = sorted(set(means) - {"count"})
    totals = torch.tensor([means[name] * means["count"] for name in names] + [means["count"]],
                          dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return {name: (totals[i] / totals[-1]).item() for i, name in enumerate(names)}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _ray_checkpoint(uri: str, config: JobConfig) -> Checkpoint:
    fs, path = pyarrow_filesystem(uri, config.storage.storage_options())
    return Checkpoint(path=path, filesystem=fs)

