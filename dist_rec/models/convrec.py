"""ConvRec: SASRec with self-attention replaced by a lightweight (depthwise, head-tied) convolution.

Paper: Tanjim, "ConvRec: A simple lightweight convolutional network for next item recommendation"
(../shared/papers/convrec_lightweight_conv.md, sec. 3), building on Wu et al. 2019 (lightweight
convolutions). The embedding layer is SASRec's (learned positions). Per block:
    h = GLU(W_in LN(x))                                    D -> 2D -> D, as in Wu et al.'s block
    h = Dropout(W_out LightConv(h))                        causal: step i reads steps i-K+1 .. i
    x = h            (x + h with residual "both")          the paper: no residual
    x = FFN(LN(x))   (x + FFN(LN(x)) with "ffn" or "both")
    hidden = LN(x)
LightConv(h)[i, c] = sum_j softmax(W[head(c)])_j h[i - K + 1 + j, c]: one K-tap kernel per head,
shared by the D/H channels of the head. The paper centres the kernel (Wu et al. eq. 3); a
next-item model must not read the future, so the kernel sits on the K most recent steps.
The paper drops the residual because it "puts more importance to most recent actions" (sec. 5.5):
that is the one around the convolution, which carries the newest item past it. The author's later
code (Mehrab-Tanjim/DynamicRec, whose class is still named ConvRec) keeps the FFN's residual.

`ConvBlock` is shared with DynamicRec, whose kernels depend on the input.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.models.base import Dimensions, check_heads, read_options, register
from dist_rec.models.sasrec import SequenceInput, feed_forward


class LightweightConv(nn.Module):
    """Static H x K kernel, softmax-normalised over the K taps (Wu et al. 2019, eq. 3), with
    DropConnect on the normalised taps in training (Wu et al.'s weight dropout)."""

    def __init__(self, heads: int, kernel_size: int, weight_softmax: bool = True,
                 weight_dropout: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, kernel_size))
        nn.init.xavier_uniform_(self.weight)
        self.weight_softmax = weight_softmax
        self.weight_dropout = weight_dropout

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, C) -> (B, T, C): out[t, c] = sum_k w[head(c), k] h[t - K + 1 + k, c], where
        channel c belongs to head c // (C / H) and steps before the window read zeros."""
        weight = self.weight.softmax(-1) if self.weight_softmax else self.weight
        weight = F.dropout(weight, self.weight_dropout, self.training)
        heads, kernel_size = weight.shape
        channels = h.shape[-1]
        kernel = weight.repeat_interleave(channels // heads, dim=0).unsqueeze(1)  # (C, 1, K)
        # Padding K - 1 steps on the left only is what makes the convolution causal.
        padded = F.pad(h.transpose(1, 2), (kernel_size - 1, 0))
        return F.conv1d(padded, kernel, groups=channels).transpose(1, 2)


RESIDUALS = ("none", "ffn", "both")   # which sub-layers of ConvBlock add their input back


class ConvBlock(nn.Module):
    """LN, Linear + GLU, causal conv, Linear, dropout (+ residual); then LN, FFN (+ residual).
    `residual`: "none", "ffn" (around the FFN only) or "both"."""

    def __init__(self, conv: nn.Module, dim: int, ffn_dim: int, dropout: float, residual: str):
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"options['residual']={residual!r}; known {RESIDUALS}")
        self.conv_norm = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, 2 * dim)
        self.conv = conv
        self.project = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim, dropout)
        self.residual = residual

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), keep (B, T, 1) -> (B, T, D)."""
        # Padding steps must read as zeros: the conv of the first real steps reaches back into
        # them, and LN/GLU would otherwise turn a zero row into a bias vector.
        h = F.glu(self.expand(self.conv_norm(x)), dim=-1) * keep
        h = self.dropout(self.project(self.conv(h)))
        x = x + h if self.residual == "both" else h
        h = self.ffn(self.ffn_norm(x))
        return x + h if self.residual != "none" else h


@register("convrec")
class ConvRec(nn.Module):
    """Lightweight-convolution sequential recommender.

    options: max_length (50) positions; blocks (1); heads (4, must divide hidden_dim; the paper
    uses 5 with d = 50); kernel_size (31); weight_softmax (True); weight_dropout (0.0);
    residual ("none", the paper's text; "ffn", "both"); ffn_dim (hidden_dim). config.dropout:
    the paper uses 0.2.
    """

    def __init__(self, config: ModelConfig, dims: Dimensions):
        super().__init__()
        options = read_options(config, {"max_length": 50, "blocks": 1, "heads": 4,
                                        "kernel_size": 31, "weight_softmax": True,
                                        "weight_dropout": 0.0, "residual": "none",
                                        "ffn_dim": config.hidden_dim})
        dim = config.hidden_dim
        check_heads("convrec", dim, options["heads"])
        self.input = SequenceInput("convrec", config.embedding_dim, dim, options["max_length"],
                                   config.dropout)
        self.max_length = options["max_length"]   # read by NextItemModel.max_length
        self.blocks = nn.ModuleList(
            ConvBlock(LightweightConv(options["heads"], options["kernel_size"],
                                      options["weight_softmax"], options["weight_dropout"]),
                      dim, options["ffn_dim"], config.dropout, options["residual"])
            for _ in range(options["blocks"]))
        self.norm = nn.LayerNorm(dim)

    def forward(self, batch: SequenceBatch, item_vectors: torch.Tensor) -> torch.Tensor:
        """item_vectors (B, T, E) -> hidden (B, T, D); zero at padding steps."""
        x, keep = self.input(batch.items, item_vectors)
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x) * keep


def recommended_config(**overrides: Any) -> ModelConfig:
    """The paper's setting: 1 block, 5 heads, kernel 31, d = n = 50, dropout 0.2, tied vectors."""
    base = dict(name="convrec", embedding_dim=50, hidden_dim=50, dropout=0.2, tied_embeddings=True,
                options={"max_length": 50, "blocks": 1, "heads": 5, "kernel_size": 31})
    return ModelConfig(**{**base, **overrides})
