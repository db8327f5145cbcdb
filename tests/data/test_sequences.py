"""Histories, sessions, delta buckets, windows, shards and batches on hand-made examples."""
from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from dist_rec.config import DataConfig
from dist_rec.data import sequences
from dist_rec.data.schema import event_table
from dist_rec.data.sequences import (build_histories, build_windows, delta_bucket, history_batch,
                                     session_starts, windows_to_batch, write_window_shards)
from dist_rec.data.vocab import Vocabulary

CONFIG = DataConfig(session_gap_seconds=100, window_length=4, num_delta_buckets=32)

# (user, item, timestamp, type code); item 99 is not in the vocabulary, user 30 has one event.
ROWS = [(20, 7, 1000, 1), (10, 5, 50, 2), (20, 8, 900, 4), (10, 6, 0, 1), (20, 9, 1000, 3),
        (10, 99, 60, 1), (10, 7, 400, 1), (10, 5, 401, 4), (10, 6, 500, 1), (10, 8, 600, 3),
        (10, 9, 701, 1), (30, 5, 5, 1)]
# Dense ids: items 5..9 -> 1..5, users 10, 20, 30 -> 1, 2, 3.
HISTORIES = {"user": [1, 2, 3],
             "items": [[2, 1, 3, 1, 2, 4, 5], [4, 3, 5], [1]],
             "timestamps": [[0, 50, 400, 401, 500, 600, 701], [900, 1000, 1000], [5]],
             "event_types": [[1, 2, 1, 4, 1, 3, 1], [4, 1, 3], [1]]}
# build_windows with T = 4: user 1 has 6 steps (a full window, then 2 steps left-padded),
# user 2 has 2 steps, user 3 none. deltas: gaps 50, 350, 1, 99, 100, 101 | 100, 0.
WINDOWS = {"user": [1, 1, 2],
           "items": [[2, 1, 3, 1], [0, 0, 2, 4], [0, 0, 4, 3]],
           "targets": [[1, 3, 1, 2], [0, 0, 4, 5], [0, 0, 3, 5]],
           "deltas": [[6, 9, 2, 7], [0, 0, 7, 7], [0, 0, 7, 1]],
           "event_types": [[1, 2, 1, 4], [0, 0, 1, 3], [0, 0, 4, 1]],
           "target_types": [[2, 1, 4, 1], [0, 0, 3, 1], [0, 0, 1, 3]],
           "session_starts": [[True, False, True, False], [False] * 4,
                              [False, False, True, False]]}


def make_events() -> pa.Table:
    users, items, times, codes = (np.array(column) for column in zip(*ROWS))
    return event_table(users, items, times, codes)


def make_histories() -> pa.Table:
    events = make_events()
    vocab = Vocabulary.build(events.filter(pc.not_equal(events["item_id"], 99)))
    return build_histories(events, vocab, CONFIG)


def test_delta_buckets():
    gaps = np.array([0, 1, 2, 3, 4, 7, 8, 1023, 1024, -3, 10**9, 2**40])
    assert delta_bucket(gaps, 32).tolist() == [1, 2, 2, 3, 3, 4, 4, 11, 11, 1, 30, 31]
    assert delta_bucket(gaps, 8).tolist() == [1, 2, 2, 3, 3, 4, 4, 7, 7, 1, 7, 7]


def test_session_starts_gap_rule():
    # Two sequences: gaps 100 (not > 100), 101 (start) | a new sequence always starts.
    starts = session_starts(np.array([0, 100, 201, 250, 5]), np.array([0, 4, 5]), 100)
    assert starts.tolist() == [True, False, True, False, True]


def test_build_histories_sorts_encodes_and_drops_unknown():
    histories = make_histories()
    assert histories.to_pydict() == HISTORIES
    assert histories.schema.field("event_types").type == pa.list_(pa.int8())
    # A user below the user min-count is dropped with all their events.
    vocab = Vocabulary.build(make_events(), min_user_count=2)
    assert build_histories(make_events(), vocab, CONFIG)["user"].to_pylist() == [1, 2]


def test_build_windows_cuts_and_left_pads():
    windows = build_windows(make_histories(), CONFIG)
    assert windows.to_pydict() == WINDOWS
    assert windows.schema.field("items").type == pa.list_(pa.int64(), 4)
    assert windows.schema.field("session_starts").type == pa.list_(pa.bool_(), 4)
    empty = build_windows(make_histories().slice(2), CONFIG)  # only the one-event user
    assert empty.num_rows == 0 and empty.schema == windows.schema


def object_rows(rows: list) -> np.ndarray:
    out = np.empty(len(rows), object)
    for i, row in enumerate(rows):
        out[i] = np.array(row)
    return out


def test_windows_to_batch_from_table_and_ray_numpy_batches():
    windows = build_windows(make_histories(), CONFIG)
    expected = {name: torch.tensor(value) for name, value in WINDOWS.items()}
    # Ray Data 2.60 iter_batches(batch_format="numpy") gives list columns as object arrays of
    # 1-D arrays; plain (B, T) arrays must work too.
    ray_like = {name: object_rows(value) if name != "user" else np.array(value)
                for name, value in WINDOWS.items()}
    dense = {name: np.array(value) for name, value in WINDOWS.items()}
    for source in (windows, windows.to_batches()[0], ray_like, dense):
        batch = windows_to_batch(source)
        for name in sequences.STEP_COLUMNS:
            assert torch.equal(getattr(batch, name), expected[name]), name
        assert torch.equal(batch.users, expected["user"])
        assert batch.num_events == 8


def test_history_batch_prediction_at_now():
    items = [np.array([2, 1, 3, 1, 2]), np.array([4]), np.array([], np.int64)]
    times = [np.array([0, 50, 400, 401, 500]), np.array([900]), np.array([], np.int64)]
    types = [np.array([1, 2, 1, 4, 1]), np.array([4]), np.array([], np.int64)]
    batch = history_batch(items, times, types, np.array([530, 1923, 0]), CONFIG, 3)
    assert batch.items.tolist() == [[3, 1, 2], [0, 0, 4], [0, 0, 0]]
    assert batch.targets.tolist() == [[1, 2, 0], [0, 0, 0], [0, 0, 0]]
    # gaps 1, 99, then now - last = 30 | now - last = 1023
    assert batch.deltas.tolist() == [[2, 7, 5], [0, 0, 11], [0, 0, 0]]
    assert batch.session_starts.tolist() == [[True, False, False], [False, False, True],
                                             [False] * 3]
    assert batch.event_types.tolist() == [[1, 4, 1], [0, 0, 4], [0, 0, 0]]
    assert batch.target_types.tolist() == [[4, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert batch.users.tolist() == [0, 0, 0]
    # Truncated to 2: the first kept event (t=401) follows t=400 closely, so it opens no
    # session even though it is the window's first step. now=None: last delta 0.
    short = history_batch(items[:1], times[:1], None, None, CONFIG, 2, users=np.array([7]))
    assert short.items.tolist() == [[1, 2]] and short.targets.tolist() == [[2, 0]]
    assert short.deltas.tolist() == [[7, 0]] and short.session_starts.tolist() == [[False, False]]
    assert short.event_types.tolist() == [[1, 1]] and short.users.tolist() == [7]


def test_write_window_shards_local(tmp_path, monkeypatch):
    windows = pa.concat_tables([build_windows(make_histories(), CONFIG)] * 2)  # 6 rows
    paths = write_window_shards(windows, str(tmp_path / "w"), rows_per_shard=4)
    assert paths == [str(tmp_path / "w" / "part-00000.parquet"),
                     str(tmp_path / "w" / "part-00001.parquet")]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["part-00000.parquet",
                                                                 "part-00001.parquet"]
    assert [pq.read_metadata(p).num_rows for p in paths] == [4, 2]
    assert pa.concat_tables([pq.read_table(p) for p in paths]).equals(windows)
    with pytest.raises(FileExistsError, match="part-"):
        write_window_shards(windows, str(tmp_path / "w"), rows_per_shard=4)

    def crash(table, where, **kwargs):
        where.write(b"PAR1 half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(sequences.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        write_window_shards(windows, str(tmp_path / "crash"), rows_per_shard=4)
    assert list((tmp_path / "crash").iterdir()) == []


@pytest.mark.s3
def test_write_window_shards_s3(s3_storage):  # noqa: F811
    windows = build_windows(make_histories(), CONFIG)
    options = s3_storage.storage_options()
    uri = f"{s3_storage.uri}/windows"
    paths = write_window_shards(windows, uri, rows_per_shard=2, storage_options=options)
    assert paths == [f"{uri}/part-00000.parquet", f"{uri}/part-00001.parquet"]
    fs, root = fsspec.core.url_to_fs(uri, **options)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(root)) == ["part-00000.parquet",
                                                                  "part-00001.parquet"]
    read = [pq.read_table(fs.open(p, "rb")) for p in sorted(fs.find(root))]
    assert pa.concat_tables(read).equals(windows)
