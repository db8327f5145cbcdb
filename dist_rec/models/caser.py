"""Caser: horizontal and vertical convolutions over the last L item vectors, plus a user vector.

Paper: Tang & Wang, "Personalized Top-N Sequential Recommendation via Convolutional Sequence
Embedding", WSDM 2018 (../shared/papers/caser_d2l_chapter.md, eqs. 17.7.1-17.7.4). For each step t
the "image" W_t (L, E) holds the item vectors of steps t-L+1 .. t (zeros before the history):
    o'_t = VConv(W_t)      d' filters G (L x 1): weighted sums of the L rows        -> d' * E
    o_t  = HConv(W_t)      for h = 1..L, d filters (h x E), ReLU, max over time     -> d * L
    z_t  = ReLU(W Dropout([o_t ; o'_t]) + b)                                        -> D - U
    hidden_t = [z_t ; p_u]                    p_u: user embedding (U dims; unknown user 0 -> zeros)
The score v_i . hidden_t + b_i is the item tables' job. All T windows go through one batched conv
(unfold); the only loop is over the L filter heights.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.models.base import Dimensions, read_options, register


@register("caser")
class Caser(nn.Module):
    """Convolutional sequence embedding.

    options: window (L = 5); vertical_filters (d' = 4); horizontal_filters (d = 16 per height);
    user_dim (U = hidden_dim // 2; the paper's z and p_u have the same size). config.dropout is the
    dropout before the fully connected layer (the paper: 0.5). Untied item tables (the paper's
    output vectors are 2x the input size); tying needs embedding_dim == hidden_dim.
    """

    def __init__(self, config: ModelConfig, dims: Dimensions):
        super().__init__()
        options = read_options(config, {"window": 5, "vertical_filters": 4,
                                        "horizontal_filters": 16,
                                        "user_dim": config.hidden_dim // 2})
        window, user_dim, dim = options["window"], options["user_dim"], config.hidden_dim
        if window < 1:
            raise ValueError(f"caser: options['window']={window} must be >= 1")
        if not 0 <= user_dim < dim:
            raise ValueError(f"caser: options['user_dim']={user_dim} must be in "
                             f"[0, hidden_dim={dim})")
        self.window = window
        self.vertical = nn.Linear(window, options["vertical_filters"])  # G: one weight per row
        self.horizontal = nn.ModuleList(
            nn.Conv1d(config.embedding_dim, options["horizontal_filters"], height)
            for height in range(1, window + 1))
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(options["vertical_filters"] * config.embedding_dim
                            + options["horizontal_filters"] * window, dim - user_dim)
        self.users = nn.Embedding(dims.num_users + 1, user_dim, padding_idx=0)

    def forward(self, batch: SequenceBatch, item_vectors: torch.Tensor) -> torch.Tensor:
        """item_vectors (B, T, E) -> hidden (B, T, D); zero at padding steps."""
        B, T, E = item_vectors.shape
        keep = (batch.items > 0).unsqueeze(-1).to(item_vectors.dtype)
        images = F.pad(item_vectors * keep, (0, 0, self.window - 1, 0)).unfold(1, self.window, 1)
        # images (B, T, E, L): column l is the item vector of step t - L + 1 + l.
        vertical = self.vertical(images).transpose(-1, -2).reshape(B, T, -1)  # (B, T, d' * E)
        flat = images.reshape(B * T, E, self.window)
        horizontal = torch.cat([conv(flat).relu().amax(-1) for conv in self.horizontal], dim=-1)
        z = F.relu(self.fc(self.dropout(torch.cat([vertical, horizontal.view(B, T, -1)], dim=-1))))
        user = self.users(batch.users).unsqueeze(1).expand(B, T, -1)
        return torch.cat([z, user], dim=-1) * keep


def recommended_config(**overrides: Any) -> ModelConfig:
    """The paper's setting: L = 5, d = 16, d' = 4, item/user size 50 (so D = 100), dropout 0.5."""
    base = dict(name="caser", embedding_dim=50, hidden_dim=100, dropout=0.5, tied_embeddings=False,
                options={"window": 5, "vertical_filters": 4, "horizontal_filters": 16,
                         "user_dim": 50})
    return ModelConfig(**{**base, **overrides})
