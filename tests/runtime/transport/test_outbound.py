"""One peer's outbound link (raftkv.runtime.transport.outbound) against fake listeners that
speak the handshake as they like: the link checks who answers, never reads after the
handshake, redials with back-off, and reports a peer that never came up only once the boot is
surely over."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest

from raftkv.codec import FrameKind
from raftkv.framing import FrameDecoder
from raftkv.localcluster import wait_until
from raftkv.runtime import transport as transport_package
from raftkv.runtime.transport import outbound
from raftkv.runtime.transport.handshake import (
    MAX_HANDSHAKE_FRAME_BYTES,
    PROTOCOL_VERSION,
    ListenerHandshake,
)
from raftkv.runtime.transport.outbound import parse_address
from tests.runtime.transport.harness import (
    CLUSTER,
    RAFT,
    TOKEN,
    WAIT_S,
    LogWatcher,
    MakeNode,
    closed_port,
    frame,
    read_frame,
)
from tests.support.peers import FakeListener, Script


@pytest.fixture
def fake_listener() -> Iterator[Callable[[Script], FakeListener]]:
    made: list[FakeListener] = []

    def make(script: Script) -> FakeListener:
        made.append(FakeListener(script))
        return made[-1]

    yield make
    for fl in made:
        fl.close()


def welcome_as(node_id: str, *, then: bytes = b"",
               after_up: Callable[[socket.socket], None] | None = None) -> Script:
    """A listener that handshakes as `node_id`, then holds the connection until the test
    ends; `then`: bytes sent in the same write as the welcome; `after_up(conn)`: what it does
    once the welcome is sent."""

    def script(conn: socket.socket, test_over: threading.Event) -> None:
        handshake = ListenerHandshake(token=TOKEN.encode(), node_id=node_id,
                                      cluster_id=CLUSTER, http_address=f"{node_id}.test:1")
        conn.sendall(frame(FrameKind.HANDSHAKE, handshake.hello()))
        kind, auth = read_frame(conn, FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES))
        assert kind == FrameKind.HANDSHAKE
        handshake.check_auth(auth)
        conn.sendall(frame(FrameKind.HANDSHAKE, handshake.welcome()) + then)
        if after_up is not None:
            after_up(conn)
        test_over.wait(WAIT_S)

    return script


def test_a_listener_writing_after_the_handshake_drops_the_link(
        make_node: MakeNode, logs: LogWatcher,
        fake_listener: Callable[[Script], FakeListener]) -> None:
    a = make_node("a")
    up = threading.Event()

    def write_once_up(conn: socket.socket) -> None:
        assert up.wait(WAIT_S)
        conn.sendall(frame(RAFT, b"listeners never write"))

    listener = fake_listener(welcome_as("b", after_up=write_once_up))
    a.set_peers({"b": listener.address})
    first_up = a.states.wait_for("b", True)
    up.set()

    a.states.wait_for("b", False, after=first_up)
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "send-only",
                  level=logging.WARNING)


def test_a_listener_writing_with_its_welcome_drops_the_link(
        make_node: MakeNode, logs: LogWatcher,
        fake_listener: Callable[[Script], FakeListener]) -> None:
    a = make_node("a")
    listener = fake_listener(welcome_as("b", then=frame(RAFT, b"too early")))
    a.set_peers({"b": listener.address})

    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "wrote after the handshake")
    wait_until(lambda: listener.accepted >= 2, WAIT_S, "a redial")


def test_a_listener_that_is_another_node_is_not_taken_for_the_peer(
        make_node: MakeNode, logs: LogWatcher,
        fake_listener: Callable[[Script], FakeListener]) -> None:
    a = make_node("a")
    listener = fake_listener(welcome_as("c"))
    a.set_peers({"b": listener.address})

    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "is node 'c', not b")
    assert a.send("b", b"queued, not sent to c")
    assert a.reachable() == {"b": False}


def test_a_listener_that_cannot_prove_it_holds_the_token_is_dropped(
        make_node: MakeNode, logs: LogWatcher,
        fake_listener: Callable[[Script], FakeListener]) -> None:
    """An impostor listener: its hello looks right, but its welcome is MACed with another
    token (it does not know ours). The dialer never sends it a frame."""
    got: list[bytes] = []

    def impostor(conn: socket.socket, _test_over: threading.Event) -> None:
        handshake = ListenerHandshake(token=b"a guess", node_id="b", cluster_id=CLUSTER,
                                      http_address="b.test:1")
        conn.sendall(frame(FrameKind.HANDSHAKE, handshake.hello()))
        read_frame(conn, FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES))  # the auth: unverifiable
        conn.sendall(frame(FrameKind.HANDSHAKE, msgpack.packb(
            {"v": PROTOCOL_VERSION, "type": "welcome", "mac": os.urandom(32)})))
        try:
            while data := conn.recv(65536):
                got.append(data)
        except OSError:
            pass

    a = make_node("a")
    listener = fake_listener(impostor)
    a.set_peers({"b": listener.address})
    a.send("b", b"secret")

    logs.wait_for("event=peer_unreachable", "node=a", "peer=b",
                  "could not prove it holds the cluster token")
    assert a.reachable() == {"b": False}
    wait_until(lambda: listener.accepted >= 2, WAIT_S, "a redial")
    assert b"".join(got) == b"", "not one frame went to the impostor"


def test_a_handshake_that_never_completes_is_dropped_at_the_dialers_deadline(
        make_node: MakeNode, logs: LogWatcher, monkeypatch: pytest.MonkeyPatch,
        fake_listener: Callable[[Script], FakeListener]) -> None:
    monkeypatch.setattr(outbound, "HANDSHAKE_TIMEOUT_S", 0.3)

    def never_answer(_conn: socket.socket, test_over: threading.Event) -> None:
        test_over.wait(WAIT_S)

    listener = fake_listener(never_answer)
    a = make_node("a")
    a.set_peers({"b": listener.address})

    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "handshake timed out")


def test_a_peer_that_never_came_up_is_a_warning_only_after_the_quiet_period(
        make_node: MakeNode, logs: LogWatcher, monkeypatch: pytest.MonkeyPatch,
        fake_listener: Callable[[Script], FakeListener]) -> None:
    """Peers still starting are not news: the first failures are DEBUG; one WARNING comes
    once QUIET_UNREACHABLE_S has passed since the peer was added, and none after it."""
    # The first failure (a connect, an accept and a hang-up away) must come within quiet_s
    # of the peer being added, or it is rightly late: a WARNING. Wide enough for a loaded
    # machine; every check below is relative to it.
    quiet_s = 2.0
    monkeypatch.setattr(outbound, "QUIET_UNREACHABLE_S", quiet_s)
    monkeypatch.setattr(transport_package, "QUIET_UNREACHABLE_S", quiet_s)
    not_up_yet = fake_listener(lambda _conn, _over: None)  # accepts, then hangs up
    a = make_node("a")
    added = time.monotonic()
    a.set_peers({"b": not_up_yet.address})

    first = logs.wait_for("event=peer_unreachable", "node=a", "peer=b")
    assert first.levelno == logging.DEBUG
    warning = logs.wait_for("event=peer_unreachable", "node=a", "peer=b",
                            level=logging.WARNING, timeout_s=quiet_s + WAIT_S)

    assert warning.monotonic >= added + quiet_s  # type: ignore[attr-defined]
    assert all(r.levelno == logging.DEBUG for r in logs.lines("event=peer_unreachable")
               if r.monotonic < added + quiet_s)  # type: ignore[attr-defined]
    dials = not_up_yet.accepted
    wait_until(lambda: not_up_yet.accepted >= dials + 2, WAIT_S, "two more redials")
    assert len(logs.lines("event=peer_unreachable", level=logging.WARNING)) == 1


def test_a_peer_that_was_never_up_coming_up_is_reported(
        make_node: MakeNode, logs: LogWatcher) -> None:
    a = make_node("a")
    port = closed_port()
    a.set_peers({"b": f"127.0.0.1:{port}"})
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b")
    b = make_node("b", port=port)
    b.set_peers({"a": a.address})
    logs.wait_for("event=peer_reachable", "node=a", "peer=b", level=logging.INFO)
    assert a.reachable() == {"b": True}


RESOLVER_BACKSTOP_S = 60.0
"""How long a GatedResolver holds an answer the test never releases (a backstop: the fixture
releases it at teardown; above the loop calls' own timeout, so that a loop stuck in the
resolver fails the test's call first)."""


class GatedResolver:
    """socket.getaddrinfo, with names under `.test` answered only once the test sets `release`
    (a resolver that takes as long as the test wants, and no longer). `asked` is set when a
    name is looked up, `asked_from` names the threads that looked one up."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses
        self.real = socket.getaddrinfo
        self.asked = threading.Event()
        self.asked_from: list[str] = []
        self.release = threading.Event()

    def __call__(self, host: str, port: object, *args: object, **kwargs: object) -> Any:
        numeric_only = int(kwargs.get("flags", 0)) & socket.AI_NUMERICHOST  # type: ignore[call-overload]
        if isinstance(host, str) and host.endswith(".test") and not numeric_only:
            self.asked_from.append(threading.current_thread().name)
            self.asked.set()
            if not self.release.wait(RESOLVER_BACKSTOP_S):
                raise socket.gaierror(socket.EAI_AGAIN, "the test never released the answer")
            if host not in self.addresses:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            host = self.addresses[host]
        return self.real(host, port, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def gated_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedResolver]:
    """socket.getaddrinfo replaced by a GatedResolver (without names of its own: the test
    adds them); released at teardown, so that no resolution outlives the test."""
    resolver = GatedResolver({})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    yield resolver
    resolver.release.set()


def test_resolving_a_peer_name_never_blocks_the_loop(
        make_node: MakeNode, logs: LogWatcher, gated_resolver: GatedResolver) -> None:
    """Regression: the link resolved a peer's host name with a blocking getaddrinfo on the
    event loop at every (re)dial; a resolver that takes seconds (an unreachable DNS server:
    5 s per try) stalled the whole Raft process, heartbeats included. Peers are host names
    in the compose deployment (n2:5001).

    The resolver here answers only when the test releases it: while it holds the answer, the
    loop must go on running calls (a loop stuck in the resolver would not, and the call
    would time out); no bound on how long anything takes."""
    a = make_node("a")
    a.lt.loop.call_soon_threadsafe(lambda: a.transport.set_peers({"b": "nowhere.test:5001"}))
    assert gated_resolver.asked.wait(WAIT_S)

    # Calls on the loop return while the resolver holds its answer (a loop blocked in the
    # resolver would leave them to time out).
    assert a.send("b", b"queued meanwhile")
    assert a.reachable() == {"b": False}
    assert not gated_resolver.release.is_set()  # the answer was held all along
    assert set(gated_resolver.asked_from) == {"resolve-b"}, "not resolved off the loop"

    gated_resolver.release.set()
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", "nowhere.test")


def test_a_peer_given_by_host_name_is_reached(
        make_node: MakeNode, gated_resolver: GatedResolver) -> None:
    """A frame sent while the peer's name resolves waits for it, then goes out."""
    gated_resolver.addresses["b.test"] = "127.0.0.1"
    a, b = make_node("a"), make_node("b")
    a.set_peers({"b": f"b.test:{b.port}"})
    b.set_peers({"a": a.address})
    assert gated_resolver.asked.wait(WAIT_S)

    assert a.send("b", b"by name")
    gated_resolver.release.set()
    assert b.inbox.wait_for_count(1) == [("a", RAFT, b"by name")]


def test_a_link_removed_while_its_peers_name_resolves_never_connects(
        make_node: MakeNode, logs: LogWatcher, monkeypatch: pytest.MonkeyPatch,
        gated_resolver: GatedResolver) -> None:
    """The answer for a link that was removed meanwhile is dropped: no socket is opened. The
    resolver holds its answer until the link is gone; then the test waits for the loop to
    have handled that answer (`_resolved` returned) and checks that the link never began to
    connect (`_connect`, where a dial opens its socket, synchronously from `_resolved`)."""
    connects: list[tuple[str, str]] = []
    """(node, peer) of every link that began to connect."""
    asked: list[str] = []
    """Peers whose links asked the resolver (on the loop)."""
    answered: list[str] = []
    """Peers whose links handled a resolver's answer (appended once `_resolved` returned)."""
    real_connect = outbound.OutboundLink._connect
    real_resolve = outbound.OutboundLink._resolve
    real_resolved = outbound.OutboundLink._resolved

    def connect(link: outbound.OutboundLink, *args: Any) -> None:
        connects.append((link._owner.node_id, link.peer_id))
        real_connect(link, *args)

    def resolve(link: outbound.OutboundLink, *args: Any) -> None:
        asked.append(link.peer_id)
        real_resolve(link, *args)

    def resolved(link: outbound.OutboundLink, *args: Any) -> None:
        real_resolved(link, *args)
        answered.append(link.peer_id)

    monkeypatch.setattr(outbound.OutboundLink, "_connect", connect)
    monkeypatch.setattr(outbound.OutboundLink, "_resolve", resolve)
    monkeypatch.setattr(outbound.OutboundLink, "_resolved", resolved)
    gated_resolver.addresses["b.test"] = "127.0.0.1"
    a, b = make_node("a"), make_node("b")
    b.set_peers({"a": a.address})
    assert ("b", "a") in connects  # the spy sees a dial (b dials a by its IP address)
    a.set_peers({"b": f"b.test:{b.port}"})
    assert gated_resolver.asked.wait(WAIT_S)
    a.set_peers({})
    # Final now: a removed link asks no more. (More than one if the test thread came late:
    # the resolution's own deadline ended the first one, and the link asked again.)
    resolutions = len(asked)
    assert resolutions >= 1
    gated_resolver.release.set()

    wait_until(lambda: len(answered) >= resolutions, WAIT_S,
               "the loop to handle the resolver's late answers")
    assert answered == ["b"] * resolutions
    assert ("a", "b") not in connects, "the removed link connected"
    assert a.reachable() == {}
    assert logs.lines("event=inbound_connected", "node=b") == []


@pytest.mark.parametrize("address", ["h:\u00b2", "h:\u09ed", "h:0", "h:65536",
                                     "h:" + "9" * 5000, "h:", ":7001", "nowhere"])
def test_a_peer_address_must_be_host_and_an_ascii_port(address: str) -> None:
    """ASCII digits only: int() took '\u09ed' (a Bengali 7) as port 7 and refused the
    superscript and 5,000 digits with a message of its own."""
    with pytest.raises(ValueError, match="invalid address"):
        parse_address(address)


def test_a_peer_address_parses_to_host_and_port() -> None:
    assert parse_address("[::1]:7001") == ("::1", 7001)
    assert parse_address("n1:5001") == ("n1", 5001)


class TooLargeOwner:
    """The little of a LinkOwner that `send` uses: records the frames refused as too
    large."""

    max_frame_bytes = 64
    queue_limit_bytes = 1 << 20

    def __init__(self) -> None:
        self.too_large: list[tuple[str, int, int]] = []

    def frame_too_large(self, link: outbound.OutboundLink, kind: int,
                        payload_bytes: int) -> None:
        self.too_large.append((link.peer_id, kind, payload_bytes))


def test_a_stopped_link_refuses_a_frame_over_the_bound_without_reporting_it() -> None:
    """A stopped link takes nothing: a frame over the bound is no news there (it would be
    logged as an ERROR, for a link that is gone)."""
    owner = TooLargeOwner()
    link = outbound.OutboundLink(cast(Any, owner), cast(Any, None), "b", "127.0.0.1:1")
    assert link.send(RAFT, bytes(64)) is False  # + the kind byte: one over the bound
    assert owner.too_large == [("b", RAFT, 64)]
    assert link.send(RAFT, bytes(63))  # queued while the link is down

    link.stop()

    assert link.send(RAFT, bytes(64)) is False
    assert link.send(RAFT, bytes(63)) is False
    assert owner.too_large == [("b", RAFT, 64)]  # not reported again
    assert link.dropped == 1
