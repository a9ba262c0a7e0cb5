"""The peer TCP transport on loopback: real sockets, ephemeral ports, waits with deadlines."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest

from raftkv.localcluster import free_port
from raftkv.runtime import transport as transport_module
from raftkv.runtime.transport import (
    HandshakeRejected,
    PeerInfo,
    PeerTransport,
    TransportError,
    probe,
)

TOKEN = "s3cret-token"
CLUSTER = "cluster-1"
WAIT_S = 5.0
KIND_APP = 7


class Inbox:
    """on_frame callback that records frames and lets a test wait for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.frames: list[tuple[str, int, bytes]] = []
        self.fail_on_kind: int | None = None

    def __call__(self, peer: str, kind: int, payload: bytes) -> None:
        if kind == self.fail_on_kind:
            raise RuntimeError("runtime bug while handling a frame")
        with self._cond:
            self.frames.append((peer, kind, payload))
            self._cond.notify_all()

    def wait_for_count(self, count: int, timeout_s: float = WAIT_S) -> list[tuple[str, int, bytes]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.frames) >= count, timeout_s)
            assert ok, f"got {len(self.frames)} frames, expected {count}"
            return list(self.frames)

    def payloads_from(self, peer: str) -> list[bytes]:
        with self._cond:
            return [p for frm, _, p in self.frames if frm == peer]


class PeerStates:
    """on_peer_state callback that records (peer, up) changes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.changes: list[tuple[str, bool]] = []

    def __call__(self, peer: str, up: bool) -> None:
        with self._cond:
            self.changes.append((peer, up))
            self._cond.notify_all()

    def wait_for(self, peer: str, up: bool, *, after: int = 0, timeout_s: float = WAIT_S) -> int:
        """Index of the first (peer, up) change at or after `after`."""

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
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def lines(self, *fragments: str) -> list[logging.LogRecord]:
        with self._cond:
            return [r for r in self.records if all(f in r.getMessage() for f in fragments)]

    def wait_for(self, *fragments: str, timeout_s: float = WAIT_S) -> logging.LogRecord:
        with self._cond:
            assert self._cond.wait_for(lambda: self.lines(*fragments), timeout_s), [
                r.getMessage() for r in self.records
            ]
            return self.lines(*fragments)[0]


@dataclass
class Node:
    node_id: str
    transport: PeerTransport
    inbox: Inbox
    states: PeerStates
    http_address: str = field(default="")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.transport.port}"


MakeNode = Callable[..., Node]


@pytest.fixture
def logs() -> Iterator[LogWatcher]:
    watcher = LogWatcher()
    logger = logging.getLogger("raftkv.runtime.transport")
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watcher)
    yield watcher
    logger.removeHandler(watcher)
    logger.setLevel(previous)


@pytest.fixture
def make_node() -> Iterator[MakeNode]:
    created: list[PeerTransport] = []

    def make(
        node_id: str,
        *,
        token: str = TOKEN,
        cluster_id: str = CLUSTER,
        port: int = 0,
        **options: Any,
    ) -> Node:
        inbox, states = Inbox(), PeerStates()
        http_address = f"{node_id}.test:8080"
        transport = PeerTransport(
            node_id=node_id,
            cluster_id=cluster_id,
            token=token,
            bind_host="127.0.0.1",
            bind_port=port,
            http_address=http_address,
            on_frame=inbox,
            on_peer_state=states,
            **options,
        )
        created.append(transport)
        transport.start()
        return Node(node_id, transport, inbox, states, http_address)

    yield make
    for transport in created:
        transport.close()


def mesh(*nodes: Node) -> None:
    for node in nodes:
        node.transport.set_peers({o.node_id: o.address for o in nodes if o is not node})


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


def raw_handshaken_connection(target: Node, as_node: str) -> socket.socket:
    """A raw socket to `target` that passed the handshake as `as_node`."""
    host, port = target.address.split(":")
    deadline = time.monotonic() + WAIT_S
    sock = transport_module._connect(host, int(port), deadline)
    transport_module._dial_handshake(
        sock,
        address=target.address,
        token=TOKEN.encode(),
        node_id=as_node,
        cluster_id=CLUSTER,
        http_address="",
        probe=False,
        deadline=deadline,
    )
    sock.settimeout(WAIT_S)
    return sock


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


# -- delivery --------------------------------------------------------------------------------


def test_two_nodes_exchange_frames_both_ways_in_order(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)

    for i in range(50):
        assert a.transport.send("b", KIND_APP, b"a%d" % i)
        assert b.transport.send("a", KIND_APP + 1, b"b%d" % i)

    assert b.inbox.wait_for_count(50) == [("a", KIND_APP, b"a%d" % i) for i in range(50)]
    assert a.inbox.wait_for_count(50) == [("b", KIND_APP + 1, b"b%d" % i) for i in range(50)]


def test_three_nodes_exchange_frames_on_every_link_in_order(make_node: MakeNode) -> None:
    nodes = [make_node("n1"), make_node("n2"), make_node("n3")]
    mesh(*nodes)

    for i in range(100):
        for sender in nodes:
            for receiver in nodes:
                if receiver is not sender:
                    payload = f"{sender.node_id}->{receiver.node_id}#{i}".encode()
                    assert sender.transport.send(receiver.node_id, KIND_APP, payload)

    for receiver in nodes:
        receiver.inbox.wait_for_count(200)
        for sender in nodes:
            if sender is not receiver:
                expected = [
                    f"{sender.node_id}->{receiver.node_id}#{i}".encode() for i in range(100)
                ]
                assert receiver.inbox.payloads_from(sender.node_id) == expected


def test_thousands_of_small_frames_arrive_intact_and_in_order(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)
    payloads = [os.urandom(i % 97) + i.to_bytes(4, "big") for i in range(5000)]

    for payload in payloads:
        assert a.transport.send("b", KIND_APP, payload)

    frames = b.inbox.wait_for_count(len(payloads), timeout_s=10)
    assert [p for _, _, p in frames] == payloads
    assert a.transport.dropped_frames() == {"b": 0}


def test_frame_at_the_size_limit_arrives_intact(make_node: MakeNode) -> None:
    limit = 4 << 20
    a, b = make_node("a", max_frame_bytes=limit), make_node("b", max_frame_bytes=limit)
    mesh(a, b)
    big = os.urandom(limit - 1)  # + the kind byte = exactly max_frame_bytes

    assert a.transport.send("b", KIND_APP, b"before")
    assert a.transport.send("b", KIND_APP, big)
    assert a.transport.send("b", KIND_APP, b"after")

    frames = b.inbox.wait_for_count(3)
    assert [p for _, _, p in frames] == [b"before", big, b"after"]


def test_send_refuses_a_payload_over_the_limit_and_the_reserved_kind(make_node: MakeNode) -> None:
    a, b = make_node("a", max_frame_bytes=1024), make_node("b")
    mesh(a, b)

    with pytest.raises(ValueError, match="max_frame_bytes"):
        a.transport.send("b", KIND_APP, bytes(1024))
    with pytest.raises(ValueError, match="kind"):
        a.transport.send("b", 0, b"x")


def test_send_to_unknown_peer_returns_false(make_node: MakeNode) -> None:
    a = make_node("a")
    a.transport.set_peers({"b": f"127.0.0.1:{free_port()}"})

    assert a.transport.send("zz", KIND_APP, b"x") is False


def test_full_queue_drops_new_frames_without_blocking(make_node: MakeNode) -> None:
    a = make_node("a", queue_limit=10)
    a.transport.set_peers({"b": f"127.0.0.1:{free_port()}"})  # nobody listens there

    started = time.monotonic()
    results = [a.transport.send("b", KIND_APP, b"x") for _ in range(1000)]
    elapsed_s = time.monotonic() - started

    assert results[:10] == [True] * 10
    assert not any(results[10:])
    assert a.transport.dropped_frames() == {"b": 990}
    assert elapsed_s < 1.0


def test_peer_http_address_is_learned_from_the_handshake(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)

    a.states.wait_for("b", True)
    b.states.wait_for("a", True)

    assert a.transport.peer_http_address("b") == "b.test:8080"
    assert b.transport.peer_http_address("a") == "a.test:8080"
    assert a.transport.peer_http_address("nobody") is None
    assert a.transport.reachable() == {"b": True}


# -- refusals ---------------------------------------------------------------------------------


def test_wrong_token_is_refused_and_logged(make_node: MakeNode, logs: LogWatcher) -> None:
    a, b = make_node("a", token="not-the-token"), make_node("b")
    mesh(a, b)
    a.transport.send("b", KIND_APP, b"must not arrive")

    record = logs.wait_for("event=peer_rejected", "node=b", "reason=wrong_token")
    assert record.levelno == logging.WARNING
    assert "remote=127.0.0.1:" in record.getMessage()
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "wrong_token")
    assert b.inbox.frames == []
    assert a.transport.reachable() == {"b": False}


def test_wrong_cluster_is_refused(make_node: MakeNode, logs: LogWatcher) -> None:
    a, b = make_node("a", cluster_id="other-cluster"), make_node("b")
    mesh(a, b)
    a.transport.send("b", KIND_APP, b"must not arrive")

    logs.wait_for("event=peer_rejected", "node=b", "reason=wrong_cluster")
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "wrong_cluster")
    assert b.inbox.frames == []


def test_unknown_node_is_refused(make_node: MakeNode, logs: LogWatcher) -> None:
    a, b = make_node("a"), make_node("b")
    a.transport.set_peers({"b": b.address})  # b does not know a
    a.transport.send("b", KIND_APP, b"must not arrive")

    logs.wait_for("event=peer_rejected", "node=b", "reason=unknown_node", "peer=-")
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "unknown_node")
    assert b.inbox.frames == []


def test_refusals_from_one_address_are_logged_once_per_interval(
    make_node: MakeNode, logs: LogWatcher
) -> None:
    b = make_node("b")
    for _ in range(5):
        with pytest.raises(HandshakeRejected):
            probe(b.address, cluster_id=CLUSTER, token="wrong", node_id="x", timeout_s=WAIT_S)

    assert len(logs.lines("event=peer_rejected", "reason=wrong_token")) == 1


def test_a_node_that_learns_the_cluster_id_late_is_then_accepted(make_node: MakeNode) -> None:
    a, b = make_node("a", cluster_id="not-yet-right"), make_node("b")
    mesh(a, b)
    a.states.wait_for("b", False)

    a.transport.set_cluster_id(CLUSTER)
    a.states.wait_for("b", True)
    assert a.transport.send("b", KIND_APP, b"hello")
    assert b.inbox.wait_for_count(1) == [("a", KIND_APP, b"hello")]


def test_garbage_bytes_close_that_connection_and_others_keep_working(
    make_node: MakeNode, logs: LogWatcher
) -> None:
    a, b = make_node("a"), make_node("b")
    with socket.create_connection(("127.0.0.1", b.transport.port), timeout=WAIT_S) as raw:
        raw.sendall(frame(0, b"\xc1\xc1\xc1 not msgpack \xc1"))
        replies = handshake_messages(read_until_closed(raw))

    assert [m["type"] for m in replies] == ["hello", "reject"]
    assert replies[1]["reason"] == "malformed"
    logs.wait_for("event=peer_rejected", "node=b", "reason=malformed")

    mesh(a, b)
    assert a.transport.send("b", KIND_APP, b"still serving")
    assert b.inbox.wait_for_count(1) == [("a", KIND_APP, b"still serving")]


def test_oversized_length_prefix_closes_the_connection(
    make_node: MakeNode, logs: LogWatcher
) -> None:
    b = make_node("b")
    with socket.create_connection(("127.0.0.1", b.transport.port), timeout=WAIT_S) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")  # "GET " is a 1.2 GB length
        read_until_closed(raw)

    logs.wait_for("event=peer_rejected", "node=b", "reason=frame_too_large")


def test_oversized_frame_from_a_handshaken_peer_closes_its_connection(
    make_node: MakeNode, logs: LogWatcher
) -> None:
    b = make_node("b", max_frame_bytes=1024)
    b.transport.set_peers({"a": f"127.0.0.1:{free_port()}"})
    raw = raw_handshaken_connection(b, as_node="a")
    with raw:
        raw.sendall(frame(KIND_APP, b"fine") + struct.pack(">IB", 1025, KIND_APP) + bytes(1024))
        read_until_closed(raw)

    logs.wait_for("event=peer_rejected", "node=b", "reason=frame_too_large", "peer=a")
    assert b.inbox.frames == [("a", KIND_APP, b"fine")]


def test_a_stream_ending_mid_frame_delivers_only_the_whole_frames(
    make_node: MakeNode, logs: LogWatcher
) -> None:
    b = make_node("b")
    b.transport.set_peers({"a": f"127.0.0.1:{free_port()}"})
    with raw_handshaken_connection(b, as_node="a") as raw:
        raw.sendall(frame(KIND_APP, b"whole") + frame(KIND_APP, b"cut short")[:7])

    logs.wait_for("event=inbound_closed", "node=b", "peer=a")
    assert b.inbox.frames == [("a", KIND_APP, b"whole")]


def test_zero_length_frame_closes_the_connection(make_node: MakeNode, logs: LogWatcher) -> None:
    b = make_node("b")
    with socket.create_connection(("127.0.0.1", b.transport.port), timeout=WAIT_S) as raw:
        raw.sendall(b"\x00\x00\x00\x00")
        read_until_closed(raw)

    logs.wait_for("event=peer_rejected", "node=b", "reason=malformed")


def test_a_handshake_that_never_completes_is_closed_at_the_deadline(
    make_node: MakeNode, logs: LogWatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport_module, "HANDSHAKE_TIMEOUT_S", 0.2)
    b = make_node("b")
    with socket.create_connection(("127.0.0.1", b.transport.port), timeout=WAIT_S) as raw:
        started = time.monotonic()
        replies = handshake_messages(read_until_closed(raw))

    assert time.monotonic() - started < 2.0
    assert [m["type"] for m in replies] == ["hello"]
    logs.wait_for("event=peer_rejected", "node=b", "reason=bad_handshake")


# -- failures and lifecycle -------------------------------------------------------------------


def test_peer_restarted_on_the_same_port_is_reconnected(
    make_node: MakeNode, logs: LogWatcher
) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)
    assert a.transport.send("b", KIND_APP, b"one")
    b.inbox.wait_for_count(1)
    up = a.states.wait_for("b", True)

    port = b.transport.port
    b.transport.close()
    down = a.states.wait_for("b", False, after=up)
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b")

    b2 = make_node("b", port=port)
    mesh(a, b2)
    a.states.wait_for("b", True, after=down)
    assert a.transport.send("b", KIND_APP, b"two")
    assert b2.transport.send("a", KIND_APP, b"back")

    assert b2.inbox.wait_for_count(1) == [("a", KIND_APP, b"two")]
    assert a.inbox.wait_for_count(1) == [("b", KIND_APP, b"back")]


def test_an_on_frame_error_closes_only_that_connection(
    make_node: MakeNode, logs: LogWatcher
) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)
    b.inbox.fail_on_kind = 99
    up = a.states.wait_for("b", True)

    assert a.transport.send("b", 99, b"poison")
    logs.wait_for("event=inbound_failed", "node=b", "RuntimeError")
    down = a.states.wait_for("b", False, after=up)
    a.states.wait_for("b", True, after=down)

    assert a.transport.send("b", KIND_APP, b"after")
    assert b.inbox.wait_for_count(1) == [("a", KIND_APP, b"after")]


def test_set_peers_removing_a_peer_stops_its_sender(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)
    a.states.wait_for("b", True)
    (sender,) = threads_named("raftkv-send-a-b")

    a.transport.set_peers({})

    sender.join(WAIT_S)
    assert not sender.is_alive()
    assert a.transport.send("b", KIND_APP, b"x") is False
    assert a.transport.reachable() == {}


def test_close_is_prompt_and_idempotent(make_node: MakeNode) -> None:
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    mesh(a, b, c)
    a.transport.set_peers({"b": b.address, "c": c.address, "gone": f"127.0.0.1:{free_port()}"})
    a.states.wait_for("b", True)
    a.states.wait_for("c", True)
    a.states.wait_for("gone", False)
    b.states.wait_for("a", True)

    started = time.monotonic()
    a.transport.close()
    a.transport.close()
    elapsed_s = time.monotonic() - started

    assert elapsed_s < 1.0
    assert threads_named("raftkv-send-a-") == []
    assert threads_named("raftkv-accept-a") == []
    assert threads_named("raftkv-recv-a-") == []
    assert a.transport.send("b", KIND_APP, b"x") is False


# -- probe ----------------------------------------------------------------------------------------


def test_probe_returns_the_listener_identity_even_to_an_unknown_node(make_node: MakeNode) -> None:
    b = make_node("b")

    info = probe(b.address, cluster_id="", token=TOKEN, node_id="joiner", timeout_s=WAIT_S)

    assert info == PeerInfo(node_id="b", http_address="b.test:8080", cluster_id=CLUSTER)


def test_probe_with_a_wrong_token_fails_with_the_reason(make_node: MakeNode) -> None:
    b = make_node("b")

    with pytest.raises(HandshakeRejected, match="wrong_token") as caught:
        probe(b.address, cluster_id=CLUSTER, token="wrong", node_id="joiner", timeout_s=WAIT_S)

    assert caught.value.reason == "wrong_token"


def test_probe_of_a_closed_port_fails_with_transport_error() -> None:
    with pytest.raises(TransportError, match="cannot connect"):
        probe(f"127.0.0.1:{free_port()}", cluster_id="", token=TOKEN, node_id="x", timeout_s=WAIT_S)
