"""A blocking, one-shot handshake: who listens at a raft address (for a join: the id of the node
there, which must be the id a join names). Runs off the event loop (a short-lived thread);
the connection is closed at once."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from typing import Final

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

__all__ = ["MISMATCHES", "ProbeFailed", "probe"]


_DEFINITE_REJECTIONS: Final = {"wrong_token": "cluster", "wrong_cluster": "cluster",
                                "version": "version"}
"""A listener's refusals that asking again will not lift (another token, cluster or version),
and the mismatch each is."""


MISMATCHES: Final = ("certificate", "cluster", "version", "protocol")
"""What a failure that asking again will not change found (ProbeFailed.mismatch): a
certificate that does not prove the id (another CA's, or one not naming the id the node
answers with); a node of another cluster (another token or cluster id); another protocol
version; no raftkv node (it does not speak the handshake)."""


class ProbeFailed(Exception):
    """Nobody answered at the address, or not as a raftkv node holding our token.

    `mismatch` (one of MISMATCHES): something answered, and not as a node that could be a
    member (it speaks no raftkv protocol, holds another token, belongs to another cluster or
    protocol version, presents a certificate of another CA or one that does not name the id
    it answers with): asking again will not change that. None: nothing answered in full (no
    listener yet, unreachable, closed, timed out): the node may not be listening yet."""

    def __init__(self, message: str, *, mismatch: str | None = None) -> None:
        super().__init__(message)
        assert mismatch is None or mismatch in MISMATCHES, mismatch
        self.mismatch = mismatch


def probe(address: str, *, token: str, node_id: str, cluster_id: str,
          timeout_s: float, tls: ssl.SSLContext | None = None,
          source_host: str | None = None) -> PeerInfo:
    """`tls`: the peer TLS client context, when the cluster's peer port speaks TLS; the
    listener's certificate must then name the node id it answers with. `source_host`: the
    local address to leave from, the one this node's peer links leave from
    (PeerTransport.source_host; None: the kernel picks), so that the probe reaches what the
    links reach, through the same firewall rules."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    handshake = DialerHandshake(token=token.encode(), node_id=node_id, cluster_id=cluster_id,
                                http_address="", probe=True, address=address)
    decoder = FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES)
    try:
        with contextlib.ExitStack() as stack:
            source = None if source_host is None else (source_host, 0)
            raw = stack.enter_context(socket.create_connection(
                (host, port), timeout=timeout_s, source_address=source))
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
                            raise ProbeFailed(f"{address} does not speak the raftkv protocol",
                                              mismatch="protocol")
                        return payload

            auth = handshake.on_hello(next_frame())
            sock.sendall(encode_frame(FrameKind.HANDSHAKE, auth))
            listener = handshake.on_welcome(next_frame())
            if tls is not None and isinstance(sock, ssl.SSLSocket):
                names = certificate_names(sock.getpeercert())
                if listener.node_id not in names:
                    raise ProbeFailed(f"{address}'s certificate does not name "
                                      f"{listener.node_id}, the id it answers with",
                                      mismatch="certificate")
            return listener
    except HandshakeRejected as e:
        raise ProbeFailed(str(e), mismatch=_DEFINITE_REJECTIONS.get(e.reason)) from None
    except ssl.SSLCertVerificationError as e:
        raise ProbeFailed(str(e), mismatch="certificate") from None
    except (HandshakeFailed, FrameError) as e:
        raise ProbeFailed(str(e), mismatch="protocol") from None
    except ssl.SSLError as e:  # the TLS handshake broke off: maybe only this connection
        raise ProbeFailed(str(e)) from None
    except OSError as e:
        raise ProbeFailed(f"cannot reach {address}: {e.strerror or e}") from None
