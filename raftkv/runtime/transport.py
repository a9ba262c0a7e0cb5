"""The peer-to-peer TCP transport: opaque frames between nodes, threads, no asyncio.

Wire format. Every frame is a 4-byte big-endian length N of what follows, then one `kind`
byte, then N-1 payload bytes. N is at least 1 and at most `max_frame_bytes`; anything else,
or a stream that ends mid-frame, closes the connection. Kind 0 is reserved for the handshake.

Connections are one-way. A node dials each peer to send to it; accepted connections only
receive. Each pair of nodes therefore has two connections, one per direction.

Handshake (msgpack maps in kind-0 frames, first thing on every connection, 5 s deadline):

    listener -> dialer   {"v": 1, "type": "hello", "node", "cluster", "http", "nonce"}
    dialer -> listener   {"v": 1, "type": "auth", "node", "cluster", "http", "probe",
                          "nonce", "mac": HMAC-SHA256(token, both nonces + both identities)}
    listener -> dialer   {"v": 1, "type": "welcome", "mac": HMAC-SHA256(token, ...)}
                      or {"v": 1, "type": "reject", "reason": "wrong_token" | ...}

The listener checks the dialer's MAC (hmac.compare_digest), then the cluster id (a mismatch
only counts when both sides know theirs: a joining node learns it late), then that the dialer
is a known peer (set_peers). A probe connection skips the last check: it is answered with a
welcome and closed. The welcome's MAC proves to the dialer that the listener holds the token
too, so neither side talks to an impostor. Nonces make every MAC single-use.

Delivery is best effort, at most once, in order per link: a frame is queued per peer and
written by that peer's sender thread; frames in a write that fails are lost (Raft retransmits).
When a peer's queue is full (`queue_limit` frames or `queue_limit_bytes`), the NEW frame is
dropped and send() returns False; the drop is counted (see dropped_frames()). Frames queued
while a peer is unreachable stay queued (up to the limits) and are written on reconnect.

Threads: one accept thread, one reader thread per accepted connection, one sender thread per
peer. Nothing a remote sends can crash the node: errors close that connection and are logged in
one line; refusals are logged at WARNING, rate-limited per remote host and reason.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "HANDSHAKE_KIND",
    "HandshakeRejected",
    "PeerInfo",
    "PeerTransport",
    "TransportError",
    "probe",
]

log = logging.getLogger(__name__)

HANDSHAKE_KIND: Final = 0
PROTOCOL_VERSION: Final = 1
HANDSHAKE_TIMEOUT_S: Final = 5.0
HANDSHAKE_MAX_FRAME_BYTES: Final = 16 << 10
CONNECT_TIMEOUT_S: Final = 2.0
RECONNECT_BACKOFF_MIN_S: Final = 0.02
RECONNECT_BACKOFF_MAX_S: Final = 1.0
SEND_BATCH_MAX_BYTES: Final = 1 << 20
READ_BUFFER_BYTES: Final = 256 << 10
MAX_INBOUND_CONNECTIONS: Final = 256
MAX_ID_CHARS: Final = 256
NONCE_BYTES: Final = 32
REFUSAL_LOG_INTERVAL_S: Final = 10.0
REFUSAL_LOG_MAX_KEYS: Final = 1024
QUEUE_FULL_LOG_INTERVAL_S: Final = 10.0
CLOSE_JOIN_TIMEOUT_S: Final = 2.0
ACCEPT_ERROR_PAUSE_S: Final = 0.1
KEEPALIVE_IDLE_S: Final = 10
KEEPALIVE_INTERVAL_S: Final = 5
KEEPALIVE_PROBES: Final = 3

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">IB")
_MAX_WIRE_LENGTH: Final = (1 << 32) - 1
_AUTH_LABEL: Final = b"raftkv/1 auth\n"
_WELCOME_LABEL: Final = b"raftkv/1 welcome\n"

OnFrame = Callable[[str, int, bytes], None]
"""(peer_id, kind, payload), called on the reader thread: must be quick (enqueue and return)."""
OnPeerState = Callable[[str, bool], None]
"""(peer_id, reachable), called on the peer's sender thread when its outbound link changes."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    node_id: str
    http_address: str
    cluster_id: str


class TransportError(Exception):
    """A connection could not be set up, or the remote broke the protocol."""


class HandshakeRejected(TransportError):
    """The listener refused our handshake; `reason` is its stable code (e.g. wrong_token)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address} refused the handshake: {reason}")
        self.address = address
        self.reason = reason


class FrameError(TransportError):
    """The remote broke the framing: `reason` is frame_too_large or malformed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _StreamEnded(TransportError):
    """The stream ended in the middle of a frame (the remote died or closed mid-write)."""


class _Refused(Exception):
    """Listener side: the handshake is refused for `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class _Stopped(Exception):
    """The owner of a blocking wait was asked to stop."""


def _describe(exc: BaseException) -> str:
    """One line for a log: the exception's type and message, no traceback."""
    text = str(exc)
    return f"{type(exc).__name__}({text!r})" if text else type(exc).__name__


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"invalid address {address!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"invalid address {address!r}: port out of range")
    return host, port


def _format_remote(sockaddr: Any) -> str:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = sockaddr[0], sockaddr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockaddr)


def _shutdown(sock: socket.socket) -> None:
    """Wake any thread blocked on `sock`; its owner closes it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("handshake deadline passed")
    return left


def _wait_readable(sock: socket.socket, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout_s) * 1000))


def _drain(wake: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while wake.recv(4096):
            pass


class _FrameReader:
    """Reads frames through one reusable buffer: a burst of small frames costs one recv."""

    def __init__(self, sock: socket.socket, buffer_bytes: int = READ_BUFFER_BYTES) -> None:
        self._sock = sock
        self._buf = bytearray(buffer_bytes)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def read_frame(
        self, max_frame_bytes: int, deadline: float | None = None
    ) -> tuple[int, bytes] | None:
        """The next (kind, payload); None when the stream ends cleanly between frames."""
        if not self._fill(_LENGTH.size, deadline, eof_ok=True):
            return None
        (length,) = _LENGTH.unpack_from(self._buf, self._start)
        if length == 0:
            raise FrameError("malformed", "zero-length frame")
        if length > max_frame_bytes:
            raise FrameError("frame_too_large", f"length={length} max={max_frame_bytes}")
        total = _LENGTH.size + length
        if total <= len(self._buf):
            self._fill(total, deadline)
            kind = self._buf[self._start + _LENGTH.size]
            payload = bytes(self._view[self._start + _HEADER.size : self._start + total])
            self._consume(total)
            return kind, payload
        return self._read_large(length, deadline)

    def _read_large(self, length: int, deadline: float | None) -> tuple[int, bytes]:
        self._fill(_HEADER.size, deadline)
        kind = self._buf[self._start + _LENGTH.size]
        self._consume(_HEADER.size)
        payload = bytearray(length - 1)
        buffered = min(self._end - self._start, len(payload))
        payload[:buffered] = self._view[self._start : self._start + buffered]
        self._consume(buffered)
        view = memoryview(payload)
        received = buffered
        while received < len(payload):
            self._set_timeout(deadline)
            got = self._sock.recv_into(view[received:])
            if got == 0:
                raise _StreamEnded("stream ended mid-frame")
            received += got
        return kind, bytes(payload)

    def _consume(self, count: int) -> None:
        self._start += count
        if self._start == self._end:
            self._start = self._end = 0

    def _fill(self, count: int, deadline: float | None, *, eof_ok: bool = False) -> bool:
        while self._end - self._start < count:
            if self._start + count > len(self._buf):
                pending = bytes(self._view[self._start : self._end])
                self._buf[: len(pending)] = pending
                self._start, self._end = 0, len(pending)
            self._set_timeout(deadline)
            got = self._sock.recv_into(self._view[self._end :])
            if got == 0:
                if eof_ok and self._end == self._start:
                    return False
                raise _StreamEnded("stream ended mid-frame")
            self._end += got
        return True

    def _set_timeout(self, deadline: float | None) -> None:
        if deadline is not None:
            self._sock.settimeout(_remaining(deadline))


def _send_frame(sock: socket.socket, kind: int, payload: bytes, deadline: float) -> None:
    sock.settimeout(_remaining(deadline))
    sock.sendall(_HEADER.pack(len(payload) + 1, kind) + payload)


def _send_message(sock: socket.socket, message: dict[str, Any], deadline: float) -> None:
    _send_frame(sock, HANDSHAKE_KIND, msgpack.packb(message, use_bin_type=True), deadline)


def _read_message(reader: _FrameReader, deadline: float) -> dict[str, Any]:
    """One handshake message; raises _Refused with the reason a listener would log."""
    frame = reader.read_frame(HANDSHAKE_MAX_FRAME_BYTES, deadline)
    if frame is None:
        raise _Refused("bad_handshake", "connection closed during the handshake")
    kind, payload = frame
    if kind != HANDSHAKE_KIND:
        raise _Refused("bad_handshake", f"expected a handshake frame, got kind={kind}")
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _Refused("malformed", f"handshake is not msgpack: {_describe(exc)}") from exc
    if not isinstance(message, dict):
        raise _Refused("malformed", "handshake is not a map")
    if message.get("v") != PROTOCOL_VERSION:
        raise _Refused("bad_handshake", f"unsupported version {message.get('v')!r}")
    return message


def _field_str(message: dict[str, Any], key: str, *, allow_empty: bool = True) -> str:
    value = message.get(key)
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS or (not value and not allow_empty):
        raise _Refused("bad_handshake", f"missing or invalid field {key!r}")
    return value


def _field_bytes(message: dict[str, Any], key: str, size: int) -> bytes:
    value = message.get(key)
    if not isinstance(value, bytes) or len(value) != size:
        raise _Refused("bad_handshake", f"missing or invalid field {key!r}")
    return value


def _mac(token: bytes, label: bytes, fields: list[Any]) -> bytes:
    body = label + msgpack.packb(fields, use_bin_type=True)
    return hmac.new(token, body, hashlib.sha256).digest()


def _connect(
    host: str,
    port: int,
    deadline: float,
    *,
    wake: socket.socket | None = None,
    should_stop: Callable[[], bool] | None = None,
    source_host: str | None = None,
) -> socket.socket:
    """A blocking, tuned socket connected to host:port; a `wake` byte plus should_stop() aborts.

    With `source_host`, the connection leaves from that local address (any free port), so a
    firewall can tell which node's peer traffic it is."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last_error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if source_host is not None:
                sock.bind((source_host, 0))
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
            if err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
                raise OSError(err, os.strerror(err))
            if err != 0:
                _wait_connected(sock, deadline, wake, should_stop)
            sock.setblocking(True)
            _tune(sock)
            return sock
        except _Stopped:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            last_error = exc
    raise last_error


def _wait_connected(
    sock: socket.socket,
    deadline: float,
    wake: socket.socket | None,
    should_stop: Callable[[], bool] | None,
) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    if wake is not None:
        poller.register(wake, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("connect timed out")
        events = poller.poll(left * 1000)
        for fd, _ in events:
            if wake is not None and fd == wake.fileno():
                _drain(wake)
                if should_stop is not None and should_stop():
                    raise _Stopped
        if any(fd == sock.fileno() for fd, _ in events):
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            return


def _dial_handshake(
    sock: socket.socket,
    *,
    address: str,
    token: bytes,
    node_id: str,
    cluster_id: str,
    http_address: str,
    probe: bool,
    deadline: float,
) -> PeerInfo:
    """Dialer side of the handshake; the listener's verified identity."""
    reader = _FrameReader(sock, HANDSHAKE_MAX_FRAME_BYTES + _HEADER.size)
    try:
        hello = _read_message(reader, deadline)
        if hello.get("type") == "reject":
            raise HandshakeRejected(address, str(hello.get("reason")))
        if hello.get("type") != "hello":
            raise TransportError(f"{address} did not start with a hello")
        listener = PeerInfo(
            node_id=_field_str(hello, "node", allow_empty=False),
            http_address=_field_str(hello, "http"),
            cluster_id=_field_str(hello, "cluster"),
        )
        listener_nonce = _field_bytes(hello, "nonce", NONCE_BYTES)
    except _Refused as exc:
        raise TransportError(f"{address} sent a bad hello: {exc}") from exc
    nonce = os.urandom(NONCE_BYTES)
    identity = [listener.node_id, listener.cluster_id, node_id, cluster_id, http_address, probe]
    auth = {
        "v": PROTOCOL_VERSION,
        "type": "auth",
        "node": node_id,
        "cluster": cluster_id,
        "http": http_address,
        "probe": probe,
        "nonce": nonce,
        "mac": _mac(token, _AUTH_LABEL, [listener_nonce, nonce, *identity]),
    }
    _send_message(sock, auth, deadline)
    try:
        reply = _read_message(reader, deadline)
    except _Refused as exc:
        raise TransportError(f"{address} sent a bad handshake reply: {exc}") from exc
    if reply.get("type") == "reject":
        raise HandshakeRejected(address, str(reply.get("reason")))
    welcome_mac = reply.get("mac")
    expected = _mac(
        token, _WELCOME_LABEL, [listener_nonce, nonce, listener.http_address, *identity]
    )
    if reply.get("type") != "welcome" or not isinstance(welcome_mac, bytes):
        raise TransportError(f"{address} sent a bad handshake reply")
    if not hmac.compare_digest(welcome_mac, expected):
        raise TransportError(f"{address} could not prove it holds the cluster token")
    return listener


def probe(address: str, *, cluster_id: str, token: str, node_id: str, timeout_s: float) -> PeerInfo:
    """Connect to a raft address, handshake, learn who listens there, close.

    Raises HandshakeRejected (with .reason, e.g. wrong_token) when the listener refuses us,
    TransportError when it cannot be reached or does not speak the protocol.
    """
    host, port = _parse_address(address)
    deadline = time.monotonic() + timeout_s
    try:
        sock = _connect(host, port, deadline)
    except OSError as exc:
        raise TransportError(f"cannot connect to {address}: {_describe(exc)}") from exc
    with sock:
        try:
            return _dial_handshake(
                sock,
                address=address,
                token=token.encode(),
                node_id=node_id,
                cluster_id=cluster_id,
                http_address="",
                probe=True,
                deadline=deadline,
            )
        except (OSError, FrameError, _StreamEnded) as exc:
            raise TransportError(f"handshake with {address} failed: {_describe(exc)}") from exc


class _RefusalLog:
    """Rate limit for refusal warnings: one line per (remote host, reason) per interval."""

    def __init__(self, interval_s: float, max_keys: int) -> None:
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def admit(self, host: str, reason: str) -> int | None:
        """The number of refusals suppressed since the last line, or None to stay quiet."""
        now = time.monotonic()
        key = (host, reason)
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self._interval_s:
                self._seen[key] = (last[0], last[1] + 1)
                return None
            if last is None and len(self._seen) >= self._max_keys:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval_s}
                if len(self._seen) >= self._max_keys:
                    self._seen.clear()
            self._seen[key] = (now, 0)
            return 0 if last is None else last[1]


class _Inbound:
    """An accepted connection: receives frames from one peer once the handshake passed."""

    __slots__ = ("peer_id", "remote", "remote_host", "sock", "thread")

    def __init__(self, sock: socket.socket, sockaddr: Any) -> None:
        self.sock = sock
        self.remote = _format_remote(sockaddr)
        self.remote_host = str(sockaddr[0]) if isinstance(sockaddr, tuple) else self.remote
        self.peer_id: str | None = None
        self.thread: threading.Thread | None = None


class _OutboundLink:
    """One peer's outbound side: a bounded frame queue and the thread that owns the socket."""

    def __init__(self, owner: PeerTransport, peer_id: str, address: str) -> None:
        self.peer_id = peer_id
        self._owner = owner
        self._lock = threading.Lock()
        self._address = address
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._queued_bytes = 0
        self._dropped = 0
        self._last_drop_log = float("-inf")
        self._stopped = False
        self._redial = False
        self._sock: socket.socket | None = None
        self._live: socket.socket | None = None  # handshaken: frames may be written to it
        self._writing = False  # the sender thread is writing a batch outside the lock
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.reachable: bool | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"raftkv-send-{owner.node_id}-{peer_id}", daemon=True
        )

    @property
    def address(self) -> str:
        with self._lock:
            return self._address

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    def offer(self, header: bytes, payload: bytes) -> bool:
        size = len(header) + len(payload)
        with self._lock:
            if self._stopped:
                return False
            owner = self._owner
            if (
                len(self._queue) >= owner.queue_limit
                or self._queued_bytes + size > owner.queue_limit_bytes
            ):
                self._dropped += 1
                now = time.monotonic()
                if now - self._last_drop_log < QUEUE_FULL_LOG_INTERVAL_S:
                    return False
                self._last_drop_log = now
                dropped, queued = self._dropped, len(self._queue)
            else:
                if not self._queue and not self._writing and self._live is not None:
                    # Fast path: nothing queued and nobody writing: write from the calling
                    # thread (no wake-up of the sender thread), without blocking.
                    sent = self._write_now(self._live, header + payload)
                    if sent == size:
                        return True
                    if sent > 0:
                        header, payload = b"", (header + payload)[sent:]
                        size -= sent
                if not self._queue:
                    self._wake_locked()
                self._queue.append((header, payload))
                self._queued_bytes += size
                return True
        log.warning(
            "event=peer_queue_full node=%s peer=%s queued=%d dropped_total=%d",
            owner.node_id,
            self.peer_id,
            queued,
            dropped,
        )
        return False

    def redial(self, address: str) -> None:
        with self._lock:
            self._address = address
            self._redial = True
            self._wake_locked()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._queue.clear()
            self._queued_bytes = 0
            self._wake_locked()
            if self._sock is not None:  # closed under this lock too: never a reused fd
                _shutdown(self._sock)

    @staticmethod
    def _write_now(sock: socket.socket, data: bytes) -> int:
        """Bytes written without blocking; 0 when the socket would block or has failed (the
        sender thread then finds out and redials)."""
        try:
            return sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            return 0

    def _wake_locked(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake is already pending) or closed
            self._wake_w.send(b"\0")

    def _is_stopped(self) -> bool:
        with self._lock:
            return self._stopped

    def _run(self) -> None:
        backoff_s = RECONNECT_BACKOFF_MIN_S
        try:
            while not self._is_stopped():
                try:
                    sock = self._dial()
                except _Stopped:
                    break
                except (OSError, TransportError) as exc:
                    self._set_reachable(False, exc)
                    jitter = self._owner._jitter(backoff_s)
                    backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_MAX_S)
                    if not self._pause(jitter):
                        break
                    continue
                backoff_s = RECONNECT_BACKOFF_MIN_S
                self._set_reachable(True, None)
                try:
                    self._pump(sock)
                except (OSError, TransportError) as exc:
                    self._set_reachable(False, exc)
                finally:
                    with self._lock:
                        self._sock = None
                        sock.close()
        except Exception as exc:  # a bug, not the network: the link is dead, say so once
            log.error(
                "event=peer_sender_failed node=%s peer=%s error=%s",
                self._owner.node_id,
                self.peer_id,
                _describe(exc),
            )
        finally:
            with self._lock:
                self._stopped = True
                self._queue.clear()
                self._queued_bytes = 0
                self._wake_r.close()
                self._wake_w.close()

    def _dial(self) -> socket.socket:
        with self._lock:
            address = self._address
            self._redial = False
        host, port = _parse_address(address)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        sock = _connect(
            host,
            port,
            deadline,
            wake=self._wake_r,
            should_stop=self._is_stopped,
            source_host=self._owner.source_host,
        )
        with self._lock:
            if self._stopped:
                sock.close()
                raise _Stopped
            self._sock = sock
        try:
            listener = self._owner._dial_as_self(sock, address)
            if listener.node_id != self.peer_id:
                raise TransportError(f"{address} is node {listener.node_id!r}, not the peer")
            sock.settimeout(None)
        except BaseException:
            with self._lock:
                self._sock = None
                sock.close()
            raise
        return sock

    def _pause(self, seconds: float) -> bool:
        """Wait out a backoff; False when stopped meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return not self._is_stopped()
            if _wait_readable(self._wake_r, left):
                _drain(self._wake_r)
                if self._is_stopped():
                    return False

    def _take_batch(self) -> tuple[list[bytes], int] | None:
        """Frames to write in one go (bounded bytes); None when the link must stop or redial."""
        with self._lock:
            if self._stopped or self._redial:
                return None
            pieces: list[bytes] = []
            total = 0
            while self._queue:
                header, payload = self._queue[0]
                size = len(header) + len(payload)
                if pieces and total + size > SEND_BATCH_MAX_BYTES:
                    break
                self._queue.popleft()
                self._queued_bytes -= size
                pieces.append(header)
                pieces.append(payload)
                total += size
            self._writing = bool(pieces)
            return pieces, total

    def _pump(self, sock: socket.socket) -> None:
        """Write queued frames until stopped or redialed; raises when the connection breaks."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        wake_fd = self._wake_r.fileno()
        with self._lock:
            self._live = sock
        try:
            self._pump_live(sock, poller, wake_fd)
        finally:
            with self._lock:
                self._live = None
                self._writing = False

    def _pump_live(self, sock: socket.socket, poller: select.poll, wake_fd: int) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            pieces, total = batch
            if pieces:
                if total > SEND_BATCH_MAX_BYTES:  # one large frame: do not copy it
                    for piece in pieces:
                        sock.sendall(piece)
                else:
                    sock.sendall(b"".join(pieces))
                with self._lock:
                    self._writing = False
                continue
            for fd, _ in poller.poll():
                if fd == wake_fd:
                    _drain(self._wake_r)
                    continue
                # The listener never writes after the handshake: readable means closed.
                try:
                    data = sock.recv(1, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if not data:
                    raise ConnectionError("peer closed the connection")
                raise TransportError("peer wrote on a send-only connection")

    def _set_reachable(self, up: bool, error: BaseException | None) -> None:
        with self._lock:
            if self._stopped or self.reachable is up:
                return
            self.reachable = up
        self._owner._peer_state_changed(self.peer_id, up, error)


class PeerTransport:
    """Frames to and from peers over TCP; see the module docstring for the protocol."""

    def __init__(
        self,
        *,
        node_id: str,
        cluster_id: str,
        token: str,
        bind_host: str,
        bind_port: int,
        http_address: str,
        on_frame: OnFrame,
        on_peer_state: OnPeerState | None = None,
        max_frame_bytes: int = 64 << 20,
        queue_limit: int = 10_000,
        queue_limit_bytes: int | None = None,
        source_host: str | None = None,
    ) -> None:
        """`source_host`: the local address outgoing peer connections are bound to (None: the
        kernel picks); a node passes its raft bind host so that its peer traffic comes from
        its own address both ways."""
        if not node_id or len(node_id) > MAX_ID_CHARS:
            raise ValueError("node_id must be a non-empty name")
        if not token:
            raise ValueError("token must not be empty")
        if not 2 <= max_frame_bytes <= _MAX_WIRE_LENGTH:
            raise ValueError(f"max_frame_bytes must be in [2, {_MAX_WIRE_LENGTH}]")
        if queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        self.node_id = node_id
        self.max_frame_bytes = max_frame_bytes
        self.queue_limit = queue_limit
        self.queue_limit_bytes = (
            queue_limit_bytes if queue_limit_bytes is not None else 4 * max_frame_bytes
        )
        if self.queue_limit_bytes < max_frame_bytes + _LENGTH.size:
            raise ValueError("queue_limit_bytes must hold at least one frame of max_frame_bytes")
        self._cluster_id = cluster_id
        self._token = token.encode()
        self._bind_host = bind_host
        self._bind_port = bind_port
        self.source_host = source_host or None
        self._http_address = http_address
        self._on_frame = on_frame
        self._on_peer_state = on_peer_state
        self._lock = threading.Lock()
        self._links: dict[str, _OutboundLink] = {}
        self._inbound: set[_Inbound] = set()
        self._inbound_by_peer: dict[str, _Inbound] = {}
        self._http_addresses: dict[str, str] = {}
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._port: int | None = None
        self._closed = False
        self._random = random.Random(os.urandom(16))  # reconnect jitter only
        self._refusals = _RefusalLog(REFUSAL_LOG_INTERVAL_S, REFUSAL_LOG_MAX_KEYS)

    # -- public API ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when bind_port was 0); only after start()."""
        if self._port is None:
            raise RuntimeError("transport not started")
        return self._port

    def start(self) -> None:
        """Bind the listening socket and start accepting connections."""
        with self._lock:
            if self._closed:
                raise RuntimeError("transport closed")
            if self._listener is not None:
                raise RuntimeError("transport already started")
            family = socket.AF_INET6 if ":" in self._bind_host else socket.AF_INET
            listener = socket.create_server(
                (self._bind_host, self._bind_port), family=family, backlog=128
            )
            listener.setblocking(False)
            self._listener = listener
            self._port = listener.getsockname()[1]
            self._wake_r, self._wake_w = socket.socketpair()
            self._accept_thread = threading.Thread(
                target=self._accept_loop,
                args=(listener, self._wake_r),
                name=f"raftkv-accept-{self.node_id}",
                daemon=True,
            )
            self._accept_thread.start()
        log.info(
            "event=transport_listening node=%s address=%s:%d",
            self.node_id,
            self._bind_host,
            self._port,
        )

    def close(self) -> None:
        """Stop every thread and socket; idempotent, returns within a bounded time."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links = list(self._links.values())
            self._links.clear()
            inbound = list(self._inbound)
            for conn in inbound:
                _shutdown(conn.sock)
            listener, wake_r, wake_w = self._listener, self._wake_r, self._wake_w
            accept_thread = self._accept_thread
        if wake_w is not None:
            with contextlib.suppress(OSError):
                wake_w.send(b"\0")
        for link in links:
            link.stop()
        threads = [accept_thread, *(link.thread for link in links)]
        threads += [conn.thread for conn in inbound]
        deadline = time.monotonic() + CLOSE_JOIN_TIMEOUT_S
        for thread in threads:
            if thread is None or thread is threading.current_thread() or not thread.ident:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
        for sock in (listener, wake_r, wake_w):
            if sock is not None:
                sock.close()
        log.info("event=transport_closed node=%s", self.node_id)

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """node_id -> "host:port" raft address of every other member; adds/removes links."""
        wanted: dict[str, str] = {}
        for peer_id, address in peers.items():
            if peer_id == self.node_id:
                continue
            if not peer_id or len(peer_id) > MAX_ID_CHARS:
                raise ValueError(f"invalid peer id {peer_id!r}")
            _parse_address(address)
            wanted[peer_id] = address
        started: list[_OutboundLink] = []
        moved: list[tuple[_OutboundLink, str]] = []
        removed: list[_OutboundLink] = []
        with self._lock:
            if self._closed:
                return
            for peer_id in [p for p in self._links if p not in wanted]:
                removed.append(self._links.pop(peer_id))
                self._http_addresses.pop(peer_id, None)
                conn = self._inbound_by_peer.pop(peer_id, None)
                if conn is not None:
                    _shutdown(conn.sock)
            for peer_id, address in wanted.items():
                link = self._links.get(peer_id)
                if link is None:
                    link = _OutboundLink(self, peer_id, address)
                    self._links[peer_id] = link
                    started.append(link)
                elif link.address != address:
                    moved.append((link, address))
        for link in removed:
            link.stop()
            log.info("event=peer_removed node=%s peer=%s", self.node_id, link.peer_id)
        for link, address in moved:
            link.redial(address)
            log.info(
                "event=peer_address_changed node=%s peer=%s address=%s",
                self.node_id,
                link.peer_id,
                address,
            )
        for link in started:
            link.thread.start()

    def set_cluster_id(self, cluster_id: str) -> None:
        """Adopt the cluster id (a joining node learns it late); used by later handshakes."""
        with self._lock:
            self._cluster_id = cluster_id

    def send(self, to: str, kind: int, payload: bytes) -> bool:
        """Queue a frame for `to`; never blocks. False (frame dropped) when `to` is not a peer
        or its queue is full. Raises ValueError for a reserved kind or an oversized payload."""
        if not HANDSHAKE_KIND < kind <= 255:
            raise ValueError(f"frame kind must be in 1..255, got {kind}")
        length = len(payload) + 1
        if length > self.max_frame_bytes:
            raise ValueError(f"frame of {length} bytes exceeds max_frame_bytes")
        with self._lock:
            link = self._links.get(to)
        if link is None:
            return False
        return link.offer(_HEADER.pack(length, kind), payload)

    def peer_http_address(self, node_id: str) -> str | None:
        """The HTTP address a peer announced in its latest handshake with us."""
        with self._lock:
            return self._http_addresses.get(node_id)

    def reachable(self) -> dict[str, bool]:
        """peer_id -> whether its outbound link is connected and handshaken."""
        with self._lock:
            links = list(self._links.values())
        return {link.peer_id: link.reachable is True for link in links}

    def dropped_frames(self) -> dict[str, int]:
        """peer_id -> frames dropped because its queue was full."""
        with self._lock:
            links = list(self._links.values())
        return {link.peer_id: link.dropped for link in links}

    # -- used by the outbound links -------------------------------------------------------------

    def _jitter(self, backoff_s: float) -> float:
        with self._lock:
            return self._random.uniform(backoff_s / 2, backoff_s)

    def _dial_as_self(self, sock: socket.socket, address: str) -> PeerInfo:
        with self._lock:
            cluster_id = self._cluster_id
        listener = _dial_handshake(
            sock,
            address=address,
            token=self._token,
            node_id=self.node_id,
            cluster_id=cluster_id,
            http_address=self._http_address,
            probe=False,
            deadline=time.monotonic() + HANDSHAKE_TIMEOUT_S,
        )
        if cluster_id and listener.cluster_id and listener.cluster_id != cluster_id:
            raise TransportError(f"{address} is in cluster {listener.cluster_id!r}")
        with self._lock:
            self._http_addresses[listener.node_id] = listener.http_address
        return listener

    def _peer_state_changed(self, peer_id: str, up: bool, error: BaseException | None) -> None:
        if up:
            log.info("event=peer_reachable node=%s peer=%s", self.node_id, peer_id)
        else:
            log.warning(
                "event=peer_unreachable node=%s peer=%s error=%s",
                self.node_id,
                peer_id,
                _describe(error) if error is not None else "unknown",
            )
        if self._on_peer_state is None:
            return
        try:
            self._on_peer_state(peer_id, up)
        except Exception as exc:
            log.error(
                "event=on_peer_state_failed node=%s peer=%s error=%s",
                self.node_id,
                peer_id,
                _describe(exc),
            )

    # -- inbound side -----------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(wake, select.POLLIN)
        wake_fd = wake.fileno()
        try:
            while True:
                events = poller.poll()
                if any(fd == wake_fd for fd, _ in events):
                    return
                try:
                    sock, sockaddr = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:  # e.g. out of file descriptors: do not spin
                    log.warning(
                        "event=accept_failed node=%s error=%s", self.node_id, _describe(exc)
                    )
                    if _wait_readable(wake, ACCEPT_ERROR_PAUSE_S):
                        return
                    continue
                self._admit(sock, sockaddr)
        except Exception as exc:
            with self._lock:
                closed = self._closed
            if not closed:
                log.error("event=accept_loop_failed node=%s error=%s", self.node_id, _describe(exc))

    def _admit(self, sock: socket.socket, sockaddr: Any) -> None:
        conn = _Inbound(sock, sockaddr)
        with self._lock:
            if not self._closed and len(self._inbound) < MAX_INBOUND_CONNECTIONS:
                self._inbound.add(conn)
                conn.thread = threading.Thread(
                    target=self._serve_inbound,
                    args=(conn,),
                    name=f"raftkv-recv-{self.node_id}-{conn.remote}",
                    daemon=True,
                )
        if conn.thread is None:
            sock.close()
            self._log_refusal(conn, "too_many_connections", f"limit={MAX_INBOUND_CONNECTIONS}")
            return
        conn.thread.start()

    def _serve_inbound(self, conn: _Inbound) -> None:
        sock = conn.sock
        reader = _FrameReader(sock)
        try:
            sock.setblocking(True)
            _tune(sock)
            peer_id = self._accept_handshake(conn, reader)
            if peer_id is not None:
                self._receive(conn, reader, peer_id)
        except _Refused as exc:
            self._log_refusal(conn, exc.reason, str(exc))
            self._send_reject(sock, exc.reason)
        except FrameError as exc:
            self._log_refusal(conn, exc.reason, str(exc))
            if conn.peer_id is None:
                self._send_reject(sock, exc.reason)
        except TimeoutError:
            self._log_refusal(conn, "bad_handshake", "handshake timed out")
        except (OSError, _StreamEnded) as exc:
            if conn.peer_id is None and not self._is_closed():
                self._log_refusal(conn, "bad_handshake", _describe(exc))
            else:
                log.debug(
                    "event=inbound_closed node=%s peer=%s remote=%s error=%s",
                    self.node_id,
                    conn.peer_id,
                    conn.remote,
                    _describe(exc),
                )
        except Exception as exc:  # on_frame or a bug: one line, close this connection only
            log.error(
                "event=inbound_failed node=%s peer=%s remote=%s error=%s",
                self.node_id,
                conn.peer_id,
                conn.remote,
                _describe(exc),
            )
        finally:
            with self._lock:
                self._inbound.discard(conn)
                if conn.peer_id is not None and self._inbound_by_peer.get(conn.peer_id) is conn:
                    del self._inbound_by_peer[conn.peer_id]
                sock.close()  # under the lock that other threads shut it down under

    def _accept_handshake(self, conn: _Inbound, reader: _FrameReader) -> str | None:
        """Listener side of the handshake: the peer id, or None for a probe (answered)."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        with self._lock:
            cluster_id = self._cluster_id
        nonce = os.urandom(NONCE_BYTES)
        hello = {
            "v": PROTOCOL_VERSION,
            "type": "hello",
            "node": self.node_id,
            "cluster": cluster_id,
            "http": self._http_address,
            "nonce": nonce,
        }
        _send_message(conn.sock, hello, deadline)
        auth = _read_message(reader, deadline)
        if auth.get("type") != "auth":
            raise _Refused("bad_handshake", f"expected auth, got {auth.get('type')!r}")
        peer_id = _field_str(auth, "node", allow_empty=False)
        peer_cluster = _field_str(auth, "cluster")
        peer_http = _field_str(auth, "http")
        peer_nonce = _field_bytes(auth, "nonce", NONCE_BYTES)
        is_probe = auth.get("probe", False)
        mac = auth.get("mac")
        if not isinstance(is_probe, bool) or not isinstance(mac, bytes):
            raise _Refused("bad_handshake", "missing or invalid field 'probe' or 'mac'")
        identity = [self.node_id, cluster_id, peer_id, peer_cluster, peer_http, is_probe]
        if not hmac.compare_digest(
            mac, _mac(self._token, _AUTH_LABEL, [nonce, peer_nonce, *identity])
        ):
            raise _Refused("wrong_token", f"node={peer_id}")
        if cluster_id and peer_cluster and peer_cluster != cluster_id:
            raise _Refused("wrong_cluster", f"node={peer_id} cluster={peer_cluster}")
        if not is_probe:
            with self._lock:
                if peer_id not in self._links or self._closed:
                    raise _Refused("unknown_node", f"node={peer_id}")
                conn.peer_id = peer_id
                previous = self._inbound_by_peer.get(peer_id)
                if previous is not None:  # the peer redialed: its old connection is dead to it
                    _shutdown(previous.sock)
                self._inbound_by_peer[peer_id] = conn
                self._http_addresses[peer_id] = peer_http
        welcome_mac = _mac(
            self._token, _WELCOME_LABEL, [nonce, peer_nonce, self._http_address, *identity]
        )
        _send_message(
            conn.sock, {"v": PROTOCOL_VERSION, "type": "welcome", "mac": welcome_mac}, deadline
        )
        if is_probe:
            log.debug("event=probe_answered node=%s remote=%s", self.node_id, conn.remote)
            return None
        conn.sock.settimeout(None)
        log.debug(
            "event=inbound_connected node=%s peer=%s remote=%s", self.node_id, peer_id, conn.remote
        )
        return peer_id

    def _receive(self, conn: _Inbound, reader: _FrameReader, peer_id: str) -> None:
        on_frame = self._on_frame
        max_frame_bytes = self.max_frame_bytes
        while True:
            frame = reader.read_frame(max_frame_bytes)
            if frame is None:
                log.debug("event=inbound_closed node=%s peer=%s", self.node_id, peer_id)
                return
            kind, payload = frame
            if kind == HANDSHAKE_KIND:
                raise FrameError("malformed", "handshake frame after the handshake")
            on_frame(peer_id, kind, payload)

    def _send_reject(self, sock: socket.socket, reason: str) -> None:
        message = {"v": PROTOCOL_VERSION, "type": "reject", "reason": reason}
        with contextlib.suppress(OSError):
            _send_message(sock, message, time.monotonic() + 1.0)

    def _log_refusal(self, conn: _Inbound, reason: str, detail: str) -> None:
        if self._is_closed():
            return
        suppressed = self._refusals.admit(conn.remote_host, reason)
        if suppressed is None:
            return
        log.warning(
            "event=peer_rejected node=%s remote=%s reason=%s peer=%s suppressed=%d detail=%r",
            self.node_id,
            conn.remote,
            reason,
            conn.peer_id or "-",
            suppressed,
            detail,
        )

    def _is_closed(self) -> bool:
        with self._lock:
            return self._closed
