"""Messages between Raft peers. Every message carries the sender's term, `frm` and `to`."""

from __future__ import annotations

from dataclasses import dataclass, field

from raftkv.core.types import Entry, NodeId, SnapshotMeta


@dataclass(frozen=True, slots=True)
class VoteRequest:
    term: int
    frm: NodeId
    to: NodeId
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    transfer: bool = False
    """Sent because of a leadership transfer: voters skip the leader-lease check."""


@dataclass(frozen=True, slots=True)
class VoteResponse:
    term: int
    frm: NodeId
    to: NodeId
    granted: bool
    pre_vote: bool = False


@dataclass(frozen=True, slots=True)
class AppendRequest:
    term: int
    frm: NodeId
    to: NodeId
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class AppendResponse:
    term: int
    frm: NodeId
    to: NodeId
    success: bool
    index: int
    """On success the last index known to match; on rejection the rejected prev_index."""
    hint_index: int = 0
    hint_term: int = 0
    """On rejection: the follower's best guess of where the logs may agree (fast backtracking)."""


@dataclass(frozen=True, slots=True)
class HeartbeatRequest:
    term: int
    frm: NodeId
    to: NodeId
    commit: int
    read_seq: int = 0


@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    term: int
    frm: NodeId
    to: NodeId
    read_seq: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """One chunk of a snapshot; `done` marks the last one. Every chunk carries the whole
    snapshot's `length` and `checksum` (raftkv.core.snapshots), which the follower checks
    (length against its cap at once, the checksum once every byte is in)."""

    term: int
    frm: NodeId
    to: NodeId
    meta: SnapshotMeta
    offset: int
    data: bytes = field(repr=False)
    done: bool
    length: int
    checksum: str


@dataclass(frozen=True, slots=True)
class SnapshotResponse:
    term: int
    frm: NodeId
    to: NodeId
    snapshot_index: int
    next_offset: int
    """The offset the follower expects next; -1 when it refuses the snapshot (too large, bad
    checksum or format): the leader backs off before it offers a snapshot again."""
    done: bool = False


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    term: int
    frm: NodeId
    to: NodeId


@dataclass(frozen=True, slots=True)
class ReadIndexRequest:
    term: int
    frm: NodeId
    to: NodeId
    request_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReadIndexResponse:
    term: int
    frm: NodeId
    to: NodeId
    request_ids: tuple[int, ...]
    index: int
    """The read index, or -1 when the leader could not serve the reads."""


Message = (
    VoteRequest
    | VoteResponse
    | AppendRequest
    | AppendResponse
    | HeartbeatRequest
    | HeartbeatResponse
    | SnapshotRequest
    | SnapshotResponse
    | TimeoutNow
    | ReadIndexRequest
    | ReadIndexResponse
)

MESSAGE_TYPES: tuple[type[Message], ...] = (
    VoteRequest,
    VoteResponse,
    AppendRequest,
    AppendResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    ReadIndexRequest,
    ReadIndexResponse,
)
