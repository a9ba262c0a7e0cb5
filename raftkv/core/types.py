"""Values the Raft core works with: entries, hard state, membership, snapshots, reads.

Everything here is an immutable value validated on construction (h11 style), so a
bad value fails where it is made rather than deep inside the protocol.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

NodeId = str


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class EntryKind(enum.IntEnum):
    NORMAL = 0
    """Application data; empty data is the leader's no-op."""
    CONF_CHANGE = 1
    """A single-server membership change carried in `Entry.change`."""


class ConfChangeOp(enum.IntEnum):
    ADD_VOTER = 0
    """Add a voter, or promote a learner to voter."""
    ADD_LEARNER = 1
    REMOVE = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    op: ConfChangeOp
    node_id: NodeId
    address: str = ""
    """Opaque to the core: where the runtime can reach the node."""

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("ConfChange needs a node id")


@dataclass(frozen=True, slots=True)
class Membership:
    voters: frozenset[NodeId]
    learners: frozenset[NodeId] = frozenset()

    def __post_init__(self) -> None:
        if self.voters & self.learners:
            raise ValueError("a node cannot be both voter and learner")

    @property
    def members(self) -> frozenset[NodeId]:
        return self.voters | self.learners

    def has_room_for(self, nid: NodeId, limit: int) -> bool:
        """Whether `nid` may be in it without it having more than `limit` members (a member
        takes no more room; one already past the limit may still shrink, never grow)."""
        return nid in self.members or len(self.members) < limit

    def apply(self, change: ConfChange) -> Membership:
        """The membership after `change`; raises ValueError if it cannot apply."""
        nid = change.node_id
        if change.op is ConfChangeOp.ADD_VOTER:
            return Membership(self.voters | {nid}, self.learners - {nid})
        if change.op is ConfChangeOp.ADD_LEARNER:
            if nid in self.voters:
                raise ValueError(f"{nid} is a voter; demotion is not supported")
            return Membership(self.voters, self.learners | {nid})
        if nid not in self.members:
            raise ValueError(f"{nid} is not a member")
        voters = self.voters - {nid}
        if not voters:
            raise ValueError("cannot remove the last voter")
        return Membership(voters, self.learners - {nid})


ENTRY_HEAD_BYTES = 16
"""What Entry.size_bytes counts for an entry besides its data or change."""


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""
    change: ConfChange | None = None

    def __post_init__(self) -> None:
        if self.index < 1 or self.term < 1:
            raise ValueError(f"bad entry position index={self.index} term={self.term}")
        if (self.kind is EntryKind.CONF_CHANGE) != (self.change is not None):
            raise ValueError("a conf change entry carries a change and nothing else does")
        if self.change is not None and self.data:
            # No node makes one (the core, the bootstrap entries): from a peer or the disk it
            # is a DecodeError (raftkv.codec), and size_bytes need not count its data.
            raise ValueError("a conf change entry carries no data")

    @property
    def size_bytes(self) -> int:
        """The core's measure of the entry, the unit of Config's byte bounds: its data, or
        its change's node id and address (UTF-8; such an entry has no data), and 16 bytes
        for the rest."""
        c = self.change
        if c is None:
            return len(self.data) + ENTRY_HEAD_BYTES
        return (len(c.node_id.encode("utf-8", "surrogatepass"))
                + len(c.address.encode("utf-8", "surrogatepass")) + ENTRY_HEAD_BYTES)


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a crash: term, vote, and (lazily) the commit index."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int
    term: int
    membership: Membership

    def __post_init__(self) -> None:
        if self.index < 0 or self.term < 0 or (self.index == 0) != (self.term == 0):
            raise ValueError(f"bad snapshot position index={self.index} term={self.term}")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A published snapshot as the core knows it: its place in the log, its size and the
    checksum of its bytes (raftkv.core.snapshots.CHECKSUM_ALGORITHM, hex). The bytes stay in
    the driver's snapshot store (see raftkv.core.snapshots); index 0 is "no snapshot"."""

    meta: SnapshotMeta
    length: int = 0
    checksum: str = ""

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"bad snapshot length {self.length}")


@dataclass(frozen=True, slots=True)
class ReadState:
    """A read that became safe: serve it once the state machine applied `index`."""

    request_id: int
    index: int


@dataclass(frozen=True, slots=True)
class SoftState:
    role: Role
    leader: NodeId | None
    term: int
