"""Event table -> per-user histories -> fixed-length training windows -> Parquet shards / batches.

Histories table (one row per user, ascending dense user id; events by (timestamp, file order)):
    user int64 dense id; items list<int64> dense ids; timestamps list<int64>;
    event_types list<int8> codes 1..n (DataConfig.event_types order);
    optional: values list<float32> (DataConfig.carry_values), contexts list<int64> codes (0 = unknown)
Windows table (one row per window of T = DataConfig.window_length steps, LEFT-padded with 0):
    user int64; items, targets, deltas, event_types, target_types: fixed_size_list<int64>[T];
    session_starts: fixed_size_list<bool>[T];
    optional: values, target_values: fixed_size_list<float32>[T]; contexts: fixed_size_list<int64>[T]
Step t of a window pairs input event x_t with target x_{t+1}; deltas[t] = delta_bucket of
t_{t+1} - t_t; session_starts[t] = x_t opens a session (the user's first event, or a gap to the
previous event > DataConfig.session_gap_seconds). A user's n events give n - 1 steps, cut into
consecutive windows of T steps; only the last may be shorter. values[t] is x_t's value and
target_values[t] x_{t+1}'s. contexts[t] is the context of the request that step t answers, which
is x_{t+1}'s (the device the user is on when the next item is shown), just as deltas[t] is the
time of that request; at serving time it is the caller's context (history_batch's now_contexts).
Shards: <dir>/part-00000.parquet, ... (local or s3://); temporary names are "_tmp-<uuid>-part-N".

Everything works on flat numpy arrays with offsets: no Python loop per user or per event.
"""
from __future__ import annotations

import uuid
from typing import Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dist_rec.batch import SequenceBatch
from dist_rec.config import DataConfig
from dist_rec.data.schema import event_type_codes
from dist_rec.data.vocab import UNKNOWN_ITEM, Vocabulary

STEP_COLUMNS = ("items", "targets", "deltas", "event_types", "target_types", "session_starts")
OPTIONAL_STEP_COLUMNS = ("values", "target_values", "contexts")   # present when the data has them
_EMPTY = np.zeros(0, np.int64)


def delta_bucket(gap_seconds: np.ndarray, num_buckets: int) -> np.ndarray:
    """(n,) gaps in seconds -> (n,) int64 buckets 1 + floor(log2(1 + gap)), clipped to
    num_buckets - 1. Negative gaps count as 0. (0, the padding bucket, is never returned.)"""
    gap = np.maximum(np.asarray(gap_seconds, np.int64), 0)
    # frexp: 1 + gap = m * 2**e with m in [0.5, 1), so floor(log2(1 + gap)) = e - 1; exact
    # below 2**53 seconds, unlike rounding a float log2.
    _, exponent = np.frexp((gap + 1).astype(np.float64))
    return np.minimum(exponent, num_buckets - 1).astype(np.int64)


def session_starts(timestamps: np.ndarray, offsets: np.ndarray, gap_seconds: int) -> np.ndarray:
    """(N,) flat timestamps of sequences [offsets[u], offsets[u+1]) -> (N,) bool session starts."""
    starts = np.ones(len(timestamps), bool)
    starts[1:] = np.diff(timestamps) > gap_seconds
    firsts = offsets[:-1][np.diff(offsets) > 0]
    starts[firsts] = True
    return starts


def build_histories(events: pa.Table, vocab: Vocabulary, data_config: DataConfig,
                    contexts: np.ndarray | None = None, keep_unknown_items: bool = False
                    ) -> pa.Table:
    """Event table -> histories table (see module doc); events of unknown users dropped, events
    of unknown items dropped too, or kept as vocab.UNKNOWN_ITEM with `keep_unknown_items` (held-out
    users: their ground truth keeps every event).

    values come from the events' `value` column when data_config.carry_values; contexts (n,) are
    the events' context codes (features.FieldCodes), None when the data has no context."""
    items = vocab.items.encode(events["item_id"])
    users = vocab.users.encode(events["user_id"])
    keep = (users > 0) & (keep_unknown_items | (items > 0))
    items = np.where(items > 0, items, UNKNOWN_ITEM)
    items, users = items[keep], users[keep]
    timestamps = events["timestamp"].to_numpy()[keep]
    codes = event_type_codes(events["event_type"], data_config.event_types)[keep]
    # A stable sort by (user, time) keeps ties in file order. One sort of a combined int64 key is
    # ~2x faster than two (lexsort); it fits unless users x time span exceeds 2**63.
    low = int(timestamps.min()) if len(timestamps) else 0
    span = int(timestamps.max()) - low + 1 if len(timestamps) else 1
    if int(users.max(initial=0)) < (2**63 - 1) // span - 1:
        order = np.argsort(users * span + (timestamps - low), kind="stable")
    else:
        order = np.lexsort((timestamps, users))
    users = users[order]
    firsts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else _EMPTY
    offsets = pa.array(np.r_[firsts, len(users)], pa.int32())

    def lists(values: np.ndarray, kind: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values[order], kind))

    columns = {"user": pa.array(users[firsts], pa.int64()),
               "items": lists(items, pa.int64()),
               "timestamps": lists(timestamps, pa.int64()),
               "event_types": lists(codes, pa.int8())}
    if data_config.carry_values:
        columns["values"] = lists(events["value"].to_numpy()[keep], pa.float32())
    if contexts is not None:
        columns["contexts"] = lists(np.asarray(contexts, np.int64)[keep], pa.int64())
    return pa.table(columns)


def build_windows(histories: pa.Table, data_config: DataConfig) -> pa.Table:
    """Histories table -> windows table (see module doc)."""
    length = data_config.window_length
    items, offsets = _flat(histories["items"])
    timestamps, _ = _flat(histories["timestamps"])
    codes, _ = _flat(histories["event_types"])
    counts = np.diff(offsets)
    starts = session_starts(timestamps, offsets, data_config.session_gap_seconds)
    # Step p reads input event src[p] and target src[p] + 1: every event but each user's last.
    is_last = np.zeros(len(items), bool)
    is_last[offsets[1:][counts > 0] - 1] = True
    src = np.flatnonzero(~is_last)
    steps = np.maximum(counts - 1, 0)
    owner = np.repeat(np.arange(len(counts)), steps)
    rank = src - offsets[:-1][owner]                   # step index within its user
    per_user = -(-steps // length)                     # windows per user (ceil)
    first_window = np.r_[0, np.cumsum(per_user)[:-1]]
    chunk = rank // length
    chunk_length = np.minimum(length, steps[owner] - chunk * length)
    row = first_window[owner] + chunk
    position = length - chunk_length + rank - chunk * length   # left padding
    columns = {"items": items[src], "targets": items[src + 1],
             "deltas": delta_bucket(timestamps[src + 1] - timestamps[src],
                                    data_config.num_delta_buckets),
             "event_types": codes[src], "target_types": codes[src + 1],
             "session_starts": starts[src]}
    if "values" in histories.column_names:
        values = _flat(histories["values"])[0].astype(np.float32)
        columns.update(values=values[src], target_values=values[src + 1])
    if "contexts" in histories.column_names:
        columns["contexts"] = _flat(histories["contexts"])[0][src + 1]   # the request's context
    grid = _place(columns, row, position, int(per_user.sum()), length)
    users = np.repeat(histories["user"].to_numpy(), per_user)
    return _windows_table(users, grid)


def history_batch(items: Sequence[np.ndarray], timestamps: Sequence[np.ndarray],
                  event_types: Sequence[np.ndarray] | None, now: np.ndarray | None,
                  data_config: DataConfig, max_length: int,
                  users: np.ndarray | None = None, values: Sequence[np.ndarray] | None = None,
                  contexts: Sequence[np.ndarray] | None = None,
                  now_contexts: np.ndarray | None = None) -> SequenceBatch:
    """Per-user histories (B lists of (n_b,) dense item ids, timestamps and type codes; None
    types = all the first type) -> LEFT-padded (B, max_length) batch of each user's last events.

    targets[t] = items[t+1] and targets[-1] = 0; deltas[-1] = bucket(now - ts[-1]) (0 when now is
    None), so hidden[:, -1] is the prediction for `now` (B,) int64. users (B,) defaults to 0.
    Optional, as in the windows: values (B lists of (n_b,) float) give values and target_values;
    contexts (B lists of (n_b,) codes) give contexts[t] = the next event's context, and
    contexts[-1] = now_contexts (B,) (0 = unknown when None).
    """
    counts = np.array([len(x) for x in items], np.int64)
    offsets = np.r_[0, np.cumsum(counts)]
    flat_items = _concat(items)
    flat_times = _concat(timestamps)
    flat_codes = np.ones(len(flat_items), np.int64) if event_types is None else _concat(event_types)
    owner = np.repeat(np.arange(len(counts)), counts)
    # Session starts on the full histories, so the first kept event sees its real predecessor.
    starts = session_starts(flat_times, offsets, data_config.session_gap_seconds)
    is_last = np.zeros(len(flat_items), bool)
    is_last[offsets[1:][counts > 0] - 1] = True
    following = np.minimum(np.arange(len(flat_items)) + 1, max(len(flat_items) - 1, 0))
    gaps = flat_times[following] - flat_times
    deltas = delta_bucket(gaps, data_config.num_delta_buckets)
    if now is None:
        deltas[is_last] = 0
    else:
        last_gap = np.asarray(now, np.int64)[owner[is_last]] - flat_times[is_last]
        deltas[is_last] = delta_bucket(last_gap, data_config.num_delta_buckets)
    rank = np.arange(len(flat_items)) - offsets[:-1][owner]
    position = max_length - counts[owner] + rank
    kept = position >= 0
    columns = {"items": flat_items, "targets": np.where(is_last, 0, flat_items[following]),
             "deltas": deltas, "event_types": flat_codes,
             "target_types": np.where(is_last, 0, flat_codes[following]),
             "session_starts": starts}
    if values is not None:
        flat_values = _concat(values, np.float32)
        columns.update(values=flat_values,
                     target_values=np.where(is_last, 0, flat_values[following]).astype(np.float32))
    if contexts is not None:
        flat_contexts = _concat(contexts)
        request = np.zeros(len(counts), np.int64) if now_contexts is None else now_contexts
        columns["contexts"] = flat_contexts[following]
        columns["contexts"][is_last] = np.asarray(request, np.int64)[owner[is_last]]
    grid = _place(columns, owner, position, len(counts), max_length, kept)
    grid["users"] = np.zeros(len(counts), np.int64) if users is None else np.asarray(users)
    return SequenceBatch.from_numpy(grid)


def windows_to_batch(windows: pa.Table | pa.RecordBatch | Mapping[str, np.ndarray]
                     ) -> SequenceBatch:
    """Windows (a pyarrow Table/RecordBatch, or a dict of numpy columns) -> SequenceBatch.

    Ray Data's iter_batches(batch_format="numpy") gives list columns (fixed-size or not) as
    (B,) object arrays of (T,) arrays (Ray 2.60), which are stacked; (B, T) arrays pass as they
    are. batch_format="pyarrow" avoids the per-row stacking.
    """
    names = STEP_COLUMNS + tuple(name for name in OPTIONAL_STEP_COLUMNS
                                 if name in _column_names(windows))
    if isinstance(windows, (pa.Table, pa.RecordBatch)):
        columns = {name: _matrix(windows.column(name)) for name in names}
        columns["users"] = np.array(windows.column("user").to_numpy())
    else:
        columns = {name: _stack(windows[name]) for name in names}
        columns["users"] = np.asarray(windows["user"])
    return SequenceBatch.from_numpy(columns)


def write_window_shards(windows: pa.Table, uri: str, rows_per_shard: int,
                        storage_options: dict | None = None) -> list[str]:
    """Write windows as <uri>/part-00000.parquet, ... and return their URIs (none if no rows).

    Each shard is written under a temporary "_tmp-..." name and then moved, so a crash never
    leaves a partial file under a final name (on S3 a failed write can still publish the temporary
    object, which is then removed). Refuses a directory that already holds part files.
    """
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    if fs.glob(f"{root}/part-*.parquet"):
        raise FileExistsError(f"{uri}: already holds part-*.parquet shards; use a new directory")
    written = []
    for index, start in enumerate(range(0, windows.num_rows, rows_per_shard)):
        final = f"{root}/part-{index:05d}.parquet"
        # Not ending in .parquet and starting with "_": no reader picks up a leftover.
        temporary = f"{root}/_tmp-{uuid.uuid4().hex}-part-{index:05d}"
        try:
            with fs.open(temporary, "wb") as f:
                pq.write_table(windows.slice(start, rows_per_shard), f)
            fs.mv(temporary, final)
        except BaseException:
            if fs.exists(temporary):
                fs.rm(temporary)
            raise
        written.append(fs.unstrip_protocol(final) if "://" in uri else final)
    return written


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """List column -> (flat values (N,), offsets (rows + 1,)), robust to slices and chunks."""
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
    values = pc.list_flatten(column).to_numpy()
    return values, np.r_[0, np.cumsum(lengths)].astype(np.int64)


def _place(columns: dict[str, np.ndarray], row: np.ndarray, position: np.ndarray, rows: int,
           length: int, keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Scatter flat (n,) values to (rows, length) grids at [row, position]; the rest is 0."""
    if keep is not None:
        row, position = row[keep], position[keep]
    grids = {}
    for name, flat in columns.items():
        kind = bool if flat.dtype == bool else np.float32 if flat.dtype.kind == "f" else np.int64
        grid = np.zeros((rows, length), kind)
        grid[row, position] = flat if keep is None else flat[keep]
        grids[name] = grid
    return grids


def _windows_table(users: np.ndarray, grids: dict[str, np.ndarray]) -> pa.Table:
    columns = {"user": pa.array(users, pa.int64())}
    for name, grid in grids.items():
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(grid.reshape(-1)),
                                                          grid.shape[1])
    return pa.table(columns)


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(B,) list column of equal lengths T -> (B, T) numpy."""
    # A copy: Arrow memory is read-only and torch wants writable arrays.
    values = np.array(pc.list_flatten(column).to_numpy(zero_copy_only=False))
    return values.reshape(len(column), -1) if len(column) else values.reshape(0, 0)


def _stack(column: np.ndarray) -> np.ndarray:
    column = np.asarray(column)
    return np.stack(list(column)) if column.dtype == object else column


def _concat(arrays: Sequence[np.ndarray], dtype: type = np.int64) -> np.ndarray:
    return (np.concatenate([np.asarray(a, dtype) for a in arrays]) if len(arrays)
            else _EMPTY.astype(dtype))


def _column_names(windows: pa.Table | pa.RecordBatch | Mapping[str, np.ndarray]) -> list[str]:
    return windows.column_names if isinstance(windows, (pa.Table, pa.RecordBatch)) else list(windows)
