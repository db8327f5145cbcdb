"""Ray Data streaming of the window shards to each Ray Train worker.

The driver opens the shard directory as a lazy `ray.data.Dataset` and hands it to the trainer;
each worker iterates its own split (`ray.train.get_dataset_shard`) batch by batch, so no process
ever holds the whole data set: memory per worker is bounded by the prefetch and shuffle buffers.
"""
from __future__ import annotations

from typing import Any, Iterator

import ray.data

from dist_rec.batch import SequenceBatch
from dist_rec.data.sequences import windows_to_batch
from dist_rec.storage import pyarrow_filesystem


def read_windows(uri: str, storage_options: dict[str, Any] | None = None) -> ray.data.Dataset:
    """Lazy dataset over the Parquet window shards under `uri` (local or s3://)."""
    fs, path = pyarrow_filesystem(uri, storage_options)
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])


def iterate_batches(shard: "ray.data.DataIterator", batch_size: int, seed: int, epoch: int,
                    shuffle_buffer: int = 4096) -> Iterator[SequenceBatch]:
    """This worker's windows as SequenceBatches, shuffled locally with a per-epoch seed."""
    for columns in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                      local_shuffle_buffer_size=shuffle_buffer or None,
                                      local_shuffle_seed=seed * 1_000_003 + epoch,
                                      prefetch_batches=2):
        yield windows_to_batch(columns)
