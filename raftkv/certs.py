"""`raftkv certs init DIR --nodes n1,n2,n3`: a certificate authority and certificates for a
local or compose cluster, with the `cryptography` package (`pip install 'raftkv[tls]'`).

What it writes into DIR (keys mode 0600, never overwritten: a second run refuses):

    ca.pem, ca.key            the cluster's CA (ECDSA P-256, self-signed, CA:true pathlen 0)
    <node>.pem, <node>.key    per node, signed by the CA, for BOTH ends of a connection
                              (extended key usage serverAuth + clientAuth): the peer port's
                              mutual TLS (--peer-cert-file/--peer-key-file, with ca.pem as
                              --peer-trusted-ca-file) and the node's TLS-terminating proxy.
                              Subject CN = the node id; subject alternative names: the node
                              id, localhost, 127.0.0.1, ::1 and every --hosts entry.
    client.pem, client.key    a client certificate (clientAuth only, CN=client) for proxies
                              that require one (the nginx recipe in deploy/tls/).

ECDSA P-256 because its handshakes cost a fraction of RSA's, and every TLS stack in use here
(Python's ssl on OpenSSL 3, nginx, curl) speaks it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = ["CertsError", "CertsResult", "init_certs"]

DEFAULT_DAYS: Final = 825
"""About 27 months: what browsers and most tools still accept for a leaf certificate."""
CA_DAYS: Final = 3650
CLIENT_NAME: Final = "client"


class CertsError(Exception):
    """The certificates cannot be made; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class CertsResult:
    directory: Path
    files: tuple[str, ...]


def _crypto() -> Any:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise CertsError("raftkv certs needs the cryptography package: "
                         "pip install 'raftkv[tls]' (or: pip install cryptography)") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _san(x509: Any, names: Sequence[str]) -> Any:
    entries: list[Any] = []
    seen: set[str] = set()
    for name in names:
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def init_certs(directory: str | os.PathLike[str], nodes: Sequence[str],
               hosts: Sequence[str] = (), *, days: int = DEFAULT_DAYS,
               now: datetime.datetime | None = None) -> CertsResult:
    """Make the CA, one certificate per node and a client certificate in `directory` (created
    if absent). CertsError if a file it would write exists, or a name is bad."""
    from raftkv.settings import SettingsError, check_node_id

    x509, hashes, serialization, ec, eku, name_oid = _crypto()
    if not nodes:
        raise CertsError("give at least one node: --nodes n1,n2,n3")
    for node in nodes:
        try:
            check_node_id(node, "--nodes")
        except SettingsError as e:
            raise CertsError(str(e)) from None
        if node == CLIENT_NAME:
            raise CertsError(f"a node cannot be called {CLIENT_NAME!r}: that file is the "
                             "client certificate")
    if not 1 <= days <= 100 * 365:
        raise CertsError("--days must be 1..36500")
    target = Path(directory)
    names = ["ca", *nodes, CLIENT_NAME]
    files = [f"{n}.{ext}" for n in names for ext in ("pem", "key")]
    existing = [f for f in files if (target / f).exists()]
    if existing:
        raise CertsError(f"{target} already holds {', '.join(existing)}: certificates are "
                         "never overwritten; use another directory or remove them")
    target.mkdir(parents=True, exist_ok=True)

    start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(hours=1)

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def subject(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(name_oid.ORGANIZATION_NAME, "raftkv"),
                          x509.NameAttribute(name_oid.COMMON_NAME, cn)])

    ca_key = key()
    ca_name = subject("raftkv cluster CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usages: list[Any], alt_names: Sequence[str]) -> tuple[Any, Any]:
        leaf_key = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject(cn)).issuer_name(ca_name)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
        )
        if alt_names:
            builder = builder.add_extension(_san(x509, alt_names), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), leaf_key

    made: dict[str, tuple[Any, Any]] = {"ca": (ca_cert, ca_key)}
    for node in nodes:
        made[node] = leaf(node, [eku.SERVER_AUTH, eku.CLIENT_AUTH],
                          [node, "localhost", "127.0.0.1", "::1", *hosts])
    made[CLIENT_NAME] = leaf(CLIENT_NAME, [eku.CLIENT_AUTH], [])

    for name, (cert, private_key) in made.items():
        pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = private_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        _write(target / f"{name}.key", key_pem, 0o600)
        _write(target / f"{name}.pem", pem, 0o644)
    return CertsResult(target, tuple(files))


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
