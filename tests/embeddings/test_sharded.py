"""ShardedItemTables on 2 and 3 gloo ranks against single-process ItemTables.

One spawn per world size runs every scenario (`_worker`) and saves each rank's results; the tests
compare them with the unsharded model computed here from the same seeds and data.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from dist_rec.batch import SequenceBatch
from dist_rec.config import ModelConfig, SamplerConfig
from dist_rec.embeddings.optim import RowWiseAdagrad
from dist_rec.embeddings.sharded import ShardedItemTables
from dist_rec.embeddings.table import ItemTables
from dist_rec.losses import build_loss
from dist_rec.models import Dimensions, build_model
from dist_rec.train.step import Optimizers, train_step
from tests.distributed_helpers import run_ranks

NUM_ITEMS = 52                     # 53 rows: 27 + 26 on 2 ranks, 18 + 18 + 17 on 3
DIMS = Dimensions(num_items=NUM_ITEMS, num_users=10, num_delta_buckets=8, num_event_types=4)
ROWS_PER_RANK, STEPS_AHEAD, TRAIN_STEPS = 4, 6, 5
LOSSES = {"full": SamplerConfig(loss="full_softmax"),
          "sampled": SamplerConfig(loss="sampled_softmax", num_negatives=16),
          "sampled_tied": SamplerConfig(loss="sampled_softmax", num_negatives=16)}
POPULAR = [5, 5, 5, 1, 2, 3, 0, 0, 7, 7]   # every rank looks these up: 6 unique ids
K_LARGE = 30                              # more than any shard's rows
SHARDINGS = ("row", "none")               # "none": every rank holds the whole tables


# ---------------------------------------------------------------- data and models, both sides

def build(tied: bool):
    torch.manual_seed(0)
    config = ModelConfig(name="hrnn", embedding_dim=8, hidden_dim=8, delta_embedding_dim=4,
                         type_embedding_dim=2, tied_embeddings=tied)
    return build_model(config, DIMS)


def build_meta():
    """HRNN-meta scoring through eq. 2: item i in category i % 4 + 1; items 40+ are cold, and warm
    items mix their category row in at 0.3 at inference."""
    torch.manual_seed(0)
    config = ModelConfig(name="hrnn_meta", embedding_dim=8, hidden_dim=8, delta_embedding_dim=4,
                         type_embedding_dim=2, options={"feature_dim": 3, "eval_lambda": 0.3})
    model = build_model(config, Dimensions(**{**DIMS.__dict__, "item_feature_sizes": (4,)}))
    codes = torch.arange(NUM_ITEMS + 1).unsqueeze(1) % 4 + 1
    codes[0] = 0
    model.encoder.set_item_features(codes)
    model.encoder.set_cold_items(torch.arange(NUM_ITEMS + 1) >= 40)
    return model


def build_cold():
    """Plain HRNN, in eval mode, with items 40+ cold: their rows are left out of rankings."""
    model = build(tied=False)
    model.set_cold_items(torch.arange(NUM_ITEMS + 1) >= 40)
    return model.eval()


def meta_queries(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (4 + r, 8), targets (4 + r,), exclude (4 + r, 2): row 0 excludes a warm and a
    cold item."""
    generator = torch.Generator().manual_seed(70 + rank)
    exclude = torch.zeros(4 + rank, 2, dtype=torch.int64)
    exclude[0] = torch.tensor([7, 44])
    return (torch.randn(4 + rank, 8, generator=generator),
            torch.randint(1, NUM_ITEMS + 1, (4 + rank,), generator=generator), exclude)


def make_batch(world: int, step: int) -> SequenceBatch:
    """(4 W, 6) left-padded windows; every rank's block of 4 rows has 2+3+4+5 = 14 events, so the
    mean of the ranks' mean losses is the global mean."""
    generator = torch.Generator().manual_seed(100 + step)
    rows = ROWS_PER_RANK * world
    sequence = torch.randint(1, NUM_ITEMS + 1, (rows, STEPS_AHEAD + 1), generator=generator)
    sequence[:, ::2] = sequence[:, ::2] % 6 + 1          # popular items repeat across ranks
    padding = (torch.arange(rows) % ROWS_PER_RANK + 1).unsqueeze(1)     # 1..4 padded steps
    real = torch.arange(STEPS_AHEAD).unsqueeze(0) >= padding
    items, targets = sequence[:, :-1] * real, sequence[:, 1:] * real

    def random(high: int) -> torch.Tensor:
        return torch.randint(1, high, (rows, STEPS_AHEAD), generator=generator) * real

    return SequenceBatch(items=items, targets=targets, deltas=random(8),
                         session_starts=torch.rand(rows, STEPS_AHEAD, generator=generator) < 0.3,
                         event_types=random(5), target_types=random(5),
                         users=torch.randint(1, 10, (rows,), generator=generator))


def item_counts() -> np.ndarray:
    counts = np.random.default_rng(0).integers(1, 100, NUM_ITEMS + 1)
    counts[0] = 0
    return counts


def train(model, name: str, world: int, rank: int | None, replicated: bool = False):
    """TRAIN_STEPS steps of Adam + RowWiseAdagrad; rank None trains on whole batches;
    `replicated`: full tables on every rank, their gradients averaged by train_step."""
    loss_fn = build_loss(LOSSES[name], item_counts())
    optimizers = Optimizers(dense=torch.optim.Adam(model.dense_parameters(), lr=0.01),
                            sparse=RowWiseAdagrad(model.sparse_parameters(), lr=0.1))
    generator = torch.Generator().manual_seed(3)
    rows = slice(None) if rank is None else slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    return optimizers, [train_step(model, make_batch(world, step)[rows], loss_fn, optimizers, generator,
                                   replicated_tables=replicated)
                        for step in range(TRAIN_STEPS)]


def lookup_tables() -> ItemTables:
    torch.manual_seed(1)
    tables = ItemTables(NUM_ITEMS, 4, 3)
    with torch.no_grad():
        tables.bias.weight.normal_()
    return tables


def lookup_inputs(rank: int, world: int):
    """Ids (0 = padding included, repeats) and upstream gradients of rank `rank`; the last rank
    looks up nothing, which must not stall the others."""
    generator = torch.Generator().manual_seed(rank)
    shape = (0,) if rank == world - 1 else (3, 5)
    ids = torch.randint(0, NUM_ITEMS + 1, shape, generator=generator)
    ids.view(-1)[:1] = 0
    return (ids, torch.randn(*shape, 4, generator=generator), torch.randn(*shape, 3, generator=generator),
            torch.randn(*shape, generator=generator), torch.randn(NUM_ITEMS + 1, 3, generator=generator))


def lookup_loss(tables, ids, upstream_input, upstream_output, upstream_bias, upstream_weight):
    vectors, bias = tables.output_rows(ids)
    weight, _ = tables.output_weight()
    return ((tables.embed(ids) * upstream_input).sum() + (vectors * upstream_output).sum()
            + (bias * upstream_bias).sum() + (weight * upstream_weight).sum())


def queries(rank: int):
    """Rank r asks 5 + r queries with 4 + r exclusion slots; rows 0 and 2 exclude items."""
    generator = torch.Generator().manual_seed(50 + rank)
    hidden = torch.randn(5 + rank, 3, generator=generator)
    exclude = torch.zeros(5 + rank, 4 + rank, dtype=torch.int64)
    exclude[0, :4] = torch.tensor([1, 2, 3, 4])
    exclude[2, :2] = torch.tensor([52, 10])
    exclude[2, -1] = 11                      # in the column only this rank has
    return hidden, exclude, torch.randint(1, NUM_ITEMS + 1, (5 + rank,), generator=generator)


# ------------------------------------------------------------------------- the ranks' side

def _worker(rank: int, world: int, directory: str) -> None:
    results = {"training": {}}
    for name, sharding in [(name, sharding) for name in LOSSES for sharding in SHARDINGS]:
        model = build(tied=name.endswith("tied"))
        if sharding == "row":
            model.tables = ShardedItemTables.from_full(model.tables)
        model.encoder = DistributedDataParallel(model.encoder)
        optimizers, losses = train(model, name, world, rank, replicated=sharding == "none")
        results["training"][f"{name}-{sharding}"] = {
            "losses": losses,
            "encoder": model.encoder.module.state_dict(),
            "tables": {n: p.detach().clone() for n, p in model.tables.named_parameters()},
            "accumulators": {n: optimizers.sparse.state[p]["sum"].clone()
                             for n, p in model.tables.named_parameters()}}

    results["meta"] = {}
    for name in ("full", "sampled"):
        model = build_meta()
        model.tables = ShardedItemTables.from_full(model.tables)
        model.encoder = DistributedDataParallel(model.encoder)
        _, losses = train(model, name, world, rank)
        model.eval()
        hidden, targets, exclude = meta_queries(rank)
        results["meta"][name] = {
            "losses": losses, "encoder": model.encoder.module.state_dict(),
            "topk": model.scorer.topk(hidden, 10, chunk_rows=7, exclude=exclude),
            "ranks": model.scorer.target_ranks(hidden, targets, chunk_rows=7),
            "ranks_excluding": model.scorer.target_ranks(hidden, targets, chunk_rows=7,
                                                         exclude=exclude),
            "log_likelihoods": model.scorer.target_log_likelihoods(hidden, targets, chunk_rows=7)}

    model = build_cold()
    model.tables = ShardedItemTables.from_full(model.tables)
    hidden, targets, _ = meta_queries(rank)
    results["cold"] = {"topk": model.scorer.topk(hidden, K_LARGE, chunk_rows=7),
                       "ranks": model.scorer.target_ranks(hidden, targets, chunk_rows=7)}

    tables = ShardedItemTables.from_full(lookup_tables())
    loss = lookup_loss(tables, *lookup_inputs(rank, world))
    loss.backward()
    results["gradients"] = {n: p.grad.to_dense() for n, p in tables.named_parameters()}
    results["gathered"] = tables.gather_rows()
    before = tables.bytes_sent
    vectors = tables.embed(torch.tensor(POPULAR))
    vectors.sum().backward()
    results["bytes"] = tables.bytes_sent - before

    hidden, exclude, targets = queries(rank)
    results["topk"] = {k: tables.topk(hidden, k, chunk_rows=7, exclude=exclude) for k in (5, K_LARGE)}
    results["topk_no_exclude"] = tables.topk(hidden, K_LARGE, chunk_rows=7)
    results["ranks"] = tables.target_ranks(hidden, targets, chunk_rows=7)
    results["ranks_excluding"] = tables.target_ranks(hidden, targets, chunk_rows=7, exclude=exclude)
    results["log_likelihoods"] = tables.target_log_likelihoods(hidden, targets, chunk_rows=7)
    with torch.no_grad():  # score of item i = i % 3: a third of the catalog ties at each level
        tables.output.weight.zero_()
        tables.bias.weight.copy_(torch.tensor([[i % 3.0] for i in range(rank, NUM_ITEMS + 1, world)]))
    mine = hidden if rank else hidden[:0]                  # rank 0 asks nothing
    results["tied_topk"] = {k: tables.topk(mine, k, chunk_rows=7, exclude=exclude[: len(mine)])[1]
                            for k in (3, 10, K_LARGE)}
    results["tied_ranks"] = tables.target_ranks(mine, targets[: len(mine)], chunk_rows=7)
    torch.save(results, f"{directory}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """[results of rank r] after running `_worker` on W gloo processes."""
    world = request.param
    directory = tmp_path_factory.mktemp(f"world{world}")
    run_ranks(_worker, world, str(directory))
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(world)]


# --------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_training_equals_one_process(ranks, name, sharding):
    """W ranks, row-sharded tables or whole tables on every rank, train the model one process
    trains on the whole batches (full softmax gives the output table a dense gradient)."""
    world = len(ranks)
    model = build(tied=name.endswith("tied"))
    optimizers, losses = train(model, name, world, None)
    shards = [result["training"][f"{name}-{sharding}"] for result in ranks]
    rows = (lambda rank: slice(rank, None, world)) if sharding == "row" else (lambda rank: slice(None))
    # Each rank's loss is its own mean; with equal events per rank their mean is the global one.
    torch.testing.assert_close(torch.tensor([s["losses"] for s in shards]).mean(0), torch.tensor(losses),
                               rtol=1e-5, atol=1e-6)
    for shard in shards:
        torch.testing.assert_close(shard["encoder"], model.encoder.state_dict(), rtol=1e-5, atol=1e-6)
    for parameter_name, parameter in model.tables.named_parameters():
        for rank, shard in enumerate(shards):   # sharded: rank r holds global rows r, r + W, ...
            torch.testing.assert_close(shard["tables"][parameter_name], parameter.detach()[rows(rank)],
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(shard["accumulators"][parameter_name],
                                       optimizers.sparse.state[parameter]["sum"][rows(rank)],
                                       rtol=1e-5, atol=1e-8)
    assert not torch.equal(model.tables.input.weight, build(name.endswith("tied")).tables.input.weight)
    assert torch.equal(model.tables.input.weight[0], torch.zeros(8))     # padding never moves


@pytest.mark.parametrize("name", ["full", "sampled"])
def test_hrnn_meta_trains_and_ranks_as_unsharded(ranks, name):
    """Eq. 2's mixed rows on sharded tables: training sees the same losses and gradients, and the
    full-catalog ranking (each shard mixing its own rows, cold items at lambda 1) the same lists."""
    world = len(ranks)
    model = build_meta()
    _, losses = train(model, name, world, None)
    model.eval()
    shards = [result["meta"][name] for result in ranks]
    torch.testing.assert_close(torch.tensor([s["losses"] for s in shards]).mean(0), torch.tensor(losses),
                               rtol=1e-5, atol=1e-6)
    cold_listed = False
    for rank, shard in enumerate(shards):
        torch.testing.assert_close(shard["encoder"], model.encoder.state_dict(), rtol=1e-5, atol=1e-6)
        hidden, targets, exclude = meta_queries(rank)
        scores, items = model.scorer.topk(hidden, 10, exclude=exclude)
        assert torch.equal(shard["topk"][1], items)
        torch.testing.assert_close(shard["topk"][0], scores, rtol=1e-5, atol=1e-5)
        assert not set(items[0].tolist()) & {7, 44}
        assert torch.equal(shard["ranks"], model.scorer.target_ranks(hidden, targets))
        assert torch.equal(shard["ranks_excluding"],
                           model.scorer.target_ranks(hidden, targets, exclude=exclude))
        torch.testing.assert_close(shard["log_likelihoods"],
                                   model.scorer.target_log_likelihoods(hidden, targets),
                                   rtol=0, atol=1e-5)
        cold_listed |= bool((items >= 40).any())
    assert cold_listed                              # cold items, scored by their category, rank
    assert not torch.equal(model.encoder.feature_rows.weight, build_meta().encoder.feature_rows.weight)


def test_cold_items_are_left_out_of_sharded_rankings_as_of_unsharded(ranks):
    model = build_cold()
    for rank, result in enumerate(ranks):
        hidden, targets, _ = meta_queries(rank)
        scores, items = model.scorer.topk(hidden, K_LARGE)
        assert torch.equal(result["cold"]["topk"][1], items) and not (items >= 40).any()
        torch.testing.assert_close(result["cold"]["topk"][0], scores)
        ranks_ = model.scorer.target_ranks(hidden, targets)
        assert torch.equal(result["cold"]["ranks"], ranks_)
        assert (ranks_[targets >= 40] == NUM_ITEMS - 1).all()     # behind every item


def test_lookup_gradients_are_the_average_over_ranks(ranks):
    world = len(ranks)
    tables = lookup_tables()
    # The data-parallel gradient: the mean over ranks of each rank's gradient.
    for rank in range(world):
        lookup_loss(tables, *lookup_inputs(rank, world)).backward()
    for name, parameter in tables.named_parameters():
        expected = parameter.grad.to_dense() / world
        for rank, result in enumerate(ranks):
            torch.testing.assert_close(result["gradients"][name], expected[rank::world],
                                       rtol=1e-5, atol=1e-6)
    assert torch.equal(ranks[0]["gradients"]["input.weight"][0], torch.zeros(4))  # padding row
    for result in ranks:
        for name, full in result["gathered"].items():
            assert torch.equal(full, getattr(tables, name).weight)


def test_bytes_sent_counts_each_unique_id_once(ranks):
    # Every rank looks up POPULAR = 6 unique ids {0,1,2,3,5,7} (E = 4: 16-byte rows, 8-byte ids):
    # 8 bytes of counts per peer, 8 per id owned elsewhere, 16 per row a peer asks of this rank,
    # and in the backward 16 per row's gradient returned to its owner elsewhere.
    # W=2: rank 0 owns {0,2}: 8 + 4*8 + 2*16 + 4*16 = 136; rank 1 owns {1,3,5,7}: 8 + 16 + 64 + 32.
    # W=3: each owns two: 2*8 + 4*8 + 2*2*16 + 4*16 = 176.
    expected = {2: [136, 120], 3: [176, 176, 176]}[len(ranks)]
    assert [result["bytes"] for result in ranks] == expected


def test_topk_target_ranks_and_log_likelihoods_equal_unsharded(ranks):
    tables = lookup_tables()
    for rank, result in enumerate(ranks):
        hidden, exclude, targets = queries(rank)
        for k, (scores, items) in result["topk"].items():
            expected_scores, expected_items = tables.topk(hidden, k, exclude=exclude)
            assert torch.equal(items, expected_items)
            torch.testing.assert_close(scores, expected_scores)
        expected_scores, expected_items = tables.topk(hidden, K_LARGE)
        assert torch.equal(result["topk_no_exclude"][1], expected_items)
        torch.testing.assert_close(result["topk_no_exclude"][0], expected_scores)
        assert not set(result["topk"][K_LARGE][1][0].tolist()) & {1, 2, 3, 4}
        assert torch.equal(result["ranks"], tables.target_ranks(hidden, targets))
        assert torch.equal(result["ranks_excluding"],
                           tables.target_ranks(hidden, targets, exclude=exclude))
        torch.testing.assert_close(result["log_likelihoods"],
                                   tables.target_log_likelihoods(hidden, targets),
                                   rtol=0, atol=1e-10)
    assert any(not torch.equal(result["ranks_excluding"], result["ranks"]) for result in ranks)


def test_equal_scores_rank_by_item_id(ranks):
    # Scores i % 3: items 2, 5, 8, ... first, then 1, 4, 7, ..., each level by increasing id, also
    # where a chunk of 7 rows or a shard must cut a level (torch.topk alone keeps any of the tied).
    assert ranks[0]["tied_topk"][K_LARGE].shape == (0, K_LARGE) and ranks[0]["tied_ranks"].numel() == 0
    catalog = sorted(range(1, NUM_ITEMS + 1), key=lambda i: (-(i % 3), i))
    for rank, result in enumerate(ranks[1:], start=1):
        _, exclude, targets = queries(rank)
        for k, items in result["tied_topk"].items():
            for row, row_items in zip(exclude, items):
                assert row_items.tolist() == [i for i in catalog if i not in row.tolist()][:k]
        # Ties count against the target: every other item of its level or above.
        expected = [sum(i % 3 >= t % 3 for i in range(1, NUM_ITEMS + 1)) - 1 for t in targets.tolist()]
        assert result["tied_ranks"].tolist() == expected


def test_one_process_bad_input_is_named_and_init_is_seeded():
    tables = ShardedItemTables(NUM_ITEMS, 4, 3, seed=5)   # no process group: one rank, every row
    with pytest.raises(ValueError, match=r"item ids must be in \[0, 52\], got min 0 max 53"):
        tables.output_rows(torch.tensor([[0, 53]]))
    with pytest.raises(ValueError, match=r"table 'output' of rank 0 needs shape \(53, 3\), got \(52, 3\)"):
        tables.load_rows({"input": torch.zeros(53, 4), "output": torch.zeros(52, 3),
                          "bias": torch.zeros(53, 1)})
    again, other = ShardedItemTables(NUM_ITEMS, 4, 3, seed=5), ShardedItemTables(NUM_ITEMS, 4, 3, seed=6)
    assert torch.equal(tables.output.weight, again.output.weight)
    assert not torch.equal(tables.output.weight, other.output.weight)
    assert torch.equal(tables.input.weight[0], torch.zeros(4)) and not tables.input.weight[1:].eq(0).any()
    assert torch.equal(tables.bias.weight, torch.zeros(53, 1))
