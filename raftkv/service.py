"""What the HTTP layer (and the CLI) may ask of a node: the KVService protocol.

`raftkv.runtime` implements it; `raftkv.http` only calls it and maps its typed errors to
statuses in one table. Nothing here knows about Raft internals or HTTP.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1 << 20
MAX_BATCH_OPS = 1024
"""Operations in one atomic batch (one log entry); raftkv.kv.commands enforces the same."""


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


@dataclass(frozen=True, slots=True)
class WriteResult:
    value: object
    index: int


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

    def __post_init__(self) -> None:
        if self.op not in ("put", "delete"):
            raise InvalidRequestError(f"unknown batch op {self.op!r}: use put or delete")


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


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str


# --------------------------------------------------------------------------- errors
class ServiceError(Exception):
    """Base of every error a KVService raises on purpose. `code` is stable."""

    code = "internal_error"

    def __init__(self, message: str, *, leader: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.leader = leader
        """The leader's HTTP address, when known (a hint for clients)."""


class InvalidRequestError(ServiceError):
    code = "invalid_request"


class KeyNotFoundError(ServiceError):
    code = "key_not_found"


class ConditionFailedError(ServiceError):
    code = "condition_failed"

    def __init__(self, message: str, *, key: str, current_index: int,
                 leader: str | None = None) -> None:
        super().__init__(message, leader=leader)
        self.key = key
        self.current_index = current_index


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
    code = "storage_full"


class MembershipChangeError(ServiceError):
    code = "membership_change_rejected"


class UnavailableError(ServiceError):
    """The node is stopping or has stopped after a fatal error."""

    code = "unavailable"


# --------------------------------------------------------------------------- protocol
class KVService(Protocol):
    def get(self, key: str, consistency: Consistency, timeout_s: float) -> ReadResult:
        """The value of `key`; raises KeyNotFoundError when absent."""
        ...

    def list_keys(self, prefix: str, limit: int, consistency: Consistency,
             timeout_s: float) -> list[KeyValue]: ...

    def put(self, key: str, value: object, *, prev_index: int | None = None,
            request_id: str | None = None, timeout_s: float) -> WriteResult:
        """Committed and applied on return. prev_index: CAS (0 = only if absent)."""
        ...

    def delete(self, key: str, *, prev_index: int | None = None,
               request_id: str | None = None, timeout_s: float) -> DeleteResult: ...

    def batch(self, ops: list[BatchOp], *, request_id: str | None = None,
              timeout_s: float) -> BatchResult:
        """All ops applied atomically at one index, or none (ConditionFailedError)."""
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

    def backup(self, consistency: Consistency, timeout_s: float) -> Backup:
        """A snapshot of this node's state machine, taken at its applied index after the
        read barrier `consistency` asks for (linearizable: everything acknowledged before the
        call is in it)."""
        ...

    def watch(self, key: str, after_index: int | None, timeout_s: float) -> WatchResult:
        """Wait until `key` changes at an index > after_index (None: the node's applied
        index now), or until timeout_s passes; see WatchResult. Served from this node's
        applied state, whatever its role."""
        ...
