"""SASRec: causal self-attention over the item sequence.

Paper: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (sec. III), as the
authors' code (kang205/SASRec, model.py) computes it, which is what produced the paper's tables:
    x = Dropout(sqrt(E) e(a_t) + p_t)              learned positions; padding rows zeroed
    q = LN(x)                                      per block: queries and the residual
    x = LN(q + SelfAttention(q, keys = x))         causal + key padding mask
    x = x + FFN(x)                                 FFN = Dropout(W2 Dropout(ReLU(W1 x + b1)) + b2)
    hidden = LN(x)
Attention is softmax(Q W^Q (K W^K)^T / sqrt(D/H)) V W^V, dropout on its weights, heads
concatenated and no output projection (paper eq. 2). The paper's text writes each sub-layer as
x + Dropout(g(LN(x))), which normalises keys and values too and carries the raw x on the residual;
on Amazon Games that form scored 0.019-0.026 lower HR@10 than the code's (docs/results.md), so this
file follows the code. The paper ties input and output item vectors: use `recommended_config()`
(tied_embeddings=True); the encoder works untied too.

This file also holds the pieces the convolutional models share: the SASRec-style embedding layer
`SequenceInput` (ConvRec reuses it, as its paper does; DynamicRec without positions) and
`feed_forward`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.models.base import Dimensions, check_heads, read_options, register


class SequenceInput(nn.Module):
    """Embedding layer: item vectors scaled by sqrt(E), projected to D if E != D, plus a learned
    position, dropout; padding rows are zero.

    Positions count real steps from the first non-padding one (0, 1, ...), not slots of the
    window, so more left padding or a longer window leaves every real step's input unchanged, and a
    serving-time history of k events sees the positions its training windows saw.
    """

    def __init__(self, name: str, embedding_dim: int, hidden_dim: int, max_length: int | None,
                 dropout: float):
        super().__init__()
        self.name = name
        self.scale = math.sqrt(embedding_dim)
        self.project = (nn.Identity() if embedding_dim == hidden_dim
                        else nn.Linear(embedding_dim, hidden_dim))
        self.max_length = max_length
        self.positions = None if max_length is None else nn.Embedding(max_length, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, items: torch.Tensor, item_vectors: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """items (B, T), item_vectors (B, T, E) -> x (B, T, D), keep (B, T, 1) 1.0 at real steps."""
        keep = (items > 0).unsqueeze(-1).to(item_vectors.dtype)
        x = self.project(item_vectors * self.scale)
        if self.positions is not None:
            if items.shape[1] > self.max_length:
                raise ValueError(f"{self.name}: window length {items.shape[1]} exceeds "
                                 f"options['max_length']={self.max_length}")
            steps = (items > 0).cumsum(1)
            x = x + self.positions((steps - 1).clamp(min=0))
        return self.dropout(x) * keep, keep


def feed_forward(dim: int, inner_dim: int, dropout: float) -> nn.Sequential:
    """Point-wise FFN: W2 Dropout(ReLU(W1 x + b1)) + b2, then dropout (the residual branch's)."""
    return nn.Sequential(nn.Linear(dim, inner_dim), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(inner_dim, dim), nn.Dropout(dropout))


class AttentionBlock(nn.Module):
    """One SASRec block as the authors' code computes it (module docstring)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.attention_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim, dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), allowed (B, 1, T, T) bool: query i may read key j -> (B, T, D)."""
        B, T, D = x.shape
        queries = self.attention_norm(x)
        q = self.query(queries).view(B, T, self.heads, D // self.heads)
        # Keys and values read the block's input as it is, not normalised (the authors' code).
        k, v = self.key_value(x).view(B, T, 2, self.heads, D // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0)
        x = self.ffn_norm(queries + attended.transpose(1, 2).reshape(B, T, D))
        return x + self.ffn(x)


@register("sasrec")
class SASRec(nn.Module):
    """Self-attentive sequential recommendation.

    options: max_length (50) positions; blocks (2); heads (1, must divide hidden_dim);
    ffn_dim (hidden_dim). config.dropout is the paper's dropout rate (0.2 dense data, 0.5 sparse);
    config.num_layers is not read (it is the RNN depth).
    """

    def __init__(self, config: ModelConfig, dims: Dimensions):
        super().__init__()
        options = read_options(config, {"max_length": 50, "blocks": 2, "heads": 1,
                                        "ffn_dim": config.hidden_dim})
        dim = config.hidden_dim
        check_heads("sasrec", dim, options["heads"])
        self.input = SequenceInput("sasrec", config.embedding_dim, dim, options["max_length"],
                                   config.dropout)
        self.max_length = options["max_length"]   # read by NextItemModel.max_length
        self.blocks = nn.ModuleList(AttentionBlock(dim, options["heads"], options["ffn_dim"],
                                                   config.dropout)
                                    for _ in range(options["blocks"]))
        self.norm = nn.LayerNorm(dim)

    def forward(self, batch: SequenceBatch, item_vectors: torch.Tensor) -> torch.Tensor:
        """item_vectors (B, T, E) -> hidden (B, T, D); zero at padding steps."""
        x, keep = self.input(batch.items, item_vectors)
        T = x.shape[1]
        real = batch.items > 0
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # A padding query would see no key at all (softmax of nothing = NaN): let it see itself;
        # its output is zeroed below and no real query ever reads it.
        allowed = (causal & real.unsqueeze(1)) | torch.eye(T, dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, allowed.unsqueeze(1))
        return self.norm(x) * keep


def recommended_config(**overrides: Any) -> ModelConfig:
    """The paper's default: 2 blocks, 1 head, d = 50, n = 50, dropout 0.2, tied item vectors."""
    base = dict(name="sasrec", embedding_dim=50, hidden_dim=50, dropout=0.2, tied_embeddings=True,
                options={"max_length": 50, "blocks": 2, "heads": 1})
    return ModelConfig(**{**base, **overrides})
