"""Fixtures shared by the cluster tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.localcluster import LocalCluster
from tests.support.clusters import STEADY_LEADER, running_cluster


@pytest.fixture
def steady_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A running 3-node cluster for a test that asserts no election happens: elections after
    1-2 s, not 200-400 ms (see STEADY_LEADER)."""
    with running_cluster(tmp_path, request=request, env=STEADY_LEADER) as c:
        yield c
