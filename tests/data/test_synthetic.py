"""The synthetic generator: determinism, Taobao-like statistics and the structure models must learn."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from dist_rec.config import DataConfig
from dist_rec.data.readers import read_user_behavior
from dist_rec.data.schema import event_schema, event_type_codes
from dist_rec.data import synthetic
from dist_rec.data.synthetic import (SyntheticConfig, add_arguments, generate_events, run_from_args,
                                     write_hourly_parquet, write_user_behavior_csv)

CONFIG = SyntheticConfig(seed=0, num_users=2_000, num_items=100_000, num_categories=500,
                         num_events=200_000)
PV, CART, BUY = 1, 2, 4  # event type codes
DAY = 86_400


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_events(CONFIG, progress=False)


@pytest.fixture(scope="module")
def events(table) -> dict[str, np.ndarray]:
    columns = {name: table[name].to_numpy() for name in ("user_id", "item_id", "category_id", "timestamp")}
    columns["type"] = event_type_codes(table["event_type"])
    return columns


def _pairs(events: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Consecutive events of the same user: previous/next columns and the gap (seconds)."""
    same_user = events["user_id"][1:] == events["user_id"][:-1]
    out = {f"prev_{k}": v[:-1][same_user] for k, v in events.items()}
    out.update({f"next_{k}": v[1:][same_user] for k, v in events.items()})
    out["gap"] = out["next_timestamp"] - out["prev_timestamp"]
    return out


def test_same_seed_same_table_other_seed_differs():
    small = SyntheticConfig(seed=3, num_users=300, num_items=20_000, num_categories=50, num_events=20_000)
    first, again = generate_events(small, progress=False), generate_events(small, progress=False)
    assert first.equals(again)
    other = generate_events(dataclasses.replace(small, seed=4), progress=False)
    assert len(other) == len(first) == 20_000
    assert np.mean(other["item_id"].to_numpy() == first["item_id"].to_numpy()) < 0.01


def test_schema_sizes_order_and_period(table, events):
    assert table.schema.equals(event_schema(with_category=True), check_metadata=True)
    user, ts = events["user_id"], events["timestamp"]
    assert len(user) == CONFIG.num_events
    assert np.array_equal(np.unique(user), np.arange(1, CONFIG.num_users + 1))  # everyone is active
    assert np.all(np.diff(user) >= 0) and np.all(np.diff(ts)[np.diff(user) == 0] >= 0)
    assert ts.min() >= 1511568000 and ts.max() < 1511568000 + 216 * 3600
    assert events["item_id"].max() <= CONFIG.num_items and events["category_id"].max() <= 500
    # Each item has one category.
    pairs = np.unique(np.stack([events["item_id"], events["category_id"]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]


def _zipf_slope(items: np.ndarray, first_rank: int = 10, min_count: int = 20) -> float:
    """Slope of log(count) on log(rank) over the head: from first_rank while counts >= min_count."""
    counts = np.sort(np.unique(items, return_counts=True)[1])[::-1]
    counts = counts[first_rank - 1:np.searchsorted(-counts, -min_count, "right")]
    return np.polyfit(np.log(np.arange(first_rank, first_rank + len(counts))), np.log(counts), 1)[0]


def test_item_popularity_is_zipf_with_the_configured_exponent(events):
    # Items of one shelf slot share its weight, so the very head is a staircase: measured slopes
    # are 0.9-1.0 times the exponent (-0.78 and -1.11 here).
    assert _zipf_slope(events["item_id"]) == pytest.approx(-0.8, abs=0.1)
    steep = generate_events(dataclasses.replace(CONFIG, zipf_exponent=1.2), progress=False)
    assert _zipf_slope(steep["item_id"].to_numpy()) == pytest.approx(-1.2, abs=0.1)


def test_behaviour_mix_matches_taobao(events):
    mix = np.bincount(events["type"], minlength=5)[1:] / len(events["type"])
    assert np.abs(mix - np.array([0.895, 0.055, 0.03, 0.02])).max() < 0.003  # brief: ±1 point


def test_behaviour_depends_on_context(events):
    p = _pairs(events)
    same_item = (p["next_item_id"] == p["prev_item_id"]) & (p["gap"] < 1800)
    after_cart = p["prev_type"] == CART
    buy_after_cart = np.mean(same_item[after_cart] & (p["next_type"][after_cart] == BUY))
    buy_after_pv = np.mean((p["next_type"] == BUY)[p["prev_type"] == PV])
    assert buy_after_cart > 0.2 and buy_after_cart > 10 * buy_after_pv
    # Every cart/fav/buy inside a session is on the item just viewed.
    action = (p["next_type"] != PV) & (p["gap"] < 1800)
    assert np.all(same_item[action])


def test_sessions_have_short_gaps_inside_and_long_ones_between(events):
    gap = _pairs(events)["gap"]
    between = gap >= 1800
    # Sessions of mean length 8: one gap in 8 opens a session (users here never hit the cap).
    assert 0.115 < between.mean() < 0.135
    assert np.median(gap[~between]) == pytest.approx(45, abs=3)  # lognormal, median 45 s
    assert np.quantile(gap[~between], 0.9) < 300
    assert 3 * 3600 < np.median(gap[between]) < 2 * DAY


def test_popularity_drifts_and_items_live_within_their_lifetime(events):
    item, ts = events["item_id"], events["timestamp"] - 1511568000
    first_day, last_day = item[ts < DAY], item[ts >= 8 * DAY]
    top = [set(np.unique(x, return_counts=True)[0][np.argsort(-np.unique(x, return_counts=True)[1])[:100]])
           for x in (first_day, last_day)]
    assert len(top[0] & top[1]) == 0
    order = np.argsort(item, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(item[order]) > 0])
    span = np.maximum.reduceat(ts[order], starts) - np.minimum.reduceat(ts[order], starts)
    assert span.max() < 72 * 3600
    # New items keep appearing: most of the last day's events are on items unseen before day 6.
    seen_early = np.unique(item[ts < 6 * DAY])
    assert np.mean(~np.isin(last_day, seen_early)) > 0.5


def test_next_item_follows_item_to_item_transitions(events):
    p = _pairs(events)
    keep = (p["gap"] < 1800) & (p["next_item_id"] != p["prev_item_id"])
    prev, nxt, train = p["prev_item_id"][keep], p["next_item_id"][keep], p["prev_user_id"][keep] % 2 == 0
    # Most frequent successor of each item, learned on even users, tested on odd users.
    pair_ids, counts = np.unique(np.stack([prev[train], nxt[train]]), axis=1, return_counts=True)
    order = np.lexsort((-counts, pair_ids[0]))
    first = np.r_[True, np.diff(pair_ids[0][order]) > 0]
    best = dict(zip(pair_ids[0][order][first], pair_ids[1][order][first]))
    predicted = np.array([best.get(x, -1) for x in prev[~train]])
    successor_hit = np.mean(predicted == nxt[~train])
    items, item_counts = np.unique(nxt[train], return_counts=True)
    popular_hit = np.mean(nxt[~train] == items[np.argmax(item_counts)])
    assert successor_hit > 0.1 and successor_hit > 20 * popular_hit


def test_gap_decides_between_last_item_and_taste(events):
    p = _pairs(events)
    same_category = p["next_category_id"] == p["prev_category_id"]
    within = same_category[p["gap"] < 1800].mean()
    soon = same_category[(p["gap"] >= 1800) & (p["gap"] < 3600)].mean()
    late = same_category[p["gap"] > DAY].mean()
    assert within > 0.95 and soon > 0.7 and late < 0.5


def test_after_a_long_gap_the_category_comes_from_the_users_taste(events):
    user, category = events["user_id"] - 1, events["category_id"]
    counts = np.bincount(user)
    position = np.arange(len(user)) - (np.cumsum(counts) - counts)[user]
    early = position < counts[user] // 2
    # Each user's 4 most frequent categories in the first half of their events.
    key = user * 1_000 + category
    keys, key_counts = np.unique(key[early], return_counts=True)
    order = np.lexsort((-key_counts, keys // 1_000))
    rank = np.arange(len(order)) - np.searchsorted(keys[order] // 1_000, keys[order] // 1_000)
    favourites = keys[order][rank < 4]
    gap = np.r_[0, np.diff(events["timestamp"])]
    late_start = ~early & (position > 0) & (gap > DAY / 2)
    own = np.isin(key[late_start], favourites).mean()
    stranger = np.random.default_rng(0).permutation(CONFIG.num_users)[user[late_start]]
    chance = np.isin(stranger * 1_000 + category[late_start], favourites).mean()
    assert own > 0.6 and own > 5 * chance


def test_taste_and_time_give_twice_mostpop_recall_in_the_tdm_protocol():
    """Headroom for HRNN: a model-free taste × recent-popularity ranking beats MostPop 2.5x.

    TDM protocol on held-out users: the first half of a user's events is the input, the second
    half the truth, recall@200 = hits / len(second half). MostPop ranks by all training events;
    the taste ranking scores the items of training events in the 24 hours before the split by
    their count there times the share of the item's category in the user's first half.
    """
    config = SyntheticConfig(seed=1, num_users=20_000, num_items=300_000, num_categories=600,
                             num_events=600_000)
    table = generate_events(config, progress=False)
    user, item, category, ts = (table[n].to_numpy() for n in ("user_id", "item_id", "category_id",
                                                               "timestamp"))
    test = np.random.default_rng(0).random(config.num_users + 1) < 0.05
    train = ~test[user]
    items, counts = np.unique(item[train], return_counts=True)
    most_pop = items[np.argsort(-counts)[:200]]
    hour = (ts[train] - ts.min()) // 3600
    recent = {}  # hour -> (items, their categories, counts) of training events in the 24 h to it
    recall = {"most_pop": [], "taste": []}
    bounds = np.r_[np.flatnonzero(np.r_[True, np.diff(user) != 0]), len(user)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if not test[user[lo]] or hi - lo < 4:
            continue
        split = lo + (hi - lo) // 2
        now = (ts[split - 1] - ts.min()) // 3600
        if now not in recent:
            window = (hour > now - 24) & (hour <= now)
            found, first, found_counts = np.unique(item[train][window], return_index=True,
                                                   return_counts=True)
            recent[now] = found, category[train][window][first], found_counts
        found, found_category, found_counts = recent[now]
        tastes, taste_counts = np.unique(category[lo:split], return_counts=True)
        at = np.minimum(np.searchsorted(tastes, found_category), len(tastes) - 1)
        liked = np.flatnonzero(tastes[at] == found_category)
        score = found_counts[liked] * taste_counts[at[liked]]
        truth = item[split:hi]
        recall["most_pop"].append(np.isin(truth, most_pop).mean())
        recall["taste"].append(np.isin(truth, found[liked[np.argsort(-score, kind="stable")[:200]]]).mean())
    most_pop_recall, taste_recall = np.mean(recall["most_pop"]), np.mean(recall["taste"])
    assert len(recall["taste"]) > 500
    assert 0.05 < most_pop_recall < 0.3 and taste_recall > 2.5 * most_pop_recall


def test_csv_round_trips_through_the_taobao_reader(tmp_path):
    table = generate_events(SyntheticConfig(num_users=100, num_items=10_000, num_categories=30,
                                            num_events=5_000), progress=False)
    uri = str(tmp_path / "out" / "UserBehavior.csv")
    write_user_behavior_csv(table, uri)
    first_line = open(uri).readline().strip().split(",")
    assert first_line == [str(table[n][0].as_py()) for n in ("user_id", "item_id", "category_id",
                                                              "event_type", "timestamp")]
    read, report = read_user_behavior(uri, DataConfig(strict=True))
    assert report.rows_read == 5_000 and report.rows.num_rows == 0
    for name in ("user_id", "item_id", "category_id", "timestamp"):
        assert np.array_equal(read[name].to_numpy(), table[name].to_numpy())
    assert np.array_equal(event_type_codes(read["event_type"]), event_type_codes(table["event_type"]))


def _check_hourly(table: pa.Table, dataset: ds.Dataset, files: list[str]) -> None:
    hours = sorted({t // 3600 for t in table["timestamp"].to_pylist()})
    assert len(files) == len(hours) and files[0].endswith("/hour=2017112500/part-0.parquet")
    read = dataset.to_table().sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    assert read.num_rows == table.num_rows
    for name in ("user_id", "item_id", "category_id", "timestamp", "value"):
        assert read[name].to_pylist() == table[name].to_pylist()
    # The partition value is the UTC hour of every row in it.
    utc = datetime.timezone.utc
    assert read["hour"].to_pylist() == [int(f"{datetime.datetime.fromtimestamp(t, utc):%Y%m%d%H}")
                                        for t in read["timestamp"].to_pylist()]


def test_hourly_parquet_local(tmp_path):
    table = generate_events(SyntheticConfig(num_users=100, num_items=10_000, num_categories=30,
                                            num_events=5_000, duration_hours=24), progress=False)
    files = write_hourly_parquet(table, str(tmp_path / "hourly"))
    _check_hourly(table, ds.dataset(str(tmp_path / "hourly"), format="parquet", partitioning="hive"), files)


@pytest.mark.s3
def test_csv_and_hourly_parquet_on_s3(s3_storage):
    table = generate_events(SyntheticConfig(num_users=50, num_items=5_000, num_categories=20,
                                            num_events=2_000, duration_hours=6), progress=False)
    options = s3_storage.storage_options()
    write_user_behavior_csv(table, f"{s3_storage.uri}/UserBehavior.csv", options)
    files = write_hourly_parquet(table, f"{s3_storage.uri}/hourly", options)
    fs, root = fsspec.core.url_to_fs(s3_storage.uri, **options)
    read, _ = read_user_behavior(f"{s3_storage.uri}/UserBehavior.csv", storage_options=options)
    assert np.array_equal(read["item_id"].to_numpy(), table["item_id"].to_numpy())
    dataset = ds.dataset(f"{root}/hourly", format="parquet", partitioning="hive",
                         filesystem=pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs)))
    _check_hourly(table, dataset, files)


@pytest.mark.parametrize("switch", [False, True])
def test_switch_on_new_session_changes_the_favourite_unless_resumed(switch):
    config = SyntheticConfig(num_users=300, num_items=20_000, num_categories=400, num_events=30_000,
                             explore_prob=0.0, switch_on_new_session=switch)
    rng = np.random.default_rng(config.seed)          # the draws generate_events makes first
    catalog, timeline = synthetic._catalog(config, rng), synthetic._timeline(config, rng)
    category, resumed = synthetic._session_categories(config, timeline, catalog, rng)
    same_user = timeline.session_user[1:] == timeline.session_user[:-1]
    kept = category[1:] == category[:-1]
    assert kept[same_user & resumed[1:]].all()
    fresh = kept[same_user & ~resumed[1:]]
    assert len(fresh) > 500
    if switch:   # another favourite; two favourites of a user rarely share a category
        assert fresh.mean() < 0.03
    else:        # by taste: Dirichlet(0.5) over 4 favourites repeats often
        assert fresh.mean() > 0.3


@pytest.mark.s3
def test_generate_command_writes_to_s3_through_the_aws_environment(s3_storage):
    """`dist-rec generate` has no storage flags: s3fs finds the keys and the endpoint
    (AWS_ENDPOINT_URL, as for MinIO) in the environment, which the fixture sets."""
    from dist_rec.cli import main

    assert main(["generate", "--out", s3_storage.uri, "--users", "20", "--items", "2000",
                 "--categories", "10", "--events", "300", "--hours", "3", "--no-progress"]) == 0
    read, _ = read_user_behavior(f"{s3_storage.uri}/UserBehavior.csv",
                                 storage_options=s3_storage.storage_options())
    assert read.num_rows == 300


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def fail_midway(columns, sink, options):
        sink.write(b"1,2,3,pv,1511568000\n")
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.pacsv, "write_csv", fail_midway)
    table = generate_events(SyntheticConfig(num_users=10, num_items=1_000, num_categories=5,
                                            num_events=100), progress=False)
    with pytest.raises(OSError, match="disk full"):
        write_user_behavior_csv(table, str(tmp_path / "UserBehavior.csv"))
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary one


def test_cli_options_and_run(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for flag in ("--out", "--format", "--users", "--items", "--categories", "--events", "--seed",
                 "--zipf", "--hours", "--lifetime-hours", "--no-progress"):
        assert flag in text
    args = parser.parse_args(["--out", str(tmp_path), "--format", "both", "--users", "20",
                              "--items", "2000", "--categories", "10", "--events", "500",
                              "--hours", "3", "--seed", "7", "--no-progress"])
    written = run_from_args(args)
    assert written["csv"] == f"{tmp_path}/UserBehavior.csv" and len(written["parquet"]) == 3
    expected = generate_events(SyntheticConfig(seed=7, num_users=20, num_items=2000, num_categories=10,
                                               num_events=500, duration_hours=3), progress=False)
    read, _ = read_user_behavior(written["csv"])
    assert read.num_rows == 500
    assert np.array_equal(read["item_id"].to_numpy(), expected["item_id"].to_numpy())


@pytest.mark.parametrize("field, value, message", [
    ("num_users", 0, "num_users must be > 0"),
    ("behavior_mix", (0.9, 0.1), "behavior_mix must be 4 shares"),
    ("successor_prob", 1.5, "successor_prob must be in [0, 1]"),
    ("num_events", 10, "num_events must be >= num_users"),
])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SyntheticConfig(**{field: value})
