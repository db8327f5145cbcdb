"""One job at a time per run: the lease file <storage>/<run>/lease.json.

Everything under a run assumes a single writer: the workers discard step directories newer than
the one they resume (another job's checkpoint in progress, otherwise), pruning deletes old ones,
and each job replaces the run's prepared data, which a running job streams. So a second job of a
run is refused while the first holds the lease, naming it.

The holder's driver renews the lease every `renew_seconds`. A lease not renewed for
`stale_seconds` (its driver was killed), or whose driver process is gone from this machine, is
taken over with a warning; a job that finds its lease taken over, or cannot renew it for
`stale_seconds`, stops (RunBusy). The lease and each takeover are created create-only (a hard link
locally, If-None-Match on S3: a store without conditional writes gives no exclusion), so of two
jobs starting at once, or taking over one stale lease at once, one wins.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import signal
import socket
import threading
import time
import uuid
from typing import Any, Iterator

import fsspec

from dist_rec.checkpoint.store import _create_only, _publish, filesystem, is_local, to_uri
from dist_rec.config import StorageConfig

logger = logging.getLogger(__name__)

LEASE = "lease.json"
STALE_SECONDS = 300.0
RENEW_SECONDS = 60.0


class RunBusy(RuntimeError):
    """Another job holds the run's lease, or took it from this one."""


@contextlib.contextmanager
def held(storage: StorageConfig, run: str, stale_seconds: float = STALE_SECONDS,
         renew_seconds: float = RENEW_SECONDS) -> Iterator[dict[str, Any]]:
    """Hold run `run`'s lease for the `with` block (renewed by a thread); yields the holder's
    record {"job", "host", "pid", "machine", "started"}. Raises RunBusy if another job holds it,
    or, inside the block, once this job has lost it."""
    fs, root = filesystem(storage)
    run_dir = posixpath.join(root, run)
    path = posixpath.join(run_dir, LEASE)
    made = is_local(fs) and not fs.exists(run_dir)
    if is_local(fs):          # s3fs's makedirs would create a missing bucket
        fs.makedirs(run_dir, exist_ok=True)
    me = {"job": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
          "machine": _machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    takeover = _acquire(fs, path, me, stale_seconds)
    stop, lost = threading.Event(), threading.Event()
    renewer = threading.Thread(target=_renew, args=(fs, path, me, stop, lost, renew_seconds,
                                                    stale_seconds), name=f"lease-{run}", daemon=True)
    renewer.start()
    try:
        yield me
    except KeyboardInterrupt:
        if lost.is_set():     # _renew interrupted the main thread: this job must stop writing
            raise RunBusy(f"{to_uri(fs, path)}: job {me['job']} lost the run's lease (taken over, "
                          f"or not renewable for {stale_seconds:.0f} s) and stopped") from None
        raise
    finally:
        stop.set()
        renewer.join()
        try:                  # a failed cleanup must not hide the job's own outcome
            if (_read(fs, path) or {}).get("job") == me["job"]:
                fs.rm_file(path)
            if takeover:
                fs.rm_file(takeover)
            if made:          # a job refused before any work leaves no run behind
                with contextlib.suppress(OSError):
                    os.rmdir(run_dir)
        except Exception as error:
            logger.warning("%s: could not release the run's lease: %s", to_uri(fs, path), error)


def _acquire(fs: fsspec.AbstractFileSystem, path: str, me: dict[str, Any],
             stale_seconds: float) -> str | None:
    """Create the lease, or take over a stale one; returns the takeover marker's path, if any."""
    for attempt in range(2):     # the second after a stale lease was removed
        if _create(fs, path, _encode(me)):
            return None
        holder = _read(fs, path)
        if holder is None:       # released meanwhile
            continue
        age = time.time() - float(holder.get("renewed", 0))
        if (age < stale_seconds and not _gone(holder)) or attempt:
            raise RunBusy(f"{to_uri(fs, path)}: the run is held by job {holder.get('job')} on "
                          f"{holder.get('host')} (pid {holder.get('pid')}), started "
                          f"{holder.get('started')}, renewed {age:.0f} s ago: wait for it to end, "
                          f"or give this job its own --run-name (if its driver is dead, the lease "
                          f"is taken over in {max(stale_seconds - age, 0):.0f} s, once not renewed "
                          f"for {stale_seconds:.0f} s; at once when the driver was on this machine)")
        # One job takes over this stale record: the one that creates its marker. A job that read
        # the same record later finds the marker, and does not delete the new holder's lease.
        takeover = f"{path}.takeover-{holder.get('job')}-{holder.get('renewed')}"
        if not _create(fs, takeover, _encode(me)):
            raise RunBusy(f"{to_uri(fs, path)}: another job is taking over the stale lease of "
                          f"job {holder.get('job')}")
        logger.warning("%s: taking over the lease of job %s on %s (pid %s), renewed %.0f s ago: "
                       "its driver stopped without releasing it", to_uri(fs, path),
                       holder.get("job"), holder.get("host"), holder.get("pid"), age)
        fs.rm_file(path)
        if _create(fs, path, _encode(me)):
            return takeover
        fs.rm_file(takeover)
    raise RunBusy(f"{to_uri(fs, path)}: another job took the lease while this one started")


def _create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create-only write; False if something is there (an S3 conflict counts as there)."""
    try:
        _create_only(fs, path, data)
        return True
    except FileExistsError:
        return False
    except OSError:           # e.g. 409 ConditionalRequestConflict: a concurrent create
        if fs.exists(path):
            return False
        raise


def _renew(fs: fsspec.AbstractFileSystem, path: str, me: dict[str, Any], stop: threading.Event,
           lost: threading.Event, every: float, stale_seconds: float) -> None:
    renewed = time.time()
    while not stop.wait(every):
        try:
            holder = _read(fs, path) or {}
            if holder.get("job") != me["job"]:
                return _lose(lost, f"{to_uri(fs, path)}: job {holder.get('job')} took the run's "
                                   f"lease from job {me['job']}, which stops")
            _publish(fs, path, lambda f: f.write(_encode(me)))   # whole, never half-written
            renewed = time.time()
        except Exception as error:    # botocore's errors are not OSErrors; retried next time
            logger.warning("%s: could not renew the run's lease: %s", to_uri(fs, path), error)
            if time.time() - renewed > stale_seconds:
                return _lose(lost, f"{to_uri(fs, path)}: the run's lease was not renewed for "
                                   f"{stale_seconds:.0f} s, so another job may take it: job "
                                   f"{me['job']} stops")


def _lose(lost: threading.Event, message: str) -> None:
    logger.error(message)
    lost.set()
    # A KeyboardInterrupt in the job's main thread, which `held` turns into RunBusy. A real
    # signal, as Ctrl-C sends: it wakes a main thread blocked in a system call (ray.get, sleep).
    os.kill(os.getpid(), signal.SIGINT)


def _machine() -> str:
    """This machine and process namespace: a container sharing the host's name (--net=host) has
    its own pids, and its driver is not 'gone' because its pid is unknown here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""             # unknown: never judged gone, only stale


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the holder's driver ran on this machine and its process is no more (a killed job
    rerun at once); a process that reuses its pid keeps the lease until it is stale."""
    here = _machine()
    if not here or holder.get("machine") != here or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:      # alive, another user's
        return False
    return False


def _encode(me: dict[str, Any]) -> bytes:
    return json.dumps({**me, "renewed": time.time()}).encode()


def _read(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """The lease's record, None if there is none. One that is not ours to read (edited by hand,
    another tool's) counts as renewed when its file was last written: it goes stale too."""
    try:
        fs.invalidate_cache(posixpath.dirname(path))
        raw = fs.cat_file(path)
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("renewed"), (int, float)):
            return record
        return {"job": "(an unreadable lease.json)", "renewed": fs.modified(path).timestamp()}
    except FileNotFoundError:
        return None
