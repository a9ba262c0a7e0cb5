"""Long-poll watches (GET /keys/<key>/?wait=true&index=n) against real processes: woken by
writes on another node, answered at once for an old index, timing out with changed=false, and
surviving the death of the leader and the isolation of the watched node."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raftkv.localcluster import LocalCluster, NodeProc, http_json, wait_until
from tests.support.clusters import BackgroundWatch, running_cluster, watches

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # The thousand watches below come from one client address: above the default limit of
    # connections per client (RAFTKV_HTTP_MAX_CONNECTIONS_PER_CLIENT, 128 per worker).
    with running_cluster(tmp_path_factory.mktemp("watch"),
                         env={"RAFTKV_HTTP_MAX_CONNECTIONS_PER_CLIENT": "2000"}) as c:
        yield c


@pytest.fixture
def own_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path, request=request) as c:
        yield c



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


class RawWatches:
    """Many watches, each on a raw non-blocking socket of its own, read with one selector."""

    def __init__(self, node: NodeProc) -> None:
        self.node = node
        self.selector = selectors.DefaultSelector()
        self.answers: dict[int, tuple[int, Any]] = {}
        self._buffers: dict[int, bytearray] = {}
        self.open = 0

    def start(self, watch_id: int, key: str, index: int, timeout_s: float) -> None:
        sock = socket.create_connection((self.node.http_host, self.node.http_port),
                                        timeout=10)
        sock.sendall(f"GET /keys/{key}?wait=true&index={index}&timeout={timeout_s} HTTP/1.1"
                     f"\r\nHost: {self.node.http}\r\n\r\n".encode())
        sock.setblocking(False)
        self._buffers[watch_id] = bytearray()
        self.selector.register(sock, selectors.EVENT_READ, watch_id)
        self.open += 1

    def read(self, timeout_s: float) -> None:
        """Read answers until every watch has one (or the deadline passes)."""
        deadline = time.monotonic() + timeout_s
        while self.open and time.monotonic() < deadline:
            for key, _ in self.selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                watch_id = key.data
                chunk = sock.recv(65536)
                buf = self._buffers[watch_id]
                buf += chunk
                parsed = _http_answer(bytes(buf))
                if parsed is not None or not chunk:
                    self.answers[watch_id] = parsed or (0, f"closed: {bytes(buf)[:200]!r}")
                    self.selector.unregister(sock)
                    sock.close()
                    self.open -= 1

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


def _http_answer(data: bytes) -> tuple[int, Any] | None:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                  if line.lower().startswith("content-length:"))
    if len(body) < length:
        return None
    return status, json.loads(body[:length])


def test_a_thousand_concurrent_watches_on_one_node_each_see_their_change(
        cluster: LocalCluster) -> None:
    """1,000 watches of 100 keys wait on one node at once (greenlets in its HTTP workers, not
    threads); then every key is written once, through the leader: every watch answers with its
    key's write, none is missed or answered with another's."""
    node = a_follower(cluster)
    keys = [f"many/{i}" for i in range(100)]
    base = cluster.put("many/start", 0, timeout_s=30)
    cluster.wait_applied(node, base)
    written: dict[str, tuple[str, int]] = {}
    errors: list[BaseException] = []

    def write_every_key() -> None:
        try:
            for k in keys:
                value = f"value of {k}"
                written[k] = (value, cluster.put(k, value, timeout_s=30))
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    watches_ = RawWatches(node)
    writer = threading.Thread(target=write_every_key, daemon=True)
    try:
        for i in range(1000):
            watches_.start(i, keys[i % len(keys)], base, timeout_s=60)
        wait_until(lambda: watches(cluster, node) == 1000, 30, "1,000 watches waiting at once")
        writer.start()
        writer.join(60)
        assert not writer.is_alive() and errors == []
        watches_.read(timeout_s=60)
    finally:
        watches_.close()

    assert len(watches_.answers) == 1000
    wrong = {i: got for i, got in watches_.answers.items()
             if got != (200, {"value": written[keys[i % len(keys)]][0],
                              "index": written[keys[i % len(keys)]][1], "changed": True})}
    assert wrong == {}, f"{len(wrong)} watches answered otherwise, e.g. {list(wrong.items())[:3]}"
    wait_until(lambda: watches(cluster, node) == 0, 10, "no watch left waiting")
