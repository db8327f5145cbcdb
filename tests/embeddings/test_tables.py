"""ItemTables' full-catalog ranking where rows repeat, in the tables themselves or through a row
view (HRNN-meta's cold items of one category): bit-identical rows tie with the target and top-k
lists them by item id, whatever the batch and the chunks. And the targets' full-softmax
log-likelihoods (perplexity) against log_softmax over the whole catalog."""
from __future__ import annotations

import torch

from dist_rec.embeddings.table import ItemTables

NUM_ITEMS, TWINS = 30, range(12, 31)          # items 12..30 all score through one row


def twin_view(ids: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor):
    twin = (ids >= TWINS.start).unsqueeze(-1)
    row = torch.linspace(-1.3, 0.9, vectors.shape[-1])
    return torch.where(twin, row, vectors), torch.where(twin.squeeze(-1), torch.tensor(0.37), bias)


def test_identical_rows_tie_with_the_target_in_any_batch_and_chunking():
    torch.manual_seed(0)
    tables = ItemTables(NUM_ITEMS, 7, 7)
    hidden = torch.randn(16, 7)
    targets = torch.tensor([14] * 8 + [3] * 8)
    # Expected by hand, in float64; the twins tie by construction (a matmul may round a column
    # at the edge of its blocking apart from the others by an ulp).
    vectors, bias = twin_view(torch.arange(NUM_ITEMS + 1), *tables.output_weight())
    scores = hidden.double() @ vectors.double().T + bias.double()
    scores[:, TWINS] = scores[:, TWINS.start:TWINS.start + 1]
    scores[:, 0] = -torch.inf
    own = scores.gather(1, targets[:, None])
    expected = (scores >= own).sum(1) - 1
    assert (expected[:8] >= len(TWINS) - 1).all()      # the other 18 twins count against item 14
    for chunk_rows in (262_144, 5):
        together = tables.target_ranks(hidden, targets, chunk_rows, row_view=twin_view)
        alone = torch.cat([tables.target_ranks(hidden[i:i + 1], targets[i:i + 1], chunk_rows,
                                               row_view=twin_view) for i in range(16)])
        assert torch.equal(together, expected) and torch.equal(alone, expected), chunk_rows


def test_identical_rows_are_listed_by_item_id_in_any_batch_and_chunking():
    torch.manual_seed(0)
    tables = ItemTables(NUM_ITEMS, 7, 7)
    hidden = torch.randn(16, 7)
    hidden[:4] = torch.linspace(-1.3, 0.9, 7) * 3      # the twins' own direction: they lead
    reference = tables.topk(hidden, 25, row_view=twin_view)[1]
    for chunk_rows in (262_144, 5):
        alone = torch.cat([tables.topk(hidden[i:i + 1], 25, chunk_rows, row_view=twin_view)[1]
                           for i in range(16)])
        assert torch.equal(alone, reference), chunk_rows
    for row in reference[:4]:
        twins = row[row >= TWINS.start]
        assert len(twins) == len(TWINS) and torch.equal(twins, torch.arange(12, 31))


def test_a_twin_of_the_target_row_counts_against_it_on_plain_tables():
    """Without a row view too: a matmul over the catalog and the target's row-wise score round
    apart by an ulp in ~40% of float32 queries at this width, which an exact comparison missed."""
    torch.manual_seed(0)
    tables = ItemTables(2000, 128, 128)
    with torch.no_grad():
        tables.output.weight[1001] = tables.output.weight[1]
        tables.bias.weight[1001] = tables.bias.weight[1]
    hidden = torch.randn(512, 128)
    targets = torch.ones(512, dtype=torch.int64)
    weight, bias = tables.output_weight()
    scores = hidden.double() @ weight[1:].double().T + bias[1:].double()
    scores[:, 1000] = scores[:, 0]                                # the twin ties by construction
    expected = (scores >= scores[:, :1]).sum(1) - 1
    assert torch.equal(tables.target_ranks(hidden, targets), expected)
    assert torch.equal(tables.target_ranks(hidden, targets, chunk_rows=333), expected)


def test_target_log_likelihoods_are_the_full_softmax_over_items_in_any_chunking():
    """log p(target) over items 1..N (row 0, padding, takes no mass), through a row view too."""
    torch.manual_seed(0)
    tables = ItemTables(NUM_ITEMS, 7, 7)
    with torch.no_grad():
        tables.bias.weight.normal_()
    hidden = torch.randn(16, 7) * 3
    targets = torch.randint(1, NUM_ITEMS + 1, (16,))
    for view in (None, twin_view):
        vectors, bias = tables.output_weight()
        if view is not None:
            vectors, bias = view(torch.arange(NUM_ITEMS + 1), vectors, bias)
        scores = hidden.double() @ vectors.double().T + bias.double()
        expected = scores[:, 1:].log_softmax(1).gather(1, targets[:, None] - 1)[:, 0]
        for chunk_rows in (262_144, 7, 1):
            found = tables.target_log_likelihoods(hidden, targets, chunk_rows, row_view=view)
            assert found.dtype == torch.float64
            torch.testing.assert_close(found, expected, rtol=0, atol=1e-10)
