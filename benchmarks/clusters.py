"""The systems under test: a raftkv or etcd cluster, started here on loopback or given by URL.

A `Target` finds the current leader, preloads keys, reads every benchmark key back
(linearizably) and, when it started the servers itself, samples their processes from /proc
(benchmarks.procstat: a raftkv node is its Raft process and its HTTP worker processes, an etcd
member one process). A raftkv cluster is started by raftkv.localcluster (as `raftkv cluster`
and the tests start theirs); etcd members by _Processes here. Processes started here are
stopped by pid on close(); every wait is a condition polled against a deadline
(raftkv.localcluster.wait_until).

Requests per raftkv worker: each worker tells its Raft process how many requests it answered
about once a second (`/status` shows it under extra.workers, `/metrics` as
raftkv_worker_requests_total), so a count read during a run may be up to two seconds old.
`worker_counts()` therefore reads them only when the node has been idle for
`WORKER_COUNTS_SETTLE_S` (before a run, and after it), with the workers' CPU at that moment.

Auth and peer TLS (`RaftkvCluster.start_local(auth_tls=True)`, the `raftkv-auth-tls`
variant): the cluster is bootstrapped with a random root token and its peer port speaks
mutual TLS (certificates made with raftkv.certs in the cluster's dir); a token of role
`write` is then created through the API with the root token, and that is the token the load
sends (`Target.token`). The harness's own requests (status, preload, read-back) carry the
root token.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import quote

from benchmarks.accounting import WorkerCounts
from benchmarks.labels import NO_FSYNC_ALL, NO_FSYNC_LEADER, NoFsync, variant_label
from benchmarks.loadgen import KEY_PREFIX, Endpoint, System, key_name, preload_value
from benchmarks.procstat import NodeSample, read_sample, sample_node
from raftkv.localcluster import ClusterError, LocalCluster, free_port, http_json, wait_until

__all__ = [
    "ETCD_INSTALL_HINT",
    "ETCD_MAX_TXN_OPS",
    "ClusterError",
    "EtcdCluster",
    "Leadership",
    "RaftkvCluster",
    "Target",
    "WorkerCounts",
    "etcd_binary",
    "install_etcd",
    "parse_endpoints",
]

ETCD_INSTALL_HINT: Final = ("etcd is not installed: run `apt-get install etcd-server` "
                            "(Debian bookworm ships etcd 3.4; as root the benchmark does it) "
                            "and try again")
APT_INSTALL: Final = Path(__file__).resolve().parents[1] / "scripts" / "apt-install.sh"
_START_TIMEOUT_S: Final = 60.0
_LEADER_TIMEOUT_S: Final = 30.0
_CONTROL_TIMEOUT_S: Final = 10.0
_TRANSFER_TIMEOUT_S: Final = 10.0
_RAFTKV_PRELOAD_OPS: Final = 1000
ETCD_MAX_TXN_OPS: Final = 128
"""etcd refuses transactions of more operations (its --max-txn-ops default)."""
_ETCD_PRELOAD_OPS: Final = 100
_RAFTKV_LIST_LIMIT: Final = 10_000
WORKER_COUNTS_SETTLE_S: Final = 2.2
"""A worker sends its counts at most 1 s after the last time, checked once per turn of its
loop, which an idle worker turns once a second: 2 s of quiet and every count is current."""


@dataclass(frozen=True, slots=True)
class Leadership:
    endpoint: Endpoint
    node: str
    term: int


class Target(Protocol):
    system: System
    label: str
    """The system and its variant, as the tables show it (`raftkv`, `raftkv-w1`, `etcd`)."""
    token: str | None
    """The token the load sends (`Authorization: Bearer`); None: none (auth off)."""

    @property
    def endpoints(self) -> list[Endpoint]: ...

    def leader(self) -> Leadership: ...

    def preload(self, key_count: int, value_bytes: int) -> None: ...

    @property
    def pinned_leader(self) -> str | None:
        """The node that must lead every run (a flush bound's unsynced leader), or None."""
        ...

    def keep_leader(self) -> None:
        """Hand leadership back to `pinned_leader` if it moved (nothing without one)."""
        ...

    def read_back(self, key_count: int) -> dict[int, str]:
        """key id -> value of every benchmark key, read linearizably from the leader."""
        ...

    def read_one(self, key_id: int) -> str | None: ...

    def current_index(self) -> int:
        """The leader's latest index (raftkv) or revision (etcd): later writes get more."""
        ...

    def server_processes(self) -> dict[Endpoint, NodeSample] | None:
        """Each node's processes now (by its client endpoint), if they were started here."""
        ...

    def worker_counts(self) -> dict[Endpoint, WorkerCounts] | None:
        """Each node's per-worker request counts, once the node is quiet (module doc); None
        when the system has no workers or was not started here."""
        ...

    def mark_busy(self) -> None:
        """Load was sent just now (worker_counts waits for the quiet after it)."""
        ...

    def watches_held(self, endpoint: Endpoint) -> int | None:
        """How many watches the node at `endpoint` holds, if it says (raftkv's /status)."""
        ...

    def describe(self) -> dict[str, object]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- small helpers
def _request(endpoint: Endpoint, method: str, path: str, body: object | None = None,
             timeout_s: float = _CONTROL_TIMEOUT_S,
             headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """(status, body) of one request to `endpoint` (raftkv.localcluster.http_json)."""
    code, answer, _ = http_json(method, f"{endpoint}{path}", body, timeout_s=timeout_s,
                                headers=headers)
    return code, answer


def parse_endpoints(text: str) -> list[Endpoint]:
    """`127.0.0.1:4001,127.0.0.1:4002` (or `127.0.0.1:4001,4002,4003`: a bare port reuses the
    host before it; `http://` is optional)."""
    endpoints: list[Endpoint] = []
    host = "127.0.0.1"
    for raw in filter(None, (part.strip() for part in text.split(","))):
        item = raw.removeprefix("http://").rstrip("/")
        if item.isdigit():
            port_s = item
        else:
            host, sep, port_s = item.rpartition(":")
            if not sep or not host or not port_s.isdigit():
                raise ValueError(f"{raw!r} is not host:port")
        port = int(port_s)
        if not 1 <= port <= 65535:
            raise ValueError(f"{raw!r}: the port must be 1..65535")
        endpoints.append(Endpoint(host.strip("[]"), port))
    if not endpoints:
        raise ValueError("no addresses given")
    return endpoints


class _Processes:
    """Server processes started here: logs to files, killed by pid."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.endpoints: dict[str, Endpoint] = {}

    def start(self, name: str, endpoint: Endpoint, argv: Sequence[str], env: Mapping[str, str],
              log: Path) -> None:
        with open(log, "ab") as out:
            proc = subprocess.Popen(list(argv), env=dict(env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc, log))
        self.endpoints[name] = endpoint

    def check_alive(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with status {proc.returncode}; its log "
                                   f"is {log}:\n{_tail(log)}")

    def samples(self) -> dict[Endpoint, NodeSample]:
        return {self.endpoints[name]: NodeSample(read_sample(proc.pid))
                for name, proc, _ in self.procs}

    def close(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs = []


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class _KeepAlive:
    """One keep-alive connection for a sequence of control-plane requests."""

    def __init__(self, endpoint: Endpoint, headers: Mapping[str, str] | None = None) -> None:
        self._conn = http.client.HTTPConnection(endpoint.host, endpoint.port,
                                                timeout=_CONTROL_TIMEOUT_S)
        self._headers = dict(headers or {})

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        headers.update(self._headers)
        self._conn.request(method, path, body=body, headers=headers)
        resp = self._conn.getresponse()
        payload = resp.read()
        return resp.status, json.loads(payload) if payload else None

    def close(self) -> None:
        self._conn.close()


# --------------------------------------------------------------------------- raftkv
LOAD_TOKEN_ROLE: Final = "write"
"""The role of the token the load of an auth variant sends: what a writing application has."""
UNSYNCED_SETTINGS: Final[Mapping[str, str]] = {"RAFTKV_UNSAFE_NO_FSYNC": "true"}
"""A flush bound's unsynced node (which then defers no save: Settings.persist_defer_s)."""


class RaftkvCluster:
    """3 local `raftkv serve` processes (durable, default timing) or the nodes at `urls`.
    `token`: what the load sends; `control_token`: what the harness's own requests send."""

    system = System.RAFTKV

    def __init__(self, endpoints: list[Endpoint], local: LocalCluster | None = None,
                 settings: Mapping[str, str] | None = None, label: str = "raftkv", *,
                 token: str | None = None, control_token: str | None = None,
                 secured: Mapping[str, object] | None = None,
                 pinned_leader: str | None = None) -> None:
        self._endpoints = endpoints
        self._local = local
        self._settings = dict(settings or {})
        self.label = label
        self.token = token
        self._headers: dict[str, str] = (
            {} if control_token is None else {"Authorization": f"Bearer {control_token}"})
        self._secured = dict(secured or {})
        self._pinned_leader = pinned_leader
        self._busy_at = time.monotonic()

    @classmethod
    def start_local(cls, base_dir: Path, nodes: int = 3, http_workers: int | None = None,
                    auth_tls: bool = False, no_fsync: NoFsync | None = None) -> RaftkvCluster:
        """`http_workers`: RAFTKV_HTTP_WORKERS (None or 0: the default, one per CPU).
        `auth_tls`: auth and peer mutual TLS on (see the module doc). `no_fsync`: a flush
        bound, NOT durable: NO_FSYNC_ALL starts every node with UNSYNCED_SETTINGS,
        NO_FSYNC_LEADER the first node only, which is then made the leader and kept so
        (`keep_leader`): its commits wait for a follower's flush but never for its own, what
        committing on the followers' acks while the leader flushes off its loop could give."""
        # The watch point holds 1,000 connections from this one address: above the default
        # per-client limit (128 per worker), which guards against one greedy address, not
        # against a load generator. etcd has no such limit.
        settings = {"RAFTKV_UNSAFE_NO_FSYNC": "false", "RAFTKV_LOG_LEVEL": "INFO",
                    "RAFTKV_HTTP_WORKERS": str(http_workers or 0),
                    "RAFTKV_HTTP_MAX_CONNECTIONS_PER_CLIENT": "4000"}
        if no_fsync == NO_FSYNC_ALL:
            settings.update(UNSYNCED_SETTINGS)
        root = secrets.token_hex(32) if auth_tls else None
        # a random cluster token; with auth_tls, bootstrapped with the root token
        local = LocalCluster(base_dir, nodes, env=settings, root_token=root)
        pinned: str | None = None
        if no_fsync == NO_FSYNC_LEADER:
            local.nodes[0].env.update(UNSYNCED_SETTINGS)
            pinned = local.nodes[0].node_id
        if auth_tls:
            try:
                local.use_peer_tls(base_dir / "certs")
            except Exception as e:  # CertsError (no cryptography), OSError
                local.close()
                raise ClusterError(f"peer TLS certificates: {e}") from e
        endpoints = [Endpoint(n.http_host, n.http_port) for n in local.nodes]
        cluster = cls(endpoints, local, settings,
                      variant_label(http_workers, auth_tls, no_fsync), control_token=root,
                      secured={"auth": True, "peer_tls": "on",
                               "load_token_role": LOAD_TOKEN_ROLE} if auth_tls else None,
                      pinned_leader=pinned)
        try:
            local.start_all()
            cluster.wait_ready(_START_TIMEOUT_S)
            cluster.keep_leader()
            if auth_tls:
                cluster.token = cluster.create_load_token()
        except BaseException:
            local.stop_all()
            raise
        return cluster

    def create_load_token(self) -> str:
        """A token of role LOAD_TOKEN_ROLE, created through the API with the root token,
        after checking that a request without a token is refused (auth is really on)."""
        leader = self.leader().endpoint
        code, body = _request(leader, "GET", f"/keys/{key_name(0)}")
        if code != 401:
            raise ClusterError(f"auth is not on: a request without a token answered {code}")
        code, body = _request(leader, "POST", "/auth/tokens", {"role": LOAD_TOKEN_ROLE},
                              headers=self._headers)
        if code != 200 or not isinstance(body, dict) or not isinstance(body.get("token"), str):
            raise ClusterError(f"creating the load's {LOAD_TOKEN_ROLE} token answered {code}: "
                               f"{body}")
        return str(body["token"])

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    def _req(self, endpoint: Endpoint, method: str, path: str, body: object | None = None,
             timeout_s: float = _CONTROL_TIMEOUT_S) -> tuple[int, Any]:
        """A request of the harness's own (with the root token when auth is on)."""
        return _request(endpoint, method, path, body, timeout_s, self._headers)

    def wait_ready(self, timeout_s: float) -> None:
        def all_ready() -> bool:
            if self._local is not None:
                self._local.check_alive()
            return all(self._req(ep, "GET", "/ready", timeout_s=2.0)[0] == 200
                       for ep in self._endpoints)

        wait_until(all_ready, timeout_s, "every raftkv node to be ready")

    def leader(self) -> Leadership:
        def find() -> Leadership | None:
            if self._local is not None:
                self._local.check_alive()
            for ep in self._endpoints:
                code, st = self._req(ep, "GET", "/status", timeout_s=2.0)
                if code == 200 and isinstance(st, dict) and st.get("role") == "leader":
                    return Leadership(ep, str(st["id"]), int(st["term"]))
            return None

        return wait_until(find, _LEADER_TIMEOUT_S, "a raftkv leader")

    @property
    def pinned_leader(self) -> str | None:
        return self._pinned_leader

    def keep_leader(self) -> None:
        """With a pinned leader: hand leadership back to it (POST /cluster/leader to the
        leader of the moment, again until it leads: leadership may move between the look-up
        and the request)."""
        pinned = self._pinned_leader
        if pinned is None:
            return
        answers: list[str] = []

        def leads() -> bool | None:
            current = self.leader()
            if current.node == pinned:
                return True
            code, body = self._req(
                current.endpoint, "POST",
                f"/cluster/leader?timeout={_TRANSFER_TIMEOUT_S:g}", {"id": pinned},
                timeout_s=_TRANSFER_TIMEOUT_S + _CONTROL_TIMEOUT_S)
            answers[:] = [f"{current.node} answered {code}: {body}"]
            return None

        try:
            wait_until(leads, _LEADER_TIMEOUT_S, f"{pinned} to lead")
        except ClusterError as e:
            raise ClusterError(f"{e} (last hand-over: {answers[0] if answers else '-'})") from e

    def preload(self, key_count: int, value_bytes: int) -> None:
        conn = _KeepAlive(self.leader().endpoint, self._headers)
        self.mark_busy()
        try:
            for first in range(0, key_count, _RAFTKV_PRELOAD_OPS):
                ops = [{"op": "put", "key": key_name(i), "value": preload_value(i, value_bytes)}
                       for i in range(first, min(key_count, first + _RAFTKV_PRELOAD_OPS))]
                code, body = conn.request("POST", "/batch", json.dumps({"ops": ops}).encode())
                if code != 200:
                    raise ClusterError(f"preloading raftkv failed: {code} {body}")
        finally:
            conn.close()
            self.mark_busy()

    def read_back(self, key_count: int) -> dict[int, str]:
        found: dict[int, str] = {}
        leader = self.leader().endpoint
        self.mark_busy()
        # The list answer holds at most 10,000 keys: one request per leading digit of the id.
        for digit in range((key_count + _RAFTKV_LIST_LIMIT - 1) // _RAFTKV_LIST_LIMIT):
            prefix = quote(f"{KEY_PREFIX}{digit}")
            code, body = self._req(
                leader, "GET",
                f"/keys?prefix={prefix}&limit={_RAFTKV_LIST_LIMIT}&consistency=linearizable",
                timeout_s=60.0)
            if code != 200 or not isinstance(body, dict):
                raise ClusterError(f"reading raftkv back failed: {code} {body}")
            for row in body["keys"]:
                found[int(row["key"].removeprefix(KEY_PREFIX))] = row["value"]
        return found

    def read_one(self, key_id: int) -> str | None:
        code, body = self._req(self.leader().endpoint, "GET",
                               f"/keys/{key_name(key_id)}?consistency=linearizable")
        if code == 404:
            return None
        if code != 200 or not isinstance(body, dict):
            raise ClusterError(f"reading {key_name(key_id)} failed: {code} {body}")
        return str(body["value"])

    def current_index(self) -> int:
        code, st = self._req(self.leader().endpoint, "GET", "/status")
        if code != 200 or not isinstance(st, dict):
            raise ClusterError(f"raftkv /status answered {code}: {st}")
        return int(st["applied_index"])

    def server_processes(self) -> dict[Endpoint, NodeSample] | None:
        if self._local is None:
            return None
        return {Endpoint(n.http_host, n.http_port): sample_node(n.pid)
                for n in self._local.nodes if n.pid is not None}

    def mark_busy(self) -> None:
        self._busy_at = time.monotonic()

    def watches_held(self, endpoint: Endpoint) -> int | None:
        # While 1,000 watch connections arrive, /status can take seconds on 2 busy cores.
        code, st = self._req(endpoint, "GET", "/status", timeout_s=10.0)
        if code != 200 or not isinstance(st, dict):
            return None
        return int(st.get("extra", {}).get("watches", 0))

    def local_nodes(self) -> list[tuple[str, Endpoint, int]]:
        """(node id, client endpoint, Raft process pid) of each running node started here."""
        if self._local is None:
            return []
        return [(n.node_id, Endpoint(n.http_host, n.http_port), n.pid)
                for n in self._local.nodes if n.pid is not None and n.running]

    def status(self, endpoint: Endpoint) -> dict[str, Any] | None:
        """The node's /status (with the harness's token when auth is on); None if it does not
        answer 200 with an object."""
        code, st = self._req(endpoint, "GET", "/status", timeout_s=5.0)
        return st if code == 200 and isinstance(st, dict) else None

    def worker_counts(self) -> dict[Endpoint, WorkerCounts] | None:
        if self._local is None:
            return None
        quiet_at = self._busy_at + WORKER_COUNTS_SETTLE_S
        time.sleep(max(0.0, quiet_at - time.monotonic()))
        counts: dict[Endpoint, WorkerCounts] = {}
        for n in self._local.nodes:
            if n.pid is None:
                continue
            ep = Endpoint(n.http_host, n.http_port)
            code, st = self._req(ep, "GET", "/status", timeout_s=2.0)
            sample = sample_node(n.pid)
            if code != 200 or not isinstance(st, dict):
                raise ClusterError(f"raftkv {n.node_id} /status answered {code}: {st}")
            workers = st.get("extra", {}).get("workers", [])
            counts[ep] = WorkerCounts(
                {int(w["pid"]): (int(w["index"]), int(w["requests"]))
                 for w in workers if w.get("pid") and w.get("up")}, sample)
        return counts

    def describe(self) -> dict[str, object]:
        return {"system": "raftkv", "label": self.label,
                "nodes": [str(ep) for ep in self._endpoints],
                "started_here": self._local is not None, "settings": self._settings,
                **({"security": self._secured} if self._secured else {}),
                **({} if self._local is None else self._durability(self._local))}

    def _durability(self, local: LocalCluster) -> dict[str, object]:
        """Which nodes skip their fsyncs (a flush bound), with the settings that only they
        have: `durable` is false if any does."""
        unsynced = [n.node_id for n in local.nodes
                    if {**local.extra_env, **n.env}.get("RAFTKV_UNSAFE_NO_FSYNC") == "true"]
        node_settings = {n.node_id: own for n in local.nodes
                         if (own := {k: v for k, v in n.env.items() if k in UNSYNCED_SETTINGS})}
        return {"durable": not unsynced, "unsynced": unsynced,
                **({"node_settings": node_settings} if node_settings else {})}

    def close(self) -> None:
        if self._local is not None:
            self._local.stop_all()


# --------------------------------------------------------------------------- etcd
def etcd_binary() -> str | None:
    return shutil.which("etcd")


def install_etcd() -> str | None:
    """Where no etcd is on PATH and this is root with apt: install Debian's etcd-server
    (scripts/apt-install.sh, which says so and starts no system etcd). The etcd binary, or
    None (not root, no apt, or the install failed: its output says why)."""
    if etcd_binary() is None and os.geteuid() == 0 and shutil.which("apt-get") is not None:
        subprocess.run(["bash", str(APT_INSTALL), "etcd-server"], check=False)
    return etcd_binary()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


class EtcdCluster:
    """3 local etcd members (default durability and timing) or the members at `urls`,
    spoken to through the v3 JSON gateway."""

    system = System.ETCD
    label = "etcd"
    token: str | None = None

    def __init__(self, endpoints: list[Endpoint], processes: _Processes | None = None,
                 version: str = "") -> None:
        self._endpoints = endpoints
        self._processes = processes
        self._version = version

    @classmethod
    def start_local(cls, base_dir: Path, members: int = 3) -> EtcdCluster:
        binary = etcd_binary()
        if binary is None:
            raise ClusterError(ETCD_INSTALL_HINT)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 check=False).stdout.splitlines()[:1]
        names = [f"e{i}" for i in range(1, members + 1)]
        client_ports = {name: free_port() for name in names}
        peer_ports = {name: free_port() for name in names}
        initial = ",".join(f"{n}=http://127.0.0.1:{peer_ports[n]}" for n in names)
        token = f"bench-{secrets.token_hex(4)}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        processes = _Processes()
        cluster = cls([Endpoint("127.0.0.1", client_ports[n]) for n in names], processes,
                      version[0] if version else "")
        try:
            for name in names:
                client = f"http://127.0.0.1:{client_ports[name]}"
                peer = f"http://127.0.0.1:{peer_ports[name]}"
                processes.start(name, Endpoint("127.0.0.1", client_ports[name]), [
                    binary, "--name", name, "--data-dir", str(base_dir / name),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", token,
                    "--logger", "zap", "--log-level", "warn",
                ], env, base_dir / f"{name}.log")
            cluster.leader()
        except BaseException:
            processes.close()
            raise
        return cluster

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    @property
    def pinned_leader(self) -> str | None:
        return None  # etcd's leader is wherever its election put it

    def keep_leader(self) -> None:
        pass

    def leader(self) -> Leadership:
        def find() -> Leadership | None:
            if self._processes is not None:
                self._processes.check_alive()
            for ep in self._endpoints:
                code, st = _request(ep, "POST", "/v3/maintenance/status", {}, timeout_s=2.0)
                if code != 200 or not isinstance(st, dict):
                    continue
                header = st.get("header", {})
                if st.get("leader") and header.get("member_id") == st["leader"]:
                    return Leadership(ep, str(st["leader"]), int(st.get("raftTerm", 0)))
            return None

        return wait_until(find, _LEADER_TIMEOUT_S, "an etcd leader")

    def preload(self, key_count: int, value_bytes: int) -> None:
        conn = _KeepAlive(self.leader().endpoint)
        try:
            for first in range(0, key_count, _ETCD_PRELOAD_OPS):
                puts = [{"request_put": {"key": _b64(key_name(i)),
                                         "value": _b64(preload_value(i, value_bytes))}}
                        for i in range(first, min(key_count, first + _ETCD_PRELOAD_OPS))]
                code, body = conn.request("POST", "/v3/kv/txn",
                                          json.dumps({"success": puts}).encode())
                if code != 200:
                    raise ClusterError(f"preloading etcd failed: {code} {body}")
        finally:
            conn.close()

    def read_back(self, key_count: int) -> dict[int, str]:
        end = KEY_PREFIX[:-1] + chr(ord(KEY_PREFIX[-1]) + 1)
        code, body = _request(self.leader().endpoint, "POST", "/v3/kv/range",
                               {"key": _b64(KEY_PREFIX), "range_end": _b64(end)},
                               timeout_s=60.0)
        if code != 200 or not isinstance(body, dict):
            raise ClusterError(f"reading etcd back failed: {code} {body}")
        return {int(_unb64(kv["key"]).removeprefix(KEY_PREFIX)): _unb64(kv.get("value", ""))
                for kv in body.get("kvs", [])}

    def read_one(self, key_id: int) -> str | None:
        code, body = _request(self.leader().endpoint, "POST", "/v3/kv/range",
                               {"key": _b64(key_name(key_id))})
        if code != 200 or not isinstance(body, dict):
            raise ClusterError(f"reading {key_name(key_id)} failed: {code} {body}")
        kvs = body.get("kvs", [])
        return _unb64(kvs[0].get("value", "")) if kvs else None

    def current_index(self) -> int:
        code, body = _request(self.leader().endpoint, "POST", "/v3/kv/range",
                               {"key": _b64(KEY_PREFIX)})
        if code != 200 or not isinstance(body, dict):
            raise ClusterError(f"etcd range answered {code}: {body}")
        return int(body["header"]["revision"])

    def server_processes(self) -> dict[Endpoint, NodeSample] | None:
        return None if self._processes is None else self._processes.samples()

    def worker_counts(self) -> dict[Endpoint, WorkerCounts] | None:
        return None

    def mark_busy(self) -> None:
        pass

    def watches_held(self, endpoint: Endpoint) -> int | None:
        return None  # each stream says `created` when it is registered

    def describe(self) -> dict[str, object]:
        return {"system": "etcd", "members": [str(ep) for ep in self._endpoints],
                "started_here": self._processes is not None, "version": self._version}

    def close(self) -> None:
        if self._processes is not None:
            self._processes.close()
