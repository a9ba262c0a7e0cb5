"""A test's own peer connection to a node: authenticated with the cluster token, as any
member id it likes (what an attacker holding the token, or a confused peer, could do); and a
stand-in listener answering the handshake as a node id of the test's choice."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Final

from raftkv import codec
from raftkv.codec import FrameKind
from raftkv.core import Message
from raftkv.framing import FrameDecoder, FrameError, encode_frame
from raftkv.localcluster import NodeProc
from raftkv.runtime.transport.handshake import (
    MAX_HANDSHAKE_FRAME_BYTES,
    DialerHandshake,
    ListenerHandshake,
    Refused,
    reject_message,
)


def dial_as(node: NodeProc, token: str, claimed_id: str) -> socket.socket:
    """A connection to `node`'s peer port, authenticated as member `claimed_id`."""
    sock = socket.create_connection((node.raft_host, node.raft_port), timeout=10)
    hs = DialerHandshake(token=token.encode(), node_id=claimed_id, cluster_id="",
                         http_address="", probe=False, address=node.raft)
    decoder = FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES)

    def frame() -> bytes:
        while True:
            frames = decoder.feed(sock.recv(65536))
            if frames:
                return frames[0][1]

    sock.sendall(encode_frame(FrameKind.HANDSHAKE, hs.on_hello(frame())))
    hs.on_welcome(frame())
    return sock


def send_raft(sock: socket.socket, *messages: Message) -> None:
    """Raft messages as RAFT frames on a connection made by dial_as."""
    sock.sendall(b"".join(encode_frame(FrameKind.RAFT, codec.encode_message(m))
                          for m in messages))


Script = Callable[[socket.socket, threading.Event], None]
"""What a fake listener does with one accepted connection (in a thread of its own); the event
is set when the test ends (a script that holds its connection waits for it)."""


LISTENER_WAIT_S: Final = 5.0


class FakeListener:
    """A listening socket on 127.0.0.1 whose accepted connections are handed to `script`, in
    a thread; `close` stops it and waits for those threads (each for at most
    LISTENER_WAIT_S)."""

    def __init__(self, script: Script) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.script = script
        self.accepted = 0
        self.stop = threading.Event()
        self._wait_s = LISTENER_WAIT_S
        self._served: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(self._wait_s)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._served.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            self.script(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(self._wait_s)
        self.sock.close()
        for t in self._served:
            t.join(self._wait_s)


def _handshake_as(token: str, node_id: str) -> Script:
    """Answer the peer handshake as node `node_id` holding `token` (refusing a dialer the
    handshake refuses, with its reason), then drop whatever the dialer sends."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.settimeout(0.5)
        hs = ListenerHandshake(token=token.encode(), node_id=node_id, cluster_id="",
                               http_address="")
        decoder = FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES)
        try:
            conn.sendall(encode_frame(FrameKind.HANDSHAKE, hs.hello()))
            frames: list[tuple[int, bytes]] = []
            while not frames and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    data = conn.recv(65536)
                    if not data:
                        return
                    frames = decoder.feed(data)
            if not frames:
                return
            try:
                hs.check_auth(frames[0][1])
            except Refused as e:
                conn.sendall(encode_frame(FrameKind.HANDSHAKE, reject_message(e.reason)))
                return
            conn.sendall(encode_frame(FrameKind.HANDSHAKE, hs.welcome()))
            while not stop.is_set():  # a member's link: take its frames, answer none
                with contextlib.suppress(TimeoutError):
                    if not conn.recv(1 << 20):
                        return
        except (OSError, FrameError):
            return

    return script


@contextlib.contextmanager
def answering_as(token: str, node_id: str) -> Iterator[str]:
    """A raft address (yielded) where a stand-in answers the peer handshake as node `node_id`,
    holding the cluster token, then drops whatever it is sent: it passes a join's probe, and
    as a member it is a learner that never catches up."""
    listener = FakeListener(_handshake_as(token, node_id))
    try:
        yield listener.address
    finally:
        listener.close()
