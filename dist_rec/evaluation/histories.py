"""Per-user event histories: the input of the user-level protocols.

A `Histories` holds U users' events as lists of 1-D arrays in time order; `as_histories` builds one
from a pyarrow table with list columns user / items and optionally timestamps / event_types /
values / contexts (the output of data.sequences.build_histories; absent timestamps are zeros and
absent event types 1), or from a list of item arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from dist_rec.data.vocab import UNKNOWN_ITEM


@dataclass(frozen=True)
class Histories:
    """Per-user event arrays in time order: U users, each n_u events (int64 unless said)."""

    users: np.ndarray              # (U,) user ids, 0 = unknown
    items: list[np.ndarray]        # dense item ids >= 1, or UNKNOWN_ITEM
    timestamps: list[np.ndarray]   # unix seconds (zeros when the data has none)
    event_types: list[np.ndarray]  # codes 1..n (ones when the data has none)
    values: list[np.ndarray] | None = None     # float32 event values (HRNN-meta), when carried
    contexts: list[np.ndarray] | None = None   # int64 context codes (HRNN-meta), when carried

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def from_items(items: Sequence[np.ndarray], timestamps=None, event_types=None,
                   users=None) -> "Histories":
        """Per-user arrays; missing timestamps are 0, missing event types 1, missing users 0."""
        items = [np.asarray(x, dtype=np.int64) for x in items]
        fill = lambda given, value: ([np.full(len(x), value, np.int64) for x in items]  # noqa: E731
                                     if given is None else [np.asarray(x, np.int64) for x in given])
        users = np.zeros(len(items), np.int64) if users is None else np.asarray(users, np.int64)
        out = Histories(users, items, fill(timestamps, 0), fill(event_types, 1))
        for name in ("users", "timestamps", "event_types"):
            if len(getattr(out, name)) != len(items):
                raise ValueError(f"histories: {len(items)} rows of items, {name} has another count")
        for row, (x, t, e) in enumerate(zip(items, out.timestamps, out.event_types)):
            if len(x) != len(t) or len(x) != len(e):
                raise ValueError(f"histories: row {row} has {len(x)} items but {len(t)} "
                                 f"timestamps and {len(e)} event_types")
            if _invalid_ids(x).any():
                raise ValueError(f"histories: row {row} has item id {x[_invalid_ids(x)][0]} "
                                 f"(ids start at 1; {UNKNOWN_ITEM} = unknown item)")
        return out

    def lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.items), np.int64, len(self.items))

    def slices(self, rows: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> "Histories":
        """Users `rows` (R,), each cut to its events [starts[r], stops[r])."""
        cut = lambda arrays: [arrays[u][a:b] for u, a, b in zip(rows, starts, stops)]  # noqa: E731
        return self._map_events(cut, self.users[rows])

    def _map_events(self, function, users: np.ndarray) -> "Histories":
        """A Histories with `function` applied to every per-event list (absent ones stay None)."""
        per_event = {name: None if getattr(self, name) is None else function(getattr(self, name))
                     for name in ("items", "timestamps", "event_types", "values", "contexts")}
        return Histories(users, **per_event)

    def without_unknown_items(self, unreadable: np.ndarray | None = None) -> "Histories":
        """The same users without their UNKNOWN_ITEM events, nor those on the items flagged in
        `unreadable` ((N + 1,) bool, e.g. cold items a model cannot read): what a model reads."""
        keep = [x != UNKNOWN_ITEM for x in self.items]
        if unreadable is not None:
            keep = [k & ~unreadable[np.where(k, x, 0)] for k, x in zip(keep, self.items)]
        if all(k.all() for k in keep):
            return self
        return self._map_events(lambda arrays: [a[k] for a, k in zip(arrays, keep)], self.users)

    def sorted_by_time(self) -> "Histories":
        """Each user's events stably sorted by timestamp (equal times keep their order)."""
        order = [np.argsort(t, kind="stable") for t in self.timestamps]
        return self._map_events(lambda arrays: [a[o] for a, o in zip(arrays, order)], self.users)

    def request_contexts(self) -> np.ndarray | None:
        """(U,) the context of each user's first event (the request a ground truth answers)."""
        return None if self.contexts is None else np.array([c[0] for c in self.contexts], np.int64)


def _invalid_ids(items: np.ndarray) -> np.ndarray:
    return (items < 1) & (items != UNKNOWN_ITEM)


def _list_column(table: pa.Table, name: str, dtype: type = np.int64
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (lengths (R,), flat values as `dtype`)."""
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise ValueError(f"histories table: column {name!r} has null rows")
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return np.diff(offsets).astype(np.int64), values.astype(dtype)


def as_histories(data: Histories | pa.Table | Sequence[np.ndarray]) -> Histories:
    """A Histories from itself, a table (list columns user/items[/timestamps/event_types]),
    or a list of item arrays (no timestamps, type 1)."""
    if isinstance(data, Histories):
        return data
    if not isinstance(data, pa.Table):
        return Histories.from_items(data)
    for name in ("user", "items"):
        if name not in data.column_names:
            raise ValueError(f"histories table: missing column {name!r} (has {data.column_names})")
    lengths, items = _list_column(data, "items")
    if _invalid_ids(items).any():
        first = int(np.argmax(_invalid_ids(items)))
        row = np.searchsorted(np.cumsum(lengths), first, side="right")
        raise ValueError(f"histories table: row {row} has item id {items[first]} "
                         f"(ids start at 1; {UNKNOWN_ITEM} = unknown item)")
    flat = {"timestamps": np.zeros_like(items), "event_types": np.ones_like(items),
            "values": None, "contexts": None}
    for name in flat:
        if name in data.column_names:
            other, flat[name] = _list_column(data, name, np.float32 if name == "values" else np.int64)
            if (other != lengths).any():
                row = np.flatnonzero(other != lengths)[0]
                raise ValueError(f"histories table: row {row} has {lengths[row]} items but "
                                 f"{other[row]} {name}")
    # Slicing by offsets: np.split is ~50x slower on a million users.
    ends = np.cumsum(lengths)
    split = lambda values: [values[a:b] for a, b in zip(ends - lengths, ends)]  # noqa: E731
    return Histories(data.column("user").to_numpy(zero_copy_only=False).astype(np.int64),
                     split(items), **{name: None if values is None else split(values)
                                      for name, values in flat.items()})
