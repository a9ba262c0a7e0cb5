"""A test's own peer connection to a node: authenticated with the cluster token, as any
member id it likes (what an attacker holding the token, or a confused peer, could do); and a
stand-in listener answering the handshake as a node id of the test's choice."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

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


@contextlib.contextmanager
def answering_as(token: str, node_id: str, host: str = "127.0.0.1") -> Iterator[str]:
    """A raft address (yielded) where a stand-in answers the peer handshake as node `node_id`,
    holding the cluster token, then drops whatever it is sent: it passes a join's probe, and
    as a member it is a learner that never catches up."""
    server = socket.create_server((host, 0))
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn:
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

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"{host}:{server.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join(5)
        server.close()
        for t in threads:
            t.join(5)
