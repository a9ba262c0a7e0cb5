"""What the HTTP layer (and the CLI) may ask of a node: the KVService protocol.

`raftkv.runtime` implements it; `raftkv.http` only calls it and maps its typed errors to
statuses in one table. Nothing here knows about Raft internals or HTTP.

Leases (raftkv.kv.leases has the rules): a lease has an id (the index of the entry that
granted it), a TTL in whole seconds, and keys attached to it; when it expires (decided by the
leader, carried out as a log entry) or is revoked, its keys are deleted in one entry. Grants,
revokes and attaching writes are log entries like any write; keepalives are not: the leader
restarts the lease's TTL and answers once a quorum confirmed its leadership.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from raftkv.auth import Authorizer, Role

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1 << 20
MAX_BATCH_OPS = 1024
"""Operations in one atomic batch (one log entry); raftkv.kv.commands enforces the same."""
MIN_LEASE_TTL_S = 2
MAX_LEASE_TTL_S = 9_000_000_000
"""Lease TTLs in whole seconds; raftkv.kv.commands enforces the same bounds (see its
MIN_LEASE_TTL_S for why 2 s); a node whose election timeout is longer refuses TTLs below its
own floor (raftkv.kv.leases.min_lease_ttl_s; the HTTP app's 400 invalid_field)."""
MAX_LEASE_ID = 2**63 - 1
MAX_LEASE_KEYS_SHOWN = 1000
"""Keys listed with one lease (LeaseInfo.keys); `key_count` says how many it has."""


class Consistency(enum.Enum):
    LINEARIZABLE = "linearizable"
    """ReadIndex: confirmed by a quorum, served once applied (any node)."""
    LEADER = "leader"
    """The leader's local state, without a quorum round (may be stale across a partition)."""
    STALE = "stale"
    """This node's local state, whatever its role."""


@dataclass(frozen=True, slots=True)
class ReadResult:
    value: object
    index: int
    """The index of the write that produced the value."""
    lease: int | None = None
    """The lease the key is attached to, if any."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    value: object
    index: int
    lease: int | None = None
    """The lease the key is attached to now (a put's `lease`, or the lease its `ttl_s`
    granted: then its id is `index`); None: none."""


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: bool
    index: int


@dataclass(frozen=True, slots=True)
class BatchOp:
    op: str  # "put" | "delete"
    key: str
    value: object = None
    prev_index: int | None = None
    lease: int | None = None
    """A put's lease (an existing one: a batch cannot grant a lease of its own)."""

    def __post_init__(self) -> None:
        if self.op not in ("put", "delete"):
            raise InvalidRequestError(f"unknown batch op {self.op!r}: use put or delete")
        if self.op == "delete" and self.lease is not None:
            raise InvalidRequestError("a delete carries no lease")


@dataclass(frozen=True, slots=True)
class BatchResult:
    index: int
    results: tuple[WriteResult | DeleteResult, ...]


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: object
    index: int


@dataclass(frozen=True, slots=True)
class LeaseGrantResult:
    lease_id: int
    """The index of the entry that granted the lease."""
    ttl_s: int
    index: int
    """The index of the grant (= lease_id)."""


@dataclass(frozen=True, slots=True)
class LeaseRevokeResult:
    lease_id: int
    index: int
    """The index of the revoke: every key of the lease was deleted at this index."""


@dataclass(frozen=True, slots=True)
class LeaseKeepAliveResult:
    lease_id: int
    ttl_s: int
    """The lease's TTL: it lives at least this long from when the keepalive was sent."""


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    lease_id: int
    ttl_s: int
    remaining_s: float
    """Seconds left by the leader's clock (0 while its expiry is being carried out)."""
    keys: tuple[str, ...]
    """Attached keys, sorted, at most MAX_LEASE_KEYS_SHOWN (none in a list of leases)."""
    key_count: int


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    raft_address: str
    http_address: str | None
    voter: bool
    leader: bool


@dataclass(frozen=True, slots=True)
class NodeStatus:
    id: str
    role: str
    term: int
    leader: str | None
    commit_index: int
    applied_index: int
    last_index: int
    snapshot_index: int
    members: tuple[Member, ...]
    cluster_id: str
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WatchResult:
    """How a watch of one key ended (GET /keys/<key>/?wait=true).

    changed: the key changed at `index`, after the index the watch started from; or False:
    the wait ran out and this is the key's current state. deleted: the key does not exist (for
    a change, `index` is the delete's; otherwise the node's applied index), `value` is None.
    """

    key: str
    value: object
    index: int
    deleted: bool
    changed: bool


@dataclass(frozen=True, slots=True)
class Backup:
    """A consistent snapshot of the state machine at `index`, as a stream of chunks.

    `checksum` (hex, of `checksum_algorithm`) and `length_bytes` describe the concatenated
    chunks. Iterate `chunks` once; closing it (if it has close()) frees what it holds.
    """

    index: int
    checksum: str
    length_bytes: int
    chunks: Iterator[bytes]
    checksum_algorithm: str = "blake2b-256"


# --------------------------------------------------------------------------- tokens
@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as listed: never its secret."""

    token_id: str
    role: Role
    prefixes: tuple[str, ...]
    """Key prefixes it is limited to; empty: every key."""
    created_index: int


@dataclass(frozen=True, slots=True)
class TokenCreateResult:
    token_id: str
    token: str
    """The secret: shown in this answer only; the cluster keeps only its digest."""
    role: Role
    prefixes: tuple[str, ...]
    index: int


@dataclass(frozen=True, slots=True)
class TokenRevokeResult:
    token_id: str
    index: int
    """From this index on, every node refuses the token once it applied the entry."""


@dataclass(frozen=True, slots=True)
class Alarm:
    """A raised NOSPACE alarm (replicated: the same on every node)."""

    node_id: str
    """The node that raised it."""
    cause: str
    """quota (the state machine reached RAFTKV_QUOTA_BYTES), map_full (the node's LMDB map
    is at its maximum size) or disk_full (its disk has no room)."""
    index: int
    """The log index of the entry that raised it."""


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str


# --------------------------------------------------------------------------- errors
class ServiceError(Exception):
    """Base of every error a KVService raises on purpose. `code` is stable: it names the
    class across processes (error_from_code) and in the HTTP error table."""

    code = "internal_error"

    def __init__(self, message: str, *, leader: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.leader = leader
        """The leader's HTTP address, when known (a hint for clients)."""

    def details(self) -> dict[str, object]:
        """The fields beyond the message that travel with the error (error_from_code)."""
        return {}


class InvalidRequestError(ServiceError):
    code = "invalid_request"


class KeyNotFoundError(ServiceError):
    code = "key_not_found"


class LeaseNotFoundError(ServiceError):
    """The lease does not exist: never granted, revoked, or expired (a keepalive of a lease
    whose expiry is under way gets this too). A write naming it applied nothing."""

    code = "lease_not_found"

    def __init__(self, message: str, *, lease_id: int, leader: str | None = None) -> None:
        super().__init__(message, leader=leader)
        self.lease_id = lease_id

    def details(self) -> dict[str, object]:
        return {"lease_id": self.lease_id}


class ConditionFailedError(ServiceError):
    code = "condition_failed"

    def __init__(self, message: str, *, key: str, current_index: int,
                 leader: str | None = None) -> None:
        super().__init__(message, leader=leader)
        self.key = key
        self.current_index = current_index

    def details(self) -> dict[str, object]:
        return {"key": self.key, "current_index": self.current_index}


class NoLeaderError(ServiceError):
    """No leader is known right now; retry shortly (503 + Retry-After)."""

    code = "no_leader"


class NotLeaderError(ServiceError):
    """This node is not the leader and the caller asked not to be forwarded."""

    code = "not_leader"


class OutcomeUnknownError(ServiceError):
    """The write was proposed but its commit was not seen in time: it may or may not apply."""

    code = "commit_timeout"


class ReadTimeoutError(ServiceError):
    code = "read_timeout"


class StorageFullError(ServiceError):
    """The write would add data while the NOSPACE alarm is raised (or would take the state
    past the quota, which raises it): nothing was applied. Reads, deletes and lease revokes
    still work; free space, then disarm the alarm (KVService.disarm_alarms)."""

    code = "storage_full"


def nospace_error(raised: Iterable[tuple[str, str]],
                  leader: str | None = None) -> StorageFullError:
    """The 507 for a write that adds data while the alarms `raised` ((node, cause) pairs)
    stand."""
    which = ", ".join(f"{node}: {cause}" for node, cause in raised) or "just disarmed"
    return StorageFullError(
        f"the cluster's NOSPACE alarm is raised ({which}): writes that add data are refused "
        "on every node; reads, deletes and lease revokes work. Free space (delete keys; for "
        "map_full/disk_full, on that node's disk), then `raftkv alarm disarm`", leader=leader)


class MembershipChangeError(ServiceError):
    """409. `probe`: "mismatch" when a join's probe found something other than the node it
    names at its address (another node id, a certificate not naming it, a node of another
    cluster, no raftkv node): final, where other refusals may pass (a change under way)."""

    code = "membership_change_rejected"

    def __init__(self, message: str, *, probe: str | None = None,
                 leader: str | None = None) -> None:
        super().__init__(message, leader=leader)
        self.probe = probe

    def details(self) -> dict[str, object]:
        return {} if self.probe is None else {"probe": self.probe}


class UnauthenticatedError(ServiceError):
    """No token, or one this node does not know (unknown, revoked, malformed): 401 with
    `WWW-Authenticate: Bearer`. The message never quotes the token."""

    code = "unauthenticated"


class ForbiddenError(ServiceError):
    """The token's role or key prefixes do not allow the request: 403."""

    code = "forbidden"


class TokenNotFoundError(ServiceError):
    code = "token_not_found"


class AuthDisabledError(ServiceError):
    """Token management on a cluster bootstrapped without a root token (auth off)."""

    code = "auth_disabled"


class TokenConflictError(ServiceError):
    """A token change that does not apply: a retried create whose first attempt already made
    the token (its secret was in the first answer only: revoke `token_id` and create another),
    an id collision, too many tokens, or revoking the last admin token."""

    code = "token_conflict"

    def __init__(self, message: str, *, token_id: str | None = None,
                 leader: str | None = None) -> None:
        super().__init__(message, leader=leader)
        self.token_id = token_id

    def details(self) -> dict[str, object]:
        return {} if self.token_id is None else {"token_id": self.token_id}


class UnavailableError(ServiceError):
    """The node is stopping or has stopped after a fatal error."""

    code = "unavailable"


def error_from_code(code: str, message: str, details: dict[str, object],
                    leader: str | None = None) -> ServiceError:
    """The ServiceError another process described by its code (an unknown code, from a
    newer build, becomes UnavailableError: retry, or look at that node's log)."""
    cls = _ERRORS_BY_CODE.get(code) or _error_classes().get(code)
    try:
        if cls is ConditionFailedError:
            key, current = details.get("key"), details.get("current_index")
            if isinstance(key, str) and type(current) is int:
                return ConditionFailedError(message, key=key, current_index=current,
                                            leader=leader)
        elif cls is LeaseNotFoundError:
            lease_id = details.get("lease_id")
            if type(lease_id) is int:
                return LeaseNotFoundError(message, lease_id=lease_id, leader=leader)
        elif cls is TokenConflictError:
            token_id = details.get("token_id")
            return TokenConflictError(message, token_id=token_id if isinstance(token_id, str)
                                      else None, leader=leader)
        elif cls is MembershipChangeError:
            probe = details.get("probe")
            return MembershipChangeError(message, probe=probe if isinstance(probe, str)
                                         else None, leader=leader)
        elif cls is not None:
            return cls(message, leader=leader)
    except TypeError:  # a subclass with other required arguments: see below
        pass
    return UnavailableError(f"{message} ({code})", leader=leader)


def _error_classes() -> dict[str, type[ServiceError]]:
    found: dict[str, type[ServiceError]] = {}
    todo: list[type[ServiceError]] = [ServiceError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found


# --------------------------------------------------------------------------- protocol
class KVService(Protocol):
    def get(self, key: str, consistency: Consistency, timeout_s: float) -> ReadResult:
        """The value of `key`; raises KeyNotFoundError when absent."""
        ...

    def list_keys(self, prefix: str, limit: int, consistency: Consistency,
             timeout_s: float) -> list[KeyValue]: ...

    def put(self, key: str, value: object, *, prev_index: int | None = None,
            lease: int | None = None, ttl_s: int | None = None,
            request_id: str | None = None, timeout_s: float) -> WriteResult:
        """Committed and applied on return. prev_index: CAS (0 = only if absent).

        StorageFullError while the NOSPACE alarm is raised, or when the write would take the
        state machine past the quota (checked before the write is proposed: that raises the
        alarm, through the log); the same for batch (with a put) and lease_grant.

        lease: attach the key to this lease (LeaseNotFoundError, nothing applied, if it does
        not exist at apply time; the condition is checked first). ttl_s: grant a fresh lease
        of this TTL in the same entry and attach the key (its id is the write's index). At
        most one of the two; with neither, a key attached to a lease is detached from it.
        """
        ...

    def delete(self, key: str, *, prev_index: int | None = None,
               request_id: str | None = None, timeout_s: float) -> DeleteResult: ...

    def batch(self, ops: list[BatchOp], *, request_id: str | None = None,
              timeout_s: float) -> BatchResult:
        """All ops applied atomically at one index, or none (ConditionFailedError, or
        LeaseNotFoundError when a put names a lease that does not exist)."""
        ...

    # ------------------------------------------------------------------ leases
    def lease_grant(self, ttl_s: int, *, request_id: str | None = None,
                    timeout_s: float) -> LeaseGrantResult:
        """Grant a lease of ttl_s seconds: a log entry, proposed through the leader (any node
        forwards it) and answered once committed and applied, like put. Its TTL runs from
        when the leader applies it. InvalidRequestError for a TTL the node refuses."""
        ...

    def lease_revoke(self, lease_id: int, *, request_id: str | None = None,
                     timeout_s: float) -> LeaseRevokeResult:
        """Revoke the lease and delete its keys, in one log entry (proposed like put).
        LeaseNotFoundError if it does not exist when the entry applies (a retry with the
        same request id gets the first answer)."""
        ...

    def lease_keepalive(self, lease_id: int, *, timeout_s: float) -> LeaseKeepAliveResult:
        """Restart the lease's TTL. Not a log entry: a follower forwards it to the leader;
        the leader restarts its timer (LeaseExpiry.keepalive) and answers only after a quorum
        confirmed its leadership AFTER that (a ReadIndex round), and only once it has applied
        an entry of its own term (NoLeaderError before: retry). LeaseNotFoundError if the
        lease does not exist or is expiring. The caller may count on the lease living until
        it sent this request + ttl_s."""
        ...

    def lease(self, lease_id: int, *, timeout_s: float) -> LeaseInfo:
        """One lease with its keys (sorted, at most MAX_LEASE_KEYS_SHOWN) and remaining time.
        Answered by the leader (a follower forwards it) after a read barrier, like a
        linearizable read; `remaining_s` is by the leader's clock. LeaseNotFoundError if it
        does not exist."""
        ...

    def leases(self, limit: int, *, timeout_s: float) -> list[LeaseInfo]:
        """Up to `limit` leases in id order, without their keys (`key_count`), answered by
        the leader like `lease`."""
        ...

    def is_leader(self) -> bool: ...

    def leader_http_address(self) -> str | None: ...

    def status(self) -> NodeStatus: ...

    def readiness(self) -> Readiness: ...

    def members(self) -> list[Member]: ...

    def join(self, node_id: str | None, raft_address: str, *, voter: bool = True,
             timeout_s: float) -> int:
        """Add a member through Raft; returns the index of the change. Without a node id
        the node listening at raft_address is asked for its id."""
        ...

    def remove(self, node_id: str, *, timeout_s: float) -> int: ...

    def transfer_leadership(self, target: str | None, *, timeout_s: float) -> str:
        """Hand leadership to `target` (or the most caught-up voter); returns the new
        leader's id once it leads."""
        ...

    # ------------------------------------------------------------------ alarms
    def alarms(self) -> list[Alarm]:
        """The raised NOSPACE alarms (this node's applied state: no quorum round), oldest
        first; empty when writes are accepted."""
        ...

    def disarm_alarms(self, *, timeout_s: float) -> int:
        """Clear every alarm through the log (an AlarmDisarm entry, proposed like a write);
        returns its index once applied. If the state is still over the quota, the next write
        that adds data raises the alarm again."""
        ...

    def backup(self, consistency: Consistency, timeout_s: float) -> Backup:
        """A snapshot of this node's state machine, taken at its applied index after the
        read barrier `consistency` asks for (linearizable: everything acknowledged before the
        call is in it)."""
        ...

    # ------------------------------------------------------------------ tokens
    def authorizer(self) -> Authorizer:
        """The current token table as an Authorizer, answered from this process's own copy
        (never a round trip: it is asked once per request). Auth off: `enabled` is False. A
        multi-process node pushes the table (raftkv.auth.TokenTable, digests only) from its
        Raft process to every HTTP worker whenever it changes (its `version` grows)."""
        ...

    def caught_up_authorizer(self, timeout_s: float) -> Authorizer:
        """The token table after a linearizable read barrier, as an Authorizer: it holds
        every token created (anywhere in the cluster) before this call, which the local copy
        of `authorizer()` may not yet (a token made through another node a moment ago, not
        applied or pushed here yet). Asked only for a bearer the local copy does not know;
        ReadTimeoutError / NoLeaderError when the barrier cannot be had, UnavailableError
        when the Raft process is gone or answers a malformed table."""
        ...

    def token_create(self, role: Role, prefixes: tuple[str, ...], *,
                     request_id: str | None = None, timeout_s: float) -> TokenCreateResult:
        """Make a secret and an id HERE, propose the token (digest only) like a write, and
        answer once applied. AuthDisabledError when auth is off; TokenConflictError for a
        retry whose first attempt made the token (see there)."""
        ...

    def token_revoke(self, token_id: str, *, request_id: str | None = None,
                     timeout_s: float) -> TokenRevokeResult:
        """Revoke a token (a log entry); TokenNotFoundError if there is none with that id,
        TokenConflictError for the last admin token, AuthDisabledError when auth is off."""
        ...

    def tokens(self, consistency: Consistency, timeout_s: float) -> list[TokenInfo]:
        """Every token (no secrets), in creation order, after the read barrier
        `consistency` asks for."""
        ...

    def watch(self, key: str, after_index: int | None, timeout_s: float) -> WatchResult:
        """Wait until `key` changes at an index > after_index (None: the node's applied
        index now), or until timeout_s passes; see WatchResult. Served from this node's
        applied state, whatever its role."""
        ...


_ERRORS_BY_CODE: dict[str, type[ServiceError]] = _error_classes()
