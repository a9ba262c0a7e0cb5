"""A node's Raft process going away, on real processes: killed (SIGKILL), its HTTP workers
answer what they hold and exit by themselves, and the node starts again on the same ports;
stopped (SIGTERM) as the leader, it hands leadership over first, then its workers finish and
it exits 0, quickly."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raftkv.localcluster import LocalCluster, NodeProc, http_json, wait_until
from tests.cluster.proc_net import holder_of, pid_alive
from tests.support.clusters import running_cluster

pytestmark = pytest.mark.integration

WORKERS = 2
ELECTION_TICKS = 50
"""Elections after 1-2 s (20 ms ticks), far longer than a hand-over."""
TICK_MS = 20


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path, request=request,
                         env={"RAFTKV_HTTP_WORKERS": str(WORKERS),
                              "RAFTKV_TICK_MS": str(TICK_MS),
                              "RAFTKV_ELECTION_TICKS": str(ELECTION_TICKS)}) as c:
        yield c


def workers_of(c: LocalCluster, node: NodeProc) -> list[int]:
    def all_up() -> list[int] | None:
        pids = c.worker_pids(node)
        return pids if pids and len(pids) == WORKERS else None

    return wait_until(all_up, 20, f"the workers of {node.node_id}")


def send(node: NodeProc, method: str, path: str, body: object | None = None
         ) -> http.client.HTTPConnection:
    """Send a request now; its answer is read later (conn.getresponse())."""
    conn = http.client.HTTPConnection(node.http_host, node.http_port, timeout=30)
    data = None if body is None else json.dumps(body)
    conn.request(method, path, body=data,
                 headers={"Content-Type": "application/json"} if data else {})
    return conn


def answer(conn: http.client.HTTPConnection) -> tuple[int, Any]:
    try:
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_killing_the_raft_process_makes_its_workers_answer_what_they_hold_and_exit(
        cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    node = next(n for n in cluster.nodes if n is not leader)
    pids = workers_of(cluster, node)
    index = cluster.put("watched", "before")
    cluster.wait_applied(node, index)
    assert node.pid is not None and node.proc is not None

    os.kill(node.pid, signal.SIGSTOP)  # the Raft process only: the requests wait on it
    try:
        write = send(node, "PUT", "/keys/in-flight", {"value": 1})
        read = send(node, "GET", "/keys/watched")
        watch = send(node, "GET", f"/keys/watched?wait=true&index={index}&timeout=30")
        for conn in (write, read, watch):
            wait_until(holder_of(conn, pids), 20, "a worker to read the request")
    finally:
        os.kill(node.pid, signal.SIGKILL)
        node.proc.wait(10)
    killed_at = time.monotonic()

    code, body = answer(write)
    assert code == 504, body
    assert body["error"] == "commit_timeout" and body["outcome"] == "unknown"
    for conn in (read, watch):
        code, body = answer(conn)
        assert code == 503, body
        assert body["error"] == "unavailable"
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, "the workers to exit")
    assert time.monotonic() - killed_at < 5.0

    cluster.start(node)  # the same HTTP and raft ports
    cluster.wait_for_ready(node)
    assert http_json("GET", f"{node.http}/keys/watched")[:2] == (
        200, {"value": "before", "index": index})
    # The write never reached the Raft process (it was stopped, then killed).
    assert http_json("GET", f"{node.http}/keys/in-flight")[0] == 404
    assert len(workers_of(cluster, node)) == WORKERS


def campaign_before(log: str, node_id: str, term: int) -> str | None:
    """How `node_id` came to campaign for `term`, from its log: the role it changed from
    to candidate of that term. "pre_candidate": its election timeout ran out and it went
    through the pre-vote first; "follower": it campaigned at once, as a TimeoutNow (a
    hand-over) makes it. None: it was never a candidate of that term."""
    changes = re.findall(rf"event=became_(\w+) node={re.escape(node_id)} term=(\d+) ", log)
    for i, (role, t) in enumerate(changes):
        if role == "candidate" and int(t) == term:
            return changes[i - 1][0] if i else None
    return None


def test_sigterm_to_the_leader_hands_leadership_over_then_exits_zero_quickly(
        cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    others = [n for n in cluster.nodes if n is not leader]
    pids = workers_of(cluster, leader)
    term = cluster.status(leader)["term"]
    assert leader.proc is not None

    started = time.monotonic()
    leader.proc.send_signal(signal.SIGTERM)
    new = wait_until(lambda: cluster.leader(among=others), 10, "a new leader")
    rc = leader.proc.wait(5)
    exited_s = time.monotonic() - started

    assert rc == 0, leader.log_text()[-2000:]
    # A hand-over, not an election: the new leader campaigned at once, on the old leader's
    # TimeoutNow, where an election timeout of its own would have gone through the pre-vote
    # (its log tells, however long the machine's load made either take).
    assert campaign_before(new.log_text(), new.node_id, term + 1) == "follower", (
        new.log_text()[-3000:])
    assert exited_s < 5.0
    assert not any(pid_alive(p) for p in pids), "the workers exited before the Raft process"
    assert cluster.status(new)["term"] == term + 1
    log = leader.log_text()
    assert f"event=leadership_transfer node={leader.node_id} to={new.node_id} term={term}" \
        in log, log[-3000:]
    assert (f"event=leadership_handed_over node={leader.node_id} to={new.node_id} done=True"
            in log), log[-3000:]
    cluster.put("after", "the hand-over")


def test_sigterm_to_a_follower_answers_its_watches_then_exits_zero(
        cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    node = next(n for n in cluster.nodes if n is not leader)
    pids = workers_of(cluster, node)
    index = cluster.put("watched", "before")
    cluster.wait_applied(node, index)
    watch = send(node, "GET", f"/keys/watched?wait=true&index={index}&timeout=30")
    wait_until(lambda: cluster.status(node)["extra"]["watches"] == 1, 10, "the watch to wait")
    assert node.proc is not None

    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    code, body = answer(watch)
    rc = node.proc.wait(5)

    assert (code, body["error"]) == (503, "unavailable"), body
    assert rc == 0
    assert time.monotonic() - started < 5.0
    assert not any(pid_alive(p) for p in pids)
    assert cluster.status(leader)["role"] == "leader", "a follower stopping changes nothing"


def _policies(pids: list[int]) -> set[int]:
    """The scheduling policy of every thread of `pids`."""
    return {os.sched_getscheduler(int(tid)) for pid in pids
            for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize(("setting", "policy"), [
    ("batch", getattr(os, "SCHED_BATCH", -1)), ("normal", getattr(os, "SCHED_OTHER", -1))])
def test_every_process_and_thread_of_a_node_runs_under_the_cpu_scheduling_policy(
        tmp_path: Path, request: pytest.FixtureRequest, setting: str, policy: int) -> None:
    if not hasattr(os, "sched_getscheduler"):
        pytest.skip("no sched_getscheduler on this system")
    env = {"RAFTKV_HTTP_WORKERS": str(WORKERS), "RAFTKV_CPU_SCHEDULING": setting}
    with running_cluster(tmp_path, 1, request, env=env) as c:
        node = c.nodes[0]
        assert node.pid is not None
        c.put("k", 1)
        assert _policies([node.pid, *workers_of(c, node)]) == {policy}
        assert f"cpu_scheduling={setting}" in node.log_text()
