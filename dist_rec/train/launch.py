"""Build and run the Ray Train TorchTrainer for a JobConfig (the driver side of training).

The worker side is loop.train_loop_per_worker; the config crosses the boundary as a plain dict.
Checkpoints live under `<storage.uri>/<run_name>/checkpoints/` (local or s3://): our own format
(manifest + per-rank shards, see dist_rec/checkpoint), reported to Ray without a second upload.
"""
from __future__ import annotations

import logging
import os
import posixpath
from typing import Any

import pyarrow.fs
import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from dist_rec.config import JobConfig
from dist_rec.data.streaming import read_windows
from dist_rec.storage import pyarrow_filesystem
from dist_rec.train.loop import train_loop_per_worker

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to a cluster (RAY_ADDRESS / `address`) or start an embedded local one; returns
    whether Ray is local (no address given): then its resources are all it will ever have.

    The local one advertises one CPU more than the machine has: the training workers reserve
    a CPU each, and Ray Data's read tasks need one left over or the stream never starts. It runs
    the dashboard: Ray Train's placement-group cleaner polls the state API it serves (without it,
    a warning every few seconds), and users get the dashboard's view of the run (~2 s at start).
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return not address
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or (os.cpu_count() or 1) + 1, include_dashboard=True, log_to_driver=True,
                 # Workers import dist_rec from this checkout, like the driver does.
                 runtime_env={"env_vars": {"PYTHONPATH": _repo_root()}})
    return not address


def check_fits(config: JobConfig, resources: dict[str, float], can_grow: bool = False) -> None:
    """Refuse a job that a Ray which cannot grow (the local one) could never place: Ray Train
    would wait for the GPUs without end, and workers holding every CPU starve the data stream.
    On a cluster (`can_grow`) the same shortfall is said (INFO: it is the normal start on an
    autoscaling cluster with no worker nodes yet, cluster/aws-gpu.yaml); without an autoscaler
    the job waits for ever, and this line tells why."""
    workers, cpus = config.train.num_workers, config.train.cpus_per_worker
    ray_name = "the cluster" if can_grow else "the local Ray"
    shortfalls = []           # (what is missing, what to do about it on a local Ray)
    if config.train.use_gpu and resources.get("GPU", 0) < workers:
        shortfalls.append((f"--gpu: {workers} worker(s) need a GPU each and {ray_name} has "
                           f"{resources.get('GPU', 0):g}",
                           "train without --gpu, or join a cluster with GPUs (--ray-address)"))
    needed = workers * cpus + 1
    if needed > resources.get("CPU", 0):
        shortfalls.append((f"--workers {workers} with {cpus:g} CPU each, and one CPU for reading "
                           f"the data, need {needed:g} CPUs; {ray_name} has "
                           f"{resources.get('CPU', 0):g}",
                           "give fewer --workers (or less train.cpus_per_worker), or join a "
                           "cluster (--ray-address)"))
    if shortfalls and can_grow:
        logger.info("%s now: the job waits until the cluster grows (an autoscaler adds nodes), "
                    "and without end if it cannot", "; ".join(w for w, _ in shortfalls))
    elif shortfalls:
        raise ValueError(": ".join(shortfalls[0]))


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ordered_ingest() -> "ray.data.ExecutionOptions":
    """Ray Train's ingest options with preserve_order: the shards' blocks then reach the
    streaming split in file order and are dealt to the workers by a fixed rule, so a seed gives
    the same batches on every rank in every run. Without it each worker takes the blocks in the
    order the read tasks finish, and two runs of one config differ."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def storage_path(config: JobConfig) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem) for RunConfig; local paths are made absolute."""
    uri = config.storage.uri
    if "://" not in uri:
        uri = os.path.abspath(uri)
    fs, path = pyarrow_filesystem(uri, config.storage.storage_options())
    return path, fs


# Ray Train's own files in its run directory <storage>/<run>/: its record of the checkpoints
# reported to it, and the empty marker by which its workers check that they see the storage.
RAY_RECORDS = ("checkpoint_manager_snapshot.json", ".validate_storage_marker")


def forget_ray_records(config: JobConfig) -> None:
    """Remove Ray's files of an earlier job of this run. Ray would restore its snapshot, and
    refuse to start once a checkpoint it lists is gone; ours are pruned and discarded by our own
    rules (dist_rec.checkpoint) and resumed without it (state.restore_newest). Ray's run directory
    must hold the checkpoints it is told of, so it stays <storage>/<run>/; only its files go, and
    the run holds what is ours alone: checkpoints/ and summary.json."""
    path, fs = storage_path(config)
    for name in RAY_RECORDS:
        record = posixpath.join(path, config.run_name, name)
        if fs.get_file_info(record).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(record)


def run_training(config: JobConfig, prepared_uri: str, max_failures: int = 2) -> ray.train.Result:
    """Train `config` on the prepared data at `prepared_uri`; returns Ray's Result. Every
    attempt, the first and each retry, resumes from the run's newest verified checkpoint."""
    forget_ray_records(config)
    path, fs = storage_path(config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": config.to_dict(), "prepared_uri": prepared_uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.num_workers, use_gpu=config.train.use_gpu,
            resources_per_worker={"CPU": config.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if config.train.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=config.run_name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # Pruning is ours (dist_rec.checkpoint.prune) so local and s3 behave alike.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None)),
        datasets={"train": read_windows(f"{prepared_uri}/windows",
                                        config.storage.storage_options())},
        dataset_config=ray.train.DataConfig(execution_options=_ordered_ingest()),
    )
    logger.info("training %s on %d worker(s)", config.model.name, config.train.num_workers)
    try:
        return trainer.fit()
    finally:
        try:          # a failed cleanup must not hide the job's own outcome
            forget_ray_records(config)
        except Exception as error:
            logger.warning("could not remove Ray's files of run %r: %s", config.run_name, error)
