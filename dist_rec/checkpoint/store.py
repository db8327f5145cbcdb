"""Write, commit, list and prune checkpoints on a local path or s3://bucket/prefix (fsspec/s3fs).

Why the commit protocol looks like this: object stores have no atomic rename (`mv` on S3 is copy +
delete), and s3fs publishes an object even when the writer raises inside `with fs.open(p, "wb")`.
So every file is first written whole to a local staging file and published in one call (os.replace
locally, one upload on S3), and a checkpoint exists only once rank 0 writes manifest.json LAST and
create-only (If-None-Match on S3, a hard link locally). A directory without a valid manifest, or whose
files disagree with the manifest's sizes or sha256 checksums, is incomplete and ignored.

Every rank calls write_rank_files(); after a barrier (the caller's job) rank 0 calls commit().
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from dist_rec.checkpoint.manifest import (DENSE, MANIFEST, build_manifest, check_plain,
                                          UnsupportedFormat, parse_manifest, receipt_filename,
                                          step_dirname, table_specs, tables_filename)
from dist_rec.config import StorageConfig
from dist_rec.storage import filesystem as storage_filesystem

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step-(\d{9})$")
_CHUNK = 8 << 20
# Staging files come from mkstemp, which makes them 0600; published, they get the mode any file
# gets (0666 less the umask), so a serving process of another user can read the checkpoint.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def filesystem(storage: StorageConfig, uri: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for `uri` (default: storage.uri) with storage's options."""
    uri = storage.uri if uri is None else uri
    protocol = fsspec.core.split_protocol(uri)[0]
    # s3 options (client_kwargs...) mean nothing to the local filesystem: not passed to it.
    remote = protocol not in (None, "file", "local")
    return storage_filesystem(uri, storage.storage_options() if remote else None)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """What users see: a plain path locally, s3://bucket/key otherwise (never credentials)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def checkpoint_path(storage: StorageConfig, run: str, step: int) -> str:
    """URI of the checkpoint directory of `run` at `step`."""
    fs, root = filesystem(storage)
    return to_uri(fs, posixpath.join(root, run, "checkpoints", step_dirname(step)))


def file_record(local_path: str) -> dict[str, Any]:
    """{"sha256", "bytes"} of a local file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(local_path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def _publish(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[BinaryIO], None]) -> dict[str, Any]:
    """Stage `write`'s output in a local file, then publish it whole at `path`; returns its record.

    If `write` raises, nothing appears at `path`. Local staging sits next to the target so that
    os.replace is an atomic rename on one filesystem.
    """
    fd, staging = tempfile.mkstemp(prefix=".staging-", suffix=".tmp",
                                   dir=posixpath.dirname(path) if is_local(fs) else None)
    if is_local(fs):   # an upload's staging copy in the shared temp directory stays private
        os.fchmod(fd, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the manifest can vouch for it
        record = file_record(staging)
        if is_local(fs):
            os.replace(staging, path)
        else:
            fs.put_file(staging, path)
        return record
    except (OSError, RuntimeError) as error:
        raise _naming(error, f"{to_uri(fs, path)}: could not write it") from error
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def _naming(error: Exception, where: str) -> Exception:
    """`error`, of its own class, with `where` in front: a full disk or a storage error names no
    file, and torch.save reports one as a RuntimeError whose text hides it."""
    try:
        if isinstance(error, OSError) and error.errno is not None:
            return type(error)(error.errno, f"{where}: {error.strerror}")
        hidden = error.__context__
        if isinstance(hidden, OSError) and hidden.strerror:
            return type(error)(f"{where}: {hidden.strerror} ({error})")
        return type(error)(f"{where}: {error}")
    except TypeError:            # a class whose constructor takes other arguments
        return RuntimeError(f"{where}: {type(error).__name__}: {error}")


def _create_only(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path` unless something is already there (FileExistsError)."""
    if not is_local(fs):
        fs.pipe_file(path, data, mode="create")
        return
    fd, staging = tempfile.mkstemp(prefix=".staging-", suffix=".tmp", dir=posixpath.dirname(path))
    os.fchmod(fd, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(staging, path)  # atomic and fails if `path` exists, unlike os.replace
    finally:
        os.remove(staging)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its bytes: torch.save writes a view's whole storage."""
    tensor = tensor.detach().cpu()
    owns = (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.nbytes)
    return tensor if owns else tensor.clone(memory_format=torch.contiguous_format)


def write_rank_files(storage: StorageConfig, run: str, step: int, rank: int, world_size: int,
                     tables: Mapping[str, torch.Tensor], dense: Mapping[str, Any] | None = None,
                     extra_files: Mapping[str, str] | None = None) -> str:
    """Write this rank's share of checkpoint `step`; returns the checkpoint URI (not yet committed).

    tables: {name: (local rows, ...)} in the row-wise modulo layout, e.g. input (rows, E),
        output (rows, D), bias (rows,), optimizer state (rows,); every rank passes the same names.
    dense (rank 0 only): encoder state_dict, dense optimizer state, sampler counts, data position,
        RNG states... anything made of tensors, numbers, strings, None, lists, tuples and dicts.
    extra_files (rank 0 only): {name in the checkpoint: source path or URI}, copied byte for byte
        (e.g. the vocabulary), read with this storage's options.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if rank != 0 and (dense is not None or extra_files):
        raise ValueError(f"rank {rank}: only rank 0 writes the dense state and extra files")
    fs, directory = filesystem(storage, checkpoint_path(storage, run, step))
    where = to_uri(fs, directory)
    fs.invalidate_cache(directory)
    if fs.exists(posixpath.join(directory, MANIFEST)):
        raise FileExistsError(f"{where} is already committed; refusing to overwrite its files")
    rows, specs = table_specs(tables, f"{where} rank {rank}")
    if dense is not None:
        check_plain(dict(dense), "dense state")
    if is_local(fs):
        os.makedirs(directory, exist_ok=True)

    files = {}
    name = tables_filename(rank, world_size)
    shard = {key: _compact(value) for key, value in tables.items()}
    files[name] = _publish(fs, posixpath.join(directory, name), lambda f: torch.save(shard, f))
    if dense is not None:
        files[DENSE] = _publish(fs, posixpath.join(directory, DENSE), lambda f: torch.save(dict(dense), f))
    for name, source in (extra_files or {}).items():
        if "/" in name or name in (MANIFEST, DENSE) or name.startswith(("tables-", "files-", ".")):
            raise ValueError(f"extra file name {name!r} is reserved or not a plain file name")
        files[name] = _publish(fs, posixpath.join(directory, name), _copier(storage, source))

    # The receipt goes last: its presence says this rank's files are all in place.
    receipt = {"step": step, "rank": rank, "world_size": world_size, "rows": rows,
               "tables": specs, "files": files}
    data = json.dumps(receipt, indent=1).encode()
    _publish(fs, posixpath.join(directory, receipt_filename(rank, world_size)), lambda f: f.write(data))
    logger.debug("rank %d wrote %s to %s", rank, sorted(files), where)
    return where


def _copier(storage: StorageConfig, source: str) -> Callable[[BinaryIO], None]:
    def copy(out: BinaryIO) -> None:
        fs, path = filesystem(storage, source)
        with fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
    return copy


def commit(storage: StorageConfig, run: str, step: int, world_size: int, *, epoch: int = 0,
           vocab_hash: str = "", config: Mapping[str, Any] | None = None,
           dimensions: Mapping[str, Any] | None = None) -> str:
    """Rank 0, after every rank's write_rank_files returned: write manifest.json; returns the URI.

    Collects the ranks' receipts (checksums, sizes, rows), checks the shards fit the modulo layout
    and that every file is present at its size, then writes the manifest create-only. `config` is
    stored with storage credentials masked.
    """
    fs, directory = filesystem(storage, checkpoint_path(storage, run, step))
    where = to_uri(fs, directory)
    fs.invalidate_cache(directory)
    receipts = []
    for rank in range(world_size):
        name = receipt_filename(rank, world_size)
        try:
            receipt = json.loads(fs.cat_file(posixpath.join(directory, name)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: rank {rank} has not written its files ({name} missing); "
                                    f"commit only after every rank's write_rank_files returned") from None
        if (receipt.get("step"), receipt.get("rank"), receipt.get("world_size")) != (step, rank, world_size):
            raise ValueError(f"{where}/{name}: receipt is for step {receipt.get('step')}, rank "
                             f"{receipt.get('rank')} of {receipt.get('world_size')}")
        receipts.append(receipt)
    manifest = build_manifest(step, world_size, receipts, epoch=epoch, vocab_hash=vocab_hash,
                              config=config, dimensions=dimensions, where=where)
    problems = size_problems(fs, directory, manifest["files"])
    if problems:
        raise RuntimeError(f"{where}: cannot commit: {'; '.join(problems)}")
    _create_only(fs, posixpath.join(directory, MANIFEST), json.dumps(manifest, indent=2).encode())
    logger.info("committed checkpoint %s (step %d, %d rank(s), %d rows)", where, step, world_size,
                manifest["num_rows"])
    return where


def save_checkpoint(storage: StorageConfig, run: str, step: int, tables: Mapping[str, torch.Tensor],
                    dense: Mapping[str, Any] | None = None, *, epoch: int = 0, vocab_hash: str = "",
                    config: Mapping[str, Any] | None = None,
                    dimensions: Mapping[str, Any] | None = None,
                    extra_files: Mapping[str, str] | None = None) -> str:
    """Single-process save (world size 1): write_rank_files + commit. tables: {name: (rows, ...)}."""
    write_rank_files(storage, run, step, 0, 1, tables, dense, extra_files)
    return commit(storage, run, step, 1, epoch=epoch, vocab_hash=vocab_hash, config=config,
                  dimensions=dimensions)


def size_problems(fs: fsspec.AbstractFileSystem, directory: str, files: Mapping[str, Any]) -> list[str]:
    """What is missing or has the wrong size, from one listing of the directory (cheap on S3)."""
    fs.invalidate_cache(directory)
    sizes = {posixpath.basename(entry["name"]): entry["size"] for entry in fs.ls(directory, detail=True)}
    problems = []
    for name, record in files.items():
        if name not in sizes:
            problems.append(f"{name} missing")
        elif sizes[name] != record["bytes"]:
            problems.append(f"{name} has {sizes[name]} bytes, expected {record['bytes']}")
    return problems


def read_manifest(storage: StorageConfig, path: str) -> dict[str, Any]:
    """The parsed manifest of the checkpoint at `path` (FileNotFoundError if uncommitted)."""
    fs, directory = filesystem(storage, path)
    manifest_path = posixpath.join(directory, MANIFEST)
    return parse_manifest(fs.cat_file(manifest_path), to_uri(fs, manifest_path))


def _step_dirs(storage: StorageConfig, run: str) -> tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]:
    """All step directories of `run`, committed or not, newest first."""
    fs, root = filesystem(storage)
    root = posixpath.join(root, run, "checkpoints")
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return fs, []
    found = []
    for entry in fs.ls(root, detail=False):
        match = _STEP_DIR.match(posixpath.basename(entry.rstrip("/")))
        if match:
            found.append((int(match.group(1)), entry.rstrip("/")))
    return fs, sorted(found, reverse=True)


@contextlib.contextmanager
def fetched(fs: fsspec.AbstractFileSystem, path: str, record: Mapping[str, Any],
            verify: bool = True) -> Iterator[str]:
    """A local copy of `path` (the file itself when local), checked against its manifest record:
    size always, sha256 with verify. Raises CorruptFile naming the file on a mismatch."""
    if is_local(fs):
        _check_file(path, to_uri(fs, path), record, verify)
        yield path
        return
    fd, local = tempfile.mkstemp(prefix=".fetch-", suffix=".tmp")
    os.close(fd)
    try:
        fs.get_file(path, local)
        _check_file(local, to_uri(fs, path), record, verify)
        yield local
    finally:
        os.remove(local)


class CorruptFile(ValueError):
    """A checkpoint file that disagrees with its manifest record (size or sha256)."""


def _check_file(local: str, where: str, record: Mapping[str, Any], verify: bool) -> None:
    size = os.path.getsize(local)
    if size != record["bytes"]:
        raise CorruptFile(f"{where}: {size} bytes, the manifest says {record['bytes']}")
    if verify and file_record(local)["sha256"] != record["sha256"]:
        raise CorruptFile(f"{where}: sha256 differs from the manifest (corrupt or overwritten)")


def _problem(fs: fsspec.AbstractFileSystem, directory: str, verify: bool) -> str | None:
    manifest_path = posixpath.join(directory, MANIFEST)
    try:
        manifest = parse_manifest(fs.cat_file(manifest_path), to_uri(fs, manifest_path))
    except FileNotFoundError:
        return "no manifest (not committed)"
    except UnsupportedFormat:
        raise                       # another version's commit: not ours to skip or delete
    except ValueError as error:
        return str(error)
    problems = size_problems(fs, directory, manifest["files"])
    if not problems and verify:
        for name, record in manifest["files"].items():
            try:
                with fetched(fs, posixpath.join(directory, name), record):
                    pass
            except ValueError as error:
                problems.append(str(error))
    return "; ".join(problems) or None


def check_checkpoint(storage: StorageConfig, path: str, verify: bool = True) -> str | None:
    """Why the checkpoint at `path` is not usable, or None if it is complete.

    Complete: a valid manifest and every listed file present at its size; with verify, also every
    file's sha256 (this reads every byte, downloading it from S3).
    """
    return _problem(*filesystem(storage, path), verify)


def list_checkpoints(storage: StorageConfig, run: str) -> list[str]:
    """URIs of the committed checkpoints of `run` whose files are all present at their sizes,
    newest first (checksums are not read; latest_checkpoint does that)."""
    fs, steps = _step_dirs(storage, run)
    return [to_uri(fs, d) for _, d in steps if _problem(fs, d, verify=False) is None]


def latest_checkpoint(storage: StorageConfig, run: str, verify: bool = True) -> str | None:
    """URI of the newest complete checkpoint of `run` (checksums verified), or None.

    Newer directories that are half-written or corrupt are skipped with a warning.
    """
    fs, steps = _step_dirs(storage, run)
    for _, directory in steps:
        problem = _problem(fs, directory, verify)
        if problem is None:
            return to_uri(fs, directory)
        logger.warning("skipping checkpoint %s: %s", to_uri(fs, directory), problem)
    return None


def discard_newer(storage: StorageConfig, run: str, step: int) -> list[str]:
    """Remove every step directory of `run` newer than `step`; returns the removed URIs.

    For a run resuming from its newest complete checkpoint at `step` (0: none): everything newer
    is half-written or corrupt, and a committed one would stop the resumed run when it reaches that
    step again (write_rank_files never overwrites a commit). Call it from one process only.
    """
    fs, steps = _step_dirs(storage, run)
    removed = []
    for newer, directory in steps:
        if newer > step:
            logger.warning("removing %s, newer than the resumed step %d: %s", to_uri(fs, directory),
                           step, _problem(fs, directory, verify=False) or "checksums differ")
            _remove(fs, directory)
            removed.append(to_uri(fs, directory))
    return removed


def _remove(fs: fsspec.AbstractFileSystem, directory: str) -> None:
    # The manifest goes first so that a half-finished removal reads as incomplete.
    manifest = posixpath.join(directory, MANIFEST)
    if fs.exists(manifest):
        fs.rm_file(manifest)
    fs.rm(directory, recursive=True)


def prune(storage: StorageConfig, run: str, keep_last: int | None = None) -> list[str]:
    """Keep the newest `keep_last` (default storage.keep_last) complete checkpoints; remove older
    complete ones and incomplete ones older than the newest complete one (newer incomplete ones may
    still be in progress). Completeness is the cheap check of list_checkpoints. Returns removed URIs."""
    keep_last = storage.keep_last if keep_last is None else keep_last
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    fs, steps = _step_dirs(storage, run)
    kept = 0
    newest_complete = None
    removed = []
    for step, directory in steps:
        complete = _problem(fs, directory, verify=False) is None
        if complete and kept < keep_last:
            kept += 1
            newest_complete = step if newest_complete is None else newest_complete
            continue
        if complete or (newest_complete is not None and step < newest_complete):
            _remove(fs, directory)
            removed.append(to_uri(fs, directory))
    if removed:
        logger.info("pruned %d checkpoint(s) of run %s", len(removed), run)
    return removed
