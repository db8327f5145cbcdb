"""SASRec: causal self-attention over the item sequence.

Paper: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (sec. III). Two
forms of the block; options["block"] picks one:
    x = Dropout(sqrt(E) e(a_t) + p_t)              learned positions; padding rows zeroed
  "code" (default): the authors' code (kang205/SASRec, model.py), which produced the paper's tables
    q = LN(x);  x = LN(q + SelfAttention(q, keys = x));  x = x + FFN(x)
  "paper": the paper's text, every sub-layer x + Dropout(g(LN(x)))
    x = x + Dropout(SelfAttention(LN(x), keys = LN(x)));  x = x + FFN(LN(x))
  both: hidden = LN(x), FFN = Dropout(W2 Dropout(ReLU(W1 x + b1)) + b2)
Attention is softmax(Q W^Q (K W^K)^T / sqrt(D/H)) (K W^V), causal with a key padding mask and
dropout on its weights, heads concatenated and no output projection (paper eq. 2). The code's
form carries the normalised input on the residuals and reads raw keys. Which form is better
depends on the data: on Amazon Games the code's scored 0.02 higher HR@10, on YooChoose the paper's
0.007 higher HR@20 in the same time, and validation says the same on each (docs/results.md).
The paper ties input and output item vectors: use `recommended_config()` (tied_embeddings=True);
the encoder works untied too.

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


BLOCK_FORMS = ("code", "paper")


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
    """One SASRec block in the code's or the paper's form (module docstring)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, form: str = "code"):
        super().__init__()
        if form not in BLOCK_FORMS:
            raise ValueError(f"sasrec: options['block']={form!r}; known {BLOCK_FORMS}")
        self.heads = heads
        self.dropout = dropout
        self.code_form = form == "code"
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)          # W^Q, W^K, W^V stacked
        self.residual_dropout = nn.Identity() if self.code_form else nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim, dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), allowed (B, 1, T, T) bool: query i may read key j -> (B, T, D)."""
        B, T, D = x.shape
        normed = self.attention_norm(x)
        if self.code_form:       # queries read LN(x), keys and values x itself
            weight, bias = self.qkv.weight, self.qkv.bias
            qkv = torch.cat([F.linear(normed, weight[:D], bias[:D]),
                             F.linear(x, weight[D:], bias[D:])], dim=-1)
        else:
            qkv = self.qkv(normed)
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(B, T, D)
        x = (normed if self.code_form else x) + self.residual_dropout(attended)
        normed = self.ffn_norm(x)
        return (normed if self.code_form else x) + self.ffn(normed)


@register("sasrec")
class SASRec(nn.Module):
    """Self-attentive sequential recommendation.

    options: max_length (50) positions; blocks (2); heads (1, must divide hidden_dim);
    ffn_dim (hidden_dim); block ("code" or "paper": module docstring). config.dropout is the
    paper's dropout rate (0.2 dense data, 0.5 sparse); config.num_layers is not read (it is the
    RNN depth).
    """

    def __init__(self, config: ModelConfig, dims: Dimensions):
        super().__init__()
        options = read_options(config, {"max_length": 50, "blocks": 2, "heads": 1,
                                        "ffn_dim": config.hidden_dim, "block": "code"})
        dim = config.hidden_dim
        check_heads("sasrec", dim, options["heads"])
        self.input = SequenceInput("sasrec", config.embedding_dim, dim, options["max_length"],
                                   config.dropout)
        self.max_length = options["max_length"]   # read by NextItemModel.max_length
        self.blocks = nn.ModuleList(AttentionBlock(dim, options["heads"], options["ffn_dim"],
                                                   config.dropout, options["block"])
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
    """The paper's default: 2 blocks, 1 head, d = 50, n = 50, dropout 0.2, tied item vectors, the
    block of the authors' code."""
    base = dict(name="sasrec", embedding_dim=50, hidden_dim=50, dropout=0.2, tied_embeddings=True,
                options={"max_length": 50, "blocks": 2, "heads": 1, "block": "code"})
    return ModelConfig(**{**base, **overrides})
