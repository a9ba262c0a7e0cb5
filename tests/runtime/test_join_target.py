"""names_own_socket: does RAFTKV_JOIN name this node's own HTTP socket? (A node started with
it used to retry its own refused port for 60 s and fail without a hint.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from raftkv.runtime.process import names_own_socket


@pytest.fixture
def sock(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((str(request.param), 0))
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("sock", ["127.0.0.1"], indirect=True)
def test_its_own_address_and_port_is_this_node(sock: socket.socket) -> None:
    port = sock.getsockname()[1]
    assert names_own_socket(f"http://127.0.0.1:{port}", sock)
    assert names_own_socket(f"127.0.0.1:{port}/", sock)
    assert names_own_socket(f"http://localhost:{port}", sock)


@pytest.mark.parametrize("sock", ["127.0.0.1"], indirect=True)
def test_another_port_or_address_is_not(sock: socket.socket) -> None:
    port = sock.getsockname()[1]
    assert not names_own_socket(f"http://127.0.0.1:{port + 1 if port < 65535 else 1}", sock)
    # bound to one address: another one of this machine, same port, is another socket
    assert not names_own_socket(f"http://127.0.0.2:{port}", sock)


@pytest.mark.parametrize("sock", ["0.0.0.0"], indirect=True)
def test_bound_to_every_interface_any_local_address_is_this_node(sock: socket.socket) -> None:
    port = sock.getsockname()[1]
    assert names_own_socket(f"http://127.0.0.1:{port}", sock)
    assert names_own_socket(f"http://127.0.0.9:{port}", sock)
    # TEST-NET-1 (RFC 5737): no address of this machine; nothing of it is dialled here
    assert not names_own_socket(f"http://192.0.2.1:{port}", sock)


@pytest.mark.parametrize("sock", ["127.0.0.1"], indirect=True)
def test_a_bad_or_unresolvable_target_is_not_this_node(sock: socket.socket) -> None:
    port = sock.getsockname()[1]
    assert not names_own_socket("http://no-such-host.invalid:4001", sock)
    assert not names_own_socket(f"http://no-such-host.invalid:{port}", sock)
    assert not names_own_socket("not a url", sock)
