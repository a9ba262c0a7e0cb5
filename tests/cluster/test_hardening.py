"""Issue 14's probes against real processes on loopback: each test reproduces one attack or
failure from the issue's table and asserts the new behaviour.

| probe                                               | here                                 |
|-----------------------------------------------------|--------------------------------------|
| six made-up joins made three fake voters            | test_made_up_joins_add_no_voter...   |
| a join naming a listener of the prober answered 500 | test_join_of_an_address_that_...     |
| a forged TimeoutNow moved leadership                | test_a_forged_timeout_now_...        |
| an append with a gap, under another node's name,    | test_an_append_with_a_gap_or_a_...   |
| stopped the node                                    |                                      |
| 300 unauthenticated peer connections: 1 of 3 real   | test_unauthenticated_peer_...        |
| handshakes refused                                  |                                      |
| one garbage SnapshotRequest stopped a node for good | test_a_garbage_snapshot_request_...  |
| no quota: every replica ran out of memory together  | test_the_quota_raises_a_cluster...   |
| no RAFTKV_CLUSTER_TOKEN: a public default token     | test_a_node_refuses_to_start_...     |
| 1,010 slow-header connections: /health timed out    | test_slow_request_heads_from_one_... |

The storage rows (LMDB map full, a real disk full) are in test_storage_full.py; the peer
message fuzzer in test_peer_fuzz.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.core import (
    AppendRequest,
    Entry,
    Membership,
    SnapshotMeta,
    SnapshotRequest,
    TimeoutNow,
)
from raftkv.localcluster import LocalCluster, NodeProc, http_json, wait_until
from tests.support.clusters import STEADY_LEADER, running_cluster
from tests.support.peers import answering_as, dial_as, send_raft

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path, request=request) as c:
        yield c


def _members(node: NodeProc) -> dict[str, dict[str, object]]:
    code, body, _ = http_json("GET", f"{node.http}/cluster")
    assert code == 200, body
    return {m["id"]: m for m in body["members"]}


def _leader_and_term(c: LocalCluster) -> tuple[str, int]:
    leader = c.wait_for_leader()
    status = c.status(leader)
    return leader.node_id, int(status["term"])


# --------------------------------------------------------------------------- membership
def test_made_up_joins_add_no_voter_and_the_cluster_keeps_working(
        cluster: LocalCluster) -> None:
    """Six joins with made-up ids and addresses (each id twice: the second asks to promote
    the learner the first made). Before: three fake voters, six voters with three alive, no
    leader ever again. Now: at most learners, every answer JSON (200 or 409 with the reason),
    and writes and removals keep working. (A join is probed since: each made-up id answers
    the handshake at its address, through a stand-in that never catches up.)"""
    leader = cluster.wait_for_leader()
    with contextlib.ExitStack() as stack:
        addresses = [stack.enter_context(answering_as(cluster.token, f"fake{i}"))
                     for i in range(3)]
        for attempt in range(6):
            nid = f"fake{attempt % 3}"
            # The same address both times: a promotion (with another address the second is
            # a 409 "remove it first" since 9f02561, no longer a promotion at the first one).
            code, body, _ = http_json("POST", f"{leader.http}/cluster/join",
                                      {"id": nid, "address": addresses[attempt % 3]},
                                      timeout_s=10)
            assert code in (200, 409), (code, body)
            if code == 409:
                assert body["error"] == "membership_change_rejected"
                assert "cannot be promoted yet" in body["message"]
    members = _members(leader)
    assert sorted(m for m, v in members.items() if v["voter"]) == sorted(
        n.node_id for n in cluster.nodes)
    index = cluster.put("after-fake-joins", 1)
    assert index > 0
    for nid in ("fake0", "fake1", "fake2"):
        if nid in members:
            code, body, _ = http_json("DELETE", f"{leader.http}/cluster/members/{nid}",
                                      timeout_s=10)
            assert code == 200, body
    # A live voter can still be removed (the others are caught up), a removal that would
    # leave no quorum cannot.
    follower = next(n for n in cluster.nodes if n is not leader)
    other = next(n for n in cluster.nodes if n not in (leader, follower))
    cluster.kill(other)
    # "Started" is "heard from within the last election timeout": wait for the leader to see it.
    wait_until(lambda: not cluster.status(leader)["extra"]["peers"][other.node_id]["caught_up"],
               10, f"the leader to stop counting {other.node_id} as started")
    code, body, _ = http_json("DELETE", f"{leader.http}/cluster/members/{follower.node_id}",
                              timeout_s=10)
    assert code == 409 and body["error"] == "membership_change_rejected", body
    assert "quorum" in body["message"]


def test_join_of_an_address_that_is_no_raftkv_node_is_a_json_409_not_500(
        cluster: LocalCluster) -> None:
    """The probe handed the node an address of its own listener (no id, so the node asks
    who listens there). Whatever the listener does, the answer is JSON 409, never 500."""
    leader = cluster.wait_for_leader()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def answer_garbage() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"\x00\x00\x00\x05garbage-not-raftkv")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        code, body, _ = http_json("POST", f"{leader.http}/cluster/join", {"address": address},
                                  timeout_s=15)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert code == 409, (code, body)
    assert body["error"] == "membership_change_rejected"
    assert address in body["message"]


# --------------------------------------------------------------------------- peer messages
def test_a_forged_timeout_now_moves_no_leadership(cluster: LocalCluster) -> None:
    leader_id, term = _leader_and_term(cluster)
    followers = [n for n in cluster.nodes if n.node_id != leader_id]
    target, claimed = followers
    sock = dial_as(target, cluster.token, claimed.node_id)
    try:
        send_raft(sock, *[TimeoutNow(term, claimed.node_id, target.node_id)] * 20)
        wait_until(lambda: "TimeoutNow from" in target.log_text(), 10,
                   "the target to log the TimeoutNow it ignored")
    finally:
        sock.close()
    text = target.log_text()
    # A forged TimeoutNow would make the target campaign at once, skipping the pre-vote. An
    # election timeout of its own (FAST_TIMING, a loaded machine) goes through the pre-vote:
    # every campaign of the target must have.
    assert text.count("event=became_candidate") <= text.count("event=became_pre_candidate")
    if "event=became_pre_candidate" not in text:
        assert _leader_and_term(cluster) == (leader_id, term)


def test_an_append_with_a_gap_or_a_borrowed_name_is_dropped_and_the_node_keeps_running(
        steady_cluster: LocalCluster) -> None:
    """Before: one AppendEntries with a gap, from a token holder claiming another node's id,
    stopped the node ("append at 1012 leaves a gap after 12"). Now a message must come from
    the peer that authenticated the connection, and an append must be contiguous: both are
    dropped with a log line, and the node keeps serving (and no election follows: hence the
    cluster of its own with slower elections, see STEADY_LEADER)."""
    cluster = steady_cluster
    index = cluster.put("before", 1)
    leader_id, term = _leader_and_term(cluster)
    target = next(n for n in cluster.nodes if n.node_id != leader_id)
    other = next(n for n in cluster.nodes if n.node_id not in (leader_id, target.node_id))
    cluster.wait_applied(target, index)
    gap = AppendRequest(term, leader_id, target.node_id, index, term,
                        (Entry(index + 1000, term, data=b"x"),), index)
    sock = dial_as(target, cluster.token, other.node_id)  # authenticated as the other one
    try:
        send_raft(sock, gap)  # claims to be from the leader
        wait_until(lambda: "claims to be from" in target.log_text(), 10,
                   "the target to refuse the borrowed name")
    finally:
        sock.close()
    sock = dial_as(target, cluster.token, leader_id)  # the leader's own name, this time
    try:
        send_raft(sock, gap)
        wait_until(lambda: "does not follow" in target.log_text(), 10,
                   "the target to drop the append with a gap")
    finally:
        sock.close()
    assert target.running
    after = cluster.put("after", 2)
    cluster.wait_applied(target, after)
    assert _leader_and_term(cluster) == (leader_id, term)


def test_unauthenticated_peer_connections_cannot_starve_real_peers(
        cluster: LocalCluster) -> None:
    """Before: 300 unauthenticated peer connections held for 25 s made 1 of 3 real
    handshakes fail. Now they have their own small limits (per address and in all) and a
    short handshake deadline: a member restarted meanwhile reconnects and catches up."""
    leader = cluster.wait_for_leader()
    restarted = next(n for n in cluster.nodes if n is not leader)
    idle: list[socket.socket] = []
    try:
        for target in cluster.nodes:
            for _ in range(100):
                with contextlib.suppress(OSError):  # refused at once: the limit at work
                    idle.append(socket.create_connection((target.raft_host, target.raft_port),
                                                         timeout=5,
                                                         source_address=("127.0.0.1", 0)))
        cluster.restart(restarted)
        index = cluster.put("while-held", 1)
        cluster.wait_applied(restarted, index, timeout_s=20)
        assert len(idle) >= 24, len(idle)  # the attack did hold connections
    finally:
        for sock in idle:
            sock.close()
    assert all(n.running for n in cluster.nodes)


def test_a_garbage_snapshot_request_is_refused_and_the_node_keeps_running(
        cluster: LocalCluster) -> None:
    """Before: saved before it was checked; the node exited and then refused to restart
    ("not a key-value snapshot"). Now it is refused on its first chunk, nothing is saved,
    the node keeps serving and restarts with its data."""
    index = cluster.put("kept", "yes")
    leader_id, term = _leader_and_term(cluster)
    target = next(n for n in cluster.nodes if n.node_id != leader_id)
    cluster.wait_applied(target, index)
    sock = dial_as(target, cluster.token, leader_id)
    garbage = b"\xc1 this is not a snapshot " * 100
    meta = SnapshotMeta(index + 1000, term,
                        Membership(frozenset(n.node_id for n in cluster.nodes)))
    try:
        for checksum in ("00" * 32, "ff" * 32):
            request = SnapshotRequest(term, leader_id, target.node_id, meta, 0, garbage, True,
                                      len(garbage), checksum)
            send_raft(sock, request)
        wait_until(lambda: "refused" in target.log_text(), 10,
                   "the target to log the snapshot it refused")
    finally:
        sock.close()
    assert target.running
    assert "event=snapshot_installed" not in target.log_text()
    after = cluster.put("after-garbage", 1)
    cluster.wait_applied(target, after)
    cluster.restart(target)
    wait_until(lambda: cluster.status(target)["applied_index"] >= after, 20,
               "the target to restart and catch up")
    code, body, _ = http_json("GET", f"{target.http}/keys/kept?consistency=stale")
    assert code == 200 and body["value"] == "yes"


# --------------------------------------------------------------------------- quota and alarm
def _cli(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    urls = ",".join(n.http for n in c.nodes if n.running)
    return subprocess.run([sys.executable, "-m", "raftkv", *args, "--urls", urls], cwd=REPO,
                          check=False,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_quota_raises_a_cluster_wide_alarm_until_space_is_freed_and_it_is_disarmed(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Before: no quota; 400 MiB of values took every node to ~1.45 GiB of memory together.
    Now: a write that would pass RAFTKV_QUOTA_BYTES raises the NOSPACE alarm through the log;
    every node refuses puts with 507 while reads and deletes go on, the leader stays; once
    keys are deleted and the alarm disarmed, writes work again."""
    # Elections after 1-2 s (STEADY_LEADER): the claim is that the alarm causes no election,
    # and a leader starved by a loaded machine under FAST_TIMING would let one happen.
    with running_cluster(tmp_path, request=request,
                         env={**STEADY_LEADER, "RAFTKV_QUOTA_BYTES": "1M"}) as c:
        leader_id, term = _leader_and_term(c)
        leader = c.node(leader_id)
        value = "v" * 20_000
        written: list[str] = []
        for i in range(200):
            code, body, _ = http_json("PUT", f"{leader.http}/keys/big{i}", {"value": value},
                                      timeout_s=10)
            if code == 507:
                break
            assert code == 200, body
            written.append(f"big{i}")
        assert code == 507 and body["error"] == "storage_full", body
        assert "quota" in body["message"]
        assert 30 <= len(written) < 60  # 1 MiB / ~20 KiB per key

        def alarm_everywhere() -> bool:
            return all(http_json("GET", f"{n.http}/alarms")[1]["alarms"] for n in c.nodes)

        wait_until(alarm_everywhere, 10, "the alarm to be applied on every node")
        listed = json.loads(_cli(c, "alarm", "list").stdout)
        assert [(a["node_id"], a["cause"]) for a in listed] == [(leader_id, "quota")]
        for node in c.nodes:
            code, body, _ = http_json("PUT", f"{node.http}/keys/small", {"value": 1})
            assert (code, body["error"]) == (507, "storage_full"), (node.node_id, body)
            assert "NOSPACE" in body["message"]
            code, body, _ = http_json("GET", f"{node.http}/keys/{written[0]}")
            assert code == 200 and body["value"] == value
        for key in written[: len(written) // 2]:
            code, body, _ = http_json("DELETE", f"{c.nodes[2].http}/keys/{key}")
            assert code == 200 and body["deleted"], body
        code, body, _ = http_json("PUT", f"{leader.http}/keys/small", {"value": 1})
        assert code == 507  # space is back, but the alarm stays until disarmed
        disarm = _cli(c, "alarm", "disarm")
        assert disarm.returncode == 0, disarm.stderr
        wait_until(lambda: not any(http_json("GET", f"{n.http}/alarms")[1]["alarms"]
                                   for n in c.nodes), 10, "the disarm on every node")
        for node in c.nodes:
            code, body, _ = http_json("PUT", f"{node.http}/keys/again-{node.node_id}",
                                      {"value": 1}, timeout_s=10)
            assert code == 200, body
        assert _leader_and_term(c) == (leader_id, term)  # no election at any point
        status = c.status(leader)["extra"]
        assert status["quota_bytes"] == 1 << 20 and status["size_bytes"] < 1 << 20
# --------------------------------------------------------------------------- slow HTTP clients
def _health_from(source: str, node: NodeProc, timeout_s: float) -> float:
    host, _, port = node.http.rpartition(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout_s,
                                  source_address=(source, 0)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return time.monotonic() - started


def test_slow_request_heads_from_one_address_do_not_hold_a_node_from_others(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Before: 1,010 slow-header connections made /health time out until they closed. Now
    (node defaults: 128 connections per address, a deadline for request heads, here 2 s)
    /health from another address answers at once, and the slow ones are cut off."""
    with running_cluster(tmp_path, 1, request=request,
                         env={"RAFTKV_HTTP_HEAD_TIMEOUT_MS": "2000"}) as c:
        node = c.nodes[0]
        host, _, port = node.http.rpartition(":")
        slow: list[socket.socket] = []
        try:
            for _ in range(1010):
                sock = socket.create_connection((host, int(port)), timeout=10,
                                                source_address=("127.0.0.1", 0))
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: n\r\nX-Slow: ")
                slow.append(sock)
            took = [_health_from("127.0.0.2", node, 10) for _ in range(20)]
            assert max(took) < 2.0, took
            answers: dict[bytes, int] = {}
            for sock in slow:  # each is answered: 503 at once, or 408 past the deadline
                sock.settimeout(10)
                status = sock.recv(4096)[:12]
                answers[status] = answers.get(status, 0) + 1
            assert set(answers) == {b"HTTP/1.1 503", b"HTTP/1.1 408"}, answers
            # The limit holds at each HTTP worker (they share the listening socket).
            assert answers[b"HTTP/1.1 408"] <= 128 * len(c.worker_pids(node))
        finally:
            for sock in slow:
                sock.close()
        assert _health_from("127.0.0.1", node, 10) < 2.0


# --------------------------------------------------------------------------- the token
def test_a_node_refuses_to_start_without_a_cluster_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTKV_")}
    env.update({"PYTHONPATH": str(REPO), "RAFTKV_ID": "n1",
                "RAFTKV_DATA_DIR": str(tmp_path / "n1"), "RAFTKV_PEERS": "n1=127.0.0.1:1"})
    result = subprocess.run([sys.executable, "-m", "raftkv", "serve"], cwd=REPO, env=env,
                            check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "RAFTKV_CLUSTER_TOKEN" in result.stderr and "raftkv token" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "n1").exists()  # refused before touching the disk
