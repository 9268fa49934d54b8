"""Fixtures for control-plane tests; the cluster helpers live in local_cluster.py."""

from collections.abc import Iterator

import pytest
from local_cluster import API_KEY, LocalCluster, start_cluster


@pytest.fixture(scope="module")
def secured_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    """Two workers and an API key; shared by a module's tests that keep it ready."""
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"), api_key=API_KEY)
    yield cluster
    cluster.stop()
