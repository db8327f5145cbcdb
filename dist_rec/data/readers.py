"""Readers of raw event files into the event table (schema.py), all through fsspec URIs.

Every reader takes a local path or a remote URI (s3://..., with `storage_options` passed to
fsspec), streams the file in blocks (no Python loop per row) and returns
`(events: pa.Table, report: QuarantineReport)`; with `quarantine_uri` the report's rows are also
written there as CSV. Compressed files (.gz, .bz2, ...) are decompressed by suffix.

- read_user_behavior: Taobao UserBehavior.csv, no header:
  `user_id,item_id,category_id,behavior_type,timestamp` (behaviour pv|cart|fav|buy, unix seconds).
- read_events: generic Parquet or CSV (with a header) file, or a directory of them, with a column
  mapping {event field: source column}, e.g. {"user_id": "visitorid", "item_id": "itemid",
  "timestamp": "ts", "event_type": "event"}.
- read_sessions: one session per line, item ids left-padded with 0 (yoochoose_sessions.csv).
  Returns a user-less event table: user_id = the session's 1-based line number, timestamp = the
  position of the item in the session (0, 1, ...), event type = the first configured type.
- read_user_item: `user item` per line, each user's lines in time order
  (amazon_games_user_item.txt); timestamp = position within the user (0, 1, ...).
- read_item_catalog: not events but items, one Parquet row each (item_id and attribute
  columns): the catalog that gives items without events a place in the vocabulary.

The fixed formats' lines are records: a value quoted whole ("pv", "42", as R's write.csv writes
strings) reads as its text, and a stray quote spoils its own line only. read_events' headed CSV
may hold free text in any column (the delimiter, newlines), so it parses CSV quoting in full;
there an unclosed quote joins the lines up to the next quote into one row, which is quarantined
with a hint where its width is wrong, and logged as spanning lines in any case.
"""
from __future__ import annotations

import logging
from typing import Iterator, Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dist_rec.config import DataConfig
from dist_rec.data.schema import (QuarantineReport, event_table, parse_integers,
                                  quarantine_rows, row_texts, validate_events)

logger = logging.getLogger(__name__)

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "event_type", "timestamp")
BLOCK_BYTES = 64 << 20        # CSV bytes per block: amortises the per-block work, still streams
PARQUET_BATCH_ROWS = 1 << 20


def read_user_behavior(uri: str, config: DataConfig = DataConfig(),
                       storage_options: dict | None = None,
                       quarantine_uri: str | None = None) -> tuple[pa.Table, QuarantineReport]:
    """Taobao UserBehavior.csv -> (events with category_id, quarantine report)."""
    columns = {name: name for name in TAOBAO_COLUMNS}
    tables, reports = [], []
    for raw, lines, wrong in _csv_blocks(uri, TAOBAO_COLUMNS, ",", storage_options):
        events, report = validate_events(raw, lines, uri, config, columns)
        tables.append(events)
        reports.append(_checked(config, report, _wrong_width(uri, wrong)))
    return _finish(uri, tables, reports, storage_options, quarantine_uri)


def read_events(uri: str, columns: Mapping[str, str], config: DataConfig = DataConfig(),
                file_format: str | None = None, delimiter: str = ",",
                features: Sequence[str] = (), event_type_map: Mapping[str, str] | None = None,
                storage_options: dict | None = None,
                quarantine_uri: str | None = None) -> tuple[pa.Table, QuarantineReport]:
    """Parquet or headed CSV file, or a directory of them -> (events, quarantine report).

    columns: event field -> source column (user_id, item_id and timestamp required; event_type,
    value, category_id optional). features: source columns kept as extra columns, as read.
    event_type_map: source behaviour -> configured type. file_format: "parquet" | "csv", default
    from each file's suffix. Files in a directory are read in name order, skipping any whose
    name, or a subdirectory's on its path, starts with "_" or "." (_SUCCESS, _temporary/). For
    Parquet, `line` in the report is the 1-based row number and `text` the mapped columns (then
    features) joined in mapping order.
    """
    missing = {"user_id", "item_id", "timestamp"} - set(columns)
    if missing:
        raise ValueError(f"read_events({uri}): column mapping lacks {sorted(missing)}")
    wanted = list(dict.fromkeys([*columns.values(), *features]))
    tables, reports = [], []
    for path in _files(uri, storage_options):
        fmt = file_format or ("parquet" if path.endswith((".parquet", ".pq")) else "csv")
        if fmt == "parquet":
            blocks = ((raw, lines, []) for raw, lines in _parquet_blocks(path, wanted,
                                                                         storage_options))
        else:
            names = _header(path, delimiter, storage_options)
            absent = set(wanted) - set(names)
            if absent:
                raise ValueError(f"{path}: header {names} lacks column(s) {sorted(absent)}")
            blocks = _csv_blocks(path, names, delimiter, storage_options, header=True,
                                 quoting=True)
        for raw, lines, wrong in blocks:
            events, report = validate_events(raw, lines, path, config, columns, features,
                                             event_type_map, delimiter)
            tables.append(events)
            reports.append(_checked(config, report, _wrong_width(path, wrong)))
    return _finish(uri, tables, reports, storage_options, quarantine_uri)


def read_sessions(uri: str, config: DataConfig = DataConfig(), num_fields: int = 10,
                  storage_options: dict | None = None,
                  quarantine_uri: str | None = None) -> tuple[pa.Table, QuarantineReport]:
    """Session-per-line CSV (item ids, 0 = padding) -> (user-less events, quarantine report).

    user_id = 1-based line number of the session; timestamp = position in the session.
    """
    names = tuple(f"field_{j + 1}" for j in range(num_fields))
    tables, reports = [], []
    for raw, lines, wrong in _csv_blocks(uri, names, ",", storage_options):
        matrix, good_lines, report = _integer_rows(raw, lines, uri, ",")
        reports.append(_checked(config, report, _wrong_width(uri, wrong)))
        real = matrix > 0
        positions = np.cumsum(real, axis=1) - 1
        users = np.broadcast_to(good_lines[:, None], matrix.shape)
        tables.append(event_table(users[real], matrix[real], positions[real],
                                  np.ones(int(real.sum()), np.int8), config.event_types))
    return _finish(uri, tables, reports, storage_options, quarantine_uri)


def read_user_item(uri: str, config: DataConfig = DataConfig(),
                   storage_options: dict | None = None,
                   quarantine_uri: str | None = None) -> tuple[pa.Table, QuarantineReport]:
    """`user item` per line, time-ordered per user -> (events, quarantine report).

    timestamp = position of the line among the user's lines (0, 1, ...), in file order.
    """
    pairs, reports = [np.zeros((0, 2), np.int64)], []
    for raw, lines, wrong in _csv_blocks(uri, ("user_id", "item_id"), " ", storage_options):
        matrix, _, report = _integer_rows(raw, lines, uri, " ")
        reports.append(_checked(config, report, _wrong_width(uri, wrong)))
        pairs.append(matrix)
    user, item = np.concatenate(pairs).T
    # Position within the user, robust to a user's lines not being contiguous.
    order = np.argsort(user, kind="stable")
    sorted_users = user[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    rank = np.arange(len(user)) - np.repeat(starts, np.diff(np.r_[starts, len(user)]))
    positions = np.empty(len(user), np.int64)
    positions[order] = rank
    events = event_table(user, item, positions, np.ones(len(user), np.int8), config.event_types)
    return _finish(uri, [events], reports, storage_options, quarantine_uri)


def read_item_catalog(uri: str, columns: Sequence[str], config: DataConfig = DataConfig(),
                      storage_options: dict | None = None,
                      quarantine_uri: str | None = None) -> tuple[pa.Table, QuarantineReport]:
    """Parquet file or directory of items -> (catalog, quarantine report).

    The catalog has one row per item: item_id (int64) and `columns` as read; a file without one
    of them raises, naming it. A row whose item_id is missing or not a non-negative integer is
    quarantined (its file and 1-based row number; in strict mode it raises), and a catalog
    without one valid row raises; an item listed more than once takes its last row (files in
    name order), and the count of such items is logged.
    """
    tables, reports = [], []
    for path in _files(uri, storage_options):
        for raw, lines in _parquet_blocks(path, ["item_id", *columns], storage_options):
            ids, missing, malformed = parse_integers(raw["item_id"])
            bad = missing | malformed
            reports.append(_checked(config, QuarantineReport(quarantine_rows(
                path, lines[bad], np.where(missing[bad], "missing_field", "non_integer_id"),
                ["item_id"] * int(bad.sum()), row_texts(raw.filter(bad))), raw.num_rows)))
            good = raw.filter(~bad)
            tables.append(good.set_column(good.schema.get_field_index("item_id"), "item_id",
                                          pa.array(ids[~bad], pa.int64())))
    report = QuarantineReport.concat(reports)
    report.log_summary(uri)
    if quarantine_uri:
        report.write(quarantine_uri, storage_options)
    if not sum(table.num_rows for table in tables):
        raise ValueError(f"{uri}: the item catalog has no row with a valid item_id"
                         + (f" ({report.num_quarantined} quarantined)" if tables else ""))
    try:
        catalog = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as error:
        raise ValueError(f"{uri}: its files give a column different types ({error})") from None
    ids = catalog["item_id"].to_numpy()
    _, last_from_end, listings = np.unique(ids[::-1], return_index=True, return_counts=True)
    if (listings > 1).any():
        logger.warning("%s: %d item(s) listed more than once; each takes its last row", uri,
                       int((listings > 1).sum()))
    return catalog.take(np.sort(len(ids) - 1 - last_from_end)), report


def _csv_blocks(uri: str, names: Sequence[str], delimiter: str, storage_options: dict | None,
                header: bool = False, quoting: bool = False
                ) -> Iterator[tuple[pa.Table, np.ndarray, list]]:
    """Yield (string columns, (n,) 1-based line numbers, rows of the wrong width) per block.

    Rows of the wrong width are skipped by the parser and handed over as (line, text, expected,
    actual). Single-threaded parsing is what keeps row numbers known (pyarrow gives none when
    multithreaded); empty lines are kept (as rows of empty fields) so that numbering stays exact.
    quoting: CSV quoting in full, so that quoted values may hold the delimiter and newlines (a
    row's line is then the file line it starts on); else each line is a record and only values
    quoted whole lose their quotes.
    """
    wrong: list[tuple[int, str, int, int]] = []

    def skip(row) -> str:
        wrong.append((row.number, row.text, row.expected_columns, row.actual_columns))
        return "skip"

    read = pacsv.ReadOptions(column_names=list(names), skip_rows=int(header), use_threads=False,
                             block_size=BLOCK_BYTES)
    # With quoting, newlines_in_values: else a quoted newline at a block boundary fails the read.
    parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=skip,
                               ignore_empty_lines=False, quote_char='"' if quoting else False,
                               newlines_in_values=quoting)
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in names},
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    next_row = next_line = 1 + int(header)  # pyarrow's number of the next row, its file line
    first_joined, joined_rows = 0, 0           # rows whose values hold newlines: the first's line
    with fsspec.open(uri, "rb", compression="infer", **(storage_options or {})) as f:
        try:
            reader = pacsv.open_csv(f, read_options=read, parse_options=parse,
                                    convert_options=convert)
        except pa.ArrowInvalid as error:    # e.g. an empty file
            raise ValueError(f"{uri}: {error}") from error
        for batch in _naming(uri, reader):
            # This block's rows are the first n rows from next_row that were not skipped.
            skipped = np.array(sorted(w[0] for w in wrong if w[0] >= next_row), np.int64)
            candidates = np.arange(next_row, next_row + batch.num_rows + len(skipped))
            rows = candidates[~np.isin(candidates, skipped)][:batch.num_rows]
            end = int(rows[-1]) + 1 if len(rows) else next_row
            done = [w for w in wrong if w[0] < end]
            wrong[:] = [w for w in wrong if w[0] >= end]
            table = pa.Table.from_batches([batch])
            if not quoting:
                table = _unquoted(table)
            lines, done, next_line, spans = _file_lines(table, rows, done, next_row, next_line)
            joined = lines[spans > 1]
            if len(joined):
                first_joined = first_joined or int(joined[0])
                joined_rows += len(joined)
            next_row = end
            yield table, lines, done
    if wrong:   # skipped rows after the last block's
        empty = pa.table({name: pa.array([], pa.string()) for name in names})
        no_rows = np.zeros(0, np.int64)
        yield empty, no_rows, _file_lines(empty, no_rows, wrong, next_row, next_line)[1]
    if joined_rows:
        # Legal CSV, and also what an unclosed quote makes of the lines after it: say where, so
        # that a file with no multi-line text gets looked at.
        logger.warning("%s: %d row(s) with a quoted value spanning lines, the first at line %d; "
                       "without multi-line text in the file, an unclosed quote there joined the "
                       "lines after it", uri, joined_rows, first_joined)


def _unquoted(table: pa.Table) -> pa.Table:
    """Values quoted whole ("pv") as their text; a quote anywhere else stays, and fails the
    value's check. Columns without a leading quote (the usual file) are not rewritten."""
    for i, column in enumerate(table.columns):
        if pc.any(pc.starts_with(column, '"')).as_py():
            table = table.set_column(i, table.field(i),
                                     pc.replace_substring_regex(column, r'^"(.*)"$', r"\1"))
    return table


def _naming(uri: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The reader's batches; an error in a later block (e.g. invalid UTF-8) names the file."""
    try:
        yield from batches
    except pa.ArrowInvalid as error:
        raise ValueError(f"{uri}: {error}") from error


def _file_lines(table: pa.Table, rows: np.ndarray, wrong: list, first_row: int,
                first_line: int) -> tuple[np.ndarray, list, int, np.ndarray]:
    """Row numbers -> the file lines the rows start on, given the newlines inside values.

    Rows first_row.. are the table's (numbered `rows`) and the skipped `wrong` ones, in some
    order; first_line is the line of the first. Returns (the table's lines, wrong with lines in
    place of row numbers, the line after them all, the lines each table row spans).
    """
    spans = np.ones(len(rows) + len(wrong), np.int64)   # lines per row, in row order
    for column in table.columns:
        # A scan of the value bytes (offsets aside) spares the per-row count in the usual file,
        # with no newline in any value.
        data = [chunk.buffers()[2] for chunk in column.chunks]
        if any(buf is not None and ord("\n") in np.frombuffer(buf, np.uint8) for buf in data):
            spans[rows - first_row] += pc.count_substring(column, "\n").to_numpy()
    numbers = np.array([w[0] for w in wrong], np.int64)
    spans[numbers - first_row] += np.array([w[1].count("\n") for w in wrong], np.int64)
    starts = first_line + np.cumsum(spans) - spans
    wrong = [(int(starts[n - first_row]), *w[1:]) for n, w in zip(numbers, wrong)]
    return (starts[rows - first_row], wrong, first_line + int(spans.sum()),
            spans[rows - first_row])


def _parquet_blocks(path: str, columns: list[str],
                    storage_options: dict | None) -> Iterator[tuple[pa.Table, np.ndarray]]:
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        try:
            parquet = pq.ParquetFile(f)
            absent = set(columns) - set(parquet.schema_arrow.names)
            if absent:
                raise ValueError(f"{path}: Parquet columns {parquet.schema_arrow.names} lack "
                                 f"{sorted(absent)}")
            first = 1
            for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, columns=columns):
                yield pa.Table.from_batches([batch]), np.arange(first, first + batch.num_rows)
                first += batch.num_rows
        except (pa.ArrowInvalid, OSError) as error:   # not Parquet, or corrupt (pyarrow: OSError)
            raise ValueError(f"{path}: {error}") from error


def _integer_rows(raw: pa.Table, lines: np.ndarray, source: str,
                  delimiter: str) -> tuple[np.ndarray, np.ndarray, QuarantineReport]:
    """Rows of non-negative integers -> ((k, columns) int64 good rows, (k,) their lines, report)."""
    shape = (raw.num_rows, raw.num_columns)
    matrix = np.zeros(shape, np.int64)
    missing, malformed = np.zeros(shape, bool), np.zeros(shape, bool)
    for j, name in enumerate(raw.column_names):
        matrix[:, j], missing[:, j], malformed[:, j] = parse_integers(raw[name])
    # As in schema.py: missing_field wins over non_integer_id, then the first such column.
    has_missing = missing.any(axis=1)
    bad_cells = np.where(has_missing[:, None], missing, malformed)
    good = ~bad_cells.any(axis=1)
    bad = np.flatnonzero(~good)
    report = QuarantineReport(quarantine_rows(
        source, lines[bad], np.where(has_missing[bad], "missing_field", "non_integer_id").tolist(),
        [raw.column_names[j] for j in bad_cells[bad].argmax(axis=1)],
        row_texts(raw.take(bad), delimiter)), raw.num_rows)
    return matrix[good], lines[good], report


def _wrong_width(source: str, wrong: list) -> QuarantineReport:
    """Report the rows the CSV parser skipped for having the wrong number of columns."""
    def field(text: str, expected: int, actual: int) -> str:
        lines = text.count("\n") + 1     # more than one: quoting joined lines
        return (f"columns (expected {expected}, got {actual})"
                + (f", {lines} lines: an unclosed quote?" if lines > 1 else ""))

    return QuarantineReport(quarantine_rows(
        source, np.array([w[0] for w in wrong], np.int64), ["wrong_column_count"] * len(wrong),
        [field(*w[1:]) for w in wrong], [w[1] for w in wrong]), len(wrong))


def _checked(config: DataConfig, *reports: QuarantineReport) -> QuarantineReport:
    """One block's reports merged; in strict mode its earliest bad row raises."""
    report = QuarantineReport.concat(reports)
    if config.strict:
        report.raise_first()
    return report


def _finish(uri: str, tables: list[pa.Table], reports: list[QuarantineReport],
            storage_options: dict | None,
            quarantine_uri: str | None) -> tuple[pa.Table, QuarantineReport]:
    """Concatenate the blocks; log the quarantine and write it where asked."""
    empty = np.zeros(0, np.int64)
    try:
        events = (pa.concat_tables(tables, promote_options="permissive") if tables
                  else event_table(empty, empty, empty, empty))
    except (pa.ArrowTypeError, pa.ArrowInvalid) as error:
        raise ValueError(f"{uri}: its files give a feature column different types; "
                         f"write it with one type in every file ({error})") from None
    report = QuarantineReport.concat(reports)
    report.rows = report.rows.sort_by([("source", "ascending"), ("line", "ascending")])
    report.log_summary(uri)
    if quarantine_uri:
        report.write(quarantine_uri, storage_options)
    return events, report


def _files(uri: str, storage_options: dict | None) -> list[str]:
    """The file itself, or the data files of a directory in name order, as fsspec URIs."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.isdir(path):
        return [uri]
    root = len(path.rstrip("/"))
    names = sorted(p for p in fs.find(path)
                   if not any(part.startswith(("_", ".")) for part in p[root:].split("/")))
    if not names:
        raise FileNotFoundError(f"{uri}: no data files in this directory")
    return [fs.unstrip_protocol(p) if "://" in uri else p for p in names]


def parquet_columns(uri: str, storage_options: dict | None = None) -> list[str]:
    """Column names of the Parquet file at `uri`, or of the first data file of a directory (the
    reader names any other file that lacks a mapped column)."""
    path = _files(uri, storage_options)[0]
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        try:
            return pq.read_schema(f).names
        except (pa.ArrowInvalid, OSError) as error:
            raise ValueError(f"{path}: {error}") from error


def _header(uri: str, delimiter: str, storage_options: dict | None) -> list[str]:
    # Bytes, then only the first line decoded: a text reader would decode a whole buffer and fail
    # on bad bytes further down, which the CSV reader reports with their row. utf-8-sig drops the
    # byte-order mark Excel writes (pyarrow skips it in the data itself).
    with fsspec.open(uri, "rb", compression="infer", **(storage_options or {})) as f:
        raw = f.readline()
    try:
        line = raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"{uri}, line 1: the header is not UTF-8 ({error})") from None
    if not line:
        raise ValueError(f"{uri}, line 1: expected a header row of column names")
    return [name.strip().strip('"') for name in line.split(delimiter)]
