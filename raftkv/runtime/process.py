"""The Raft process of one node: the composition root. It wires the parts together and runs
them on ONE thread (raftkv.runtime.eventloop):

    startup.open_node         stores, the start decision, boot state
    transport.PeerTransport   frames to and from the peers
    driver.RaftDriver         the core, Ready handling, proposals, reads, leases, snapshots
    forwarding.Forwarder      follower -> leader operations
    requests.RequestHandler   what the HTTP workers ask
    workers.WorkerSupervisor  the HTTP worker processes (raftkv.worker) and their channels

Life: bind both ports, (join the cluster if asked), start the workers, serve. SIGTERM or SIGINT:
a leader first hands leadership to a caught-up voter, then watches end, the workers finish
what they serve and exit, and the stores close. A local storage failure stops the node the
same way, without the hand-over, and the exit status is 1.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Final

from raftkv import codec
from raftkv.codec import FrameKind
from raftkv.core import Config, RaftError, RaftNode, Role, SoftState
from raftkv.kv.leases import min_lease_ttl_s
from raftkv.metrics import NodeMetrics
from raftkv.ports import NodeIdentity, StorageError
from raftkv.runtime.driver import CONF_CHANGE_WAIT_S, RaftDriver
from raftkv.runtime.eventloop import EventLoop
from raftkv.runtime.forwarding import Forwarder
from raftkv.runtime.ready_handler import chunk_reader
from raftkv.runtime.requests import PROBE_MISMATCH, NodeInfo, RequestHandler
from raftkv.runtime.scheduling import apply_cpu_scheduling
from raftkv.runtime.startup import FORMAT_VERSION, StartupError, join_headers, open_node
from raftkv.runtime.transport import DEFAULT_MAX_FRAME_BYTES, PeerTransport
from raftkv.runtime.transport.refusals import RateLimitedLog
from raftkv.runtime.transport.tls import PeerTLS, TLSMode, TLSSetupError
from raftkv.runtime.workers import WorkerSupervisor
from raftkv.service import ServiceError, UnavailableError
from raftkv.settings import (
    Settings,
    SettingsError,
    is_wildcard_host,
    parse_host_port,
    without_scheme,
)
from snapshots.policy import SnapshotPolicy

__all__ = ["RaftProcess", "StartupError", "peer_source_host", "raft_config"]

log = logging.getLogger(__name__)

BIND_RETRY_S: Final = 10.0
"""How long to retry binding a port still held (by the workers of a previous run, exiting)."""
WORKER_STOP_S: Final = 5.0
JOIN_TIMEOUT_S: Final = 60.0
JOIN_RETRY_WARNING_S: Final = 10.0
"""A join that keeps failing says why at once, then this often, until JOIN_TIMEOUT_S."""


def bound_socket(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """socket.create_server's socket (SO_REUSEADDR), without its listen()."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def peer_source_host(raft_bind_host: str) -> str | None:
    """The local address outgoing peer connections leave from: the raft bind host when it is
    one IP address (each node's peer traffic then carries its own address both ways), None
    for a wildcard or a host name (the kernel picks)."""
    try:
        ip = ipaddress.ip_address(raft_bind_host)
    except ValueError:
        return None
    return None if ip.is_unspecified else str(ip)


def _bind(host: str, port: int, what: str, setting: str, backlog: int | None) -> socket.socket:
    """A socket bound to host:port, listening unless `backlog` is None (then listen() later:
    until then a client is refused at once rather than left waiting in a backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        try:
            if backlog is not None:
                return socket.create_server((host, port), family=family, backlog=backlog)
            return bound_socket(host, port, family)
        except OSError as e:
            if e.errno == 98 and time.monotonic() < deadline:  # EADDRINUSE: maybe exiting
                time.sleep(0.1)
                continue
            raise StartupError(f"cannot listen for {what} on {host}:{port} ({setting}): "
                               f"{e.strerror}; is another process using that port?") from None


HTTP_BACKLOG: Final = 2048
CATCH_UP_WARNING_S: Final = 30.0
"""How often a joined node that has not yet applied its own addition says so."""


def raft_config(s: Settings, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Config:
    """The core's settings for this node. StartupError if a message the core may send
    (codec.raft_message_bound) would not fit in a frame of `max_frame_bytes`, the bound peers
    read with: the link refuses to send a larger frame (and logs it), and a follower that
    needs that message would stall (never catch up)."""
    config = Config(s.node_id, election_timeout_ticks=s.election_ticks,
                    heartbeat_interval_ticks=s.heartbeat_ticks,
                    max_snapshot_bytes=s.effective_max_snapshot_bytes)
    bound = codec.raft_message_bound(config)
    if bound >= max_frame_bytes:  # a frame's length counts its kind byte too
        raise StartupError(
            f"a Raft message may take {bound} bytes (max_append_bytes="
            f"{config.max_append_bytes}, max_entry_bytes={config.max_entry_bytes}, "
            f"snapshot_chunk_bytes={config.snapshot_chunk_bytes}), more than a peer frame "
            f"holds ({max_frame_bytes - 1} bytes and its kind byte)")
    return config


class RaftProcess:
    def __init__(self, settings: Settings) -> None:
        self.settings = s = settings
        self.token = s.cluster_token  # Settings.validate refused to go on without one
        self.exit_code = 0
        self._removed_from: set[str] = set()
        """Members that refused us as removed from the cluster (since a link last came up)."""
        self._replaced_by: set[str] = set()
        """Members that refused us as a member whose data dir was replaced (since a link to
        each last came up)."""
        self._waiting_for_addition = False
        """A joined node waiting to apply its own addition before its workers start."""
        self._said_waiting = False
        self._join_headers = join_headers(s) if s.join else {}
        # The TLS files are checked before the data dir is touched: a bootstrap writes it,
        # and a start refused after that would leave a cluster of the refused settings.
        try:
            peer_tls = PeerTLS.load(TLSMode(s.peer_tls_mode), s.peer_cert_file,
                                    s.peer_key_file, s.peer_trusted_ca_file)
        except TLSSetupError as e:
            raise StartupError(str(e)) from None
        config = raft_config(s, DEFAULT_MAX_FRAME_BYTES)  # the bound the transport reads with
        state = open_node(s)
        self.state = state
        self.cluster_id = state.plan.cluster_id
        http_host, http_port = parse_host_port(s.http_addr, "RAFTKV_HTTP_ADDR")
        raft_host, raft_port = parse_host_port(s.raft_addr, "RAFTKV_RAFT_ADDR")
        try:
            raft_sock = _bind(raft_host, raft_port, "peers", "RAFTKV_RAFT_ADDR", 128)
            try:
                # Bound now (the port is ours, a conflict stops the start), listening only
                # once the workers start: a joining node does not take requests it cannot
                # serve yet, to run them after their clients gave up.
                self.http_sock = _bind(http_host, http_port, "HTTP", "RAFTKV_HTTP_ADDR", None)
            except BaseException:
                raft_sock.close()
                raise
        except BaseException:
            state.close()
            raise
        self.http_sock.set_inheritable(True)
        rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        try:
            core = RaftNode(config, state.boot, rng,
                            snapshot_reader=chunk_reader(state.snapshots),
                            snapshot_validator=state.sm.snapshot_decoder)
        except (RaftError, AssertionError, ValueError) as e:
            raft_sock.close()
            self.http_sock.close()
            state.close()
            raise StartupError(f"the log in {s.data_dir} is inconsistent ({e}); move the data "
                               "dir away and let the node rejoin empty") from None
        try:  # only now that the data dir proved sound (a damaged catalog orphans every chunk)
            state.snapshots.discard_partial()
        except StorageError as e:  # cleanup only: the chunks wait for the next start
            log.warning("event=snapshot_partial_discard_failed node=%s error=%s", s.node_id, e)
        self.peer_tls = peer_tls
        self.loop = loop = EventLoop()
        self.metrics = NodeMetrics()
        self.transport = PeerTransport(
            loop, node_id=s.node_id, cluster_id=self.cluster_id, token=self.token,
            listen_sock=raft_sock, http_address=s.http_advertise_addr, deliver=self._deliver,
            on_peer_state=self._peer_state, on_removed_by=self._removed_by,
            incarnation=state.incarnation,
            check_incarnation=self._check_incarnation,
            on_replaced_by=self._replaced_by_peer,
            max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
            source_host=peer_source_host(raft_host),
            tls=peer_tls)
        self.driver = driver = RaftDriver(
            core=core, storage=state.storage, snapshots=state.snapshots, state_machine=state.sm,
            # A node that joins links no peer before its join checks passed (RAFTKV_PEERS
            # may be set beside RAFTKV_JOIN, as in docker-compose): it learns the members'
            # addresses from the cluster, once it knows it may take part.
            frames=self.transport, addresses={} if state.plan.needs_join else s.peer_map,
            snapshot_policy=SnapshotPolicy(s.snapshot_entries, s.snapshot_trailing), rng=rng,
            metrics=self.metrics, post=loop.call_soon_threadsafe,
            boot_commit=state.boot.hard_state.commit,
            wake_at=lambda when: loop.call_at(when, _nothing),
            persist_defer_s=s.persist_defer_s, quota_bytes=s.effective_quota_bytes,
            conf_change_wait_s=min(CONF_CHANGE_WAIT_S, s.request_timeout_ms / 2000))
        driver.incarnation = state.incarnation
        self.forwarder = Forwarder(driver, self.transport, rng)
        driver.forwarder = self.forwarder
        _warn_of_moved_addresses(s, driver)
        driver.handler.before_persist = self._flush_outputs
        self.handler = RequestHandler(
            driver=driver, loop=loop,
            info=NodeInfo(s.node_id, s.http_advertise_addr, Path(s.data_dir), self.token,
                          peer_tls.client if peer_tls.mode.dials_tls else None,
                          source_host=self.transport.source_host),  # a probe leaves as a link
            cluster_id=lambda: self.cluster_id, peer_http=self.transport.peer_http_address,
            extra_status=self._extra_status, render_metrics=self.metrics.render)
        self.workers = WorkerSupervisor(
            loop, count=s.http_workers or (os.cpu_count() or 1), listen_sock=self.http_sock,
            config={"node_id": s.node_id, "http_address": s.http_advertise_addr,
                    "request_timeout_ms": s.request_timeout_ms, "log_level": s.log_level,
                    "min_lease_ttl_s": min_lease_ttl_s(s.election_ticks * s.tick_ms / 1000),
                    "metrics_open": s.metrics_open,
                    "head_timeout_ms": s.http_head_timeout_ms,
                    "max_connections_per_client": s.http_max_connections_per_client},
            handler=self.handler, metrics=self.metrics, view=self._view)
        driver.state_listeners.append(self._on_state)
        self.metrics.watch_state(self._metrics_state)
        self.metrics.watch_workers(self.workers.stats)
        loop.add_turn_hook(self._end_of_turn)
        self._drops = RateLimitedLog()
        self._tick_s = s.tick_ms / 1000
        self._next_tick = 0.0
        self._stopping = False
        self._stopped_serving = False
        self._scheduling = "unchanged"

    # ------------------------------------------------------------------ running
    def run(self) -> int:
        """Serve until stopped; the exit status (0, or 1 after a fatal storage error)."""
        previous = signal.set_wakeup_fd(self.loop.wake_fd)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self._scheduling = apply_cpu_scheduling(self.settings.cpu_scheduling,
                                                    self.settings.node_id)
            self.driver.sync_peers()
            self._next_tick = time.monotonic() + self._tick_s
            self.loop.call_at(self._next_tick, self._tick)
            if self.state.plan.needs_join:
                threading.Thread(target=self._join, name="join", daemon=True).start()
            else:
                self._serve_once_a_member(self.state.joining)
            self.loop.run()
        finally:
            signal.set_wakeup_fd(previous)
            self._close()
        return self.exit_code

    def _serve(self) -> None:
        s = self.settings
        self.http_sock.listen(HTTP_BACKLOG)
        self.workers.start()
        log.info("event=node_started node=%s http=%s raft=%s cluster=%s workers=%d "
                 "cpu_scheduling=%s", s.node_id, s.http_addr, s.raft_addr,
                 self.cluster_id or "-", len(self.workers.channels), self._scheduling)

    def _tick(self) -> None:
        self.driver.tick()
        now = time.monotonic()
        self._next_tick += self._tick_s
        if now - self._next_tick > 5 * self._tick_s:
            self._next_tick = now + self._tick_s  # we were stalled: do not burst ticks
        self.loop.call_at(self._next_tick, self._tick)

    def _end_of_turn(self) -> bool:
        self.driver.process()
        self._flush_outputs()
        if self._waiting_for_addition:
            self._serve_once_caught_up()
        return False

    def _flush_outputs(self) -> None:
        """Forwards, forward results, peer frames and worker replies: at the end of every
        turn, and before every fsync (answers to applied writes do not wait for it)."""
        self.forwarder.flush()
        self.transport.flush()
        self.workers.flush()

    def _deliver(self, peer: str, frames: list[tuple[int, bytes]]) -> None:
        driver = self.driver
        for kind, payload in frames:
            if kind == FrameKind.RAFT:
                try:
                    message = codec.decode_message(payload)
                except codec.DecodeError as e:
                    self._dropped(peer, "malformed_message", str(e))
                    continue
                problem = driver.step(peer, message)
                if problem is not None:
                    self._dropped(peer, "invalid_message", problem)
            elif kind == FrameKind.FORWARD:
                self.forwarder.serve(peer, payload)
            elif kind == FrameKind.FORWARD_RESULT:
                self.forwarder.on_results(peer, payload)

    def _dropped(self, peer: str, reason: str, detail: str) -> None:
        suppressed = self._drops.admit(peer, reason)
        if suppressed is not None:
            log.warning("event=peer_message_dropped node=%s peer=%s reason=%s suppressed=%d "
                        "detail=%r", self.settings.node_id, peer, reason, suppressed,
                        detail[:200])

    def _peer_state(self, peer: str, up: bool) -> None:
        self.driver.note_peer_state(peer, up)
        if up and self._removed_from:  # a member took us in: we are one (again)
            self._removed_from.clear()
            log.info("event=member_again node=%s via=%s", self.settings.node_id, peer)
        if up:
            self._replaced_by.discard(peer)

    def _removed_by(self, peer: str) -> None:
        """`peer` refused our handshake as a member removed from the cluster."""
        if not self._removed_from:
            nid = self.settings.node_id
            log.warning("event=removed_from_cluster node=%s by=%s: the members no longer count "
                        "this node, so it will never hear from a leader: stop it. To add it "
                        "back, move its data dir away and start it with RAFTKV_JOIN", nid, peer)
        self._removed_from.add(peer)

    def _check_incarnation(self, node_id: str, incarnation: str) -> str | None:
        return self.driver.check_incarnation(node_id, incarnation)

    def _replaced_by_peer(self, peer: str) -> None:
        """`peer` refused our handshake: the cluster recorded another data dir for us."""
        if not self._replaced_by:
            nid = self.settings.node_id
            log.error("event=replaced_member node=%s by=%s: %s knows %s on another data "
                      "dir: this one (%s) was wiped or replaced, and a voter that forgot what "
                      "it acknowledged can help elect a node that missed committed writes, so "
                      "the members refuse it. Stop this node, remove it (raftkv members remove "
                      "%s --urls <a member>), then start it again with RAFTKV_JOIN and an "
                      "empty data dir. (A node just added back after such a removal can meet "
                      "this from a member that has not applied the removal yet: it clears "
                      "once that member has.)", nid, peer, peer, nid, self.settings.data_dir,
                      nid)
        self._replaced_by.add(peer)

    # ------------------------------------------------------------------ state for others
    def _view(self) -> dict[str, object]:
        """What every worker keeps: pushed at start and on every change."""
        driver = self.driver
        return {"role": driver.role.value, "term": driver.term, "leader": driver.leader,
                "leader_http": self.handler.leader_http_address(), "fatal": driver.fatal,
                "stopping": self._stopping, "cluster_id": self.cluster_id,
                "auth": driver.sm.token_table.to_wire()}

    def _on_state(self, ss: SoftState) -> None:
        self.workers.push()
        if self.driver.fatal is not None and not self._stopping:
            self.exit_code = 1
            self._begin_stop(hand_over=False)

    def _extra_status(self) -> dict[str, object]:
        return {"workers": self.workers.describe(),
                "removed_from_cluster": bool(self._removed_from),
                "replaced_in_cluster": bool(self._replaced_by),
                "forwards_waiting": self.forwarder.waiting,
                "unauthenticated_peer_connections": self.transport.unauthenticated_connections}

    def _metrics_state(self) -> dict[str, object]:
        driver = self.driver
        core = driver.core
        return {"term": driver.term, "role": driver.role.value, "commit_index": core.log.commit,
                "applied_index": driver.sm.applied_index, "last_index": core.log.last_index(),
                "snapshot_index": driver.last_snapshot_index, "peers": dict(driver.reachable),
                "leases_live": len(driver.sm.lease_ttls), "watches": len(driver.watches)}

    # ------------------------------------------------------------------ joining
    def _join(self) -> None:
        """Off the loop: ask a member (RAFTKV_JOIN) to add this node; the loop serves the
        leader's appends meanwhile."""
        s = self.settings
        url = s.join_url
        headers = self._join_headers
        body = json.dumps({"id": s.node_id, "address": s.raft_advertise_addr}).encode()
        if names_own_socket(url, self.http_sock, s.http_advertise):
            self.loop.call_soon_threadsafe(functools.partial(
                self._join_refused, "join_names_this_node",
                f"RAFTKV_JOIN={url} is this node's own HTTP address (it listens only once it "
                "is a member): name a running member of the cluster to join"))
            return
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        last_error = ""
        asked = False
        said_at: float | None = None
        while time.monotonic() < deadline and not self._stopping:
            if last_error and (said_at is None
                               or time.monotonic() - said_at >= JOIN_RETRY_WARNING_S):
                said_at = time.monotonic()
                log.warning("event=join_retrying node=%s via=%s error=%s gives_up_in_s=%d",
                            s.node_id, url, last_error, max(0, deadline - said_at))
            try:
                status = _http_json(f"{url}/status", None, 5.0, headers)
                cluster_id = str(status["cluster_id"])
                listing = _http_json(f"{url}/cluster", None, 5.0, headers)["members"]
                if not isinstance(listing, list):
                    raise ValueError("unexpected /cluster answer")
                addresses = {str(m["id"]): str(m["raft_address"]) for m in listing}
                mine = self.state.plan.cluster_id
                if mine and cluster_id != mine:
                    error = (f"this data dir belongs to cluster {mine}, and {url} is a member "
                             f"of cluster {cluster_id}: move the data dir away to join that "
                             "cluster")
                    self.loop.call_soon_threadsafe(functools.partial(
                        self._join_refused, "other_cluster", error))
                    return
                if not asked and any(m.get("id") == s.node_id and m.get("voter") is True
                                     for m in listing):
                    # This node starts knowing no member (no log, no snapshot), yet the
                    # cluster counts it as a voter, which it became only after storing the
                    # log: that log is lost. Checked before any peer is let in, so it casts
                    # no vote: a voter that forgot what it acknowledged can lose writes.
                    nid = s.node_id
                    self.loop.call_soon_threadsafe(functools.partial(
                        self._join_refused, "voter_without_log",
                        f"the cluster counts {nid} as a voter, but this data dir holds none of "
                        "its log (lost or replaced), and a voter that forgot what it "
                        "acknowledged can lose committed writes. Remove it first (raftkv "
                        f"members remove {nid} --urls <a member>), then start it again with "
                        "RAFTKV_JOIN and an empty data dir"))
                    return
                learnt = threading.Event()

                def learn(cid: str = cluster_id, addrs: dict[str, str] = addresses,
                          done: threading.Event = learnt) -> None:
                    # The identity before any Raft state: a node stopped mid-join restarts
                    # as this cluster's (and joins again, or goes on from what it stored).
                    self.cluster_id = cid
                    self.state.storage.set_identity(
                        NodeIdentity(s.node_id, cid, FORMAT_VERSION))
                    # Before any entry can come: until it has applied its own addition, a
                    # restart of this node waits for that too (_serve_once_a_member).
                    self.state.storage.set_joining(True)
                    self.transport.set_cluster_id(cid)
                    self.driver.learn_addresses(addrs)
                    done.set()

                self.loop.call_soon_threadsafe(learn)
                learnt.wait(5.0)
                asked = True
                answer = _http_json(f"{url}/cluster/join", body, 30.0, headers)
                index = answer.get("index")
                self.loop.call_soon_threadsafe(functools.partial(
                    self._joined, url, index if isinstance(index, int) else 0))
                return
            except _Refused as e:
                if e.status in _JOIN_TOKEN_ADVICE:  # final: waiting will not make it an admin
                    reason, advice = _JOIN_TOKEN_ADVICE[e.status]
                    self.loop.call_soon_threadsafe(functools.partial(
                        self._join_refused, reason, advice))
                    return
                if e.status == 409 and e.body.get("probe") == PROBE_MISMATCH:
                    # Final too: the member probed our raft address and found another node,
                    # or none of this cluster (other 409s may pass: a change under way).
                    self.loop.call_soon_threadsafe(functools.partial(
                        self._join_refused, "wrong_identity",
                        f"{url} probed this node's raft address {s.raft_advertise_addr} and "
                        f"did not find {s.node_id} there: {e.message}. Check that the address "
                        "(RAFTKV_RAFT_ADVERTISE, else its entry in RAFTKV_PEERS, else "
                        "RAFTKV_RAFT_ADDR) is this node's own raft address as the members reach "
                        f"it, that its peer certificate (under peer TLS) names {s.node_id}, and "
                        "that it holds this cluster's token (RAFTKV_CLUSTER_TOKEN); then start "
                        "it again"))
                    return
                last_error = str(e)
                time.sleep(0.5)
            except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as e:
                last_error = str(e) or type(e).__name__
                time.sleep(0.5)
        error = last_error

        def failed() -> None:
            log.error("event=join_failed node=%s via=%s error=%s", s.node_id, url, error)
            self.exit_code = 2
            self._begin_stop(hand_over=False)

        self.loop.call_soon_threadsafe(failed)

    def _joined(self, url: str, index: int) -> None:
        """Added at `index` (committed: a member answers a join only then). The workers start
        once this node has applied its own addition: until then its state (the token table
        above all) is an empty or partial one, and its workers would let in, without a token,
        requests that a cluster with auth refuses (found by a review). Its HTTP socket
        listens only from then on: connections are refused meanwhile, never left in a
        backlog to run after their clients gave up."""
        s = self.settings
        log.info("event=joined node=%s cluster=%s via=%s index=%d applied=%d", s.node_id,
                 self.cluster_id, url, index, self.driver.sm.applied_index)
        if not self._stopping:
            self._serve_once_a_member(True)

    def _serve_once_a_member(self, joining: bool) -> None:
        """Serve now, or, for a node whose join began (`joining`: the data dir's mark), once
        the membership it applied holds it. A membership rather than an index: an index a
        member answered could belong to an entry a new leader overwrote."""
        self._waiting_for_addition = joining
        self._serve_once_caught_up()
        if self._waiting_for_addition:
            self.loop.call_later(CATCH_UP_WARNING_S, self._still_catching_up)

    def _serve_once_caught_up(self) -> None:
        if self._stopping:
            return
        if self._waiting_for_addition:
            if self.settings.node_id not in self.driver.sm.addresses:
                if (not self._said_waiting and self.driver.sm.applied_index
                        >= self.state.boot.hard_state.commit):  # what it stored is applied
                    self._said_waiting = True
                    log.info("event=catching_up node=%s applied=%d: its join began and it has "
                             "not applied its own addition yet: it serves HTTP once it has",
                             self.settings.node_id, self.driver.sm.applied_index)
                return
            self._waiting_for_addition = False
            try:
                self.state.storage.set_joining(False)
            except StorageError as e:
                self.driver.die(f"storage failure: {e}")
                return
        self._serve()

    def _still_catching_up(self) -> None:
        if not self._waiting_for_addition or self._stopping:
            return
        if not self._removed_from:  # else event=removed_from_cluster said what to do
            log.warning("event=catching_up node=%s applied=%d: this node serves HTTP once it "
                        "has applied its own addition to the cluster. If nothing comes, the "
                        "leader cannot reach it: check that its raft address in the "
                        "membership (raftkv members list) is reachable from the members",
                        self.settings.node_id, self.driver.sm.applied_index)
        self.loop.call_later(CATCH_UP_WARNING_S, self._still_catching_up)

    def _join_refused(self, reason: str, advice: str) -> None:
        log.error("event=join_refused node=%s reason=%s: %s", self.settings.node_id, reason,
                  advice)
        self.exit_code = 2
        self._begin_stop(hand_over=False)

    # ------------------------------------------------------------------ stopping
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.loop.call_soon_threadsafe(lambda: self._begin_stop(hand_over=True))

    def _begin_stop(self, *, hand_over: bool) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.workers.push()
        driver = self.driver
        if hand_over and driver.fatal is None and driver.role is Role.LEADER:
            try:
                target = driver.transfer_leadership(None)
            except ServiceError:
                target = None
            if target is not None and target != self.settings.node_id:
                s = self.settings
                deadline = time.monotonic() + s.tick_ms * s.election_ticks / 500
                self._await_hand_over(target, deadline)
                return
        self._stop_serving()

    def _await_hand_over(self, target: str, deadline: float) -> None:
        if self.driver.role is not Role.LEADER or time.monotonic() >= deadline:
            log.info("event=leadership_handed_over node=%s to=%s done=%s",
                     self.settings.node_id, target, self.driver.role is not Role.LEADER)
            self._stop_serving()
            return
        self.loop.call_later(self._tick_s, lambda: self._await_hand_over(target, deadline))

    def _stop_serving(self) -> None:
        if self._stopped_serving:
            return
        self._stopped_serving = True
        self.driver.watches.close(UnavailableError("the node is stopping"))
        self.workers.on_all_exited = self.loop.stop
        self.workers.stop()
        self.loop.call_later(WORKER_STOP_S, self._workers_too_slow)

    def _workers_too_slow(self) -> None:
        log.warning("event=workers_killed node=%s reason=did_not_stop_in_time",
                    self.settings.node_id)
        self.workers.kill()
        self.loop.stop()

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.workers.kill()
        self.driver.fail_everything(UnavailableError("the node stopped"))
        self.transport.close()
        with contextlib.suppress(OSError):
            self.http_sock.close()
        self.state.close()
        self.loop.close()
        log.info("event=node_stopped node=%s", self.settings.node_id)


def _nothing() -> None:
    pass


def _warn_of_moved_addresses(s: Settings, driver: RaftDriver) -> None:
    """The membership's addresses (from the log and snapshot) win over the settings': say
    so when they differ, since the members dial what the membership holds (a node restarted
    on a new address was cut off without a word). A wildcard listen address is compared by
    its port (unless an advertised address says where the members reach it)."""
    stored = driver.address_of(s.node_id)
    if stored:
        advertised = s.raft_advertise_addr
        try:
            _stored_host, stored_port = parse_host_port(stored, "the stored address")
            advertised_host, _port = parse_host_port(advertised, "RAFTKV_RAFT_ADVERTISE")
            _host, listen_port = parse_host_port(s.raft_addr, "RAFTKV_RAFT_ADDR")
        except SettingsError:  # an address an older version recorded: nothing to compare
            return
        if not is_wildcard_host(advertised_host) and advertised != stored:
            configured = advertised
        elif not s.raft_advertise and listen_port != stored_port:
            configured = s.raft_addr
        else:
            configured = ""
        if configured:
            log.warning("event=address_mismatch node=%s stored=%s configured=%s: the members "
                        "dial this node at %s (the membership's address), not at %s. If it "
                        "moved, remove it and add it again at the new address (raftkv members "
                        "remove, then start it empty with RAFTKV_JOIN); otherwise give it back "
                        "%s (or, behind a port mapping, RAFTKV_RAFT_ADVERTISE=%s)", s.node_id,
                        stored, configured, stored, configured, stored, stored)
    for nid, configured in sorted(s.peer_map.items()):
        known = driver.address_of(nid)
        if nid != s.node_id and known and known != configured:
            log.warning("event=peers_setting_ignored node=%s member=%s stored=%s configured=%s:"
                        " RAFTKV_PEERS only bootstraps a cluster; the membership's address is "
                        "dialled", s.node_id, nid, known, configured)


class _Refused(ValueError):
    """An HTTP error answer (`status`); `body`: its JSON object ({} if it was none),
    `message`: its "message" (at most MAX_ANSWER_MESSAGE_CHARS, on one line)."""

    def __init__(self, status: int, text: str, message: str,
                 body: dict[str, object] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.message = message
        self.body = body or {}


MAX_ANSWER_MESSAGE_CHARS: Final = 2000
"""The most of a member's error message a join logs (a join's reasons say what to fix)."""
_MAX_ERROR_BODY_BYTES: Final = 64 * 1024


_JOIN_TOKEN_ADVICE: Final = {
    401: ("unauthenticated", "the cluster requires a token to join: set RAFTKV_JOIN_TOKEN_FILE "
                             "to a file holding its root token or an admin token (`raftkv "
                             "token create --role admin`)"),
    403: ("forbidden", "the join token is not an admin token: RAFTKV_JOIN_TOKEN_FILE must hold "
                       "the root token or an admin token (`raftkv token create --role admin`)"),
}


def names_own_socket(url: str, sock: socket.socket, advertised: str = "") -> bool:
    """Does `url` (http://host:port) name this node: its advertised HTTP address, or an address
    that can only reach `sock`, its HTTP socket (bound, not listening yet)? Every address the
    host resolves to must be of the socket's family and be its address, or, for a socket
    bound to every interface, an address of this machine; and none may accept a connection
    (this socket does not listen yet: something that answers is another node, e.g. behind a
    virtual address). An unresolvable host is not this node (the join says so when it
    fails)."""
    try:
        target = without_scheme(url).rstrip("/")
        if advertised and target == without_scheme(advertised).rstrip("/"):
            return True
        host, port = parse_host_port(target, "RAFTKV_JOIN")
        bound_host, bound_port = sock.getsockname()[:2]
        if port != bound_port:
            return False
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (SettingsError, OSError, UnicodeError):
        return False
    wildcard = ipaddress.ip_address(bound_host).is_unspecified
    for family, _, _, _, addr in infos:
        if family != sock.family:
            return False
        if wildcard:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((addr[0], 0))  # only an address of this machine binds
                except OSError:
                    return False
        elif str(addr[0]) != bound_host:
            return False
        with socket.socket(family, socket.SOCK_STREAM) as dial:
            dial.settimeout(1.0)
            if dial.connect_ex(addr) == 0:
                return False  # something listens there: not this node's socket
    return bool(infos)


def _refused(url: str, status: int, raw: bytes) -> _Refused:
    """The _Refused of an error answer: its JSON message in full (bounded), else its first
    bytes."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _Refused(status, f"{url} answered {status}: {raw[:200]!r}", "")
    message = body.get("message")
    text = "" if not isinstance(message, str) else "".join(
        c if c.isprintable() else " " for c in message[:MAX_ANSWER_MESSAGE_CHARS])
    if isinstance(message, str) and len(message) > MAX_ANSWER_MESSAGE_CHARS:
        text += "..."
    error = body.get("error")
    code = f" {error}" if isinstance(error, str) and error.isidentifier() else ""
    return _Refused(status, f"{url} answered {status}{code}: {text or repr(raw[:200])}", text,
                    body)


def _http_json(url: str, body: bytes | None, timeout_s: float,
               headers: dict[str, str] | None = None) -> dict[str, object]:
    req = urllib.request.Request(url, data=body, method="POST" if body else "GET",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise _refused(url, e.code, e.read(_MAX_ERROR_BODY_BYTES)) from None
    if not isinstance(answer, dict):
        raise ValueError(f"{url} gave an unexpected answer")
    return answer

