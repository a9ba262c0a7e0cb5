"""The peer port: accept connections, run the listener side of the handshake, then receive.

Unauthenticated connections (the handshake is not done) are bounded on their own, in total and
per remote host, and each must finish its handshake within HANDSHAKE_TIMEOUT_S: a crowd of
idle or slow connections cannot keep a real peer out. An authenticated connection belongs to
one peer (the newest replaces an older one) and only ever carries that peer's frames: every
frame is handed on with the authenticated peer id, and the receiver ties the message's sender
to it. A frame of a kind a peer may not send closes the connection.
"""

from __future__ import annotations

import logging
import socket
from typing import Final, Protocol

from raftkv.codec import PEER_FRAME_KINDS, FrameKind
from raftkv.runtime.connection import Connection
from raftkv.runtime.eventloop import EPOLLIN, EventLoop, Timer
from raftkv.runtime.transport.handshake import (
    MAX_HANDSHAKE_FRAME_BYTES,
    ListenerHandshake,
    PeerAuth,
    Refused,
    reject_message,
)
from raftkv.runtime.transport.outbound import tune
from raftkv.runtime.transport.tls import (
    SNIFF_S,
    TLS_RECORD_HANDSHAKE,
    PeerTLS,
    is_tls_record,
    mismatch_advice,
)

__all__ = ["Listener"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S: Final = 2.0
MAX_UNAUTHENTICATED: Final = 32
MAX_UNAUTHENTICATED_PER_HOST: Final = 8
ACCEPTS_PER_TURN: Final = 64
ACCEPT_ERROR_PAUSE_S: Final = 0.1


class ListenerOwner(Protocol):
    node_id: str
    max_frame_bytes: int

    def listener_handshake(self) -> ListenerHandshake: ...

    tls: PeerTLS

    def admit(self, auth: PeerAuth, conn: Connection) -> None:
        """Raise Refused(reason) unless this dialer may connect (known peer, right cluster,
        a certificate in its name over TLS)."""
        ...

    def inbound_up(self, peer_id: str, auth: PeerAuth) -> None: ...

    def deliver(self, peer_id: str, frames: list[tuple[int, bytes]]) -> None: ...

    def refused(self, remote_host: str, remote: str, reason: str, detail: str,
                advice: str = "") -> None:
        """Log it (rate-limited); `advice`, what the operator should change, in full."""
        ...


def _format(sockaddr: object) -> tuple[str, str]:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = str(sockaddr[0]), sockaddr[1]
        return host, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return str(sockaddr), str(sockaddr)


class _Pending:
    """An accepted connection whose handshake is not done yet."""

    __slots__ = ("conn", "handshake", "host", "remote", "timer")

    def __init__(self, conn: Connection, handshake: ListenerHandshake, host: str,
                 remote: str) -> None:
        self.conn = conn
        self.handshake = handshake
        self.host = host
        self.remote = remote
        self.timer: Timer | None = None


class Listener:
    def __init__(self, owner: ListenerOwner, loop: EventLoop, sock: socket.socket) -> None:
        self._owner = owner
        self._loop = loop
        self._sock = sock
        sock.setblocking(False)
        self._pending: dict[Connection, _Pending] = {}
        self._per_host: dict[str, int] = {}
        self._by_peer: dict[str, Connection] = {}
        self._sniffing = 0
        """Accepted connections whose first bytes (TLS or not) are awaited."""
        self._sniffed: set[socket.socket] = set()
        self._closed = False
        loop.register(sock.fileno(), EPOLLIN, self._on_accept)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def unauthenticated(self) -> int:
        return len(self._pending)

    def drop_peer(self, peer_id: str) -> None:
        """The peer left the configuration: close its inbound connection."""
        conn = self._by_peer.pop(peer_id, None)
        if conn is not None:
            conn.close("the peer was removed")

    def close(self) -> None:
        self._closed = True
        self._loop.unregister(self._sock.fileno())
        self._sock.close()
        for sock in list(self._sniffed):
            self._loop.unregister(sock.fileno())
            sock.close()
        self._sniffed.clear()
        for pending in list(self._pending.values()):
            pending.conn.close("shutting down")
        for conn in list(self._by_peer.values()):
            conn.close("shutting down")

    # ------------------------------------------------------------------ accepting
    def _on_accept(self, _mask: int) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, sockaddr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:  # e.g. out of file descriptors: do not spin
                log.warning("event=accept_failed node=%s error=%s", self._owner.node_id,
                            e.strerror or e)
                self._pause_accepting()
                return
            self._admit(sock, sockaddr)

    def _pause_accepting(self) -> None:
        """Stop polling the listening socket for ACCEPT_ERROR_PAUSE_S. The connection that
        could not be accepted is still queued, so the socket stays readable: a loop that
        kept polling it would wake at once, every turn, until the pause ended."""
        fd = self._sock.fileno()
        self._loop.unregister(fd)

        def resume() -> None:
            if not self._closed:
                self._loop.register(fd, EPOLLIN, self._on_accept)

        self._loop.call_later(ACCEPT_ERROR_PAUSE_S, resume)

    def _admit(self, sock: socket.socket, sockaddr: object) -> None:
        host, remote = _format(sockaddr)
        if (len(self._pending) + self._sniffing >= MAX_UNAUTHENTICATED
                or self._per_host.get(host, 0) >= MAX_UNAUTHENTICATED_PER_HOST):
            sock.close()
            self._owner.refused(host, remote, "too_many_connections",
                                f"unauthenticated limit {MAX_UNAUTHENTICATED} "
                                f"({MAX_UNAUTHENTICATED_PER_HOST} per host)")
            return
        try:
            tune(sock)
        except OSError:
            sock.close()
            return
        mode = self._owner.tls.mode
        self._per_host[host] = self._per_host.get(host, 0) + 1
        self._sniffing += 1
        if mode.accepts_tls:
            self._sniff(sock, host, remote)
        else:
            self._start(sock, host, remote, tls=False)

    def _sniff(self, sock: socket.socket, host: str, remote: str) -> None:
        """TLS or plaintext? A TLS dialer speaks first (its ClientHello); a plaintext one
        waits for our hello. Peek at the first byte, or take silence for plaintext."""
        fd = sock.fileno()
        decided = False

        def decide(tls: bool) -> None:
            nonlocal decided
            if decided:
                return
            decided = True
            timer.cancel()
            self._loop.unregister(fd)
            self._sniffed.discard(sock)
            if tls or self._owner.tls.mode.accepts_plaintext:
                self._start(sock, host, remote, tls=tls)
                return
            self._sniffing -= 1
            self._release_host(host)
            sock.close()
            self._owner.refused(host, remote, "plaintext_refused",
                                "this peer port speaks TLS only (RAFTKV_PEER_TLS=on)",
                                mismatch_advice(remote, peer_tls=False, dialing=False,
                                                here=self._owner.tls.mode.value))

        def readable(_mask: int) -> None:
            try:
                first = sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                first = b""
            decide(bool(first) and first[0] == TLS_RECORD_HANDSHAKE)

        timer = self._loop.call_later(SNIFF_S, lambda: decide(False))
        self._sniffed.add(sock)
        self._loop.register(fd, EPOLLIN, readable)

    def _start(self, sock: socket.socket, host: str, remote: str, *, tls: bool) -> None:
        self._sniffing -= 1
        handshake = self._owner.listener_handshake()
        conn = Connection(self._loop, sock, max_frame_bytes=MAX_HANDSHAKE_FRAME_BYTES,
                          on_frames=lambda frames: self._on_handshake(conn, frames),
                          on_closed=lambda reason: self._on_pending_closed(conn, reason),
                          name=f"from {remote}")
        pending = _Pending(conn, handshake, host, remote)
        self._pending[conn] = pending
        pending.timer = self._loop.call_later(HANDSHAKE_TIMEOUT_S,
                                              lambda: self._on_deadline(conn))
        if tls:
            context = self._owner.tls.server
            assert context is not None
            conn.start_tls(context, server_side=True)
        elif not self._owner.tls.mode.accepts_plaintext:
            raise AssertionError("plaintext on a TLS-only listener")
        conn.send_frame(FrameKind.HANDSHAKE, handshake.hello())
        conn.flush()

    def _forget(self, conn: Connection) -> _Pending | None:
        pending = self._pending.pop(conn, None)
        if pending is not None:
            if pending.timer is not None:
                pending.timer.cancel()
            self._release_host(pending.host)
        return pending

    def _release_host(self, host: str) -> None:
        left = self._per_host.get(host, 0) - 1
        if left > 0:
            self._per_host[host] = left
        else:
            self._per_host.pop(host, None)

    def _on_deadline(self, conn: Connection) -> None:
        pending = self._forget(conn)
        if pending is not None:
            self._refused(conn, pending, "bad_handshake", "handshake timed out")
            conn.set_handlers(_ignore_frames, _ignore_close)
            conn.close("handshake timed out")

    def _on_pending_closed(self, conn: Connection, reason: str) -> None:
        pending = self._forget(conn)
        if pending is not None:
            code = "tls_failed" if reason.startswith("TLS failed") else "bad_handshake"
            self._refused(conn, pending, code, reason)

    def _refused(self, conn: Connection, pending: _Pending, code: str, detail: str) -> None:
        """A plaintext handshake that broke on a TLS record (a TLS dialer at a plaintext peer
        port) is refused as `tls_peer`, saying what to change; anything else as `code`."""
        if conn.tls or not is_tls_record(conn.head):
            self._owner.refused(pending.host, pending.remote, code, detail)
            return
        self._owner.refused(pending.host, pending.remote, "tls_peer", detail,
                            mismatch_advice(pending.remote, peer_tls=True, dialing=False,
                                            here=self._owner.tls.mode.value))

    def _on_handshake(self, conn: Connection, frames: list[tuple[int, bytes]]) -> None:
        pending = self._pending.get(conn)
        if pending is None:
            return
        kind, payload = frames[0]
        try:
            if kind != FrameKind.HANDSHAKE:
                raise Refused("bad_handshake", f"expected a handshake frame, got kind {kind}")
            if len(frames) > 1:
                raise Refused("bad_handshake", "frames before the handshake was answered")
            auth = pending.handshake.check_auth(payload)
            self._owner.admit(auth, conn)
        except Refused as e:
            self._forget(conn)
            self._owner.refused(pending.host, pending.remote, e.reason, str(e))
            conn.set_handlers(_ignore_frames, _ignore_close)
            conn.send_frame(FrameKind.HANDSHAKE, reject_message(e.reason))
            conn.flush()
            conn.close(f"refused: {e.reason}")
            return
        self._forget(conn)
        conn.send_frame(FrameKind.HANDSHAKE, pending.handshake.welcome())
        conn.flush()
        if auth.probe:
            conn.set_handlers(_ignore_frames, _ignore_close)
            conn.close("probe answered")
            return
        peer_id = auth.node_id
        previous = self._by_peer.get(peer_id)
        if previous is not None:  # the peer redialed: its old connection is dead to it
            previous.set_handlers(_ignore_frames, _ignore_close)
            previous.close("replaced by a newer connection")
        self._by_peer[peer_id] = conn
        conn.set_max_frame_bytes(self._owner.max_frame_bytes)
        conn.set_handlers(lambda fr: self._on_frames(peer_id, conn, fr),
                          lambda reason: self._on_peer_closed(peer_id, conn, reason))
        self._owner.inbound_up(peer_id, auth)

    def _on_frames(self, peer_id: str, conn: Connection,
                   frames: list[tuple[int, bytes]]) -> None:
        for kind, _ in frames:
            if kind not in PEER_FRAME_KINDS:
                self._owner.refused(conn.name, conn.name, "bad_frame",
                                    f"peer {peer_id} sent a frame of kind {kind}")
                conn.close(f"frame of kind {kind} from a peer")
                return
        self._owner.deliver(peer_id, frames)

    def _on_peer_closed(self, peer_id: str, conn: Connection, reason: str) -> None:
        if self._by_peer.get(peer_id) is conn:
            del self._by_peer[peer_id]
        log.debug("event=inbound_closed node=%s peer=%s reason=%s", self._owner.node_id,
                  peer_id, reason)


def _ignore_frames(frames: list[tuple[int, bytes]]) -> None:
    pass


def _ignore_close(reason: str) -> None:
    pass

