"""Every registered model, through the real training step, learns a planted next-item rule with
full softmax and with importance-sampled softmax, and beats MostPop 5x on HR@20."""
from __future__ import annotations

import pytest
import torch

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig
from dist_rec.models import build_model, registered_models
from dist_rec.models.baselines import most_pop
from tests.models.test_sequence_models import DIMS, NUM_ITEMS, make_batch
from tests.models.toy_training import fit

OPTIONS = {"caser": {"window": 3}, "convrec": {"kernel_size": 5}}


def successor(items: torch.Tensor) -> torch.Tensor:
    """The planted rule: item i is followed by (7i + 3) mod 200 + 1 (a permutation of 1..200)."""
    return (items * 7 + 3) % NUM_ITEMS + 1


def planted_world(rows: int, length: int, gen: torch.Generator, pad: bool = True) -> SequenceBatch:
    """Sequences of `length` events following the rule with probability 0.9 (else a uniform item);
    with `pad`, each row keeps a random 2..length most recent events, left-padded."""
    sequences = torch.empty(rows, length, dtype=torch.int64)
    sequences[:, 0] = torch.randint(1, NUM_ITEMS + 1, (rows,), generator=gen)
    for t in range(1, length):
        follow = torch.rand(rows, generator=gen) < 0.9
        noise = torch.randint(1, NUM_ITEMS + 1, (rows,), generator=gen)
        sequences[:, t] = torch.where(follow, successor(sequences[:, t - 1]), noise)
    if pad:
        real = torch.randint(2, length + 1, (rows,), generator=gen)
        sequences[torch.arange(length) < (length - real).unsqueeze(1)] = 0
    users = torch.randint(1, DIMS.num_users + 1, (rows,), generator=gen)
    return make_batch(sequences, users)


def hit_rate_at_20(top: torch.Tensor, targets: torch.Tensor) -> float:
    return (top == targets.unsqueeze(1)).any(1).double().mean().item()


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # row-wise Adagrad's sparse updates
@pytest.mark.parametrize("loss", ["full_softmax", "sampled_softmax"])
@pytest.mark.parametrize("name", registered_models())
def test_learns_planted_rule_with_both_losses(name, loss):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, embedding_dim=32, hidden_dim=32,
                                    tied_embeddings=name != "caser",
                                    options=OPTIONS.get(name, {})), DIMS)
    gen = torch.Generator().manual_seed(1)
    model, _ = fit(model, [planted_world(64, 9, gen) for _ in range(16)], loss=loss, steps=120)

    test = planted_world(1000, 9, torch.Generator().manual_seed(2), pad=False)
    # Predict the last event from the 8 before it: the input window is items[:, :-1].
    history, targets = make_batch(test.items[:, :-1], test.users), test.items[:, -1]
    with torch.no_grad():
        model_hr = hit_rate_at_20(model.tables.topk(model.hidden(history)[:, -1], 20)[1], targets)
    popular = most_pop(NUM_ITEMS).fit(planted_world(1000, 9, torch.Generator().manual_seed(3)).items)
    pop_hr = hit_rate_at_20(popular.topk(history, 20), targets)
    # Ceiling 0.9 + 0.1 * 20/200 = 0.91; MostPop on a near-uniform catalog: about 20/200.
    assert pop_hr < 0.15, pop_hr
    assert model_hr > 0.7 and model_hr > 5 * pop_hr, (model_hr, pop_hr)
