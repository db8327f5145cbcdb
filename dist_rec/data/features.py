"""Categorical event columns as dense codes: request contexts, user and item attributes.

A field's codes are 1..n in the ascending order of its raw values seen in the training events;
0 means missing (null or empty) or a value training never saw, which every model reads as
"unknown". An item's or a user's attribute is the one of its newest event that has a known code
(a later event with a missing or unseen value does not erase it). The codes are saved beside the
vocabulary (prepare.py), so serving codes a request's raw context exactly as training did.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class FieldCodes:
    """One categorical column: raw value -> code (values[i] has code i + 1)."""

    column: str
    values: tuple   # raw values (str, int or bool, as read), ascending

    @staticmethod
    def fit(column: str, raw: pa.Array | pa.ChunkedArray) -> "FieldCodes":
        """Codes for the values of `raw`; a type that is no category (float, date, ...) raises."""
        raw = _plain(raw)
        kind = raw.type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise ValueError(f"event column {column!r}: type {kind} is not categorical; "
                             f"a context or attribute column holds strings, integers or booleans")
        unique = pc.unique(pc.filter(raw, _present(raw)))
        return FieldCodes(column, tuple(pc.take(unique, pc.sort_indices(unique)).to_pylist()))

    @property
    def size(self) -> int:
        return len(self.values)

    def encode(self, raw: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(n,) raw values -> (n,) int64 codes; missing and unseen values -> 0."""
        raw = _plain(raw)
        if not self.values:
            return np.zeros(len(raw), np.int64)
        index = pc.index_in(raw, value_set=pa.array(list(self.values), raw.type))
        codes = pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
        return np.where(_present(raw).to_numpy(zero_copy_only=False), codes, 0)

    def to_json(self) -> dict:
        return {"column": self.column, "values": list(self.values)}

    @staticmethod
    def from_json(raw: dict) -> "FieldCodes":
        return FieldCodes(raw["column"], tuple(raw["values"]))


@dataclass(frozen=True)
class EventFields:
    """The categorical fields prepared data derives from the events, by what they describe."""

    items: tuple[FieldCodes, ...] = ()    # per-item attributes: category_id when the events have
                                           # it, then DataConfig.item_feature_columns
    context: FieldCodes | None = None      # the request context (DataConfig.context_column)
    users: tuple[FieldCodes, ...] = ()    # per-user attributes (DataConfig.user_feature_columns)

    @staticmethod
    def fit(train_events: pa.Table, context_column: str = "", user_columns: tuple[str, ...] = (),
            item_columns: tuple[str, ...] = ()) -> "EventFields":
        """Codes from the training events; a configured column without any value raises."""
        def fit(column: str) -> FieldCodes:
            codes = FieldCodes.fit(column, train_events[column])
            if not codes.size:
                raise ValueError(f"event column {column!r} has no value in the training events")
            return codes

        category = ("category_id",) if "category_id" in train_events.column_names else ()
        items = category + tuple(item_columns)
        return EventFields(tuple(fit(c) for c in items),
                           fit(context_column) if context_column else None,
                           tuple(fit(c) for c in user_columns))

    def to_json(self) -> dict:
        return {"items": [f.to_json() for f in self.items],
                "context": None if self.context is None else self.context.to_json(),
                "users": [f.to_json() for f in self.users]}

    @staticmethod
    def from_json(raw: dict) -> "EventFields":
        context = raw["context"]
        return EventFields(tuple(map(FieldCodes.from_json, raw["items"])),
                           None if context is None else FieldCodes.from_json(context),
                           tuple(map(FieldCodes.from_json, raw["users"])))


def newest_codes(owners: np.ndarray, timestamps: np.ndarray, codes: np.ndarray,
                 num_rows: int) -> np.ndarray:
    """Per-event owner ids, timestamps and codes (n,) -> (num_rows,) int64: the code of each
    owner's newest event that has one (equal times: the later row). Owner 0 (unknown) and owners
    without a coded event get 0."""
    known = (owners > 0) & (codes > 0)
    owners, timestamps, codes = owners[known], timestamps[known], codes[known]
    newest_first = np.lexsort((np.arange(len(owners)), timestamps))[::-1]
    unique_owners, first = np.unique(owners[newest_first], return_index=True)
    out = np.zeros(num_rows, np.int64)
    out[unique_owners] = codes[newest_first][first]
    return out


def _plain(raw: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Dictionary-encoded columns (Parquet categoricals) as their plain values."""
    return raw.cast(raw.type.value_type) if pa.types.is_dictionary(raw.type) else raw


def _present(raw: pa.Array | pa.ChunkedArray) -> pa.Array:
    """(n,) bool: not null, and not the empty string (how CSV spells a missing field)."""
    present = pc.is_valid(raw)
    if pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type):
        present = pc.and_(present, pc.fill_null(pc.not_equal(raw, ""), False))
    return present
