"""The one model interface: an encoder maps a SequenceBatch to hidden states.

    hidden = encoder(batch, item_vectors)      # item_vectors (B, T, E) -> hidden (B, T, D)

The encoder never owns item tables: `NextItemModel` looks up `item_vectors` in the shared
`ItemTables` (single device or row-sharded), and scoring, sampling and the loss happen outside
(losses.py, evaluation/). That is what lets every model train with every loss and every sharding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.embeddings.sharded import ShardedItemTables
from dist_rec.embeddings.table import ItemTables, RowViewScorer, WithoutItems


@dataclass(frozen=True)
class Dimensions:
    """Sizes that come from the data, not from the model config."""

    num_items: int
    num_users: int
    num_delta_buckets: int
    num_event_types: int          # codes 1..num_event_types; 0 = padding
    # Metadata (HRNN-meta): codes per categorical field, 1..size, 0 = missing.
    item_feature_sizes: tuple[int, ...] = ()   # e.g. (num_categories,)
    user_feature_sizes: tuple[int, ...] = ()
    num_contexts: int = 0                      # codes of SequenceBatch.contexts


EncoderFactory = Callable[[ModelConfig, Dimensions], nn.Module]
_REGISTRY: dict[str, EncoderFactory] = {}


def register(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Class decorator: make an encoder buildable by name from its ModelConfig."""
    def wrap(factory: EncoderFactory) -> EncoderFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory
    return wrap


def read_options(config: ModelConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """`config.options` over `defaults`; an unknown key is a typo, so it raises naming it."""
    unknown = sorted(set(config.options) - set(defaults))
    if unknown:
        raise ValueError(f"ModelConfig.options for {config.name!r}: unknown key(s) {unknown}; "
                         f"known: {sorted(defaults)}")
    return {**defaults, **config.options}


def check_heads(name: str, dim: int, heads: int) -> None:
    if heads < 1 or dim % heads:
        raise ValueError(f"{name}: options['heads']={heads} must divide hidden_dim={dim}")


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


class NextItemModel(nn.Module):
    """Item tables + encoder. `hidden(batch)` (B, T, D) and `scorer` are all a loss or an
    evaluator needs.

    `scorer` has the tables' scoring interface (output_rows, output_weight, topk, target_ranks):
    the tables themselves, unless the encoder scores items from their features too (HRNN-meta's
    `scorer(tables)`, when `scores_cold_items`), or there are cold items to leave out of
    rankings (`set_cold_items`).
    """

    def __init__(self, tables: nn.Module, encoder: nn.Module):
        super().__init__()
        self.tables = tables
        self.encoder = encoder
        # Not saved with the model: it comes from the data's item counts on every load.
        self.register_buffer("cold_items", torch.zeros(tables.num_items + 1, dtype=torch.bool),
                             persistent=False)
        self._any_cold = False

    def set_cold_items(self, cold: torch.Tensor) -> None:
        """cold (num_items + 1,) bool: the items without a training event (catalog items nobody
        has interacted with yet, or fewer than DataConfig.min_item_count times). Their rows were
        never a target or an input (at most a full softmax's negative). An encoder that scores
        items from their features (HRNN-meta) gets them, to score them from features alone; for
        every other model they are left out of every ranking at inference. As inputs they read
        as a zero item vector (`hidden`)."""
        if cold.shape != self.cold_items.shape:
            raise ValueError(f"set_cold_items: shape {tuple(cold.shape)}, expected "
                             f"{tuple(self.cold_items.shape)} (one per item id incl. row 0)")
        self.cold_items.copy_(cold)
        self._any_cold = bool(cold.any())
        setter = getattr(self._encoder, "set_cold_items", None)
        if setter is not None:
            setter(cold)

    @property
    def unreadable_items(self) -> torch.Tensor | None:
        """(num_items + 1,) bool: the items whose events the evaluation protocols leave out of
        a history this model reads, as they leave out unknown items: the cold items, or for an
        encoder that reads items by their features too (HRNN-meta) the cold items without a
        known feature code. None when there are none."""
        if not self._any_cold:
            return None
        if not getattr(self._encoder, "scores_cold_items", False):
            return self.cold_items
        blank = self._encoder.blank_items(torch.arange(len(self.cold_items),
                                                       device=self.cold_items.device))
        return blank if bool(blank.any()) else None

    @property
    def _encoder(self) -> nn.Module:
        return getattr(self.encoder, "module", self.encoder)          # the encoder under DDP

    @property
    def scorer(self):
        """Built on access, so it always reads the current tables (they may be swapped for a
        sharded view) and the encoder's current parameters."""
        if getattr(self._encoder, "scores_cold_items", False):
            return self._encoder.scorer(self.tables)
        if self._any_cold and not self.training:
            # In training the full softmax keeps them as negatives; no sampler draws them.
            return RowViewScorer(self.tables, WithoutItems(self.cold_items))
        return self.tables

    def hidden(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, T, D); padding steps are zeros whatever the encoder computed there, so a row with
        no real step (every event on an unknown item) scores the item biases alone at any width.
        A cold item read as input gets a zero item vector, not its row (which training never
        read): the event's other inputs (time, type, HRNN-meta's item features) still count.
        (The protocols leave such events out of a plain model's histories: `unreadable_items`.)"""
        item_vectors = self.tables.embed(batch.items)
        if self._any_cold and not self.training:    # training windows hold no cold item
            item_vectors = item_vectors.masked_fill(self.cold_items[batch.items].unsqueeze(-1), 0.0)
        hidden = self.encoder(batch, item_vectors)
        return hidden.masked_fill((batch.items == 0).unsqueeze(-1), 0.0)

    def auxiliary_loss(self, batch: SequenceBatch, hidden: torch.Tensor) -> torch.Tensor | None:
        """An encoder's own training term added to the ranking loss (HRNN-meta's value head), or
        None. hidden (N, D): the masked steps of `hidden(batch)`."""
        extra = getattr(self._encoder, "auxiliary_loss", None)
        return None if extra is None else extra(batch, hidden, self.tables)

    @property
    def max_length(self) -> int | None:
        """The most steps the encoder reads (its learned positions), or None: no limit."""
        return getattr(self._encoder, "max_length", None)

    @property
    def predicts_values(self) -> bool:
        """Whether the encoder has a value head (HRNN-meta's `value_head` option)."""
        return getattr(self._encoder, "value_head", None) is not None

    def predict_values(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (N, D), next items (N,) -> (N,) predicted values of the next events."""
        if not self.predicts_values:
            raise ValueError(f"{type(self._encoder).__name__} has no value head")
        return self._encoder.predict_values(hidden, targets, self.tables)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Encoder parameters: trained by a dense optimizer under DDP."""
        return list(self.encoder.parameters())

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Item table parameters: sparse gradients, row-wise optimizer, possibly sharded."""
        return list(self.tables.parameters())


def build_model(config: ModelConfig, dims: Dimensions, sharding: str = "none",
                seed: int = 0) -> NextItemModel:
    """Build the encoder named by `config.name` and item tables for it: the one place where
    sharding is chosen. "row" splits the tables over the default process group (call it after
    torch.distributed is initialised); `seed` seeds the sharded tables' rows."""
    import dist_rec.models  # noqa: F401  (importing the package registers every model)

    if config.name not in _REGISTRY:
        raise ValueError(f"unknown model {config.name!r}; known: {registered_models()}")
    encoder = _REGISTRY[config.name](config, dims)
    if sharding == "row":
        tables = ShardedItemTables(dims.num_items, config.embedding_dim, config.hidden_dim,
                                   tied=config.tied_embeddings, seed=seed)
    elif sharding == "none":
        tables = ItemTables(dims.num_items, config.embedding_dim, config.hidden_dim,
                            tied=config.tied_embeddings)
    else:
        raise ValueError(f"TrainConfig.sharding: unknown {sharding!r}; known: 'none', 'row'")
    return NextItemModel(tables, encoder)
