"""A test's own peer connection to a node: authenticated with the cluster token, as any
member id it likes (what an attacker holding the token, or a confused peer, could do)."""

from __future__ import annotations

import socket

from raftkv import codec
from raftkv.codec import FrameKind
from raftkv.core import Message
from raftkv.framing import FrameDecoder, encode_frame
from raftkv.localcluster import NodeProc
from raftkv.runtime.transport.handshake import MAX_HANDSHAKE_FRAME_BYTES, DialerHandshake


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
