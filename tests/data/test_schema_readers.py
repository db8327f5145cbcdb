"""Event schema, validation with quarantine, and the four readers (local files, S3 and the real
shared data sets)."""
from __future__ import annotations

import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dist_rec.config import DataConfig
from dist_rec.data import readers
from dist_rec.data.readers import read_events, read_sessions, read_user_behavior, read_user_item
from dist_rec.data.schema import EventValidationError, event_schema, event_type_codes

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")

GOOD = ["1,10,100,pv,1511539200", "2,20,200,buy,1511539300", "1,30,100,cart,1511539400",
        "3,10,100,fav,1511539500"]
# (line text, reason, field) planted between good rows.
BAD = [("x,30,300,pv,1511539400", "non_integer_id", "user_id"),
       ("4,1.5,300,pv,1511539400", "non_integer_id", "item_id"),
       ("5,,300,pv,1511539400", "missing_field", "item_id"),
       ("6,40,400,click,1511539500", "unknown_event_type", "event_type"),
       ("7,50,500,pv,-86400", "timestamp_out_of_window", "timestamp"),
       ("8,60,600,pv,1511539600,7", "wrong_column_count", "columns (expected 5, got 6)"),
       ("9,70,700,pv", "wrong_column_count", "columns (expected 5, got 4)"),
       ("10,80,800,fav,15115397.5", "non_integer_timestamp", "timestamp")]


def write(path, lines: list[str]) -> str:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def columns(table: pa.Table) -> dict:
    return {name: table[name].to_pylist() for name in table.column_names}


def test_user_behavior_round_trip(tmp_path):
    events, report = read_user_behavior(write(tmp_path / "UserBehavior.csv", GOOD))
    assert events.schema.remove_metadata() == event_schema(with_category=True).remove_metadata()
    assert columns(events) == {
        "user_id": [1, 2, 1, 3], "item_id": [10, 20, 30, 10],
        "timestamp": [1511539200, 1511539300, 1511539400, 1511539500],
        "event_type": ["pv", "buy", "cart", "fav"], "value": [1.0] * 4,
        "category_id": [100, 200, 100, 100]}
    assert event_type_codes(events["event_type"]).tolist() == [1, 4, 2, 3]
    assert report.rows_read == 4 and report.num_quarantined == 0 and report.counts() == {}


def test_quarantine_counts_lines_and_file(tmp_path, monkeypatch):
    # Interleave: good, bad, good, bad, ... so every bad row has good neighbours; a blank line too.
    lines, expected = [], []
    for i, (text, reason, field) in enumerate(BAD):
        lines.append(GOOD[i % len(GOOD)])
        lines.append(text)
        expected.append((len(lines), reason, field, text))
    lines.append("")
    expected.append((len(lines), "missing_field", "user_id", ",,,,"))
    lines.append(GOOD[0])
    path = write(tmp_path / "bad.csv", lines)
    # Tiny parser blocks: line numbers must stay exact across block boundaries.
    monkeypatch.setattr(readers, "BLOCK_BYTES", 64)
    events, report = read_user_behavior(path, quarantine_uri=str(tmp_path / "q.csv"))

    assert report.counts() == {"wrong_column_count": 2, "missing_field": 2, "non_integer_id": 2,
                               "unknown_event_type": 1, "non_integer_timestamp": 1,
                               "timestamp_out_of_window": 1}
    assert report.rows_read == len(lines) and events.num_rows == len(BAD) + 1
    good_rows = [GOOD[i % len(GOOD)] for i in range(len(BAD))] + [GOOD[0]]
    assert [int(row.split(",")[1]) for row in good_rows] == events["item_id"].to_pylist()
    assert [int(row.split(",")[4]) for row in good_rows] == events["timestamp"].to_pylist()
    saved = pacsv.read_csv(tmp_path / "q.csv")
    assert saved.column_names == ["source", "line", "reason", "field", "text"]
    assert set(saved["source"].to_pylist()) == {path}
    assert list(zip(saved["line"].to_pylist(), saved["reason"].to_pylist(),
                    saved["field"].to_pylist(), saved["text"].to_pylist())) == expected


def test_strict_names_file_line_and_field(tmp_path):
    path = write(tmp_path / "bad.csv", GOOD[:2] + ["3,abc,100,pv,1511539200"] + GOOD[2:])
    with pytest.raises(EventValidationError) as error:
        read_user_behavior(path, DataConfig(strict=True))
    assert isinstance(error.value, ValueError)
    assert f"{path}, line 3, field 'item_id': non_integer_id" in str(error.value)
    # The earliest bad line wins even when it is a column-count error found by the parser.
    path = write(tmp_path / "bad2.csv", GOOD[:1] + ["1,2,3"] + ["x,1,1,pv,1"] + GOOD[1:])
    with pytest.raises(EventValidationError, match=r"bad2.csv, line 2, field 'columns"):
        read_user_behavior(path, DataConfig(strict=True))


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_lines_count_the_newlines_in_quoted_values(tmp_path, monkeypatch, newline):
    """A row whose quoted value spans lines moves the next rows' lines down, wherever the tiny
    parser blocks cut (inside such a value too)."""
    lines = ["user_id,item_id,timestamp,title", '1,5,100,"two', 'lines"', "1,x,102,plain",
             '1,6,103,"a,""b""', "c", 'd"', "1,9", '1,"p', 'q"', "1,8,105,ok", "2,,106,z"]
    (tmp_path / "e.csv").write_bytes((newline.join(lines) + newline).encode())
    for block_bytes in (32, 40, 48, 1 << 20):
        monkeypatch.setattr(readers, "BLOCK_BYTES", block_bytes)
        events, report = read_events(str(tmp_path / "e.csv"), {name: name for name in
                                     ("user_id", "item_id", "timestamp")}, features=["title"])
        assert events["item_id"].to_pylist() == [5, 6, 8]
        assert events["title"].to_pylist() == [f"two{newline}lines",
                                               f'a,"b"{newline}c{newline}d', "ok"]
        assert report.rows.select(["line", "reason"]).to_pylist() == [
            {"line": 4, "reason": "non_integer_id"}, {"line": 8, "reason": "wrong_column_count"},
            {"line": 9, "reason": "wrong_column_count"}, {"line": 12, "reason": "missing_field"}]


def test_a_stray_quote_spoils_its_own_line_only(tmp_path, monkeypatch):
    """Lines are records: a quote left open on line 3 is that line's error, not the start of a
    value that swallows the rest of the file; values quoted whole read as their text."""
    lines = [GOOD[0], GOOD[1], '7,"516,19,pv,1511591269', '"4","40","100","pv","1511539600"',
             *GOOD[2:], '5,50,100,"buy",1511539700']
    monkeypatch.setattr(readers, "BLOCK_BYTES", 48)     # the open quote ends a block too
    events, report = read_user_behavior(write(tmp_path / "UserBehavior.csv", lines))
    assert events["user_id"].to_pylist() == [1, 2, 4, 1, 3, 5]
    assert events["event_type"].to_pylist() == ["pv", "buy", "pv", "cart", "fav", "buy"]
    assert report.rows.select(["line", "reason", "field", "text"]).to_pylist() == [
        {"line": 3, "reason": "non_integer_id", "field": "item_id",
         "text": '7,"516,19,pv,1511591269'}]
    # The session and user-item readers read lines alike.
    path = write(tmp_path / "sessions.csv", ['0,"3,4', '"5",6,7'])
    events, report = read_sessions(path, num_fields=3)
    assert events["item_id"].to_pylist() == [5, 6, 7]
    assert report.rows["line"].to_pylist() == [1]


def test_an_unclosed_quote_in_a_headed_csv_is_pointed_out(tmp_path, caplog):
    """A headed CSV may hold free text in any column, so its quoting is read in full and an
    unclosed quote joins lines up to the next quote. The joined row is quarantined, naming the
    lines it took, where its width is wrong; where it is not (the quote is never closed), the
    log names its line. A quoted delimiter in a column not read is just text."""
    def read(*lines):
        (tmp_path / "e.csv").write_text("\n".join(["user_id,item_id,timestamp,title", *lines])
                                        + "\n")
        return read_events(str(tmp_path / "e.csv"), {name: name for name in
                           ("user_id", "item_id", "timestamp")}, features=["title"])

    events, report = read('1,5,100,"open', "1,6,101,x", '1,7,102,"a,b"', "1,8,103,ok")
    assert events["item_id"].to_pylist() == [8]
    assert report.rows.select(["line", "field"]).to_pylist() == [
        {"line": 2, "field": "columns (expected 4, got 5), 3 lines: an unclosed quote?"}]
    caplog.clear()
    events, report = read("1,4,99,fine", '1,5,100,"open', "1,6,101,x", "1,8,103,ok")
    assert events["item_id"].to_pylist() == [4, 5] and report.num_quarantined == 0
    assert "e.csv: 1 row(s) with a quoted value spanning lines, the first at line 3" in caplog.text
    events, report = read_events(str(tmp_path / "e.csv"), {name: name for name in
                                 ("user_id", "item_id", "timestamp")})  # title is not read
    assert events["item_id"].to_pylist() == [4, 5] and report.num_quarantined == 0
    read('1,5,100,"Foo, Bar"', "1,6,101,x")
    events, report = read_events(str(tmp_path / "e.csv"), {name: name for name in
                                 ("user_id", "item_id", "timestamp")})
    assert events["item_id"].to_pylist() == [5, 6] and report.num_quarantined == 0


def test_header_after_a_byte_order_mark(tmp_path):
    """Excel writes CSV with a UTF-8 BOM before the header."""
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp\n1,5,100\n", encoding="utf-8-sig")
    events, _ = read_events(str(path), {name: name for name in
                                        ("user_id", "item_id", "timestamp")})
    assert columns(events)["user_id"] == [1] and columns(events)["item_id"] == [5]


def test_invalid_utf8_past_the_first_block_is_an_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BLOCK_BYTES", 64)
    rows = [f"{u},{u},100" for u in range(1, 20)]
    (tmp_path / "e.csv").write_bytes(("user_id,item_id,timestamp\n" + "\n".join(rows)).encode()
                                     + b"\n1,\xff\xfe,100\n")
    with pytest.raises(ValueError, match=r"e\.csv: .*UTF8"):
        read_events(str(tmp_path / "e.csv"), {name: name for name in
                                              ("user_id", "item_id", "timestamp")})


def test_empty_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: Empty CSV file"):
        read_user_behavior(str(tmp_path / "empty.csv"))


def test_timestamp_window_is_half_open(tmp_path):
    path = write(tmp_path / "w.csv", ["1,1,1,pv,99", "1,2,1,pv,100", "1,3,1,pv,199",
                                      "1,4,1,pv,200"])
    events, report = read_user_behavior(path, DataConfig(min_timestamp=100, max_timestamp=200))
    assert events["item_id"].to_pylist() == [2, 3]
    assert report.rows["line"].to_pylist() == [1, 4]


def test_parquet_with_column_mapping(tmp_path):
    table = pa.table({"ts": pa.array([30, 10, 20, 40], pa.int64()),
                      "visitorid": pa.array([7, None, 7, 9], pa.int64()),
                      "event": ["view", "view", "addtocart", "transaction"],
                      "itemid": pa.array(["5", "6", "5", "8"]),
                      "price": pa.array([1.5, 2.0, 3.0, 4.25], pa.float64()),
                      "ignored": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "events.parquet")
    mapping = {"user_id": "visitorid", "item_id": "itemid", "timestamp": "ts",
               "event_type": "event", "value": "price"}
    events, report = read_events(str(tmp_path / "events.parquet"), mapping,
                                 event_type_map={"view": "pv", "addtocart": "cart",
                                                 "transaction": "buy"})
    assert columns(events) == {"user_id": [7, 7, 9], "item_id": [5, 5, 8],
                               "timestamp": [30, 20, 40], "event_type": ["pv", "cart", "buy"],
                               "value": [1.5, 3.0, 4.25]}
    assert report.rows.to_pylist() == [{"source": str(tmp_path / "events.parquet"), "line": 2,
                                        "reason": "missing_field", "field": "user_id",
                                        "text": ",6,10,view,2"}]  # mapped columns, in order


def test_parquet_non_finite_values_are_quarantined_and_feature_encodings_merge(tmp_path):
    """A NaN or infinite value is a bad row (a model cannot learn from it); a feature column
    stored as a dictionary in one file and as (large) strings in another reads as one column."""
    (tmp_path / "events").mkdir()
    mapping = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp",
               "value": "value"}
    pq.write_table(pa.table({"user_id": [1, 1, 2], "item_id": [5, 6, 7], "timestamp": [1, 2, 3],
                             "value": [1.0, float("nan"), 2.0],
                             "device": pa.array(["app", "web", "app"]).dictionary_encode()}),
                   tmp_path / "events" / "a.parquet")
    pq.write_table(pa.table({"user_id": [3], "item_id": [5], "timestamp": [4],
                             "value": [float("inf")],
                             "device": pa.array(["tv"], pa.large_string())}),
                   tmp_path / "events" / "b.parquet")
    events, report = read_events(str(tmp_path / "events"), mapping, features=["device"])
    assert columns(events) == {"user_id": [1, 2], "item_id": [5, 7], "timestamp": [1, 3],
                               "event_type": ["pv", "pv"], "value": [1.0, 2.0],
                               "device": ["app", "app"]}
    assert report.rows.select(["line", "reason", "field"]).to_pylist() == [
        {"line": 2, "reason": "bad_value", "field": "value"},
        {"line": 1, "reason": "bad_value", "field": "value"}]
    # Types that do not merge (integers in one file, strings in another): the error names the uri.
    pq.write_table(pa.table({"user_id": [4], "item_id": [5], "timestamp": [5], "value": [1.0],
                             "device": [3]}), tmp_path / "events" / "c.parquet")
    with pytest.raises(ValueError, match=r"events: its files give a feature column different types"):
        read_events(str(tmp_path / "events"), mapping, features=["device"])


def test_csv_values_beyond_float32_are_bad_values(tmp_path):
    """1e39 is a number but +-inf in float32: quarantined like a non-finite Parquet value."""
    path = write(tmp_path / "e.csv", ["user_id,item_id,timestamp,value", "1,5,100,2.5",
                                      "1,6,101,1e39", "1,7,102,-1e39", "1,8,103,1e400"])
    events, report = read_events(path, {name: name for name in
                                        ("user_id", "item_id", "timestamp", "value")})
    assert events["value"].to_pylist() == [2.5]
    assert report.rows.select(["line", "reason", "field"]).to_pylist() == [
        {"line": line, "reason": "bad_value", "field": "value"} for line in (3, 4, 5)]


def test_csv_ids_with_spaces_or_19_digits_load_and_ids_past_int64_are_quarantined(tmp_path):
    path = write(tmp_path / "ids.csv", [" 2, 11 ,5,pv,1511539200", f"{2**63 - 1},12,5,pv,1511539201",
                                        f"{2**63},13,5,pv,1511539202", "3,  ,5,pv,1511539203"])
    events, report = read_user_behavior(path)
    assert columns(events)["user_id"] == [2, 2**63 - 1] and columns(events)["item_id"] == [11, 12]
    assert report.rows.select(["line", "reason", "field"]).to_pylist() == [
        {"line": 3, "reason": "non_integer_id", "field": "user_id"},
        {"line": 4, "reason": "missing_field", "field": "item_id"}]


def test_uint64_ids_past_int64_are_quarantined_row_by_row(tmp_path):
    """Hashed ids stored as uint64: one past int64 is a bad row, its neighbours load."""
    pq.write_table(pa.table({"user_id": pa.array([1, 2**63 + 5, 2], pa.uint64()),
                             "item_id": pa.array([5, 6, 2**64 - 1], pa.uint64()),
                             "timestamp": pa.array([100, 101, 102], pa.uint64())}),
                   tmp_path / "u.parquet")
    events, report = read_events(str(tmp_path / "u.parquet"),
                                 {name: name for name in ("user_id", "item_id", "timestamp")})
    assert columns(events)["user_id"] == [1] and columns(events)["timestamp"] == [100]
    assert report.rows.select(["line", "reason", "field"]).to_pylist() == [
        {"line": 2, "reason": "non_integer_id", "field": "user_id"},
        {"line": 3, "reason": "non_integer_id", "field": "item_id"}]


def test_unreadable_parquet_error_names_the_file(tmp_path):
    """Not Parquet (a CSV under a Parquet name), or Parquet with garbled pages: a ValueError that
    starts with the file and keeps pyarrow's message."""
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"user_id": np.arange(10_000)}), buffer)
    good = buffer.getvalue().to_pybytes()
    path = tmp_path / "events.parquet"
    for data in (b"1,5,3,pv,100\n", good[:100] + bytes(1000) + good[1100:]):
        path.write_bytes(data)
        with pytest.raises(ValueError) as error:
            read_events(str(path), {name: "user_id" for name in ("user_id", "item_id",
                                                                  "timestamp")})
        assert str(error.value) == f"{path}: {error.value.__cause__}"


def test_csv_directory_with_header_and_features(tmp_path):
    (tmp_path / "events").mkdir()
    write(tmp_path / "events" / "a.csv", ["timestamp;visitorid;itemid;shop", "5;1;2;s1",
                                          "6;1;3;s2"])
    write(tmp_path / "events" / "b.csv", ["shop;visitorid;itemid;timestamp", "s3;2;2;7",
                                          "s4;two;2;8"])
    write(tmp_path / "events" / "_SUCCESS", ["not data"])
    events, report = read_events(str(tmp_path / "events"),
                                 {"user_id": "visitorid", "item_id": "itemid",
                                  "timestamp": "timestamp"}, delimiter=";", features=["shop"])
    assert columns(events) == {"user_id": [1, 1, 2], "item_id": [2, 3, 2], "timestamp": [5, 6, 7],
                               "event_type": ["pv"] * 3, "value": [1.0] * 3,
                               "shop": ["s1", "s2", "s3"]}
    assert report.rows.select(["line", "field", "text"]).to_pylist() == [
        {"line": 3, "field": "user_id", "text": "s4;two;2;8"}]
    with pytest.raises(ValueError, match="lacks column"):
        read_events(str(tmp_path / "events" / "a.csv"), {"user_id": "user", "item_id": "itemid",
                                                         "timestamp": "timestamp"}, delimiter=";")


def test_directory_skips_files_under_hidden_or_underscore_subdirectories(tmp_path):
    """Spark's in-flight `_temporary/` and Jupyter's `.ipynb_checkpoints/` hold no data to read."""
    table = pa.table({"user_id": [1, 2], "item_id": [5, 6], "timestamp": [100, 200]})
    for folder in ("", "_temporary/0/", ".ipynb_checkpoints/"):
        (tmp_path / "events" / folder).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / "events" / folder / "part-0.parquet")
    events, report = read_events(str(tmp_path / "events"),
                                 {name: name for name in table.column_names})
    assert events["item_id"].to_pylist() == [5, 6] and report.num_quarantined == 0


def test_sessions_reader(tmp_path):
    path = write(tmp_path / "sessions.csv", ["0,0,0,3,1,2", "0,0,0,0,7,7", "0,0,x,1,2,3",
                                             "0,5,6,7,8,9"])
    events, report = read_sessions(path, num_fields=6)
    assert columns(events) == {"user_id": [1, 1, 1, 2, 2, 4, 4, 4, 4, 4],
                               "item_id": [3, 1, 2, 7, 7, 5, 6, 7, 8, 9],
                               "timestamp": [0, 1, 2, 0, 1, 0, 1, 2, 3, 4],
                               "event_type": ["pv"] * 10, "value": [1.0] * 10}
    assert report.rows.select(["line", "reason", "field"]).to_pylist() == [
        {"line": 3, "reason": "non_integer_id", "field": "field_3"}]


def test_user_item_reader(tmp_path):
    # User 2's lines are not contiguous: positions still count within the user.
    path = write(tmp_path / "ui.txt", ["1 6", "1 4", "2 4", "1 9", "3", "2 1"])
    events, report = read_user_item(path)
    assert columns(events) == {"user_id": [1, 1, 2, 1, 2], "item_id": [6, 4, 4, 9, 1],
                               "timestamp": [0, 1, 0, 2, 1], "event_type": ["pv"] * 5,
                               "value": [1.0] * 5}
    assert report.counts() == {"wrong_column_count": 1}
    assert report.rows["line"].to_pylist() == [5]


def test_shared_data_sets_documented_counts():
    sessions, report = read_sessions(os.path.join(SHARED, "yoochoose_sessions.csv"))
    assert report.num_quarantined == 0
    assert len(np.unique(sessions["user_id"].to_numpy())) == 80_183
    assert sessions.num_rows == 406_979
    assert sessions["item_id"].to_numpy().max() == 12_936
    games, report = read_user_item(os.path.join(SHARED, "amazon_games_user_item.txt"))
    assert report.num_quarantined == 0
    assert len(np.unique(games["user_id"].to_numpy())) == 31_013
    assert len(np.unique(games["item_id"].to_numpy())) == 23_715
    assert games.num_rows == 287_107


@pytest.mark.s3
def test_user_behavior_on_s3(s3_storage, tmp_path):  # noqa: F811
    options = s3_storage.storage_options()
    uri = f"{s3_storage.uri}/UserBehavior.csv.gz"
    with fsspec.open(uri, "wt", compression="gzip", **options) as f:
        f.write("\n".join(GOOD + [BAD[0][0]]) + "\n")
    events, report = read_user_behavior(uri, storage_options=options,
                                        quarantine_uri=f"{s3_storage.uri}/quarantine.csv")
    assert events["item_id"].to_pylist() == [10, 20, 30, 10]
    with fsspec.open(f"{s3_storage.uri}/quarantine.csv", "rb", **options) as f:
        saved = pacsv.read_csv(f)
    assert saved.select(["source", "line", "reason"]).to_pylist() == [
        {"source": uri, "line": 5, "reason": "non_integer_id"}]


def test_item_catalog_quarantines_bad_ids_and_keeps_each_items_last_row(tmp_path, caplog):
    directory = tmp_path / "catalog"
    directory.mkdir()
    pq.write_table(pa.table({"item_id": ["5", "x", "7", None, "9"],
                             "brand": ["a", "b", "c", "d", "e"], "unused": [1, 2, 3, 4, 5]}),
                   directory / "part-0.parquet")
    pq.write_table(pa.table({"item_id": ["7", "11"], "brand": ["z", None], "unused": [6, 7]}),
                   directory / "part-1.parquet")
    quarantine = tmp_path / "quarantine.csv"
    with caplog.at_level("WARNING", logger="dist_rec.data.readers"):
        catalog, report = readers.read_item_catalog(str(directory), ["brand"],
                                                    quarantine_uri=str(quarantine))
    assert columns(catalog) == {"item_id": [5, 9, 7, 11], "brand": ["a", "e", "z", None]}
    assert "1 item(s) listed more than once; each takes its last row" in caplog.text
    bad = report.rows.to_pylist()
    assert [(r["source"].rsplit("/", 1)[1], r["line"], r["reason"], r["field"]) for r in bad] == [
        ("part-0.parquet", 2, "non_integer_id", "item_id"),
        ("part-0.parquet", 4, "missing_field", "item_id")]
    assert report.rows_read == 7 and "non_integer_id" in quarantine.read_text()
    with pytest.raises(EventValidationError, match=r"part-0.parquet, line 2, field 'item_id'"):
        readers.read_item_catalog(str(directory), ["brand"], DataConfig(strict=True))
    with pytest.raises(ValueError, match=r"part-0.parquet: Parquet columns .* lack \['size'\]"):
        readers.read_item_catalog(str(directory), ["size"])
