"""A real S3 API on 127.0.0.1 for tests: moto's ThreadedMotoServer, one per test process.

tests/conftest.py registers this module as a pytest plugin, so any test can ask for it:

    def test_something(s3_storage):       # StorageConfig(uri="s3://<fresh bucket>/prefix", ...)
        fs, root = fsspec.core.url_to_fs(s3_storage.uri, **s3_storage.storage_options())

Each test gets a fresh bucket; the server starts once (≈0.4 s) and stops at exit. The fixture also
puts fake credentials, the region and AWS_ENDPOINT_URL in the environment so that clients built
elsewhere (pyarrow, boto3, Ray workers started inside the test) reach moto, never real AWS.
Outside pytest: `endpoint()` and `make_bucket()`.
"""
from __future__ import annotations

import atexit
import logging
import threading
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer

from dist_rec.config import StorageConfig

FAKE_KEY = "fake-access-key-id-for-moto"
FAKE_SECRET = "fake-secret-access-key-for-moto"
REGION = "us-east-1"

_server: ThreadedMotoServer | None = None
_lock = threading.Lock()


def endpoint() -> str:
    """http://127.0.0.1:<port> of this process's moto server, started on first use."""
    global _server
    with _lock:
        if _server is None:
            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # else one line per request
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # 0: free port
            server.start()
            atexit.register(server.stop)
            _server = server
        host, port = _server.get_host_and_port()
    return f"http://{host}:{port}"


def make_bucket(bucket: str | None = None, prefix: str = "prefix") -> StorageConfig:
    """Create a bucket (default: a fresh unique name) and return a StorageConfig for s3://bucket/prefix."""
    bucket = bucket or f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=endpoint(), region_name=REGION,
                          aws_access_key_id=FAKE_KEY, aws_secret_access_key=FAKE_SECRET)
    client.create_bucket(Bucket=bucket)
    return StorageConfig(uri=f"s3://{bucket}/{prefix}", endpoint_url=endpoint(), region=REGION,
                         key=FAKE_KEY, secret=FAKE_SECRET)


@pytest.fixture
def s3_storage(monkeypatch: pytest.MonkeyPatch) -> StorageConfig:
    """StorageConfig for s3://<fresh bucket>/prefix on the local moto server."""
    url = endpoint()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return make_bucket()
