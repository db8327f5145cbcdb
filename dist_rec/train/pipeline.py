"""The main job: (generate) -> prepare -> train on Ray -> evaluate against MostPop.

With no --events it generates Taobao-like data (3M events drawn from a 1M-item catalog; the
~480k items that occur are the model's) under ./runs/, starts an
embedded local Ray (or joins RAY_ADDRESS), trains HRNN with importance-sampled softmax on 2
workers, and prints the TDM protocol's p@200 / r@200, HR@20, NDCG@20 beside MostPop's and the
checkpoint's path. --smoke-test runs a tiny configuration of the same path.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import time

import pyarrow.compute as pc
import ray
from dataclasses import dataclass
from typing import Any, Callable

from dist_rec import checkpoint
from dist_rec.checkpoint import lease
from dist_rec.checkpoint.store import filesystem
from dist_rec.config import JobConfig
from dist_rec.data import synthetic
from dist_rec.data.prepare import PreparedData, prepare
from dist_rec.evaluation.protocols import next_value_rmse, tdm_first_half
from dist_rec.models.baselines import RollingAverageValues, most_pop
from dist_rec.train.launch import check_fits, ensure_ray, run_training
from dist_rec.train.loop import check_test_users

logger = logging.getLogger(__name__)

SMOKE_OVERRIDES = {"model": {"hidden_dim": 32, "embedding_dim": 32},
                   "sampler": {"num_negatives": 256},
                   "train": {"epochs": 1, "batch_size": 128},
                   "data": {"test_users": 200},
                   "generate": {"num_users": 2_000, "num_items": 5_000, "num_categories": 50,
                                "num_events": 60_000}}


@dataclass(frozen=True)
class JobSpec:
    config: JobConfig
    synthetic: synthetic.SyntheticConfig | None   # None when --events names real data
    ray_address: str | None = None

    @staticmethod
    def from_args(args: argparse.Namespace,
                  config_from_args: Callable[[argparse.Namespace, JobConfig], JobConfig]) -> "JobSpec":
        config = _absolute(given_config(args, config_from_args))
        generated = (None if config.data.events_uri else synthetic.SyntheticConfig(
            seed=config.train.seed, **dataclasses.asdict(config.generate)))
        return JobSpec(config, generated, getattr(args, "ray_address", None))   # prepare has none


def given_config(args: argparse.Namespace,
                 config_from_args: Callable[[argparse.Namespace, JobConfig], JobConfig]) -> JobConfig:
    """The config as the command line gives it, local paths as written (what --print-config
    prints, to diff and to reuse from another directory or machine); JobSpec makes them absolute."""
    base = JobConfig()
    if args.smoke_test:
        base = base.replace(**SMOKE_OVERRIDES, run_name="smoke")
    return config_from_args(args, base)


def events_uri(job: JobSpec) -> str:
    """The events to train on: --events, or synthetic data generated once per config."""
    if job.synthetic is None:
        return job.config.data.events_uri
    directory = posixpath.join(job.config.data.work_dir, f"synthetic-{_fingerprint(job.synthetic)}")
    uri = posixpath.join(directory, "UserBehavior.csv")
    fs, path = filesystem(job.config.storage, uri)   # s3 options only for an s3:// uri
    if not fs.exists(path):
        logger.info("generating %d synthetic events into %s", job.synthetic.num_events, uri)
        table = synthetic.generate_events(job.synthetic)
        synthetic.write_user_behavior_csv(table, uri, job.config.storage.storage_options())
    return uri


def prepared_uri(config: JobConfig) -> str:
    """<work_dir>/prepared-<run>-<storage's hash>: the run is its --storage and --run-name, whose
    lease covers this directory; two runs of one name in other storages share no data."""
    storage = hashlib.sha256(config.storage.uri.encode()).hexdigest()[:8]
    return posixpath.join(config.data.work_dir, f"prepared-{config.run_name}-{storage}")


def prepare_data(job: JobSpec) -> PreparedData:
    data = dataclasses.replace(job.config.data, events_uri=events_uri(job))
    return prepare(data, prepared_uri(job.config), data.test_users, job.config.train.seed,
                   job.config.storage.storage_options())


def run(job: JobSpec) -> dict[str, Any]:
    """Prepare, train, evaluate; returns the summary printed by `format_summary`, also saved as
    <storage>/<run>/summary.json. The job holds the run's lease throughout (checkpoint.lease):
    a second job of the same run is refused while this one runs.

    A run resumes from its newest complete checkpoint. If that one already has every epoch (or
    --max-steps steps), there is nothing to train: the saved summary comes back, marked
    `already_complete`; without a readable summary of that checkpoint on the data this job asks
    for, the workers evaluate the checkpoint again and write one (`epochs` None: nothing trained).
    """
    with lease.held(job.config.storage, job.config.run_name):
        return _run(job)


def prepare_alone(job: JobSpec) -> PreparedData:
    """`dist-rec prepare`: the data step, under the run's lease (it replaces the data a running
    job of the run would be streaming)."""
    with lease.held(job.config.storage, job.config.run_name):
        return prepare_data(job)


def _run(job: JobSpec) -> dict[str, Any]:
    started = time.perf_counter()
    config = job.config
    resume_from = checkpoint.latest_checkpoint(config.storage, config.run_name)
    resumed_epoch = 0
    if resume_from:
        manifest = checkpoint.read_manifest(config.storage, resume_from)
        _check_resumable(config, resume_from, "another model", "the same model settings",
                         (manifest.get("config") or {}).get("model"), config.to_dict()["model"])
        resumed_epoch = int(manifest.get("epoch", 0))
        if resumed_epoch >= config.train.epochs or 0 < config.train.max_steps <= manifest["step"]:
            saved = _saved_summary(config)
            if saved is not None and _evaluated_alike(saved, resume_from, config):
                return {**saved, "already_complete": True}
            logger.warning("run %r is complete at %s, and its summary.json is missing or was not "
                           "evaluated on this data: evaluating that checkpoint again",
                           config.run_name, resume_from)
    # Before the data (minutes at scale): a job the local Ray could never place is refused first;
    # on a cluster, one it cannot place now is warned of.
    local = ensure_ray(job.ray_address)
    check_fits(config, ray.cluster_resources(), can_grow=not local)
    prepared = prepare_data(job)
    if resume_from:   # the rows and the encoder's sizes come from the data: refuse before Ray does
        recorded = manifest.get("dimensions") is not None   # not by checkpoints of older code
        _check_resumable(
            config, resume_from, "a model of other data", "the same events and data settings",
            {"vocabulary": manifest.get("vocab_hash"), **(manifest.get("dimensions") or {})},
            {"vocabulary": prepared.vocab_hash,
             **(dataclasses.asdict(prepared.dimensions) if recorded else {})})
    check_test_users(prepared.test_histories().num_rows, config)   # before an epoch is trained
    result = run_training(config, prepared.uri)
    if result.error:
        raise result.error
    model_metrics = {k: v for k, v in result.metrics.items()}
    popular = most_pop(prepared.dimensions.num_items).fit_counts(prepared.item_counts)
    baseline = tdm_first_half(popular, prepared.test_histories(), k=200, ks=(20,), num_users=None,
                              data_config=job.config.data, progress=False)
    if "value_rmse" in model_metrics:
        model_metrics["rolling_average_value_rmse"] = rolling_average_rmse(prepared, job)
    summary = {"run": config.run_name, "model": config.model.name, "metrics": model_metrics,
               "most_pop": baseline, "checkpoint": model_metrics["checkpoint"],
               "items": prepared.dimensions.num_items, "train_events": prepared.num_train_events,
               "resumed_from": resume_from,
               "epochs": ([resumed_epoch + 1, config.train.epochs]
                          if model_metrics["checkpoint"] != resume_from else None),
               "seconds": time.perf_counter() - started, "summary": _summary_uri(config),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "config": config.to_dict(redact=True)}
    fs, path = filesystem(config.storage, summary["summary"])
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(summary, indent=2).encode())
    return summary


def _summary_uri(config: JobConfig) -> str:
    return posixpath.join(config.storage.uri, config.run_name, "summary.json")


def _check_resumable(config: JobConfig, where: str, what: str, advice: str,
                     saved: dict[str, Any] | None, wanted: dict[str, Any]) -> None:
    """Refuse, before Ray starts a worker, to resume a checkpoint this run's model could not load
    (or, worse, would load without being the model it was trained as), naming each difference.
    `saved` is None where the checkpoint does not record it."""
    wanted = json.loads(json.dumps(wanted))   # as the manifest stores it: tuples become lists
    if saved is None or saved == wanted:
        return
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    raise ValueError(
        f"run {config.run_name!r} has a checkpoint of {what} at {where} ("
        + ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in changed)
        + f"): give this run its own --run-name, or {advice} to resume it")


def _saved_summary(config: JobConfig) -> dict[str, Any] | None:
    fs, path = filesystem(config.storage, _summary_uri(config))
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _evaluated_alike(summary: dict[str, Any], checkpoint_path: str, config: JobConfig) -> bool:
    """Whether `summary` holds the evaluation this job would make: of that checkpoint, on the same
    events, data settings and seed (which picks the test users). A summary of older code, which
    did not record its config, is taken at its checkpoint's word."""
    if summary.get("checkpoint") != checkpoint_path:
        return False
    if "config" not in summary:
        return True
    then = summary["config"]
    now = json.loads(json.dumps(config.to_dict(redact=True)))   # as summary.json stores it
    return (all(then.get(section) == now[section] for section in ("data", "generate"))
            and then["train"]["seed"] == now["train"]["seed"])


def rolling_average_rmse(prepared: PreparedData, job: JobSpec) -> float:
    """The value baseline's RMSE on the test users: item averages from the training windows'
    targets, user averages rolling over each test history (HRNN-meta paper, Table 4)."""
    windows = prepared.windows(["targets", "target_values"])
    items = pc.list_flatten(windows["targets"]).to_numpy()
    values = pc.list_flatten(windows["target_values"]).to_numpy()
    baseline = RollingAverageValues.fit(items, values, prepared.dimensions.num_items)
    return next_value_rmse(baseline, prepared.test_histories(), data_config=job.config.data)["rmse"]


def format_summary(summary: dict[str, Any]) -> str:
    m, p = summary["metrics"], summary["most_pop"]
    ratio = m["recall@200"] / max(p["recall@200"], 1e-12)
    if summary.get("already_complete"):
        trained = (f"run {summary['run']!r} was already complete: nothing trained now; its summary "
                   f"of {summary['finished']} (raise --epochs to train on, or give another "
                   f"--run-name)")
    elif summary["epochs"] is None:
        trained = f"nothing left to train: evaluated {summary['checkpoint']} again"
    elif summary["resumed_from"]:
        first, last = summary["epochs"]
        trained = f"resumed from {summary['resumed_from']}; trained epochs {first}..{last}"
    else:
        trained = f"trained epochs 1..{summary['epochs'][1]}"
    lines = [
        trained,
        f"{summary['model']} on {summary['items']:,} items, {summary['train_events']:,} training "
        f"events, {summary['seconds']:.0f} s",
        f"{'':10s} {'p@200':>8s} {'r@200':>8s} {'HR@20':>8s} {'NDCG@20':>8s}",
        *(f"{name:10s} {x['precision@200']:8.4f} {x['recall@200']:8.4f} {x['hr@20']:8.4f} "
          f"{x['ndcg@20']:8.4f}" for name, x in ((summary["model"], m), ("MostPop", p))),
        f"r@200 vs MostPop: {ratio:.2f}x",
        *([f"next-event value RMSE: {m['value_rmse']:.4f} (rolling average: "
           f"{m['rolling_average_value_rmse']:.4f})"] if "value_rmse" in m else []),
        f"checkpoint: {summary['checkpoint']}",
        f"summary: {summary['summary']}",
    ]
    return "\n".join(lines)


def _absolute(config: JobConfig) -> JobConfig:
    """Local paths made absolute: Ray workers run in another working directory."""
    def resolve(uri: str) -> str:
        return uri if not uri or "://" in uri else os.path.abspath(uri)
    return config.replace(data={"events_uri": resolve(config.data.events_uri),
                                "work_dir": resolve(config.data.work_dir)},
                          storage={"uri": resolve(config.storage.uri)})


def _fingerprint(config: synthetic.SyntheticConfig) -> str:
    """Of the settings and of the generator's source: data generated by older code is never
    reused after the generator changes."""
    raw = json.dumps(dataclasses.asdict(config), sort_keys=True).encode()
    with open(synthetic.__file__, "rb") as source:
        raw += source.read()
    return hashlib.sha256(raw).hexdigest()[:12]
