"""SequenceBatch: the one tensor bundle every model, loss and evaluator reads.

Conventions (B = batch of windows, T = window length):
- Dense item and user ids start at 1; 0 is padding everywhere.
- Step t holds the *input* event x_t and the *target* x_{t+1} it should predict.
- `deltas[t]` is the log2 bucket of the gap t_{t+1} - t_t: the time between the input event and the
  moment of the prediction (HRNN paper sec. 2.2 and Table 2: at serving time it is `now - t_last`).
- `session_starts[t]` is True when the input event x_t opens a session (GRU4Rec resets its state
  there; HRNN reads it as the session control bit).
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

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool: steps that have a target to predict."""
        return self.targets > 0

    @property
    def num_events(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SequenceBatch":
        return SequenceBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self)})

    def __getitem__(self, rows: slice | torch.Tensor) -> "SequenceBatch":
        """Select windows (rows of the batch)."""
        return SequenceBatch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def from_numpy(columns: dict) -> "SequenceBatch":
        """Build from a dict of equally shaped numpy arrays named like the fields."""
        return SequenceBatch(
            items=torch.as_tensor(columns["items"], dtype=torch.int64),
            targets=torch.as_tensor(columns["targets"], dtype=torch.int64),
            deltas=torch.as_tensor(columns["deltas"], dtype=torch.int64),
            session_starts=torch.as_tensor(columns["session_starts"], dtype=torch.bool),
            event_types=torch.as_tensor(columns["event_types"], dtype=torch.int64),
            target_types=torch.as_tensor(columns["target_types"], dtype=torch.int64),
            users=torch.as_tensor(columns["users"], dtype=torch.int64),
        )
