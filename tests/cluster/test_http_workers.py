"""A node's HTTP worker processes, on real processes: a worker that dies is restarted while
the others keep serving, and its clients see at most closed connections (a write retried with
its Idempotency-Key applies once); each worker's requests show in /metrics and /status; one
worker is enough."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raftkv.localcluster import (
    FAST_TIMING,
    LocalCluster,
    NodeProc,
    http_json,
    reserve_port,
    wait_until,
)
from tests.cluster.proc_net import holder_of, pid_alive
from tests.cluster.test_metrics import scrape
from tests.support.clusters import running_cluster

pytestmark = pytest.mark.integration

WORKERS = 2


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path, request=request,
                         env={"RAFTKV_HTTP_WORKERS": str(WORKERS)}) as c:
        yield c


def workers_of(c: LocalCluster, node: NodeProc, count: int = WORKERS) -> list[int]:
    def all_up() -> list[int] | None:
        pids = c.worker_pids(node)
        return pids if pids and len(pids) == count else None

    return wait_until(all_up, 20, f"{count} workers of {node.node_id}")


def status_workers(c: LocalCluster, node: NodeProc) -> list[dict[str, Any]]:
    workers = c.status(node)["extra"]["workers"]
    assert isinstance(workers, list)
    return workers


def put_on(node: NodeProc, key: str, value: object, idempotency_key: str,
           timeout_s: float = 10.0) -> tuple[int, Any]:
    code, body, _ = http_json("PUT", f"{node.http}/keys/{key}", {"value": value},
                              timeout_s=timeout_s, headers={"Idempotency-Key": idempotency_key})
    return code, body


class Writers:
    """Threads writing unique keys through one node, each write retried with its
    Idempotency-Key after a closed connection; every answer is recorded."""

    def __init__(self, node: NodeProc, threads: int = 4) -> None:
        self.node = node
        self.lock = threading.Lock()
        self.acked: dict[str, tuple[str, int]] = {}
        self.closed_connections = 0
        self.retried_after_close = 0
        self.bad_answers: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True)
                         for t in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, thread: int) -> None:
        i = 0
        while not self._stop.is_set():
            key, value = f"w{thread}-{i}", secrets.token_hex(4)
            idempotency_key = f"{key}-{value}"
            cut = False
            for _attempt in range(20):
                try:
                    code, body = put_on(self.node, key, value, idempotency_key)
                except (ConnectionError, http.client.RemoteDisconnected,
                        http.client.IncompleteRead):
                    with self.lock:
                        self.closed_connections += 1
                    cut = True
                    continue
                except OSError as e:  # refused / timeout: also a connection problem
                    with self.lock:
                        self.bad_answers.append(f"{key}: {e!r}")
                    return
                with self.lock:
                    if code != 200 or body.get("value") != value:
                        self.bad_answers.append(f"{key}: {code} {body}")
                        return
                    self.acked[key] = (value, int(body["index"]))
                    self.retried_after_close += cut
                break
            i += 1

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_a_killed_worker_is_restarted_while_the_others_serve_and_clients_see_no_wrong_answer(
        cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    pids = workers_of(cluster, leader)
    writers = Writers(leader)
    try:
        wait_until(lambda: writers.count() >= 30, 20, "writes before the kill")
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        before = writers.count()

        replacement = wait_until(
            lambda: [p for p in cluster.worker_pids(leader) if p not in pids], 20,
            "a new worker process")
        assert len(replacement) == 1
        wait_until(lambda: writers.count() >= before + 50, 30, "writes after the kill")
        wait_until(lambda: sorted(w["restarts"] for w in status_workers(cluster, leader))
                   == [0, 1] and all(w["up"] for w in status_workers(cluster, leader)), 20,
                   "/status to show the restart")
    finally:
        writers.stop()

    assert writers.bad_answers == []
    described = {w["pid"]: w for w in status_workers(cluster, leader)}
    assert set(described) == {pids[1], replacement[0]}
    assert described[replacement[0]]["restarts"] == 1
    assert described[pids[1]]["restarts"] == 0
    for key, (value, index) in writers.acked.items():
        code, body, _ = http_json("GET", f"{leader.http}/keys/{key}")
        assert (code, body) == (200, {"value": value, "index": index}), key
    values = scrape(leader.http)
    assert values["raftkv_worker_restarts_total"] == 1.0


def test_a_write_cut_off_by_a_dying_worker_retried_with_its_key_applies_once(
        cluster: LocalCluster) -> None:
    """Writes reach a node's workers while its Raft process is stopped (SIGSTOP; a follower,
    so that no election follows), so they are all in flight when one worker is killed: its
    clients' connections close, the other worker answers its own once the Raft process runs
    again, and each cut-off write retried with its Idempotency-Key is applied once (it may
    have reached the log before the worker died)."""
    leader = cluster.wait_for_leader()
    node = next(n for n in cluster.nodes if n is not leader)
    pids = workers_of(cluster, node)
    conns: list[http.client.HTTPConnection] = []
    assert node.pid is not None
    os.kill(node.pid, signal.SIGSTOP)  # the Raft process only, not its workers
    try:
        for i in range(12):
            conn = http.client.HTTPConnection(node.http_host, node.http_port, timeout=30)
            conn.request("PUT", f"/keys/cut{i}", body=json.dumps({"value": i}),
                         headers={"Idempotency-Key": f"cut-{i}",
                                  "Content-Type": "application/json"})
            conns.append(conn)
        holders = [wait_until(holder_of(c, pids), 20, "a worker to read the request")
                   for c in conns]
        victim = max(pids, key=holders.count)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not pid_alive(victim), 10, "the worker to die")
    finally:
        os.kill(node.pid, signal.SIGCONT)

    cut: list[int] = []
    for i, (conn, served_by) in enumerate(zip(conns, holders, strict=True)):
        try:
            resp = conn.getresponse()
            status, body = resp.status, json.loads(resp.read())
        except (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead):
            assert served_by == victim, f"cut{i} was served by the surviving worker"
            cut.append(i)
            continue
        finally:
            conn.close()
        assert served_by != victim, f"cut{i} was answered although its worker died"
        assert (status, body.get("value")) == (200, i), body
    assert cut, "the victim held some of the writes"

    def retried(i: int) -> tuple[int, Any] | None:
        answer = put_on(node, f"cut{i}", i, f"cut-{i}")
        return answer if answer[0] == 200 else None

    for i in cut:
        _, body = wait_until(functools.partial(retried, i), 20, f"the retry of cut{i}")
        index = int(body["index"])
        got_code, got, _ = http_json("GET", f"{leader.http}/keys/cut{i}")
        assert (got_code, got) == (200, {"value": i, "index": index}), "applied once"
        # Again, through the leader: the same answer, not a new write.
        assert put_on(leader, f"cut{i}", i, f"cut-{i}") == (200, {"value": i, "index": index})


def test_status_lists_each_worker_and_metrics_count_each_workers_requests(
        cluster: LocalCluster) -> None:
    node = cluster.nodes[0]
    pids = workers_of(cluster, node)
    for i in range(40):
        code, _, _ = http_json("GET", f"{node.http}/keys/nothing{i}?consistency=stale")
        assert code == 404

    workers = status_workers(cluster, node)
    assert sorted(w["index"] for w in workers) == list(range(WORKERS))
    assert sorted(w["pid"] for w in workers) == sorted(pids)
    assert all(w["up"] and w["restarts"] == 0 for w in workers)

    def per_worker() -> dict[str, float] | None:
        values = scrape(node.http)
        counts = {k: v for k, v in values.items()
                  if k.startswith("raftkv_worker_requests_total{worker=")}
        return counts if sum(counts.values()) >= 40 else None

    counts = wait_until(per_worker, 10, "the workers' request counts in /metrics")
    assert set(counts) <= {f'raftkv_worker_requests_total{{worker="{i}"}}'
                           for i in range(WORKERS)}
    wait_until(lambda: sum(w["requests"] for w in status_workers(cluster, node)) >= 40, 10,
               "the workers' request counts in /status")


def test_a_node_serves_with_one_http_worker(tmp_path: Path) -> None:
    """`raftkv serve --http-workers 1`: writes, reads and a watch waiting meanwhile, all on
    one worker process."""
    # Both ports stay bound here until the node starts (as LocalCluster does): two distinct
    # ports, which nothing this process allocates meanwhile can be handed.
    reserved = [reserve_port(), reserve_port()]
    http_port, raft_port = (int(sock.getsockname()[1]) for sock in reserved)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTKV_")}
    env.update(FAST_TIMING)
    env.update({"RAFTKV_ID": "n1", "RAFTKV_DATA_DIR": str(tmp_path / "n1"),
                "RAFTKV_PEERS": f"n1=127.0.0.1:{raft_port}",
                "RAFTKV_CLUSTER_TOKEN": secrets.token_hex(16)})
    log = (tmp_path / "n1.log").open("wb")
    for sock in reserved:
        sock.close()  # the last moment: the node binds them next
    proc = subprocess.Popen(
        [sys.executable, "-m", "raftkv", "serve", "--http-workers", "1",
         "--http-addr", f"127.0.0.1:{http_port}", "--raft-addr", f"127.0.0.1:{raft_port}"],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"127.0.0.1:{http_port}"
    try:
        wait_until(lambda: proc.poll() is None and http_json("GET", f"{url}/ready")[0] == 200,
                   30, "the node to be ready")
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1
        code, st, _ = http_json("GET", f"{url}/status")
        assert code == 200 and len(st["extra"]["workers"]) == 1

        code, body, _ = http_json("PUT", f"{url}/keys/a", {"value": 1})
        assert code == 200
        answer: list[tuple[int, Any]] = []
        watcher = threading.Thread(target=lambda: answer.append(http_json(
            "GET", f"{url}/keys/a?wait=true&index={body['index']}&timeout=20",
            timeout_s=30)[:2]), daemon=True)
        watcher.start()
        wait_until(lambda: http_json("GET", f"{url}/status")[1]["extra"]["watches"] == 1, 10,
                   "the watch to wait")
        code, second, _ = http_json("PUT", f"{url}/keys/a", {"value": 2})  # same worker
        assert code == 200
        watcher.join(10)
        assert answer == [(200, {"value": 2, "index": second["index"], "changed": True})]
        assert http_json("GET", f"{url}/keys/a")[:2] == (200, {"value": 2,
                                                                "index": second["index"]})
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()
