"""A blocking, one-shot handshake: who listens at a raft address (for a join that names no
node id). Runs off the event loop (a short-lived thread); the connection is closed at once."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

from raftkv.codec import FrameKind
from raftkv.framing import FrameDecoder, FrameError, encode_frame
from raftkv.runtime.transport.handshake import (
    MAX_HANDSHAKE_FRAME_BYTES,
    DialerHandshake,
    HandshakeFailed,
    HandshakeRejected,
    PeerInfo,
)
from raftkv.runtime.transport.outbound import parse_address
from raftkv.runtime.transport.tls import certificate_names

__all__ = ["ProbeFailed", "probe"]


class ProbeFailed(Exception):
    """Nobody answered at the address, or not as a raftkv node holding our token."""


def probe(address: str, *, token: str, node_id: str, cluster_id: str,
          timeout_s: float, tls: ssl.SSLContext | None = None) -> PeerInfo:
    """`tls`: the peer TLS client context, when the cluster's peer port speaks TLS; the
    listener's certificate must then name the node id it answers with."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    handshake = DialerHandshake(token=token.encode(), node_id=node_id, cluster_id=cluster_id,
                                http_address="", probe=True, address=address)
    decoder = FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES)
    try:
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(socket.create_connection((host, port), timeout=timeout_s))
            sock = raw if tls is None else stack.enter_context(tls.wrap_socket(raw))

            def next_frame() -> bytes:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ProbeFailed(f"{address} did not finish the handshake in time")
                    sock.settimeout(left)
                    data = sock.recv(65536)
                    if not data:
                        raise ProbeFailed(f"{address} closed the connection")
                    frames = decoder.feed(data)
                    if frames:
                        kind, payload = frames[0]
                        if kind != FrameKind.HANDSHAKE:
                            raise ProbeFailed(f"{address} does not speak the raftkv protocol")
                        return payload

            auth = handshake.on_hello(next_frame())
            sock.sendall(encode_frame(FrameKind.HANDSHAKE, auth))
            listener = handshake.on_welcome(next_frame())
            if tls is not None and isinstance(sock, ssl.SSLSocket):
                names = certificate_names(sock.getpeercert())
                if listener.node_id not in names:
                    raise ProbeFailed(f"{address}'s certificate does not name "
                                      f"{listener.node_id}")
            return listener
    except (HandshakeRejected, HandshakeFailed, FrameError, ssl.SSLError) as e:
        raise ProbeFailed(str(e)) from None
    except OSError as e:
        raise ProbeFailed(f"cannot reach {address}: {e.strerror or e}") from None
