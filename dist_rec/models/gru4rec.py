"""GRU4Rec: a time-blind GRU over item vectors whose state restarts with every session.

Papers: Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks" (ICLR 2016);
Hidasi & Karatzoglou, "Recurrent Neural Networks with Top-k Gains for Session-based
Recommendations" (CIKM 2018). Ideas only; no code from the official implementation.

    h_t = GRU(dropout(e(a_t)), keep_t * h_{t-1}),   keep_t = 0 where a new session starts at t

Session-parallel training in the paper resets a row's state when its session ends; here a window
may hold several sessions, so the reset happens inside the window, at `batch.session_starts`.
Deltas and event types are ignored. BPR-max and the sampled softmax over shared popularity^alpha
negatives (the CIKM 2018 losses) live in losses.py, like every other loss.

Why a loop of `nn.GRUCell`: nn.GRU cannot reset mid-sequence. Measured on the 2-core CPU
(B=256, T=32, E=H=128, 10% session starts, forward+backward, best of 12): nn.GRU without any
reset 84 ms, this GRUCell loop 89 ms, a hand-written cell with the input projection hoisted out
of the loop 88 ms, nn.GRU over packed per-session segments 355 ms (gather/scatter and packing).
"""
from __future__ import annotations


import torch
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.models.base import Dimensions, read_options, register


def carry_mask(batch: SequenceBatch, reset_on_session_start: bool) -> torch.Tensor:
    """(B, T) bool: True where step t continues from h_{t-1}, False where it starts from zero.

    The state restarts at t = 0, after padding (so the hidden of a real step does not depend on
    how much left padding its window has) and, if asked, where a session starts.
    """
    previous_real = torch.zeros_like(batch.items, dtype=torch.bool)
    previous_real[:, 1:] = batch.items[:, :-1] > 0
    if reset_on_session_start:
        return previous_real & ~batch.session_starts
    return previous_real


@register("gru4rec")
class GRU4Rec(nn.Module):
    """GRU4Rec encoder. hidden (B, T, H), H = config.hidden_dim; config.num_layers stacked cells.

    Options (config.options):
      reset_on_session_start  True   zero the state where batch.session_starts (session-parallel)
      embedding_dropout       config.dropout   on the input item vectors
      hidden_dropout          config.dropout   on each layer's output (GRU4Rec's dropout_p_hidden)
    """

    def __init__(self, config: ModelConfig, dims: Dimensions):
        super().__init__()
        options = read_options(config, {"reset_on_session_start": True,
                                         "embedding_dropout": config.dropout,
                                         "hidden_dropout": config.dropout})
        if config.num_layers < 1:
            raise ValueError(f"ModelConfig.num_layers must be >= 1, got {config.num_layers}")
        self.reset_on_session_start = bool(options["reset_on_session_start"])
        sizes = [config.embedding_dim] + [config.hidden_dim] * config.num_layers
        self.cells = nn.ModuleList(nn.GRUCell(n_in, n_out) for n_in, n_out in zip(sizes, sizes[1:]))
        self.embedding_dropout = nn.Dropout(options["embedding_dropout"])
        self.hidden_dropout = nn.Dropout(options["hidden_dropout"])

    def forward(self, batch: SequenceBatch, item_vectors: torch.Tensor) -> torch.Tensor:
        """item_vectors (B, T, E) -> hidden (B, T, H)."""
        keep = carry_mask(batch, self.reset_on_session_start).to(item_vectors.dtype).unsqueeze(-1)
        inputs = self.embedding_dropout(item_vectors)
        states = [inputs.new_zeros(inputs.shape[0], cell.hidden_size) for cell in self.cells]
        outputs = []
        # unbind, not inputs[:, t]: its backward stacks once instead of adding T full-size grads
        for step_input, step_keep in zip(inputs.unbind(1), keep.unbind(1)):
            layer_input = step_input
            for layer, cell in enumerate(self.cells):
                states[layer] = cell(layer_input, states[layer] * step_keep)
                layer_input = self.hidden_dropout(states[layer])
            outputs.append(layer_input)
        return torch.stack(outputs, dim=1)
