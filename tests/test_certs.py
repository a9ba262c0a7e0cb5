"""`raftkv certs init`: the CA and certificates it makes verify with Python's ssl module in a
mutual-TLS handshake over loopback (node to node, client to node), by node id and by
localhost/127.0.0.1/extra hosts; a certificate from another CA, and none, are refused."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from raftkv.certs import CertsError, init_certs
from raftkv.cli import EXIT_OK, EXIT_USAGE, main

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    init_certs(directory, ["n1", "n2"], ["node-1.example", "10.9.8.7"])
    return directory


def server_context(d: Path, node: str, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / f"{node}.pem", d / f"{node}.key")
    ctx.load_verify_locations(ca or d / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(d: Path, name: str | None, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca or d / "ca.pem")
    if name is not None:
        ctx.load_cert_chain(d / f"{name}.pem", d / f"{name}.key")
    return ctx


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str
              ) -> tuple[Mapping[str, object], Mapping[str, object] | None]:
    """One TLS exchange over loopback; (the certificate each side saw of the other)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                seen["client_cert"] = tls.getpeercert()
                tls.sendall(tls.recv(5))
        except (ssl.SSLError, OSError) as e:
            seen["error"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
            peer = tls.getpeercert()
            assert peer is not None, "the client verified the server's certificate"
    finally:
        thread.join(5)
        listener.close()
    assert "error" not in seen, seen
    client_cert = seen.get("client_cert")
    return peer, client_cert if isinstance(client_cert, dict) else None


def common_name(cert: Mapping[str, object]) -> str:
    subject = cert["subject"]
    assert isinstance(subject, tuple)
    name = next(value for rdn in subject for key, value in rdn if key == "commonName")
    assert isinstance(name, str)
    return name


def test_files_and_modes(certs: Path) -> None:
    names = sorted(p.name for p in certs.iterdir())
    assert names == sorted(f"{n}.{e}" for n in ("ca", "n1", "n2", "client")
                           for e in ("pem", "key"))
    for key in certs.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.parametrize("hostname", ["n1", "localhost", "127.0.0.1", "node-1.example",
                                      "10.9.8.7"])
def test_node_to_node_mutual_tls(certs: Path, hostname: str) -> None:
    peer, client_cert = handshake(server_context(certs, "n1"), client_context(certs, "n2"),
                                  hostname)
    assert common_name(peer) == "n1"
    assert client_cert is not None and common_name(client_cert) == "n2"


def test_client_certificate(certs: Path) -> None:
    _, client_cert = handshake(server_context(certs, "n2"), client_context(certs, "client"),
                               "n2")
    assert client_cert is not None and common_name(client_cert) == "client"


def test_a_name_not_in_the_certificate_is_refused(certs: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(certs, "n1"), client_context(certs, "n2"), "n2")


def test_another_ca_and_no_certificate_are_refused(certs: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_certs(other, ["n1", "n2"])
    # The server trusts only our CA: a client certificate of another CA is refused...
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(server_context(certs, "n1"), client_context(other, "n2", certs / "ca.pem"),
                  "n1")
    # ... and so is a client without one.
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(server_context(certs, "n1"), client_context(certs, None), "n1")
    # A client trusting only our CA refuses a server certificate of another CA.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(other, "n1", certs / "ca.pem"), client_context(certs, "n2"),
                  "n1")


def test_never_overwrites_and_checks_names(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(CertsError, match="never overwritten"):
        init_certs(certs, ["n1"])
    for nodes in ([], ["bad name"], ["client"]):
        with pytest.raises(CertsError):
            init_certs(tmp_path / "x", nodes)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", str(tmp_path / "c"), "--nodes", "n1,n2,n3",
                 "--hosts", "raftkv.local"]) == EXIT_OK
    assert "ca.pem" in capsys.readouterr().out
    assert (tmp_path / "c" / "n3.pem").exists()
    assert main(["certs", "init", str(tmp_path / "c"), "--nodes", "n1"]) == EXIT_USAGE
