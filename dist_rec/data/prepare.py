"""Raw events -> everything training reads: vocabulary, window shards, held-out test users.

Layout of a prepared directory (local or s3://):
    meta.json                 sizes, vocabulary hash, counts; written last (its presence = complete)
    vocab/                    Vocabulary.save of the training users and items (test users'
                              ids in test_histories continue its user ids and are not in it)
    item_counts.npy           (num_items + 1,) training events per dense item id ([0] = padding = 0)
    item_features.npy         (num_items + 1, F) code per item of category_id (when the events
                              have it) and each DataConfig.item_feature_columns (the catalog's
                              value, else its newest event's; 1..n, 0 = none): HRNN-meta's item
                              features
    user_features.npy         (num_users + 1, G) code per user of each DataConfig.user_feature_columns
                              (its newest event's), only when there are such columns
    feature_codes.json        raw value -> code of the item, context and user fields
                              (features.EventFields), so serving codes raw values as training did
    windows/part-*.parquet    training windows (sequences.build_windows), streamed by Ray Data
    test_histories.parquet    the held-out users' full histories (sequences.build_histories)
    catalog_quarantine.csv    the item catalog's bad rows (with DataConfig.item_catalog_uri)

Test users (the TDM protocol: users with 10+ events, drawn at random) are held out of training
entirely; the vocabulary and the item counts come from the training users only, so an item that
only a test user touched is unknown: its events stay in the test histories as
vocab.UNKNOWN_ITEM, a miss for every model alike, never an untrained row. With an item catalog
(DataConfig.item_catalog_uri), its items join the vocabulary after the trained ones; those
without a training event (or with fewer than min_item_count, whose events training does not
read) are cold items (count 0, attributes from the catalog): a test user's event on one keeps its
id, which HRNN-meta can rank and read from the item's attributes and other models leave out.
"""
from __future__ import annotations

import io
import json
import logging
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dist_rec.config import DataConfig
from dist_rec.data.features import EventFields, FieldCodes, newest_codes
from dist_rec.data.readers import (parquet_columns, read_events, read_item_catalog,
                                   read_user_behavior)
from dist_rec.data.sequences import build_histories, build_windows, write_window_shards
from dist_rec.data.vocab import Vocabulary
from dist_rec.models.base import Dimensions
from dist_rec.storage import filesystem, pyarrow_filesystem

logger = logging.getLogger(__name__)

TDM_MIN_EVENTS = 10


@dataclass(frozen=True)
class PreparedData:
    uri: str
    dimensions: Dimensions
    item_counts: np.ndarray          # (num_items + 1,) int64
    vocab_hash: str
    num_windows: int
    num_train_events: int
    storage_options: dict[str, Any]
    item_features: np.ndarray | None = None   # (num_items + 1, F) int64 codes, or None
    user_features: np.ndarray | None = None   # (num_users + 1, G) int64 codes, or None

    @staticmethod
    def load(uri: str, storage_options: dict[str, Any] | None = None) -> "PreparedData":
        fs, root = filesystem(uri, storage_options)
        try:
            meta = json.loads(fs.cat_file(posixpath.join(root, "meta.json")))
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: not a prepared data directory (no meta.json); "
                                    f"run `dist-rec prepare` first") from None
        dims = Dimensions(**{name: tuple(value) if isinstance(value, list) else value
                             for name, value in meta["dimensions"].items()})

        def array(name: str, present: bool = True) -> np.ndarray | None:
            return np.load(io.BytesIO(fs.cat_file(posixpath.join(root, name)))) if present else None

        return PreparedData(uri, dims, array("item_counts.npy"), meta["vocab_hash"],
                            meta["num_windows"], meta["num_train_events"], storage_options or {},
                            array("item_features.npy", bool(dims.item_feature_sizes)),
                            array("user_features.npy", bool(dims.user_feature_sizes)))

    @property
    def cold_items(self) -> np.ndarray:
        """(num_items + 1,) bool: items without a training event (from the catalog); row 0 False."""
        cold = self.item_counts == 0
        cold[0] = False
        return cold

    def test_histories(self) -> pa.Table:
        fs, root = filesystem(self.uri, self.storage_options)
        with fs.open(posixpath.join(root, "test_histories.parquet"), "rb") as f:
            return pq.read_table(f)

    def windows(self, columns: list[str]) -> pa.Table:
        """The training windows' `columns`, read whole (for small summaries, not for training)."""
        fs, path = pyarrow_filesystem(posixpath.join(self.uri, "windows"), self.storage_options)
        return pq.read_table(path, filesystem=fs, columns=columns)

    def vocabulary(self) -> Vocabulary:
        return Vocabulary.load(posixpath.join(self.uri, "vocab"), self.storage_options)

    def fields(self) -> EventFields:
        """The item, context and user fields' codes."""
        fs, root = filesystem(self.uri, self.storage_options)
        raw = json.loads(fs.cat_file(posixpath.join(root, "feature_codes.json")))
        return EventFields.from_json(raw)


def read_any_events(config: DataConfig, storage_options: dict[str, Any] | None,
                    quarantine_uri: str | None) -> pa.Table:
    """UserBehavior.csv (Taobao format) or a Parquet file/directory in the event schema.

    Bad rows go to `quarantine_uri` (source file, line, reason) and never take good rows along.
    """
    uri = config.events_uri
    metadata = (config.context_column,) if config.context_column else ()
    metadata += config.user_feature_columns + config.item_feature_columns
    # infer_compression names the codec ("gzip" for .gz): drop whatever suffix it recognised.
    stem = posixpath.splitext(uri)[0] if fsspec.utils.infer_compression(uri) else uri
    if stem.endswith(".csv"):
        if config.carry_values or metadata:
            raise ValueError(f"{uri}: UserBehavior.csv has no value, context or feature "
                             f"columns, but DataConfig asks for carry_values="
                             f"{config.carry_values}, {metadata or 'no metadata columns'}; "
                             f"give such events as Parquet")
        events, _ = read_user_behavior(uri, config, storage_options, quarantine_uri)
    else:
        present = parquet_columns(uri, storage_options)
        names = ("user_id", "item_id", "timestamp")
        names += tuple(n for n in ("event_type", "category_id") if n in present)   # optional
        names += ("value",) if config.carry_values else ()
        events, _ = read_events(uri, {n: n for n in names}, config, file_format="parquet",
                                features=metadata, storage_options=storage_options,
                                quarantine_uri=quarantine_uri)
    return events  # the reader logged its quarantine summary


def prepare(config: DataConfig, out_uri: str, test_users: int, seed: int,
            storage_options: dict[str, Any] | None = None) -> PreparedData:
    """Read, validate, split off test users, build vocabulary and windows, write them all.

    Everything is written to a staging directory beside `out_uri` and replaces the previous
    preparation only once complete: a run that fails (a bad file in strict mode, a storage
    error) leaves the previous one as it was.
    """
    out = out_uri.rstrip("/")
    for what, uri in (("events", config.events_uri), ("item catalog", config.item_catalog_uri)):
        if uri.rstrip("/") == out or uri.startswith(out + "/"):
            raise ValueError(f"prepare: the {what} path {uri} is inside the output directory "
                             f"{out_uri}, which a preparation replaces")
    fs, root = filesystem(out, storage_options)
    staging = f"{out}.staging-{uuid.uuid4().hex[:12]}"
    _, staging_root = filesystem(staging, storage_options)
    try:
        _prepare_into(staging, config, test_users, seed, storage_options)
    except BaseException:
        if fs.exists(staging_root):
            fs.rm(staging_root, recursive=True)
        raise
    _publish(fs, staging_root, root)
    return PreparedData.load(out_uri, storage_options)


def _publish(fs: fsspec.AbstractFileSystem, staging_root: str, root: str) -> None:
    """Replace `root` with the complete preparation in `staging_root`.

    Locally this is one rename. On object storage a move is a copy per object, so the staging
    copy is copied with meta.json last (its presence marks a complete preparation) and deleted
    only after: a failure in between leaves `root` without meta.json, which `load` refuses, and
    the complete staging copy in place.
    """
    if fs.exists(root):
        fs.rm(root, recursive=True)   # a fresh preparation never mixes with an older one
    if isinstance(fs, LocalFileSystem):
        fs.mv(staging_root, root, recursive=True)
        return
    meta = posixpath.join(staging_root, "meta.json")
    data = [path for path in fs.find(staging_root) if path != meta]
    fs.copy(data, [root + path[len(staging_root):] for path in data])
    fs.copy(meta, posixpath.join(root, "meta.json"))
    fs.rm(staging_root, recursive=True)


def _prepare_into(out_uri: str, config: DataConfig, test_users: int, seed: int,
                  storage_options: dict[str, Any] | None) -> None:
    fs, root = filesystem(out_uri, storage_options)
    events = read_any_events(config, storage_options, posixpath.join(out_uri, "quarantine.csv"))
    held_out = pc.is_in(events["user_id"], _draw_test_users(events, test_users, seed))
    train_events, test_events = events.filter(pc.invert(held_out)), events.filter(held_out)

    fields = EventFields.fit(train_events, config.context_column, config.user_feature_columns,
                             config.item_feature_columns)
    catalog = (read_item_catalog(config.item_catalog_uri, [f.column for f in fields.items],
                                 config, storage_options,
                                 posixpath.join(out_uri, "catalog_quarantine.csv"))[0]
               if config.item_catalog_uri else None)
    trained = Vocabulary.from_config(train_events, config)
    # The catalog's other items come after the trained ones (whose ids do not depend on it) and
    # stay cold: training reads only the trained items' events, so min_item_count still holds.
    vocab = trained if catalog is None else trained.admit_items(catalog["item_id"])
    test_vocab = Vocabulary(vocab.items, vocab.users.grow(test_events["user_id"]))
    contexts = fields.context

    def context_codes(table: pa.Table) -> np.ndarray | None:
        return None if contexts is None else contexts.encode(table[contexts.column])

    train = build_histories(train_events, trained, config, context_codes(train_events))
    # A test user's events on items no training user touched stay, as misses for every model.
    test = build_histories(test_events, test_vocab, config, context_codes(test_events),
                           keep_unknown_items=True)
    windows = build_windows(train, config)
    counts = np.bincount(pc.list_flatten(train["items"]).to_numpy(), minlength=vocab.num_items + 1)
    counts[0] = 0
    cold = int(np.count_nonzero(counts[1:] == 0))
    logger.info("prepared %d training users, %d windows, %d test users, %d items (%d cold: "
                "without a training event)", train.num_rows, windows.num_rows,
                test.num_rows, vocab.num_items, cold)
    if cold and catalog is None:
        logger.warning("%d item(s) have no training event (all their events were by users "
                       "DataConfig.min_user_count filtered out): no model ranks them", cold)

    write_window_shards(windows, posixpath.join(out_uri, "windows"), config.rows_per_shard,
                        storage_options)
    with fs.open(posixpath.join(root, "test_histories.parquet"), "wb") as f:
        pq.write_table(test, f)
    _save_array(fs, posixpath.join(root, "item_counts.npy"), counts.astype(np.int64))
    if fields.items:   # from the training events: a test user's events never reach the model
        item_features = entity_features(train_events, "item_id", vocab.items.encode,
                                        vocab.num_items, fields.items)
        if catalog is not None:   # the catalog's known values win: they are the current ones
            listed = catalog_features(catalog, config.item_catalog_uri, vocab.items.encode,
                                      vocab.num_items, fields.items)
            item_features = np.where(listed > 0, listed, item_features)
        _save_array(fs, posixpath.join(root, "item_features.npy"), item_features)
    if fields.users:   # attributes, not interactions: every user's, test users' included
        _save_array(fs, posixpath.join(root, "user_features.npy"),
                    entity_features(events, "user_id", test_vocab.users.encode,
                                    test_vocab.num_users, fields.users))
    fs.pipe_file(posixpath.join(root, "feature_codes.json"),
                 json.dumps(fields.to_json(), indent=2).encode())
    vocab.save(posixpath.join(out_uri, "vocab"), storage_options)

    dims = Dimensions(num_items=vocab.num_items, num_users=test_vocab.num_users,
                      num_delta_buckets=config.num_delta_buckets,
                      num_event_types=len(config.event_types),
                      item_feature_sizes=tuple(c.size for c in fields.items),
                      user_feature_sizes=tuple(c.size for c in fields.users),
                      num_contexts=0 if contexts is None else contexts.size)
    meta = {"dimensions": dims.__dict__, "vocab_hash": vocab.hash, "num_windows": windows.num_rows,
            "num_train_events": int(counts.sum()), "test_users": test.num_rows,
            "events_uri": config.events_uri, "item_catalog_uri": config.item_catalog_uri}
    fs.pipe_file(posixpath.join(root, "meta.json"), json.dumps(meta, indent=2).encode())


def catalog_features(catalog: pa.Table, uri: str, encode, num_items: int,
                     fields: tuple[FieldCodes, ...]) -> np.ndarray:
    """(num_items + 1, F) int64: per dense item id the code of each field in the catalog (one
    row per item, read_item_catalog), 0 for items it lacks and values it has none for."""
    codes = np.zeros((num_items + 1, len(fields)), np.int64)
    rows = encode(catalog["item_id"])
    for f, field in enumerate(fields):
        try:
            codes[rows, f] = field.encode(catalog[field.column])
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ValueError(f"{uri}: column {field.column!r} is {catalog[field.column].type}, "
                             f"which the events' values cannot be matched against: give it the "
                             f"events' type ({error})") from None
    return codes


def entity_features(events: pa.Table, id_column: str, encode, num_ids: int,
                    fields: tuple[FieldCodes, ...]) -> np.ndarray:
    """(num_ids + 1, F) int64: per dense id (row 0 = padding, all 0) the code of each field,
    from the id's newest event with a known value. `encode`: raw ids -> dense ids (0 = unknown)."""
    owners = encode(events[id_column])
    timestamps = events["timestamp"].to_numpy()
    return np.stack([newest_codes(owners, timestamps, field.encode(events[field.column]),
                                  num_ids + 1) for field in fields], axis=1)


def _save_array(fs, path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    fs.pipe_file(path, buffer.getvalue())


def _draw_test_users(events: pa.Table, count: int, seed: int) -> pa.Array:
    """`count` raw user ids drawn uniformly among users with TDM_MIN_EVENTS+ events."""
    users, counts = np.unique(events["user_id"].to_numpy(), return_counts=True)
    eligible = users[counts >= TDM_MIN_EVENTS]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(eligible, size=min(count, len(eligible)), replace=False)
    return pa.array(np.sort(chosen), pa.int64())
