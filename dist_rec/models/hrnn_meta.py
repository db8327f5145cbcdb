"""HRNN-meta: HRNN with user, item, context and feedback metadata, and item-feature scoring.

Paper: "Temporal-Contextual Recommendation in Real-Time", KDD 2020 (../shared/papers/hrnn_meta_*).
- Inputs (sec. 2.2): HRNN's x_t (item, time delta, session bit, event type) concatenated with
  the input item's feature embedding, the user's feature embedding, the request context (e.g.
  device) and the feedback value of event t (e.g. a rating).
- Decoder (sec. 2.3, eq. 2): the score of item j mixes its ID view and its feature view,
      phi~_j(h) = (1 - lambda) (w_j . h + b_j) + lambda (w(f_j) . h + b(f_j)),
  which is one dot product with the mixed row ((1-lambda) w_j + lambda w(f_j), (1-lambda) b_j +
  lambda b(f_j)): `HRNNMeta.scorer` gives the loss and the evaluator those rows. lambda ~ U[0, 1] once
  per training step ("a form of dropout that prevents co-training"); at inference lambda = 1 for
  cold-start items (no ID signal) and `eval_lambda` (default 0) for the others.
- Value head (sec. 4.3, Tables 4-5): predicts the value of the next event from h_t and the next
  item, trained with squared error beside the ranking loss; it learns a user's rating pattern
  from the feedback values it reads.

Which features exist comes from the data (`Dimensions.item_feature_sizes`, `user_feature_sizes`,
`num_contexts`): field f of an item takes codes 1..item_feature_sizes[f], 0 = missing. The
per-item and per-user code tables are buffers set from the data (`set_item_features`,
`set_user_features`), so they are saved with the encoder's state.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.embeddings.table import RowViewScorer
from dist_rec.models.base import Dimensions, read_options, register
from dist_rec.models.hrnn import HRNN

logger = logging.getLogger(__name__)

DEFAULTS = {
    "feature_dim": 16,          # embedding width of one feature field
    "value_feedback": False,    # read batch.values (the input event's value) as an input
    "value_head": False,        # predict batch.target_values; squared error added to the loss
    "value_loss_weight": 1.0,
    "eval_lambda": 0.0,         # lambda of warm items at inference; cold items always use 1
    # Not in the paper: in training, score this share of the items at lambda 1, as if cold,
    # beside the others at the step's lambda, so that the feature view is learnt on the scale of
    # the ID view it is ranked against when cold items meet warm ones (DropoutNet's idea).
    "cold_dropout": 0.0,
}


class FieldEmbedding(nn.Module):
    """Categorical fields -> one vector: each field embedded, concatenated (field-aware).

    codes (..., F) int64, 0 = missing -> (..., F * dim).
    """

    def __init__(self, sizes: list[int], dim: int):
        super().__init__()
        self.fields = nn.ModuleList(nn.Embedding(size + 1, dim, padding_idx=0) for size in sizes)

    @property
    def width(self) -> int:
        return sum(field.embedding_dim for field in self.fields)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([field(codes[..., f]) for f, field in enumerate(self.fields)], dim=-1)


@register("hrnn_meta")
class HRNNMeta(HRNN):
    def __init__(self, config: ModelConfig, dims: Dimensions):
        options = read_options(config, DEFAULTS)
        item_fields = FieldEmbedding(dims.item_feature_sizes, options["feature_dim"])
        user_fields = FieldEmbedding(dims.user_feature_sizes, options["feature_dim"])
        context_dim = options["feature_dim"] if dims.num_contexts else 0
        super().__init__(config, dims, extra_input_dim=item_fields.width + user_fields.width
                         + context_dim + int(options["value_feedback"]))
        self.options, self.dims = options, dims
        self.item_fields, self.user_fields = item_fields, user_fields
        self.context_embedding = (nn.Embedding(dims.num_contexts + 1, context_dim, padding_idx=0)
                                  if context_dim else None)
        # w(f_j), b(f_j) of eq. 2: the item's feature view in the decoder, its own embeddings.
        # No constant term: lambda is one number per training step, so a constant would shift every
        # score of a query alike, which the softmax ignores (zero gradient: Adam would walk it on
        # rounding noise), yet at inference it would move cold items (lambda 1) against warm ones.
        self.decoder_fields = FieldEmbedding(dims.item_feature_sizes, options["feature_dim"])
        self.feature_rows = (nn.Linear(self.decoder_fields.width, config.hidden_dim + 1, bias=False)
                             if dims.item_feature_sizes else None)
        self.value_head = (nn.Sequential(nn.Linear(config.hidden_dim + config.embedding_dim, config.hidden_dim),
                                         nn.ReLU(), nn.Linear(config.hidden_dim, 1))
                           if options["value_head"] else None)
        rows = dims.num_items + 1
        self.register_buffer("item_features", torch.zeros(rows, len(dims.item_feature_sizes), dtype=torch.int64))
        self.register_buffer("user_features", torch.zeros(dims.num_users + 1, len(dims.user_feature_sizes),
                                                          dtype=torch.int64))
        self.register_buffer("cold_items", torch.zeros(rows, dtype=torch.bool))
        self.train_lambda = torch.tensor(0.0)

    # ----- data -----
    def set_item_features(self, codes: torch.Tensor) -> None:
        """codes (num_items + 1, F) int64: field codes per item id; row 0 = padding."""
        _check_codes("item", codes, self.item_features.shape, self.dims.item_feature_sizes)
        self.item_features.copy_(codes)

    def set_user_features(self, codes: torch.Tensor) -> None:
        """codes (num_users + 1, G) int64: field codes per user id; row 0 = unknown user."""
        _check_codes("user", codes, self.user_features.shape, self.dims.user_feature_sizes)
        self.user_features.copy_(codes)

    def set_cold_items(self, cold: torch.Tensor) -> None:
        """cold (num_items + 1,) bool: items without interactions, scored from features alone."""
        if cold.shape != self.cold_items.shape:
            raise ValueError(f"hrnn_meta.set_cold_items: shape {tuple(cold.shape)}, "
                             f"expected {tuple(self.cold_items.shape)}")
        self.cold_items.copy_(cold)
        if (self.scores_cold_items and bool(cold.any()) and self.options["eval_lambda"] == 0
                and not self.options["cold_dropout"]):
            # Training draws one lambda per step for every item, so the two views' scores are
            # never compared within a softmax: at lambda 0 against 1, cold items can outrank
            # every warm one (docs/results.md, "Cold items on the synthetic world").
            logger.warning("hrnn_meta: %d cold items score by their feature view (lambda 1) and "
                           "warm items by their ID view (eval_lambda 0), two scales training "
                           "never compared; mixing the views for warm items too (e.g. "
                           "options.eval_lambda 0.5) or training with options.cold_dropout "
                           "ranked far better on the synthetic world",
                           int(cold.sum()))

    # ----- encoder -----
    def inputs(self, batch: SequenceBatch, item_vectors: torch.Tensor) -> list[torch.Tensor]:
        extra = []
        if self.item_fields.fields:
            extra.append(self.item_fields(self.item_features[batch.items]))
        if self.user_fields.fields:
            users = self.user_fields(self.user_features[batch.users])                 # (B, G * dim)
            extra.append(users.unsqueeze(1).expand(-1, batch.items.shape[1], -1))
        if self.context_embedding is not None:
            extra.append(self.context_embedding(_required(batch.contexts, "contexts")))
        if self.options["value_feedback"]:
            extra.append(_required(batch.values, "values").unsqueeze(-1).to(item_vectors.dtype))
        return super().inputs(batch, item_vectors) + [e.to(item_vectors.dtype) for e in extra]

    def forward(self, batch: SequenceBatch, item_vectors: torch.Tensor) -> torch.Tensor:
        if self.training and self.feature_rows is not None:
            # One lambda per step, shared by the positives and the negatives it scores.
            self.train_lambda = torch.rand((), device=item_vectors.device)
        return super().forward(batch, item_vectors)

    # ----- decoder -----
    @property
    def scores_cold_items(self) -> bool:
        """Whether items score from their features too (eq. 2), which scores items without
        interactions. Without item features the plain tables score, as for HRNN."""
        return self.feature_rows is not None

    def scorer(self, tables: nn.Module) -> RowViewScorer:
        """The scoring view NextItemModel uses when `scores_cold_items`: eq. 2's mixed rows."""
        return RowViewScorer(tables, self.mix)

    def mix(self, items: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """items (...), their ID rows (vectors (..., D), bias (...)) -> eq. 2's mixed rows (a
        table.RowView; on sharded tables each shard mixes its own rows, the encoder being the
        same on every rank)."""
        feature_vectors, feature_bias = self.feature_view(items)
        mix = self.mixing(items).to(vectors.dtype)
        mixed_bias = torch.lerp(bias, feature_bias, mix)
        if not self.training:
            # A cold item without one known feature code has neither view: its score would be a
            # constant 0 for every user. It is left out of rankings, as plain models leave out
            # every cold item.
            mixed_bias = mixed_bias.masked_fill(self.blank_items(items), float("-inf"))
        return torch.lerp(vectors, feature_vectors, mix.unsqueeze(-1)), mixed_bias

    def blank_items(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) -> (...) bool: cold and without one known feature code, so neither view
        says anything of them; left out of rankings and of the histories the model reads."""
        return self.cold_items[items] & (self.item_features[items] == 0).all(-1)

    def feature_view(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """items (...) -> (w(f_j) (..., D), b(f_j) (...)).

        feature_rows(concat_f E_f[code_f]) computed as sum_f (E_f W_f^T)[code_f]: every code of a
        field is projected in one matmul of a fixed shape, then gathered and summed in field
        order. So an item's row is bit-identical whichever items it is computed with; a matmul
        over just the asked rows rounds by their count on some CPUs (AVX-512 MKL), and cold twins
        (lambda 1, same codes) scored apart would escape the tie rule, sharded or not. The cost
        grows with the fields' vocabularies (categories, brands), not with the catalog.
        """
        codes = self.item_features[items]                                       # (..., F)
        blocks = self.feature_rows.weight.split(
            [field.embedding_dim for field in self.decoder_fields.fields], dim=1)
        rows = sum((field.weight @ block.T)[codes[..., f]]                       # (..., D + 1)
                   for f, (field, block) in enumerate(zip(self.decoder_fields.fields, blocks)))
        return rows[..., :-1], rows[..., -1]

    def mixing(self, items: torch.Tensor) -> torch.Tensor:
        """lambda for scoring `items` (...): the step's draw in training (1 for a `cold_dropout`
        share of them), else 1 for cold items and eval_lambda for the rest."""
        if self.training:
            mixing = self.train_lambda.expand(items.shape)
            if self.options["cold_dropout"]:
                as_cold = torch.rand(items.shape, device=items.device) < self.options["cold_dropout"]
                mixing = torch.where(as_cold, torch.ones_like(mixing), mixing)
            return mixing
        warm = torch.full(items.shape, float(self.options["eval_lambda"]), device=items.device)
        return torch.where(self.cold_items[items], torch.ones_like(warm), warm)

    # ----- value head -----
    def predict_values(self, hidden: torch.Tensor, targets: torch.Tensor, tables: nn.Module) -> torch.Tensor:
        """hidden (N, D), next items (N,) -> predicted values of the next events (N,)."""
        if self.value_head is None:
            raise ValueError("hrnn_meta: predict_values needs options['value_head'] = True")
        vectors = tables.embed(targets).masked_fill(self.cold_items[targets].unsqueeze(-1), 0.0)
        return self.value_head(torch.cat([hidden, vectors], dim=-1)).squeeze(-1)

    def auxiliary_loss(self, batch: SequenceBatch, hidden: torch.Tensor, tables: nn.Module) -> torch.Tensor | None:
        """value_loss_weight x mean squared error of the value head over the masked steps."""
        if self.value_head is None:
            return None
        mask = batch.mask
        labels = _required(batch.target_values, "target_values")[mask]
        predicted = self.predict_values(hidden, batch.targets[mask], tables)
        return self.options["value_loss_weight"] * (predicted - labels).pow(2).mean()


def _check_codes(kind: str, codes: torch.Tensor, shape: torch.Size, sizes: tuple[int, ...]) -> None:
    if codes.shape != shape:
        raise ValueError(f"hrnn_meta.set_{kind}_features: shape {tuple(codes.shape)}, expected {tuple(shape)} "
                         f"(one row per {kind} id incl. row 0, one column per field of Dimensions.{kind}_feature_sizes)")
    for f, size in enumerate(sizes):
        low, high = int(codes[:, f].min()), int(codes[:, f].max())
        if low < 0 or high > size:
            raise ValueError(f"hrnn_meta.set_{kind}_features: field {f} has codes in [{low}, {high}], "
                             f"expected 0..{size} (Dimensions.{kind}_feature_sizes[{f}] = {size})")


def _required(tensor: torch.Tensor | None, name: str) -> torch.Tensor:
    if tensor is None:
        raise ValueError(f"hrnn_meta: the batch has no {name!r}, which the model's options read")
    return tensor
