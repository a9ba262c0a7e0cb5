"""The `raftkv` command: client subcommands with meaningful exit codes, and `raftkv cluster`."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raftkv.localcluster import LocalCluster, http_json, wait_until
from tests.support.clusters import running_cluster

pytestmark = pytest.mark.integration


def raftkv(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raftkv", *args], capture_output=True,
                          text=True, timeout=timeout_s, check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("cli")) as c:
        yield c


def urls(c: LocalCluster) -> str:
    return ",".join(n.http for n in c.nodes)


def test_put_get_delete_round_trip_with_json_output(cluster: LocalCluster) -> None:
    put = raftkv("put", "user1", '{"name": "Alice"}', "--urls", urls(cluster))
    assert put.returncode == 0, put.stderr
    written = json.loads(put.stdout)
    assert written["value"] == {"name": "Alice"} and written["index"] > 0
    get = raftkv("get", "user1", "--urls", urls(cluster))
    assert get.returncode == 0, get.stderr
    assert json.loads(get.stdout) == written
    bare = raftkv("put", "word", "hello", "--urls", urls(cluster))
    assert bare.returncode == 0 and json.loads(bare.stdout)["value"] == "hello"
    deleted = raftkv("delete", "user1", "--urls", urls(cluster))
    assert deleted.returncode == 0 and json.loads(deleted.stdout)["deleted"] is True


def test_get_of_a_missing_key_exits_1(cluster: LocalCluster) -> None:
    result = raftkv("get", "never-written", "--urls", urls(cluster))
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"] == "key_not_found"


def test_failed_condition_exits_1(cluster: LocalCluster) -> None:
    result = raftkv("put", "cas", "1", "--prev-index", "424242", "--urls", urls(cluster))
    assert result.returncode == 1
    assert "condition" in result.stderr


def test_status_and_members_print_json(cluster: LocalCluster) -> None:
    status = raftkv("status", "--json", "--urls", cluster.nodes[0].http)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["id"] == "n1"
    members = raftkv("members", "--urls", urls(cluster))
    assert members.returncode == 0, members.stderr
    assert {m["id"] for m in json.loads(members.stdout)} == {"n1", "n2", "n3"}


def test_unreachable_cluster_exits_3_without_a_traceback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = raftkv("get", "k", "--urls", f"127.0.0.1:{port}", "--timeout", "0.5")
    assert result.returncode == 3
    assert "Traceback" not in result.stderr


def _free_block(n: int) -> int:
    """A base port with n consecutive free ports after it (best effort)."""
    for _ in range(50):
        base = random.randint(20000, 40000)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
        except OSError:
            continue
        finally:
            for s in locals().get("socks", []):
                s.close()
        return base
    raise RuntimeError("no block of free ports")


def test_cluster_command_runs_three_nodes_and_recovers_its_data(tmp_path: Path) -> None:
    http_base, raft_base = _free_block(3), _free_block(3)
    env = dict(os.environ, RAFTKV_TICK_MS="20", RAFTKV_ELECTION_TICKS="10",
               RAFTKV_HEARTBEAT_TICKS="1")
    args = [sys.executable, "-m", "raftkv", "cluster", "--nodes", "3", "--http-port",
            str(http_base), "--raft-port", str(raft_base), "--data-dir", str(tmp_path / "c")]

    def run_once(write: bool) -> str:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            node = f"127.0.0.1:{http_base + 1}"
            if write:
                wait_until(lambda: http_json("PUT", f"{node}/keys/kept", {"value": "yes"},
                                             timeout_s=2)[0] == 200, 30, "a write")

            def read_kept() -> tuple[int, Any, dict[str, str]] | None:
                r = http_json("GET", f"{node}/keys/kept", timeout_s=2)
                return r if r[0] == 200 else None

            _, body, _ = wait_until(read_kept, 30, "a read")
            assert body["value"] == "yes"
        finally:
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        return out

    out = run_once(write=True)
    assert "n1 | " in out and "n2 | " in out and "n3 | " in out
    assert "event=became_leader" in out
    run_once(write=False)  # the data dir was kept: the second run still has the key
