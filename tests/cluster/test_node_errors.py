"""A node refuses bad settings and broken data dirs with a clear message (never a traceback),
and a full disk stops writes (507) while reads keep working and nothing is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raftkv.localcluster import FAST_TIMING, LocalCluster, http_json, wait_until

pytestmark = pytest.mark.integration


def serve(env: dict[str, str], timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.update(env)
    return subprocess.run([sys.executable, "-m", "raftkv", "serve"], env=full,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def base_env(tmp_path: Path) -> dict[str, str]:
    return {
        "RAFTKV_ID": "n1",
        "RAFTKV_DATA_DIR": str(tmp_path / "n1"),
        "RAFTKV_PEERS": "n1=127.0.0.1:1",
        "RAFTKV_HTTP_ADDR": "127.0.0.1:1",
        "RAFTKV_RAFT_ADDR": "127.0.0.1:1",
        "RAFTKV_CLUSTER_TOKEN": "test-token-" + "0123456789abcdef" * 2,
    }


@pytest.mark.parametrize(("override", "message"), [
    ({"RAFTKV_ID": "127.0.0.1"}, "never an address"),
    ({"RAFTKV_ID": ""}, "RAFTKV_ID"),
    ({"RAFTKV_HTTP_ADDR": "nonsense"}, "RAFTKV_HTTP_ADDR"),
    ({"RAFTKV_PEERS": "n2=127.0.0.1:5"}, "must include this node"),
    ({"RAFTKV_PEERS": "n1"}, "expected id=host:port"),
    ({"RAFTKV_PEERS": ",".join(f"n{i}=127.0.0.1:{1000 + i}" for i in range(1, 258))},
     "RAFTKV_PEERS names 257 members: a cluster has at most 256"),
    ({"RAFTKV_TICK_MS": "fast"}, "RAFTKV_TICK_MS"),
    ({"RAFTKV_ELECTION_TICKS": "1"}, "RAFTKV_ELECTION_TICKS"),
])
def test_bad_setting_stops_with_a_message_that_names_it(
        tmp_path: Path, override: dict[str, str], message: str) -> None:
    env = base_env(tmp_path)
    env.update(override)
    result = serve(env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_data_dir_without_peers_or_join_refuses_to_bootstrap(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    env["RAFTKV_PEERS"] = ""
    result = serve(env)
    assert result.returncode == 2
    assert "RAFTKV_PEERS" in result.stderr and "RAFTKV_JOIN" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_log_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    raft_dir = tmp_path / "n1" / "raft"
    raft_dir.mkdir(parents=True)
    (raft_dir / "data.mdb").write_bytes(b"\x00garbage" * 1000)
    result = serve(base_env(tmp_path))
    assert result.returncode == 2
    assert "data.mdb" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_dir_of_another_node_is_refused(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, 1, env=FAST_TIMING)
    c.start_all()
    try:
        c.wait_for_leader()
    finally:
        c.close()
    env = base_env(tmp_path)
    env["RAFTKV_ID"] = "n9"
    env["RAFTKV_PEERS"] = "n9=127.0.0.1:1"
    result = serve(env)
    assert result.returncode == 2
    assert "belongs to node 'n1'" in result.stderr


def test_a_second_node_on_a_running_nodes_data_dir_is_refused(tmp_path: Path) -> None:
    """Found by a helper: a second `raftkv serve` on a live node's data dir started, loaded
    its state and ran as that node (LMDB lets several processes share an environment), two
    copies of one voter's term, vote and log. The data dir's LOCK now refuses it, naming the
    holder; the running node carries on."""
    c = LocalCluster(tmp_path, 1, env=FAST_TIMING)
    c.start_all()
    try:
        node = c.wait_for_leader()
        c.put("before", 1)
        env = base_env(tmp_path)
        env["RAFTKV_DATA_DIR"] = str(node.data_dir)
        result = serve(env)
        assert result.returncode == 2
        assert f"in use by process {node.pid}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert c.put("after", 2) > 0
        assert c.status(node)["role"] == "leader"
    finally:
        c.close()


def test_full_disk_refuses_writes_with_507_keeps_reads_and_loses_nothing(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, 1, env={**FAST_TIMING, "RAFTKV_MAP_SIZE_MB": "1",
                                       "RAFTKV_MAX_MAP_SIZE_MB": "2",
                                       "RAFTKV_SNAPSHOT_ENTRIES": "1000000"})
    c.start_all()
    try:
        node = c.wait_for_leader()
        acked: dict[str, int] = {}
        value = "v" * 4000
        status = 200
        for i in range(2000):
            status, body, _ = http_json("PUT", f"{node.http}/keys/k{i}", {"value": value},
                                        timeout_s=10)
            if status != 200:
                break
            acked[f"k{i}"] = body["index"]
        assert status == 507, f"expected 507 once the map is full, last status {status}"
        assert body["error"] == "storage_full"
        assert len(acked) > 10
        for key in acked:
            code, got, _ = http_json("GET", f"{node.http}/keys/{key}?consistency=stale")
            assert code == 200 and got["value"] == value
        # After a restart everything acknowledged is still there.
        c.kill(node)
        c.start(node)
        wait_until(lambda: c.status(node)["applied_index"] >= max(acked.values()), 20,
                   "the restarted node to replay its log")
        for key in acked:
            code, got, _ = http_json("GET", f"{node.http}/keys/{key}?consistency=stale")
            assert code == 200 and got["value"] == value
    finally:
        c.close()
