"""SequenceBatch: the one tensor bundle every model, loss and evaluator reads.

Conventions (B = batch of windows, T = window length):
- Dense item and user ids start at 1; 0 is padding everywhere.
- Step t holds the *input* event x_t and the *target* x_{t+1} it should predict.
- `deltas[t]` is the log2 bucket of the gap t_{t+1} - t_t: the time between the input event and the
  moment of the prediction (HRNN paper sec. 2.2 and Table 2: at serving time it is `now - t_last`).
- `session_starts[t]` is True when the input event x_t opens a session (GRU4Rec resets its state
  there; HRNN reads it as the session control bit).
- Optional context (None when the data has none; HRNN-meta reads them): `values[t]` the feedback
  value of x_t (e.g. a rating), `target_values[t]` the value of x_{t+1} (the value head's label),
  `contexts[t]` a code 1..n of the request's context at step t (e.g. device), 0 = unknown.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class SequenceBatch:
    items: torch.Tensor           # (B, T) int64 input item ids, 0 = padding
    targets: torch.Tensor         # (B, T) int64 next item ids, 0 = no target (padding or end)
    deltas: torch.Tensor          # (B, T) int64 bucket of the gap to the target's time, 0 = padding
    session_starts: torch.Tensor  # (B, T) bool   input event opens a session
    event_types: torch.Tensor     # (B, T) int64 type code of the input event (1..n), 0 = padding
    target_types: torch.Tensor    # (B, T) int64 type code of the target event, 0 = padding
    users: torch.Tensor           # (B,)   int64 user ids, 0 = unknown
    values: torch.Tensor | None = None         # (B, T) float32 value of the input event
    target_values: torch.Tensor | None = None  # (B, T) float32 value of the target event
    contexts: torch.Tensor | None = None       # (B, T) int64 context code, 0 = unknown

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool: steps that have a target to predict."""
        return self.targets > 0

    @property
    def num_events(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SequenceBatch":
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def __getitem__(self, rows: slice | torch.Tensor) -> "SequenceBatch":
        """Select windows (rows of the batch)."""
        return self._map(lambda tensor: tensor[rows])

    def steps(self, columns: slice) -> "SequenceBatch":
        """The same windows, only the steps in `columns` (the per-window `users` are kept)."""
        return self._map(lambda tensor: tensor[:, columns] if tensor.dim() == 2 else tensor)

    def _map(self, function) -> "SequenceBatch":
        """Apply `function` to every tensor field; absent optional fields stay None."""
        return SequenceBatch(**{f.name: None if getattr(self, f.name) is None else function(getattr(self, f.name))
                                for f in fields(self)})

    @staticmethod
    def from_numpy(columns: dict) -> "SequenceBatch":
        """Build from a dict of equally shaped numpy arrays named like the fields (the optional
        ones may be missing)."""
        def optional(name: str, dtype: torch.dtype) -> torch.Tensor | None:
            return torch.as_tensor(columns[name], dtype=dtype) if name in columns else None

        return SequenceBatch(
            items=torch.as_tensor(columns["items"], dtype=torch.int64),
            targets=torch.as_tensor(columns["targets"], dtype=torch.int64),
            deltas=torch.as_tensor(columns["deltas"], dtype=torch.int64),
            session_starts=torch.as_tensor(columns["session_starts"], dtype=torch.bool),
            event_types=torch.as_tensor(columns["event_types"], dtype=torch.int64),
            target_types=torch.as_tensor(columns["target_types"], dtype=torch.int64),
            users=torch.as_tensor(columns["users"], dtype=torch.int64),
            values=optional("values", torch.float32),
            target_values=optional("target_values", torch.float32),
            contexts=optional("contexts", torch.int64),
        )
