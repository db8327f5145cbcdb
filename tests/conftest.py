"""Shared fixtures: a local Ray cluster on 127.0.0.1 started (and stopped) by the tests."""
from __future__ import annotations

import os

import pytest

# The `s3_storage` fixture: a moto S3 server on 127.0.0.1 and a fresh bucket per test.
pytest_plugins = ("tests.s3_server",)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance for the whole session (started once: it takes ~10 s).

    3 logical CPUs: one per training worker and one for Ray Data's read tasks.
    """
    import ray

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": repo}})
    yield ray
    ray.shutdown()
