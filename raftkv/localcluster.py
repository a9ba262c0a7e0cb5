"""Clusters of `raftkv serve` processes on this machine: `raftkv cluster`, the tests and the
benchmarks all start theirs here.

A LocalCluster gives node i (n1, n2, ...) a data dir `<base_dir>/n<i>`, an HTTP and a peer
address, and the settings every node of the cluster shares (`env`); it starts each node as
`python -m raftkv serve` with its settings in RAFTKV_* variables, and talks to the nodes over
HTTP only (it never imports the node's code). Output goes to `<base_dir>/n<i>.log`, or to
this process's stdout with an `n<i> | ` prefix (`output="terminal"`). Nodes are started,
stopped (SIGTERM), killed (SIGKILL), paused (SIGSTOP) and resumed one at a time, by pid.

Addresses. Without a `host`, each node listens on a loopback address of its own (all of
127.0.0.0/8 is loopback on Linux): 127.<p>.<c>.<10+i>, with <p> from this process's id and
<c> counting the clusters this process made. Two nodes therefore never share an address, so
their ports cannot collide, and a firewall rule can tell one node's peer traffic from
another's. The ports are the kernel's free ones, and each stays reserved (a bound socket held
here) until its node starts, so nothing allocated meanwhile in this process, for this node or
another, is handed the same port. With `host` (and optionally fixed base ports, as
`raftkv cluster --http-port 4001 --raft-port 5001` does), every node listens on that host.

Auth. With `root_token`, the cluster is bootstrapped with auth: the token is written to
`<base_dir>/root.token` (mode 0600), every node gets RAFTKV_ROOT_TOKEN_FILE (and
RAFTKV_JOIN_TOKEN_FILE, for joins), and the launcher's own requests (status, put) carry it.

Waiting is always a condition polled against a deadline (`wait_until`).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal, TypeVar

__all__ = [
    "FAST_TIMING",
    "ClusterError",
    "LocalCluster",
    "NodeExited",
    "NodeProc",
    "WaitTimeout",
    "free_port",
    "http_json",
    "node_host",
    "wait_until",
]

T = TypeVar("T")

FAST_TIMING: Final[Mapping[str, str]] = {
    "RAFTKV_TICK_MS": "20",
    "RAFTKV_ELECTION_TICKS": "10",
    "RAFTKV_HEARTBEAT_TICKS": "1",
    "RAFTKV_LOG_LEVEL": "INFO",
}
"""Quick elections (200-400 ms), for tests."""

POLL_INTERVAL_S: Final = 0.05
STOP_TIMEOUT_S: Final = 15.0
_COLORS: Final = ("\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m",
                  "\033[37m")
_RESET: Final = "\033[0m"
_cluster_numbers = itertools.count(1)


class ClusterError(Exception):
    """The cluster could not be started or does not answer as expected."""


class WaitTimeout(ClusterError):
    """A condition waited for did not come true before its deadline."""


class NodeExited(ClusterError):
    """A node process exited while it was being waited for."""


# --------------------------------------------------------------------------- small tools
def reserve_port(host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to a free port of `host` (not listening): the port stays ours until the
    socket is closed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` that was free a moment ago. Another bind may take it before it is
    used: LocalCluster keeps its nodes' ports reserved until they start instead."""
    with reserve_port(host) as sock:
        return int(sock.getsockname()[1])


def node_host(cluster_number: int, node_number: int) -> str:
    """The loopback address of node `node_number` (1-based) of this process's cluster
    `cluster_number`: 127.<p>.<c>.<10+i>, <p> from the pid (processes apart), <c> the cluster
    (clusters apart), <10+i> the node. Never 127.0.0.x, which other programs use."""
    if not 1 <= node_number <= 200:
        raise ValueError(f"node number {node_number} out of range 1..200")
    return f"127.{1 + os.getpid() % 254}.{1 + (cluster_number - 1) % 255}.{10 + node_number}"


def wait_until(cond: Callable[[], T | None], timeout_s: float, what: str,
               interval_s: float = POLL_INTERVAL_S) -> T:
    """Poll cond() until it returns something truthy, and return that.

    A connection error, a bad answer (ValueError, KeyError) or an HTTP protocol error from
    cond() counts as "not yet"; at the deadline WaitTimeout names `what` and the last such
    error. Anything else cond() raises (NodeExited, an assertion) ends the wait at once.
    """
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
            raise WaitTimeout(f"timed out after {timeout_s:g}s waiting for {what}"
                              + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval_s)


def http_json(method: str, url: str, body: object | None = None, timeout_s: float = 5.0,
              headers: Mapping[str, str] | None = None,
              raw_body: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    """One request on a fresh connection: (status, body, headers with lower-case names).

    `url` is `host:port/path` (an `http://` prefix is allowed). `body` is sent as JSON, or
    `raw_body` as is. The answer's body is decoded JSON, its text when it is not JSON, or
    None when empty.
    """
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        data = raw_body if raw_body is not None else (
            json.dumps(body).encode() if body is not None else None)
        sent = {"Content-Type": "application/json"} if data is not None else {}
        sent.update(headers or {})
        conn.request(method, "/" + path, body=data, headers=sent)
        resp = conn.getresponse()
        payload = resp.read()
        try:
            decoded = json.loads(payload) if payload else None
        except ValueError:
            decoded = payload.decode("utf-8", "replace")
        return resp.status, decoded, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def _tail(path: Path | None, chars: int) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# --------------------------------------------------------------------------- nodes
@dataclass
class NodeProc:
    """One node of a LocalCluster: its addresses, data dir, log, and process once started."""

    node_id: str
    http_port: int
    raft_port: int
    data_dir: Path
    log_path: Path | None
    """Where its output goes; None: to the launcher's stdout, prefixed."""
    env: dict[str, str] = field(default_factory=dict)
    """Settings of this node alone, over the cluster's."""
    proc: subprocess.Popen[bytes] | None = None
    raft_host: str = "127.0.0.1"
    http_host: str = "127.0.0.1"
    reserved: list[socket.socket] = field(default_factory=list, repr=False)
    """Sockets holding its ports until it starts."""

    @property
    def http(self) -> str:
        return f"{self.http_host}:{self.http_port}"

    @property
    def raft(self) -> str:
        return f"{self.raft_host}:{self.raft_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log_text(self) -> str:
        return _tail(self.log_path, 1 << 30)

    def release_ports(self) -> None:
        for sock in self.reserved:
            sock.close()
        self.reserved.clear()


class LocalCluster:
    """N `raftkv serve` processes on this machine (see the module doc).

    base_dir: the nodes' data dirs and logs. env: settings of every node (RAFTKV_*), e.g.
    FAST_TIMING. token: the cluster token (RAFTKV_CLUSTER_TOKEN); a random one by default.
    host, http_port, raft_port: see Addresses in the module doc.
    inherit_settings: pass this process's own RAFTKV_* variables on to the nodes (by default
    they are dropped, so a stray setting of the caller's shell changes nothing).
    root_token: bootstrap with auth, this being the root token (see Auth in the module doc).
    """

    def __init__(self, base_dir: Path, n: int = 3, *, env: Mapping[str, str] | None = None,
                 token: str | None = None, host: str | None = None,
                 http_port: int | None = None, raft_port: int | None = None,
                 inherit_settings: bool = False,
                 output: Literal["files", "terminal"] = "files", color: bool = False,
                 root_token: str | None = None) -> None:
        self.base_dir = base_dir
        self.root_token = root_token
        self.auth_headers: dict[str, str] = (
            {} if root_token is None else {"Authorization": f"Bearer {root_token}"})
        """What the launcher's own requests carry."""
        self.token = secrets.token_hex(32) if token is None else token
        self.extra_env = dict(env or {})
        self.inherit_settings = inherit_settings
        self.output = output
        self.color = color
        self._host = host
        self._http_base = http_port
        self._raft_base = raft_port
        self._number = next(_cluster_numbers)
        self._out_lock = threading.Lock()
        self.nodes: list[NodeProc] = []
        try:
            for i in range(1, n + 1):
                self.nodes.append(self._new_node(i))
        except BaseException:
            self.close()
            raise
        self.peers = ",".join(f"{node.node_id}={node.raft}" for node in self.nodes)

    def _new_node(self, number: int) -> NodeProc:
        host = self._host or node_host(self._number, number)
        reserved: list[socket.socket] = []
        ports: list[int] = []
        for base in (self._http_base, self._raft_base):
            if base is None:
                reserved.append(reserve_port(host))
                ports.append(int(reserved[-1].getsockname()[1]))
            else:
                ports.append(base + number - 1)
        nid = f"n{number}"
        log_path = self.base_dir / f"{nid}.log" if self.output == "files" else None
        return NodeProc(nid, ports[0], ports[1], self.base_dir / nid, log_path,
                        raft_host=host, http_host=host, reserved=reserved)

    # -------------------------------------------------------------- processes
    def node(self, node_id: str) -> NodeProc:
        return next(n for n in self.nodes if n.node_id == node_id)

    def add_node(self) -> NodeProc:
        """A new node n<N+1> (not started: start it with join=...)."""
        node = self._new_node(len(self.nodes) + 1)
        self.nodes.append(node)
        return node

    def env_for(self, node: NodeProc, *, join: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if self.inherit_settings or not k.startswith("RAFTKV_")}
        env.update(self.extra_env)
        if self.root_token is not None:
            token_file = self._root_token_file()
            env["RAFTKV_ROOT_TOKEN_FILE"] = env["RAFTKV_JOIN_TOKEN_FILE"] = str(token_file)
        env.update({
            "RAFTKV_ID": node.node_id,
            "RAFTKV_HTTP_ADDR": node.http,
            "RAFTKV_RAFT_ADDR": node.raft,
            "RAFTKV_DATA_DIR": str(node.data_dir),
            "RAFTKV_CLUSTER_TOKEN": self.token,
        })
        env.pop("RAFTKV_CLUSTER_TOKEN_FILE", None)  # the token is given: one way only
        if join:
            env["RAFTKV_JOIN"] = join
            env.pop("RAFTKV_PEERS", None)
        else:
            env["RAFTKV_PEERS"] = self.peers
        env.update(node.env)
        return env

    def use_peer_tls(self, certs_dir: Path, mode: str = "on",
                     nodes: list[NodeProc] | None = None) -> None:
        """Give nodes (all by default) their certificate from `certs_dir` (made there with
        raftkv.certs for every node of the cluster, if it has no CA yet) and the peer TLS
        `mode` (off, on, migrate-accept, migrate-dial); it applies from their next start."""
        if not (certs_dir / "ca.pem").exists():
            from raftkv.certs import init_certs

            init_certs(certs_dir, [n.node_id for n in self.nodes] + [
                f"n{i}" for i in range(len(self.nodes) + 1, len(self.nodes) + 3)])
        for node in nodes or self.nodes:
            node.env.update({
                "RAFTKV_PEER_TLS": mode,
                "RAFTKV_PEER_CERT_FILE": str(certs_dir / f"{node.node_id}.pem"),
                "RAFTKV_PEER_KEY_FILE": str(certs_dir / f"{node.node_id}.key"),
                "RAFTKV_PEER_TRUSTED_CA_FILE": str(certs_dir / "ca.pem"),
            })

    def _root_token_file(self) -> Path:
        path = self.base_dir / "root.token"
        if not path.exists():
            self.base_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{self.root_token}\n")
        return path

    def start(self, node: NodeProc, *, join: str | None = None) -> None:
        """Start the node (`join`: the HTTP address of a member to ask, for a new node)."""
        if node.running:
            raise ClusterError(f"{node.node_id} is already running (pid {node.pid})")
        env = self.env_for(node, join=join)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        node.release_ports()  # the last moment: the node binds them next
        argv = [sys.executable, "-m", "raftkv", "serve"]
        if node.log_path is not None:
            with open(node.log_path, "ab") as log:
                node.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            return
        node.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        assert node.proc.stdout is not None
        threading.Thread(target=self._pump, args=(node, node.proc.stdout),
                         name=f"output-{node.node_id}", daemon=True).start()

    def _pump(self, node: NodeProc, stream: IO[bytes]) -> None:
        """Copy a node's output to stdout, each line prefixed with its id."""
        i = self.nodes.index(node)
        tag = f"{_COLORS[i % len(_COLORS)]}{node.node_id}{_RESET}" if self.color else node.node_id
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            with self._out_lock:
                sys.stdout.write(f"{tag} | {line}")
                sys.stdout.flush()
        stream.close()

    def start_all(self) -> None:
        for n in self.nodes:
            self.start(n)

    def terminate(self, node: NodeProc, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (a leader hands over first), then wait for the exit; its status."""
        if node.proc is None:
            raise ClusterError(f"{node.node_id} was never started")
        _signal_group(node.proc, signal.SIGCONT)  # a paused node could not act on SIGTERM
        node.proc.send_signal(signal.SIGTERM)
        return node.proc.wait(timeout_s)

    def kill(self, node: NodeProc) -> None:
        """SIGKILL the node's Raft process: no chance to flush anything. Its HTTP workers
        see their channel close, answer what they hold and exit by themselves."""
        if node.proc is not None and node.proc.poll() is None:
            _signal_group(node.proc, signal.SIGCONT)
            node.proc.kill()
            node.proc.wait(10)

    def worker_pids(self, node: NodeProc) -> list[int]:
        """The pids of the node's HTTP worker processes (children of its Raft process)."""
        if node.proc is None or node.proc.poll() is not None:
            return []
        try:
            text = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def restart(self, node: NodeProc, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait for the exit, start again (same addresses and data)."""
        if node.running:
            self.terminate(node, timeout_s)
        self.start(node)

    def pause(self, node: NodeProc) -> None:
        """SIGSTOP the whole node (its Raft process and HTTP workers, one process group):
        it stays, and answers nothing until resumed."""
        if node.proc is None:
            raise ClusterError(f"{node.node_id} was never started")
        _signal_group(node.proc, signal.SIGSTOP)

    def resume(self, node: NodeProc) -> None:
        if node.proc is None:
            raise ClusterError(f"{node.node_id} was never started")
        _signal_group(node.proc, signal.SIGCONT)

    def wipe(self, node: NodeProc) -> None:
        """Delete a stopped node's data dir (an empty disk for a node that rejoins)."""
        if node.running:
            raise ClusterError(f"{node.node_id} is running")
        shutil.rmtree(node.data_dir, ignore_errors=True)

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """SIGTERM every running node at once, wait for them (SIGKILL past `timeout_s`);
        each started node's exit status."""
        for n in self.nodes:
            if n.running:
                assert n.proc is not None
                _signal_group(n.proc, signal.SIGCONT)
                n.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int] = {}
        for n in self.nodes:
            if n.proc is None:
                continue
            try:
                codes[n.node_id] = n.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.proc.kill()
                codes[n.node_id] = n.proc.wait(10)
        self._release_all()
        return codes

    def close(self, timeout_s: float = 60.0) -> None:
        """SIGKILL every node still running, all at once, and reap them (a process in the
        middle of an fsync dies only once it returns); release every reserved port."""
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                _signal_group(n.proc, signal.SIGCONT)
                _signal_group(n.proc, signal.SIGKILL)  # the workers too
        deadline = time.monotonic() + timeout_s
        for n in self.nodes:
            if n.proc is not None:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
        self._release_all()

    def _release_all(self) -> None:
        for n in self.nodes:
            n.release_ports()

    def check_alive(self, nodes: Iterable[NodeProc] | None = None) -> None:
        """Raise NodeExited, with its log's tail, for a started node that has exited."""
        for n in self.nodes if nodes is None else nodes:
            if n.proc is not None and n.proc.poll() is not None:
                raise NodeExited(f"{n.node_id} exited with status {n.proc.returncode}"
                                 + (f"; the end of {n.log_path}:\n{_tail(n.log_path, 3000)}"
                                    if n.log_path is not None else ""))

    # -------------------------------------------------------------- observation
    def status(self, node: NodeProc, timeout_s: float = 2.0) -> dict[str, Any]:
        """The node's GET /status; ValueError unless it answers 200 with an object."""
        code, body, _ = http_json("GET", f"{node.http}/status", timeout_s=timeout_s,
                                  headers=self.auth_headers)
        if code != 200 or not isinstance(body, dict):
            raise ValueError(f"{node.node_id} /status answered {code}: {body}")
        return body

    def leader(self, among: list[NodeProc] | None = None) -> NodeProc | None:
        """A running node (of `among`) that says it is the leader, if any answers so."""
        for n in [n for n in (among or self.nodes) if n.running]:
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
        """Until the node's /ready answers 200 (it has a leader and applied its commit);
        NodeExited at once if its process exits meanwhile."""
        def ready() -> bool:
            self.check_alive([node])
            return http_json("GET", f"{node.http}/ready", timeout_s=1.0)[0] == 200

        wait_until(ready, timeout_s, f"{node.node_id} ready")

    def wait_all_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        for n in self.nodes:
            self.wait_for_ready(n, max(0.0, deadline - time.monotonic()))

    def put(self, key: str, value: object, timeout_s: float = 20.0) -> int:
        """Write `key` through whichever running node answers (followers forward), retried
        until one acknowledges, with one Idempotency-Key so that a retry applies once; the
        write's index."""
        idempotency_key = f"localcluster-{secrets.token_hex(8)}"

        def attempt() -> int | None:
            for n in self.nodes:
                if not n.running:
                    continue
                try:
                    code, body, _ = http_json("PUT", f"{n.http}/keys/{key}", {"value": value},
                                              timeout_s=3.0,
                                              headers={"Idempotency-Key": idempotency_key,
                                                       **self.auth_headers})
                except (OSError, http.client.HTTPException):
                    continue
                if code == 200:
                    return int(body["index"])
            return None

        return wait_until(attempt, timeout_s, f"the write of {key}")

    def wait_applied(self, node: NodeProc, index: int, timeout_s: float = 20.0) -> None:
        wait_until(lambda: self.status(node, 1.0)["applied_index"] >= index, timeout_s,
                   f"{node.node_id} to apply index {index}")

    def wait_replicated(self, leader: NodeProc, timeout_s: float = 20.0) -> None:
        """Wait until `leader` counts every running node's log as holding its commit index,
        as a membership change's safety check does (a follower that applied an entry may
        still have its acknowledgement on the way)."""
        def done() -> bool:
            st = self.status(leader, 1.0)
            peers = st["extra"]["peers"]
            return all(n.node_id in peers and peers[n.node_id]["match"] >= st["commit_index"]
                       for n in self.nodes if n.running and n is not leader)

        wait_until(done, timeout_s, f"{leader.node_id} to count every running node caught up")

    def dump_logs(self) -> str:
        return "\n".join(f"===== {n.node_id} =====\n{_tail(n.log_path, 6000)}"
                         for n in self.nodes)


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Signal a node's process group (its Raft process and HTTP workers: each node is
    started in a session of its own, so the group id is the Raft process's pid)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
