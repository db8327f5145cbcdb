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


def test_values_and_contexts_follow_their_events_into_windows(tmp_path):
    """Each event's value is its row number + 0.5 and its context (row % 3) + 1, so every number
    below names the event it came from. values[t] = x_t's, target_values[t] = x_{t+1}'s and
    contexts[t] = x_{t+1}'s: the context of the request that step t answers."""
    events = make_events()
    rows = np.arange(len(ROWS))
    events = events.set_column(events.schema.get_field_index("value"), "value",
                               pa.array(rows + 0.5, pa.float32()))
    vocab = Vocabulary.build(events.filter(pc.not_equal(events["item_id"], 99)))
    config = DataConfig(**{**CONFIG.__dict__, "carry_values": True})
    histories = build_histories(events, vocab, config, contexts=rows % 3 + 1)
    # Rows in time order: user 10 -> 3, 1, (5 is item 99), 6, 7, 8, 9, 10; user 20 -> 2, 0, 4.
    assert histories["values"].to_pylist() == [[3.5, 1.5, 6.5, 7.5, 8.5, 9.5, 10.5],
                                               [2.5, 0.5, 4.5], [11.5]]
    assert histories["contexts"].to_pylist() == [[1, 2, 1, 2, 3, 1, 2], [3, 1, 2], [3]]
    windows = build_windows(histories, config)
    assert windows.to_pydict() == {**WINDOWS,
                                   "values": [[3.5, 1.5, 6.5, 7.5], [0, 0, 8.5, 9.5], [0, 0, 2.5, 0.5]],
                                   "target_values": [[1.5, 6.5, 7.5, 8.5], [0, 0, 9.5, 10.5],
                                                     [0, 0, 0.5, 4.5]],
                                   "contexts": [[2, 1, 2, 3], [0, 0, 1, 2], [0, 0, 1, 2]]}
    assert windows.schema.field("values").type == pa.list_(pa.float32(), 4)
    pq.write_table(windows, tmp_path / "windows.parquet")
    batch = windows_to_batch(pq.read_table(tmp_path / "windows.parquet"))
    assert batch.values.dtype == torch.float32 and batch.contexts.dtype == torch.int64
    assert batch.target_values[0].tolist() == [1.5, 6.5, 7.5, 8.5]
    assert batch.contexts[2].tolist() == [0, 0, 1, 2]
    plain = windows_to_batch(build_windows(make_histories(), CONFIG))   # data without them
    assert plain.values is None and plain.target_values is None and plain.contexts is None


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
    # Values and contexts as in the windows; the last step's context is the caller's request's.
    meta = history_batch(items[:2], times[:2], types[:2], np.array([530, 1923]), CONFIG, 3,
                         values=[np.array([1, 2, 3, 4, 5.5]), np.array([9.0])],
                         contexts=[np.array([1, 2, 3, 1, 2]), np.array([3])],
                         now_contexts=np.array([3, 1]))
    assert meta.values.tolist() == [[3, 4, 5.5], [0, 0, 9]]
    assert meta.target_values.tolist() == [[4, 5.5, 0], [0, 0, 0]]
    assert meta.contexts.tolist() == [[1, 2, 3], [0, 0, 1]]
    unknown = history_batch(items[:1], times[:1], None, None, CONFIG, 2,
                            contexts=[np.array([1, 2, 3, 1, 2])])
    assert unknown.contexts.tolist() == [[2, 0]] and unknown.values is None


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
