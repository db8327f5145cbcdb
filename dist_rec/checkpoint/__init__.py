"""Checkpoints: a directory of manifest.json + per-rank table shards + rank 0's dense state,
on a local path or s3://, resharded N -> M on load. See manifest.py for the layout."""
from dist_rec.checkpoint.load import Loaded, gather_full_table, load_checkpoint, read_checkpoint_file
from dist_rec.checkpoint.manifest import FORMAT_VERSION, UnsupportedFormat, local_rows
from dist_rec.checkpoint.store import (CorruptFile, check_checkpoint, checkpoint_path, commit,
                                       discard_newer, latest_checkpoint, list_checkpoints, prune,
                                       read_manifest, save_checkpoint, write_rank_files)

__all__ = ["FORMAT_VERSION", "CorruptFile", "Loaded", "UnsupportedFormat", "check_checkpoint",
           "checkpoint_path", "commit", "discard_newer", "gather_full_table", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "local_rows", "prune", "read_checkpoint_file",
           "read_manifest", "save_checkpoint", "write_rank_files"]
