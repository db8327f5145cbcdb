"""prepare(): what training reads, written and loaded back; HRNN-meta's item categories, user
features, request contexts and event values."""
from __future__ import annotations

import bz2
import gzip
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_rec.config import DataConfig
from dist_rec.data.prepare import PreparedData, prepare
from dist_rec.data.vocab import UNKNOWN_ITEM
from dist_rec.storage import filesystem


def test_prepared_data_round_trip_with_item_categories(tmp_path):
    # user,item,category,behavior,timestamp. Item 7 moves from category 500 to 300; user 9 has 10
    # events (the only possible test user: TDM needs 10+); item 8 is only touched by user 9.
    rows = ["1,5,300,pv,100", "1,7,500,pv,110", "1,5,300,buy,120", "2,6,100,pv,100",
            "2,7,300,cart,200", "2,5,300,pv,210"] + [f"9,{item},100,pv,{300 + i}"
                                                      for i, item in enumerate([6] * 9 + [8])]
    csv = tmp_path / "UserBehavior.csv"
    csv.write_text("\n".join(rows) + "\n")
    config = DataConfig(events_uri=str(csv), window_length=4)

    written = prepare(config, str(tmp_path / "prepared"), test_users=1, seed=0)
    prepared = PreparedData.load(str(tmp_path / "prepared"))
    vocab = prepared.vocabulary()
    dims = prepared.dimensions
    assert (dims.num_items, dims.item_feature_sizes) == (3, (3,))        # items 5, 6, 7 of users 1, 2
    assert vocab.items.raw_ids.tolist() == [5, 6, 7] and vocab.items.encode(np.array([8]))[0] == 0
    # Dense category codes by ascending raw id: 100 -> 1, 300 -> 2, 500 -> 3; item 7's newest is 300.
    assert prepared.item_features.tolist() == [[0], [2], [1], [2]]
    assert written.item_features.tolist() == prepared.item_features.tolist()
    assert prepared.item_counts.tolist() == [0, 3, 1, 2]                  # training events per item
    # The test user's event on item 8 stays, as an unknown item: a miss for every model.
    assert prepared.test_histories()["items"].to_pylist() == [[2] * 9 + [UNKNOWN_ITEM]]


def three_users_csv(tmp_path):
    """UserBehavior.csv of users 1-3 with 11 page views each (items 1-11)."""
    rows = [f"{user},{item},1,pv,{100 * user + item}" for user in range(1, 4) for item in range(1, 12)]
    csv = tmp_path / "UserBehavior.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_a_failed_preparation_leaves_the_previous_one(tmp_path):
    csv = three_users_csv(tmp_path)
    out = str(tmp_path / "prepared")
    before = prepare(DataConfig(events_uri=str(csv), window_length=4), out, test_users=1, seed=0)

    with pytest.raises(FileNotFoundError):
        prepare(DataConfig(events_uri=str(tmp_path / "missing.csv")), out, test_users=1, seed=0)
    after = PreparedData.load(out)
    assert after.vocabulary().hash == before.vocabulary().hash
    assert after.test_histories().equals(before.test_histories())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["UserBehavior.csv", "prepared"]

    # Events stored under the output directory would be deleted by the preparation that reads them.
    with pytest.raises(ValueError, match="inside the output directory"):
        prepare(DataConfig(events_uri=f"{out}/events.csv"), out, test_users=1, seed=0)
    assert PreparedData.load(out).vocabulary().hash == before.vocabulary().hash


def test_values_contexts_and_user_features_reach_the_prepared_data(tmp_path):
    """Parquet events with a value, a request context (device) and a user attribute (segment):
    codes fitted on the training users, newest attribute per user, unseen values coded 0."""
    # (user, item, timestamp, value, device, segment, brand); user 9 (10 events) is the test user.
    rows = [(1, 5, 100, 4.0, "web", "a", "acme"), (1, 7, 110, 2.0, "app", "b", "bolt"),
            (1, 5, 120, 5.0, None, "b", None), (2, 6, 100, 1.0, "app", None, "acme"),
            (2, 7, 200, 3.0, "app", None, "bolt")]
    rows += [(9, 6, 300 + i, 0.5 * i, "tv" if i < 9 else "app", "a", "zed") for i in range(10)]
    users, items, times, values, devices, segments, brands = zip(*rows)
    events = pa.table({"user_id": users, "item_id": items, "timestamp": times,
                       "event_type": ["pv"] * len(rows), "category_id": [1] * len(rows),
                       "value": pa.array(values, pa.float32()), "device": devices,
                       "segment": segments, "brand": brands})
    pq.write_table(events, tmp_path / "events.parquet")
    config = DataConfig(events_uri=str(tmp_path / "events.parquet"), window_length=4,
                        carry_values=True, context_column="device",
                        user_feature_columns=("segment",), item_feature_columns=("brand",))

    prepared = prepare(config, str(tmp_path / "prepared"), test_users=1, seed=0)
    dims = prepared.dimensions
    assert (dims.num_contexts, dims.user_feature_sizes, dims.num_users) == (2, (2,), 3)
    fields = prepared.fields()
    assert fields.context.values == ("app", "web") and fields.users[0].values == ("a", "b")
    assert [f.column for f in fields.items] == ["category_id", "brand"]
    # Items 5, 6, 7 are dense 1, 2, 3; one category; brands from the training events only (user
    # 9's "zed" is unknown): item 5's newest brand is missing, so its earlier acme stays.
    assert dims.item_feature_sizes == (1, 2)
    assert prepared.item_features.tolist() == [[0, 0], [1, 1], [1, 1], [1, 2]]
    # Users 1, 2 (training) and 9 (test) are dense 1, 2, 3: user 1's newest segment is b, user 2
    # has none, user 9's a.
    assert prepared.user_features.tolist() == [[0], [2], [0], [1]]
    assert PreparedData.load(prepared.uri).user_features.tolist() == [[0], [2], [0], [1]]

    windows = pq.read_table(tmp_path / "prepared" / "windows" / "part-00000.parquet").to_pydict()
    assert windows["user"] == [1, 2]
    assert windows["values"] == [[0, 0, 4.0, 2.0], [0, 0, 0, 1.0]]
    assert windows["target_values"] == [[0, 0, 2.0, 5.0], [0, 0, 0, 3.0]]
    assert windows["contexts"] == [[0, 0, 1, 0], [0, 0, 0, 1]]     # app, missing | app
    test = prepared.test_histories().to_pydict()
    assert test["values"] == [[0.5 * i for i in range(10)]]
    assert test["contexts"] == [[0] * 9 + [1]]                      # tv was never seen in training


def test_metadata_columns_need_parquet_events_that_have_them(tmp_path):
    csv = tmp_path / "UserBehavior.csv"
    csv.write_text("1,5,300,pv,100\n")
    with pytest.raises(ValueError, match="UserBehavior.csv has no value"):
        prepare(DataConfig(events_uri=str(csv), carry_values=True), str(tmp_path / "a"), 1, 0)
    pq.write_table(pa.table({"user_id": [1], "item_id": [5], "timestamp": [100],
                             "event_type": ["pv"], "category_id": [3]}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"e.parquet.*lack \['device'\]"):
        prepare(DataConfig(events_uri=str(tmp_path / "e.parquet"), context_column="device"),
                str(tmp_path / "b"), 1, 0)


def test_parquet_without_optional_columns_and_a_compressed_csv(tmp_path):
    """category_id and event_type are optional in Parquet events; UserBehavior.csv.bz2 and
    .csv.gz are CSV (fsspec names gzip's codec "gzip", not its suffix)."""
    rows = [(user, item, 100 * user + item) for user in range(1, 4) for item in range(1, 12)]
    users, items, times = zip(*rows)
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times}),
                   tmp_path / "events.parquet")
    prepared = prepare(DataConfig(events_uri=str(tmp_path / "events.parquet"), window_length=4),
                       str(tmp_path / "from-parquet"), test_users=1, seed=0)
    assert prepared.dimensions.item_feature_sizes == ()       # no category_id: no item feature
    assert prepared.num_train_events == 2 * 11

    csv = "\n".join(f"{u},{i},7,pv,{t}" for u, i, t in rows).encode() + b"\n"
    for suffix, compress in (("bz2", bz2.compress), ("gz", gzip.compress)):
        (tmp_path / f"UserBehavior.csv.{suffix}").write_bytes(compress(csv))
        compressed = prepare(DataConfig(events_uri=str(tmp_path / f"UserBehavior.csv.{suffix}"),
                                        window_length=4), str(tmp_path / f"from-{suffix}"),
                             test_users=1, seed=0)
        assert compressed.vocabulary().hash == prepared.vocabulary().hash
        assert compressed.dimensions.item_feature_sizes == (1,)   # category_id 7


def test_on_object_storage_a_preparation_is_complete_or_refused(s3_storage, tmp_path):
    """On S3 the final move is a copy per object: meta.json goes last, so a failure mid-copy
    leaves an output that `load` refuses and the complete staging copy beside it."""
    csv = three_users_csv(tmp_path)
    options = s3_storage.storage_options()
    out = f"{s3_storage.uri}/prepared"
    config = DataConfig(events_uri=str(csv), window_length=4)
    published = prepare(config, out, test_users=1, seed=0, storage_options=options)
    fs, root = filesystem(out, options)
    assert fs.ls(posixpath.dirname(root), detail=False) == [root]       # no staging copy left

    copy_object = fs._cp_file

    async def copy_failing_on_windows(source, destination, **kwargs):
        if destination.startswith(f"{root}/windows/"):       # publishing, not staging
            raise OSError("injected: storage unavailable")
        return await copy_object(source, destination, **kwargs)

    fs._cp_file = copy_failing_on_windows                # each object's copy, whatever the order
    try:
        with pytest.raises(OSError, match="injected"):
            prepare(config, out, test_users=1, seed=0, storage_options=options)
    finally:
        del fs._cp_file
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        PreparedData.load(out, options)
    staging = [p for p in fs.ls(posixpath.dirname(root), detail=False) if ".staging-" in p]
    assert len(staging) == 1
    kept = PreparedData.load(f"s3://{staging[0]}", options)
    assert kept.vocabulary().hash == published.vocabulary().hash
    assert kept.test_histories().equals(published.test_histories())
