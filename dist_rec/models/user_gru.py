"""User-based GRU: the user's embedding enters the gates and the candidate state of every step.

Paper: Donkers, Loepp, Ziegler, "Sequential User-based Recurrent Neural Network Recommendations",
RecSys 2017 (../shared/papers/user_based_gru_recsys2017.md), section 3.2. With e_i = E_i i^t the
item vector (B, E), e_v = E_v v^t the user vector (B, U) and h = h^{t-1} (B, H):

    [u; r] = sigmoid(T(h) + T(x) + T(v))            eq. (3), (9)
    k      = tanh(T(r * h) + T(x) + T(v))           eq. (4), (10)   (reset before the matmul)
    h^t    = (1 - u) * h + u * k                     eq. (5)

where (x, v) is, by `integration`:
    linear       (e_i, e_v)                                             sec. 3.2.1
    rectified    (e_i, e_v filtered by thresholds k1, k2 = T([h; e_i; e_v]) and omega)
                                                                        sec. 3.2.2, eq. (6), (7)
    attentional  ((1 - xi) * e_i, xi * e_v), xi = sigmoid(T([h; e_i; e_v]))   sec. 3.2.3, eq. (8)

The user vector is the same at every step of a window (the paper's v^t is constant per sequence).
"""
from __future__ import annotations

import torch
from torch import nn

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.models.base import Dimensions, read_options, register
from dist_rec.models.gru4rec import carry_mask

INTEGRATIONS = ("linear", "rectified", "attentional")


def rectify(user: torch.Tensor, low: torch.Tensor, high: torch.Tensor, omega: float,
            temperature: float = 0.0) -> torch.Tensor:
    """Eq. (6) on (..., U) tensors: 0 below `low`, omega * user between `low` and `high`, user above.

    With temperature > 0 the two steps become sigmoids of (user - threshold) / temperature, which
    tend to eq. (6) as temperature -> 0. Why: eq. (6) is piecewise constant in the thresholds, so
    exactly as written the threshold layer of eq. (7) gets no gradient and never trains.
    """
    if temperature > 0:
        above_low = torch.sigmoid((user - low) / temperature)
        above_high = torch.sigmoid((user - high) / temperature)
    else:
        above_low = (user >= low).to(user.dtype)
        above_high = (user >= high).to(user.dtype)
    return user * above_low * (omega + (1 - omega) * above_high)


@register("user_gru")
class UserGRU(nn.Module):
    """User-based GRU encoder (one layer, as in the paper). hidden (B, T, H), H = config.hidden_dim.

    Options (config.options):
      integration             "linear"   linear | rectified | attentional (paper sec. 3.2.1-3.2.3)
      user_dim                config.embedding_dim   U; attentional needs U == embedding_dim (eq. 9)
      user_dropout            0.0        on the user vector (the paper: 0.5); config.dropout acts
                                         on item vectors (the paper: 0.2) and the hidden output
      omega                   0.2        rectified: leak between the thresholds (paper's grid value)
      rectified_temperature   0.0        rectified: 0 = eq. (6) exactly (hard thresholds, which get
                                         no gradient); > 0 = sigmoid steps, thresholds train
      reset_on_session_start  False      the paper follows a user across sessions; True restarts the
                                         state at every session start like GRU4Rec
    The paper's L2 penalty (0.01) on the user side belongs to the loss: it is not applied here.
    """

    def __init__(self, config: ModelConfig, dims: Dimensions):
        super().__init__()
        options = read_options(config, {"integration": "linear", "user_dim": config.embedding_dim,
                                         "user_dropout": 0.0, "omega": 0.2,
                                         "rectified_temperature": 0.0,
                                         "reset_on_session_start": False})
        integration = options["integration"]
        if integration not in INTEGRATIONS:
            raise ValueError(f"ModelConfig.options['integration'] must be one of {INTEGRATIONS}, "
                             f"got {integration!r}")
        if config.num_layers != 1:
            raise ValueError(f"user_gru has one layer (the paper's depth); "
                             f"ModelConfig.num_layers = {config.num_layers}")
        item_dim, hidden_dim = config.embedding_dim, config.hidden_dim
        user_dim = int(options["user_dim"])
        if integration == "attentional" and user_dim != item_dim:
            raise ValueError(f"user_gru attentional weighs item and user vectors by one gate "
                             f"(eq. 9): ModelConfig.options['user_dim'] = {user_dim} must equal "
                             f"embedding_dim = {item_dim}")
        if not 0 < options["omega"] < 1:
            raise ValueError(f"ModelConfig.options['omega'] must be in (0, 1), "
                             f"got {options['omega']}")
        self.integration = integration
        self.omega = float(options["omega"])
        self.temperature = float(options["rectified_temperature"])
        self.reset_on_session_start = bool(options["reset_on_session_start"])
        self.hidden_dim = hidden_dim

        self.user_embedding = nn.Embedding(dims.num_users + 1, user_dim, padding_idx=0)
        nn.init.normal_(self.user_embedding.weight, std=user_dim ** -0.5)
        with torch.no_grad():
            self.user_embedding.weight[0].zero_()  # unknown user: no user signal
        # T(x) + T(v) of eq. (3)/(4) for [u, r, k] in one matmul; the biases of all T's sum here.
        self.input_projection = nn.Linear(item_dim + user_dim, 3 * hidden_dim)
        self.hidden_gates = nn.Linear(hidden_dim, 2 * hidden_dim, bias=False)  # T(h), eq. (3)
        self.hidden_candidate = nn.Linear(hidden_dim, hidden_dim, bias=False)  # T(r * h), eq. (4)
        # The integration's own T([h; e_i; e_v]): thresholds k1, k2 (eq. 7) or the gate xi (eq. 8),
        # split into an input part computed for all steps at once and a per-step hidden part.
        context_dim = {"linear": 0, "rectified": 2 * user_dim, "attentional": item_dim}[integration]
        if context_dim:
            self.context_inputs = nn.Linear(item_dim + user_dim, context_dim)
            self.context_hidden = nn.Linear(hidden_dim, context_dim, bias=False)
        if integration == "attentional":
            # Paper: start near zero, so xi ~ 0.5 everywhere: item and user vectors enter at
            # half weight each until the gate learns where to look.
            for weight in (self.context_inputs.weight, self.context_hidden.weight):
                nn.init.normal_(weight, std=0.01)
            nn.init.zeros_(self.context_inputs.bias)
        self.item_dropout = nn.Dropout(config.dropout)
        self.user_dropout = nn.Dropout(options["user_dropout"])

    def forward(self, batch: SequenceBatch, item_vectors: torch.Tensor) -> torch.Tensor:
        """item_vectors (B, T, E), batch.users (B,) -> hidden (B, T, H)."""
        steps = item_vectors.shape[1]
        items = self.item_dropout(item_vectors)
        user = self.user_dropout(self.user_embedding(batch.users))                     # (B, U)
        both = torch.cat([items, user.unsqueeze(1).expand(-1, steps, -1)], dim=-1)  # (B, T, E+U)
        keep = carry_mask(batch, self.reset_on_session_start).to(items.dtype).unsqueeze(-1)
        # Whatever does not depend on h is computed for all steps at once: the linear variant's
        # whole input term, the other variants' input part of eq. (7) / (8).
        # unbind, not x[:, t]: its backward stacks once instead of adding T full-size gradients.
        if self.integration == "linear":
            per_step = self.input_projection(both).unbind(1)
        else:
            per_step = self.context_inputs(both).unbind(1)
        state = items.new_zeros(items.shape[0], self.hidden_dim)
        outputs = []
        for step_keep, step_item, step_part in zip(keep.unbind(1), items.unbind(1), per_step):
            state = state * step_keep
            if self.integration == "linear":
                step_inputs = step_part
            else:
                item, step_user = self._integrate(step_part + self.context_hidden(state),
                                                  step_item, user)
                step_inputs = self.input_projection(torch.cat([item, step_user], dim=-1))
            state = self._cell(state, step_inputs)
            outputs.append(state)
        return self.item_dropout(torch.stack(outputs, dim=1))

    def _integrate(self, context: torch.Tensor, item: torch.Tensor,
                   user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(item (B, E), user (B, U)) as the gates see them, given T([h; e_i; e_v]) `context`."""
        if self.integration == "rectified":
            low, high = context.chunk(2, dim=-1)                                   # eq. (7)
            return item, rectify(user, low, high, self.omega, self.temperature)    # eq. (6)
        attention = torch.sigmoid(context)                                          # eq. (8)
        return (1 - attention) * item, attention * user                             # eq. (9), (10)

    def _cell(self, state: torch.Tensor, step_inputs: torch.Tensor) -> torch.Tensor:
        """One step: state (B, H), step_inputs (B, 3H) = T(x) + T(v) for [u, r, k] -> (B, H)."""
        gate_inputs, candidate_inputs = step_inputs.split([2 * self.hidden_dim, self.hidden_dim], -1)
        gates = torch.sigmoid(gate_inputs + self.hidden_gates(state))                   # eq. (3)
        update, reset = gates.chunk(2, dim=-1)
        candidate = torch.tanh(candidate_inputs + self.hidden_candidate(reset * state))  # eq. (4)
        return state + update * (candidate - state)                  # eq. (5): (1 - u) h + u k
