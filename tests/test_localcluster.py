"""raftkv.localcluster: the one launcher of local `raftkv serve` clusters, and its free_port,
wait_until and http_json."""

from __future__ import annotations

import http.server
import ipaddress
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.localcluster import (
    FAST_TIMING,
    LocalCluster,
    NodeExited,
    WaitTimeout,
    free_port,
    http_json,
    node_host,
    wait_until,
)

# --------------------------------------------------------------------------- addresses


def test_each_node_of_each_cluster_has_its_own_loopback_address(tmp_path: Path) -> None:
    a = LocalCluster(tmp_path / "a", 5)
    b = LocalCluster(tmp_path / "b", 3)
    try:
        hosts = [n.http_host for n in a.nodes + b.nodes]
        assert len(set(hosts)) == 8
        for n in a.nodes + b.nodes:
            assert n.raft_host == n.http_host
            ip = ipaddress.ip_address(n.http_host)
            assert ip.is_loopback and not n.http_host.startswith("127.0.0.")
    finally:
        a.close()
        b.close()


def test_ports_stay_reserved_until_the_node_starts(tmp_path: Path) -> None:
    """The flake this prevents: ports taken with bind-close-return could be handed out twice
    (one node's HTTP port was another's raft port)."""
    c = LocalCluster(tmp_path, 3, host="127.0.0.1")  # one host for all: only ports differ
    try:
        ports = [p for n in c.nodes for p in (n.http_port, n.raft_port)]
        assert len(set(ports)) == 6
        for n in c.nodes:
            for port in (n.http_port, n.raft_port):
                with socket.socket() as s, pytest.raises(OSError):
                    s.bind(("127.0.0.1", port))
        for _ in range(200):  # nothing allocated meanwhile gets one of them
            assert free_port("127.0.0.1") not in ports
    finally:
        c.close()
    with socket.socket() as s:  # released on close
        s.bind(("127.0.0.1", c.nodes[0].http_port))


def test_fixed_base_ports_number_the_nodes(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, 3, host="127.0.0.1", http_port=4001, raft_port=5001)
    assert [n.http for n in c.nodes] == ["127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:4003"]
    assert c.peers == "n1=127.0.0.1:5001,n2=127.0.0.1:5002,n3=127.0.0.1:5003"
    assert all(not n.reserved for n in c.nodes)


def test_node_host_rejects_node_numbers_out_of_range() -> None:
    assert node_host(1, 1).endswith(".11")
    with pytest.raises(ValueError):
        node_host(1, 0)


# --------------------------------------------------------------------------- settings


def test_node_settings_drop_the_callers_raftkv_variables_unless_inherited(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAFTKV_SNAPSHOT_ENTRIES", "7")
    monkeypatch.setenv("UNRELATED", "kept")
    c = LocalCluster(tmp_path, 2, env={"RAFTKV_TICK_MS": "20"}, token="tok")
    n1, n2 = c.nodes
    n2.env["RAFTKV_TICK_MS"] = "30"
    env = c.env_for(n1)
    assert "RAFTKV_SNAPSHOT_ENTRIES" not in env and env["UNRELATED"] == "kept"
    assert env["RAFTKV_ID"] == "n1" and env["RAFTKV_HTTP_ADDR"] == n1.http
    assert env["RAFTKV_RAFT_ADDR"] == n1.raft and env["RAFTKV_DATA_DIR"] == str(tmp_path / "n1")
    assert env["RAFTKV_PEERS"] == f"n1={n1.raft},n2={n2.raft}"
    assert env["RAFTKV_CLUSTER_TOKEN"] == "tok" and env["RAFTKV_TICK_MS"] == "20"
    assert c.env_for(n2)["RAFTKV_TICK_MS"] == "30"  # the node's own over the cluster's
    joining = c.env_for(n2, join=n1.http)
    assert joining["RAFTKV_JOIN"] == n1.http and "RAFTKV_PEERS" not in joining
    c.close()

    inherited = LocalCluster(tmp_path, 1, inherit_settings=True)
    assert inherited.env_for(inherited.nodes[0])["RAFTKV_SNAPSHOT_ENTRIES"] == "7"
    inherited.close()


def test_the_default_token_is_random_per_cluster(tmp_path: Path) -> None:
    a, b = LocalCluster(tmp_path, 1), LocalCluster(tmp_path, 1)
    assert a.token and b.token and a.token != b.token
    a.close()
    b.close()


# --------------------------------------------------------------------------- wait_until


def test_wait_until_returns_the_first_truthy_value() -> None:
    answers = iter([None, 0, "", "done"])
    assert wait_until(lambda: next(answers), 5, "an answer", interval_s=0.001) == "done"


def test_wait_until_names_what_it_waited_for_and_the_last_error() -> None:
    def refuse() -> None:
        raise ConnectionRefusedError("nobody listens")

    with pytest.raises(WaitTimeout, match=r"after 0.05s waiting for n9 ready .*nobody listens"):
        wait_until(refuse, 0.05, "n9 ready", interval_s=0.01)


def test_wait_until_stops_at_once_on_other_errors() -> None:
    calls = []

    def exited() -> None:
        calls.append(1)
        raise NodeExited("n1 exited with status 2")

    started = time.monotonic()
    with pytest.raises(NodeExited):
        wait_until(exited, 30, "n1 ready")
    assert calls == [1] and time.monotonic() - started < 5


# --------------------------------------------------------------------------- http_json


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = {"/json": json.dumps({"got": json.loads(body),
                                       "type": self.headers["Content-Type"],
                                       "extra": self.headers["X-Extra"]}).encode(),
                  "/text": b"plain words", "/empty": b""}[self.path]
        self.send_response(201)
        self.send_header("X-Answer", "yes")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_http_json_sends_json_and_decodes_json_text_or_nothing(server: str) -> None:
    code, body, headers = http_json("POST", f"http://{server}/json", {"a": 1},
                                    headers={"X-Extra": "e"})
    assert code == 201 and headers["x-answer"] == "yes"
    assert body == {"got": {"a": 1}, "type": "application/json", "extra": "e"}
    assert http_json("POST", f"{server}/text", raw_body=b"{}")[1] == "plain words"
    assert http_json("POST", f"{server}/empty", {})[1] is None


def test_http_json_raises_oserror_when_nobody_listens() -> None:
    with pytest.raises(OSError):
        http_json("GET", f"127.0.0.1:{free_port()}/status", timeout_s=1)


# --------------------------------------------------------------------------- real processes


@pytest.mark.integration
def test_a_cluster_starts_elects_and_each_node_stops_restarts_and_pauses_by_pid(
        tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, 3, env=FAST_TIMING)
    try:
        c.start_all()
        c.wait_all_ready()
        leader = c.wait_for_leader()
        assert all(n.pid is not None for n in c.nodes)
        index = c.put("k", "v")  # through any node
        code, body, _ = http_json("GET", f"{leader.http}/keys/k")
        assert (code, body) == (200, {"value": "v", "index": index})

        follower = next(n for n in c.nodes if n is not leader)
        old_pid = follower.pid
        c.restart(follower)
        assert follower.pid != old_pid and follower.running
        c.wait_for_ready(follower)

        c.pause(follower)
        with pytest.raises(OSError):  # SIGSTOPped: accepts, answers nothing
            http_json("GET", f"{follower.http}/health", timeout_s=0.5)
        c.resume(follower)
        c.wait_for_ready(follower)

        assert c.terminate(follower) == 0
        running: bool = follower.running  # read anew: terminate() stopped it
        assert not running
        assert set(c.stop_all().values()) <= {0, -signal.SIGTERM}
        assert "event=node_started" in c.nodes[0].log_text()
    finally:
        c.close()


@pytest.mark.integration
def test_waiting_for_a_node_that_exited_fails_at_once_with_its_log(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, 1, env={**FAST_TIMING, "RAFTKV_TICK_MS": "not-a-number"})
    try:
        c.start_all()
        started = time.monotonic()
        with pytest.raises(NodeExited, match=r"(?s)n1 exited with status 2.*RAFTKV_TICK_MS"):
            c.wait_for_ready(c.nodes[0], timeout_s=60)
        assert time.monotonic() - started < 30
    finally:
        c.close()
