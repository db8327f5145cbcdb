"""Vocabulary: dense ids, min-count filter, append-only growth, vectorised encode, save/load and
the content hash."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dist_rec.config import DataConfig
from dist_rec.data.schema import event_table
from dist_rec.data.vocab import IdMap, Vocabulary


def events(users: list[int], items: list[int]):
    n = len(items)
    return event_table(np.array(users), np.array(items), np.arange(n), np.ones(n, np.int8))


def test_min_count_filter_and_dense_ids():
    # item counts: 10 -> 2, 20 -> 1, 30 -> 3; user counts: 1 -> 4, 2 -> 2
    vocab = Vocabulary.from_config(events([1, 1, 2, 1, 2, 1], [30, 10, 30, 20, 30, 10]),
                                   DataConfig(min_item_count=2, min_user_count=3))
    assert vocab.items.raw_ids.tolist() == [10, 30] and vocab.items.counts.tolist() == [2, 3]
    assert vocab.items.pending_ids.tolist() == [20] and vocab.items.pending_counts.tolist() == [1]
    assert vocab.items.encode(np.array([30, 20, 10, 99, -1])).tolist() == [2, 0, 1, 0, 0]
    assert vocab.items.decode(np.array([2, 1])).tolist() == [30, 10]
    assert vocab.items.dense_counts().tolist() == [0, 2, 3]
    assert (vocab.num_items, vocab.num_users) == (2, 1)
    assert vocab.users.encode(np.array([1, 2])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="1..2"):
        vocab.items.decode(np.array([0]))


def test_growth_is_append_only_and_counts_update():
    vocab = Vocabulary.build(events([1] * 6, [30, 10, 30, 20, 30, 10]), min_item_count=2)
    grown = vocab.grow(events([1, 2, 2, 3], [20, 40, 5, 30]))
    # 10, 30 keep 1, 2; 20 reaches 2 events across both updates and is appended as 3.
    assert grown.items.raw_ids.tolist() == [10, 30, 20]
    assert grown.items.counts.tolist() == [2, 4, 2]
    assert grown.items.pending_ids.tolist() == [5, 40]
    again = grown.grow(events([4, 4, 4], [40, 5, 5]))
    # Both admitted in the same update: ascending raw id order, so 5 -> 4 and 40 -> 5.
    assert again.items.raw_ids.tolist() == [10, 30, 20, 5, 40]
    assert again.items.counts.tolist() == [2, 4, 2, 3, 2]
    assert again.items.encode(np.array([10, 30, 20, 5, 40])).tolist() == [1, 2, 3, 4, 5]
    assert len(again.items.pending_ids) == 0
    assert vocab.items.raw_ids.tolist() == [10, 30]          # the old vocabulary is untouched
    assert again.users.raw_ids.tolist() == [1, 2, 3, 4]


def test_a_catalog_admits_items_whatever_their_count_after_the_others():
    vocab = Vocabulary.build(events([1] * 4, [30, 10, 30, 20]), min_item_count=2)
    assert vocab.items.raw_ids.tolist() == [30] and vocab.items.pending_ids.tolist() == [10, 20]
    listed = vocab.admit_items(np.array([50, 10, 30, 7, 50]))
    # 30 keeps 1; 7, 10, 50 are appended in ascending raw id; 10 takes its pending event along.
    assert listed.items.raw_ids.tolist() == [30, 7, 10, 50]
    assert listed.items.counts.tolist() == [2, 0, 1, 0]
    assert listed.items.pending_ids.tolist() == [20] and listed.items.pending_counts.tolist() == [1]
    assert listed.users is vocab.users and listed.hash != vocab.hash
    # Events later count on the admitted ids, which stay.
    grown = listed.grow(events([2, 2], [7, 20]))
    assert grown.items.raw_ids.tolist() == [30, 7, 10, 50, 20]
    assert grown.items.counts.tolist() == [2, 1, 1, 0, 2]


def test_encode_table_and_sorted_paths_agree_with_a_dict():
    rng = np.random.default_rng(0)
    for scale in (1, 10**12):              # compact ids use a lookup table, sparse ones a sort
        known = rng.choice(50_000, 5_000, replace=False) * scale
        ids = IdMap().grow(rng.permutation(known))
        assert (ids._table is not None) == (scale == 1)
        queries = np.concatenate([known, rng.integers(-10, 60_000, 20_000) * scale])
        rng.shuffle(queries)
        lookup = {raw: i + 1 for i, raw in enumerate(ids.raw_ids.tolist())}
        expected = np.array([lookup.get(raw, 0) for raw in queries.tolist()])
        np.testing.assert_array_equal(ids.encode(queries), expected)
        np.testing.assert_array_equal(np.sort(ids.raw_ids), np.sort(known))


def test_save_load_round_trip_and_tamper_check(tmp_path):
    vocab = Vocabulary.build(events([5, 5, 6, 7], [30, 10, 30, 20]), min_item_count=2)
    vocab.save(str(tmp_path / "vocab"))
    loaded = Vocabulary.load(str(tmp_path / "vocab"))
    for name in ("items", "users"):
        for field in ("raw_ids", "counts", "pending_ids", "pending_counts"):
            np.testing.assert_array_equal(getattr(getattr(loaded, name), field),
                                          getattr(getattr(vocab, name), field))
    assert loaded.items.min_count == 2 and loaded.hash == vocab.hash
    meta = json.loads((tmp_path / "vocab" / "vocab.json").read_text())
    assert meta["num_items"] == 1 and meta["num_users"] == 3 and meta["format"] == 1
    meta["hash"] = "0" * 64
    (tmp_path / "vocab" / "vocab.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        Vocabulary.load(str(tmp_path / "vocab"))


def test_hash_follows_ids_not_counts():
    base = Vocabulary.build(events([1, 2], [10, 20]))
    assert base.hash == Vocabulary.build(events([1, 2], [10, 20])).hash
    assert len(base.hash) == 64
    assert base.grow(events([1], [10])).hash == base.hash            # counts only
    assert base.grow(events([1], [30])).hash != base.hash            # a new item
    assert base.grow(events([3], [10])).hash != base.hash            # a new user
    # Same ids in another dense order is another layout.
    swapped = Vocabulary(IdMap(np.array([20, 10]), np.array([1, 1])), base.users)
    assert swapped.hash != base.hash


@pytest.mark.s3
def test_save_load_on_s3(s3_storage):  # noqa: F811
    vocab = Vocabulary.build(events([5, 6], [30, 10]))
    uri = f"{s3_storage.uri}/vocab"
    vocab.save(uri, s3_storage.storage_options())
    loaded = Vocabulary.load(uri, s3_storage.storage_options())
    assert loaded.hash == vocab.hash
    assert loaded.items.encode(np.array([10, 30])).tolist() == [1, 2]
