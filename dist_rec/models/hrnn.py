"""HRNN: a GRU over items with time-delta, session-control and feedback inputs.

Paper: "Temporal-Contextual Recommendation in Real-Time", KDD 2020 (../shared/papers/hrnn_meta_*),
section 2.2. Instead of a two-level HGRU, the input at step t concatenates
    x_t = [ item vector e(a_t) ; delta embedding d(bucket(t_{t+1} - t_t)) ; session-start bit s_t ;
            feedback embedding f(type of event t) ]
and a single GRU reads it:  h_t = GRU(x_t, h_{t-1}).  The delta is the gap between the input event
and the moment of the prediction, so at serving time the same history gives different
recommendations for different `now` (paper Table 2). HRNN-meta (hrnn_meta.py) adds inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.models.base import Dimensions, read_options, register


@register("hrnn")
class HRNN(nn.Module):
    def __init__(self, config: ModelConfig, dims: Dimensions, extra_input_dim: int = 0):
        """extra_input_dim: width of the inputs a subclass appends in `inputs()` (a subclass
        reads `config.options` itself)."""
        super().__init__()
        if type(self) is HRNN:
            read_options(config, {})          # HRNN has no options: any key is a typo
        self.delta_embedding = nn.Embedding(dims.num_delta_buckets, config.delta_embedding_dim,
                                            padding_idx=0)
        self.type_embedding = nn.Embedding(dims.num_event_types + 1, config.type_embedding_dim,
                                           padding_idx=0)
        input_dim = (config.embedding_dim + config.delta_embedding_dim + 1 + config.type_embedding_dim
                     + extra_input_dim)
        self.gru = nn.GRU(input_dim, config.hidden_dim, num_layers=config.num_layers,
                          batch_first=True, dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)

    def inputs(self, batch: SequenceBatch, item_vectors: torch.Tensor) -> list[torch.Tensor]:
        """The per-step inputs, each (B, T, width), concatenated into x_t."""
        return [item_vectors,
                self.delta_embedding(batch.deltas),
                batch.session_starts.unsqueeze(-1).to(item_vectors.dtype),
                self.type_embedding(batch.event_types)]

    def forward(self, batch: SequenceBatch, item_vectors: torch.Tensor) -> torch.Tensor:
        """item_vectors (B, T, E) -> hidden (B, T, H)."""
        inputs = torch.cat(self.inputs(batch, item_vectors), dim=-1)
        # Batches are left-padded; a GRU reading the padding would drift from its zero state, so
        # the real steps are rolled to the front, run from h0, and rolled back into place.
        padding = (batch.items == 0).sum(1, keepdim=True)                       # (B, 1)
        steps = torch.arange(inputs.shape[1], device=inputs.device)
        to_front = ((steps + padding) % inputs.shape[1]).unsqueeze(-1)         # (B, T, 1)
        hidden, _ = self.gru(self.dropout(inputs.gather(1, to_front.expand_as(inputs))))
        back = ((steps - padding) % inputs.shape[1]).unsqueeze(-1)
        return self.dropout(hidden.gather(1, back.expand_as(hidden)))
