"""Long-poll watches (GET /keys/<key>/?wait=true&index=n) against real processes: woken by
writes on another node, answered at once for an old index, timing out with changed=false, and
surviving the death of the leader and the isolation of the watched node."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raftkv.localcluster import LocalCluster, NodeProc, http_json, wait_until
from tests.support.clusters import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("watch")) as c:
        yield c


@pytest.fixture
def own_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path, request=request) as c:
        yield c



def watches(c: LocalCluster, node: NodeProc) -> int:
    return int(c.status(node)["extra"]["watches"])


class BackgroundWatch:
    """A watch request waiting in a thread of its own."""

    def __init__(self, node: NodeProc, key: str, index: int, timeout_s: float) -> None:
        self._answer: tuple[int, Any] | None = None
        self._error: BaseException | None = None
        url = f"{node.http}/keys/{key}?wait=true&index={index}&timeout={timeout_s}"
        self._thread = threading.Thread(target=self._run, args=(url, timeout_s + 10),
                                        daemon=True)
        self._thread.start()

    def _run(self, url: str, socket_timeout_s: float) -> None:
        try:
            code, body, _ = http_json("GET", url, timeout_s=socket_timeout_s)
            self._answer = (code, body)
        except BaseException as e:  # handed to the test thread
            self._error = e

    def answer(self, timeout_s: float) -> tuple[int, Any]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the watch did not answer in {timeout_s}s"
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer


def a_follower(c: LocalCluster) -> NodeProc:
    leader = c.wait_for_leader()
    return next(n for n in c.nodes if n is not leader)


def test_watch_on_a_follower_returns_when_the_leader_writes(cluster: LocalCluster) -> None:
    follower = a_follower(cluster)
    leader = cluster.wait_for_leader()
    start = cluster.put("w1", "first", timeout_s=30)
    watch = BackgroundWatch(follower, "w1", start, timeout_s=30)
    wait_until(lambda: watches(cluster, follower) == 1, 10, "the watch to be filed")
    code, body, _ = http_json("PUT", f"{leader.http}/keys/w1", {"value": "second"})
    assert code == 200
    assert watch.answer(15) == (200, {"value": "second", "index": body["index"],
                                      "changed": True})
    assert watches(cluster, follower) == 0


def test_watch_from_an_index_older_than_the_key_returns_at_once(cluster: LocalCluster) -> None:
    follower = a_follower(cluster)
    older = cluster.put("w2", "old", timeout_s=30)
    newer = cluster.put("w2", "new", timeout_s=30)
    # The wait may last 30 s; the socket gives up after 10: an answer proves it did not wait.
    code, body, _ = http_json("GET", f"{follower.http}/keys/w2?wait=true&index={older}",
                              timeout_s=10)
    assert (code, body) == (200, {"value": "new", "index": newer, "changed": True})


def test_watch_times_out_with_the_current_value_and_changed_false(
        cluster: LocalCluster) -> None:
    follower = a_follower(cluster)
    index = cluster.put("w3", "still", timeout_s=30)
    cluster.wait_applied(follower, index)
    code, body, _ = http_json(
        "GET", f"{follower.http}/keys/w3?wait=true&index={index}&timeout=0.3", timeout_s=10)
    assert (code, body) == (200, {"value": "still", "index": index, "changed": False})
    assert watches(cluster, follower) == 0


def test_watch_wakes_on_a_delete_with_deleted_true(cluster: LocalCluster) -> None:
    follower = a_follower(cluster)
    start = cluster.put("w4", "doomed", timeout_s=30)
    watch = BackgroundWatch(follower, "w4", start, timeout_s=30)
    wait_until(lambda: watches(cluster, follower) == 1, 10, "the watch to be filed")
    code, body, _ = http_json("DELETE", f"{cluster.wait_for_leader().http}/keys/w4")
    assert code == 200 and body["deleted"] is True
    assert watch.answer(15) == (200, {"deleted": True, "index": body["index"],
                                      "changed": True})


def test_watch_on_a_follower_survives_the_leader_being_killed(
        own_cluster: LocalCluster) -> None:
    c = own_cluster
    old_leader = c.wait_for_leader()
    follower = a_follower(c)
    start = c.put("lk", "before", timeout_s=30)
    watch = BackgroundWatch(follower, "lk", start, timeout_s=45)
    wait_until(lambda: watches(c, follower) == 1, 10, "the watch to be filed")
    c.kill(old_leader)
    survivors = [n for n in c.nodes if n is not old_leader]
    new_leader = c.wait_for_leader(among=survivors)
    assert new_leader is not old_leader
    assert watches(c, follower) == 1  # still waiting, across the change of leader
    index = c.put("lk", "after", timeout_s=30)
    assert watch.answer(20) == (200, {"value": "after", "index": index, "changed": True})


def test_watch_on_an_isolated_node_just_times_out(own_cluster: LocalCluster) -> None:
    c = own_cluster
    follower = a_follower(c)
    index = c.put("iso", "kept", timeout_s=30)
    c.wait_applied(follower, index)
    others = [n for n in c.nodes if n is not follower]
    for n in others:
        c.pause(n)
    try:
        code, body, _ = http_json(
            "GET", f"{follower.http}/keys/iso?wait=true&index={index}&timeout=1", timeout_s=10)
    finally:
        for n in others:
            c.resume(n)
    assert (code, body) == (200, {"value": "kept", "index": index, "changed": False})
