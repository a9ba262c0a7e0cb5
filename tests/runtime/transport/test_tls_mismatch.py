"""Peer TLS on at one end and not the other (raftkv.runtime.transport.tls): each end says
plainly that the two disagree on TLS and what to change (RAFTKV_PEER_TLS, by the rolling
switch's modes), instead of a bare bad handshake. Nothing else changes: such a connection is
refused as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from raftkv.codec import FrameKind
from raftkv.runtime.transport.tls import PeerTLS, TLSMode
from tests.runtime.transport.harness import (
    LogWatcher,
    MakeNode,
    frame,
    handshake_messages,
    mesh,
    raw_connection,
    read_until_closed,
)

pytest.importorskip("cryptography", reason="raftkv certs needs the cryptography package")

CLIENT_HELLO_HEAD = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32
"""The start of a TLS ClientHello record: what a TLS dialer sends first."""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raftkv.certs import init_certs

    directory = tmp_path_factory.mktemp("certs")
    init_certs(directory, ["a", "b"])
    return directory


def peer_tls(certs: Path, node_id: str, mode: TLSMode) -> PeerTLS:
    return PeerTLS.load(mode, str(certs / f"{node_id}.pem"), str(certs / f"{node_id}.key"),
                        str(certs / "ca.pem"))


def test_tls_records_are_told_from_frames() -> None:
    from raftkv.runtime.transport.tls import is_tls_record

    assert is_tls_record(CLIENT_HELLO_HEAD)
    assert is_tls_record(b"\x15\x03")  # an alert
    assert not is_tls_record(frame(FrameKind.HANDSHAKE, b"\x80"))
    assert not is_tls_record(b"\x16")
    assert not is_tls_record(b"GET ")


def test_a_plaintext_peer_port_names_a_tls_dialer(make_node: MakeNode,
                                                 logs: LogWatcher) -> None:
    b = make_node("b")
    with raw_connection(b) as raw:
        raw.sendall(CLIENT_HELLO_HEAD)
        replies = handshake_messages(read_until_closed(raw))

    assert [m["type"] for m in replies] == ["hello"]  # refused as before: closed
    record = logs.wait_for("event=peer_rejected", "node=b", "reason=tls_peer")
    message = record.getMessage()
    assert "speaks TLS, this node plaintext (RAFTKV_PEER_TLS=off)" in message, message
    assert "dial plaintext (RAFTKV_PEER_TLS=migrate-accept)" in message, message
    assert "accept TLS (RAFTKV_PEER_TLS=migrate-accept, with RAFTKV_PEER_CERT_FILE" in message
    assert "frame_too_large" in message, message  # what broke is still said
    assert logs.lines("reason=bad_handshake") == []


def test_a_tls_only_peer_port_names_a_plaintext_dialer(make_node: MakeNode, logs: LogWatcher,
                                                       certs: Path) -> None:
    b = make_node("b", tls=peer_tls(certs, "b", TLSMode.ON))
    with raw_connection(b) as raw:
        raw.sendall(frame(FrameKind.HANDSHAKE, b"\x80"))
        assert read_until_closed(raw) == b""  # no hello: refused as before

    record = logs.wait_for("event=peer_rejected", "node=b", "reason=plaintext_refused")
    message = record.getMessage()
    assert "speaks plaintext, this node TLS (RAFTKV_PEER_TLS=on)" in message, message
    assert "dial TLS (RAFTKV_PEER_TLS=migrate-dial, with RAFTKV_PEER_CERT_FILE" in message
    assert "accept plaintext (RAFTKV_PEER_TLS=migrate-accept)" in message, message


def test_a_tls_dialer_at_a_plaintext_peer_port_says_so_at_both_ends(
        make_node: MakeNode, logs: LogWatcher, certs: Path) -> None:
    a, b = make_node("a", tls=peer_tls(certs, "a", TLSMode.ON)), make_node("b")
    mesh(a, b)
    a.send("b", b"must not arrive")

    record = logs.wait_for("event=peer_tls_mismatch", "node=a", "peer=b",
                           "reason=plaintext_peer")
    message = record.getMessage()
    assert f"the peer at {b.address} speaks plaintext, this node TLS" in message, message
    assert "accept TLS (RAFTKV_PEER_TLS=migrate-accept, with" in message, message
    assert "dial plaintext (RAFTKV_PEER_TLS=migrate-accept)" in message, message
    logs.wait_for("event=peer_rejected", "node=b", "reason=tls_peer")
    assert b.inbox.snapshot() == []


def test_a_plaintext_dialer_at_a_tls_only_peer_port_says_so_at_both_ends(
        make_node: MakeNode, logs: LogWatcher, certs: Path) -> None:
    a = make_node("a", tls=peer_tls(certs, "a", TLSMode.MIGRATE_ACCEPT))  # dials plaintext
    b = make_node("b", tls=peer_tls(certs, "b", TLSMode.ON))
    mesh(a, b)
    a.send("b", b"must not arrive")

    record = logs.wait_for("event=peer_tls_mismatch", "node=a", "peer=b", "reason=tls_peer")
    message = record.getMessage()
    assert f"the peer at {b.address} speaks TLS, this node plaintext" in message, message
    assert "(RAFTKV_PEER_TLS=migrate-accept)" in message, message
    assert "dial TLS (RAFTKV_PEER_TLS=migrate-dial, with" in message, message
    logs.wait_for("event=peer_rejected", "node=b", "reason=plaintext_refused",
                  "RAFTKV_PEER_TLS=migrate-dial")
    assert b.inbox.snapshot() == []
