"""One way to reach storage: fsspec for our own reads and writes, pyarrow for Ray Data / Ray Train.

URIs are local paths or s3://bucket/prefix; s3 options (endpoint, region, credentials) come from
StorageConfig.storage_options() and are never logged.
"""
from __future__ import annotations

from typing import Any

import fsspec
import pyarrow.fs


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a local path or an s3:// URI."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def pyarrow_filesystem(uri: str, storage_options: dict[str, Any] | None = None
                       ) -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow filesystem, path) for Ray Data reads and Ray Train's storage_path."""
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
