"""A cluster of real `raftkv serve` processes on loopback, for integration and fault tests.

Ephemeral ports, a tmp data dir per node, logs to files. Every process started here is
killed (by pid) on close(). Waiting is always a condition polled against a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

FAST_TIMING = {
    "RAFTKV_TICK_MS": "20",
    "RAFTKV_ELECTION_TICKS": "10",
    "RAFTKV_HEARTBEAT_TICKS": "1",
    "RAFTKV_LOG_LEVEL": "INFO",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_raft_host(number: int) -> str:
    """The loopback address of node number `number` (1-based) when each node gets its own:
    127.0.0.11, 127.0.0.12, ... (all of 127.0.0.0/8 is loopback on Linux)."""
    if not 1 <= number <= 200:
        raise ValueError(f"node number {number} out of range 1..200")
    return f"127.0.0.{10 + number}"


def wait_until(cond: Callable[[], T | None], timeout_s: float, what: str,
               interval_s: float = 0.05) -> T:
    """Poll cond() until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except (OSError, ValueError, KeyError, http.client.HTTPException) as e:
            last_error = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}"
                                 + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval_s)


def http_json(method: str, url: str, body: object | None = None, timeout_s: float = 5.0,
              headers: Mapping[str, str] | None = None,
              raw_body: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    """(status, decoded JSON or None, headers). `url` is host:port/path or http://..."""
    url = url.removeprefix("http://")
    hostport, _, path = url.partition("/")
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        data = raw_body if raw_body is not None else (
            json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, "/" + path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        try:
            decoded = json.loads(payload) if payload else None
        except ValueError:
            decoded = payload.decode("utf-8", "replace")
        return resp.status, decoded, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


@dataclass
class NodeProc:
    node_id: str
    http_port: int
    raft_port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    raft_host: str = "127.0.0.1"
    http_host: str = "127.0.0.1"

    @property
    def http(self) -> str:
        return f"{self.http_host}:{self.http_port}"

    @property
    def raft(self) -> str:
        return f"{self.raft_host}:{self.raft_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class LocalCluster:
    def __init__(self, base_dir: Path, n: int = 3, *, env: Mapping[str, str] | None = None,
                 token: str = "test-token", own_raft_ips: bool = False) -> None:
        """own_raft_ips: node i listens (HTTP and peers) and dials peers on 127.0.0.(10+i)
        instead of 127.0.0.1, so that firewall rules can tell the nodes' peer traffic apart
        (and no client's ephemeral port on 127.0.0.1 can take a stopped node's port)."""
        self.base_dir = base_dir
        self.token = token
        self.own_raft_ips = own_raft_ips
        self.extra_env = dict(FAST_TIMING)
        self.extra_env.update(env or {})
        self.nodes: list[NodeProc] = []
        for i in range(1, n + 1):
            self.nodes.append(self._new_node(f"n{i}", i))
        self.peers = ",".join(f"{n.node_id}={n.raft}" for n in self.nodes)

    def _new_node(self, nid: str, number: int) -> NodeProc:
        host = node_raft_host(number) if self.own_raft_ips else "127.0.0.1"
        http_port = free_port(host)
        raft_port = free_port(host)
        while raft_port == http_port:
            raft_port = free_port(host)
        return NodeProc(nid, http_port, raft_port, self.base_dir / nid,
                        self.base_dir / f"{nid}.log", raft_host=host, http_host=host)

    # -------------------------------------------------------------- processes
    def node(self, node_id: str) -> NodeProc:
        return next(n for n in self.nodes if n.node_id == node_id)

    def env_for(self, node: NodeProc, *, join: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update({
            "RAFTKV_ID": node.node_id,
            "RAFTKV_HTTP_ADDR": node.http,
            "RAFTKV_RAFT_ADDR": node.raft,
            "RAFTKV_DATA_DIR": str(node.data_dir),
            "RAFTKV_CLUSTER_TOKEN": self.token,
        })
        if join:
            env["RAFTKV_JOIN"] = join
            env.pop("RAFTKV_PEERS", None)
        else:
            env["RAFTKV_PEERS"] = self.peers
        env.update(node.env)
        return env

    def start(self, node: NodeProc, *, join: str | None = None) -> None:
        assert not node.running, f"{node.node_id} is already running"
        log = open(node.log_path, "ab")  # noqa: SIM115 - handed to the child
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "raftkv", "serve"], env=self.env_for(node, join=join),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start_all(self) -> None:
        for n in self.nodes:
            self.start(n)

    def add_node(self) -> NodeProc:
        number = len(self.nodes) + 1
        node = self._new_node(f"n{number}", number)
        self.nodes.append(node)
        return node

    def wipe(self, node: NodeProc) -> None:
        """Delete a stopped node's data dir (an empty disk for a node that rejoins)."""
        assert not node.running, f"{node.node_id} is running"
        shutil.rmtree(node.data_dir, ignore_errors=True)

    def kill(self, node: NodeProc) -> None:
        """SIGKILL: no chance to flush anything."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
            node.proc.kill()
            node.proc.wait(10)

    def terminate(self, node: NodeProc, timeout_s: float = 15.0) -> int:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        return node.proc.wait(timeout_s)

    def pause(self, node: NodeProc) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)

    def resume(self, node: NodeProc) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        for n in self.nodes:
            self.kill(n)

    # -------------------------------------------------------------- observation
    def status(self, node: NodeProc, timeout_s: float = 2.0) -> dict[str, Any]:
        code, body, _ = http_json("GET", f"{node.http}/status", timeout_s=timeout_s)
        if code != 200 or not isinstance(body, dict):
            raise ValueError(f"{node.node_id} /status answered {code}: {body}")
        return body

    def leader(self, among: list[NodeProc] | None = None) -> NodeProc | None:
        """The node that says it is leader and that the others agree on, if any."""
        candidates = [n for n in (among or self.nodes) if n.running]
        for n in candidates:
            try:
                st = self.status(n, 1.0)
            except (OSError, ValueError, http.client.HTTPException):
                continue
            if st["role"] == "leader":
                return n
        return None

    def wait_for_leader(self, among: list[NodeProc] | None = None,
                        timeout_s: float = 20.0) -> NodeProc:
        return wait_until(lambda: self.leader(among), timeout_s, "a leader")

    def wait_for_ready(self, node: NodeProc, timeout_s: float = 20.0) -> None:
        wait_until(lambda: http_json("GET", f"{node.http}/ready", timeout_s=1.0)[0] == 200,
                   timeout_s, f"{node.node_id} ready")

    def wait_applied(self, node: NodeProc, index: int, timeout_s: float = 20.0) -> None:
        wait_until(lambda: self.status(node, 1.0)["applied_index"] >= index, timeout_s,
                   f"{node.node_id} to apply index {index}")

    def dump_logs(self) -> str:
        return "\n".join(f"===== {n.node_id} =====\n{n.log_text()[-6000:]}" for n in self.nodes)
