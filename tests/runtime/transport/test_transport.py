"""PeerTransport (raftkv.runtime.transport): frames between nodes on loopback, real sockets on
one event loop; delivery, peers coming and going, closing. Refusals by the listener are in
test_listener.py, a link's own behaviour in test_outbound.py."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from raftkv.localcluster import wait_until
from raftkv.runtime.transport import PeerTransport
from tests.runtime.transport.harness import (
    CLUSTER,
    RAFT,
    WAIT_S,
    LogWatcher,
    MakeNode,
    closed_port,
    mesh,
    raw_handshaken_connection,
    read_until_closed,
)

# -- delivery --------------------------------------------------------------------------------


def test_two_nodes_exchange_frames_both_ways_in_order(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)

    assert all(a.send_many("b", [b"a%d" % i for i in range(50)]))
    assert all(b.send_many("a", [b"b%d" % i for i in range(50)], kind=RAFT + 1))

    assert b.inbox.wait_for_count(50) == [("a", RAFT, b"a%d" % i) for i in range(50)]
    assert a.inbox.wait_for_count(50) == [("b", RAFT + 1, b"b%d" % i) for i in range(50)]


def test_three_nodes_exchange_frames_on_every_link_in_order(make_node: MakeNode) -> None:
    nodes = [make_node("n1"), make_node("n2"), make_node("n3")]
    mesh(*nodes)

    for i in range(100):
        for sender in nodes:
            for receiver in nodes:
                if receiver is not sender:
                    payload = f"{sender.node_id}->{receiver.node_id}#{i}".encode()
                    assert sender.send(receiver.node_id, payload)

    for receiver in nodes:
        receiver.inbox.wait_for_count(200)
        for sender in nodes:
            if sender is not receiver:
                expected = [f"{sender.node_id}->{receiver.node_id}#{i}".encode()
                            for i in range(100)]
                assert receiver.inbox.payloads_from(sender.node_id) == expected


def test_thousands_of_small_frames_arrive_intact_and_in_order(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)
    payloads = [os.urandom(i % 97) + i.to_bytes(4, "big") for i in range(5000)]

    assert all(a.send_many("b", payloads))

    frames = b.inbox.wait_for_count(len(payloads), timeout_s=10)
    assert [p for _, _, p in frames] == payloads
    assert a.call(lambda t: t.dropped_frames()) == {"b": 0}


def test_frame_at_the_size_limit_arrives_intact(make_node: MakeNode) -> None:
    limit = 4 << 20
    a, b = make_node("a", max_frame_bytes=limit), make_node("b", max_frame_bytes=limit)
    mesh(a, b)
    big = os.urandom(limit - 1)  # + the kind byte = exactly max_frame_bytes

    assert all(a.send_many("b", [b"before", big, b"after"]))

    frames = b.inbox.wait_for_count(3)
    assert [p for _, _, p in frames] == [b"before", big, b"after"]


def test_a_frame_over_the_size_limit_is_not_sent_and_the_link_stays_up(
        make_node: MakeNode, logs: LogWatcher) -> None:
    """The peer would close the link on it, and whatever made the frame (the Raft core
    resending an append) would send it again after every redial: the sender refuses it."""
    limit = 4096
    a, b = make_node("a", max_frame_bytes=limit), make_node("b", max_frame_bytes=limit)
    mesh(a, b)
    assert a.send("b", b"before")
    b.inbox.wait_for_count(1)
    link_changes = list(a.states.changes)  # up (after any refusal while b was not meshed)

    assert a.send("b", bytes(limit)) is False  # + the kind byte: one byte over the limit
    assert a.send("b", b"after")

    assert b.inbox.wait_for_count(2) == [("a", RAFT, b"before"), ("a", RAFT, b"after")]
    assert a.call(lambda t: t.dropped_frames()) == {"b": 1}
    record = logs.wait_for("event=peer_frame_too_large", "node=a", "peer=b",
                           f"bytes={limit + 1}", f"max={limit}", level=logging.ERROR)
    assert record.name == "raftkv.runtime.transport"
    assert a.reachable() == {"b": True}
    assert a.states.changes == link_changes
    assert not logs.lines("frame_too_large", "node=b")  # b never saw it


def test_send_to_unknown_peer_returns_false(make_node: MakeNode) -> None:
    a = make_node("a")
    a.set_peers({"b": f"127.0.0.1:{closed_port()}"})

    assert a.send("zz", b"x") is False


def test_full_queue_drops_new_frames_without_blocking(make_node: MakeNode) -> None:
    a = make_node("a", queue_limit_bytes=10)
    a.set_peers({"b": f"127.0.0.1:{closed_port()}"})  # nobody listens there

    started = time.monotonic()
    results = a.send_many("b", [b"x"] * 1000)
    elapsed_s = time.monotonic() - started

    assert results[:10] == [True] * 10
    assert not any(results[10:])
    assert a.call(lambda t: t.dropped_frames()) == {"b": 990}
    assert elapsed_s < 1.0


def test_frames_queued_while_the_peer_is_not_up_yet_are_sent_once_it_is(
        make_node: MakeNode) -> None:
    a = make_node("a")
    port = closed_port()
    a.set_peers({"b": f"127.0.0.1:{port}"})
    assert all(a.send_many("b", [b"early 1", b"early 2"]))

    b = make_node("b", port=port)
    b.set_peers({"a": a.address})

    assert b.inbox.wait_for_count(2) == [("a", RAFT, b"early 1"), ("a", RAFT, b"early 2")]


def test_peer_http_address_is_learned_from_the_handshake(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)

    a.states.wait_for("b", True)
    b.states.wait_for("a", True)

    assert a.call(lambda t: t.peer_http_address("b")) == "b.test:8080"
    wait_until(lambda: b.call(lambda t: t.peer_http_address("a")), WAIT_S,
               "b to learn a's address from a's handshake")
    assert b.call(lambda t: t.peer_http_address("a")) == "a.test:8080"
    assert a.call(lambda t: t.peer_http_address("nobody")) is None
    assert a.reachable() == {"b": True}


def test_a_node_that_learns_the_cluster_id_late_is_then_accepted(make_node: MakeNode) -> None:
    a, b = make_node("a", cluster_id="not-yet-right"), make_node("b")
    mesh(a, b)
    a.states.wait_for("b", False)

    a.call(lambda t: t.set_cluster_id(CLUSTER))
    a.states.wait_for("b", True)
    assert a.send("b", b"hello")
    assert b.inbox.wait_for_count(1) == [("a", RAFT, b"hello")]


def test_a_joining_node_that_knows_no_cluster_id_yet_is_accepted(make_node: MakeNode) -> None:
    joiner, b = make_node("joiner", cluster_id=""), make_node("b")
    mesh(joiner, b)

    assert joiner.send("b", b"hello")
    assert b.inbox.wait_for_count(1) == [("joiner", RAFT, b"hello")]


# -- peers coming and going ------------------------------------------------------------------


def test_peer_restarted_on_the_same_port_is_reconnected(
        make_node: MakeNode, logs: LogWatcher) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)
    assert a.send("b", b"one")
    b.inbox.wait_for_count(1)
    up = a.states.wait_for("b", True)

    port = b.port
    b.close()
    down = a.states.wait_for("b", False, after=up)
    # A peer that was up going down is news: a WARNING at once.
    logs.wait_for("event=peer_unreachable", "node=a", "peer=b", level=logging.WARNING)

    b2 = make_node("b", port=port)
    mesh(a, b2)
    a.states.wait_for("b", True, after=down)
    assert a.send("b", b"two")
    assert b2.send("a", b"back")

    assert b2.inbox.wait_for_count(1) == [("a", RAFT, b"two")]
    assert a.inbox.wait_for_count(1) == [("b", RAFT, b"back")]


def test_a_peer_that_moved_is_dialed_at_its_new_address(
        make_node: MakeNode, logs: LogWatcher) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)
    a.states.wait_for("b", True)
    b.close()

    moved = make_node("b")
    moved.set_peers({"a": a.address})
    a.set_peers({"b": moved.address})
    logs.wait_for("event=peer_address_changed", "node=a", "peer=b", moved.address)

    assert a.send("b", b"at the new address")
    assert moved.inbox.wait_for_count(1) == [("a", RAFT, b"at the new address")]


def test_set_peers_removing_a_peer_stops_its_link_and_drops_its_inbound_connection(
        make_node: MakeNode, logs: LogWatcher, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)
    a.states.wait_for("b", True)
    b_up = b.states.wait_for("a", True)
    assert b.send("a", b"before")
    a.inbox.wait_for_count(1)
    # a's refusals of b as a member it removed (no longer "unknown_node": b is told it was
    # removed, so it can say so), each one (the log has one per 10 s).
    refusals_of_b: list[str] = []
    refused = a.transport.refused
    removed_by: list[str] = []
    monkeypatch.setattr(b.transport, "_on_removed_by", removed_by.append)

    def counting_refused(remote_host: str, remote: str, reason: str, detail: str) -> None:
        if (reason, detail) == ("removed_member", "node=b"):
            refusals_of_b.append(remote)
        refused(remote_host, remote, reason, detail)

    monkeypatch.setattr(a.transport, "refused", counting_refused)
    earlier = len(logs.lines())  # lines from before the removal (b refusing a at start-up)

    a.set_peers({})

    wait_for_new_line(logs, earlier, "event=peer_removed node=a peer=b")
    assert a.send("b", b"x") is False
    assert a.reachable() == {}
    # b's connection into a was closed; b redials and a refuses it: b is no peer of a's.
    b.states.wait_for("a", False, after=b_up)
    wait_for_new_line(logs, earlier, "event=peer_rejected node=a ", "reason=removed_member",
                      "detail='node=b'")
    wait_until(lambda: "a" in removed_by, WAIT_S, "b to hear it was removed by a")
    assert b.send("a", b"after")  # queued: b's link is down
    refused_before = len(refusals_of_b)
    # A barrier: a refused a dial of b's made with "after" queued on it (had a let it in,
    # b would have written "after" at once, before any later dial).
    wait_until(lambda: len(refusals_of_b) > refused_before, WAIT_S,
               "a to refuse b's next redial")
    assert a.inbox.snapshot() == [("b", RAFT, b"before")]


def wait_for_new_line(logs: LogWatcher, earlier: int, *fragments: str) -> logging.LogRecord:
    """The first log line past the first `earlier` ones that holds every fragment."""

    def found() -> logging.LogRecord | None:
        return next((r for r in logs.lines()[earlier:]
                     if all(f in r.getMessage() for f in fragments)), None)

    return wait_until(found, WAIT_S, f"a log line with {fragments} past line {earlier}")


def test_close_is_prompt_and_idempotent(make_node: MakeNode) -> None:
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    mesh(a, b, c)
    a.set_peers({"b": b.address, "c": c.address, "gone": f"127.0.0.1:{closed_port()}"})
    a.states.wait_for("b", True)
    a.states.wait_for("c", True)
    a.states.wait_for("gone", False)
    b_up = b.states.wait_for("a", True)
    port = a.port

    started = time.monotonic()
    a.close()
    a.close()
    elapsed_s = time.monotonic() - started

    assert elapsed_s < 1.0
    assert a.send("b", b"x") is False
    assert a.reachable() == {}
    b.states.wait_for("a", False, after=b_up)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the peer port is closed"


def test_closing_flushes_what_was_queued_for_peers_that_are_up(make_node: MakeNode) -> None:
    a, b = make_node("a"), make_node("b")
    mesh(a, b)
    a.states.wait_for("b", True)

    def send_then_close(t: PeerTransport) -> None:
        t.send("b", RAFT, b"last words")
        t.close()

    a.call(send_then_close)

    assert b.inbox.wait_for_count(1) == [("a", RAFT, b"last words")]


def test_a_newer_connection_from_a_peer_replaces_its_older_one(make_node: MakeNode) -> None:
    b = make_node("b")
    b.set_peers({"a": f"127.0.0.1:{closed_port()}"})
    with raw_handshaken_connection(b, as_node="a") as old, \
            raw_handshaken_connection(b, as_node="a") as new:
        read_until_closed(old)  # closed by b: the peer redialed
        new.sendall(b"\x00\x00\x00\x03\x01ok")
        assert b.inbox.wait_for_count(1) == [("a", RAFT, b"ok")]


def test_a_peer_added_back_is_no_longer_refused_as_removed(make_node: MakeNode) -> None:
    """The removed mark goes with the re-add: b's next dial into a is let in (b's link to a
    comes up again), and b is not told it was removed after that."""
    a, b = make_node("a"), make_node("b")
    removed_by: list[str] = []
    b.transport._on_removed_by = removed_by.append
    mesh(a, b)
    a.states.wait_for("b", True)
    b_up = b.states.wait_for("a", True)
    a.set_peers({})
    b_down = b.states.wait_for("a", False, after=b_up)
    wait_until(lambda: "a" in removed_by, WAIT_S, "b to hear it was removed by a")
    mesh(a, b)  # b is a member of a's again
    b_again = b.states.wait_for("a", True, after=b_down)
    told = len(removed_by)
    assert b.send("a", b"back")
    a.inbox.wait_for_count(1)
    assert b.states.changes[b_again + 1:] == [] and len(removed_by) == told


def test_output_for_a_peer_that_cannot_be_reached_is_not_pending_output(
        make_node: MakeNode) -> None:
    """has_output (what a removed member's link waits for before it goes) counts frames that
    may still leave: not those queued for a peer that refuses every dial (found by a review:
    a removal of an unreachable node waited out the whole bound)."""
    a = make_node("a")
    with socket.socket() as held:  # bound, never listening: every dial is refused
        held.bind(("127.0.0.1", 0))
        a.set_peers({"b": f"127.0.0.1:{held.getsockname()[1]}"})
        assert a.send("b", b"queued")
        wait_until(lambda: a.call(lambda t: t.reachable()) == {"b": False}, 10,
                   "the dial to be refused")
        assert a.call(lambda t: t.has_output("b")) is False
    b = make_node("b")
    a.set_peers({"b": b.address})
    b.set_peers({"a": a.address})
    assert b.inbox.wait_for_count(1) == [("a", RAFT, b"queued")]
    assert a.call(lambda t: t.has_output("b")) is False  # written: nothing pending
    assert a.call(lambda t: t.has_output("nobody")) is False


def test_a_member_presenting_another_incarnation_is_refused_both_ways(
        make_node: MakeNode, logs: LogWatcher) -> None:
    """The check (the runtime's: the incarnation the cluster recorded for that member) runs on
    the listener (refused as replaced_member, which the dialer is told) and on the dialer
    (the link is not taken). Frames go neither way."""
    replaced: list[str] = []

    def check(node_id: str, incarnation: str) -> str | None:
        return "wiped" if (node_id, incarnation) == ("b", "new") else None

    a = make_node("a", incarnation="aaa", check_incarnation=check)
    b = make_node("b", incarnation="new", on_replaced_by=replaced.append)
    a.set_peers({"b": b.address})
    b.set_peers({"a": a.address})
    wait_until(lambda: "a" in replaced, 10, "b to be told")
    logs.wait_for("reason=replaced_member")
    a.send("b", b"y")
    b.send("a", b"x")
    assert a.call(lambda t: t.reachable()) == {"b": False}
    assert b.call(lambda t: t.reachable()) == {"a": False}
    assert a.inbox.snapshot() == [] and b.inbox.snapshot() == []


def test_a_member_presenting_the_recorded_incarnation_links(make_node: MakeNode) -> None:
    seen: list[tuple[str, str]] = []

    def check(node_id: str, incarnation: str) -> str | None:
        seen.append((node_id, incarnation))
        return None

    a = make_node("a", incarnation="aaa", check_incarnation=check)
    b = make_node("b", incarnation="bbb")
    mesh(a, b)
    assert b.send("a", b"x")
    assert a.inbox.wait_for_count(1) == [("b", RAFT, b"x")]
    assert ("b", "bbb") in seen
