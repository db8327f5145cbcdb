import math

import pytest
import torch
from torch import nn

from dist_rec.embeddings.optim import RowWiseAdagrad


def embedding(rows: int = 10, dim: int = 4, sparse: bool = True) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(rows, dim, sparse=sparse)


def test_sparse_step_touches_only_the_gradient_rows_hand_computed():
    table = embedding()
    before = table.weight.detach().clone()
    optimizer = RowWiseAdagrad(table.parameters(), lr=0.1, eps=1e-10)
    ids = torch.tensor([3, 7, 3])                   # row 3 twice: its gradients add up
    upstream = torch.tensor([[1.0, 2, 0, 0], [0, 0, 3, 4], [1, 0, 0, 2]])
    (table(ids) * upstream).sum().backward()
    optimizer.step()

    grad3, grad7 = torch.tensor([2.0, 2, 0, 2]), torch.tensor([0.0, 0, 3, 4])
    sum3, sum7 = (4 + 4 + 4) / 4, (9 + 16) / 4      # mean of squares per row
    state = optimizer.state[table.weight]["sum"]
    assert state[3].item() == pytest.approx(sum3) and state[7].item() == pytest.approx(sum7)
    torch.testing.assert_close(table.weight[3], before[3] - 0.1 * grad3 / math.sqrt(sum3))
    torch.testing.assert_close(table.weight[7], before[7] - 0.1 * grad7 / math.sqrt(sum7))
    untouched = [r for r in range(10) if r not in (3, 7)]
    assert torch.equal(table.weight[untouched], before[untouched])
    assert torch.equal(state[untouched], torch.zeros(8))

    # Second step on row 3 only: the accumulator grows, row 7 stays bit-identical.
    row7 = table.weight[7].detach().clone()
    after_first = table.weight[3].detach().clone()
    optimizer.zero_grad()
    (table(torch.tensor([3])) * torch.tensor([[0.0, 0, 0, 4]])).sum().backward()
    optimizer.step()
    total = sum3 + 16 / 4
    torch.testing.assert_close(table.weight[3],
                               after_first - 0.1 * torch.tensor([0.0, 0, 0, 4]) / math.sqrt(total))
    assert torch.equal(table.weight[7], row7)
    assert state[3].item() == pytest.approx(total)


def test_dense_gradient_matches_the_sparse_one():
    sparse, dense = embedding(sparse=True), embedding(sparse=False)
    optimizers = [RowWiseAdagrad(t.parameters(), lr=0.05) for t in (sparse, dense)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 10, (6,), generator=generator)
        upstream = torch.randn(6, 4, generator=generator)
        for table, optimizer in zip((sparse, dense), optimizers):
            optimizer.zero_grad()
            (table(ids) * upstream).sum().backward()
            optimizer.step()
    torch.testing.assert_close(sparse.weight, dense.weight)
    torch.testing.assert_close(optimizers[0].state[sparse.weight]["sum"],
                               optimizers[1].state[dense.weight]["sum"])


def test_one_dimensional_and_bias_shaped_parameters():
    bias = nn.Parameter(torch.zeros(5))
    optimizer = RowWiseAdagrad([bias], lr=1.0)
    bias.grad = torch.tensor([0.0, 2.0, 0.0, -0.5, 0.0])
    optimizer.step()
    # one scalar per row: update = lr * g / |g| = sign(g)
    torch.testing.assert_close(bias.detach(), torch.tensor([0.0, -1.0, 0.0, 1.0, 0.0]))


def test_state_dict_round_trip_and_growth():
    table = embedding()
    optimizer = RowWiseAdagrad(table.parameters(), lr=0.1)
    (table(torch.tensor([1, 2])).sum()).backward()
    optimizer.step()
    saved = optimizer.state_dict()

    restored = RowWiseAdagrad(table.parameters(), lr=0.1)
    restored.load_state_dict(saved)
    assert torch.equal(restored.state[table.weight]["sum"], optimizer.state[table.weight]["sum"])

    # The catalog grows by 3 rows: same Parameter, bigger data; new rows get zero accumulators.
    old_sum = restored.state[table.weight]["sum"].clone()
    with torch.no_grad():
        table.weight.data = torch.cat([table.weight.data, torch.zeros(3, 4)])
    restored.zero_grad()
    table(torch.tensor([11])).sum().backward()
    with pytest.raises(ValueError, match="call grow"):
        restored.step()
    restored.grow(table.weight)
    restored.step()
    grown = restored.state[table.weight]["sum"]
    assert grown.shape == (13,) and torch.equal(grown[:10], old_sum)
    assert grown[11].item() == pytest.approx(1.0) and grown[[10, 12]].tolist() == [0.0, 0.0]
    torch.testing.assert_close(table.weight[11], torch.full((4,), -0.1))


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr must be > 0"):
        RowWiseAdagrad(embedding().parameters(), lr=0.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        RowWiseAdagrad(embedding().parameters(), eps=0.0)
    with pytest.raises(ValueError, match="not optimised"):
        RowWiseAdagrad(embedding().parameters()).grow(nn.Parameter(torch.zeros(2, 2)))
