"""Load a committed checkpoint on any number of ranks, with weights_only=True everywhere.

Every file read is checked against the manifest (size, sha256). Table shards are memory-mapped and
read one at a time, so resharding N -> M holds at most one source shard besides the result.
"""
from __future__ import annotations

import pickle
import posixpath
from typing import Any, NamedTuple

import torch

from dist_rec.checkpoint.manifest import DENSE, tables_filename
from dist_rec.checkpoint.reshard import contributing_ranks, reshard
from dist_rec.checkpoint.store import fetched, filesystem, read_manifest, to_uri
from dist_rec.config import StorageConfig


class Loaded(NamedTuple):
    manifest: dict[str, Any]
    tables: dict[str, torch.Tensor]     # {name: (local rows, ...)} of this rank
    dense: dict[str, Any] | None        # rank 0's dense.pt, or None if it was not saved


def _torch_load(local: str, where: str, mmap: bool) -> Any:
    try:
        return torch.load(local, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{where}: holds objects other than tensors, numbers, strings and "
                         f"containers; refused by torch.load(weights_only=True): {error}") from None


def load_checkpoint(storage: StorageConfig, path: str, rank: int = 0, world_size: int = 1, *,
                    load_dense: bool = True, verify: bool = True) -> Loaded:
    """This rank's table rows (resharded when the checkpoint had another world size) + dense state.

    Rank `rank` of `world_size` gets global rows {i : i % world_size == rank} in increasing order;
    world_size 1 gives every row in global order. `verify` checks each file's sha256 before use.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    fs, directory = filesystem(storage, path)
    manifest = read_manifest(storage, path)
    files = manifest["files"]
    source_world = manifest["world_size"]

    def open_shard(source_rank: int) -> dict[str, torch.Tensor]:
        name = tables_filename(source_rank, source_world)
        file_path = posixpath.join(directory, name)
        with fetched(fs, file_path, files[name], verify) as local:
            # Memory-mapped: resharding copies only the rows this rank needs out of the shard.
            return _torch_load(local, to_uri(fs, file_path), mmap=True)

    ranks = contributing_ranks(manifest["num_rows"], source_world, rank, world_size)
    tables = reshard(manifest["num_rows"], source_world, manifest["tables"], rank, world_size,
                     ((r, open_shard(r)) for r in ranks))
    dense = None
    if load_dense and DENSE in files:
        dense_path = posixpath.join(directory, DENSE)
        with fetched(fs, dense_path, files[DENSE], verify) as local:
            dense = _torch_load(local, to_uri(fs, dense_path), mmap=False)
    return Loaded(manifest, tables, dense)


def gather_full_table(storage: StorageConfig, path: str, verify: bool = True) -> dict[str, torch.Tensor]:
    """Every table with all rows in global order, {name: (num_rows, ...)}, for single-process use."""
    return load_checkpoint(storage, path, 0, 1, load_dense=False, verify=verify).tables


def read_checkpoint_file(storage: StorageConfig, path: str, name: str, verify: bool = True) -> bytes:
    """The bytes of file `name` listed in the checkpoint's manifest (e.g. the vocabulary copy)."""
    manifest = read_manifest(storage, path)
    if name not in manifest["files"]:
        raise FileNotFoundError(f"{path}: the manifest lists no file {name!r}")
    fs, directory = filesystem(storage, path)
    with fetched(fs, posixpath.join(directory, name), manifest["files"][name], verify) as local:
        with open(local, "rb") as f:
            return f.read()
