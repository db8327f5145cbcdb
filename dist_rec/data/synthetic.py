"""Synthetic Taobao-like behaviour events with structure a sequence model can learn.

The story (vectorised across users with numpy; the only Python loop walks event positions):
- Catalog: items sit on shelf slots; a slot has a category and a Zipf weight rank^-s. Its items
  replace each other: each lives `item_lifetime_hours` with an appeal that rises then fades, and a
  new one is born every half lifetime. Item counts stay Zipf, yet what is popular now is not what
  was popular overall (drift), and new items keep appearing through the period.
- Users: a lognormal activity; a few favourite categories (drawn ∝ category mass) with Dirichlet
  weights; sessions apart by 30 minutes to days, lognormal gaps of seconds to minutes inside.
- A session opens in a favourite category (sometimes any category) on an item popular *now*,
  unless the user comes back soon: then, with a probability decaying with the gap, it resumes the
  previous session. After a long gap the taste matters, after a short one the last item does.
  With `switch_on_new_session` a session that does not resume opens in another of the user's
  favourite categories (uniformly), so the gap decides the intent: same category or another one.
- Inside a session the next new item is, with probability `successor_prob`, one of the previous
  item's fixed successors (slots of its category drawn by weight), else a popular item of the
  session's category.
- Behaviour types follow a Markov chain (re-views before cart/fav, buy after cart of the same
  item) whose rates are calibrated so the expected mix equals `behavior_mix`.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from dist_rec.config import EVENT_TYPES
from dist_rec.data.schema import event_table
from dist_rec.storage import filesystem

log = logging.getLogger(__name__)

TAOBAO_START = 1511568000  # 2017-11-25 00:00 UTC

# Behaviour chain states; the item stays the same for every state but PV_NEW.
PV_NEW, PV_REPEAT, CART, FAV, BUY = range(5)
STATE_CODES = np.array([1, 1, 2, 3, 4])  # event type codes of EVENT_TYPES (pv, cart, fav, buy)
# Relative rates of the next state given the current one (columns: re-view, cart, fav, buy).
# Re-views are absolute probabilities; the cart/fav/buy columns are scaled by calibrated factors.
# Shape, not scale, matters: carts follow re-views, buys follow carts of the same item.
_RATES = np.array([
    # re-view cart  fav  buy
    [0.12,     1.0,  1.0, 0.2],   # after pv of a new item
    [0.15,     3.0,  2.0, 1.0],   # after a re-view
    [0.10,     0.3,  0.3, 10.0],  # after cart
    [0.10,     3.0,  0.0, 1.0],   # after fav
    [0.05,     0.3,  0.3, 0.3],   # after buy
])


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings. num_items is the catalog size; a remainder below one slot's worth of
    items (see _Catalog) never appears, like the many tail items that draw no events."""

    seed: int = 0
    num_users: int = 100_000
    num_items: int = 1_000_000
    num_categories: int = 2_000
    num_events: int = 10_000_000
    zipf_exponent: float = 0.8              # slot (item) popularity ∝ rank^-zipf_exponent
    start_timestamp: int = TAOBAO_START
    duration_hours: int = 216               # 9 days, like Taobao UserBehavior
    behavior_mix: tuple[float, ...] = (0.895, 0.055, 0.03, 0.02)  # pv, cart, fav, buy
    user_activity_sigma: float = 1.0        # lognormal spread of events per user
    mean_session_length: float = 8.0        # events per session (heavy users get longer ones)
    session_gap_seconds: int = 1800         # sessions are further apart, gaps inside are shorter
    within_gap_median_seconds: float = 45.0
    within_gap_sigma: float = 1.0
    categories_per_user: int = 4
    taste_concentration: float = 0.5        # Dirichlet alpha over a user's favourite categories
    explore_prob: float = 0.1               # session opens in a random category instead
    switch_on_new_session: bool = False     # a session that does not resume changes favourite
    successor_weights: tuple[float, ...] = (0.6, 0.3, 0.1)  # choice among an item's successors
    successor_prob: float = 0.7             # next new item in a session is a successor
    resume_prob: float = 0.8                # P(resume previous session) at gap 0 ...
    resume_decay_hours: float = 2.0         # ... decaying as exp(-gap / decay)
    item_lifetime_hours: int = 72           # a new item takes over each slot every half lifetime

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("num_users", "num_items", "num_categories", "duration_hours",
                     "session_gap_seconds", "within_gap_median_seconds", "categories_per_user",
                     "taste_concentration", "resume_decay_hours", "item_lifetime_hours"):
            check(getattr(self, name) > 0, name, "> 0")
        for name in ("user_activity_sigma", "within_gap_sigma"):
            check(getattr(self, name) >= 0, name, ">= 0")
        for name in ("explore_prob", "successor_prob", "resume_prob"):
            check(0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        check(self.num_events >= self.num_users, "num_events", ">= num_users (every user has an event)")
        check(self.mean_session_length >= 1, "mean_session_length", ">= 1")
        check(4 * self.session_gap_seconds <= self.duration_hours * 3600, "session_gap_seconds",
              "<= a quarter of duration_hours")
        mix = np.asarray(self.behavior_mix, dtype=float)
        check(mix.shape == (4,) and (mix >= 0).all() and abs(mix.sum() - 1) < 1e-6, "behavior_mix",
              "4 shares (pv, cart, fav, buy) summing to 1")
        weights = np.asarray(self.successor_weights, dtype=float)
        check(weights.ndim == 1 and len(weights) > 0 and (weights >= 0).all() and weights.sum() > 0,
              "successor_weights", "non-empty and non-negative")


@dataclass(frozen=True)
class _Catalog:
    """Items on shelf slots. A slot has a Zipf weight and a category; its items follow each other:
    item j of slot k is born at phase_k + (j - 2) * lifetime / 2 and lives one lifetime, with a tent
    shaped appeal (rising, then fading). Two items of a slot are alive at any time and their tents
    sum to 1, so a category always offers the same mass while its items turn over (drift).
    Item index = slot * items_per_slot + j; slots are sorted by category."""

    slot_cumulative: np.ndarray  # (K + 1,) prefix sums of slot weights
    slot_category: np.ndarray    # (K,) sorted
    category_range: np.ndarray   # (C + 1,) slots of category c are [range[c], range[c + 1])
    phase: np.ndarray            # (K,) seconds, in [0, lifetime / 2)
    successors: np.ndarray       # (I, S) successor slots of each item
    items_per_slot: int
    lifetime: int                # seconds

    def popular_item(self, category: np.ndarray, seconds: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
        """(M,) categories, (M,) seconds -> (M,) items drawn ∝ slot weight × tent, alive then."""
        slots = _draw_in_ranges(self.slot_cumulative, self.category_range[category],
                                self.category_range[category + 1], rng.random(len(category)))
        return self.alive_item(slots, seconds, rng.random(len(category)))

    def birth(self, items: np.ndarray) -> np.ndarray:
        """(M,) item indices -> (M,) birth in seconds since the start (may be negative)."""
        j = items % self.items_per_slot
        return self.phase[items // self.items_per_slot] + (j - 2) * (self.lifetime / 2)

    def alive_item(self, slots: np.ndarray, seconds: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """The item of each slot alive at `seconds`: the younger with probability of its tent."""
        half = self.lifetime / 2
        position = (seconds - self.phase[slots]) / half + 2  # j of the younger item, plus its age
        younger = np.floor(position).astype(np.int64)
        older = uniforms >= position - younger
        return slots * self.items_per_slot + younger - older


def _catalog(config: SyntheticConfig, rng: np.random.Generator) -> _Catalog:
    """Slots with categories (lognormal sizes), Zipf weights, phases and per-item successors."""
    life = config.item_lifetime_hours * 3600
    # Births from phase - lifetime to the end of the period: enough items to cover every moment.
    per_slot = int(np.floor(2 * config.duration_hours * 3600 / life)) + 3
    slots = config.num_items // per_slot
    if slots == 0:
        raise ValueError(f"SyntheticConfig.num_items ({config.num_items}) must be >= {per_slot}: "
                         f"every shelf slot holds {per_slot} successive items over the period")
    category_weights = rng.lognormal(0.0, 1.0, config.num_categories)  # heavy-tailed category sizes
    category = np.sort(_draw(np.cumsum(category_weights), rng.random(slots)))
    weight = (rng.permutation(slots) + 1.0) ** -config.zipf_exponent
    cumulative = np.concatenate([[0.0], np.cumsum(weight)])
    category_range = np.searchsorted(category, np.arange(config.num_categories + 1))
    # Successor slots: same category, drawn by weight. The item's own slot may come up (then the
    # successor is the item itself or its sibling): excluding it would starve the heaviest slots.
    own = np.repeat(np.arange(slots), per_slot)
    lo, hi = category_range[category[own]], category_range[category[own] + 1]
    successors = _draw_in_ranges(cumulative, lo[:, None], hi[:, None],
                                 rng.random((len(own), len(config.successor_weights))))
    phase = rng.random(slots) * (life / 2)
    return _Catalog(cumulative, category, category_range, phase, successors, per_slot, life)


def _draw(cumulative: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Indices drawn ∝ weights by inverse CDF (cumulative (N,) weight sums, uniforms (M,) -> (M,))."""
    return np.minimum(np.searchsorted(cumulative, uniforms * cumulative[-1], "right"), len(cumulative) - 1)


def _draw_in_ranges(cumulative: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                    uniforms: np.ndarray) -> np.ndarray:
    """Positions in [lo, hi) drawn ∝ weight, from prefix sums (N + 1,); lo < hi, all broadcast."""
    target = cumulative[lo] + uniforms * (cumulative[hi] - cumulative[lo])
    return np.clip(np.searchsorted(cumulative, target, "right") - 1, lo, hi - 1)


@dataclass(frozen=True)
class _Timeline:
    """Events in user-major, time order (N events, S sessions, U users)."""

    counts: np.ndarray         # (U,) events per user
    user: np.ndarray           # (N,) user index
    seconds: np.ndarray        # (N,) seconds since the start
    starts: np.ndarray         # (N,) bool: event opens a session
    session: np.ndarray        # (N,) session index
    position: np.ndarray       # (N,) position inside its session
    session_user: np.ndarray   # (S,) user index
    session_gap: np.ndarray    # (S,) seconds since the user's previous session ended (inf if first)


def _segment_cumsum(values: np.ndarray, segment: np.ndarray, segment_first: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sums restarting at each segment (values, segment (N,) -> (N,))."""
    total = np.cumsum(values)
    return total - (total - values)[segment_first][segment]


def _timeline(config: SyntheticConfig, rng: np.random.Generator) -> _Timeline:
    users, period, gap = config.num_users, config.duration_hours * 3600, config.session_gap_seconds
    activity = rng.lognormal(0.0, config.user_activity_sigma, users)
    counts = 1 + rng.multinomial(config.num_events - users, activity / activity.sum())
    user = np.repeat(np.arange(users), counts)
    user_first = np.cumsum(counts) - counts
    # Sessions per user ~ events / mean length, capped so the minimum gaps use <= 1/4 of the period.
    max_sessions = period // (4 * gap)
    start_prob = np.minimum(1 / config.mean_session_length, (max_sessions - 1) / np.maximum(counts - 1, 1))
    starts = rng.random(len(user)) < start_prob[user]
    starts[user_first] = True
    session = np.cumsum(starts) - 1
    session_first = np.flatnonzero(starts)
    session_user = user[session_first]
    position = np.arange(len(user)) - session_first[session]
    within = rng.lognormal(np.log(config.within_gap_median_seconds), config.within_gap_sigma, len(user))
    within = np.clip(np.rint(within), 1, gap - 1).astype(np.int64)
    within[starts] = 0
    sessions_per_user = np.bincount(session_user, minlength=users)
    room = period - 1 - (sessions_per_user - 1) * gap  # seconds left for session lengths and slack
    busy = np.bincount(user, weights=within, minlength=users)
    if (busy > room).any():  # very heavy users: squeeze their within-session gaps to fit
        within = np.floor(within * np.minimum(1.0, room / np.maximum(busy, 1))[user]).astype(np.int64)
        busy = np.bincount(user, weights=within, minlength=users)
    length_seconds = np.bincount(session, weights=within).astype(np.int64)
    # Free time spread with uniform spacings: S_u + 1 exponential pieces normalised per user.
    pieces = rng.exponential(size=len(session_first))
    pieces_total = np.bincount(session_user, weights=pieces, minlength=users) + rng.exponential(size=users)
    slack = np.floor(pieces / pieces_total[session_user] * (room - busy)[session_user]).astype(np.int64)
    first_session = np.cumsum(sessions_per_user) - sessions_per_user
    is_first = np.isin(np.arange(len(session_first)), first_session)
    step = slack + np.where(is_first, 0, np.roll(length_seconds, 1) + gap)
    session_start = _segment_cumsum(step, session_user, first_session)
    session_gap = np.where(is_first, np.inf, slack + gap).astype(np.float64)
    seconds = session_start[session] + _segment_cumsum(within, session, session_first)
    return _Timeline(counts, user, seconds, starts, session, position, session_user, session_gap)


def _behaviour_chain(mix: tuple[float, ...], position: np.ndarray, horizon: int = 64) -> np.ndarray:
    """(5, 5) transition matrix over PV_NEW..BUY whose expected mix over these sessions is `mix`.

    Every session starts in PV_NEW; `position` (N,) is each event's index in its session. Beyond
    `horizon` steps the chain is at its stationary distribution, so the tail is lumped there.
    """
    at_position = np.bincount(np.minimum(position, horizon), minlength=horizon + 1)
    target = np.asarray(mix, dtype=float)
    scale = target[1:].copy()  # small enough that every row starts as a distribution
    for _ in range(200):
        rates = _RATES * np.concatenate([[1.0], scale])
        transition = np.column_stack([1 - rates.sum(axis=1), rates])
        state, expected = np.eye(5)[PV_NEW], np.zeros(5)
        for count in at_position:
            expected += count * state
            state = state @ transition
        shares = np.concatenate([[expected[:2].sum()], expected[2:]]) / expected.sum()
        if np.abs(shares - target).max() < 1e-9:
            break
        scale *= target[1:] / np.maximum(shares[1:], 1e-12)
    if (transition < 0).any() or not np.abs(shares - target).max() <= 1e-4:
        raise ValueError(f"SyntheticConfig.behavior_mix {mix!r} is not reachable with sessions this short")
    return transition


def _session_categories(config: SyntheticConfig, timeline: _Timeline, catalog: _Catalog,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(S,) category of each session and (S,) bool whether it resumes the previous session."""
    users, k, sessions = config.num_users, config.categories_per_user, len(timeline.session_user)
    # Mass of a category = its slots' weights: what it offers at any moment.
    category_cdf = catalog.slot_cumulative[catalog.category_range[1:]]
    favourites = _draw(category_cdf, rng.random((users, k)))
    taste_cdf = np.cumsum(rng.dirichlet(np.full(k, config.taste_concentration), size=users), axis=1)
    uniforms = rng.random((sessions, 1))    # which favourite: by taste, or the switch's step
    explore = rng.random(sessions) < config.explore_prob
    explored = _draw(category_cdf, rng.random(int(explore.sum())))
    resume_prob = config.resume_prob * np.exp(-timeline.session_gap / (config.resume_decay_hours * 3600))
    resumed = rng.random(sessions) < resume_prob
    if config.switch_on_new_session:
        chosen = _switching_favourites(timeline.session_user, resumed, uniforms[:, 0], k)
    else:
        chosen = np.minimum((uniforms >= taste_cdf[timeline.session_user]).sum(axis=1), k - 1)
    category = favourites[timeline.session_user, chosen]
    category[explore] = explored
    # A resumed session keeps the category of the last session that was not resumed.
    source = np.maximum.accumulate(np.where(resumed, 0, np.arange(sessions)))
    return category[source], resumed


def _switching_favourites(session_user: np.ndarray, resumed: np.ndarray, uniforms: np.ndarray,
                          k: int) -> np.ndarray:
    """(S,) favourite index per session: a user's first session draws one of k uniformly, each
    later one that does not resume moves 1..k-1 places on (mod k), a resumed one stays."""
    first = np.r_[True, session_user[1:] != session_user[:-1]]
    step = np.where(first, np.floor(uniforms * k), 1 + np.floor(uniforms * (k - 1))).astype(np.int64)
    step[resumed & ~first] = 0
    total = np.cumsum(step)
    user_start = np.maximum.accumulate(np.where(first, np.arange(len(step)), 0))
    return (total - total[user_start] + step[user_start]) % k


def generate_events(config: SyntheticConfig, progress: bool = True) -> pa.Table:
    """The event table (schema.py, with category_id), sorted by (user_id, timestamp).

    Deterministic: the same config gives the same table. `progress` shows a tqdm bar.
    """
    rng = np.random.default_rng(config.seed)
    catalog = _catalog(config, rng)
    timeline = _timeline(config, rng)
    session_category, resumed = _session_categories(config, timeline, catalog, rng)
    transition_cdf = np.cumsum(_behaviour_chain(config.behavior_mix, timeline.position), axis=1)
    n, starts, seconds = config.num_events, timeline.starts, timeline.seconds
    popular = catalog.popular_item(session_category[timeline.session], seconds, rng)
    successor = _draw(np.cumsum(config.successor_weights), rng.random(n))
    tent_uniforms = rng.random(n)
    # Inside a session follow a successor with successor_prob; a resumed session always continues.
    follow = np.where(starts, resumed[timeline.session], rng.random(n) < config.successor_prob)
    chain_uniforms = rng.random(n)

    # Walk all users in parallel, one position at a time; users sorted by activity so the
    # active ones at position p are a prefix.
    order = np.argsort(-timeline.counts, kind="stable")
    first = (np.cumsum(timeline.counts) - timeline.counts)[order]
    active = len(order) - np.cumsum(np.bincount(timeline.counts))  # users with more than p events
    items = np.empty(n, dtype=np.int64)
    states = np.empty(n, dtype=np.int8)
    items[first], states[first] = popular[first], PV_NEW
    with tqdm(total=n, initial=len(first), unit="ev", desc="generating", disable=not progress) as bar:
        for p in range(1, len(active)):
            idx = first[:active[p]] + p
            previous = items[idx - 1]
            state = (chain_uniforms[idx, None] >= transition_cdf[states[idx - 1]]).sum(axis=1)
            state = np.where(starts[idx], PV_NEW, np.minimum(state, BUY))
            same = state != PV_NEW
            # Successor slots always hold a live item; the previous item may have just expired.
            followed = catalog.alive_item(catalog.successors[previous, successor[idx]],
                                          seconds[idx], tent_uniforms[idx])
            alive = seconds[idx] < catalog.birth(previous) + catalog.lifetime
            keep = np.where(same, alive, follow[idx])
            items[idx] = np.where(keep, np.where(same, previous, followed), popular[idx])
            states[idx] = np.where(same & ~keep, PV_NEW, state)
            bar.update(len(idx))

    item_ids = rng.permutation(config.num_items) + 1  # opaque ids: no order leaks birth or category
    category_ids = rng.permutation(config.num_categories) + 1
    return event_table(timeline.user + 1, item_ids[items], config.start_timestamp + seconds,
                       STATE_CODES[states], EVENT_TYPES,
                       categories=category_ids[catalog.slot_category[items // catalog.items_per_slot]])


def _write_file(uri: str, storage_options: dict[str, Any] | None,
                write: Callable[[BinaryIO], None]) -> None:
    """Write one file through fsspec so that a failure leaves nothing behind (no partial object)."""
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    handle = fs.open(path, "wb", autocommit=False)
    try:
        write(handle)
        handle.close()
        handle.commit()
    except BaseException:
        handle.discard()
        raise


def write_user_behavior_csv(table: pa.Table, uri: str,
                            storage_options: dict[str, Any] | None = None) -> None:
    """Taobao UserBehavior.csv: `user_id,item_id,category_id,behavior_type,timestamp`, no header."""
    columns = table.select(["user_id", "item_id", "category_id", "event_type", "timestamp"])
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    _write_file(uri, storage_options, lambda f: pacsv.write_csv(columns, f, options))


def write_hourly_parquet(table: pa.Table, uri: str,
                         storage_options: dict[str, Any] | None = None) -> list[str]:
    """One Parquet file per UTC hour: `uri/hour=YYYYMMDDHH/part-0.parquet`. Returns the file URIs."""
    hour = table["timestamp"].to_numpy() // 3600
    order = np.argsort(hour, kind="stable")  # keeps (user, time) order inside each hour
    hour = hour[order]
    bounds = np.flatnonzero(np.diff(hour)) + 1
    written = []
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(hour)]):
        when = datetime.datetime.fromtimestamp(int(hour[lo]) * 3600, datetime.timezone.utc)
        part_uri = f"{uri.rstrip('/')}/hour={when:%Y%m%d%H}/part-0.parquet"
        part = table.take(order[lo:hi])
        _write_file(part_uri, storage_options, lambda f, part=part: pq.write_table(part, f))
        written.append(part_uri)
    return written


_OPTIONS = (  # flag, SyntheticConfig field, help
    ("--users", "num_users", "number of users"),
    ("--items", "num_items", "catalog size; most items stay rare (Zipf)"),
    ("--categories", "num_categories", "number of item categories"),
    ("--events", "num_events", "total events, spread over users by a lognormal activity"),
    ("--seed", "seed", "random seed: the same options and seed give identical files"),
    ("--zipf", "zipf_exponent", "popularity exponent: item counts fall as rank^-zipf"),
    ("--hours", "duration_hours", "length of the period, from 2017-11-25 00:00 UTC"),
    ("--lifetime-hours", "item_lifetime_hours", "hours an item is on offer; shorter = faster drift"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dist-rec generate`; defaults are those of SyntheticConfig."""
    parser.add_argument("--out", required=True,
                        help="output directory, local or s3://bucket/prefix; gets UserBehavior.csv "
                             "and/or hourly/hour=YYYYMMDDHH/part-0.parquet")
    parser.add_argument("--format", choices=("csv", "parquet", "both"), default="csv",
                        help="csv: Taobao UserBehavior.csv (no header); parquet: hour-partitioned "
                             "Parquet with the event schema; both (default: %(default)s)")
    defaults = SyntheticConfig()
    for flag, name, text in _OPTIONS:
        default = getattr(defaults, name)
        parser.add_argument(flag, dest=name, type=type(default), default=default,
                            metavar=flag[2:].upper(), help=f"{text} (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def run_from_args(args: argparse.Namespace,
                  storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate and write what `args` (from add_arguments) asks for; returns the URIs written."""
    config = SyntheticConfig(**{name: getattr(args, name) for _, name, _ in _OPTIONS})
    table = generate_events(config, progress=not args.no_progress)
    out, written = args.out.rstrip("/"), {}
    if args.format in ("csv", "both"):
        written["csv"] = f"{out}/UserBehavior.csv"
        write_user_behavior_csv(table, written["csv"], storage_options)
    if args.format in ("parquet", "both"):
        written["parquet"] = write_hourly_parquet(table, f"{out}/hourly", storage_options)
    log.info("generated %d events (%d users, %d items) into %s", len(table), config.num_users,
             config.num_items, out)
    return written
