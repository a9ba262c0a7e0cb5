"""The peer handshake, sans-IO (raftkv.runtime.transport.handshake): both sides prove they hold
the token, nonces make every MAC single-use, and every malformed message is refused with a
stable reason."""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest

from raftkv.runtime.transport.handshake import (
    PROTOCOL_VERSION,
    DialerHandshake,
    HandshakeFailed,
    HandshakeRejected,
    ListenerHandshake,
    PeerAuth,
    PeerInfo,
    Refused,
    reject_message,
)

TOKEN = b"s3cret"


def listener(token: bytes = TOKEN, cluster: str = "c1") -> ListenerHandshake:
    return ListenerHandshake(token=token, node_id="b", cluster_id=cluster,
                             http_address="b:8080")


def dialer(token: bytes = TOKEN, cluster: str = "c1", probe: bool = False) -> DialerHandshake:
    return DialerHandshake(token=token, node_id="a", cluster_id=cluster, http_address="a:8080",
                           probe=probe, address="b-host:5000")


def test_matching_tokens_complete_the_handshake_with_both_identities() -> None:
    lis, dia = listener(), dialer()
    auth = lis.check_auth(dia.on_hello(lis.hello()))
    info = dia.on_welcome(lis.welcome())
    assert auth == PeerAuth("a", "c1", "a:8080", probe=False)
    assert info == PeerInfo("b", "b:8080", "c1")


def test_a_dialer_with_another_token_is_refused_as_wrong_token() -> None:
    lis = listener()
    with pytest.raises(Refused) as caught:
        lis.check_auth(dialer(token=b"guess").on_hello(lis.hello()))
    assert caught.value.reason == "wrong_token"


def test_a_listener_with_another_token_cannot_prove_it_to_the_dialer() -> None:
    impostor, dia = listener(token=b"guess"), dialer()
    auth = dia.on_hello(impostor.hello())
    with pytest.raises(Refused):
        impostor.check_auth(auth)  # it cannot even tell whether the dialer is genuine
    with pytest.raises(HandshakeFailed, match="could not prove"):
        dia.on_welcome(impostor.welcome())  # and whatever welcome it sends fails


def test_an_auth_message_cannot_be_replayed_to_another_connection() -> None:
    first = listener()
    auth = dialer().on_hello(first.hello())
    first.check_auth(auth)
    with pytest.raises(Refused) as caught:
        listener().check_auth(auth)  # another connection: another listener nonce
    assert caught.value.reason == "wrong_token"


@pytest.mark.parametrize(("field", "value"), [("node", "someone-else"), ("cluster", "c2"),
                                            ("http", "elsewhere:1"), ("probe", True)])
def test_every_identity_field_of_the_auth_is_covered_by_the_mac(field: str,
                                                                 value: object) -> None:
    lis = listener()
    auth = msgpack.unpackb(dialer().on_hello(lis.hello()), raw=False)
    auth[field] = value
    with pytest.raises(Refused) as caught:
        lis.check_auth(msgpack.packb(auth, use_bin_type=True))
    assert caught.value.reason == "wrong_token"


def test_a_probe_says_so_in_its_auth() -> None:
    lis = listener()
    assert lis.check_auth(dialer(probe=True).on_hello(lis.hello())).probe is True


@pytest.mark.parametrize(("message", "reason"), [
    (b"\xc1", "malformed"),
    (msgpack.packb([1, 2]), "malformed"),
    (msgpack.packb({"v": PROTOCOL_VERSION + 1, "type": "auth"}), "version"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "hello"}), "bad_handshake"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "auth", "node": "", "cluster": "",
                    "http": "", "nonce": b"n" * 32, "mac": b"m"}), "bad_handshake"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "auth", "node": "a" * 300, "cluster": "",
                    "http": "", "nonce": b"n" * 32, "mac": b"m"}), "bad_handshake"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "auth", "node": "a", "cluster": "",
                    "http": "", "nonce": b"short", "mac": b"m"}), "bad_handshake"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "auth", "node": "a", "cluster": "",
                    "http": "", "nonce": b"n" * 32, "mac": "not bytes"}), "bad_handshake"),
    (msgpack.packb({"v": PROTOCOL_VERSION, "type": "auth", "node": "a", "cluster": "",
                    "http": "", "nonce": b"n" * 32, "probe": "yes", "mac": b"m"}),
     "bad_handshake"),
], ids=["not-msgpack", "not-a-map", "other-version", "not-auth", "empty-node", "long-node",
        "short-nonce", "mac-not-bytes", "probe-not-bool"])
def test_a_malformed_auth_is_refused_with_a_stable_reason(message: bytes, reason: str) -> None:
    lis = listener()
    lis.hello()
    with pytest.raises(Refused) as caught:
        lis.check_auth(message)
    assert caught.value.reason == reason


def test_a_reject_reaches_the_dialer_as_its_reason() -> None:
    dia = dialer()
    dia.on_hello(listener().hello())
    with pytest.raises(HandshakeRejected) as caught:
        dia.on_welcome(reject_message("unknown_node"))
    assert caught.value.reason == "unknown_node"


def test_a_listener_of_another_protocol_version_is_rejected_as_version() -> None:
    hello = msgpack.unpackb(listener().hello(), raw=False)
    hello["v"] = PROTOCOL_VERSION + 1
    with pytest.raises(HandshakeRejected) as caught:
        dialer().on_hello(msgpack.packb(hello, use_bin_type=True))
    assert caught.value.reason == "version"


@pytest.mark.parametrize("change", [{"type": "welcome"}, {"nonce": b"short"}, {"node": ""},
                                    {"http": 5}], ids=repr)
def test_a_bad_hello_fails_the_dialer(change: dict[str, Any]) -> None:
    hello = msgpack.unpackb(listener().hello(), raw=False)
    hello.update(change)
    with pytest.raises(HandshakeFailed):
        dialer().on_hello(msgpack.packb(hello, use_bin_type=True))


def test_a_welcome_before_the_hello_fails_the_dialer() -> None:
    lis = listener()
    lis.check_auth(dialer().on_hello(lis.hello()))
    with pytest.raises(HandshakeFailed, match="before its hello"):
        dialer().on_welcome(lis.welcome())


def test_both_sides_present_their_data_dirs_incarnation() -> None:
    lis = ListenerHandshake(token=TOKEN, node_id="b", cluster_id="c1", http_address="b:8080",
                            incarnation="bbb1")
    dia = DialerHandshake(token=TOKEN, node_id="a", cluster_id="c1", http_address="a:8080",
                          probe=False, address="b-host:5000", incarnation="aaa1")
    auth = lis.check_auth(dia.on_hello(lis.hello()))
    info = dia.on_welcome(lis.welcome())
    assert auth.incarnation == "aaa1" and info.incarnation == "bbb1"


def test_an_incarnation_is_optional_and_a_bad_one_is_refused() -> None:
    """A node of an earlier build sends none (""); anything but 1..64 letters and digits is a
    bad handshake."""
    lis, dia = listener(), dialer()
    assert lis.check_auth(dia.on_hello(lis.hello())).incarnation == ""
    for bad in ("x" * 65, "a/b", 7):
        lis, dia = listener(), dialer()
        auth = msgpack.unpackb(dia.on_hello(lis.hello()), raw=False)
        auth["inc"] = bad
        with pytest.raises(Refused) as caught:
            lis.check_auth(msgpack.packb(auth, use_bin_type=True))
        assert caught.value.reason == "bad_handshake"
