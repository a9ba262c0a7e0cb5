"""The blocking one-shot probe (raftkv.runtime.transport.probe): who listens at a raft
address, asked from outside the event loop (a join: who is there, and is it the node named)."""

from __future__ import annotations

import socket
import threading

import pytest

from raftkv.runtime.transport.handshake import PeerInfo
from raftkv.runtime.transport.probe import ProbeFailed, probe
from tests.runtime.transport.harness import CLUSTER, TOKEN, WAIT_S, MakeNode, closed_port


def test_probe_returns_the_listener_identity_even_to_an_unknown_node(make_node: MakeNode) -> None:
    b = make_node("b")

    info = probe(b.address, cluster_id="", token=TOKEN, node_id="joiner", timeout_s=WAIT_S)

    assert info == PeerInfo(node_id="b", http_address="b.test:8080", cluster_id=CLUSTER)


def test_probe_with_a_wrong_token_fails_with_the_reason(make_node: MakeNode) -> None:
    b = make_node("b")

    with pytest.raises(ProbeFailed, match="wrong_token") as failed:
        probe(b.address, cluster_id=CLUSTER, token="wrong", node_id="joiner", timeout_s=WAIT_S)
    assert failed.value.mismatch == "cluster"  # asking again will not change it: a join is a 409


def test_probe_from_another_cluster_fails_with_the_reason(make_node: MakeNode) -> None:
    b = make_node("b")

    with pytest.raises(ProbeFailed, match="wrong_cluster") as failed:
        probe(b.address, cluster_id="elsewhere", token=TOKEN, node_id="joiner",
              timeout_s=WAIT_S)
    assert failed.value.mismatch == "cluster"


def test_probe_of_a_closed_port_fails() -> None:
    with pytest.raises(ProbeFailed, match="cannot reach") as failed:
        probe(f"127.0.0.1:{closed_port()}", cluster_id="", token=TOKEN, node_id="x",
              timeout_s=WAIT_S)
    assert failed.value.mismatch is None  # the node may not listen yet: a join is a 503


def test_probe_of_something_that_is_not_a_raftkv_node_fails() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def http_server() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=http_server, daemon=True)
        t.start()
        with pytest.raises(ProbeFailed) as failed:
            probe(f"127.0.0.1:{port}", cluster_id="", token=TOKEN, node_id="x",
                  timeout_s=WAIT_S)
        t.join(WAIT_S)
    assert failed.value.mismatch == "protocol"


def test_probe_of_a_listener_that_never_answers_fails_at_its_deadline() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with pytest.raises(ProbeFailed) as failed:
            probe(f"127.0.0.1:{port}", cluster_id="", token=TOKEN, node_id="x", timeout_s=0.3)
    assert failed.value.mismatch is None


@pytest.mark.parametrize("source_host", ["127.0.0.2", None])
def test_probe_leaves_from_the_source_host_its_links_leave_from(
        make_node: MakeNode, source_host: str | None) -> None:
    """Found by a review: outbound links bind to the node's raft host, the probe did not (it
    left from 127.0.0.1 where each node has its own 127.x address), so firewall rules that
    match the source, those of tests/faults above all, did not apply to it: a join's probe
    reached a node that the member's links could not."""
    b = make_node("b")
    with socket.create_server(("127.0.0.1", 0)) as server:  # never speaks: the probe waits
        port = server.getsockname()[1]
        # It connects, then times out waiting for the handshake (the message does not tell
        # that from a connect that timed out: the accept below does, and a probe that never
        # connected makes it fail at its deadline instead of hanging).
        with pytest.raises(ProbeFailed, match=r"timed out|in time"):
            probe(f"127.0.0.1:{port}", cluster_id="", token=TOKEN, node_id="x", timeout_s=0.2,
                  source_host=source_host)
        server.settimeout(WAIT_S)
        conn, (peer_host, _port) = server.accept()  # queued by the kernel meanwhile
        conn.close()
    assert peer_host == (source_host or "127.0.0.1")
    # And a probe from the source host goes through to a node as before.
    assert probe(b.address, cluster_id="", token=TOKEN, node_id="x", timeout_s=WAIT_S,
                 source_host=source_host).node_id == "b"


def test_probe_of_a_bad_address_fails_with_value_error() -> None:
    with pytest.raises(ValueError, match="host:port"):
        probe("no-port-here", cluster_id="", token=TOKEN, node_id="x", timeout_s=WAIT_S)
