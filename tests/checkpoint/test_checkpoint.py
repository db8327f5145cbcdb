"""Checkpoints on local disk: round trip, resharding N -> M, manifest, corruption, pruning, weights_only."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re

import pytest
import torch

from dist_rec.checkpoint import (FORMAT_VERSION, UnsupportedFormat, check_checkpoint, commit,
                                 discard_newer, gather_full_table, latest_checkpoint,
                                 list_checkpoints, load_checkpoint, prune, read_checkpoint_file,
                                 read_manifest, save_checkpoint, write_rank_files)
from dist_rec.checkpoint import store
from dist_rec.checkpoint.reshard import contributing_ranks, reshard
from dist_rec.config import JobConfig, StorageConfig

RUN = "run"
NUM_ROWS = 11  # 10 items + padding row 0


def full_tables(num_rows: int = NUM_ROWS, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input": torch.randn(num_rows, 4, generator=generator),
        "output": torch.randn(num_rows, 3, generator=generator),
        "bias": torch.randn(num_rows, generator=generator),
        "optim_state_sum": torch.rand(num_rows, generator=generator, dtype=torch.float64),
        "counts": torch.arange(num_rows, dtype=torch.int64) * 7,
    }


def write(storage: StorageConfig, step: int, tables: dict[str, torch.Tensor], world_size: int,
          dense: dict | None = None, do_commit: bool = True, **extra) -> str:
    """What `world_size` ranks do: each writes its modulo rows; rank 0 commits after them."""
    for rank in range(world_size):
        shard = {name: value[rank::world_size] for name, value in tables.items()}
        write_rank_files(storage, RUN, step, rank, world_size, shard,
                         dense if rank == 0 else None, extra.pop("extra_files", None) if rank == 0 else None)
    return commit(storage, RUN, step, world_size, **extra) if do_commit else ""


@pytest.fixture
def storage(tmp_path) -> StorageConfig:
    return StorageConfig(uri=str(tmp_path / "store"))


def step_of(path: str) -> int:
    return int(path.rstrip("/").rsplit("step-", 1)[1])


@pytest.mark.parametrize("source_world", [1, 2, 3, 4])
def test_reshard_round_trip_every_world_size(storage, source_world):
    tables = full_tables()
    path = write(storage, 5, tables, source_world)
    for world_size in (1, 2, 3, 5):
        union = {name: torch.full_like(value, -1) for name, value in tables.items()}
        for rank in range(world_size):
            loaded = load_checkpoint(storage, path, rank, world_size)
            assert sorted(loaded.tables) == sorted(tables)
            for name, value in tables.items():
                # exactly the modulo rows, in order, bit for bit, same dtype
                assert torch.equal(loaded.tables[name], value[rank::world_size])
                union[name][rank::world_size] = loaded.tables[name]
        for name, value in tables.items():
            assert torch.equal(union[name], value)
    full = gather_full_table(storage, path)
    assert all(torch.equal(full[name], value) for name, value in tables.items())


def test_reshard_math_against_brute_force():
    for num_rows in (0, 1, 2, 7, 12, 13, 30):
        full = torch.arange(num_rows * 2, dtype=torch.float32).view(num_rows, 2)
        for source_world in range(1, 7):
            shards = {r: {"x": full[r::source_world]} for r in range(source_world)}
            for world_size in range(1, 8):
                for rank in range(world_size):
                    ranks = contributing_ranks(num_rows, source_world, rank, world_size)
                    assert ranks == sorted({i % source_world for i in range(rank, num_rows, world_size)})
                    out = reshard(num_rows, source_world, {"x": {"shape": [2], "dtype": "float32"}},
                                  rank, world_size, ((r, shards[r]) for r in ranks))
                    assert torch.equal(out["x"], full[rank::world_size])


def test_manifest_fields_and_checksums(storage, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(b"raw_id\tcount\n17\t3\n42\t1\n")
    config = JobConfig(storage=StorageConfig(uri=storage.uri, key="AKIA-SECRET-KEY",
                                             secret="very-secret")).to_dict()
    path = write(storage, 123, full_tables(), 2, dense={"step": 123}, epoch=4, vocab_hash="abc123",
                 config=config, extra_files={"vocab.txt": str(vocab)})
    assert path == os.path.join(storage.uri, RUN, "checkpoints", "step-000000123")
    manifest = read_manifest(storage, path)
    assert manifest["format_version"] == 1
    assert (manifest["step"], manifest["epoch"], manifest["world_size"]) == (123, 4, 2)
    assert (manifest["num_rows"], manifest["num_items"], manifest["vocab_hash"]) == (11, 10, "abc123")
    assert manifest["layout"]["kind"] == "row_modulo"
    assert manifest["tables"]["input"] == {"shape": [4], "dtype": "float32"}
    assert manifest["tables"]["bias"] == {"shape": [], "dtype": "float32"}
    assert manifest["tables"]["optim_state_sum"] == {"shape": [], "dtype": "float64"}
    assert set(manifest["files"]) == {"tables-rank0-of-2.pt", "tables-rank1-of-2.pt", "dense.pt", "vocab.txt"}
    for name, record in manifest["files"].items():
        data = open(os.path.join(path, name), "rb").read()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    created = datetime.datetime.strptime(manifest["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs((datetime.datetime.utcnow() - created).total_seconds()) < 60
    assert manifest["config"]["train"]["seed"] == 0
    assert manifest["config"]["storage"]["key"] == manifest["config"]["storage"]["secret"] == "***"
    raw = open(os.path.join(path, "manifest.json")).read()
    assert "very-secret" not in raw and "AKIA-SECRET-KEY" not in raw
    assert read_checkpoint_file(storage, path, "vocab.txt") == vocab.read_bytes()
    # rank 0 holds rows 0,2,...,10 (6 rows), rank 1 rows 1,...,9 (5 rows)
    assert [json.load(open(os.path.join(path, f"files-rank{r}-of-2.json")))["rows"] for r in (0, 1)] == [6, 5]


def test_published_files_get_the_umask_mode_not_mkstemp_s_0600(storage, monkeypatch):
    """A serving process of another user reads the checkpoint as it reads any file written here
    (the mode 0666 less the umask read at import; 0640 stands in for it)."""
    monkeypatch.setattr(store, "_FILE_MODE", 0o640)
    path = save_checkpoint(storage, RUN, 3, {"input": torch.zeros(3, 2)}, {"step": 3})
    modes = {name: os.stat(os.path.join(path, name)).st_mode & 0o777 for name in os.listdir(path)}
    assert modes == {name: 0o640 for name in modes} and "manifest.json" in modes


def test_dense_state_round_trip(storage):
    torch.manual_seed(3)
    encoder = torch.nn.GRU(4, 5, batch_first=True)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=0.01)
    encoder(torch.randn(2, 3, 4))[0].sum().backward()
    optimizer.step()
    sampler = torch.Generator().manual_seed(11)
    torch.rand(3, generator=sampler)
    dense = {"encoder": encoder.state_dict(), "optimizer": optimizer.state_dict(),
             "sampler_counts": torch.tensor([0, 5, 3]), "position": {"epoch": 1, "step": 7, "offset": 2048},
             "generator": sampler.get_state()}
    expected = torch.rand(4, generator=sampler)
    path = save_checkpoint(storage, RUN, 7, {"input": torch.zeros(3, 2)}, dense)

    loaded = load_checkpoint(storage, path).dense
    for name, value in encoder.state_dict().items():
        assert torch.equal(loaded["encoder"][name], value)
    assert loaded["optimizer"]["state"][0]["step"] == 1.0
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert loaded["position"] == {"epoch": 1, "step": 7, "offset": 2048}
    fresh = torch.Generator()
    fresh.set_state(loaded["generator"])
    assert torch.equal(torch.rand(4, generator=fresh), expected)


def flip_byte(path: str) -> None:
    """Same size, different bytes: only the checksum can tell."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 40)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_checkpoint_is_skipped(storage):
    tables = full_tables()
    first = write(storage, 1, tables, 2)
    second = write(storage, 2, full_tables(seed=1), 2)
    assert latest_checkpoint(storage, RUN) == second
    assert check_checkpoint(storage, second) is None
    flip_byte(os.path.join(second, "tables-rank1-of-2.pt"))
    assert list_checkpoints(storage, RUN) == [second, first]  # sizes still match
    assert latest_checkpoint(storage, RUN) == first
    assert "tables-rank1-of-2.pt: sha256 differs" in check_checkpoint(storage, second)
    assert check_checkpoint(storage, second, verify=False) is None   # the cheap check: sizes only
    with pytest.raises(ValueError, match="tables-rank1-of-2.pt: sha256 differs"):
        load_checkpoint(storage, second, 1, 2)
    # a truncated file is caught by the cheap size check too
    with open(os.path.join(second, "tables-rank0-of-2.pt"), "r+b") as f:
        f.truncate(100)
    assert list_checkpoints(storage, RUN) == [first]
    assert "tables-rank0-of-2.pt" in check_checkpoint(storage, second, verify=False)
    assert torch.equal(gather_full_table(storage, latest_checkpoint(storage, RUN))["input"], tables["input"])


def test_a_resumed_run_replays_past_a_corrupt_commit(storage):
    """Step 2 is committed but corrupt: the run resumes from step 1, and when it reaches step 2
    again it must be able to write it (write_rank_files never overwrites a commit)."""
    first = write(storage, 1, full_tables(), 2)
    second = write(storage, 2, full_tables(seed=1), 2)
    write(storage, 3, full_tables(seed=2), 2, do_commit=False)          # half-written, newer
    flip_byte(os.path.join(second, "tables-rank0-of-2.pt"))
    assert latest_checkpoint(storage, RUN) == first
    with pytest.raises(FileExistsError, match="already committed"):
        write(storage, 2, full_tables(seed=3), 2)
    assert [step_of(p) for p in discard_newer(storage, RUN, step_of(first))] == [3, 2]
    replayed = write(storage, 2, full_tables(seed=3), 2)
    assert latest_checkpoint(storage, RUN) == replayed
    assert torch.equal(gather_full_table(storage, replayed)["input"], full_tables(seed=3)["input"])
    assert discard_newer(storage, RUN, 2) == []


def test_a_manifest_without_file_sizes_is_skipped(storage):
    first = write(storage, 1, full_tables(), 1)
    second = write(storage, 2, full_tables(), 1)
    manifest_path = os.path.join(second, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    del manifest["files"]["tables-rank0-of-1.pt"]["bytes"]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    assert "needs an integer 'bytes'" in check_checkpoint(storage, second)
    assert latest_checkpoint(storage, RUN) == first


def test_a_checkpoint_of_another_format_version_is_neither_skipped_nor_removed(storage):
    """Newer code's commit is not a broken one: resuming from the older step before it, and
    discarding it as newer, would throw its training away."""
    write(storage, 1, full_tables(), 1)
    second = write(storage, 2, full_tables(seed=1), 1)
    manifest_path = os.path.join(second, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["format_version"] = FORMAT_VERSION + 1
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    for call in (lambda: latest_checkpoint(storage, RUN), lambda: discard_newer(storage, RUN, 1),
                 lambda: prune(storage, RUN, keep_last=1)):
        with pytest.raises(UnsupportedFormat, match=f"format_version {FORMAT_VERSION + 1}, this code reads"):
            call()
    assert os.path.exists(manifest_path)


@pytest.mark.parametrize("error, hidden, message", [
    (OSError(28, "No space left on device"), None, "No space left on device"),
    (PermissionError("Access Denied"), None, "Access Denied"),           # s3fs's: no errno
    (RuntimeError("[enforce fail at inline_container.cc] . unexpected pos"),  # torch.save's
     OSError(28, "No space left on device"),
     r"No space left on device \(\[enforce fail at inline_container.cc\] . unexpected pos\)"),
])
def test_a_failed_write_names_its_file_and_publishes_nothing(storage, monkeypatch, error, hidden,
                                                             message):
    """A full disk names no file, and torch.save reports it as a RuntimeError that hides the
    OSError. The error names the checkpoint file and the cause, keeps its class, and no part of
    the file is published."""
    def disk_full(obj, f, *args, **kwargs):
        f.write(b"the first bytes")
        try:
            if hidden:
                raise hidden
        finally:
            raise error
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(type(error), match=rf"step-000000005/tables-rank0-of-1.pt: could not write "
                                          rf"it: {message}$"):
        save_checkpoint(storage, RUN, 5, {"input": torch.zeros(3, 2)})
    step = os.path.join(storage.uri, RUN, "checkpoints", "step-000000005")
    assert os.listdir(step) == []


def test_half_written_checkpoint_is_ignored(storage):
    first = write(storage, 1, full_tables(), 2)
    write(storage, 2, full_tables(), 2, do_commit=False)  # every rank wrote, nobody committed
    assert os.path.exists(os.path.join(storage.uri, RUN, "checkpoints", "step-000000002", "tables-rank1-of-2.pt"))
    assert list_checkpoints(storage, RUN) == [first]
    assert latest_checkpoint(storage, RUN) == first
    # rank 1 died before writing: commit refuses and leaves no manifest
    write_rank_files(storage, RUN, 3, 0, 2, {"input": torch.zeros(6, 4)})
    with pytest.raises(FileNotFoundError, match="rank 1 has not written its files"):
        commit(storage, RUN, 3, 2)
    assert not os.path.exists(os.path.join(storage.uri, RUN, "checkpoints", "step-000000003", "manifest.json"))
    assert latest_checkpoint(storage, RUN) == first


def test_commit_checks_layout_and_is_create_only(storage):
    tables = full_tables()
    write_rank_files(storage, RUN, 1, 0, 2, {k: v[:5] for k, v in tables.items()})  # 5 rows, wants 6
    write_rank_files(storage, RUN, 1, 1, 2, {k: v[5:] for k, v in tables.items()})  # 6 rows, wants 5
    with pytest.raises(ValueError, match="rank 0 wrote 5 rows; the modulo layout of 11 rows over 2 ranks gives it 6"):
        commit(storage, RUN, 1, 2)
    with pytest.raises(ValueError, match="table 'bias' has 4 rows"):
        write_rank_files(storage, RUN, 1, 0, 2, {"input": torch.zeros(5, 2), "bias": torch.zeros(4)})
    path = write(storage, 2, tables, 2)
    with pytest.raises(FileExistsError):
        commit(storage, RUN, 2, 2)
    with pytest.raises(FileExistsError, match="already committed"):
        write_rank_files(storage, RUN, 2, 0, 2, {k: v[0::2] for k, v in tables.items()})
    assert torch.equal(gather_full_table(storage, path)["input"], tables["input"])


def test_view_saves_only_its_rows(storage):
    big = torch.randn(10_000, 64)  # 2.56 MB
    path = save_checkpoint(storage, RUN, 1, {"input": big[:10]})
    size = read_manifest(storage, path)["files"]["tables-rank0-of-1.pt"]["bytes"]
    assert 10 * 64 * 4 < size < 10 * 64 * 4 + 2048  # not the whole 2.56 MB storage
    assert torch.equal(gather_full_table(storage, path)["input"], big[:10])


def test_prune_keeps_last_complete(storage):
    write(storage, 0, full_tables(), 1, do_commit=False)  # stale, older than every complete one
    for step in range(1, 6):
        write(storage, step, full_tables(), 1)
    write(storage, 6, full_tables(), 2, do_commit=False)  # newer: may still be in progress
    removed = prune(storage, RUN, keep_last=2)
    assert [step_of(p) for p in removed] == [3, 2, 1, 0]
    assert sorted(os.listdir(os.path.join(storage.uri, RUN, "checkpoints"))) == [
        "step-000000004", "step-000000005", "step-000000006"]
    assert [step_of(p) for p in list_checkpoints(storage, RUN)] == [5, 4]
    assert prune(storage, RUN, keep_last=2) == []
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        prune(storage, RUN, keep_last=0)


PWNED: list[str] = []


def _pwn() -> None:
    PWNED.append("code ran while loading")


class Malicious:
    def __reduce__(self):
        return _pwn, ()


def test_weights_only_rejects_pickled_objects(storage):
    with pytest.raises(TypeError, match=r"dense state\['sampler'\] is a Malicious"):
        save_checkpoint(storage, RUN, 1, {"input": torch.zeros(2, 2)}, {"sampler": Malicious()})
    path = save_checkpoint(storage, RUN, 2, {"input": torch.zeros(2, 2)}, {"step": 2})
    # Swap in a dense.pt holding an arbitrary object, with a manifest that vouches for it.
    dense = os.path.join(path, "dense.pt")
    torch.save({"step": 2, "payload": Malicious()}, dense)
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    data = open(dense, "rb").read()
    manifest["files"]["dense.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    assert latest_checkpoint(storage, RUN) == path
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(storage, path)
    assert PWNED == []
    assert torch.equal(load_checkpoint(storage, path, load_dense=False).tables["input"], torch.zeros(2, 2))
