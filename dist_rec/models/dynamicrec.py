"""DynamicRec: convolution whose kernel is computed from the current input at every step.

Paper: Tanjim, Ayyubi & Cottrell, "DynamicRec: A Dynamic Convolutional Network for Next Item
Recommendation", CIKM 2020 (../shared/papers/dynamicrec_cikm2020.md, sec. 2), after Wu et al. 2019.
    DynamicConv(E, i, c) = sum_j w_j(i) E[i - K + 1 + j, c],   w(i) = softmax(W_f^T E_i)  (K taps)
With H heads, W_f maps D -> H*K and channel c uses its head's kernel (the paper: H = 1, "the same
kernel for all channels"). Blocks as in ConvRec's `ConvBlock` with residuals (the paper's ablation
shows they matter): LN before each conv block and before the FFN, LN after the last block. Two
layers of kernel 5 by default. The kernel sits on the K most recent steps (causal); the paper's
formula centres it, which would read the item being predicted.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.models.base import Dimensions, check_heads, read_options, register
from dist_rec.models.convrec import ConvBlock
from dist_rec.models.sasrec import SequenceInput


class DynamicConv(nn.Module):
    """Per-step H x K kernels from a linear map of the step's input, softmax over the K taps."""

    def __init__(self, dim: int, heads: int, kernel_size: int, weight_softmax: bool = True):
        super().__init__()
        self.heads, self.kernel_size = heads, kernel_size
        self.kernel = nn.Linear(dim, heads * kernel_size, bias=False)  # W_f (paper eq. 2)
        self.weight_softmax = weight_softmax

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, C) -> (B, T, C): out[t, c] = sum_k w_t[head(c), k] h[t - K + 1 + k, c] with
        w_t computed from h[:, t] only; steps before the window read zeros."""
        B, T, C = h.shape
        H, K = self.heads, self.kernel_size
        weights = self.kernel(h).view(B, T, H, 1, K)
        if self.weight_softmax:
            weights = weights.softmax(-1)
        # All steps at once: the K most recent inputs of every step side by side.
        windows = F.pad(h, (0, 0, K - 1, 0)).unfold(1, K, 1).reshape(B, T, H, C // H, K)
        return (windows * weights).sum(-1).reshape(B, T, C)


@register("dynamicrec")
class DynamicRec(nn.Module):
    """Dynamic-convolution sequential recommender.

    options: blocks (2); kernel_size (5); heads (1, must divide hidden_dim); weight_softmax (True);
    residual ("both"; "ffn", "none" as in ConvRec); ffn_dim (hidden_dim). No position embeddings
    (the paper has none; the kernel's taps are ordered). config.dropout: the paper uses 0.2,
    d = 200.
    """

    def __init__(self, config: ModelConfig, dims: Dimensions):
        super().__init__()
        options = read_options(config, {"blocks": 2, "kernel_size": 5, "heads": 1,
                                        "weight_softmax": True, "residual": "both",
                                        "ffn_dim": config.hidden_dim})
        dim = config.hidden_dim
        check_heads("dynamicrec", dim, options["heads"])
        self.input = SequenceInput("dynamicrec", config.embedding_dim, dim, None, config.dropout)
        self.blocks = nn.ModuleList(
            ConvBlock(DynamicConv(dim, options["heads"], options["kernel_size"],
                                  options["weight_softmax"]),
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
    """The paper's setting: 2 layers, kernel 5, d = FFN width = 200, dropout 0.2, tied vectors."""
    base = dict(name="dynamicrec", embedding_dim=200, hidden_dim=200, dropout=0.2,
                tied_embeddings=True, options={"blocks": 2, "kernel_size": 5})
    return ModelConfig(**{**base, **overrides})
