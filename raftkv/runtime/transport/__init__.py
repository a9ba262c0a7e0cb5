"""The peer transport: frames between the nodes of a cluster, on the Raft process's event loop.

One concept per module:

    raftkv.framing           the frame format (shared with the worker channel)
    handshake.py             who is at the other end, and do they hold the cluster token
    listener.py              the peer port: accept, handshake (bounded), receive
    outbound.py              one peer's outbound link: dial, handshake, send, redial
    refusals.py              rate-limited warnings for what is refused or dropped
    probe.py                 a blocking one-shot handshake: who listens at an address

`PeerTransport` (here) owns the listener and one outbound link per peer, and is what the rest
of the Raft process talks to: `set_peers`, `send`, `flush`, and the frames it delivers, each
with the id of the peer that authenticated the connection it came on.

Delivery is best effort, at most once, in order per link; what is queued for a peer that is
down waits, bounded. Nothing a remote sends can crash the node: every error closes that one
connection, and refusals are logged at WARNING, rate-limited per remote host and reason.
Frames are at most `max_frame_bytes` both ways: a larger one is not sent (an ERROR, rate-limited
per peer), since the peer, reading with the same bound, would close the link on it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

from raftkv.runtime.connection import Connection
from raftkv.runtime.eventloop import EventLoop
from raftkv.runtime.transport.handshake import (
    MAX_ID_CHARS,
    DialerHandshake,
    ListenerHandshake,
    PeerAuth,
    PeerInfo,
    Refused,
)
from raftkv.runtime.transport.listener import Listener
from raftkv.runtime.transport.outbound import (
    QUIET_UNREACHABLE_S,
    OutboundLink,
    parse_address,
)
from raftkv.runtime.transport.refusals import RateLimitedLog
from raftkv.runtime.transport.tls import PeerTLS, certificate_names

__all__ = ["Deliver", "PeerTransport", "parse_address"]

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME_BYTES: Final = 64 << 20
DEFAULT_QUEUE_LIMIT_BYTES: Final = 256 << 20

Deliver = Callable[[str, list[tuple[int, bytes]]], None]
"""(authenticated peer id, frames of one read), on the loop thread."""
PeerStateChanged = Callable[[str, bool], None]
RemovedBy = Callable[[str], None]
"""(peer id): that member refused us as removed from the cluster."""
IncarnationCheck = Callable[[str, str], "str | None"]
"""(peer id, the incarnation its handshake presented): why it is refused as a member whose data
dir was replaced, or None."""


class PeerTransport:
    def __init__(self, loop: EventLoop, *, node_id: str, cluster_id: str, token: str,
                 listen_sock: socket.socket, http_address: str, deliver: Deliver,
                 on_peer_state: PeerStateChanged | None = None,
                 on_removed_by: RemovedBy | None = None,
                 incarnation: str = "", check_incarnation: IncarnationCheck | None = None,
                 on_replaced_by: RemovedBy | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 queue_limit_bytes: int = DEFAULT_QUEUE_LIMIT_BYTES,
                 source_host: str | None = None, tls: PeerTLS | None = None) -> None:
        """`listen_sock`: the bound, listening peer socket. `source_host`: the local address
        outgoing connections leave from (None: the kernel picks). `max_frame_bytes`: the
        largest frame read from a peer, and sent to one (every node of a cluster uses the
        same: DEFAULT_MAX_FRAME_BYTES)."""
        if not token:
            raise ValueError("the cluster token must not be empty")
        self.node_id = node_id
        self.max_frame_bytes = max_frame_bytes
        self.queue_limit_bytes = queue_limit_bytes
        self.source_host = source_host
        self.tls = tls or PeerTLS.off()
        self.rng = random.Random(os.urandom(16))  # reconnect jitter only
        self._loop = loop
        self._cluster_id = cluster_id
        self._token = token.encode()
        self._http_address = http_address
        self._deliver = deliver
        self._on_peer_state = on_peer_state
        self._on_removed_by = on_removed_by
        self._incarnation = incarnation
        self._check_incarnation = check_incarnation
        self._on_replaced_by = on_replaced_by
        self._links: dict[str, OutboundLink] = {}
        self._removed: set[str] = set()
        """Members whose links set_peers dropped (they left the membership) and not added
        since: their handshakes are refused as removed_member, so they can tell."""
        self._dirty: set[OutboundLink] = set()
        """Links with frames queued since the last flush."""
        self._http_addresses: dict[str, str] = {}
        self._refusals = RateLimitedLog()
        self._too_large = RateLimitedLog()
        self._mismatches = RateLimitedLog()
        self._listener = Listener(self, loop, listen_sock)
        self._closed = False

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    def set_cluster_id(self, cluster_id: str) -> None:
        """A joining node learns its cluster's id late; later handshakes carry it."""
        self._cluster_id = cluster_id

    # ------------------------------------------------------------------ peers
    def set_peers(self, peers: Mapping[str, str]) -> None:
        """node id -> raft address of every other member: links are added, moved, removed."""
        if self._closed:
            return
        wanted = {pid: addr for pid, addr in peers.items() if pid != self.node_id}
        for peer_id, address in wanted.items():
            if not peer_id or len(peer_id) > MAX_ID_CHARS:
                raise ValueError(f"invalid peer id {peer_id!r}")
            parse_address(address)
        self._removed.difference_update(wanted)
        for peer_id in [p for p in self._links if p not in wanted]:
            self._removed.add(peer_id)
            self._links.pop(peer_id).stop()
            self._http_addresses.pop(peer_id, None)
            self._listener.drop_peer(peer_id)
            log.info("event=peer_removed node=%s peer=%s", self.node_id, peer_id)
        for peer_id, address in wanted.items():
            link = self._links.get(peer_id)
            if link is None:
                link = OutboundLink(self, self._loop, peer_id, address)
                self._links[peer_id] = link
                link.start()
            elif link.address != address:
                link.redial(address)
                log.info("event=peer_address_changed node=%s peer=%s address=%s",
                         self.node_id, peer_id, address)

    def peers(self) -> list[str]:
        return list(self._links)

    def peer_http_address(self, node_id: str) -> str | None:
        """The HTTP address a peer announced in its latest handshake with us."""
        return self._http_addresses.get(node_id)

    def reachable(self) -> dict[str, bool]:
        return {pid: link.up for pid, link in self._links.items()}

    def dropped_frames(self) -> dict[str, int]:
        return {pid: link.dropped for pid, link in self._links.items()}

    @property
    def unauthenticated_connections(self) -> int:
        return self._listener.unauthenticated

    # ------------------------------------------------------------------ frames
    def send(self, to: str, kind: int, payload: bytes) -> bool:
        """Queue a frame for `to`; False when it was dropped (not a peer, backlog full, over
        max_frame_bytes)."""
        link = self._links.get(to)
        if link is None:
            return False
        self._dirty.add(link)
        return link.send(kind, payload)

    def has_link(self, to: str) -> bool:
        """Whether this node keeps a link to `to` (set_peers)."""
        return to in self._links

    def has_output(self, to: str) -> bool:
        """Frames for `to` that have not reached the kernel yet (stopping its link would drop
        them)."""
        link = self._links.get(to)
        return link is not None and link.pending_output

    def flush(self) -> None:
        """Write what was queued (each peer's frames in one write where the socket allows)."""
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            for link in dirty:
                link.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for link in self._links.values():
            link.flush()
            link.stop()
        self._links.clear()
        self._listener.close()
        log.info("event=transport_closed node=%s", self.node_id)

    # ------------------------------------------------------------------ for the links
    def dialer_handshake(self, address: str) -> DialerHandshake:
        return DialerHandshake(token=self._token, node_id=self.node_id,
                               cluster_id=self._cluster_id, http_address=self._http_address,
                               probe=False, address=address, incarnation=self._incarnation)

    def link_up(self, link: OutboundLink, listener: PeerInfo,
                conn: Connection) -> str | None:
        if self._cluster_id and listener.cluster_id and listener.cluster_id != self._cluster_id:
            return f"{link.address} is in cluster {listener.cluster_id!r}"
        if conn.tls and listener.node_id not in certificate_names(conn.peer_certificate()):
            return (f"{link.address} (node {listener.node_id}) presented a certificate "
                    "that does not name it")
        if listener.incarnation and self._check_incarnation is not None:
            why = self._check_incarnation(listener.node_id, listener.incarnation)
            if why is not None:
                self.refused(link.address.rpartition(":")[0], link.address, "replaced_member",
                             f"node={listener.node_id} {why}")
                return f"{link.address} (node {listener.node_id}): {why}"
        self._http_addresses[link.peer_id] = listener.http_address
        return None

    def link_refused(self, link: OutboundLink, reason: str) -> None:
        if reason == "removed_member" and self._on_removed_by is not None:
            self._on_removed_by(link.peer_id)
        elif reason == "replaced_member" and self._on_replaced_by is not None:
            self._on_replaced_by(link.peer_id)

    def tls_mismatch(self, link: OutboundLink, reason: str, advice: str) -> None:
        """The link's handshake failed on the ends' TLS settings: one warning per address and
        reason per interval (the link redials with back-off, the warning need not)."""
        suppressed = self._mismatches.admit(link.address, reason)
        if suppressed is not None:
            log.warning("event=peer_tls_mismatch node=%s peer=%s address=%s reason=%s "
                        "suppressed=%d advice=%r", self.node_id, link.peer_id, link.address,
                        reason, suppressed, advice)

    def frame_too_large(self, link: OutboundLink, kind: int, payload_bytes: int) -> None:
        """A frame for `link` was not sent: over the bound the peer reads with, it would close
        the link, and whatever made the frame would send it again after the redial."""
        suppressed = self._too_large.admit(link.peer_id, str(kind))
        if suppressed is not None:
            log.error("event=peer_frame_too_large node=%s peer=%s kind=%d bytes=%d max=%d "
                      "suppressed=%d", self.node_id, link.peer_id, kind, payload_bytes + 1,
                      self.max_frame_bytes, suppressed)

    def link_state(self, link: OutboundLink, up: bool, error: str) -> None:
        if up:
            log.info("event=peer_reachable node=%s peer=%s", self.node_id, link.peer_id)
        elif not link.ever_up and time.monotonic() - link.created < QUIET_UNREACHABLE_S:
            # Never reached yet, shortly after it was added (it may still be starting).
            log.debug("event=peer_unreachable node=%s peer=%s error=%s", self.node_id,
                      link.peer_id, error)
        else:
            log.warning("event=peer_unreachable node=%s peer=%s error=%s", self.node_id,
                        link.peer_id, error)
        if self._on_peer_state is not None:
            self._on_peer_state(link.peer_id, up)

    # ------------------------------------------------------------------ for the listener
    def listener_handshake(self) -> ListenerHandshake:
        return ListenerHandshake(token=self._token, node_id=self.node_id,
                                 cluster_id=self._cluster_id, http_address=self._http_address,
                                 incarnation=self._incarnation)

    def admit(self, auth: PeerAuth, conn: Connection) -> None:
        if self._cluster_id and auth.cluster_id and auth.cluster_id != self._cluster_id:
            raise Refused("wrong_cluster", f"node={auth.node_id} cluster={auth.cluster_id}")
        if conn.tls and auth.node_id not in certificate_names(conn.peer_certificate()):
            raise Refused("certificate_mismatch",
                          f"node={auth.node_id} presented a certificate that does not name it")
        if not auth.probe and auth.node_id not in self._links:
            if auth.node_id in self._removed:
                raise Refused("removed_member", f"node={auth.node_id}")
            raise Refused("unknown_node", f"node={auth.node_id}")
        if not auth.probe and auth.incarnation and self._check_incarnation is not None:
            why = self._check_incarnation(auth.node_id, auth.incarnation)
            if why is not None:
                raise Refused("replaced_member", f"node={auth.node_id} {why}")

    def inbound_up(self, peer_id: str, auth: PeerAuth) -> None:
        self._http_addresses[peer_id] = auth.http_address
        log.debug("event=inbound_connected node=%s peer=%s", self.node_id, peer_id)

    def deliver(self, peer_id: str, frames: list[tuple[int, bytes]]) -> None:
        self._deliver(peer_id, frames)

    def refused(self, remote_host: str, remote: str, reason: str, detail: str,
                advice: str = "") -> None:
        """A connection or frame was refused: one warning per host and reason per interval.
        The detail (it may quote the remote) is cut short; the advice (ours) is not."""
        if self._closed:
            return
        suppressed = self._refusals.admit(remote_host, reason)
        if suppressed is not None:
            log.warning("event=peer_rejected node=%s remote=%s reason=%s suppressed=%d "
                        "detail=%r%s", self.node_id, remote, reason, suppressed, detail[:200],
                        f" advice={advice!r}" if advice else "")
