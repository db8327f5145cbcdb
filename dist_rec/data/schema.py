"""The event table and its row validation with a quarantine.

Event table (Arrow, one row per event):
    user_id      int64    raw user id
    item_id      int64    raw item id
    timestamp    int64    unix seconds (or a position, for data sets without time)
    event_type   dictionary<int8, string>, dictionary = DataConfig.event_types in order,
                 so the type code (1..n, 0 = padding) is the dictionary index + 1
    value        float32  event weight, 1.0 when the source has none
    category_id  int64    optional (Taobao has it)
    ...                   optional feature columns, passed through as read

Validation is vectorised with pyarrow.compute (no Python loop per row): columns are read as strings
(pyarrow's CSV reader would fail a whole file on one type error) and each row gets the first reason
it fails, in this order:
    wrong_column_count       (found by the CSV reader; see readers.py)
    missing_field            empty or null required field
    non_integer_id           id that is not a non-negative integer (spaces around it allowed)
                             that fits int64 (also a uint64 Parquet column's values past it)
    unknown_event_type       behaviour not in DataConfig.event_types
    non_integer_timestamp    timestamp that is not an integer of at most 18 digits
    timestamp_out_of_window  timestamp outside [min_timestamp, max_timestamp)
    bad_value                value that is not a finite float32 number
Bad rows are dropped (their good neighbours are kept) and recorded in a QuarantineReport; its file
is a CSV with the header `source,line,reason,field,text` (line: 1-based line in the source file
where the row starts, header included; for Parquet the 1-based row number). With
DataConfig.strict the first bad row raises EventValidationError naming the file, the line and the
field.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dist_rec.config import DataConfig, EVENT_TYPES

log = logging.getLogger(__name__)

REASONS = ("wrong_column_count", "missing_field", "non_integer_id", "unknown_event_type",
           "non_integer_timestamp", "timestamp_out_of_window", "bad_value")
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()),
                               ("reason", pa.string()), ("field", pa.string()),
                               ("text", pa.string())])
TIMESTAMP_PATTERN = r"^-?[0-9]{1,18}$"  # 18 digits always fit in int64
FLOAT_PATTERN = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"


class EventValidationError(ValueError):
    """A bad row in strict mode; the message names the file, the line and the field."""


def event_schema(event_types: Sequence[str] = EVENT_TYPES, with_category: bool = False,
                 features: Sequence[pa.Field] = ()) -> pa.Schema:
    """The event table's schema (the event_type dictionary itself lives in the data)."""
    fields = [pa.field("user_id", pa.int64(), nullable=False),
              pa.field("item_id", pa.int64(), nullable=False),
              pa.field("timestamp", pa.int64(), nullable=False),
              pa.field("event_type", pa.dictionary(pa.int8(), pa.string()), nullable=False),
              pa.field("value", pa.float32(), nullable=False)]
    if with_category:
        fields.append(pa.field("category_id", pa.int64(), nullable=False))
    return pa.schema(fields + list(features), metadata={"event_types": ",".join(event_types)})


def event_table(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, codes: np.ndarray,
                event_types: Sequence[str] = EVENT_TYPES, values: np.ndarray | None = None,
                categories: np.ndarray | None = None,
                features: Mapping[str, pa.Array] | None = None) -> pa.Table:
    """Build an event table from (n,) arrays; codes are event type codes 1..len(event_types)."""
    features = dict(features or {})
    values = np.ones(len(users), np.float32) if values is None else values.astype(np.float32)
    event_type = pa.DictionaryArray.from_arrays(pa.array(np.asarray(codes) - 1, pa.int8()),
                                                pa.array(list(event_types), pa.string()))
    columns = [pa.array(users, pa.int64()), pa.array(items, pa.int64()),
               pa.array(timestamps, pa.int64()), event_type, pa.array(values, pa.float32())]
    if categories is not None:
        columns.append(pa.array(categories, pa.int64()))
    columns += [col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
                for col in features.values()]
    schema = event_schema(event_types, categories is not None,
                          [pa.field(name, col.type) for name, col in features.items()])
    return pa.Table.from_arrays(columns, schema=schema)


def event_type_codes(column: pa.ChunkedArray | pa.Array,
                     event_types: Sequence[str] = EVENT_TYPES) -> np.ndarray:
    """(n,) int8 type codes 1..len(event_types) of a string or dictionary column; 0 = unknown."""
    if isinstance(column, pa.ChunkedArray):
        parts = [event_type_codes(chunk, event_types) for chunk in column.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.int8)
    if pa.types.is_dictionary(column.type):
        # Map the (tiny) dictionary, then gather through the indices.
        lookup = event_type_codes(column.dictionary, event_types)
        return lookup[column.indices.fill_null(0).to_numpy(zero_copy_only=False)]
    index = pc.index_in(column.cast(pa.string()), value_set=pa.array(list(event_types)))
    return (index.fill_null(-1).to_numpy(zero_copy_only=False) + 1).astype(np.int8)


@dataclass
class QuarantineReport:
    """Rows that were not loaded (QUARANTINE_SCHEMA) and how many rows were read in all."""

    rows: pa.Table
    rows_read: int = 0

    @staticmethod
    def empty() -> "QuarantineReport":
        return QuarantineReport(QUARANTINE_SCHEMA.empty_table(), 0)

    @staticmethod
    def concat(reports: Sequence["QuarantineReport"]) -> "QuarantineReport":
        if not reports:
            return QuarantineReport.empty()
        rows = pa.concat_tables([r.rows for r in reports]).combine_chunks()
        return QuarantineReport(rows, sum(r.rows_read for r in reports))

    @property
    def num_quarantined(self) -> int:
        return self.rows.num_rows

    def counts(self) -> dict[str, int]:
        """Quarantined rows per reason, in REASONS order (reasons with no rows left out)."""
        found = {r["values"]: r["counts"] for r in pc.value_counts(self.rows["reason"]).to_pylist()}
        return {reason: found[reason] for reason in REASONS if reason in found}

    def raise_first(self) -> None:
        """Raise EventValidationError for the earliest quarantined row, if any."""
        if self.num_quarantined:
            first = self.rows.take([int(np.argmin(self.rows["line"].to_numpy()))]).to_pylist()[0]
            raise EventValidationError(
                f"{first['source']}, line {first['line']}, field {first['field']!r}: "
                f"{first['reason']} in row {first['text']!r}")

    def write(self, uri: str, storage_options: dict | None = None) -> None:
        """Write the quarantined rows as CSV (header source,line,reason,field,text)."""
        with fsspec.open(uri, "wb", **(storage_options or {})) as f:
            pacsv.write_csv(self.rows, f)

    def log_summary(self, source: str) -> None:
        counts = ", ".join(f"{reason}: {n}" for reason, n in self.counts().items()) or "none"
        level = logging.WARNING if self.num_quarantined else logging.INFO
        log.log(level, "%s: read %d rows, quarantined %d (%s)", source, self.rows_read,
                self.num_quarantined, counts)


def quarantine_rows(source: str, lines: np.ndarray, reasons: Sequence[str],
                    fields: Sequence[str], texts: pa.Array | Sequence[str]) -> pa.Table:
    """A QUARANTINE_SCHEMA table from (k,) columns."""
    return pa.Table.from_arrays(
        [pa.array([source] * len(lines), pa.string()), pa.array(lines, pa.int64()),
         pa.array(reasons, pa.string()), pa.array(fields, pa.string()),
         pa.array(texts, pa.string())], schema=QUARANTINE_SCHEMA)


def row_texts(table: pa.Table, delimiter: str = ",") -> pa.Array:
    """(n,) the rows of `table` joined back into delimited text (for the quarantine file)."""
    if table.num_columns == 0:
        return pa.array([""] * table.num_rows, pa.string())
    columns = [_as_text(table.column(i)) for i in range(table.num_columns)]
    return pc.binary_join_element_wise(*columns, delimiter, null_handling="replace",
                                       null_replacement="")


def parse_integers(column: pa.ChunkedArray | pa.Array,
                   signed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """String or integer column -> (values, missing, malformed), all (n,); values are 0 where bad.

    missing: null or empty; malformed: present but not an integer (negative too, unless signed).
    """
    column = _plain(column)
    if pa.types.is_integer(column.type):
        missing = _to_numpy(column.is_null())
        # Unchecked cast: uint64 values past int64 (hashed ids) wrap to negative, so they become
        # bad rows one by one instead of failing the whole read.
        values = _to_numpy(pc.fill_null(column, 0).cast(pa.int64(), safe=False))
        wrapped = values < 0 if pa.types.is_uint64(column.type) else np.zeros(len(values), bool)
        malformed = wrapped if signed else values < 0
        return np.where(malformed, 0, values), missing, malformed
    column = column.cast(pa.string())
    ok, lengths = _int64_decimals(column, nineteen_digits=False)
    if not pc.all(ok).as_py():   # rare: then " 11" is 11, "  " is missing, 19 digits are checked
        column = pc.utf8_trim_whitespace(column)
        ok, lengths = _int64_decimals(column, nineteen_digits=True)
    missing = _to_numpy(pc.equal(pc.fill_null(lengths, 0), 0))
    if signed and not pc.all(ok).as_py():
        ok = pc.or_(ok, pc.fill_null(pc.match_substring_regex(column, TIMESTAMP_PATTERN), False))
    all_ok = pc.all(ok).as_py() is not False
    values = _to_numpy((column if all_ok else pc.if_else(ok, column, "0")).cast(pa.int64()))
    return values, missing, ~_to_numpy(ok) & ~missing


def _int64_decimals(column: pa.Array, nineteen_digits: bool) -> tuple[pa.Array, pa.Array]:
    """-> (digits only and within int64, nulls False; utf8 lengths). ascii_is_decimal is ~4x faster
    than a regex. Up to 18 digits always fit; with nineteen_digits a 19-digit string is compared
    with int64's 9223372036854775807 as text (a pass the clean columns are spared)."""
    lengths = pc.utf8_length(column)
    fits = pc.less_equal(lengths, 18)
    if nineteen_digits:
        fits = pc.or_(fits, pc.and_(pc.equal(lengths, 19), pc.less_equal(column, str(2 ** 63 - 1))))
    return pc.fill_null(pc.and_(pc.ascii_is_decimal(column), fits), False), lengths


def validate_events(raw: pa.Table, lines: np.ndarray, source: str, config: DataConfig,
                    columns: Mapping[str, str], features: Sequence[str] = (),
                    event_type_map: Mapping[str, str] | None = None,
                    delimiter: str = ",") -> tuple[pa.Table, QuarantineReport]:
    """Validate raw rows into an event table; bad rows go to the report.

    raw: the source columns as read (strings, or typed from Parquet); lines (n,): their 1-based
    line numbers. columns: event field -> source column for user_id, item_id, timestamp and
    optionally event_type (default: the first configured type for every row), value, category_id.
    event_type_map: source behaviour -> configured event type (e.g. {"view": "pv"}).
    Never raises for bad rows: in strict mode the caller raises with report.raise_first(), after
    merging the rows the CSV parser rejected, so the earliest bad line is the one named.
    """
    n = raw.num_rows
    checks: list[tuple[str, str, np.ndarray]] = []  # (reason, field, failing rows)
    parsed = {}
    for name in ("user_id", "item_id", "category_id", "timestamp"):
        if name in columns:
            values, missing, malformed = parse_integers(raw[columns[name]], name == "timestamp")
            parsed[name] = values
            checks += [("missing_field", name, missing),
                       ("non_integer_timestamp" if name == "timestamp" else "non_integer_id",
                        name, malformed)]
    codes = np.ones(n, np.int8)
    if "event_type" in columns:
        behaviour = _plain(raw[columns["event_type"]]).cast(pa.string())
        missing = _to_numpy(pc.fill_null(pc.equal(behaviour, ""), True))
        if event_type_map:  # unmapped behaviours become null, hence unknown
            keys = pa.array(list(event_type_map), pa.string())
            behaviour = pc.take(pa.array(list(event_type_map.values()), pa.string()),
                                pc.index_in(behaviour, value_set=keys))
        codes = event_type_codes(behaviour, config.event_types)
        checks += [("missing_field", "event_type", missing),
                   ("unknown_event_type", "event_type", (codes == 0) & ~missing)]
    timestamps = parsed["timestamp"]
    checks.append(("timestamp_out_of_window", "timestamp",
                   (timestamps < config.min_timestamp) | (timestamps >= config.max_timestamp)))
    values = np.ones(n, np.float32)
    if "value" in columns:
        values, missing, malformed = _parse_floats(raw[columns["value"]])
        checks += [("missing_field", "value", missing), ("bad_value", "value", malformed)]

    # Each bad row keeps the first reason it fails, in REASONS order (fields in check order).
    reason = np.zeros(n, np.int8)
    field = np.zeros(n, np.int8)
    names = [check_field for _, check_field, _ in checks]
    for code, name in enumerate(REASONS, start=1):
        for index, (check_reason, _, failing) in enumerate(checks):
            if check_reason == name:
                new = failing & (reason == 0)
                reason[new], field[new] = code, index
    good = reason == 0
    bad = np.flatnonzero(~good)
    report = QuarantineReport(
        quarantine_rows(source, lines[bad], [REASONS[c - 1] for c in reason[bad]],
                        [names[i] for i in field[bad]], row_texts(raw.take(bad), delimiter)), n)
    good_rows = pa.array(good)
    table = event_table(parsed["user_id"][good], parsed["item_id"][good], timestamps[good],
                        codes[good], config.event_types, values[good],
                        parsed["category_id"][good] if "category_id" in columns else None,
                        {name: _feature(raw[name]).filter(good_rows) for name in features})
    return table, report


def _feature(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A feature column as read, with Parquet's storage variants made one type (dictionaries
    decoded, large strings as strings), so files that differ only in encoding concatenate."""
    column = _plain(column)
    return column.cast(pa.string()) if pa.types.is_large_string(column.type) else column


def _parse_floats(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like parse_integers, for float32 values."""
    column = _plain(column)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        missing = _to_numpy(column.is_null())
        values = _to_numpy(pc.fill_null(column, 0).cast(pa.float32()))
        # NaN and +-inf (and float64 beyond float32's range) are no value a model can learn.
        malformed = ~np.isfinite(values) & ~missing
        return np.where(malformed, 0, values).astype(np.float32), missing, malformed
    column = column.cast(pa.string())
    missing = _to_numpy(pc.fill_null(pc.equal(column, ""), True))
    ok = pc.fill_null(pc.match_substring_regex(column, FLOAT_PATTERN), False)
    values = _to_numpy(pc.if_else(ok, column, "0").cast(pa.float32()))
    # Numbers beyond float32's range (1e39) parse as +-inf: as bad as a non-finite Parquet value.
    malformed = ~(_to_numpy(ok) & np.isfinite(values)) & ~missing
    return np.where(malformed, 0, values).astype(np.float32), missing, malformed


def _plain(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One contiguous array; dictionaries decoded, timestamps as int64 unix seconds."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.timestamp("s"), safe=False).cast(pa.int64())
    return column


def _as_text(column: pa.ChunkedArray) -> pa.Array:
    column = _plain(column)
    return column if pa.types.is_string(column.type) else column.cast(pa.string())


def _to_numpy(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False)
