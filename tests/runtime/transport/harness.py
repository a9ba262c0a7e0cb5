"""Nodes' peer transports (raftkv.runtime.transport) on one EventLoop turning in a background
thread, on loopback with ephemeral ports; and raw sockets that speak (or break) the protocol.

Everything on the loop goes through `LoopThread.call`; deliveries, peer state changes and log
lines are recorded into thread-safe lists that a test waits on with a deadline. Each node's
transport is flushed at the end of every loop turn, as the Raft process does.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]

from raftkv.codec import FrameKind
from raftkv.framing import FrameDecoder, encode_frame
from raftkv.runtime.transport import PeerTransport
from raftkv.runtime.transport.handshake import MAX_HANDSHAKE_FRAME_BYTES, DialerHandshake
from tests.support.event_loop import LoopThread

TOKEN = "s3cret-token"
CLUSTER = "cluster-1"
WAIT_S = 5.0
RAFT = FrameKind.RAFT
"""A kind peers may send (the transport does not look inside frames)."""


class Inbox:
    """The `deliver` callback: records (peer, kind, payload) and lets a test wait for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.frames: list[tuple[str, int, bytes]] = []

    def __call__(self, peer: str, frames: list[tuple[int, bytes]]) -> None:
        with self._cond:
            self.frames.extend((peer, kind, payload) for kind, payload in frames)
            self._cond.notify_all()

    def wait_for_count(self, count: int, timeout_s: float = WAIT_S
                       ) -> list[tuple[str, int, bytes]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.frames) >= count, timeout_s)
            assert ok, f"got {len(self.frames)} frames, expected {count}"
            return list(self.frames)

    def payloads_from(self, peer: str) -> list[bytes]:
        with self._cond:
            return [p for frm, _, p in self.frames if frm == peer]

    def snapshot(self) -> list[tuple[str, int, bytes]]:
        with self._cond:
            return list(self.frames)


class PeerStates:
    """The on_peer_state callback: records (peer, up) changes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.changes: list[tuple[str, bool]] = []

    def __call__(self, peer: str, up: bool) -> None:
        with self._cond:
            self.changes.append((peer, up))
            self._cond.notify_all()

    def wait_for(self, peer: str, up: bool, *, after: int = 0,
                 timeout_s: float = WAIT_S) -> int:
        """Index of the first (peer, up) change past index `after` (-1: any)."""

        def find() -> int | None:
            for i in range(after, len(self.changes)):
                if self.changes[i] == (peer, up):
                    return i
            return None

        with self._cond:
            assert self._cond.wait_for(lambda: find() is not None, timeout_s), self.changes
            index = find()
            assert index is not None
            return index


class LogWatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self._cond = threading.Condition()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.monotonic = time.monotonic()  # when it was logged, on the tests' clock
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def lines(self, *fragments: str, level: int | None = None) -> list[logging.LogRecord]:
        with self._cond:
            return [r for r in self.records if all(f in r.getMessage() for f in fragments)
                    and (level is None or r.levelno == level)]

    def wait_for(self, *fragments: str, level: int | None = None,
                 timeout_s: float = WAIT_S) -> logging.LogRecord:
        with self._cond:
            assert self._cond.wait_for(lambda: self.lines(*fragments, level=level),
                                       timeout_s), [r.getMessage() for r in self.records]
            return self.lines(*fragments, level=level)[0]


@dataclass
class Node:
    node_id: str
    lt: LoopThread
    transport: PeerTransport
    inbox: Inbox
    states: PeerStates
    http_address: str

    @property
    def port(self) -> int:
        return self.transport.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, fn: Callable[[PeerTransport], Any]) -> Any:
        return self.lt.call(lambda: fn(self.transport))

    def send(self, to: str, payload: bytes, kind: int = RAFT) -> bool:
        return bool(self.call(lambda t: t.send(to, kind, payload)))

    def send_many(self, to: str, payloads: list[bytes], kind: int = RAFT) -> list[bool]:
        return list(self.call(lambda t: [t.send(to, kind, p) for p in payloads]))

    def set_peers(self, peers: dict[str, str]) -> None:
        self.call(lambda t: t.set_peers(peers))

    def reachable(self) -> dict[str, bool]:
        return dict(self.call(lambda t: t.reachable()))

    def close(self) -> None:
        self.call(lambda t: t.close())


MakeNode = Callable[..., Node]


def flushed(transport: PeerTransport) -> bool:
    transport.flush()
    return False


def mesh(*nodes: Node) -> None:
    for node in nodes:
        node.set_peers({o.node_id: o.address for o in nodes if o is not node})


# --------------------------------------------------------------------------- raw sockets
def frame(kind: int, payload: bytes) -> bytes:
    return encode_frame(kind, payload)


def read_frame(sock: socket.socket, decoder: FrameDecoder) -> tuple[int, bytes]:
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a whole frame arrived")
        frames = decoder.feed(data)
        if frames:
            assert len(frames) == 1, frames
            return frames[0]


def read_until_closed(sock: socket.socket, timeout_s: float = WAIT_S) -> bytes:
    """Everything the transport sends until it closes the connection."""
    sock.settimeout(timeout_s)
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


def handshake_messages(data: bytes) -> list[dict[str, Any]]:
    messages = []
    while len(data) >= 5:
        (length,) = struct.unpack_from(">I", data)
        messages.append(msgpack.unpackb(data[5 : 4 + length], raw=False))
        data = data[4 + length :]
    return messages


def raw_connection(target: Node, source_host: str | None = None) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", target.port), timeout=WAIT_S,
        source_address=None if source_host is None else (source_host, 0))


def raw_handshaken_connection(target: Node, as_node: str, *, token: str = TOKEN,
                              cluster_id: str = CLUSTER, http_address: str = "",
                              probe: bool = False) -> socket.socket:
    """A raw socket to `target` that passed the handshake as `as_node` (blocking)."""
    sock = raw_connection(target)
    try:
        handshake = DialerHandshake(token=token.encode(), node_id=as_node,
                                    cluster_id=cluster_id, http_address=http_address,
                                    probe=probe, address=target.address)
        decoder = FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES)
        kind, hello = read_frame(sock, decoder)
        assert kind == FrameKind.HANDSHAKE
        sock.sendall(frame(FrameKind.HANDSHAKE, handshake.on_hello(hello)))
        kind, welcome = read_frame(sock, decoder)
        assert kind == FrameKind.HANDSHAKE
        handshake.on_welcome(welcome)
    except BaseException:
        sock.close()
        raise
    return sock


def closed_port() -> int:
    """A loopback port nobody listens on (bound a moment ago, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
