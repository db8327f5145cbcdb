"""One job at a time per run: the lease file <storage>/<run>/lease.json.

Everything under a run assumes a single writer: the workers discard step directories newer than
the one they resume (another job's checkpoint in progress, otherwise), pruning deletes old ones,
and each job replaces the prepared data at <work_dir>/prepared-<run> that a running job streams.
So a second job of a run is refused while the first holds the lease, naming it. The holder renews
the lease every `renew_seconds`; one not renewed for `stale_seconds` (its driver was killed), or
whose driver process is gone from this host, is taken over with a warning. Created create-only (a hard link locally, If-None-Match on S3), so
of two jobs starting at once one wins.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
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
    """Another job holds the run's lease."""


@contextlib.contextmanager
def held(storage: StorageConfig, run: str, stale_seconds: float = STALE_SECONDS,
         renew_seconds: float = RENEW_SECONDS) -> Iterator[dict[str, Any]]:
    """Hold run `run`'s lease for the `with` block (renewed by a thread); yields the holder's
    record {"job", "host", "pid", "started", "renewed"}. Raises RunBusy if another job holds it."""
    fs, root = filesystem(storage)
    run_dir = posixpath.join(root, run)
    path = posixpath.join(run_dir, LEASE)
    made = is_local(fs) and not fs.exists(run_dir)
    fs.makedirs(run_dir, exist_ok=True)
    me = {"job": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _acquire(fs, path, me, stale_seconds)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(fs, path, me, stop, renew_seconds),
                               name=f"lease-{run}", daemon=True)
    renewer.start()
    try:
        yield me
    finally:
        stop.set()
        renewer.join()
        if (_read(fs, path) or {}).get("job") == me["job"]:
            fs.rm_file(path)
        if made and not fs.ls(run_dir):      # a job refused before any work leaves no run
            fs.rmdir(run_dir)


def _acquire(fs: fsspec.AbstractFileSystem, path: str, me: dict[str, Any],
             stale_seconds: float) -> None:
    for attempt in range(2):     # the second after a stale lease was removed
        try:
            _create_only(fs, path, _encode(me))
            return
        except FileExistsError:
            pass
        holder = _read(fs, path)
        if holder is None:       # released meanwhile
            continue
        age = time.time() - float(holder.get("renewed", 0))
        if (age < stale_seconds and not _gone(holder)) or attempt:
            raise RunBusy(f"{to_uri(fs, path)}: the run is held by job {holder.get('job')} on "
                          f"{holder.get('host')} (pid {holder.get('pid')}), started "
                          f"{holder.get('started')}, renewed {age:.0f} s ago: wait for it to end, "
                          f"or give this job its own --run-name (a lease not renewed for "
                          f"{stale_seconds:.0f} s is taken over)")
        logger.warning("%s: taking over the lease of job %s on %s (pid %s), renewed %.0f s ago: "
                       "its driver stopped without releasing it", to_uri(fs, path),
                       holder.get("job"), holder.get("host"), holder.get("pid"), age)
        fs.rm_file(path)
    raise RunBusy(f"{to_uri(fs, path)}: another job took the lease while this one started")


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the holder's driver ran on this host and its process is no more (a killed job
    rerun at once); a process that reuses its pid keeps the lease until it is stale."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:      # alive, another user's
        return False
    return False


def _renew(fs: fsspec.AbstractFileSystem, path: str, me: dict[str, Any], stop: threading.Event,
           every: float) -> None:
    while not stop.wait(every):
        try:
            holder = _read(fs, path) or {}
            if holder.get("job") != me["job"]:
                logger.error("%s: job %s no longer holds the run's lease (job %s does): this "
                             "job was taken for dead; stop one of them", to_uri(fs, path),
                             me["job"], holder.get("job"))
                return
            _publish(fs, path, lambda f: f.write(_encode(me)))   # whole, never half-written
        except OSError as error:   # a storage blip: the next renewal tries again
            logger.warning("%s: could not renew the run's lease: %s", to_uri(fs, path), error)


def _encode(me: dict[str, Any]) -> bytes:
    return json.dumps({**me, "renewed": time.time()}).encode()


def _read(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """The lease's record, None if there is none; an unreadable one counts as fresh."""
    try:
        fs.invalidate_cache(posixpath.dirname(path))
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"renewed": time.time()}
