"""Checkpoints through a real S3 API (moto's server on 127.0.0.1): round trip, failed writes,
create-only commit, corruption, pruning, and credentials kept out of logs and manifests."""
from __future__ import annotations

import logging

import fsspec
import pytest
import torch

from dist_rec.checkpoint import (commit, gather_full_table, latest_checkpoint, list_checkpoints,
                                 load_checkpoint, prune, read_checkpoint_file, read_manifest,
                                 save_checkpoint, write_rank_files)
from dist_rec.config import JobConfig
from tests.s3_server import FAKE_KEY, FAKE_SECRET

pytestmark = pytest.mark.s3
RUN = "run"


def full_tables(seed: int = 0, num_rows: int = 13) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(num_rows, 4, generator=generator),
            "bias": torch.randn(num_rows, generator=generator),
            "optim_state_sum": torch.rand(num_rows, generator=generator, dtype=torch.float64)}


def write(storage, step, tables, world_size, dense=None, **kwargs) -> str:
    for rank in range(world_size):
        write_rank_files(storage, RUN, step, rank, world_size,
                         {name: value[rank::world_size] for name, value in tables.items()},
                         dense if rank == 0 else None)
    return commit(storage, RUN, step, world_size, **kwargs)


def objects(storage, path: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(path, **storage.storage_options())
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[1] for p in fs.find(root))


def test_round_trip_and_reshard(s3_storage, tmp_path):
    tables = full_tables()
    vocab = tmp_path / "vocab.tsv"
    vocab.write_bytes(b"17\t3\n42\t1\n")
    write_rank_files(s3_storage, RUN, 40, 0, 2, {k: v[0::2] for k, v in tables.items()},
                     {"position": {"epoch": 0, "step": 40}}, {"vocab.tsv": str(vocab)})
    write_rank_files(s3_storage, RUN, 40, 1, 2, {k: v[1::2] for k, v in tables.items()})
    path = commit(s3_storage, RUN, 40, 2, epoch=1, vocab_hash="v1")
    assert path == f"{s3_storage.uri}/{RUN}/checkpoints/step-000000040"
    assert path.startswith("s3://test-")
    assert objects(s3_storage, path) == ["dense.pt", "files-rank0-of-2.json", "files-rank1-of-2.json",
                                         "manifest.json", "tables-rank0-of-2.pt", "tables-rank1-of-2.pt",
                                         "vocab.tsv"]
    manifest = read_manifest(s3_storage, path)
    assert (manifest["step"], manifest["epoch"], manifest["world_size"], manifest["num_rows"]) == (40, 1, 2, 13)
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            loaded = load_checkpoint(s3_storage, path, rank, world_size)
            for name, value in tables.items():
                assert torch.equal(loaded.tables[name], value[rank::world_size])
            assert loaded.dense == {"position": {"epoch": 0, "step": 40}}
    assert all(torch.equal(gather_full_table(s3_storage, path)[k], v) for k, v in tables.items())
    assert read_checkpoint_file(s3_storage, path, "vocab.tsv") == vocab.read_bytes()
    assert list_checkpoints(s3_storage, RUN) == [path]
    assert latest_checkpoint(s3_storage, RUN) == path


def test_failed_write_publishes_nothing(s3_storage, monkeypatch):
    first = write(s3_storage, 1, full_tables(), 2)
    real_save = torch.save

    def crash_halfway(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a tensor file")
        raise RuntimeError("disk full / preempted while saving")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(RuntimeError, match="preempted"):
        write_rank_files(s3_storage, RUN, 2, 0, 2, {"input": torch.zeros(7, 4)})
    monkeypatch.setattr(torch, "save", real_save)
    step2 = f"{s3_storage.uri}/{RUN}/checkpoints/step-000000002"
    assert objects(s3_storage, step2) == []  # not even the partial object (s3fs open("wb") would publish it)

    # rank 0 wrote, rank 1 died: commit refuses, no manifest, the previous checkpoint stays latest
    write_rank_files(s3_storage, RUN, 3, 0, 2, {"input": torch.zeros(7, 4)})
    with pytest.raises(FileNotFoundError, match="rank 1 has not written its files"):
        commit(s3_storage, RUN, 3, 2)
    step3 = f"{s3_storage.uri}/{RUN}/checkpoints/step-000000003"
    assert objects(s3_storage, step3) == ["files-rank0-of-2.json", "tables-rank0-of-2.pt"]
    assert list_checkpoints(s3_storage, RUN) == [first]
    assert latest_checkpoint(s3_storage, RUN) == first
    # the stale incomplete step 3 is newer than the newest complete one: prune keeps it
    assert prune(s3_storage, RUN, keep_last=1) == []


def test_commit_is_create_only_and_corruption_is_skipped(s3_storage):
    first = write(s3_storage, 1, full_tables(seed=1), 2)
    second = write(s3_storage, 2, full_tables(seed=2), 2)
    with pytest.raises(FileExistsError):  # If-None-Match: * on the manifest
        commit(s3_storage, RUN, 2, 2)
    fs, root = fsspec.core.url_to_fs(second, **s3_storage.storage_options())
    shard = f"{root}/tables-rank0-of-2.pt"
    data = bytearray(fs.cat_file(shard))
    data[-40] ^= 0xFF
    fs.pipe_file(shard, bytes(data))  # same size: only the checksum can tell
    assert list_checkpoints(s3_storage, RUN) == [second, first]
    assert latest_checkpoint(s3_storage, RUN) == first
    with pytest.raises(ValueError, match="sha256 differs"):
        load_checkpoint(s3_storage, second, 0, 1)

    for step in (3, 4):
        write(s3_storage, step, full_tables(seed=step), 1)
    removed = prune(s3_storage, RUN, keep_last=2)
    assert removed == [second, first]
    assert [p.rsplit("-", 1)[1] for p in list_checkpoints(s3_storage, RUN)] == ["000000004", "000000003"]
    assert objects(s3_storage, second) == []


def test_credentials_never_logged_or_stored(s3_storage, caplog):
    caplog.set_level(logging.DEBUG)
    config = JobConfig(storage=s3_storage).to_dict()  # unredacted on purpose
    assert config["storage"]["secret"] == FAKE_SECRET
    path = save_checkpoint(s3_storage, RUN, 1, full_tables(), {"step": 1}, config=config)
    write_rank_files(s3_storage, RUN, 2, 0, 1, full_tables())  # left uncommitted: logs a skip
    assert latest_checkpoint(s3_storage, RUN) == path
    load_checkpoint(s3_storage, path)
    prune(s3_storage, RUN, keep_last=1)

    ours = [r for r in caplog.records if r.name.startswith("dist_rec")]
    assert any("committed checkpoint" in r.getMessage() for r in ours)
    assert any("skipping checkpoint" in r.getMessage() and "no manifest" in r.getMessage() for r in ours)
    for record in caplog.records:
        message = record.getMessage()
        assert FAKE_SECRET not in message  # at DEBUG, from every library
        # botocore's DEBUG request dumps show the key id in the Authorization header, as AWS does
        if record.name.startswith("dist_rec") or record.levelno >= logging.INFO:
            assert FAKE_KEY not in message
    fs, root = fsspec.core.url_to_fs(path, **s3_storage.storage_options())
    raw = fs.cat_file(f"{root}/manifest.json").decode()
    assert FAKE_KEY not in raw and FAKE_SECRET not in raw
    assert read_manifest(s3_storage, path)["config"]["storage"]["secret"] == "***"
    assert read_manifest(s3_storage, path)["config"]["storage"]["endpoint_url"] == s3_storage.endpoint_url
