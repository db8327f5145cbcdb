"""Resharding N -> M under the row-wise modulo layout, one source shard at a time.

Source rank r of N holds global rows i = r + N*k at local row k; destination rank m of M needs the
rows with i % M == m, at local row i // M. Both sets are arithmetic progressions, so each
(source shard, destination rank) pair is one strided slice copy: no index tensors, and only one
source shard needs to be in memory (or memory-mapped) at a time.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from dist_rec.checkpoint.manifest import local_rows


def overlap(num_rows: int, source_rank: int, source_world: int,
            rank: int, world_size: int) -> tuple[slice, slice] | None:
    """(source local rows, destination local rows) that move from source shard to rank, or None.

    Row r + N*k is wanted iff N*k ≡ m - r (mod M). With g = gcd(N, M) that has solutions only when
    g divides m - r, and then they are k = k0 + j*(M/g). The matching destination rows (r + N*k) // M
    step by N/g, because one period moves the global row by N*M/g = lcm(N, M), a multiple of M.
    """
    g = math.gcd(source_world, world_size)
    difference = rank - source_rank
    if difference % g:
        return None
    period = world_size // g
    k0 = (difference // g) * pow(source_world // g, -1, period) % period
    source_rows = local_rows(num_rows, source_rank, source_world)
    if k0 >= source_rows:
        return None
    count = (source_rows - k0 + period - 1) // period
    stride = source_world // g
    start = (source_rank + source_world * k0) // world_size
    return (slice(k0, k0 + period * (count - 1) + 1, period),
            slice(start, start + stride * (count - 1) + 1, stride))


def contributing_ranks(num_rows: int, source_world: int, rank: int, world_size: int) -> list[int]:
    """Source ranks whose shards hold at least one row that `rank` of `world_size` needs."""
    return [r for r in range(source_world) if overlap(num_rows, r, source_world, rank, world_size)]


def reshard(num_rows: int, source_world: int, specs: dict[str, Any], rank: int, world_size: int,
            shards: Iterable[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Assemble rank's tables from source shards.

    specs: {name: {"shape": trailing dims, "dtype"}} from the manifest; shards yields
    (source rank, {name: (source local rows, ...)}) for every rank of contributing_ranks().
    Returns {name: (local_rows(num_rows, rank, world_size), ...)}.
    """
    rows = local_rows(num_rows, rank, world_size)
    out = {name: torch.empty(rows, *spec["shape"], dtype=getattr(torch, spec["dtype"]))
           for name, spec in specs.items()}
    filled = 0
    for source_rank, shard in shards:
        if set(shard) != set(specs):
            raise ValueError(f"shard of rank {source_rank} has tables {sorted(shard)}, "
                             f"the manifest lists {sorted(specs)}")
        span = overlap(num_rows, source_rank, source_world, rank, world_size)
        if span is None:
            continue
        source, destination = span
        for name, tensor in shard.items():
            out[name][destination] = tensor[source]
        filled += len(range(rows)[destination])
    if filled != rows:
        raise ValueError(f"rank {rank} of {world_size} received {filled} of its {rows} rows")
    return out

