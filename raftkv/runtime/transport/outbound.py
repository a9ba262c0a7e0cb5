"""One peer's outbound link: dial, handshake, then write frames; redial with back-off.

Connections are one-way: a node dials each peer to send to it, and only reads from an accepted
connection. On the event loop, never blocking: a host name is resolved on a short-lived thread
(a resolver may take seconds), then a non-blocking connect, the handshake as frames
(raftkv.runtime.transport.handshake), then queued frames written as the socket takes them.

Frames queued while the link is down wait (bounded: `queue_limit_bytes`); when the queue or
the socket's backlog is full, a NEW frame is dropped and `send` says so (Raft retransmits).
A frame over `max_frame_bytes` (the bound the peer reads with) is never sent: the peer would
close the link on it, and the same frame would come again after the redial, forever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import socket
import threading
import time
from typing import Final, Protocol

from raftkv.codec import FrameKind
from raftkv.digits import parse_decimal
from raftkv.runtime.connection import Connection
from raftkv.runtime.eventloop import EPOLLOUT, EventLoop, Timer
from raftkv.runtime.transport.handshake import (
    MAX_HANDSHAKE_FRAME_BYTES,
    DialerHandshake,
    HandshakeFailed,
    HandshakeRejected,
    PeerInfo,
)
from raftkv.runtime.transport.tls import PeerTLS, is_tls_record, mismatch_advice

__all__ = ["OutboundLink", "parse_address"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 2.0
HANDSHAKE_TIMEOUT_S: Final = 5.0
BACKOFF_MIN_S: Final = 0.02
BACKOFF_MAX_S: Final = 1.0
QUIET_UNREACHABLE_S: Final = 10.0
"""A peer that was never reached is reported unreachable (WARNING) only after this long:
peers that are still starting are not news."""


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"invalid address {address!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = parse_decimal(port_text, 65535)
    if port is None or port == 0:
        raise ValueError(f"invalid address {address!r}: port out of range")
    return host, port


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str,
                  tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]]


class LinkOwner(Protocol):
    """What a link needs of the transport that owns it."""

    node_id: str
    source_host: str | None
    max_frame_bytes: int
    queue_limit_bytes: int
    rng: random.Random

    def dialer_handshake(self, address: str) -> DialerHandshake: ...

    tls: PeerTLS

    def link_up(self, link: OutboundLink, listener: PeerInfo,
                conn: Connection) -> str | None:
        """The handshake passed: None to go on, else why the link must be dropped."""
        ...

    def link_state(self, link: OutboundLink, up: bool, error: str) -> None: ...

    def link_refused(self, link: OutboundLink, reason: str) -> None:
        """The listener refused the handshake with this stable reason code."""
        ...

    def frame_too_large(self, link: OutboundLink, kind: int, payload_bytes: int) -> None:
        """A frame for the link was refused: over max_frame_bytes."""
        ...

    def tls_mismatch(self, link: OutboundLink, reason: str, advice: str) -> None:
        """The handshake failed because the peer speaks TLS and this node not (reason
        tls_peer), or the reverse (plaintext_peer): `advice` says what to change."""
        ...


_DOWN, _RESOLVING, _CONNECTING, _HANDSHAKE, _UP, _STOPPED = range(6)


class OutboundLink:
    def __init__(self, owner: LinkOwner, loop: EventLoop, peer_id: str, address: str) -> None:
        self.peer_id = peer_id
        self.address = address
        self._owner = owner
        self._loop = loop
        self._state = _DOWN
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._handshake: DialerHandshake | None = None
        self._queue: list[tuple[int, bytes]] = []
        self._queued_bytes = 0
        self._timer: Timer | None = None
        self._backoff_s = BACKOFF_MIN_S
        self.reachable: bool | None = None
        self.dropped = 0
        self.created = time.monotonic()
        self.ever_up = False
        self._late_reported = False
        self._resolutions = 0
        """Counts the names resolved for this link: a late answer for an earlier dial is
        ignored."""

    @property
    def up(self) -> bool:
        return self._state == _UP

    # ------------------------------------------------------------------ sending
    def send(self, kind: int, payload: bytes) -> bool:
        """Queue a frame. False when it was not taken: either the backlog is full or the link
        is stopped (Raft retransmits what still matters), or the frame is over
        max_frame_bytes, the bound the peer reads with, and so never sendable (the owner
        logs that, for a link that is not stopped)."""
        state = self._state
        if state == _STOPPED:
            return False
        if len(payload) >= self._owner.max_frame_bytes:  # its length counts the kind byte
            self.dropped += 1
            self._owner.frame_too_large(self, kind, len(payload))
            return False
        if state == _UP:
            conn = self._conn
            assert conn is not None
            if conn.out_bytes + len(payload) > self._owner.queue_limit_bytes:
                self.dropped += 1
                return False
            conn.send_frame(kind, payload)
            return True
        if self._queued_bytes + len(payload) > self._owner.queue_limit_bytes:
            self.dropped += 1
            return False
        self._queue.append((kind, payload))
        self._queued_bytes += len(payload)
        return True

    def flush(self) -> None:
        conn = self._conn
        if conn is not None and self._state == _UP:
            conn.flush()

    @property
    def has_output(self) -> bool:
        conn = self._conn
        return conn is not None and self._state == _UP and conn.out_bytes > 0

    @property
    def pending_output(self) -> bool:
        """Frames not yet handed to the kernel that may still leave: unwritten on a live
        connection, or queued while one is being set up (not while the peer is down)."""
        if self._state in (_RESOLVING, _CONNECTING, _HANDSHAKE):
            return bool(self._queue)
        return self.has_output

    # ------------------------------------------------------------------ dialing
    def start(self) -> None:
        if self._state == _DOWN:
            self._dial()

    def redial(self, address: str) -> None:
        """The peer moved: drop the connection, dial the new address."""
        self.address = address
        if self._state != _STOPPED:
            self._drop("the peer's address changed", quiet=True)

    def stop(self) -> None:
        self._cancel_timer()
        self._close_sockets()
        self._state = _STOPPED
        self._queue.clear()
        self._queued_bytes = 0

    def _dial(self) -> None:
        self._cancel_timer()
        try:
            host, port = parse_address(self.address)
        except ValueError as e:
            self._failed(f"cannot resolve {self.address}: {e}")
            return
        try:  # an IP address: no resolver involved, nothing blocks
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            self._resolve(host, port)
            return
        self._connect(infos[0])

    def _resolve(self, host: str, port: int) -> None:
        """A host name: ask the resolver off the loop; the answer comes back to it."""
        self._state = _RESOLVING
        self._resolutions += 1
        attempt, address, loop = self._resolutions, self.address, self._loop

        def resolve() -> None:
            answer: _AddrInfo | OSError
            try:
                answer = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            except OSError as e:
                answer = e
            loop.call_soon_threadsafe(lambda: self._resolved(attempt, address, answer))

        threading.Thread(target=resolve, name=f"resolve-{self.peer_id}", daemon=True).start()
        self._timer = self._loop.call_later(CONNECT_TIMEOUT_S, self._on_timeout)

    def _resolved(self, attempt: int, address: str, answer: _AddrInfo | OSError) -> None:
        if self._state != _RESOLVING or attempt != self._resolutions:
            return  # stopped, or redialed meanwhile
        if isinstance(answer, OSError):
            self._failed(f"cannot resolve {address}: {answer}")
            return
        self._cancel_timer()
        self._connect(answer)

    def _connect(self, info: _AddrInfo) -> None:
        family, kind, proto, _, sockaddr = info
        sock = socket.socket(family, kind, proto)
        try:
            if self._owner.source_host is not None:
                sock.bind((self._owner.source_host, 0))
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
        except OSError as e:
            sock.close()
            self._failed(f"cannot connect to {self.address}: {e.strerror or e}")
            return
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
            sock.close()
            self._failed(f"cannot connect to {self.address}: {os.strerror(err)}")
            return
        self._sock = sock
        self._state = _CONNECTING
        self._loop.register(sock.fileno(), EPOLLOUT, self._on_connect_event)
        self._timer = self._loop.call_later(CONNECT_TIMEOUT_S, self._on_timeout)

    def _on_connect_event(self, _mask: int) -> None:
        sock = self._sock
        if sock is None or self._state != _CONNECTING:
            return
        self._loop.unregister(sock.fileno())
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(f"cannot connect to {self.address}: {os.strerror(err)}")
            return
        tune(sock)
        self._sock = None
        self._state = _HANDSHAKE
        self._handshake = self._owner.dialer_handshake(self.address)
        self._conn = Connection(self._loop, sock, max_frame_bytes=MAX_HANDSHAKE_FRAME_BYTES,
                                on_frames=self._on_handshake_frames,
                                on_closed=self._on_closed, name=f"to {self.peer_id}")
        tls = self._owner.tls
        if tls.mode.dials_tls:
            assert tls.client is not None
            self._conn.start_tls(tls.client, server_side=False)
        self._cancel_timer()
        self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT_S, self._on_timeout)

    def _on_handshake_frames(self, frames: list[tuple[int, bytes]]) -> None:
        conn, handshake = self._conn, self._handshake
        if conn is None or handshake is None:
            return
        for kind, payload in frames:
            if self._state != _HANDSHAKE:
                self._drop("the listener wrote after the handshake")
                return
            if kind != FrameKind.HANDSHAKE:
                self._drop(f"expected a handshake frame, got kind {kind}")
                return
            try:
                if self._handshake_step == 0:
                    conn.send_frame(FrameKind.HANDSHAKE, handshake.on_hello(payload))
                    conn.flush()
                    self._handshake_step = 1
                    continue
                listener = handshake.on_welcome(payload)
            except HandshakeRejected as e:
                self._owner.link_refused(self, e.reason)
                self._drop(str(e))
                return
            except HandshakeFailed as e:
                self._drop(str(e))
                return
            if listener.node_id != self.peer_id:
                self._drop(f"{self.address} is node {listener.node_id!r}, not {self.peer_id}")
                return
            problem = self._owner.link_up(self, listener, conn)
            if problem is not None:
                self._drop(problem)
                return
            self._became_up(conn)

    _handshake_step = 0

    def _became_up(self, conn: Connection) -> None:
        self._cancel_timer()
        self._state = _UP
        self._handshake = None
        self._handshake_step = 0
        self._backoff_s = BACKOFF_MIN_S
        conn.set_handlers(self._on_data_after_handshake, self._on_closed)
        conn.set_max_frame_bytes(self._owner.max_frame_bytes)
        queue, self._queue, self._queued_bytes = self._queue, [], 0
        for kind, payload in queue:
            conn.send_frame(kind, payload)
        conn.flush()
        self.ever_up = True
        if self.reachable is not True:
            self.reachable = True
            self._owner.link_state(self, True, "")

    def _on_data_after_handshake(self, frames: list[tuple[int, bytes]]) -> None:
        self._drop("the peer wrote on a send-only connection")

    def _on_closed(self, reason: str) -> None:
        if self._state in (_HANDSHAKE, _UP):
            conn, self._conn = self._conn, None
            if self._state == _HANDSHAKE and conn is not None:
                reason = self._tls_mismatch(conn, reason)
            self._failed(reason)

    def _tls_mismatch(self, conn: Connection, reason: str) -> str:
        """The handshake's connection closed: if that is the two ends disagreeing on TLS, tell
        the owner and return the reason with the advice; else the reason as it was."""
        if conn.tls:
            # Our ClientHello was answered with something other than a TLS record (a
            # plaintext peer port's hello frame).
            mismatch = bool(conn.head) and not is_tls_record(conn.head)
        else:
            # A TLS record back, or closed before the listener's hello without a byte: what
            # a TLS-only peer port does to a dialer silent for its sniff window.
            mismatch = is_tls_record(conn.head) or (
                not conn.head and self._handshake_step == 0
                and reason == "closed by the other side")
        if not mismatch:
            return reason
        code = "plaintext_peer" if conn.tls else "tls_peer"
        advice = mismatch_advice(self.address, peer_tls=not conn.tls, dialing=True,
                                 here=self._owner.tls.mode.value)
        if not conn.tls and not conn.head:
            advice = f"probably {advice} (it closed the connection before its hello)"
        self._owner.tls_mismatch(self, code, advice)
        return f"{reason}: {code}: {advice}"

    def _on_timeout(self) -> None:
        self._timer = None
        if self._state == _RESOLVING:
            self._failed(f"resolving {self.address} timed out")
        elif self._state == _CONNECTING:
            self._failed(f"connecting to {self.address} timed out")
        elif self._state == _HANDSHAKE:
            self._drop("the handshake timed out")

    def _drop(self, reason: str, *, quiet: bool = False) -> None:
        self._close_sockets()
        self._failed(reason, quiet=quiet)

    def _failed(self, reason: str, *, quiet: bool = False) -> None:
        self._cancel_timer()
        self._close_sockets()
        if self._state == _STOPPED:
            return
        self._state = _DOWN
        self._handshake = None
        self._handshake_step = 0
        was = self.reachable
        self.reachable = False
        late = (not self.ever_up and not self._late_reported
                and time.monotonic() - self.created >= QUIET_UNREACHABLE_S)
        if late:
            self._late_reported = True
        if (was is not False or late) and not quiet:
            self._owner.link_state(self, False, reason)
        delay = self._owner.rng.uniform(self._backoff_s / 2, self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)
        self._timer = self._loop.call_later(delay, self._dial)

    def _close_sockets(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.unregister(sock.fileno())
            sock.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.set_handlers(lambda frames: None, lambda reason: None)
            conn.close("link dropped")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

