"""names_own_socket: does RAFTKV_JOIN name this node's own HTTP socket? (A node started with
it used to retry its own refused port for 60 s and fail without a hint.)"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from raftkv.runtime.process import bound_socket, names_own_socket


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


@pytest.mark.parametrize("sock", ["127.0.0.1"], indirect=True)
def test_its_advertised_address_is_this_node(sock: socket.socket) -> None:
    assert names_own_socket("http://proxy.example:8080", sock, "proxy.example:8080")
    assert names_own_socket("proxy.example:8080", sock, "http://proxy.example:8080")
    assert not names_own_socket("http://other.example:8080", sock, "proxy.example:8080")


# Found by a review: false positives, each a legitimate join refused for good.


@pytest.fixture
def member() -> Iterator[Any]:
    """Starts a plain HTTP server (another node's face) at (host, port, family)."""
    servers: list[http.server.HTTPServer] = []

    def start(host: str, port: int, family: socket.AddressFamily) -> None:
        class Server(http.server.HTTPServer):
            address_family = family

        srv = Server((host, port), http.server.BaseHTTPRequestHandler, bind_and_activate=False)
        if family == socket.AF_INET6:
            srv.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        srv.server_bind()
        srv.server_activate()
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def assert_answers(url: str) -> None:
    """Something answers HTTP at `url` (an error status is an answer; no connection is not)."""
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(url, timeout=5).close()


def test_a_member_of_the_other_address_family_on_the_same_port_is_not(member: Any) -> None:
    """bound_socket makes [::]:P v6-only: 0.0.0.0:P may be another node of this machine."""
    me = bound_socket("::", 0, socket.AF_INET6)
    try:
        port = me.getsockname()[1]
        member("0.0.0.0", port, socket.AF_INET)
        assert_answers(f"http://127.0.0.1:{port}/")
        assert not names_own_socket(f"http://127.0.0.1:{port}", me)
    finally:
        me.close()


def test_a_name_that_also_resolves_to_a_member_is_not(
        member: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name for every node (a compose network alias, a headless service): the join tries
    each address and reaches a member, though one of them is this node's."""
    me = bound_socket("127.0.0.1", 0, socket.AF_INET)
    try:
        port = me.getsockname()[1]
        member("127.0.0.2", port, socket.AF_INET)
        real = socket.getaddrinfo

        def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
            if host == "every-node.test":
                return real("127.0.0.1", *args, **kwargs) + real("127.0.0.2", *args, **kwargs)
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        assert not names_own_socket(f"http://every-node.test:{port}", me)
    finally:
        me.close()


def test_a_local_address_that_answers_is_not(member: Any) -> None:
    """Bound to every interface, yet something answers at that address (a virtual address
    forwarded elsewhere would): this node's socket does not listen yet, so it is not it."""
    me = bound_socket("0.0.0.0", 0, socket.AF_INET)
    try:
        port = me.getsockname()[1]
        me.listen(1)  # stands in for the other end: it accepts
        assert not names_own_socket(f"http://127.0.0.1:{port}", me)
    finally:
        me.close()
