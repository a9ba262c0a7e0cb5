"""Mutual TLS on the peer port (Python's ssl module, sans-IO: ssl.SSLObject over memory BIOs,
so it runs on the event loop like any connection; raftkv.runtime.connection).

Both ends present a certificate signed by the cluster's CA (`--peer-trusted-ca-file`), and
after the cluster-token handshake (which runs inside the tunnel) each side checks that the
other's certificate names the node id it authenticated as (its subject CN or a DNS name of
its subject alternative names, as `raftkv certs init` makes them): a node's certificate cannot
stand in for another node. Addresses are not checked (nodes move; the CA and the id are what
identify a peer).

Modes (`--peer-tls`):

    off             plaintext (no certificates given)
    on              TLS both ways; a plaintext connection is refused with a logged reason
    migrate-accept  dial plaintext, accept TLS and plaintext     } a rolling switch, one
    migrate-dial    dial TLS, accept TLS and plaintext           } node at a time each step

Turning TLS on without downtime: restart every node in `migrate-accept` (one at a time), then
every node in `migrate-dial`, then every node in `on`. At each step every connection has an
end that understands the other. (Backwards, to turn it off: the same steps in reverse order.)
A listener that accepts both tells them apart by the first bytes: a TLS ClientHello starts
with the handshake record type (0x16); a plaintext dialer sends nothing until it hears the
listener's hello, so after SNIFF_S of silence the listener takes it for plaintext.

Ends that disagree (one node's mode forgotten) are named as such at both ends, with what to
change (mismatch_advice): a TLS-only listener refuses a plaintext dialer as plaintext_refused,
a plaintext listener whose handshake broke on a TLS record refuses it as tls_peer, and a
dialer answered in the other kind (or, dialing plaintext, closed on before any hello) logs
event=peer_tls_mismatch (reason tls_peer or plaintext_peer, once per address per interval).
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass
from typing import Any, Final

from raftkv.files import FileProblem, check_small_file

__all__ = ["SNIFF_S", "TLS_RECORD_HANDSHAKE", "PeerTLS", "TLSMode", "TLSSetupError",
           "certificate_names", "is_tls_record", "mismatch_advice"]

SNIFF_S: Final = 0.2
TLS_RECORD_HANDSHAKE: Final = 0x16


_CERT_SETTINGS: Final = ("RAFTKV_PEER_CERT_FILE, RAFTKV_PEER_KEY_FILE and "
                         "RAFTKV_PEER_TRUSTED_CA_FILE")


def is_tls_record(head: bytes) -> bool:
    """Do a stream's first bytes start a TLS record (type 0x14-0x17, major version 3)? A
    peer frame starts with its 4-byte length instead, never that large."""
    return len(head) >= 2 and 0x14 <= head[0] <= 0x17 and head[1] == 0x03


def mismatch_advice(peer: str, *, peer_tls: bool, here: str, dialing: bool) -> str:
    """What to change when the two ends of a peer connection disagree on TLS: `peer_tls`,
    the peer at `peer` speaks TLS and this node (in mode `here`) plaintext, else the reverse;
    `dialing`, this node dialed it. Either end can be moved, by the rolling switch's modes."""
    certs = f", with {_CERT_SETTINGS}"
    if peer_tls:
        what = f"the peer at {peer} speaks TLS, this node plaintext"
        fix_there = "accept plaintext (RAFTKV_PEER_TLS=migrate-accept)" if dialing \
            else "dial plaintext (RAFTKV_PEER_TLS=migrate-accept)"
        fix_here = (f"dial TLS (RAFTKV_PEER_TLS=migrate-dial{certs})" if dialing
                    else f"accept TLS (RAFTKV_PEER_TLS=migrate-accept{certs})")
    else:
        what = f"the peer at {peer} speaks plaintext, this node TLS"
        fix_there = (f"accept TLS (RAFTKV_PEER_TLS=migrate-accept{certs})" if dialing
                     else f"dial TLS (RAFTKV_PEER_TLS=migrate-dial{certs})")
        fix_here = "dial plaintext (RAFTKV_PEER_TLS=migrate-accept)" if dialing \
            else "accept plaintext (RAFTKV_PEER_TLS=migrate-accept)"
    return f"{what} (RAFTKV_PEER_TLS={here}): let it {fix_there}, or let this node {fix_here}"


class TLSMode(enum.Enum):
    OFF = "off"
    ON = "on"
    MIGRATE_ACCEPT = "migrate-accept"
    MIGRATE_DIAL = "migrate-dial"

    @property
    def dials_tls(self) -> bool:
        return self in (TLSMode.ON, TLSMode.MIGRATE_DIAL)

    @property
    def accepts_tls(self) -> bool:
        return self is not TLSMode.OFF

    @property
    def accepts_plaintext(self) -> bool:
        return self is not TLSMode.ON


class TLSSetupError(Exception):
    """The certificate, key or CA files cannot be used; the message says which and why."""


@dataclass(frozen=True)
class PeerTLS:
    mode: TLSMode
    server: ssl.SSLContext | None
    client: ssl.SSLContext | None

    @staticmethod
    def off() -> PeerTLS:
        return PeerTLS(TLSMode.OFF, None, None)

    @staticmethod
    def load(mode: TLSMode, cert_file: str, key_file: str, ca_file: str) -> PeerTLS:
        if mode is TLSMode.OFF:
            return PeerTLS.off()
        missing = [name for name, value in (("--peer-cert-file", cert_file),
                                            ("--peer-key-file", key_file),
                                            ("--peer-trusted-ca-file", ca_file)) if not value]
        if missing:
            raise TLSSetupError(f"peer TLS ({mode.value}) needs {', '.join(missing)}: make them "
                                "with `raftkv certs init DIR --nodes ...`")
        for path in (cert_file, key_file, ca_file):
            try:
                check_small_file(path)
            except FileProblem as e:
                raise TLSSetupError(f"peer TLS: {e}") from None
        server = _context(ssl.Purpose.CLIENT_AUTH, cert_file, key_file, ca_file)
        client = _context(ssl.Purpose.SERVER_AUTH, cert_file, key_file, ca_file)
        return PeerTLS(mode, server, client)


def _context(purpose: ssl.Purpose, cert_file: str, key_file: str,
             ca_file: str) -> ssl.SSLContext:
    side = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH \
        else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # peers are identified by CA and node id, not by address
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise TLSSetupError(f"cannot use the peer certificate {cert_file} with key {key_file}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    try:
        ctx.load_verify_locations(ca_file)
    except (OSError, ssl.SSLError) as e:
        raise TLSSetupError(f"cannot use the peer CA {ca_file}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    return ctx


def certificate_names(cert: dict[str, Any] | None) -> set[str]:
    """The subject CN and the DNS subject alternative names of a verified certificate."""
    if not cert:
        return set()
    names = {str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(str(value))
    return names
