"""Assemble and run one node: stores, boot, transport, Raft loop, service, HTTP.

Startup problems raise StartupError with a message that says what to do; the CLI prints
it without a traceback and exits with status 2.
"""

from __future__ import annotations

import functools
import gc
import ipaddress
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from raftkv.core import (
    ConfChange,
    ConfChangeOp,
    Config,
    Entry,
    EntryKind,
    HardState,
    NotLeader,
    RaftError,
    RaftNode,
    Role,
)
from raftkv.kv.state_machine import KVStateMachine, StateMachineError
from raftkv.ports import NodeIdentity, StorageError
from raftkv.runtime.boot import load_boot_state
from raftkv.runtime.loop import BASE_MEMBERSHIP, RaftLoop
from raftkv.runtime.ready_handler import chunk_reader
from raftkv.runtime.service import NodeService
from raftkv.runtime.transport import PeerTransport, probe
from raftkv.service import ServiceError
from raftkv.settings import Settings, derive_cluster_id, parse_host_port
from snapshots.lmdb_store import LmdbSnapshotStore
from snapshots.policy import SnapshotPolicy
from storage.lmdb_store import LmdbRaftStorage

log = logging.getLogger("raftkv.node")

FORMAT_VERSION = 1
MIB = 1 << 20


class StartupError(Exception):
    """The node cannot start; the message says why and what to do."""


class NodeServer:
    """One running node. start() returns once the node serves; stop() shuts it down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._http: object | None = None
        self._http_thread: threading.Thread | None = None
        self.fatal: str | None = None
        data = Path(settings.data_dir)
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"cannot create the data dir {data}: {e.strerror}; check the "
                               "path and its permissions") from None
        try:
            self.storage = LmdbRaftStorage(
                data / "raft", map_size_bytes=settings.map_size_mb * MIB,
                max_map_size_bytes=settings.max_map_size_mb * MIB,
                unsafe_no_fsync=settings.unsafe_no_fsync)
            self.snapshots = LmdbSnapshotStore(
                data / "snapshots", max_map_size_bytes=max(settings.max_map_size_mb, 256) * MIB)
        except StorageError as e:
            raise StartupError(str(e)) from None
        rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        http_host, http_port = parse_host_port(settings.http_addr, "RAFTKV_HTTP_ADDR")
        raft_host, raft_port = parse_host_port(settings.raft_addr, "RAFTKV_RAFT_ADDR")
        self._http_bind = (http_host, http_port)

        identity = self.storage.identity()
        addresses = dict(settings.peer_map)
        if identity is None and (self.storage.last_index() > 0
                                 or self.storage.hard_state().term > 0):
            raise StartupError(
                f"the data dir {data} holds Raft state but no identity (a join that never "
                "finished?): it is not bootstrapped again over that state. Start it with "
                "RAFTKV_JOIN, or move the data dir away to start empty")
        if identity is None:
            if settings.peer_map and not settings.join:
                cluster_id = derive_cluster_id(settings.peer_map)
                _write_bootstrap_log(self.storage, settings.peer_map)
                log.info("event=bootstrap node=%s cluster=%s members=%s", settings.node_id,
                         cluster_id, ",".join(sorted(settings.peer_map)))
            elif settings.join:
                cluster_id = ""  # learned from the cluster below
            else:
                raise StartupError(
                    f"the data dir {data} is empty and neither RAFTKV_PEERS (to bootstrap a "
                    "new cluster) nor RAFTKV_JOIN (to join one) is set: set one of them")
        else:
            if identity.node_id != settings.node_id:
                raise StartupError(
                    f"the data dir {data} belongs to node {identity.node_id!r}, not "
                    f"{settings.node_id!r}: use RAFTKV_ID={identity.node_id} or another "
                    "data dir")
            cluster_id = identity.cluster_id

        self.sm = KVStateMachine()
        try:
            boot, stored = load_boot_state(self.storage, self.snapshots, BASE_MEMBERSHIP)
            if stored is not None:
                self.sm.restore_chunks(self.snapshots.chunks(stored), stored.meta.index)
        except (StorageError, StateMachineError, ValueError) as e:
            raise StartupError(f"cannot load the state in {data}: {e}. If the data is "
                               "damaged, move the data dir away and let the node rejoin "
                               "empty (RAFTKV_JOIN)") from None
        addresses.update(self.sm.addresses)
        # Millions of long-lived objects make every full collection stall all threads for
        # tens of milliseconds: move what boot loaded out of the collector's sight and make
        # young-generation collections rarer.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        config = Config(
            settings.node_id,
            election_timeout_ticks=settings.election_ticks,
            heartbeat_interval_ticks=settings.heartbeat_ticks,
            max_snapshot_bytes=settings.effective_max_snapshot_bytes,
        )
        try:
            core = RaftNode(config, boot, rng, snapshot_reader=chunk_reader(self.snapshots),
                            snapshot_validator=self.sm.snapshot_decoder)
        except (RaftError, AssertionError, ValueError) as e:
            raise StartupError(f"the log in {data} is inconsistent ({e}); move the data dir "
                               "away and let the node rejoin empty") from None

        token = settings.cluster_token  # checked by Settings: never empty, never a default
        self._token = token
        self.transport = PeerTransport(
            node_id=settings.node_id, cluster_id=cluster_id,
            token=token, bind_host=raft_host, bind_port=raft_port,
            http_address=settings.http_advertise_addr,
            on_frame=self._deliver,
            on_peer_state=self._peer_state,
            source_host=peer_source_host(raft_host))
        self.loop = RaftLoop(
            core=core, storage=self.storage, snapshots=self.snapshots, state_machine=self.sm,
            frames=self.transport, addresses=addresses, tick_s=settings.tick_ms / 1000,
            snapshot_policy=SnapshotPolicy(settings.snapshot_entries, settings.snapshot_trailing),
            on_fatal=self._on_fatal, rng=rng)
        self._cluster_id = cluster_id
        self._identity = identity
        # A node whose join finished but that stopped before anything came from the cluster
        # (no snapshot, no log: no member, no address) would refuse every peer as unknown
        # when restarted: it joins again (the leader answers for a known member at once).
        self._needs_join = bool(settings.join) and (
            identity is None or not core.membership.members)
        if identity is not None and settings.join:
            if self._needs_join:
                log.info("event=join_resumed node=%s reason=no_member_known", settings.node_id)
            else:
                log.info("event=join_ignored node=%s reason=data_dir_has_state",
                         settings.node_id)
        if identity is None and not self._needs_join:
            self.storage.set_identity(NodeIdentity(settings.node_id, cluster_id,
                                                   FORMAT_VERSION))

    def _deliver(self, frm: str, kind: int, payload: bytes) -> None:
        self.loop.deliver(frm, kind, payload)

    def _peer_state(self, peer: str, up: bool) -> None:
        self.loop.note_peer_state(peer, up)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        s = self.settings
        try:
            self.transport.start()
        except OSError as e:
            raise StartupError(f"cannot listen for peers on {s.raft_addr}: {e.strerror}; is "
                               "another process using that port?") from None
        self.loop.start()
        if self._needs_join:
            self._join()
        self.service = NodeService(
            loop=self.loop, cluster_id=self._cluster_id, http_address=s.http_advertise_addr,
            peer_http_address=self.transport.peer_http_address,
            probe_node_id=self._probe, max_watches=max(1, s.http_threads // 2),
            quota_bytes=s.effective_quota_bytes)
        from raftkv.http.app import create_app
        from raftkv.http.server import serve

        self.loop.metrics.watch_state(self.loop.metrics_state)
        app = create_app(self.service, default_timeout_s=s.request_timeout_ms / 1000,
                         metrics=self.loop.metrics)
        try:
            server = serve(app, self._http_bind[0], self._http_bind[1], threads=s.http_threads,
                           head_timeout_s=s.http_head_timeout_ms / 1000,
                           max_connections_per_client=s.http_max_connections_per_client)
        except OSError as e:
            self.loop.stop()
            self.transport.close()
            raise StartupError(f"cannot listen for HTTP on {s.http_addr}: {e.strerror}; is "
                               "another process using that port?") from None
        self._http = server
        self._http_thread = threading.Thread(target=server.run, name="http", daemon=True)
        self._http_thread.start()
        log.info("event=node_started node=%s http=%s raft=%s cluster=%s", s.node_id,
                 s.http_addr, s.raft_addr, self._cluster_id or "-")

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until stop() or a fatal error (True), or until the timeout (False). The main
        thread should wait with a timeout, in a loop: CPython runs signal handlers only there,
        and an untimed wait may never wake for a signal the kernel gave another thread."""
        return self._stopped.wait(timeout_s)

    def stop(self, transfer_leadership: bool = True) -> None:
        with self._stop_lock:  # one shutdown at a time: a second caller waits for the first
            if self._stopped.is_set():
                return
            if transfer_leadership and self.loop.fatal is None:
                self._hand_over_leadership()
            if self._http is not None:
                self.service.end_watches()  # long polls answer now, not when HTTP gives up
                self._http.close()  # type: ignore[attr-defined]
            self.loop.stop()
            self.transport.close()
            self.storage.close()
            self.snapshots.close()
            log.info("event=node_stopped node=%s", self.settings.node_id)
            self._stopped.set()

    def _on_fatal(self, reason: str) -> None:
        self.fatal = reason
        threading.Thread(target=self.stop, args=(False,), daemon=True).start()

    def _hand_over_leadership(self) -> None:
        """A leader that stops hands over to a caught-up voter: no election timeout."""
        loop = self.loop
        if loop.role is not Role.LEADER:
            return

        def pick() -> str | None:
            try:
                return loop.transfer_leadership(None)
            except (NotLeader, RaftError, ServiceError):
                return None

        w = loop.call(pick)
        if not w.wait(1.0) or w.result is None:
            return
        target = w.result
        deadline = time.monotonic() + self.settings.tick_ms * self.settings.election_ticks / 500
        while time.monotonic() < deadline and loop.role is Role.LEADER:
            time.sleep(self.settings.tick_ms / 1000)
        log.info("event=leadership_handed_over node=%s to=%s done=%s", self.settings.node_id,
                 target, loop.role is not Role.LEADER)

    # ------------------------------------------------------------------ joining
    def _probe(self, raft_address: str, timeout_s: float) -> str:
        info = probe(raft_address, cluster_id=self._cluster_id,
                     token=self._token, node_id=self.settings.node_id,
                     timeout_s=timeout_s)
        return info.node_id

    def _join(self) -> None:
        s = self.settings
        url = s.join_url
        body = json.dumps({"id": s.node_id, "address": s.raft_advertise_addr}).encode()
        deadline = time.monotonic() + 60
        last_error = ""
        while time.monotonic() < deadline:
            try:
                status = _http_json(f"{url}/status", None, 5.0)
                cluster_id = str(status["cluster_id"])
                listing = _http_json(f"{url}/cluster", None, 5.0)["members"]
                if not isinstance(listing, list):
                    raise ValueError("unexpected /cluster answer")
                addresses = {str(m["id"]): str(m["raft_address"]) for m in listing}
                self.transport.set_cluster_id(cluster_id)
                self.loop.call(functools.partial(self.loop.learn_addresses, addresses)).wait(2.0)
                _http_json(f"{url}/cluster/join", body, 30.0)
                self._cluster_id = cluster_id
                self.storage.set_identity(NodeIdentity(s.node_id, cluster_id, FORMAT_VERSION))
                log.info("event=joined node=%s cluster=%s via=%s", s.node_id, cluster_id, url)
                return
            except (OSError, ValueError, KeyError, TypeError) as e:
                last_error = str(e)
                time.sleep(0.5)
        self.loop.stop()
        self.transport.close()
        raise StartupError(f"could not join the cluster via {url}: {last_error}; check "
                           "RAFTKV_JOIN and that the cluster has a leader")


def peer_source_host(raft_bind_host: str) -> str | None:
    """The local address outgoing peer connections leave from: the raft bind host when it is
    one IP address (the listener is bound to it, so it is local; each node's peer traffic then
    carries its own address both ways), None for a wildcard or a host name (the kernel picks).
    """
    try:
        ip = ipaddress.ip_address(raft_bind_host)
    except ValueError:
        return None
    return None if ip.is_unspecified else str(ip)


def _write_bootstrap_log(storage: LmdbRaftStorage, peers: dict[str, str]) -> None:
    """A new static cluster: every member writes the same committed log of its initial
    members (term 1, one ADD_VOTER each), so membership lives in the log and snapshots and a
    node that joins later learns it like any other entry."""
    entries = [
        Entry(i, 1, EntryKind.CONF_CHANGE, change=ConfChange(ConfChangeOp.ADD_VOTER, nid, addr))
        for i, (nid, addr) in enumerate(sorted(peers.items()), start=1)
    ]
    storage.save(HardState(1, None, len(entries)), entries)


def _http_json(url: str, body: bytes | None, timeout_s: float) -> dict[str, object]:
    req = urllib.request.Request(url, data=body, method="POST" if body else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url} answered {e.code}: {e.read()[:200]!r}") from None
    if not isinstance(answer, dict):
        raise ValueError(f"{url} gave an unexpected answer")
    return answer

