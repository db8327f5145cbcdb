"""One job at a time per run: the lease is create-only, names its holder to a second job, is
renewed while held, released at the end, and taken over once stale (a killed driver)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from dist_rec.checkpoint import lease
from dist_rec.checkpoint.lease import LEASE, RunBusy, held
from dist_rec.cli import main
from dist_rec.config import StorageConfig


def lease_of(storage: StorageConfig) -> dict | None:
    from dist_rec.checkpoint.store import filesystem
    fs, root = filesystem(storage)
    fs.invalidate_cache()
    path = f"{root}/run/{LEASE}"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request, tmp_path) -> StorageConfig:
    if request.param == "s3":
        return request.getfixturevalue("s3_storage")
    return StorageConfig(uri=str(tmp_path / "store"))


def test_a_second_job_is_refused_naming_the_holder_until_the_first_ends(storage):
    with held(storage, "run") as first:
        assert lease_of(storage)["job"] == first["job"]
        with pytest.raises(RunBusy, match=rf"held by job {first['job']} on .* \(pid "
                                          rf"{first['pid']}\).*its own --run-name"):
            with held(storage, "run"):
                pass
        with held(storage, "other run"):      # other runs are not held
            pass
        assert lease_of(storage)["job"] == first["job"]   # the refused job took nothing away
    assert lease_of(storage) is None
    with held(storage, "run") as second:
        assert second["job"] != first["job"]


def test_the_lease_is_renewed_while_held(storage):
    with held(storage, "run", renew_seconds=0.2) as me:
        first = lease_of(storage)["renewed"]
        deadline = time.time() + 10
        while lease_of(storage)["renewed"] == first and time.time() < deadline:
            time.sleep(0.1)
        renewed = lease_of(storage)
        assert renewed["job"] == me["job"] and renewed["renewed"] > first


def test_a_stale_lease_is_taken_over_with_a_warning(storage, caplog):
    """A lease its holder stopped renewing (the driver was killed) does not block the run."""
    with held(storage, "run", renew_seconds=3600) as dead:
        pass
    from dist_rec.checkpoint.store import filesystem
    fs, root = filesystem(storage)
    stale = {**dead, "renewed": time.time() - 600}
    fs.makedirs(f"{root}/run", exist_ok=True)      # gone locally with the lease that made it
    fs.pipe_file(f"{root}/run/{LEASE}", json.dumps(stale).encode())
    with pytest.raises(RunBusy):                                  # not stale at 1,000 s
        with held(storage, "run", stale_seconds=1000):
            pass
    with caplog.at_level(logging.WARNING), held(storage, "run", stale_seconds=300) as me:
        assert lease_of(storage)["job"] == me["job"] != dead["job"]
    assert f"taking over the lease of job {dead['job']}" in caplog.text


def test_the_lease_of_a_driver_gone_from_this_host_is_taken_over_at_once(storage, caplog):
    """A job killed here and rerun at once need not wait for its lease to go stale."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    from dist_rec.checkpoint.store import filesystem
    fs, root = filesystem(storage)
    fs.makedirs(f"{root}/run", exist_ok=True)
    fs.pipe_file(f"{root}/run/{LEASE}", json.dumps(
        {"job": "killed", "machine": lease._machine(), "pid": int(dead.stdout),
         "started": "", "renewed": time.time()}).encode())
    with caplog.at_level(logging.WARNING), held(storage, "run") as me:
        assert lease_of(storage)["job"] == me["job"]
    assert "taking over the lease of job killed" in caplog.text
    fs.makedirs(f"{root}/run", exist_ok=True)
    fs.pipe_file(f"{root}/run/{LEASE}", json.dumps(                 # alive: this process
        {"job": "alive", "machine": lease._machine(), "pid": os.getpid(), "started": "",
         "renewed": time.time()}).encode())
    with pytest.raises(RunBusy, match="held by job alive"):
        with held(storage, "run"):
            pass


def write_lease(storage: StorageConfig, record: dict) -> None:
    from dist_rec.checkpoint.store import filesystem
    fs, root = filesystem(storage)
    fs.makedirs(f"{root}/run", exist_ok=True)
    fs.pipe_file(f"{root}/run/{LEASE}", json.dumps(record).encode())


def test_an_unreadable_lease_goes_stale_from_when_it_was_written(storage, caplog):
    """A lease.json edited by hand (not JSON, or not a record with a time): it holds the run as
    fresh, then is taken over once its file is older than stale_seconds (not held for ever)."""
    from dist_rec.checkpoint.store import filesystem
    fs, root = filesystem(storage)
    fs.makedirs(f"{root}/run", exist_ok=True)
    for text in (b"null", b"[]", b'{"job": "x", "renewed": "soon"}', b"{ half a record"):
        fs.pipe_file(f"{root}/run/{LEASE}", text)
        with pytest.raises(RunBusy, match=r"held by job \(an unreadable lease.json\)"):
            with held(storage, "run", stale_seconds=60):
                pass
    time.sleep(2.5)                               # S3's LastModified has whole seconds
    with caplog.at_level(logging.WARNING), held(storage, "run", stale_seconds=2) as me:
        assert lease_of(storage)["job"] == me["job"]
    assert "taking over the lease of job (an unreadable lease.json)" in caplog.text


def test_of_two_jobs_taking_over_one_stale_lease_one_wins(storage, monkeypatch):
    """B read the stale record before A took it over: B must not delete A's new lease."""
    stale = {"job": "dead", "host": "elsewhere", "pid": 1, "renewed": time.time() - 600}
    write_lease(storage, stale)
    with held(storage, "run") as a:
        real_read = lease._read
        reads = iter([stale])                    # B's first read: the record before A came
        monkeypatch.setattr(lease, "_read", lambda fs, path: next(reads, None) or real_read(fs, path))
        with pytest.raises(RunBusy, match="another job is taking over the stale lease of job dead"):
            with held(storage, "run"):
                pass
        monkeypatch.setattr(lease, "_read", real_read)
        assert lease_of(storage)["job"] == a["job"]
    assert lease_of(storage) is None


def test_a_job_whose_lease_was_taken_stops(storage):
    with pytest.raises(RunBusy, match="lost the run's lease"):
        with held(storage, "run", renew_seconds=0.1) as me:
            write_lease(storage, {**lease_of(storage), "job": "usurper"})
            time.sleep(30)                        # interrupted by the renewer long before
    assert lease_of(storage)["job"] == "usurper" != me["job"]   # not the loser's to remove


def test_renewal_survives_storage_errors_and_stops_the_job_when_they_last(storage, monkeypatch,
                                                                        caplog):
    """botocore's connection errors are no OSErrors: the renewer logs them and tries again; once
    the lease went unrenewed for stale_seconds, another job may hold the run, so this one stops."""
    class EndpointConnectionError(Exception):
        pass

    def unreachable(fs, path, write):
        raise EndpointConnectionError("Could not connect to the endpoint URL")
    monkeypatch.setattr(lease, "_publish", unreachable)
    with caplog.at_level(logging.WARNING), pytest.raises(RunBusy, match="lost the run's lease"):
        with held(storage, "run", renew_seconds=0.1, stale_seconds=1.0):
            time.sleep(30)
    assert caplog.text.count("could not renew the run's lease: Could not connect") >= 5
    assert "not renewed for 1 s, so another job may take it" in caplog.text


def test_a_job_of_a_held_run_is_refused_before_any_work(tmp_path):
    """The command names the holder and exits; it prepares nothing (no data directory)."""
    storage = StorageConfig(uri=str(tmp_path / "runs"))
    for command in ("train", "prepare"):
        with held(storage, "smoke") as holder:
            with pytest.raises(SystemExit, match=f"held by job {holder['job']}"):
                main([command, "--smoke-test", "--work-dir", str(tmp_path / "data"),
                      "--storage", storage.uri])
    assert not (tmp_path / "data").exists()
    assert list((tmp_path / "runs").iterdir()) == []   # the lease made the run's directory


STOPPED_WHILE_PREPARING = """
import sys, time
from dist_rec import cli
from dist_rec.train import pipeline

def prepare_data(job):                    # the data step, long enough to be stopped in
    print("preparing", flush=True)
    time.sleep(60)
pipeline.prepare_data = prepare_data
cli.main(["prepare", "--smoke-test", "--storage", sys.argv[1], "--work-dir", sys.argv[2]])
"""


def test_a_job_stopped_with_sigterm_releases_its_lease(tmp_path):
    """`ray job stop` and schedulers' timeouts send SIGTERM: the job ends through its cleanup,
    so its rerun need not wait for the lease to go stale (here `prepare`, which runs no Ray)."""
    job = subprocess.Popen([sys.executable, "-c", STOPPED_WHILE_PREPARING, str(tmp_path / "runs"),
                            str(tmp_path / "data")], stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline() == "preparing\n"
        assert (tmp_path / "runs" / "smoke" / LEASE).exists()
        job.terminate()
        assert job.wait(timeout=30) == 128 + 15
    finally:
        job.kill()
        job.wait()
    assert list((tmp_path / "runs").iterdir()) == []      # lease and the run it made: gone
