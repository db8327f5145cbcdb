"""What a checkpoint directory contains and how its manifest.json is built and checked.

Layout of `<storage uri>/<run>/checkpoints/step-000000123/`:

    tables-rank{r}-of-{n}.pt   rank r's rows of every item table (row-wise modulo layout)
    files-rank{r}-of-{n}.json  rank r's receipt: its rows, table shapes, sha256 + bytes per file
    dense.pt                   rank 0: encoder, dense optimizer, sampler counts and generator, step
    <extra files>              e.g. the vocabulary, copied byte for byte
    manifest.json              written LAST, create-only: its presence is the commit

Row-wise modulo layout: global row i (item id i, row 0 = padding) lives on rank i % world_size at
local row i // world_size.
"""
from __future__ import annotations

import json
import time
from typing import Any, Mapping

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE = "dense.pt"
LAYOUT = {"kind": "row_modulo", "rule": "global row i -> rank i % world_size, local row i // world_size"}
_REDACTED = "***"


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:09d}"


def tables_filename(rank: int, world_size: int) -> str:
    return f"tables-rank{rank}-of-{world_size}.pt"


def receipt_filename(rank: int, world_size: int) -> str:
    return f"files-rank{rank}-of-{world_size}.json"


def local_rows(num_rows: int, rank: int, world_size: int) -> int:
    """How many of `num_rows` global rows rank `rank` holds under the modulo layout."""
    return max(0, (num_rows - rank + world_size - 1) // world_size)


def table_specs(tables: Mapping[str, torch.Tensor], where: str) -> tuple[int, dict[str, Any]]:
    """(local rows, {name: {"shape": trailing dims, "dtype"}}) of one rank's table dict.

    Every value must be a tensor whose first dimension is the row dimension, shared by all.
    """
    if not tables:
        raise ValueError(f"{where}: no tables to save")
    rows = None
    specs = {}
    for name, tensor in tables.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            raise TypeError(f"{where}: table {name!r} must be a tensor with a row dimension, "
                            f"got {type(tensor).__name__}")
        if rows is None:
            rows = tensor.shape[0]
        if tensor.shape[0] != rows:
            raise ValueError(f"{where}: table {name!r} has {tensor.shape[0]} rows, "
                             f"other tables have {rows}")
        specs[name] = {"shape": list(tensor.shape[1:]), "dtype": str(tensor.dtype).removeprefix("torch.")}
    return rows, specs


def check_plain(value: Any, where: str) -> None:
    """Raise unless `value` loads under torch.load(weights_only=True): tensors, numbers, strings,
    None and lists/tuples/dicts of them. Checked at save time so a bad checkpoint is never written."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} must be a str or int")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; a checkpoint holds only tensors, numbers, "
                    f"strings, None and lists/tuples/dicts of them (it is loaded with weights_only=True)")


def redact(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Copy of a JobConfig dict whose storage credentials are masked: manifests are read by humans."""
    out = json.loads(json.dumps(config or {}))  # deep copy that also proves it is JSON
    storage = out.get("storage")
    if isinstance(storage, dict):
        for name in ("key", "secret"):
            if storage.get(name):
                storage[name] = _REDACTED
    return out


def build_manifest(step: int, world_size: int, receipts: list[dict[str, Any]], *, epoch: int,
                   vocab_hash: str, config: Mapping[str, Any] | None,
                   dimensions: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Merge every rank's receipt into the manifest, checking that the shards fit the layout.

    `dimensions`: the sizes the data gave the model (models.Dimensions as a dict), so a job can
    tell before it starts workers whether its data would build a model this checkpoint fits.
    """
    num_rows = sum(receipt["rows"] for receipt in receipts)
    files: dict[str, Any] = {}
    specs = receipts[0]["tables"]
    for rank, receipt in enumerate(receipts):
        expected = local_rows(num_rows, rank, world_size)
        if receipt["rows"] != expected:
            raise ValueError(f"{where}: rank {rank} wrote {receipt['rows']} rows; the modulo layout of "
                             f"{num_rows} rows over {world_size} ranks gives it {expected}")
        if receipt["tables"] != specs:
            raise ValueError(f"{where}: rank {rank} tables {receipt['tables']} differ from rank 0's {specs}")
        for name, record in receipt["files"].items():
            if name in files:
                raise ValueError(f"{where}: file {name!r} written by more than one rank")
            files[name] = record
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "world_size": world_size,
        "layout": LAYOUT,
        "num_rows": num_rows,
        "num_items": max(0, num_rows - 1),  # row 0 is padding
        "tables": specs,
        "vocab_hash": vocab_hash,
        "files": dict(sorted(files.items())),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": redact(config),
        "dimensions": dict(dimensions) if dimensions is not None else None,
    }


class UnsupportedFormat(ValueError):
    """A manifest of another format version: written by other code, not broken. Never skipped
    or removed as a half-written checkpoint would be."""


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Decode and check a manifest; errors name the file and the field."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(f"{where}: format_version {version!r}, this code reads "
                                f"{FORMAT_VERSION}: run the dist_rec that wrote it, or give this "
                                f"run another --run-name")
    for name, kind in (("step", int), ("world_size", int), ("num_rows", int), ("files", dict),
                       ("tables", dict), ("layout", dict)):
        if not isinstance(manifest.get(name), kind):
            raise ValueError(f"{where}: field {name!r} missing or not a {kind.__name__}")
    if manifest["layout"].get("kind") != LAYOUT["kind"]:
        raise ValueError(f"{where}: layout {manifest['layout']!r} is not {LAYOUT['kind']!r}")
    if manifest["world_size"] < 1 or manifest["num_rows"] < 0:
        raise ValueError(f"{where}: world_size must be >= 1 and num_rows >= 0")
    for rank in range(manifest["world_size"]):
        if tables_filename(rank, manifest["world_size"]) not in manifest["files"]:
            raise ValueError(f"{where}: files lacks {tables_filename(rank, manifest['world_size'])}")
    for name, record in manifest["files"].items():
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
                and isinstance(record.get("sha256"), str)):
            raise ValueError(f"{where}: files[{name!r}] needs an integer 'bytes' and a 'sha256'")
    return manifest
