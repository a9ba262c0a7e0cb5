"""Node settings: every one has a flag and an environment variable, validated at start.

A bad setting raises SettingsError with a message that says what to do; the CLI prints it
and exits with status 2. Nothing here touches the network, and the disk only to read the file
named by --cluster-token-file.

There is no default cluster token: a node refuses to start without one (RAFTKV_CLUSTER_TOKEN,
or RAFTKV_CLUSTER_TOKEN_FILE naming a file that holds it), and refuses one shorter than
MIN_TOKEN_CHARS. `raftkv token generate` makes one.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final

from raftkv.core.config import MAX_MEMBERS
from raftkv.digits import MAX_INT64, parse_decimal
from raftkv.files import FileProblem, read_small_file

NODE_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it and says how to fix it."""


_SHOWN_CHARS: Final = 80


def shown(value: str) -> str:
    """`value` quoted for a message, cut to its first _SHOWN_CHARS characters when longer (a
    5,000-digit setting is not echoed whole)."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}... ({len(value):,} characters)"


def parse_host_port(value: str, name: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isascii() or not port_s.isdigit():
        raise SettingsError(f"{name}={shown(value)}: expected host:port, e.g. 127.0.0.1:4001")
    port = parse_decimal(port_s, 65535)
    if port is None:
        raise SettingsError(f"{name}={shown(value)}: port must be 0..65535")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare or not bare.isprintable() or any(c.isspace() or c in "[]=/" for c in bare):
        raise SettingsError(f"{name}={shown(value)}: expected host:port, e.g. 127.0.0.1:4001 "
                            "(an IPv6 host in brackets: [::1]:4001)")
    return bare, port


def without_scheme(url: str) -> str:
    """`url` without one leading http:// or https://."""
    return url.removeprefix("https://") if url.startswith("https://") else url.removeprefix(
        "http://")


def is_wildcard_host(host: str) -> bool:
    """0.0.0.0 (also as 0 or ::ffff:0.0.0.0), ::, [::] or *: a host to listen on, never one
    another node can dial."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare in ("*", "0"):
        return True
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_unspecified or (mapped is not None and mapped.is_unspecified)


def check_dialable(value: str, name: str, advice: str) -> None:
    """Refuse a host:port the other members would dial when its host is a wildcard."""
    host, _port = parse_host_port(value, name)
    if is_wildcard_host(host):
        raise SettingsError(f"{name}={shown(value)}: other nodes dial this address, and "
                            f"{host} names no host: {advice}")


def parse_peers(value: str) -> dict[str, str]:
    """`n1=host:port,n2=host:port` -> {"n1": "host:port", ...} (raft addresses)."""
    peers: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        nid, sep, addr = item.partition("=")
        nid = nid.strip()
        if not sep:
            raise SettingsError(
                f"RAFTKV_PEERS item {shown(item)}: expected id=host:port, e.g. n1=127.0.0.1:5001")
        check_node_id(nid, "RAFTKV_PEERS")
        _host, port = parse_host_port(addr.strip(), f"RAFTKV_PEERS[{nid}]")
        if port == 0:
            raise SettingsError(f"RAFTKV_PEERS[{nid}]={shown(addr.strip())}: a member's port "
                                "cannot be 0")
        if nid in peers:
            raise SettingsError(f"RAFTKV_PEERS names {nid} twice")
        if addr.strip() in peers.values():
            raise SettingsError(f"RAFTKV_PEERS gives the address {addr.strip()} to two "
                                "members: each member has an address of its own")
        peers[nid] = addr.strip()
    return peers


MIN_TOKEN_CHARS = 32
"""The cluster token keys the HMAC of every peer handshake: an attacker who sees one (or makes
a node compute one) can test guesses offline, so it must hold enough entropy not to be
guessed; 32 characters are 128 bits as hex (`raftkv token generate` makes 256)."""
KNOWN_PUBLIC_TOKENS = frozenset({"raftkv-default-insecure-token", "raftkv-compose-demo-token"})
"""Tokens that earlier versions shipped: public, so refused."""
_HOW_TO_MAKE_A_TOKEN = (
    "make one with `raftkv token generate` (or: python3 -c 'import secrets; "
    "print(secrets.token_hex(32))') and give the same one to every node of the cluster")


def check_cluster_token(token: str) -> None:
    if not token:
        raise SettingsError(
            "no cluster token: set RAFTKV_CLUSTER_TOKEN (--cluster-token) or "
            "RAFTKV_CLUSTER_TOKEN_FILE (--cluster-token-file), the secret that every peer "
            f"connection is checked against; {_HOW_TO_MAKE_A_TOKEN}")
    if token in KNOWN_PUBLIC_TOKENS:
        raise SettingsError(
            "the cluster token is one that earlier versions of raftkv shipped, so it is "
            f"public: anyone could join the cluster; {_HOW_TO_MAKE_A_TOKEN}")
    if not token.isascii() or not token.isprintable():
        raise SettingsError(
            "the cluster token must be printable ASCII (control characters and other bytes "
            f"do not survive every shell and file); {_HOW_TO_MAKE_A_TOKEN}")
    if len(token) < MIN_TOKEN_CHARS or token != token.strip():
        raise SettingsError(
            f"the cluster token has {len(token)} characters: too short to be secret (at least "
            f"{MIN_TOKEN_CHARS}, without surrounding spaces). It keys the HMAC of every peer "
            "handshake, so a short one can be guessed offline from a single handshake; "
            f"{_HOW_TO_MAKE_A_TOKEN}")


def generate_token() -> str:
    """A new cluster token: 256 random bits as 64 hex digits."""
    return secrets.token_hex(32)


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace, e.g. a final newline, removed)."""
    try:
        return read_small_file(path, 4096).decode("utf-8").strip()
    except (FileProblem, UnicodeDecodeError) as e:
        raise SettingsError(f"RAFTKV_CLUSTER_TOKEN_FILE={shown(path)}: cannot read it ({e}); "
                            f"it must hold the cluster token: {_HOW_TO_MAKE_A_TOKEN}") from None


def check_node_id(nid: str, name: str = "RAFTKV_ID") -> None:
    if not NODE_ID_RE.match(nid):
        raise SettingsError(
            f"{name}: node id {shown(nid)} must be a name like n1 (a letter, then letters, digits, "
            "'.', '_' or '-', at most 63), never an address")


def derive_cluster_id(peers: Mapping[str, str], root_digest: bytes | None = None) -> str:
    """The id of a statically bootstrapped cluster: the same on every member, different for
    clusters with other members or addresses. With auth (`root_digest`: the digest of the root
    token, raftkv.auth.token_digest) it differs too: the root token's digest is part of every
    first member's bootstrap log, so members given different root tokens (or one and none)
    would write different committed logs; with different cluster ids they refuse each other's
    peer connections instead."""
    text = ",".join(f"{k}={peers[k]}" for k in sorted(peers))
    if root_digest is not None:
        text += f";auth={root_digest.hex()}"
    return hashlib.sha256(f"raftkv-cluster:{text}".encode()).hexdigest()[:16]


MIN_QUOTA_BYTES = 1 << 20
MAX_QUOTA_BYTES = 1 << 40
DEFAULT_QUOTA_BYTES = 2 << 30
"""Like etcd's default backend quota."""
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_SIZE_BYTES = MAX_INT64
"""The largest size a setting may give."""
MAX_TICK_MS = 10_000
MAX_ELECTION_TIMEOUT_MS = 600_000
MAX_MAP_SIZE_MB = 1 << 26
MAX_REQUEST_TIMEOUT_MS = 60_000


def default_quota_bytes() -> int:
    """DEFAULT_QUOTA_BYTES, or an eighth of the machine's memory if that is less."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return DEFAULT_QUOTA_BYTES
    return max(MIN_QUOTA_BYTES, min(DEFAULT_QUOTA_BYTES, memory // 8))


def parse_size(raw: str, env: str) -> int:
    """`2147483648`, `2G`, `512M`, `64k` (powers of 1024; an optional trailing B or iB)."""
    text = raw.strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = (text[:-1], text[-1]) if text and text[-1] in _SIZE_SUFFIXES else (text, "")
    count = parse_decimal(number, MAX_SIZE_BYTES)
    if count is None or count * _SIZE_SUFFIXES[suffix] > MAX_SIZE_BYTES:
        raise SettingsError(f"{env}={shown(raw)}: expected a size in bytes up to 2**63 - 1, "
                            "e.g. 2147483648 or 2G")
    return count * _SIZE_SUFFIXES[suffix]


def _meta(env: str, flag: str, help_text: str, **kw: Any) -> dict[str, Any]:
    return {"env": env, "flag": flag, "help": help_text, **kw}


CPU_SCHEDULING_POLICIES = ("batch", "normal")


@dataclass(frozen=True, slots=True)
class Settings:
    node_id: str = field(metadata=_meta("RAFTKV_ID", "--id", "this node's name, e.g. n1"))
    data_dir: str = field(metadata=_meta("RAFTKV_DATA_DIR", "--data-dir",
                                         "where the node keeps its log and snapshots"))
    http_addr: str = field(default="127.0.0.1:4001", metadata=_meta(
        "RAFTKV_HTTP_ADDR", "--http-addr", "HTTP API listen address host:port"))
    raft_addr: str = field(default="127.0.0.1:5001", metadata=_meta(
        "RAFTKV_RAFT_ADDR", "--raft-addr", "peer (Raft) listen address host:port"))
    http_advertise: str = field(default="", metadata=_meta(
        "RAFTKV_HTTP_ADVERTISE", "--http-advertise",
        "HTTP address others use to reach this node (default: --http-addr); "
        "https://host:port behind a TLS-terminating proxy"))
    raft_advertise: str = field(default="", metadata=_meta(
        "RAFTKV_RAFT_ADVERTISE", "--raft-advertise",
        "peer address others use to reach this node (default: its entry in peers)"))
    peers: str = field(default="", metadata=_meta(
        "RAFTKV_PEERS", "--peers", "static members id=host:port,... (raft addresses, self too)"))
    join: str = field(default="", metadata=_meta(
        "RAFTKV_JOIN", "--join", "HTTP address of a member to join (empty data dir only)"))
    cluster_token: str = field(default="", metadata=_meta(
        "RAFTKV_CLUSTER_TOKEN", "--cluster-token",
        "shared secret for peer connections, the same on every node (required, at least "
        "32 characters: make one with `raftkv token generate`)"))
    cluster_token_file: str = field(default="", metadata=_meta(
        "RAFTKV_CLUSTER_TOKEN_FILE", "--cluster-token-file",
        "a file holding the cluster token (instead of --cluster-token)"))
    tick_ms: int = field(default=50, metadata=_meta(
        "RAFTKV_TICK_MS", "--tick-ms", "Raft tick interval in milliseconds", kind=int))
    election_ticks: int = field(default=20, metadata=_meta(
        "RAFTKV_ELECTION_TICKS", "--election-ticks", "election timeout in ticks", kind=int))
    heartbeat_ticks: int = field(default=2, metadata=_meta(
        "RAFTKV_HEARTBEAT_TICKS", "--heartbeat-ticks", "heartbeat interval in ticks", kind=int))
    snapshot_entries: int = field(default=10_000, metadata=_meta(
        "RAFTKV_SNAPSHOT_ENTRIES", "--snapshot-entries",
        "take a snapshot every N applied entries", kind=int))
    snapshot_trailing: int = field(default=5_000, metadata=_meta(
        "RAFTKV_SNAPSHOT_TRAILING", "--snapshot-trailing",
        "log entries kept behind a snapshot for slow followers", kind=int))
    map_size_mb: int = field(default=1024, metadata=_meta(
        "RAFTKV_MAP_SIZE_MB", "--map-size-mb", "initial LMDB map size (MiB)", kind=int))
    max_map_size_mb: int = field(default=16384, metadata=_meta(
        "RAFTKV_MAX_MAP_SIZE_MB", "--max-map-size-mb",
        "LMDB map size cap (MiB): writes stop with 507 beyond it", kind=int))
    peer_cert_file: str = field(default="", metadata=_meta(
        "RAFTKV_PEER_CERT_FILE", "--peer-cert-file",
        "this node's certificate for the peer port (mutual TLS)"))
    peer_key_file: str = field(default="", metadata=_meta(
        "RAFTKV_PEER_KEY_FILE", "--peer-key-file", "the key of --peer-cert-file"))
    peer_trusted_ca_file: str = field(default="", metadata=_meta(
        "RAFTKV_PEER_TRUSTED_CA_FILE", "--peer-trusted-ca-file",
        "the CA that signs every peer's certificate"))
    peer_tls: str = field(default="", metadata=_meta(
        "RAFTKV_PEER_TLS", "--peer-tls",
        "off, on, migrate-accept or migrate-dial (default: on with certificates, else off)"))
    persist_defer_us: int = field(default=1500, metadata=_meta(
        "RAFTKV_PERSIST_DEFER_US", "--persist-defer-us",
        "how long a leader's fsync may wait for the acks of its previous batch (0: never; "
        "never with RAFTKV_UNSAFE_NO_FSYNC)",
        kind=int))
    http_workers: int = field(default=0, metadata=_meta(
        "RAFTKV_HTTP_WORKERS", "--http-workers",
        "HTTP worker processes (0: one per CPU)", kind=int))
    cpu_scheduling: str = field(default="batch", metadata=_meta(
        "RAFTKV_CPU_SCHEDULING", "--cpu-scheduling",
        "Linux scheduling policy of the node's processes: batch (SCHED_BATCH: a process the "
        "node's other processes wake does not preempt them mid-batch; fewer context "
        "switches when the cores are busy) or normal (SCHED_OTHER)"))
    quota_bytes: int = field(default=0, metadata=_meta(
        "RAFTKV_QUOTA_BYTES", "--quota-bytes",
        "storage quota of the key-value data (bytes; K/M/G/T suffixes, powers of 1024): a "
        "write that would pass it raises the cluster-wide NOSPACE alarm and answers 507 "
        "(default: 2G, or an eighth of the machine's memory if less)", kind="size"))
    max_snapshot_bytes: int = field(default=0, metadata=_meta(
        "RAFTKV_MAX_SNAPSHOT_BYTES", "--max-snapshot-bytes",
        "largest snapshot accepted from the leader (bytes; K/M/G/T suffixes; default: "
        "2 x the quota + 64M)", kind="size"))
    http_head_timeout_ms: int = field(default=10_000, metadata=_meta(
        "RAFTKV_HTTP_HEAD_TIMEOUT_MS", "--http-head-timeout-ms",
        "a client must send a whole request line and headers within this (else 408 and "
        "closed); 0: no deadline", kind=int))
    http_max_connections_per_client: int = field(default=128, metadata=_meta(
        "RAFTKV_HTTP_MAX_CONNECTIONS_PER_CLIENT", "--http-max-connections-per-client",
        "open HTTP connections one client address may hold at each HTTP worker (past it: "
        "503 and closed); 0: no limit", kind=int))
    request_timeout_ms: int = field(default=5000, metadata=_meta(
        "RAFTKV_REQUEST_TIMEOUT_MS", "--request-timeout-ms",
        "default time a request waits for commit", kind=int))
    unsafe_no_fsync: bool = field(default=False, metadata=_meta(
        "RAFTKV_UNSAFE_NO_FSYNC", "--unsafe-no-fsync",
        "UNSAFE: do not fsync (experiments only; acknowledged writes can be lost)", kind=bool))
    root_token_file: str = field(default="", metadata=_meta(
        "RAFTKV_ROOT_TOKEN_FILE", "--root-token-file",
        "file holding the root (admin) token: bootstraps the cluster WITH auth; read at the "
        "first start only, and every first member must be given the same token"))
    join_token_file: str = field(default="", metadata=_meta(
        "RAFTKV_JOIN_TOKEN_FILE", "--join-token-file",
        "file holding an admin token, for RAFTKV_JOIN to a cluster with auth"))
    metrics_open: bool = field(default=False, metadata=_meta(
        "RAFTKV_METRICS_OPEN", "--metrics-open",
        "with auth on, serve /metrics and /status without a token (scrapers on a private "
        "network)", kind=bool))
    log_level: str = field(default="INFO", metadata=_meta(
        "RAFTKV_LOG_LEVEL", "--log-level", "DEBUG, INFO, WARNING or ERROR"))

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        check_cluster_token(self.cluster_token)
        if not self.data_dir:
            raise SettingsError("RAFTKV_DATA_DIR (--data-dir) is required: where this node "
                                "keeps its data")
        if not self.data_dir.strip() or not self.data_dir.isprintable():
            raise SettingsError(f"RAFTKV_DATA_DIR={shown(self.data_dir)}: a path of printable "
                                "characters is expected")
        parse_host_port(self.http_addr, "RAFTKV_HTTP_ADDR")
        parse_host_port(self.raft_addr, "RAFTKV_RAFT_ADDR")
        if self.http_advertise:
            parse_host_port(self.http_advertise.removeprefix("https://").removeprefix(
                "http://"), "RAFTKV_HTTP_ADVERTISE")
        if self.raft_advertise:
            parse_host_port(self.raft_advertise, "RAFTKV_RAFT_ADVERTISE")
        peers = self.peer_map
        if peers and self.node_id not in peers:
            raise SettingsError(f"RAFTKV_PEERS must include this node ({self.node_id}=host:port)")
        if len(peers) > MAX_MEMBERS:
            raise SettingsError(f"RAFTKV_PEERS names {len(peers)} members: a cluster has at "
                                f"most {MAX_MEMBERS}")
        if self.join:
            parse_host_port(without_scheme(self.join), "RAFTKV_JOIN")
        if not 1 <= self.tick_ms <= MAX_TICK_MS:
            raise SettingsError(f"RAFTKV_TICK_MS must be 1..{MAX_TICK_MS}")
        if self.election_ticks * self.tick_ms > MAX_ELECTION_TIMEOUT_MS:
            raise SettingsError(
                f"RAFTKV_ELECTION_TICKS x RAFTKV_TICK_MS is {self.election_ticks * self.tick_ms} "
                f"ms: an election timeout over {MAX_ELECTION_TIMEOUT_MS // 1000} s would leave "
                "a cluster without a leader that long")
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise SettingsError("RAFTKV_ELECTION_TICKS must be greater than "
                                "RAFTKV_HEARTBEAT_TICKS (>= 1)")
        if self.snapshot_entries < 1 or self.snapshot_trailing < 0:
            raise SettingsError("RAFTKV_SNAPSHOT_ENTRIES must be >= 1 and "
                                "RAFTKV_SNAPSHOT_TRAILING >= 0")
        if not 1 <= self.map_size_mb <= self.max_map_size_mb <= MAX_MAP_SIZE_MB:
            raise SettingsError("need 1 <= RAFTKV_MAP_SIZE_MB <= RAFTKV_MAX_MAP_SIZE_MB <= "
                                f"{MAX_MAP_SIZE_MB} (64 TiB)")
        if self.cpu_scheduling not in CPU_SCHEDULING_POLICIES:
            raise SettingsError("RAFTKV_CPU_SCHEDULING must be batch or normal")
        if self.peer_tls and self.peer_tls not in ("off", "on", "migrate-accept",
                                                   "migrate-dial"):
            raise SettingsError("RAFTKV_PEER_TLS must be off, on, migrate-accept or "
                                "migrate-dial")
        if (not self.peer_tls and not self.peer_cert_file
                and (self.peer_key_file or self.peer_trusted_ca_file)):
            raise SettingsError(
                "RAFTKV_PEER_KEY_FILE or RAFTKV_PEER_TRUSTED_CA_FILE is set without "
                "RAFTKV_PEER_CERT_FILE: peer TLS would be off; give all three (or set "
                "RAFTKV_PEER_TLS=off to run without it)")
        if self.peer_tls_mode != "off" and not (self.peer_cert_file and self.peer_key_file
                                                and self.peer_trusted_ca_file):
            raise SettingsError(
                f"peer TLS ({self.peer_tls_mode}) needs RAFTKV_PEER_CERT_FILE, "
                "RAFTKV_PEER_KEY_FILE and RAFTKV_PEER_TRUSTED_CA_FILE (make them with "
                "`raftkv certs init DIR --nodes ...`)")
        if not 0 <= self.persist_defer_us <= 100_000:
            raise SettingsError("RAFTKV_PERSIST_DEFER_US must be 0..100000 (microseconds)")
        if not 0 <= self.http_workers <= 64:
            raise SettingsError("RAFTKV_HTTP_WORKERS must be 0..64 (0: one per CPU)")
        if self.quota_bytes and not MIN_QUOTA_BYTES <= self.quota_bytes <= MAX_QUOTA_BYTES:
            raise SettingsError(
                f"RAFTKV_QUOTA_BYTES={self.quota_bytes}: must be {MIN_QUOTA_BYTES} (1M) to "
                f"{MAX_QUOTA_BYTES} (1T), e.g. 2G; leave it unset for the default")
        if self.quota_bytes < 0:
            raise SettingsError("RAFTKV_QUOTA_BYTES must not be negative")
        if self.max_snapshot_bytes and self.max_snapshot_bytes < self.effective_quota_bytes:
            raise SettingsError(
                f"RAFTKV_MAX_SNAPSHOT_BYTES={self.max_snapshot_bytes} is below the quota "
                f"({self.effective_quota_bytes}): a follower could never take a snapshot of "
                "a full node; raise it or leave it unset (2 x the quota + 64M)")
        if self.max_snapshot_bytes < 0:
            raise SettingsError("RAFTKV_MAX_SNAPSHOT_BYTES must not be negative")
        if not 0 <= self.http_head_timeout_ms <= 3_600_000:
            raise SettingsError("RAFTKV_HTTP_HEAD_TIMEOUT_MS must be 0 (no deadline) to "
                                "3600000; 10000 is a good value")
        if not 0 <= self.http_max_connections_per_client <= 100_000:
            raise SettingsError("RAFTKV_HTTP_MAX_CONNECTIONS_PER_CLIENT must be 0 (no limit) "
                                "to 100000; keep it well under 10000, a worker's connection "
                                "limit, so that one address cannot take them all")
        if not 1 <= self.request_timeout_ms <= MAX_REQUEST_TIMEOUT_MS:
            raise SettingsError(f"RAFTKV_REQUEST_TIMEOUT_MS must be 1..{MAX_REQUEST_TIMEOUT_MS} "
                                "(a request's ?timeout is at most 60 s too)")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError("RAFTKV_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")

    @property
    def peer_tls_mode(self) -> str:
        """The peer TLS mode: as set, else on when a certificate is given, else off."""
        if self.peer_tls:
            return self.peer_tls
        return "on" if self.peer_cert_file else "off"

    @property
    def effective_quota_bytes(self) -> int:
        """quota_bytes, or the default: 2 GiB, or an eighth of the memory if that is less (a
        node's memory for its data stays within about 3x the quota, up to 6x while it
        installs a snapshot from the leader: README, Security and limits)."""
        return self.quota_bytes or default_quota_bytes()

    @property
    def persist_defer_s(self) -> float:
        """How long a leader's save may wait for the acks of its previous batch. The wait
        keeps the one loop thread out of a fsync when they arrive: a node that does not
        fsync (unsafe_no_fsync) has none to keep out of the way."""
        return 0.0 if self.unsafe_no_fsync else self.persist_defer_us / 1e6

    @property
    def effective_max_snapshot_bytes(self) -> int:
        return self.max_snapshot_bytes or 2 * self.effective_quota_bytes + (64 << 20)

    @property
    def peer_map(self) -> dict[str, str]:
        return parse_peers(self.peers)

    @property
    def raft_advertise_addr(self) -> str:
        if self.raft_advertise:
            return self.raft_advertise
        return self.peer_map.get(self.node_id, self.raft_addr)

    @property
    def http_advertise_addr(self) -> str:
        return self.http_advertise or self.http_addr

    @property
    def join_url(self) -> str:
        """http://host:port, or https:// as given (a member behind a TLS-terminating proxy)."""
        j = self.join
        return j if j.startswith(("http://", "https://")) else f"http://{j}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; each falls back to its environment variable."""
    for f in fields(Settings):
        meta = f.metadata
        env = meta["env"]
        if meta.get("kind") is bool:
            parser.add_argument(meta["flag"], dest=f.name, action="store_true", default=None,
                                help=f"{meta['help']} [{env}]")
        else:
            parser.add_argument(meta["flag"], dest=f.name, default=None,
                                help=f"{meta['help']} [{env}]")


def _convert(raw: str, kind: Callable[[str], object] | str | None, env: str) -> object:
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("", "0", "false", "no", "off"):
            return False
        raise SettingsError(f"{env}={shown(raw)}: expected true or false")
    if kind is int:
        text = raw.strip()
        number = parse_decimal(text.removeprefix("-"), MAX_SIZE_BYTES)
        if number is None:
            raise SettingsError(f"{env}={shown(raw)}: expected a whole number")
        return -number if text.startswith("-") else number
    if kind == "size":
        return parse_size(raw, env)
    return raw


def from_sources(args: argparse.Namespace | None, environ: Mapping[str, str]) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    values: dict[str, object] = {}
    missing: list[str] = []
    for f in fields(Settings):
        meta = f.metadata
        raw: object = getattr(args, f.name, None) if args is not None else None
        if raw is None and meta["env"] in environ:
            raw = environ[meta["env"]]
        if raw is None:
            if f.default is MISSING:
                missing.append(f"{meta['flag']} / {meta['env']}")
            continue
        values[f.name] = (_convert(raw, meta.get("kind"), meta["env"])
                          if isinstance(raw, str) else raw)
    if missing:
        raise SettingsError("missing required settings: " + ", ".join(missing))
    token_file = values.get("cluster_token_file")
    if token_file:
        if values.get("cluster_token"):
            raise SettingsError("both RAFTKV_CLUSTER_TOKEN and RAFTKV_CLUSTER_TOKEN_FILE are "
                                "set: give the token one way only")
        values["cluster_token"] = read_token_file(str(token_file))
    return Settings(**values)  # type: ignore[arg-type]


def from_env() -> Settings:
    return from_sources(None, os.environ)
