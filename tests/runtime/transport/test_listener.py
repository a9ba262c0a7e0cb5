"""The peer port (raftkv.runtime.transport.listener): who is let in, and what closes a
connection. Nothing a remote sends harms the node: each problem closes that one connection,
refusals are logged at WARNING (rate-limited per remote host and reason), and a crowd of
unauthenticated connections cannot keep a real peer out."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
import types
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from raftkv.codec import FrameKind
from raftkv.framing import FrameDecoder
from raftkv.localcluster import wait_until
from raftkv.runtime.eventloop import EventLoop
from raftkv.runtime.transport.handshake import MAX_HANDSHAKE_FRAME_BYTES
from raftkv.runtime.transport.listener import (
    ACCEPT_ERROR_PAUSE_S,
    HANDSHAKE_TIMEOUT_S,
    MAX_UNAUTHENTICATED,
    MAX_UNAUTHENTICATED_PER_HOST,
    Listener,
)
from raftkv.runtime.transport.probe import ProbeFailed, probe
from tests.runtime.transport.harness import (
    CLUSTER,
    RAFT,
    WAIT_S,
    LogWatcher,
    MakeNode,
    Node,
    closed_port,
    frame,
    handshake_messages,
    mesh,
    raw_connection,
    raw_handshaken_connection,
    read_frame,
    read_until_closed,
)

# -- who is let in ---------------------------------------------------------------------------


def test_wrong_token_is_refused_and_logged(make_node: MakeNode, logs: LogWatcher) -> None:
    a, b = make_node("a", token="not-the-token"), make_node("b")
    mesh(a, b)
    a.send("b", b"must not arrive")

    record = logs.wait_for("event=peer_rejected", "node=b", "reason=wrong_token")
    assert record.levelno == logging.WARNING
    assert "remote=127.0.0.1:" in record.getMessage()
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "wrong_token")
    assert b.inbox.snapshot() == []
    assert a.reachable() == {"b": False}


def test_wrong_cluster_is_refused(make_node: MakeNode, logs: LogWatcher) -> None:
    a, b = make_node("a", cluster_id="other-cluster"), make_node("b")
    mesh(a, b)
    a.send("b", b"must not arrive")

    logs.wait_for("event=peer_rejected", "node=b", "reason=wrong_cluster")
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "wrong_cluster")
    assert b.inbox.snapshot() == []


def test_unknown_node_is_refused(make_node: MakeNode, logs: LogWatcher) -> None:
    a, b = make_node("a"), make_node("b")
    a.set_peers({"b": b.address})  # b does not know a
    a.send("b", b"must not arrive")

    logs.wait_for("event=peer_rejected", "node=b", "reason=unknown_node", "node=a")
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "unknown_node")
    assert b.inbox.snapshot() == []


def test_refusals_from_one_address_are_logged_once_per_interval(
        make_node: MakeNode, logs: LogWatcher) -> None:
    b = make_node("b")
    for _ in range(5):
        with pytest.raises(ProbeFailed, match="wrong_token"):
            probe(b.address, cluster_id=CLUSTER, token="wrong", node_id="x", timeout_s=WAIT_S)

    assert len(logs.lines("event=peer_rejected", "reason=wrong_token")) == 1


# -- what closes a connection ----------------------------------------------------------------


def test_garbage_bytes_close_that_connection_and_others_keep_working(
        make_node: MakeNode, logs: LogWatcher) -> None:
    a, b = make_node("a"), make_node("b")
    with raw_connection(b) as raw:
        raw.sendall(frame(FrameKind.HANDSHAKE, b"\xc1\xc1\xc1 not msgpack \xc1"))
        replies = handshake_messages(read_until_closed(raw))

    assert [m["type"] for m in replies] == ["hello", "reject"]
    assert replies[1]["reason"] == "malformed"
    logs.wait_for("event=peer_rejected", "node=b", "reason=malformed")

    mesh(a, b)
    assert a.send("b", b"still serving")
    assert b.inbox.wait_for_count(1) == [("a", RAFT, b"still serving")]


def test_oversized_length_prefix_closes_the_connection(
        make_node: MakeNode, logs: LogWatcher) -> None:
    b = make_node("b")
    with raw_connection(b) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")  # "GET " is a 1.2 GB length
        read_until_closed(raw)

    logs.wait_for("event=peer_rejected", "node=b", "reason=bad_handshake", "frame_too_large")


def test_a_frame_other_than_the_handshake_first_is_refused(
        make_node: MakeNode, logs: LogWatcher) -> None:
    b = make_node("b")
    with raw_connection(b) as raw:
        raw.sendall(frame(RAFT, b"no handshake"))
        replies = handshake_messages(read_until_closed(raw))

    assert [m["type"] for m in replies] == ["hello", "reject"]
    logs.wait_for("event=peer_rejected", "node=b", "reason=bad_handshake", "kind 1")


def test_zero_length_frame_closes_the_connection(make_node: MakeNode, logs: LogWatcher) -> None:
    b = make_node("b")
    with raw_connection(b) as raw:
        raw.sendall(b"\x00\x00\x00\x00")
        read_until_closed(raw)

    logs.wait_for("event=peer_rejected", "node=b", "reason=bad_handshake", "zero-length")


def test_a_handshake_that_never_completes_is_closed_at_the_deadline(
        make_node: MakeNode, logs: LogWatcher) -> None:
    assert HANDSHAKE_TIMEOUT_S == 2.0
    b = make_node("b")
    # Before connecting: the listener's deadline starts at its accept, which may come before
    # create_connection returns here (never before it was called).
    started = time.monotonic()
    with raw_connection(b) as raw:
        replies = handshake_messages(read_until_closed(raw, timeout_s=HANDSHAKE_TIMEOUT_S + 3))
        elapsed_s = time.monotonic() - started

    assert HANDSHAKE_TIMEOUT_S - 0.1 <= elapsed_s < HANDSHAKE_TIMEOUT_S + 1.0
    assert [m["type"] for m in replies] == ["hello"]
    logs.wait_for("event=peer_rejected", "node=b", "reason=bad_handshake", "timed out")
    assert b.call(lambda t: t.unauthenticated_connections) == 0


def handshaken_peer(b: Node) -> socket.socket:
    """A raw connection into b, handshaken as its peer a."""
    return raw_handshaken_connection(b, as_node="a")


def test_oversized_frame_from_a_handshaken_peer_closes_only_its_connection(
        make_node: MakeNode, logs: LogWatcher) -> None:
    b, c = make_node("b", max_frame_bytes=1024), make_node("c")
    b.set_peers({"a": f"127.0.0.1:{closed_port()}", "c": c.address})
    c.set_peers({"b": b.address})
    with handshaken_peer(b) as raw:
        raw.sendall(frame(RAFT, b"fine"))
        b.inbox.wait_for_count(1)
        raw.sendall(struct.pack(">IB", 1025, RAFT) + bytes(1024))
        read_until_closed(raw)

    logs.wait_for("event=inbound_closed", "node=b", "peer=a", "frame_too_large")
    assert c.send("b", b"unaffected")
    b.inbox.wait_for_count(2)
    assert b.inbox.snapshot() == [("a", RAFT, b"fine"), ("c", RAFT, b"unaffected")]


def test_zero_length_frame_from_a_handshaken_peer_closes_its_connection(
        make_node: MakeNode, logs: LogWatcher) -> None:
    b = make_node("b")
    b.set_peers({"a": f"127.0.0.1:{closed_port()}"})
    with handshaken_peer(b) as raw:
        raw.sendall(b"\x00\x00\x00\x00")
        read_until_closed(raw)
    logs.wait_for("event=inbound_closed", "node=b", "peer=a", "malformed")


def test_a_stream_ending_mid_frame_delivers_only_the_whole_frames(
        make_node: MakeNode, logs: LogWatcher) -> None:
    b = make_node("b")
    b.set_peers({"a": f"127.0.0.1:{closed_port()}"})
    with handshaken_peer(b) as raw:
        raw.sendall(frame(RAFT, b"whole") + frame(RAFT, b"cut short")[:7])

    logs.wait_for("event=inbound_closed", "node=b", "peer=a")
    assert b.inbox.snapshot() == [("a", RAFT, b"whole")]


@pytest.mark.parametrize("kind", [FrameKind.HANDSHAKE, FrameKind.WORKER_HELLO,
                                  FrameKind.WORKER_REQUESTS, FrameKind.WORKER_REPLIES, 99],
                         ids=lambda k: getattr(k, "name", str(k)))
def test_a_frame_of_a_kind_peers_may_not_send_closes_that_connection(
        make_node: MakeNode, logs: LogWatcher, kind: int) -> None:
    b = make_node("b")
    b.set_peers({"a": f"127.0.0.1:{closed_port()}"})
    with handshaken_peer(b) as raw:
        raw.sendall(frame(RAFT, b"allowed"))
        b.inbox.wait_for_count(1)
        raw.sendall(frame(kind, b"not for peers") + frame(RAFT, b"after it"))
        read_until_closed(raw)

    logs.wait_for("event=peer_rejected", "node=b", "reason=bad_frame", f"kind {int(kind)}")
    assert b.inbox.snapshot() == [("a", RAFT, b"allowed")]


def test_a_probe_connection_is_answered_and_closed(make_node: MakeNode) -> None:
    b = make_node("b")
    with raw_handshaken_connection(b, as_node="prober", probe=True) as raw:
        assert read_until_closed(raw) == b""
    assert b.call(lambda t: t.unauthenticated_connections) == 0


# -- bounded unauthenticated connections -----------------------------------------------------


@pytest.fixture
def idle() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def open_idle(b: Node, stack: ExitStack, source_host: str) -> socket.socket:
    """A connection that reads the hello and then says nothing (it holds its slot)."""
    sock = stack.enter_context(raw_connection(b, source_host))
    kind, _ = read_frame(sock, FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES))
    assert kind == FrameKind.HANDSHAKE
    return sock


def test_one_host_holds_at_most_its_share_of_unauthenticated_connections(
        make_node: MakeNode, logs: LogWatcher, idle: ExitStack) -> None:
    b = make_node("b")
    for _ in range(MAX_UNAUTHENTICATED_PER_HOST):
        open_idle(b, idle, "127.0.0.2")
    assert b.call(lambda t: t.unauthenticated_connections) == MAX_UNAUTHENTICATED_PER_HOST

    excess = idle.enter_context(raw_connection(b, "127.0.0.2"))
    assert read_until_closed(excess) == b"", "closed at once, without a hello"
    logs.wait_for("event=peer_rejected", "node=b", "remote=127.0.0.2:",
                  "reason=too_many_connections")
    open_idle(b, idle, "127.0.0.3")  # another host still gets in


def test_the_total_of_unauthenticated_connections_is_bounded(
        make_node: MakeNode, logs: LogWatcher, idle: ExitStack) -> None:
    b = make_node("b")
    hosts = [f"127.0.0.{10 + i}" for i in range(MAX_UNAUTHENTICATED
                                                  // MAX_UNAUTHENTICATED_PER_HOST)]
    for host in hosts:
        for _ in range(MAX_UNAUTHENTICATED_PER_HOST):
            open_idle(b, idle, host)
    assert b.call(lambda t: t.unauthenticated_connections) == MAX_UNAUTHENTICATED

    excess = idle.enter_context(raw_connection(b, "127.0.0.99"))
    assert read_until_closed(excess) == b""
    logs.wait_for("event=peer_rejected", "remote=127.0.0.99:", "reason=too_many_connections")


def test_a_real_peer_connects_while_idle_connections_hold_their_hosts_limit(
        make_node: MakeNode, idle: ExitStack) -> None:
    b = make_node("b")
    for _ in range(MAX_UNAUTHENTICATED_PER_HOST):
        open_idle(b, idle, "127.0.0.2")
    a = make_node("a", source_host="127.0.0.5")
    mesh(a, b)

    assert a.send("b", b"let in")
    assert b.inbox.wait_for_count(1) == [("a", RAFT, b"let in")]


def test_slots_of_connections_that_handshook_or_left_are_given_back(
        make_node: MakeNode, idle: ExitStack) -> None:
    b = make_node("b")
    b.set_peers({"a": f"127.0.0.1:{closed_port()}"})
    for _ in range(MAX_UNAUTHENTICATED_PER_HOST):
        idle.enter_context(handshaken_peer(b))  # each replaces the one before; none pending
    left = open_idle(b, idle, "127.0.0.1")
    left.close()
    wait_until(lambda: b.call(lambda t: t.unauthenticated_connections) == 0, WAIT_S,
               "the slot of the connection that left")
    for _ in range(MAX_UNAUTHENTICATED_PER_HOST):
        open_idle(b, idle, "127.0.0.1")
    assert b.call(lambda t: t.unauthenticated_connections) == MAX_UNAUTHENTICATED_PER_HOST


# -- accept errors ---------------------------------------------------------------------------


class _FailingAccepts:
    """A listening socket whose accept() fails as when the process is out of file
    descriptors, while a connection waits in its backlog (so it stays readable)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.accepts = 0

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def fileno(self) -> int:
        return self._sock.fileno()

    def getsockname(self) -> object:
        return self._sock.getsockname()

    def close(self) -> None:
        self._sock.close()

    def accept(self) -> tuple[socket.socket, object]:
        self.accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")


def test_an_accept_error_pauses_polling_the_port_instead_of_spinning(
        logs: LogWatcher) -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    failing = _FailingAccepts(listening)
    loop = EventLoop()
    owner = types.SimpleNamespace(node_id="a")
    listener = Listener(owner, loop, failing)  # type: ignore[arg-type]
    with socket.create_connection(listening.getsockname(), timeout=WAIT_S):
        window_s = 5 * ACCEPT_ERROR_PAUSE_S
        loop.call_later(window_s, loop.stop)
        started, cpu_started = time.monotonic(), time.thread_time()
        loop.run()
        elapsed, cpu = time.monotonic() - started, time.thread_time() - cpu_started
    listener.close()
    loop.close()
    # One try per pause, and the loop asleep in between: polling the port (readable all
    # along) during a pause would keep the loop turning at full speed.
    assert 2 <= failing.accepts <= elapsed / ACCEPT_ERROR_PAUSE_S + 2, failing.accepts
    assert cpu < 0.2 * window_s, f"the loop spun: {cpu:.3f} s of CPU in {elapsed:.3f} s"
    logs.wait_for("event=accept_failed", "node=a", "Too many open files")
