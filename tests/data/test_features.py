"""Categorical columns as codes: fitted on training values, unseen and missing values as 0,
Parquet's encodings alike, the newest known attribute per id, and the JSON round trip."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dist_rec.config import DataConfig
from dist_rec.data.features import EventFields, FieldCodes, newest_codes


def test_codes_are_ascending_and_unseen_or_missing_values_are_zero():
    plain = FieldCodes.fit("device", pa.chunked_array([["web", "app", None, ""], ["tv", "app"]]))
    assert plain.values == ("app", "tv", "web") and plain.size == 3
    assert plain.encode(pa.array(["app", "tv", "x", None, "", "web"])).tolist() == [1, 2, 0, 0, 0, 3]
    # The same values stored as a dictionary or as large strings get the same codes.
    for stored in (pa.array(["web", "app", "tv"]).dictionary_encode(),
                   pa.array(["web", "app", "tv"], pa.large_string())):
        assert FieldCodes.fit("device", stored) == plain
        assert plain.encode(stored).tolist() == [3, 1, 2]
    ages = FieldCodes.fit("age", pa.array([30, 20, None, 30], pa.int32()))
    assert ages.values == (20, 30) and ages.encode(pa.array([20, 25, 30])).tolist() == [1, 0, 2]
    assert FieldCodes.from_json(ages.to_json()) == ages
    flags = FieldCodes.fit("member", pa.array([True, False, True]))
    assert flags.values == (False, True)


def test_non_categorical_columns_are_refused_naming_them():
    with pytest.raises(ValueError, match="event column 'price': type double is not categorical"):
        FieldCodes.fit("price", pa.array([1.5, float("nan")]))


def test_newest_known_code_per_id():
    # id 1: codes 2 (t=5), 1 (t=3) -> 2; id 2: 4 then an unseen value (0) later -> 4 is kept;
    # id 3: only unseen -> 0; id 4: a tie at t=7 -> the later row's 3; owner 0 is ignored.
    owners = np.array([1, 1, 2, 2, 3, 4, 4, 0])
    times = np.array([5, 3, 1, 9, 2, 7, 7, 9])
    codes = np.array([2, 1, 4, 0, 0, 1, 3, 5])
    assert newest_codes(owners, times, codes, 6).tolist() == [0, 2, 4, 0, 3, 0]


def test_event_fields_by_what_they_describe():
    events = pa.table({"category_id": [7, 8], "device": ["app", None], "segment": ["a", "b"],
                       "category": ["x", "y"]})
    # A user column named like a built-in field stays a user field.
    fields = EventFields.fit(events, "device", ("category", "segment"))
    assert [f.column for f in fields.items] == ["category_id"]
    assert fields.context.values == ("app",)
    assert [f.column for f in fields.users] == ["category", "segment"]
    assert EventFields.from_json(fields.to_json()) == fields
    with pytest.raises(ValueError, match="event column 'device' has no value"):
        EventFields.fit(events.filter(pa.array([False, True])), "device")
    with pytest.raises(TypeError, match="user_feature_columns: a list of column names"):
        DataConfig(user_feature_columns="segment")
    with pytest.raises(TypeError, match="item_feature_columns: a list of column names"):
        DataConfig(item_feature_columns="brand")
    items_too = EventFields.fit(events, item_columns=("segment",))
    assert [f.column for f in items_too.items] == ["category_id", "segment"]
