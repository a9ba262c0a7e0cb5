"""The peer handshake, sans-IO: who is at the other end, and do they hold the cluster token.

The first frames of every peer connection (kind FrameKind.HANDSHAKE, msgpack maps):

    listener -> dialer   {"v", "type": "hello", "node", "cluster", "http", "nonce", "inc"}
    dialer -> listener   {"v", "type": "auth", "node", "cluster", "http", "probe", "nonce",
                          "inc", "mac": HMAC-SHA256(token, both nonces + both identities)}
    listener -> dialer   {"v", "type": "welcome", "mac": HMAC-SHA256(token, ...)}
                      or {"v", "type": "reject", "reason": "wrong_token" | ...}

The listener checks the dialer's MAC in constant time; the welcome's MAC proves to the dialer
that the listener holds the token too. Nonces make every MAC single-use. A dialer only ever
MACs a listener's nonce after connecting to an address it chose itself (a member's address
from the log, or an address an authorised operator gave a join), and tokens are long random
secrets (raftkv.settings refuses short ones), so a MAC seen by an impostor listener gives it
nothing to guess from.

Version 2: forwarded operations are answered once committed (raftkv.codec's FORWARD formats)
and the leader carries the commit index on appends and heartbeats only. Version 3 (this one):
a command sent with a token carries it in envelope 2 (raftkv.kv.commands), which an older
node could not apply: it would skip writes the others apply. A node refuses a peer of
another version with the reason `version`: upgrade every node.

"inc" (optional, outside the MAC: it guards against an operator's mistake, not an attacker,
and a version-3 node without it still links) is the incarnation of the sender's data dir, a
random id each data dir is given when made: the members refuse a member whose incarnation
differs from the one the cluster recorded for it (its data dir was wiped or replaced).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any, Final

import msgpack  # type: ignore[import-untyped, unused-ignore]

from raftkv.ports import is_incarnation

__all__ = [
    "MAX_HANDSHAKE_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "DialerHandshake",
    "HandshakeFailed",
    "HandshakeRejected",
    "ListenerHandshake",
    "PeerAuth",
    "PeerInfo",
    "Refused",
    "reject_message",
]

PROTOCOL_VERSION: Final = 3
MAX_HANDSHAKE_FRAME_BYTES: Final = 16 << 10
MAX_ID_CHARS: Final = 256
NONCE_BYTES: Final = 32
_AUTH_LABEL: Final = b"raftkv/2 auth\n"
_WELCOME_LABEL: Final = b"raftkv/2 welcome\n"


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The listener's identity, as the dialer verified it."""

    node_id: str
    http_address: str
    cluster_id: str
    incarnation: str = ""


@dataclass(frozen=True, slots=True)
class PeerAuth:
    """The dialer's identity, as the listener verified it (its MAC was right)."""

    node_id: str
    cluster_id: str
    http_address: str
    probe: bool
    incarnation: str = ""


class Refused(Exception):
    """Listener side: the handshake is refused for `reason` (a stable code)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class HandshakeRejected(Exception):
    """Dialer side: the listener refused us; `reason` is its stable code."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address} refused the handshake: {reason}")
        self.address = address
        self.reason = reason


class HandshakeFailed(Exception):
    """Dialer side: the listener broke the protocol or could not prove it holds the token."""


def _pack(message: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def _mac(token: bytes, label: bytes, fields: list[Any]) -> bytes:
    return hmac.new(token, label + _pack({"f": fields}), hashlib.sha256).digest()


def _unpack(payload: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack signals bad input with many types
        raise Refused("malformed", f"handshake is not msgpack ({type(exc).__name__})") from exc
    if not isinstance(message, dict):
        raise Refused("malformed", "handshake is not a map")
    if message.get("v") != PROTOCOL_VERSION:
        raise Refused("version", f"unsupported handshake version {message.get('v')!r}")
    return message


def _text(message: dict[str, Any], key: str, *, allow_empty: bool = True) -> str:
    value = message.get(key)
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS or (not value and not allow_empty):
        raise Refused("bad_handshake", f"missing or invalid field {key!r}")
    return value


def _nonce(message: dict[str, Any]) -> bytes:
    value = message.get("nonce")
    if not isinstance(value, bytes) or len(value) != NONCE_BYTES:
        raise Refused("bad_handshake", "missing or invalid field 'nonce'")
    return value


def _incarnation(message: dict[str, Any]) -> str:
    """The optional "inc": "" when absent (a node of an earlier build); a bad one is a bad
    handshake."""
    value = message.get("inc", "")
    if value != "" and not is_incarnation(value):
        raise Refused("bad_handshake", "invalid field 'inc'")
    return str(value)


def reject_message(reason: str) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "type": "reject", "reason": reason})


class ListenerHandshake:
    """The accepting side of one connection."""

    def __init__(self, *, token: bytes, node_id: str, cluster_id: str,
                 http_address: str, incarnation: str = "") -> None:
        self._token = token
        self._incarnation = incarnation
        self._node_id = node_id
        self._cluster_id = cluster_id
        self._http = http_address
        self._nonce = os.urandom(NONCE_BYTES)
        self._identity: list[Any] = []
        self._peer_nonce = b""

    def hello(self) -> bytes:
        return _pack({"v": PROTOCOL_VERSION, "type": "hello", "node": self._node_id,
                      "cluster": self._cluster_id, "http": self._http, "nonce": self._nonce,
                      "inc": self._incarnation})

    def check_auth(self, payload: bytes) -> PeerAuth:
        """The dialer's auth message, verified; Refused(reason) if it is not acceptable."""
        auth = _unpack(payload)
        if auth.get("type") != "auth":
            raise Refused("bad_handshake", f"expected auth, got {str(auth.get('type'))[:20]!r}")
        peer_id = _text(auth, "node", allow_empty=False)
        peer_cluster = _text(auth, "cluster")
        peer_http = _text(auth, "http")
        peer_nonce = _nonce(auth)
        incarnation = _incarnation(auth)
        probe = auth.get("probe", False)
        mac = auth.get("mac")
        if not isinstance(probe, bool) or not isinstance(mac, bytes):
            raise Refused("bad_handshake", "missing or invalid field 'probe' or 'mac'")
        identity = [self._node_id, self._cluster_id, peer_id, peer_cluster, peer_http, probe]
        expected = _mac(self._token, _AUTH_LABEL, [self._nonce, peer_nonce, *identity])
        if not hmac.compare_digest(mac, expected):
            raise Refused("wrong_token", f"node={peer_id}")
        self._identity = identity
        self._peer_nonce = peer_nonce
        return PeerAuth(peer_id, peer_cluster, peer_http, probe, incarnation)

    def welcome(self) -> bytes:
        """After check_auth: the answer that proves we hold the token too."""
        mac = _mac(self._token, _WELCOME_LABEL,
                   [self._nonce, self._peer_nonce, self._http, *self._identity])
        return _pack({"v": PROTOCOL_VERSION, "type": "welcome", "mac": mac})


class DialerHandshake:
    """The connecting side of one connection."""

    def __init__(self, *, token: bytes, node_id: str, cluster_id: str, http_address: str,
                 probe: bool, address: str, incarnation: str = "") -> None:
        self._token = token
        self._incarnation = incarnation
        self._node_id = node_id
        self._cluster_id = cluster_id
        self._http = http_address
        self._probe = probe
        self._address = address
        self._nonce = os.urandom(NONCE_BYTES)
        self._listener: PeerInfo | None = None
        self._identity: list[Any] = []
        self._listener_nonce = b""

    def on_hello(self, payload: bytes) -> bytes:
        """The listener's hello; returns our auth message."""
        hello = self._read(payload)
        if hello.get("type") != "hello":
            raise HandshakeFailed(f"{self._address} did not start with a hello")
        try:
            listener = PeerInfo(_text(hello, "node", allow_empty=False), _text(hello, "http"),
                                _text(hello, "cluster"), _incarnation(hello))
            self._listener_nonce = _nonce(hello)
        except Refused as exc:
            raise HandshakeFailed(f"{self._address} sent a bad hello: {exc}") from None
        self._listener = listener
        self._identity = [listener.node_id, listener.cluster_id, self._node_id,
                          self._cluster_id, self._http, self._probe]
        mac = _mac(self._token, _AUTH_LABEL, [self._listener_nonce, self._nonce, *self._identity])
        return _pack({"v": PROTOCOL_VERSION, "type": "auth", "node": self._node_id,
                      "cluster": self._cluster_id, "http": self._http, "probe": self._probe,
                      "nonce": self._nonce, "inc": self._incarnation, "mac": mac})

    def on_welcome(self, payload: bytes) -> PeerInfo:
        """The listener's answer to our auth: its verified identity."""
        reply = self._read(payload)
        listener = self._listener
        if listener is None:
            raise HandshakeFailed(f"{self._address} answered before its hello")
        mac = reply.get("mac")
        if reply.get("type") != "welcome" or not isinstance(mac, bytes):
            raise HandshakeFailed(f"{self._address} sent a bad handshake reply")
        expected = _mac(self._token, _WELCOME_LABEL, [self._listener_nonce, self._nonce,
                                                      listener.http_address, *self._identity])
        if not hmac.compare_digest(mac, expected):
            raise HandshakeFailed(f"{self._address} could not prove it holds the cluster token")
        return listener

    def _read(self, payload: bytes) -> dict[str, Any]:
        try:
            message = _unpack(payload)
        except Refused as exc:
            if exc.reason == "version":
                raise HandshakeRejected(self._address, "version") from None
            raise HandshakeFailed(f"{self._address}: {exc}") from None
        if message.get("type") == "reject":
            raise HandshakeRejected(self._address, str(message.get("reason"))[:64])
        return message
