"""A small typed client of the raftkv HTTP API (used by the CLI, the tests and the benchmarks).

    with Client(["http://127.0.0.1:8001", "http://127.0.0.1:8002"]) as kv:
        kv.put("greeting", {"hello": "world"})
        kv.get("greeting").value

Any node will do: followers forward writes. The client keeps one keep-alive connection per
node and prefers the node that was last named as the leader (the `leader` hint of error
bodies). Failures that are worth retrying are retried with jittered exponential backoff,
bounded both in attempts (`retries`) and in total time (`retry_budget_s`):

- connection errors, 503 (no leader yet, not leader, unavailable) and 504 `read_timeout`;
- 504 `commit_timeout` ("outcome unknown") of key writes and batches. Every such write carries
  an `Idempotency-Key` (a uuid4) that is the same for every retry of one call, so a write the
  cluster already applied is not applied twice.

Membership changes carry no key, so they are resent only when the request surely did not reach
the server. When the client gives up on a write that may have reached the cluster it raises
`OutcomeUnknown`, never a plain failure.

Leases: `lease_grant`, `lease_keepalive`, `lease_revoke`, `leases`, `lease`, and `put(...,
lease=, ttl=)`. Keepalives are resent like reads (restarting a TTL twice is harmless). On top of
them, `lock()` and `election()` (raftkv.coordination) give a mutual-exclusion lock with a
fencing token and a leader election, and `watch()` waits for a key to change.

Auth: `Client(urls, token=...)` sends `Authorization: Bearer <token>` with every request (a
cluster bootstrapped without a root token ignores it). 401 raises `Unauthenticated`, 403
`Forbidden`; neither is retried. Tokens are managed with `token_create`, `tokens` and
`token_revoke` (an admin token's job). Behind a TLS-terminating proxy, give `https://` URLs
and an `ssl_context` (its CA, and the client certificate the proxy asks for).

A Client is NOT thread-safe: its connections and its leader preference belong to one thread at
a time. Give each thread its own, e.g. `client.clone()`.
"""

from __future__ import annotations

import builtins
import contextlib
import http.client
import json
import random
import ssl
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlencode, urlsplit

from raftkv.auth import Role
from raftkv.digits import MAX_INT64, parse_decimal, reject_json_constant
from raftkv.service import (
    Alarm,
    BatchOp,
    BatchResult,
    Consistency,
    DeleteResult,
    KeyValue,
    LeaseGrantResult,
    LeaseInfo,
    LeaseKeepAliveResult,
    LeaseRevokeResult,
    Member,
    NodeStatus,
    ReadResult,
    TokenCreateResult,
    TokenInfo,
    TokenRevokeResult,
    WatchResult,
    WriteResult,
)

if TYPE_CHECKING:
    from raftkv.coordination import Election, Lock

__all__ = [
    "BadRequest",
    "Client",
    "ClientError",
    "ConditionFailed",
    "Forbidden",
    "KeyNotFound",
    "LeaseNotFound",
    "OutcomeUnknown",
    "SnapshotDownload",
    "StorageFull",
    "TokenConflict",
    "Unauthenticated",
    "Unavailable",
]

MAX_SERVER_TIMEOUT_S: Final = 60.0
"""The server refuses longer waits."""
_SOCKET_SLACK_S: Final = 1.0
"""How much longer than the server's wait the socket waits for the answer."""
_MAX_NODES: Final = 64
"""Leader hints may name nodes the client was not given; the list of known nodes is bounded."""
_SEPARATORS: Final = (",", ":")


# --------------------------------------------------------------------------- errors
class ClientError(Exception):
    """A request failed. `status` is the HTTP status (0 when no answer came), `code` the
    server's stable error code (or the client's own, e.g. `connection_failed`), `body` the
    decoded error body ({} when there was none)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "client_error",
                 body: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body: dict[str, Any] = dict(body or {})

    @property
    def leader(self) -> str | None:
        """The leader's HTTP address, as hinted by the server."""
        leader = self.body.get("leader")
        return leader if isinstance(leader, str) and leader else None

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status else ""
        return f"{where}{self.code}: {self.message}"


class BadRequest(ClientError):
    """The request is wrong (400, 413, 415, or refused by the client before sending)."""


class KeyNotFound(ClientError):
    pass


class LeaseNotFound(ClientError):
    """The lease does not exist (never granted, revoked, or expired); a write naming it
    applied nothing."""

    @property
    def lease_id(self) -> int | None:
        lease = self.body.get("lease")
        return lease if isinstance(lease, int) else None


class ConditionFailed(ClientError):
    """A compare-and-swap (prev_index) did not hold; `current_index` is the key's index."""

    def __init__(self, message: str, *, current_index: int, status: int = 409,
                 code: str = "condition_failed", body: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, status=status, code=code, body=body)
        self.current_index = current_index


class OutcomeUnknown(ClientError):
    """A write may or may not have been applied (it was sent, and no answer said which)."""


class Unavailable(ClientError):
    """No node could serve the request in time: unreachable, no leader, or read timeout."""


class StorageFull(ClientError):
    pass


class Unauthenticated(ClientError):
    """401: the cluster requires a token, and none or an unknown (or revoked) one was sent."""


class Forbidden(ClientError):
    """403: the token's role or key prefixes do not allow this request."""


class TokenConflict(ClientError):
    """409 token_conflict: e.g. revoking the last admin token; or a retried create whose first
    attempt made a token (`token_id`) whose secret is lost (token_create handles that one)."""

    @property
    def token_id(self) -> str | None:
        token_id = self.body.get("id")
        return token_id if isinstance(token_id, str) else None


def _error_from(status: int, body: Mapping[str, Any]) -> ClientError:
    raw_code = body.get("error")
    code = raw_code if isinstance(raw_code, str) else f"http_{status}"
    raw_message = body.get("message")
    message = raw_message if isinstance(raw_message, str) else f"HTTP {status}"
    if code == "key_not_found":
        return KeyNotFound(message, status=status, code=code, body=body)
    if code == "lease_not_found":
        return LeaseNotFound(message, status=status, code=code, body=body)
    if status == 401:
        return Unauthenticated(message, status=status, code=code, body=body)
    if status == 403:
        return Forbidden(message, status=status, code=code, body=body)
    if code == "token_conflict":
        return TokenConflict(message, status=status, code=code, body=body)
    if code == "condition_failed":
        current = body.get("current_index")
        return ConditionFailed(message, status=status, code=code, body=body,
                               current_index=current if isinstance(current, int) else -1)
    if status == 504 and (body.get("outcome") == "unknown" or code == "commit_timeout"):
        return OutcomeUnknown(message, status=status, code=code, body=body)
    if status in (503, 504):
        return Unavailable(message, status=status, code=code, body=body)
    if status == 507:
        return StorageFull(message, status=status, code=code, body=body)
    if status in (400, 413, 415):
        return BadRequest(message, status=status, code=code, body=body)
    return ClientError(message, status=status, code=code, body=body)


def _bad_response(what: str) -> ClientError:
    return ClientError(f"unexpected answer from the server: {what}", code="bad_response")


@dataclass(frozen=True, slots=True)
class SnapshotDownload:
    """An answer of GET /snapshot being received: iterate `chunks` once, inside the `with`.
    Nothing here checks the bytes: compare their checksum with `checksum` (see
    raftkv.runtime.backup.write_backup)."""

    url: str
    index: int
    checksum: str
    checksum_algorithm: str
    length_bytes: int
    chunks: Iterator[bytes]


# --------------------------------------------------------------------------- internals
@dataclass(frozen=True, slots=True)
class _Node:
    host: str
    port: int
    scheme: str = "http"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    @staticmethod
    def parse(url: str) -> _Node:
        if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
            raise ValueError(f"not an http(s)://host:port URL: {url!r}")
        parts = urlsplit(url if "//" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s)://host:port URL: {url!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        if port is None:
            if parts.netloc.endswith(":"):
                raise ValueError(f"bad port in {url!r}")
            port = 443 if parts.scheme == "https" else 80
        elif port == 0:
            raise ValueError(f"bad port in {url!r}")
        return _Node(parts.hostname, port, parts.scheme)


@dataclass(frozen=True, slots=True)
class _Policy:
    resend: bool
    """The request may be sent again after it may have reached the server (idempotent)."""
    write: bool
    """A request that may have reached the server may have changed the state."""


_READ: Final = _Policy(resend=True, write=False)
_KEYED_WRITE: Final = _Policy(resend=True, write=True)
_UNKEYED_WRITE: Final = _Policy(resend=False, write=True)


class _NotSent(Exception):
    """The request surely did not reach the server (the connection could not be opened)."""


class _MaybeSent(Exception):
    """The connection failed after the request started to go out."""


def _json_bytes(body: object) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False, separators=_SEPARATORS,
                          allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError, RecursionError) as e:  # NaN, a lone surrogate
        raise BadRequest(f"the request cannot be sent as JSON: {e}",
                         code="invalid_value") from None


def _path_part(text: str, what: str) -> str:
    """`text` percent-encoded for a URL path (it must be Unicode text: no lone surrogates,
    which is what undecodable bytes of a command line become)."""
    try:
        return quote(text, safe="")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} is not valid Unicode text", code=f"invalid_{what}") from None


def _int(payload: Mapping[str, Any], name: str) -> int:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_response(f"{name!r} is not an integer")
    return value


def _key_path(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise BadRequest("a key is a non-empty string", code="invalid_key")
    if key.endswith("/"):
        # The server treats a trailing slash as optional, so the path would name another key.
        raise BadRequest("a key ending with '/' cannot be used in a path; use batch()",
                         code="invalid_key")
    return "/keys/" + _path_part(key, "key")


def _write_result(payload: Mapping[str, Any]) -> WriteResult | DeleteResult:
    if "deleted" in payload:
        return DeleteResult(bool(payload["deleted"]), _int(payload, "index"))
    return WriteResult(payload.get("value"), _int(payload, "index"), _lease_of(payload))


def _lease_of(payload: Mapping[str, Any]) -> int | None:
    return _int(payload, "lease") if payload.get("lease") is not None else None


def _lease_info(raw: object) -> LeaseInfo:
    if not isinstance(raw, dict):
        raise _bad_response("a lease is not an object")
    remaining = raw.get("remaining")
    if isinstance(remaining, bool) or not isinstance(remaining, int | float):
        raise _bad_response("'remaining' is not a number")
    keys = raw.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _bad_response("'keys' is not a list of keys")
    return LeaseInfo(_int(raw, "id"), _int(raw, "ttl"), float(remaining), tuple(keys),
                     _int(raw, "key_count"))


def _lease_path(lease_id: int) -> str:
    if isinstance(lease_id, bool) or not isinstance(lease_id, int) or lease_id < 1:
        raise BadRequest("a lease id is an integer >= 1", code="invalid_lease")
    return f"/leases/{lease_id}"


def _member(raw: object) -> Member:
    if not isinstance(raw, dict):
        raise _bad_response("a member is not an object")
    http_address = raw.get("http_address")
    return Member(id=str(raw.get("id")), raft_address=str(raw.get("raft_address")),
                  http_address=http_address if isinstance(http_address, str) else None,
                  voter=bool(raw.get("voter")), leader=bool(raw.get("leader")))


def _members(raw: object) -> builtins.list[Member]:
    if not isinstance(raw, list):
        raise _bad_response("'members' is not a list")
    return [_member(m) for m in raw]


# --------------------------------------------------------------------------- the client
class Client:
    """A raftkv client over keep-alive HTTP connections, one per node. Not thread-safe: use
    one Client per thread (`clone()` makes another with the same settings)."""

    def __init__(self, urls: Sequence[str], timeout_s: float = 5.0, retries: int = 6, *,
                 retry_budget_s: float | None = None, backoff_base_s: float = 0.05,
                 backoff_max_s: float = 1.0, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """`urls`: nodes as `http://host:port` (or `host:port`), or `https://host:port` behind
        a TLS-terminating proxy. `timeout_s`: how long the server may wait for a commit or a
        read (at most 60 s); the socket waits a little longer. `retries`: extra attempts after
        the first. `retry_budget_s`: no new attempt starts after this many seconds (default:
        3 * timeout_s). `token`: sent as `Authorization: Bearer` (never logged or shown).
        `ssl_context`: for https URLs (default: the system's CAs, no client certificate)."""
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("give at least one node URL")
        if not 0 < timeout_s <= MAX_SERVER_TIMEOUT_S:
            raise ValueError(f"timeout_s must be in (0, {MAX_SERVER_TIMEOUT_S:g}]")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self._nodes: builtins.list[_Node] = []
        for url in urls:
            node = _Node.parse(url)
            if node not in self._nodes:
                self._nodes.append(node)
        self._preferred = 0
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_budget_s = 3 * timeout_s if retry_budget_s is None else retry_budget_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._connections: dict[_Node, http.client.HTTPConnection] = {}
        if token is not None and (not token or not token.isascii() or not token.isprintable()
                                  or any(c.isspace() for c in token)):
            raise ValueError("a token is one word of printable ASCII (as `raftkv token create` "
                             "prints it)")
        self._token = token
        self._ssl_context = ssl_context
        self._auth: dict[str, str] = {} if token is None else {
            "Authorization": f"Bearer {token}"}

    # ------------------------------------------------------------------ lifecycle
    @property
    def urls(self) -> builtins.list[str]:
        """Every known node, including those learned from leader hints."""
        return [n.url for n in self._nodes]

    @property
    def preferred_url(self) -> str:
        """The node tried first: the last hinted leader, or the last that answered."""
        return self._nodes[self._preferred].url

    def clone(self, *, timeout_s: float | None = None,
              retry_budget_s: float | None = None) -> Client:
        """A new Client with the same settings (but those given) and leader preference, and
        its own connections (for another thread)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if retry_budget_s is None:
            retry_budget_s = self.retry_budget_s if timeout_s == self.timeout_s else None
        other = Client(self.urls, timeout_s, self.retries,
                       retry_budget_s=retry_budget_s, backoff_base_s=self.backoff_base_s,
                       backoff_max_s=self.backoff_max_s, sleep=self._sleep, token=self._token,
                       ssl_context=self._ssl_context)
        other._preferred = self._preferred
        return other

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ keys
    def get(self, key: str, consistency: str | Consistency = "linearizable") -> ReadResult:
        """The value and index of `key`; raises KeyNotFound when it is absent."""
        level = Consistency(consistency).value
        payload = self._call("GET", _key_path(key), query={"consistency": level}, policy=_READ)
        return ReadResult(payload.get("value"), _int(payload, "index"), _lease_of(payload))

    def put(self, key: str, value: object, prev_index: int | None = None, *,
            lease: int | None = None, ttl: int | None = None) -> WriteResult:
        """Committed and applied on return. `prev_index`: only if the key is still at that
        index (0: only if absent), else ConditionFailed. `lease`: attach the key to that
        lease (LeaseNotFound if it is gone); `ttl`: a fresh lease of the key's own, whose id
        is the result's `lease` (= its index). Without either, the key is detached from any
        lease."""
        body: dict[str, object] = {"value": value}
        if prev_index is not None:
            body["prev_index"] = prev_index
        if lease is not None:
            body["lease"] = lease
        if ttl is not None:
            body["ttl"] = ttl
        payload = self._call("PUT", _key_path(key), body=body, policy=_KEYED_WRITE,
                             idempotency_key=str(uuid.uuid4()))
        return WriteResult(payload.get("value"), _int(payload, "index"), _lease_of(payload))

    def delete(self, key: str, prev_index: int | None = None) -> DeleteResult:
        query = {} if prev_index is None else {"prev_index": str(prev_index)}
        payload = self._call("DELETE", _key_path(key), query=query, policy=_KEYED_WRITE,
                             idempotency_key=str(uuid.uuid4()))
        return DeleteResult(bool(payload.get("deleted")), _int(payload, "index"))

    def batch(self, ops: Sequence[BatchOp]) -> BatchResult:
        """All ops at one index, or none of them (ConditionFailed)."""
        encoded: builtins.list[dict[str, object]] = []
        for op in ops:
            item: dict[str, object] = {"op": op.op, "key": op.key}
            if op.op == "put":
                item["value"] = op.value
            if op.lease is not None:
                item["lease"] = op.lease
            if op.prev_index is not None:
                item["prev_index"] = op.prev_index
            encoded.append(item)
        payload = self._call("POST", "/batch", body={"ops": encoded}, policy=_KEYED_WRITE,
                             idempotency_key=str(uuid.uuid4()))
        results = payload.get("results")
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise _bad_response("'results' is not a list of objects")
        return BatchResult(_int(payload, "index"), tuple(_write_result(r) for r in results))

    def list(self, prefix: str = "", limit: int = 1000,
             consistency: str | Consistency = "linearizable") -> builtins.list[KeyValue]:
        """Up to `limit` keys starting with `prefix`, in key order."""
        query = {"prefix": prefix, "limit": str(limit),
                 "consistency": Consistency(consistency).value}
        payload = self._call("GET", "/keys", query=query, policy=_READ)
        keys = payload.get("keys")
        if not isinstance(keys, list):
            raise _bad_response("'keys' is not a list")
        return [KeyValue(str(kv.get("key")), kv.get("value"), _int(kv, "index"))
                for kv in keys if isinstance(kv, dict)]

    def watch(self, key: str, index: int | None = None,
              timeout_s: float | None = None) -> WatchResult:
        """Wait until `key` changes at an index > `index` (None: the next change), or until
        `timeout_s` (default: the client's timeout; at most 60 s) passes; see WatchResult
        (`changed` False: the wait ran out and this is the key's current state)."""
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        if not 0 < wait_s <= MAX_SERVER_TIMEOUT_S:
            raise ValueError(f"timeout_s must be in (0, {MAX_SERVER_TIMEOUT_S:g}]")
        query = {"wait": "true", "timeout": format(wait_s, "g")}
        if index is not None:
            query["index"] = str(index)
        payload = self._call("GET", _key_path(key), query=query, policy=_READ, wait=False,
                             socket_timeout_s=wait_s + _SOCKET_SLACK_S)
        deleted = bool(payload.get("deleted"))
        return WatchResult(key, None if deleted else payload.get("value"),
                           _int(payload, "index"), deleted, bool(payload.get("changed")))

    # ------------------------------------------------------------------ leases
    def lease_grant(self, ttl: int) -> LeaseGrantResult:
        """A new lease of `ttl` whole seconds (its TTL runs from when the leader applies the
        grant); attach keys with put(..., lease=id)."""
        payload = self._call("POST", "/leases", body={"ttl": ttl}, policy=_KEYED_WRITE,
                             idempotency_key=str(uuid.uuid4()))
        return LeaseGrantResult(_int(payload, "id"), _int(payload, "ttl"),
                                _int(payload, "index"))

    def lease_keepalive(self, lease_id: int) -> LeaseKeepAliveResult:
        """Restart the lease's TTL; LeaseNotFound if it is gone (or expiring). The lease then
        lives at least `ttl_s` seconds from when this call started."""
        payload = self._call("POST", _lease_path(lease_id) + "/keepalive", policy=_READ)
        return LeaseKeepAliveResult(_int(payload, "id"), _int(payload, "ttl"))

    def lease_revoke(self, lease_id: int) -> LeaseRevokeResult:
        """Revoke the lease: its keys are deleted at the returned index."""
        payload = self._call("DELETE", _lease_path(lease_id), policy=_KEYED_WRITE,
                             idempotency_key=str(uuid.uuid4()))
        return LeaseRevokeResult(_int(payload, "id"), _int(payload, "index"))

    def lease(self, lease_id: int) -> LeaseInfo:
        """The lease with its keys (at most 1,000 of them; `key_count` says how many) and the
        seconds it has left by the leader's clock."""
        return _lease_info(self._call("GET", _lease_path(lease_id), policy=_READ))

    def leases(self, limit: int = 1000) -> builtins.list[LeaseInfo]:
        """Up to `limit` leases in id order, without their keys."""
        raw = self._call("GET", "/leases", query={"limit": str(limit)}, policy=_READ)
        leases = raw.get("leases")
        if not isinstance(leases, list):
            raise _bad_response("'leases' is not a list")
        return [_lease_info(lease) for lease in leases]

    def lock(self, name: str, ttl: int = 10) -> Lock:
        """A lock named `name` on a lease of `ttl` seconds: `with client.lock("job") as
        lock:` (see raftkv.coordination.Lock). This client is used from the calling thread
        only; the keepalives use a clone of it."""
        from raftkv.coordination import Lock

        return Lock(self, name, ttl)

    def election(self, name: str, ttl: int = 10) -> Election:
        """A leader election named `name` on a lease of `ttl` seconds (see
        raftkv.coordination.Election)."""
        from raftkv.coordination import Election

        return Election(self, name, ttl)

    # ------------------------------------------------------------------ nodes and cluster
    def status(self, url: str | None = None) -> NodeStatus:
        """The status of the node at `url` (default: the preferred node)."""
        node = None if url is None else _Node.parse(url)
        p = self._call("GET", "/status", policy=_READ, node=node, wait=False)
        extra = p.get("extra")
        try:
            return NodeStatus(
                id=str(p["id"]), role=str(p["role"]), term=_int(p, "term"),
                leader=p.get("leader") if isinstance(p.get("leader"), str) else None,
                commit_index=_int(p, "commit_index"), applied_index=_int(p, "applied_index"),
                last_index=_int(p, "last_index"), snapshot_index=_int(p, "snapshot_index"),
                members=tuple(_members(p.get("members"))), cluster_id=str(p.get("cluster_id")),
                extra=extra if isinstance(extra, dict) else {})
        except KeyError as ex:
            raise _bad_response(f"the status has no {ex.args[0]!r}") from None

    def members(self) -> builtins.list[Member]:
        return _members(self._call("GET", "/cluster", policy=_READ, wait=False).get("members"))

    def join(self, node_id: str | None, address: str, voter: bool = True) -> int:
        """Add the node listening for Raft at `address`; returns the index of the change."""
        body: dict[str, object] = {"address": address, "voter": voter}
        if node_id is not None:
            body["id"] = node_id
        return _int(self._call("POST", "/cluster/join", body=body, policy=_UNKEYED_WRITE),
                    "index")

    def remove(self, node_id: str) -> int:
        path = "/cluster/members/" + _path_part(node_id, "id")
        return _int(self._call("DELETE", path, policy=_UNKEYED_WRITE), "index")

    # ------------------------------------------------------------------ tokens
    def token_create(self, role: str | Role, prefixes: Sequence[str] = ()) -> TokenCreateResult:
        """A new token of `role` (read, write or admin), limited to keys starting with one
        of `prefixes` (none: every key). Its secret is in the result, and nowhere else ever:
        keep it. If a retry finds that an attempt already made a token (whose secret was lost
        with that attempt's answer), that token is revoked and another one made."""
        body = {"role": Role(role).value, "prefixes": builtins.list(prefixes)}
        for attempt in range(3):
            try:
                payload = self._call("POST", "/auth/tokens", body=body, policy=_KEYED_WRITE,
                                     idempotency_key=str(uuid.uuid4()))
            except TokenConflict as e:
                if e.token_id is None or attempt == 2:
                    raise
                self.token_revoke(e.token_id)
                continue
            secret = payload.get("token")
            raw_prefixes = payload.get("prefixes")
            if not isinstance(secret, str) or not isinstance(raw_prefixes, list):
                raise _bad_response("no token in the answer")
            try:
                role = Role(payload.get("role"))
            except ValueError:
                raise _bad_response("the token's role is not one this client knows") from None
            return TokenCreateResult(str(payload.get("id")), secret, role,
                                     tuple(map(str, raw_prefixes)), _int(payload, "index"))
        raise AssertionError("unreachable")

    def tokens(self) -> builtins.list[TokenInfo]:
        """Every token (ids, roles, prefixes, creation indices; never a secret)."""
        payload = self._call("GET", "/auth/tokens", policy=_READ)
        raw = payload.get("tokens")
        if not isinstance(raw, list):
            raise _bad_response("'tokens' is not a list")
        try:
            return [TokenInfo(str(t["id"]), Role(t["role"]), tuple(map(str, t["prefixes"])),
                              _int(t, "created_index")) for t in raw]
        except (KeyError, TypeError, ValueError):
            raise _bad_response("a token is not as expected") from None

    def token_revoke(self, token_id: str) -> TokenRevokeResult:
        """Revoke a token: every node refuses it once it applied the returned index."""
        if not token_id or "/" in token_id:
            raise BadRequest("a token id is a non-empty name", code="invalid_token_id")
        payload = self._call("DELETE", "/auth/tokens/" + _path_part(token_id, "token_id"),
                             policy=_KEYED_WRITE, idempotency_key=str(uuid.uuid4()))
        return TokenRevokeResult(str(payload.get("id")), _int(payload, "index"))

    # ------------------------------------------------------------------ alarms
    def alarms(self) -> builtins.list[Alarm]:
        """The raised NOSPACE alarms (empty: writes are accepted)."""
        raw = self._call("GET", "/alarms", policy=_READ, wait=False).get("alarms")
        if not isinstance(raw, list):
            raise _bad_response("the alarms are not a list")
        try:
            return [Alarm(str(a["node"]), str(a["cause"]), int(a["index"])) for a in raw]
        except (KeyError, TypeError, ValueError):
            raise _bad_response("an alarm is malformed") from None

    def disarm_alarms(self) -> int:
        """Clear every alarm (idempotent, so retried like a keyed write); returns the index
        of the disarm."""
        return _int(self._call("DELETE", "/alarms", policy=_KEYED_WRITE), "index")

    # ------------------------------------------------------------------ backups
    @contextlib.contextmanager
    def download_snapshot(self, consistency: str | Consistency = "linearizable",
                          chunk_bytes: int = 1 << 20) -> Iterator[SnapshotDownload]:
        """GET /snapshot, streamed: `with kv.download_snapshot() as d: for c in d.chunks`.
        Retried (on another node when one is down) like a read until the body starts."""
        query = urlencode({"consistency": Consistency(consistency).value,
                           "timeout": format(self.timeout_s, "g")})
        deadline = time.monotonic() + self.retry_budget_s
        attempt = 0
        while True:
            to = self._nodes[self._preferred]
            connection = self._new_connection(to)
            try:
                try:
                    connection.request("GET", f"/snapshot?{query}", headers=self._auth)
                    response = connection.getresponse()
                    if response.status != 200:
                        raw = response.read()
                except (OSError, http.client.HTTPException) as ex:
                    error: ClientError = Unavailable(f"no snapshot from {to.address}: {ex}",
                                                     code="connection_failed")
                    self._rotate(to)
                else:
                    if response.status == 200:
                        yield _snapshot_download(to, response, chunk_bytes)
                        return
                    error = _error_from(response.status, self._decode(raw, response.status))
                    if not isinstance(error, Unavailable):
                        raise error
                    if not self._follow(error.leader):
                        self._rotate(to)
            finally:
                connection.close()
            attempt += 1
            delay = self._backoff_s(attempt)
            if attempt > self.retries or time.monotonic() + delay >= deadline:
                raise error
            self._sleep(delay)

    # ------------------------------------------------------------------ the retry loop
    def _call(self, method: str, path: str, *, policy: _Policy,
              query: Mapping[str, str] | None = None, body: object = None,
              idempotency_key: str | None = None, node: _Node | None = None,
              wait: bool = True, socket_timeout_s: float | None = None) -> dict[str, Any]:
        params = dict(query or {})
        if wait:
            params["timeout"] = format(self.timeout_s, "g")
        target = path + (f"?{urlencode(params)}" if params else "")
        headers = {"Accept": "application/json", **self._auth}
        data = None
        if body is not None:
            data = _json_bytes(body)
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key

        deadline = time.monotonic() + self.retry_budget_s
        maybe_applied = False
        attempt = 0
        while True:
            to = node or self._nodes[self._preferred]
            moved = False
            try:
                status, payload = self._exchange(to, method, target, data, headers,
                                                 resend=policy.resend,
                                                 socket_timeout_s=socket_timeout_s)
            except _NotSent as ex:
                error: ClientError = Unavailable(f"cannot connect to {to.address}: {ex}",
                                                 code="connection_failed")
                moved = self._rotate(to)
            except _MaybeSent as ex:
                kind = OutcomeUnknown if policy.write else Unavailable
                error = kind(f"no answer from {to.address}: {ex}", code="no_answer")
                maybe_applied = maybe_applied or policy.write
                if not policy.resend:
                    raise error from ex
                moved = self._rotate(to)
            else:
                if status < 300:
                    return payload
                error = _error_from(status, payload)
                moved = self._follow(error.leader) or (
                    error.leader is None and isinstance(error, Unavailable) and self._rotate(to))
                if not self._should_retry(error, policy):
                    raise error
                maybe_applied = maybe_applied or isinstance(error, OutcomeUnknown)

            attempt += 1
            # Following a fresh leader hint to another node is worth an immediate retry.
            delay = 0.0 if moved and attempt == 1 else self._backoff_s(attempt)
            if attempt > self.retries or time.monotonic() + delay >= deadline:
                if maybe_applied and not isinstance(error, OutcomeUnknown):
                    raise OutcomeUnknown(
                        f"gave up after {attempt} attempts; an earlier attempt may have been "
                        f"applied ({error.message})", status=error.status, code="outcome_unknown",
                        body=error.body) from error
                raise error
            if delay > 0:
                self._sleep(delay)

    @staticmethod
    def _should_retry(error: ClientError, policy: _Policy) -> bool:
        if isinstance(error, OutcomeUnknown):
            return policy.resend  # safe only when the server can recognise the retry
        return isinstance(error, Unavailable)  # 503 (nothing applied), 504 read_timeout

    def _backoff_s(self, attempt: int) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (attempt - 1))
        return ceiling * self._rng.uniform(0.5, 1.0)

    def _rotate(self, failed: _Node) -> bool:
        """Prefer the next node after `failed`; True when the preference changed."""
        if failed in self._nodes and len(self._nodes) > 1:
            self._preferred = (self._nodes.index(failed) + 1) % len(self._nodes)
            return True
        return False

    def _follow(self, leader: str | None) -> bool:
        """Prefer the hinted leader (learning its address if new); True when it changed."""
        if leader is None:
            return False
        try:
            node = _Node.parse(leader)
        except ValueError:
            return False
        if node not in self._nodes:
            if len(self._nodes) >= _MAX_NODES:
                return False
            self._nodes.append(node)
        index = self._nodes.index(node)
        changed = index != self._preferred
        self._preferred = index
        return changed

    # ------------------------------------------------------------------ one exchange
    def _new_connection(self, node: _Node) -> http.client.HTTPConnection:
        timeout = self.timeout_s + _SOCKET_SLACK_S
        if node.scheme == "https":
            return http.client.HTTPSConnection(node.host, node.port, timeout=timeout,
                                               context=self._ssl_context)
        return http.client.HTTPConnection(node.host, node.port, timeout=timeout)

    def _connection(self, node: _Node) -> http.client.HTTPConnection:
        connection = self._connections.get(node)
        if connection is None:
            connection = self._new_connection(node)
            self._connections[node] = connection
        return connection

    def _drop(self, node: _Node) -> None:
        connection = self._connections.pop(node, None)
        if connection is not None:
            connection.close()

    def _exchange(self, node: _Node, method: str, target: str, data: bytes | None,
                  headers: Mapping[str, str], *, resend: bool,
                  socket_timeout_s: float | None = None) -> tuple[int, dict[str, Any]]:
        connection = self._connection(node)
        reused = connection.sock is not None
        if not reused:
            try:
                connection.connect()
            except OSError as ex:
                self._drop(node)
                raise _NotSent(str(ex) or type(ex).__name__) from ex
        try:
            if socket_timeout_s is not None and connection.sock is not None:
                connection.sock.settimeout(socket_timeout_s)  # a long poll: wait longer
            connection.request(method, target, body=data, headers=dict(headers))
            response = connection.getresponse()
            raw = response.read()
            if socket_timeout_s is not None and connection.sock is not None:
                connection.sock.settimeout(self.timeout_s + _SOCKET_SLACK_S)
        except (OSError, http.client.HTTPException) as ex:
            self._drop(node)
            stale = isinstance(ex, http.client.RemoteDisconnected | ConnectionResetError
                               | BrokenPipeError)
            if reused and stale and resend:
                # The server closed the idle keep-alive connection: once more on a fresh one.
                return self._exchange(node, method, target, data, headers, resend=False,
                                      socket_timeout_s=socket_timeout_s)
            raise _MaybeSent(str(ex) or type(ex).__name__) from ex
        if response.will_close:
            self._drop(node)
        return response.status, self._decode(raw, response.status)

    @staticmethod
    def _decode(raw: bytes, status: int) -> dict[str, Any]:
        if not raw:
            return {}
        try:
            payload = json.loads(raw, parse_constant=reject_json_constant)
        except (ValueError, RecursionError):
            if status < 300:
                raise _bad_response("the body is not JSON") from None
            return {}  # e.g. a proxy's HTML error page: the status says enough
        if not isinstance(payload, dict):
            raise _bad_response("the body is not a JSON object")
        return payload


def _snapshot_download(node: _Node, response: http.client.HTTPResponse,
                       chunk_bytes: int) -> SnapshotDownload:
    def header_int(name: str) -> int:
        number = parse_decimal(response.getheader(name, ""), MAX_INT64)
        if number is None:
            raise _bad_response(f"header {name} is missing or not a number")
        return number

    checksum = response.getheader("X-Raftkv-Checksum")
    if not checksum:
        raise _bad_response("header X-Raftkv-Checksum is missing")
    return SnapshotDownload(
        url=node.url, index=header_int("X-Raftkv-Index"), checksum=checksum,
        checksum_algorithm=response.getheader("X-Raftkv-Checksum-Algorithm", ""),
        length_bytes=header_int("Content-Length"),
        chunks=iter(lambda: response.read(chunk_bytes), b""))
