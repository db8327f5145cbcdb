"""Typed configuration: frozen dataclasses built once (jobs/, CLI), crossed over Ray as a dict.

`JobConfig.to_dict()` is what travels to the Ray Train workers; `JobConfig.from_dict()` rebuilds
it on the worker's first line. Dicts are plain JSON, so two configs can be diffed as files.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

EVENT_TYPES = ("pv", "cart", "fav", "buy")  # Taobao UserBehavior behaviours; dense codes 1..4, 0 = padding


@dataclass(frozen=True)
class DataConfig:
    """Where events come from and how they become training sequences."""

    events_uri: str = ""                 # UserBehavior.csv or a Parquet directory; local path or s3://
    work_dir: str = "runs/data"          # where prepared vocab + sequence shards go (local or s3://)
    event_types: tuple[str, ...] = EVENT_TYPES
    min_timestamp: int = 0               # events outside [min_timestamp, max_timestamp) are quarantined
    max_timestamp: int = 2**62
    min_item_count: int = 1              # the HRNN paper keeps items/users with 10+ events
    min_user_count: int = 1
    session_gap_seconds: int = 1800      # inactivity that starts a new session
    num_delta_buckets: int = 32          # log2 buckets of the gap to the next event; 0 = padding
    window_length: int = 32              # T: (input, target) pairs per training window
    rows_per_shard: int = 100_000        # windows per Parquet shard
    test_users: int = 2_000              # held out for the TDM evaluation (users with 10+ events)
    strict: bool = False                 # first bad row raises instead of being quarantined
    # Metadata for HRNN-meta (Parquet events; see data/features.py):
    carry_values: bool = False           # the events' `value` into the windows (feedback, value head)
    context_column: str = ""             # event column of the request context, e.g. "device"
    user_feature_columns: tuple[str, ...] = ()   # event columns of user attributes (newest per user)
    item_feature_columns: tuple[str, ...] = ()   # event columns of item attributes, beside category_id
    # Parquet of the catalog: item_id and the item attribute columns (category_id when the events
    # have it, then item_feature_columns). Its items without a training event (or with fewer than
    # min_item_count) are cold items: HRNN-meta scores them from their attributes (lambda = 1),
    # every other model leaves them out.
    item_catalog_uri: str = ""

    def __post_init__(self):
        for name in ("user_feature_columns", "item_feature_columns"):
            if isinstance(getattr(self, name), str):   # ("a") is "a": a likely slip
                raise TypeError(f"DataConfig.{name}: a list of column names, got the string "
                                f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class GenerateConfig:
    """Sizes of the Taobao-like events generated when DataConfig.events_uri is empty
    (data.synthetic.SyntheticConfig keeps its other settings; its seed is TrainConfig.seed)."""

    num_users: int = 100_000
    num_items: int = 1_000_000
    num_categories: int = 2_000
    num_events: int = 3_000_000


@dataclass(frozen=True)
class ModelConfig:
    """Which encoder and its sizes; the item tables are shared by every model."""

    name: str = "hrnn"
    embedding_dim: int = 128
    hidden_dim: int = 128
    num_layers: int = 1
    dropout: float = 0.0
    delta_embedding_dim: int = 16        # HRNN: time-delta bucket embedding
    type_embedding_dim: int = 8          # HRNN: feedback encoding of the input event's type
    tied_embeddings: bool = False        # output item vectors = input item vectors
    options: dict[str, Any] = field(default_factory=dict)  # model-specific extras (see models/)


@dataclass(frozen=True)
class SamplerConfig:
    """Negatives and the loss over them."""

    loss: str = "sampled_softmax"        # full_softmax | sampled_softmax | bpr_max | bce
    num_negatives: int = 2048            # K shared negatives per batch
    alpha: float = 0.75                  # q ∝ count^alpha; 0 = uniform
    in_batch_negatives: bool = False
    bpr_regularization: float = 1.0      # BPR-max's score regulariser lambda (GRU4Rec's default)
    event_weights: dict[str, float] = field(default_factory=dict)  # e.g. {"buy": 1.0, "pv": 0.5}


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0         # Ray CPUs reserved per training worker
    bf16: bool = False
    batch_size: int = 256
    epochs: int = 1
    max_steps: int = 0                   # 0 = no limit; otherwise stop after this many optimizer steps
    dense_lr: float = 1e-3               # Adam on encoder parameters
    sparse_lr: float = 0.05              # row-wise Adagrad on item tables
    seed: int = 0
    sharding: str = "none"               # none | row
    log_every: int = 50
    torch_threads: int = 0               # 0 = leave torch's default

    def __post_init__(self):
        # Checked here, not where Ray's workers would fail on them (and be retried).
        for name in ("num_workers", "batch_size", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.dense_lr > 0 and self.sparse_lr > 0 and self.cpus_per_worker > 0):
            raise ValueError(f"TrainConfig: dense_lr, sparse_lr and cpus_per_worker must be > 0, got "
                             f"{self.dense_lr}, {self.sparse_lr}, {self.cpus_per_worker}")


@dataclass(frozen=True)
class StorageConfig:
    """Checkpoint and artifact storage; credentials are never logged."""

    uri: str = "runs"                    # local path or s3://bucket/prefix
    keep_last: int = 3
    endpoint_url: str = ""
    region: str = ""
    key: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)

    def __post_init__(self):
        if self.keep_last < 1:   # checked here: pruning comes after an epoch's checkpoint
            raise ValueError(f"StorageConfig.keep_last must be >= 1, got {self.keep_last}")

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs keyword arguments for this storage."""
        options: dict[str, Any] = {}
        if self.key:
            options.update(key=self.key, secret=self.secret)
        client = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            options["client_kwargs"] = client
        return options


@dataclass(frozen=True)
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    run_name: str = "taobao_hrnn"

    def __post_init__(self):
        # Checked however the config was built (from_dict, replace, Python code): a field of the
        # wrong kind fails here naming itself, not in a Ray worker or in the summary's JSON at
        # the job's end; numpy's numbers become Python's.
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise TypeError(f"JobConfig.{name}: expected a {cls.__name__}, got {section!r}")
            object.__setattr__(self, name, _build(cls, dataclasses.asdict(section)))
        object.__setattr__(self, "run_name", _typed("JobConfig.run_name", str, self.run_name))

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if redact:
            out["storage"]["key"] = out["storage"]["secret"] = "***" if self.storage.key else ""
        return out

    def to_json(self) -> str:
        """Redacted, sorted JSON: safe to log and to diff."""
        return json.dumps(self.to_dict(redact=True), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "JobConfig":
        if not isinstance(raw, dict):
            raise TypeError(f"JobConfig: expected an object of sections, got {raw!r}")
        parts = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in parts:
                raise ValueError(f"JobConfig: unknown field {name!r}")
            sub = _SECTIONS.get(name)
            kwargs[name] = _build(sub, value) if sub else _typed(f"JobConfig.{name}", str, value)
        return cls(**kwargs)

    def replace(self, **sections: Any) -> "JobConfig":
        """Copy with whole sections or per-section overrides: replace(train={"epochs": 2})."""
        updates = {}
        for name, value in sections.items():
            current = getattr(self, name)
            updates[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **updates)


def _build(cls: type, value: dict[str, Any]) -> Any:
    if not isinstance(value, dict):
        raise TypeError(f"{cls.__name__}: expected an object of fields, got {value!r}")
    kinds = typing.get_type_hints(cls)
    unknown = set(value) - set(kinds)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    return cls(**{name: _typed(f"{cls.__name__}.{name}", kinds[name], v) for name, v in value.items()})


def _typed(where: str, kind: Any, value: Any) -> Any:
    """`value` as a field of type `kind` wants it, or a TypeError naming the field: a config file
    or --set gives JSON, where "false" is a true string and "64" no number."""
    origin = typing.get_origin(kind)
    if kind is Any or (origin is dict and typing.get_args(kind)[1] is Any):
        return _plain(value)
    if kind is str and value is None:       # e.g. endpoint_url=os.environ.get(...): unset
        return ""
    if origin is tuple:           # JSON gives a list; frozen dataclasses want a tuple
        item = typing.get_args(kind)[0]
        if isinstance(value, (list, tuple)) and all(isinstance(v, item) for v in value):
            return tuple(value)
        raise TypeError(f"{where}: expected a list of {item.__name__}, got {value!r}")
    if origin is dict and typing.get_args(kind)[1] is float and isinstance(value, dict):
        return {k: _typed(f"{where}[{k!r}]", float, v) for k, v in value.items()}
    # numbers' and numpy's kinds too: a sweep built with np.arange gives np.int64, not int.
    expected = {bool: (bool, np.bool_), int: (numbers.Integral,), float: (numbers.Real,),
                str: (str,)}.get(origin or kind, (origin or kind,))
    # bool is an int to Python, not to a config: `true` for a size is a slip.
    if isinstance(value, expected) and (kind is bool or not isinstance(value, (bool, np.bool_))):
        return kind(value) if kind in (bool, int, float) else value   # plain Python, as JSON wants
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "an object"}.get(origin or kind, str(kind))
    raise TypeError(f"{where}: expected {name}, got {value!r}")


def _plain(value: Any) -> Any:
    """numpy's scalars inside free-form fields (model options) as Python's, as JSON wants."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "sampler": SamplerConfig,
             "train": TrainConfig, "storage": StorageConfig, "generate": GenerateConfig}
