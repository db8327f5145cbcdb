"""The main job's path (`jobs/taobao_hrnn.py --smoke-test`) on a local Ray with 2 workers:
it trains, evaluates, checkpoints, and a new job with more epochs resumes from the checkpoint."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dist_rec import checkpoint
from dist_rec.cli import build_parser, config_from_args
from dist_rec.data import synthetic
from dist_rec.train import pipeline
from dist_rec.train.launch import check_fits
from tests.train.test_metadata_path import write_world

pytestmark = pytest.mark.ray


def smoke_job(tmp_path, *extra: str) -> pipeline.JobSpec:
    args = build_parser().parse_args(["train", "--smoke-test", "--work-dir", str(tmp_path / "data"),
                                      "--storage", str(tmp_path / "runs"), *extra])
    return pipeline.JobSpec.from_args(args, config_from_args)


# Window shards of 300 rows (~9 files), so Ray Data reads several blocks at once.
SMALL_SHARDS = ("--set", "data.rows_per_shard=300")


@pytest.fixture(scope="module")
def smoke_run(ray_cluster, tmp_path_factory) -> dict:
    """One smoke job (1 epoch) that several tests read: its directory, its summary and its
    item tables as trained."""
    directory = tmp_path_factory.mktemp("smoke")
    job = smoke_job(directory, *SMALL_SHARDS)
    first = pipeline.run(job)
    return {"directory": directory, "summary": first,
            "tables": checkpoint.gather_full_table(job.config.storage, first["checkpoint"])}


def test_smoke_job_trains_checkpoints_and_resumes(smoke_run):
    tmp_path, first = smoke_run["directory"], smoke_run["summary"]
    job = smoke_job(tmp_path, *SMALL_SHARDS)
    assert job.config.train.num_workers == 2 and job.config.model.name == "hrnn"
    metrics = first["metrics"]
    assert metrics["epoch"] == 1
    for name in ("precision@200", "recall@200", "hr@20", "ndcg@20"):
        assert 0 < metrics[name] <= 1
        assert 0 < first["most_pop"][name] <= 1
    manifest = checkpoint.read_manifest(job.config.storage, first["checkpoint"])
    assert manifest["world_size"] == 2
    assert manifest["num_rows"] == first["items"] + 1
    assert manifest["dimensions"]["num_items"] == first["items"]   # what the data gave the model
    printed = pipeline.format_summary(first)
    assert "r@200 vs MostPop" in printed and first["checkpoint"] in printed
    assert printed.startswith("trained epochs 1..1")
    saved = json.loads((tmp_path / "runs" / "smoke" / "summary.json").read_text())
    assert saved["metrics"] == metrics and saved["most_pop"] == first["most_pop"]

    # The same command again: nothing left to train, and it says so with the saved figures.
    again = pipeline.run(smoke_job(tmp_path, *SMALL_SHARDS))
    assert again["already_complete"] and again["metrics"] == metrics
    assert "already complete: nothing trained now" in pipeline.format_summary(again)
    # Another model under the same run name is refused before any work, naming the difference.
    with pytest.raises(ValueError, match="name: 'hrnn' there, 'gru4rec' here.*--run-name"):
        pipeline.run(smoke_job(tmp_path, *SMALL_SHARDS, "--model", "gru4rec"))

    # A new job with 2 epochs finds the 1-epoch checkpoint and trains only the second epoch;
    # with --keep-last 1 its checkpoint prunes the first.
    second = pipeline.run(smoke_job(tmp_path, *SMALL_SHARDS, "--epochs", "2", "--keep-last", "1"))
    assert second["metrics"]["epoch"] == 2
    assert second["metrics"]["step"] == 2 * metrics["step"]
    assert pipeline.format_summary(second).startswith(f"resumed from {first['checkpoint']}; "
                                                      f"trained epochs 2..2")
    assert checkpoint.list_checkpoints(job.config.storage, "smoke") == [second["checkpoint"]]
    after = checkpoint.gather_full_table(job.config.storage, second["checkpoint"])
    assert not torch.equal(smoke_run["tables"]["input"], after["input"])

    # A later job trains on from the newest. (Ray's snapshot of an earlier job listed the pruned
    # checkpoint, and Ray refused to start a run of the same name.) Ray's files do not outlive a
    # job: the run holds only its checkpoints and summary.
    third = pipeline.run(smoke_job(tmp_path, *SMALL_SHARDS, "--epochs", "3", "--keep-last", "1"))
    assert third["resumed_from"] == second["checkpoint"] and third["metrics"]["epoch"] == 3
    assert checkpoint.list_checkpoints(job.config.storage, "smoke") == [third["checkpoint"]]
    assert sorted(os.listdir(tmp_path / "runs" / "smoke")) == ["checkpoints", "summary.json"]


def test_too_few_test_users_for_the_workers_fail_before_training(ray_cluster, tmp_path):
    """Each of 2 workers evaluates its own share of the held-out users: 1 is refused after the
    data is prepared and before Ray trains an epoch (no run directory is made)."""
    with pytest.raises(ValueError, match="1 test users for 2 workers"):
        pipeline.run(smoke_job(tmp_path, "--test-users", "1"))
    assert not (tmp_path / "runs" / "smoke").exists()


def test_a_job_the_local_ray_cannot_place_is_refused(ray_cluster, tmp_path):
    """The local Ray cannot grow: GPUs it lacks would be waited for without end, and workers on
    every CPU leave none to read the data. Refused once Ray is up, before the data is made."""
    assert check_fits(smoke_job(tmp_path).config, {"CPU": 3.0}) is None     # 2 workers + 1
    check_fits(smoke_job(tmp_path, "--gpu").config, {"CPU": 3.0, "GPU": 2.0})
    with pytest.raises(ValueError, match=r"--gpu: 2 worker\(s\) need a GPU each and the local "
                                         r"Ray has 0: train without --gpu"):
        check_fits(smoke_job(tmp_path, "--gpu").config, {"CPU": 3.0})
    with pytest.raises(ValueError, match="--workers 3 with 1 CPU each, and one CPU for reading "
                                         "the data, need 4 CPUs; the local Ray has 3"):
        pipeline.run(smoke_job(tmp_path, "--workers", "3", "--run-name", "three"))   # 3 CPUs
    assert not (tmp_path / "runs" / "three").exists() and not (tmp_path / "data").exists()


def test_a_cluster_too_small_for_the_job_is_said(tmp_path, caplog):
    """A cluster may grow (an autoscaler), so the shortfall is not refused, but said: on a
    `ray start --num-cpus 2` head, 2 workers left Ray Data no CPU and the job hung silently."""
    with caplog.at_level(logging.INFO, logger="dist_rec.train.launch"):
        check_fits(smoke_job(tmp_path).config, {"CPU": 3.0}, can_grow=True)
        assert not caplog.records
        check_fits(smoke_job(tmp_path, "--gpu").config, {"CPU": 2.0}, can_grow=True)
    assert caplog.messages == [
        "--gpu: 2 worker(s) need a GPU each and the cluster has 0; --workers 2 with 1 CPU each, "
        "and one CPU for reading the data, need 3 CPUs; the cluster has 2 now: the job waits "
        "until the cluster grows (an autoscaler adds nodes), and without end if it cannot"]


def test_a_saved_summary_answers_only_for_its_checkpoint_data_and_seed(tmp_path):
    config = smoke_job(tmp_path).config
    summary = {"checkpoint": "c", "config": json.loads(json.dumps(config.to_dict(redact=True)))}
    assert pipeline._evaluated_alike(summary, "c", config)
    assert pipeline._evaluated_alike(summary, "c", config.replace(train={"epochs": 5}))
    assert not pipeline._evaluated_alike(summary, "d", config)
    assert not pipeline._evaluated_alike(summary, "c", config.replace(train={"seed": 1}))
    assert not pipeline._evaluated_alike(summary, "c", config.replace(data={"test_users": 50}))
    other_sessions = config.replace(data={"session_gap_seconds": 600})
    assert not pipeline._evaluated_alike(summary, "c", other_sessions)
    assert not pipeline._evaluated_alike(summary, "c", config.replace(generate={"num_items": 9}))
    assert pipeline._evaluated_alike({"checkpoint": "c"}, "c", config)   # older code's summary


class TrainingStarted(Exception):
    pass


def test_a_checkpoint_of_other_data_is_refused_before_training(ray_cluster, tmp_path, monkeypatch):
    """The run's checkpoint was trained on other data: one event type fewer (as before a new
    type was logged), or another vocabulary. The job refuses it once the data is prepared and
    before Ray trains (whose workers would fail to load it, and be retried), naming the
    difference. A checkpoint of older code, without recorded sizes, is checked on its
    vocabulary alone."""
    def training_started(config, prepared_uri):
        raise TrainingStarted
    monkeypatch.setattr(pipeline, "run_training", training_started)
    job = smoke_job(tmp_path)
    prepared = pipeline.prepare_data(job)
    sizes = dataclasses.asdict(prepared.dimensions)
    types = sizes["num_event_types"]

    def checkpoint_of(step, vocab_hash, dimensions):
        checkpoint.save_checkpoint(job.config.storage, "smoke", step, {"input": torch.zeros(3, 2)},
                                   {"step": step, "epoch": 0}, vocab_hash=vocab_hash,
                                   config=job.config.to_dict(), dimensions=dimensions)

    checkpoint_of(1, prepared.vocab_hash, {**sizes, "num_event_types": types - 1})
    with pytest.raises(ValueError, match=rf"a model of other data at .*step-000000001 "
                                         rf"\(num_event_types: {types - 1} there, {types} here\)"
                                         rf".*--run-name"):
        pipeline.run(job)
    checkpoint_of(2, "0ther", sizes)
    with pytest.raises(ValueError, match=rf"\(vocabulary: '0ther' there, "
                                         rf"'{prepared.vocab_hash}' here\)"):
        pipeline.run(job)
    checkpoint_of(3, prepared.vocab_hash, None)
    with pytest.raises(TrainingStarted):
        pipeline.run(job)


def test_max_steps_ends_the_run_and_a_rerun_trains_nothing(ray_cluster, tmp_path):
    """--max-steps 3 of 2 epochs (~5 steps each): 3 steps in all, the cut epoch counted as done;
    the same command again finds the cap reached and trains no further step, and without the
    run's summary evaluates the checkpoint again and saves that as the summary."""
    command = ("--max-steps", "3", "--epochs", "2", "--run-name", "capped")
    first = pipeline.run(smoke_job(tmp_path, *command))
    assert (first["metrics"]["step"], first["metrics"]["epoch"]) == (3, 1)
    again = pipeline.run(smoke_job(tmp_path, *command))
    assert again["already_complete"] and again["metrics"]["step"] == 3

    # Complete, but its summary lost (as when a worker dies between the last commit and its
    # report): the workers restore the checkpoint, train nothing, and report its evaluation.
    (tmp_path / "runs" / "capped" / "summary.json").unlink()
    evaluated = pipeline.run(smoke_job(tmp_path, *command))
    assert evaluated["checkpoint"] == first["checkpoint"] and evaluated["epochs"] is None
    ranking = {k: v for k, v in first["metrics"].items() if "@" in k}
    assert ranking and {k: evaluated["metrics"][k] for k in ranking} == pytest.approx(ranking)
    assert pipeline.format_summary(evaluated).startswith(
        f"nothing left to train: evaluated {first['checkpoint']} again")
    # The evaluation is saved as the run's summary: the same command then finds it. (A summary
    # of other data settings, e.g. another session gap, is not taken: the unit test above.)
    again = pipeline.run(smoke_job(tmp_path, *command))
    assert again["already_complete"] and again["metrics"] == evaluated["metrics"]


def test_two_runs_of_one_config_train_the_same_model(smoke_run):
    """Window shards of 300 rows (~9 files, so Ray Data reads several blocks at once): a second
    run of the smoke run's config and seed ends with the same loss, metrics and item tables, bit
    for bit. Before the ingest preserved the files' order, each worker took whichever block was
    read first and every run differed (losses 7.316 / 7.273 / 7.333 in three runs)."""
    job = smoke_job(smoke_run["directory"], *SMALL_SHARDS, "--run-name", "twin")
    twin = pipeline.run(job)
    windows = Path(pipeline.prepared_uri(job.config)) / "windows"
    assert len(list(windows.glob("*.parquet"))) >= 8
    timing = {"events_per_second", "train_seconds", "checkpoint"}
    first, second = ({k: v for k, v in run["metrics"].items() if k not in timing}
                     for run in (smoke_run["summary"], twin))
    assert first == second
    tables = checkpoint.gather_full_table(job.config.storage, twin["checkpoint"])
    for name in smoke_run["tables"]:
        assert torch.equal(smoke_run["tables"][name], tables[name]), name


def test_hrnn_meta_streams_contexts_and_values_to_two_workers(ray_cluster, tmp_path):
    """Parquet events with a device, a value and a user segment column: the optional window
    columns go through Ray Data to 2 DDP workers with row-sharded item tables (eq. 2's mixed rows
    on each shard, cold catalog items at lambda = 1), and the value head's RMSE comes back with
    the ranking metrics. (Replicated tables train and rank as sharded ones:
    tests/embeddings/test_sharded.py; the smoke runs above replicate.)"""
    (tmp_path / "events").mkdir()
    write_world(tmp_path / "events" / "part-0.parquet", num_users=2_000)
    # The catalog lists 10 items beyond the events' 40: cold items, ranked from their features.
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"item_id": np.arange(1, 51), "category_id": np.ones(50, np.int64),
                             "brand": np.array(["acme", "bolt", "corp"])[np.arange(1, 51) % 3]}),
                   catalog)
    job = smoke_job(tmp_path, "--events", str(tmp_path / "events"), "--model", "hrnn_meta",
                    "--sharding", "row", "--item-catalog", str(catalog),
                    "--context-column", "device", "--values", "--user-features", "segment",
                    "--item-features", "brand",
                    "--test-users", "200",
                    "--epochs", "4", "--batch-size", "64", "--lr", "0.01", "--set",
                    'model.options={"value_head": true, "value_feedback": true, "feature_dim": 8}')
    result = pipeline.run(job)
    metrics = result["metrics"]
    assert metrics["epoch"] == 4 and metrics["hr@20"] > 0
    prepared = pipeline.PreparedData.load(pipeline.prepared_uri(job.config))
    assert prepared.dimensions.item_feature_sizes == (1, 3)      # category_id, brand
    assert prepared.dimensions.num_items == 50 and prepared.cold_items.sum() == 10
    # Offsets (sd 1) read from past values; predicting 0 would score ~1.02, the noise floor is 0.2.
    assert 0.2 < metrics["value_rmse"] < 0.6, metrics
    # The rolling average halves the user's offset with an item average near 0: far worse.
    assert metrics["rolling_average_value_rmse"] > 1.5 * metrics["value_rmse"], metrics
    assert (f"next-event value RMSE: {metrics['value_rmse']:.4f} (rolling average: "
            f"{metrics['rolling_average_value_rmse']:.4f})") in pipeline.format_summary(result)


def test_cli_config_round_trip(tmp_path, capsys):
    from dist_rec.cli import main

    assert main(["train", "--smoke-test", "--set", "data.session_gap_seconds=600",
                 "--hidden", "48", "--user-features", "segment, age", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"]["session_gap_seconds"] == 600
    assert printed["data"]["user_feature_columns"] == ["segment", "age"]
    assert printed["model"]["hidden_dim"] == 48
    assert printed["run_name"] == "smoke"
    (tmp_path / "run.json").write_text(json.dumps(printed))
    assert main(["train", "--config", str(tmp_path / "run.json"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == printed
    with pytest.raises(SystemExit):
        main(["train", "--set", "train.no_such_field=1", "--print-config"])


@pytest.mark.s3
def test_smoke_job_checkpoints_to_s3_and_a_new_job_resumes_from_there(ray_cluster, tmp_path, s3_storage):
    """The same path with everything on a real S3 API (moto on 127.0.0.1): the generated events,
    the prepared data the workers stream, Ray Train's run state and our checkpoints go to the
    bucket, and the second job restores from it, not from local disk. Credentials reach the Ray
    workers through the config (the cluster started without them)."""
    s3 = ["--storage", s3_storage.uri, "--work-dir", f"{s3_storage.uri}/data",
          "--s3-endpoint", s3_storage.endpoint_url,
          "--set", f"storage.key={s3_storage.key}", "--set", f"storage.secret={s3_storage.secret}",
          "--set", f"storage.region={s3_storage.region}"]
    first = pipeline.run(smoke_job(tmp_path, *s3))
    assert first["checkpoint"].startswith(s3_storage.uri + "/")
    manifest = checkpoint.read_manifest(s3_storage, first["checkpoint"])
    assert manifest["world_size"] == 2 and manifest["num_rows"] == first["items"] + 1

    second = pipeline.run(smoke_job(tmp_path, *s3, "--epochs", "2"))
    assert second["metrics"]["epoch"] == 2
    assert second["metrics"]["step"] == 2 * first["metrics"]["step"]       # only epoch 2 was trained
    assert checkpoint.latest_checkpoint(s3_storage, "smoke") == second["checkpoint"]
    assert not (tmp_path / "runs" / "smoke").exists() and not (tmp_path / "data").exists()  # all in S3


def test_synthetic_events_are_regenerated_when_the_generator_changes(tmp_path, monkeypatch):
    job = smoke_job(tmp_path)
    first = pipeline.events_uri(job)
    assert pipeline.events_uri(job) == first          # same settings, same code: reused
    changed = tmp_path / "synthetic.py"
    changed.write_bytes(Path(synthetic.__file__).read_bytes() + b"\n# a changed generator\n")
    monkeypatch.setattr(synthetic, "__file__", str(changed))
    second = pipeline.events_uri(job)
    assert second != first and Path(second).exists() and Path(first).exists()


def _train_worker_pids() -> list[int]:
    """Processes of Ray Train's workers (Ray names them ray::RayTrainWorker...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_worker_killed_mid_job_resumes_from_the_newest_checkpoint(ray_cluster, tmp_path):
    """SIGKILL one of the 2 workers once the first epoch's checkpoint is committed: Ray restarts
    the group, which resumes from the run's newest verified checkpoint, not from scratch (the
    kill may come before Ray registered that checkpoint), and the job ends with every epoch
    trained once (the steps of 2 uninterrupted epochs)."""
    import os
    import signal
    import threading
    import time

    job = smoke_job(tmp_path, "--epochs", "2")
    killed: list[tuple[str, bytes]] = []      # the newest commit at the kill, its manifest

    def kill_after_first_commit() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            newest = checkpoint.latest_checkpoint(job.config.storage, "smoke", verify=False)
            pids = _train_worker_pids()
            if newest and pids:
                manifest = (Path(newest) / "manifest.json").read_bytes()
                os.kill(pids[-1], signal.SIGKILL)
                killed.append((newest, manifest))
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_commit, daemon=True)
    killer.start()
    result = pipeline.run(job)
    killer.join(timeout=1)
    assert killed, "no worker was killed: the test did not test anything"
    # The retry resumed from that commit: it never wrote that step again.
    newest, manifest = killed[0]
    assert (Path(newest) / "manifest.json").read_bytes() == manifest
    at_kill = checkpoint.read_manifest(job.config.storage, newest)
    assert at_kill["epoch"] == 1                                   # killed in the second epoch
    assert result["metrics"]["epoch"] == 2 and result["metrics"]["step"] == 2 * at_kill["step"]
    manifest = checkpoint.read_manifest(job.config.storage, result["checkpoint"])
    assert manifest["epoch"] == 2 and manifest["step"] == result["metrics"]["step"]
