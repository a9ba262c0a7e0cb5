"""`raftkv status`: a table of every member, gathered from each member's own /status, with
unreachable members shown as such; `--json` keeps the one-node JSON for scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.localcluster import LocalCluster, http_json
from tests.support.clusters import running_cluster

pytestmark = pytest.mark.integration


def raftkv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raftkv", *args], capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path) as c:
        yield c


def table(output: str) -> dict[str, list[str]]:
    """ID -> the cells of its row (the last cell may hold spaces)."""
    lines = output.strip().splitlines()
    return {line.split()[0]: line.split(maxsplit=8) for line in lines[2:]}


def test_status_prints_every_member_with_its_role_and_indices(cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    code, body, _ = http_json("PUT", f"{leader.http}/keys/k", {"value": 1})
    assert code == 200
    for n in cluster.nodes:
        cluster.wait_applied(n, body["index"])
    result = raftkv("status", "--urls", follower.http)  # asked a follower: lists everyone
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("cluster ") and f"leader {leader.node_id}" in lines[0]
    assert lines[1].split() == ["ID", "HTTP", "RAFT", "ROLE", "TERM", "COMMIT", "APPLIED",
                                "LAG", "REACHABLE"]
    rows = table(result.stdout)
    assert sorted(rows) == ["n1", "n2", "n3"]
    for n in cluster.nodes:
        row = rows[n.node_id]
        assert row[1:3] == [n.http, n.raft]
        assert row[3] == ("leader" if n is leader else "follower")
        assert int(row[6]) >= body["index"] and row[8] == "yes"


def test_status_shows_a_dead_member_as_unreachable(cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    dead = next(n for n in cluster.nodes if n is not leader)
    cluster.kill(dead)
    result = raftkv("status", "--urls", ",".join(n.http for n in cluster.nodes))
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert sorted(rows) == ["n1", "n2", "n3"]
    assert rows[dead.node_id][3:8] == ["-"] * 5
    assert rows[dead.node_id][8].startswith("no: ")
    assert rows[leader.node_id][3] == "leader" and rows[leader.node_id][8] == "yes"


def test_status_json_prints_the_status_of_one_node(cluster: LocalCluster) -> None:
    node = cluster.nodes[1]
    result = raftkv("status", "--json", "--urls", node.http)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["id"] == node.node_id
    assert {m["id"] for m in status["members"]} == {"n1", "n2", "n3"}


def test_status_of_an_unreachable_cluster_exits_3(cluster: LocalCluster) -> None:
    for n in cluster.nodes:
        cluster.kill(n)
    result = raftkv("status", "--urls", cluster.nodes[0].http, "--timeout", "0.5")
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
