"""A real 3-node cluster of `raftkv serve` processes on loopback (ephemeral ports, tmp dirs)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raftkv.localcluster import LocalCluster, NodeProc, http_json, wait_until
from tests.support.clusters import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    env = getattr(request, "param", None) or {}
    with running_cluster(tmp_path, request=request, env=env) as c:
        yield c
        c.close()


def put(node: NodeProc, key: str, value: object, timeout_s: float = 10.0) -> int:
    code, body, _ = http_json("POST", f"{node.http}/keys/{key}", {"value": value},
                              timeout_s=timeout_s)
    assert code == 200, (code, body)
    assert body["value"] == value
    return int(body["index"])


def get(node: NodeProc, key: str, consistency: str = "linearizable") -> tuple[int, Any]:
    """(status, decoded JSON body): the body is as dynamic as http_json's."""
    code, body, _ = http_json("GET", f"{node.http}/keys/{key}?consistency={consistency}")
    return code, body



def followers(c: LocalCluster, leader: NodeProc) -> list[NodeProc]:
    return [n for n in c.nodes if n is not leader]


def test_write_on_follower_is_forwarded_and_readable_on_every_node(cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    follower = followers(cluster, leader)[0]
    index = put(follower, "greeting", {"hello": ["world", 1, None, True]})
    for n in cluster.nodes:
        code, body = get(n, "greeting")
        assert code == 200, (n.node_id, body)
        assert body == {"value": {"hello": ["world", 1, None, True]}, "index": index}
    # A follower that forwarded the write has applied it when it answers: a stale read there
    # sees it too.
    code, body = get(follower, "greeting", "stale")
    assert code == 200 and body["index"] == index


def test_missing_key_is_404_on_every_node(cluster: LocalCluster) -> None:
    for n in cluster.nodes:
        code, body = get(n, "nope")
        assert code == 404 and body["error"] == "key_not_found"


def test_leader_killed_new_leader_elected_and_writes_continue(cluster: LocalCluster) -> None:
    old = cluster.wait_for_leader()
    for i in range(20):
        cluster.put(f"k{i}", i)
    cluster.kill(old)
    new = cluster.wait_for_leader(timeout_s=10)
    assert new is not old
    for i in range(20, 40):
        cluster.put(f"k{i}", i)
    for i in range(40):
        code, body = get(new, f"k{i}")
        assert code == 200 and body["value"] == i


@pytest.mark.parametrize("cluster", [{"RAFTKV_SNAPSHOT_ENTRIES": "20",
                                      "RAFTKV_SNAPSHOT_TRAILING": "5"}], indirect=True)
def test_restarted_leader_rejoins_as_follower_with_all_data_after_compaction(
        cluster: LocalCluster) -> None:
    old = cluster.wait_for_leader()
    for i in range(10):
        cluster.put(f"a{i}", i)
    cluster.kill(old)
    cluster.wait_for_leader(timeout_s=10)
    # Enough writes that the others snapshot and compact past the old leader's log: it can
    # only catch up by InstallSnapshot.
    last = 0
    for i in range(120):
        last = cluster.put(f"b{i}", i)
    cluster.start(old)
    wait_until(lambda: cluster.status(old)["applied_index"] >= last, 30,
               "the restarted node to catch up")
    st = cluster.status(old)
    assert st["role"] == "follower"
    assert st["snapshot_index"] > 0
    for i in range(10):
        code, body = get(old, f"a{i}", "stale")
        assert code == 200 and body["value"] == i
    for i in range(120):
        code, body = get(old, f"b{i}", "stale")
        assert code == 200 and body["value"] == i
    assert "event=snapshot_taken" in "".join(n.log_text() for n in cluster.nodes)


def test_whole_cluster_restart_keeps_every_acknowledged_write(cluster: LocalCluster) -> None:
    acked = {f"w{i}": cluster.put(f"w{i}", f"v{i}") for i in range(30)}
    for n in cluster.nodes:
        cluster.kill(n)
    cluster.start_all()
    leader = cluster.wait_for_leader()
    for key in acked:
        code, body = get(leader, key)
        assert code == 200 and body["value"] == f"v{key[1:]}", (key, body)
    # Terms never go backwards across the restart.
    assert cluster.status(leader)["term"] >= 2


def test_leader_cut_off_never_serves_linearizable_read_and_steps_down(
        cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    cluster.put("x", 1)
    others = followers(cluster, leader)
    for n in others:
        cluster.pause(n)
    try:
        code, body, _ = http_json("GET", f"{leader.http}/keys/x?timeout=1.5", timeout_s=5)
        assert code in (503, 504), (code, body)
        wait_until(lambda: cluster.status(leader)["role"] != "leader", 10,
                   "the isolated leader to step down")
    finally:
        for n in others:
            cluster.resume(n)
    cluster.wait_for_leader(timeout_s=15)


ERROR_CASES: list[tuple[str, str, bytes | None, dict[str, str], int, str]] = [
    # method, path, body (raw bytes), headers, status, code
    ("POST", "/keys/a", b"{not json", {}, 400, "invalid_json"),
    ("POST", "/keys/a", b'{}', {}, 400, "missing_field"),
    ("POST", "/keys/a", b'{"value": 1, "nope": 1}', {}, 400, "invalid_field"),
    ("GET", "/keys/a?consistency=bogus", None, {}, 400, "invalid_field"),
    ("GET", "/no/such/route", None, {}, 404, "not_found"),
    ("PATCH", "/keys/a", b"{}", {}, 405, "method_not_allowed"),
    ("POST", "/keys/a", b'{"value": 1, "prev_index": 999999}', {}, 409, "condition_failed"),
    ("POST", "/keys/a", b'{"value": "' + b"x" * (2 << 20) + b'"}', {}, 413, "body_too_large"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "code"), ERROR_CASES)
def test_bad_input_gets_json_error_with_stable_code(
        cluster: LocalCluster, method: str, path: str, body: bytes | None,
        headers: dict[str, str], status: int, code: str) -> None:
    leader = cluster.wait_for_leader()
    got, answer, _ = http_json(method, f"{leader.http}{path}", raw_body=body, headers=headers,
                               timeout_s=10)
    assert got == status, answer
    assert isinstance(answer, dict) and answer["error"] == code
    assert "Traceback" not in str(answer)


def test_wrong_token_and_garbage_on_peer_port_are_refused(cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    with socket.create_connection((leader.raft_host, leader.raft_port), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x05GARBAGE-GARBAGE" * 10)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    from raftkv.runtime.transport.probe import probe

    with pytest.raises(Exception, match=r"(?i)token|refus|reject"):
        probe(leader.raft, cluster_id="whatever", token="wrong-token", node_id="intruder",
              timeout_s=5)
    # The node is unharmed.
    cluster.put("still", "alive")
    assert "event=peer_rejected" in leader.log_text()
