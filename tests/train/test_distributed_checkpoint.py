"""Distributed checkpoints on a real S3 API (moto on 127.0.0.1), with sharded item tables.

2 gloo ranks train HRNN (DDP encoder, row-sharded tables, Adam + RowWiseAdagrad, sampled softmax):
run "straight" takes 6 steps and checkpoints; run "stopped" takes 3, checkpoints and its processes
exit; new processes restore it from S3 and take the other 3. The resumed run must end bit for bit
where the straight one did. The straight run's checkpoint is then loaded on 1 process (unsharded
tables) and on 3 ranks: top-k and target ranks must be those the 2 ranks computed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_rec import checkpoint
from dist_rec.batch import SequenceBatch
from dist_rec.checkpoint import store
from dist_rec.config import JobConfig, ModelConfig, SamplerConfig, StorageConfig
from dist_rec.embeddings.optim import RowWiseAdagrad
from dist_rec.losses import build_loss
from dist_rec.models import Dimensions, build_model
from dist_rec.train import state
from dist_rec.train.step import Optimizers, train_step
from tests.checkpoint.test_checkpoint import flip_byte
from tests.distributed_helpers import run_ranks

NUM_ITEMS = 500
DIMS = Dimensions(num_items=NUM_ITEMS, num_users=40, num_delta_buckets=8, num_event_types=4)
MODEL = ModelConfig(name="hrnn", embedding_dim=16, hidden_dim=16, delta_embedding_dim=4,
                    type_embedding_dim=4)
SAMPLER = SamplerConfig(loss="sampled_softmax", num_negatives=64)
ROWS_PER_RANK, WINDOW = 8, 10
TOTAL_STEPS, STOP_AT = 6, 3
SEED, OTHER_SEED = 7, 99          # a resumed or loaded run starts from other weights: all must be restored
VOCAB = "vocab-of-500-items"
K = 25


def job(storage: StorageConfig, run: str) -> JobConfig:
    return JobConfig(model=MODEL, sampler=SAMPLER, storage=storage, run_name=run)


def make_batch(step: int, rows: int = 2 * ROWS_PER_RANK) -> SequenceBatch:
    """(rows, WINDOW) left-padded windows, the same for a given step in every process."""
    generator = torch.Generator().manual_seed(1000 + step)
    sequence = torch.randint(1, NUM_ITEMS + 1, (rows, WINDOW + 1), generator=generator)
    sequence[:, ::3] = sequence[:, ::3] % 20 + 1                       # popular items, on both shards
    padding = torch.randint(0, WINDOW - 1, (rows, 1), generator=generator)
    real = torch.arange(WINDOW).unsqueeze(0) >= padding

    def codes(high: int) -> torch.Tensor:
        return torch.randint(1, high, (rows, WINDOW), generator=generator) * real

    return SequenceBatch(items=sequence[:, :-1] * real, targets=sequence[:, 1:] * real, deltas=codes(8),
                         session_starts=(torch.rand(rows, WINDOW, generator=generator) < 0.2) & real,
                         event_types=codes(5), target_types=codes(5),
                         users=torch.randint(1, DIMS.num_users + 1, (rows,), generator=generator))


def item_counts(seed: int) -> np.ndarray:
    """(N+1,) Zipf-like counts for the sampler; row 0 = padding."""
    counts = np.random.default_rng(seed).zipf(1.5, NUM_ITEMS + 1).clip(max=1000)
    counts[0] = 0
    return counts


def parts(seed: int, sharding: str):
    torch.manual_seed(seed)                        # the encoder's initial weights
    model = build_model(MODEL, DIMS, sharding, seed)
    optimizers = Optimizers(dense=torch.optim.Adam(model.dense_parameters(), lr=0.01),
                            sparse=RowWiseAdagrad(model.sparse_parameters(), lr=0.1))
    return model, build_loss(SAMPLER, item_counts(seed)), optimizers, torch.Generator().manual_seed(seed)


def scores(model, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Fixed hidden vectors and the encoder's last state on a fixed batch, scored over the catalog.

    Every rank encodes the whole batch (sharded lookups are collectives) and asks top-k and target
    ranks for its block of the queries; the test concatenates the blocks in rank order.
    """
    batch = make_batch(100)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        hidden = model.hidden(batch)[:, -1]                              # (16, D): left-padded
    queries = torch.cat([torch.randn(12, MODEL.hidden_dim, generator=generator), hidden])
    targets = torch.cat([torch.randint(1, NUM_ITEMS + 1, (12,), generator=generator),
                         batch.targets[:, -1]])
    block = np.array_split(np.arange(len(queries)), world)[rank]
    block = slice(int(block[0]), int(block[-1]) + 1)
    top_scores, top_items = model.tables.topk(queries[block], K)
    return {"hidden": hidden, "top_scores": top_scores, "top_items": top_items,
            "ranks": model.tables.target_ranks(queries[block], targets[block])}


# ------------------------------------------------------------------------- the ranks' side

def _worker(rank: int, world: int, storage: StorageConfig, directory: str, stages: tuple[str, ...]):
    for stage in stages:
        result = {"train": _train, "load": _load}[stage.split("-")[0]](rank, world, storage, stage)
        torch.save(result, f"{directory}/{stage}-rank{rank}.pt")


def _train(rank: int, world: int, storage: StorageConfig, stage: str) -> dict:
    """train-straight: steps 0..5 then checkpoint; train-stopped: 0..2 then checkpoint;
    train-resumed: restore the newest "stopped" checkpoint from S3 as train/loop.py does
    (state.restore_newest, sampler counts included), then steps 3..5."""
    resumed = stage == "train-resumed"
    model, loss_fn, optimizers, generator = parts(OTHER_SEED if resumed else SEED, "row")
    encoder, first, last = model.encoder, 0, TOTAL_STEPS
    result = {}
    if resumed:
        path, result["restored"] = state.restore_newest(job(storage, "stopped"), encoder,
                                                        model.tables, optimizers, generator, VOCAB,
                                                        world)
        assert path == checkpoint.checkpoint_path(storage, "stopped", STOP_AT)
        loss_fn.update_counts(result["restored"]["item_counts"].numpy())
        first = result["restored"]["step"]
    elif stage == "train-stopped":
        last = STOP_AT
    model.encoder = DistributedDataParallel(encoder)
    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    result["losses"] = [train_step(model, make_batch(step)[mine], loss_fn, optimizers, generator)
                        for step in range(first, last)]
    if not resumed:
        run = stage.removeprefix("train-")
        state.save(job(storage, run), last, 0, encoder, model.tables, optimizers, generator,
                   rank, world, VOCAB, dist.barrier, item_counts(SEED))
    result.update(_state(model.tables, encoder, optimizers))
    if stage == "train-straight":
        result["scores"] = scores(model, rank, world)
    return result


def _load(rank: int, world: int, storage: StorageConfig, stage: str) -> dict:
    """Restore the straight run's checkpoint on `world` ranks and score."""
    model, _, optimizers, generator = parts(OTHER_SEED, "row")
    state.restore(job(storage, "straight"), checkpoint.latest_checkpoint(storage, "straight"),
                  model.encoder, model.tables, optimizers, generator, VOCAB)
    return {**_state(model.tables, model.encoder, optimizers), "scores": scores(model, rank, world)}


def _state(tables, encoder, optimizers: Optimizers) -> dict:
    """Tables in global row order (collective), this rank's accumulators, the dense state."""
    return {"tables": tables.gather_rows(),
            "accumulators": {name.removesuffix(".weight"): optimizers.sparse.state[p]["sum"].clone()
                             for name, p in tables.named_parameters()},
            "encoder": encoder.state_dict(), "adam": optimizers.dense.state_dict()}


def _restore_past_a_corrupt_shard(rank: int, world: int, directory: str) -> None:
    """Commit step 1 (weights of SEED) and step 2 (OTHER_SEED), flip a byte of step 2's rank-1
    shard, then restore into a third model, counting the sha256 reads of each file per rank."""
    storage = StorageConfig(uri=f"{directory}/runs")
    config = job(storage, "corrupt")
    for step, seed in ((1, SEED), (2, OTHER_SEED)):
        model, _, optimizers, generator = parts(seed, "row")
        state.save(config, step, 0, model.encoder, model.tables, optimizers, generator, rank,
                   world, VOCAB, dist.barrier)
        if step == 1:
            saved = _state(model.tables, model.encoder, optimizers)
    if rank == 0:
        flip_byte(f"{checkpoint.checkpoint_path(storage, 'corrupt', 2)}/tables-rank1-of-2.pt")
    dist.barrier()
    reads: dict[str, int] = {}
    file_record = store.file_record

    def counted(path: str) -> dict:
        reads[path] = reads.get(path, 0) + 1
        return file_record(path)

    store.file_record = counted
    model, _, optimizers, generator = parts(SEED + OTHER_SEED, "row")
    path, position = state.restore_newest(config, model.encoder, model.tables, optimizers,
                                          generator, VOCAB, world)
    store.file_record = file_record
    torch.save({"path": path, "position": position, "reads": reads, "saved": saved,
                **_state(model.tables, model.encoder, optimizers)},
               f"{directory}/corrupt-rank{rank}.pt")


# --------------------------------------------------------------------------------- the tests

def _results(directory, stage: str, world: int) -> list[dict]:
    return [torch.load(directory / f"{stage}-rank{r}.pt", weights_only=True) for r in range(world)]


def _global_accumulators(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """Each rank's local accumulator rows -> (N+1,) in global row order (row i from rank i % W)."""
    world, out = len(ranks), {}
    for name in ranks[0]["accumulators"]:
        out[name] = torch.empty(NUM_ITEMS + 1)
        for rank, result in enumerate(ranks):
            out[name][rank::world] = result["accumulators"][name]
    return out


def _concat_scores(ranks: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([r["scores"][key] for r in ranks]) for key in ("top_scores", "top_items", "ranks")}


def exact(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(storage, directory of results): both training runs done, on a fresh moto bucket."""
    # Imported here, not at the top: the ranks import this module, and moto costs them ~1 s each.
    from tests.s3_server import make_bucket

    storage = make_bucket()                    # StorageConfig carries the endpoint and fake keys
    directory = tmp_path_factory.mktemp("runs")
    run_ranks(_worker, 2, storage, str(directory), ("train-straight", "train-stopped"))
    run_ranks(_worker, 2, storage, str(directory), ("train-resumed",))   # new processes
    return storage, directory


def test_resume_from_s3_equals_uninterrupted_run(runs):
    storage, directory = runs
    straight, stopped, resumed = (_results(directory, f"train-{s}", 2)
                                  for s in ("straight", "stopped", "resumed"))
    path = checkpoint.latest_checkpoint(storage, "stopped")
    assert path == checkpoint.checkpoint_path(storage, "stopped", STOP_AT) and path.startswith("s3://")
    manifest = checkpoint.read_manifest(storage, path)
    assert manifest["world_size"] == 2 and manifest["vocab_hash"] == VOCAB
    assert {"dense.pt", "tables-rank0-of-2.pt", "tables-rank1-of-2.pt"} <= set(manifest["files"])

    # Same ranks, same thread count, same reduction order: resuming changes no bit.
    for rank in range(2):
        restored = resumed[rank]["restored"]
        assert (restored["step"], restored["epoch"]) == (STOP_AT, 0)
        assert torch.equal(restored["item_counts"], torch.as_tensor(item_counts(SEED)))
        assert stopped[rank]["losses"] + resumed[rank]["losses"] == straight[rank]["losses"]
        exact(resumed[rank]["encoder"], straight[rank]["encoder"])
        exact(resumed[rank]["adam"], straight[rank]["adam"])
    exact(resumed[0]["tables"], straight[0]["tables"])
    exact(resumed[1]["tables"], straight[0]["tables"])        # gathered: every rank has every row
    exact(_global_accumulators(resumed), _global_accumulators(straight))
    # The comparison has teeth: the last 3 steps moved the tables and the accumulators.
    assert not torch.equal(stopped[0]["tables"]["output"], straight[0]["tables"]["output"])
    assert not torch.equal(_global_accumulators(stopped)["bias"], _global_accumulators(straight)["bias"])
    assert len(set(straight[0]["losses"])) == TOTAL_STEPS


def test_two_worker_checkpoint_scores_the_same_on_one_and_three_workers(runs):
    storage, directory = runs
    original = _results(directory, "train-straight", 2)
    run_ranks(_worker, 3, storage, str(directory), ("load",))
    three = _results(directory, "load", 3)

    model, _, optimizers, generator = parts(OTHER_SEED, "none")        # unsharded ItemTables
    state.restore(job(storage, "straight"), checkpoint.latest_checkpoint(storage, "straight"),
                  model.encoder, model.tables, optimizers, generator, VOCAB)
    one = scores(model, 0, 1)
    tables = {name.removesuffix(".weight"): p.detach() for name, p in model.tables.named_parameters()}

    expected_tables, expected = original[0]["tables"], _concat_scores(original)
    exact(tables, expected_tables)
    exact({n.removesuffix(".weight"): optimizers.sparse.state[p]["sum"]
           for n, p in model.tables.named_parameters()}, _global_accumulators(original))
    exact(model.encoder.state_dict(), original[0]["encoder"])
    for rank in range(3):
        exact(three[rank]["tables"], expected_tables)
        exact(three[rank]["encoder"], original[0]["encoder"])
    exact(_global_accumulators(three), _global_accumulators(original))

    # The same tables and encoder, bit for bit (above); the scores only up to float rounding: a
    # shard's matmul has other columns, and the ranks' GRU another thread count, than one process.
    for got in (one, _concat_scores(three)):
        assert torch.equal(got["top_items"], expected["top_items"])
        assert torch.equal(got["ranks"], expected["ranks"])
        torch.testing.assert_close(got["top_scores"], expected["top_scores"])
    for hidden in (one["hidden"], *(result["scores"]["hidden"] for result in three)):
        torch.testing.assert_close(hidden, original[0]["scores"]["hidden"])
    # Not a degenerate comparison: many distinct items and ranks.
    assert expected["top_items"].unique().numel() > 100 and expected["ranks"].unique().numel() > 10


def test_ranks_resume_past_a_corrupt_shard_reading_each_file_once(tmp_path):
    """Step 2's rank-1 shard fails its checksum when rank 1 reads it: both ranks fall back to
    step 1 together and hold exactly its state, and no rank reads a file twice or one it does not
    need (verifying the checkpoint on rank 0 before loading read every file of it twice)."""
    run_ranks(_restore_past_a_corrupt_shard, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"corrupt-rank{r}.pt", weights_only=True) for r in range(2)]
    storage = StorageConfig(uri=f"{tmp_path}/runs")
    first, second = (checkpoint.checkpoint_path(storage, "corrupt", step) for step in (1, 2))
    for rank, result in enumerate(ranks):
        assert result["path"] == first and result["position"]["step"] == 1
        exact(result["tables"], ranks[0]["saved"]["tables"])
        exact(result["encoder"], ranks[0]["saved"]["encoder"])
        exact(result["adam"], ranks[0]["saved"]["adam"])
        exact(result["accumulators"], result["saved"]["accumulators"])
        # Its own shard and the dense state of each checkpoint it tried, once each; rank 1
        # stopped reading step 2 at its corrupt shard.
        tried = [f"{first}/tables-rank{rank}-of-2.pt", f"{first}/dense.pt",
                 f"{second}/tables-rank{rank}-of-2.pt"] + [f"{second}/dense.pt"] * (rank == 0)
        assert result["reads"] == dict.fromkeys(tried, 1)
