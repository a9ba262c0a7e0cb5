"""Settings of one Raft node. Units are last in names: ticks, bytes, counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from raftkv.core.types import NodeId

MAX_MEMBERS: Final = 256
"""The default Config.max_members, and the most members a bootstrap may name."""


@dataclass(frozen=True, slots=True)
class Config:
    node_id: NodeId
    election_timeout_ticks: int = 10
    """A follower campaigns after a random timeout in [this, 2 * this) ticks."""
    heartbeat_interval_ticks: int = 1
    max_append_entries: int = 512
    max_append_bytes: int = 1 << 20
    """Entries in one AppendRequest: at most max_append_entries, whose Entry.size_bytes add up
    to at most this, or one entry alone when it is larger (etcd-io/raft's MaxSizePerMsg)."""
    max_entry_bytes: int = 8 << 20
    """The largest entry (Entry.size_bytes) this node appends as the leader: a larger proposal
    raises ProposalTooLarge. With max_append_bytes and snapshot_chunk_bytes it bounds every
    message the node sends (raftkv.codec.raft_message_bound), which must fit in one frame to
    a peer: the peer would close the link on a larger frame, so the link refuses to send one
    (and logs it), and a follower that needs that message would stall."""
    max_inflight_appends: int = 64
    """Window of AppendRequests in flight to one follower in the replicate state."""
    snapshot_chunk_bytes: int = 1 << 20
    max_snapshot_bytes: int = 8 << 30
    """A follower refuses a snapshot declared (or growing) larger than this."""
    max_members: int = MAX_MEMBERS
    """A membership change that would make more members (voters and learners) than this is
    refused (ConfChangeRejected); one that makes fewer never is. A SnapshotRequest carries the
    whole membership in raftkv.codec.MESSAGE_HEAD_BYTES, which holds 256 of the longest ids the
    transport takes with room to spare."""
    snapshot_backoff_ticks: int = 0
    """After a follower refused a snapshot (or it could not be read), the leader waits this
    long before offering one again; 0: one election timeout."""
    pre_vote: bool = True
    check_quorum: bool = True

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must be a non-empty name")
        if self.heartbeat_interval_ticks < 1:
            raise ValueError("heartbeat_interval_ticks must be >= 1")
        if self.election_timeout_ticks <= self.heartbeat_interval_ticks:
            raise ValueError("election_timeout_ticks must exceed heartbeat_interval_ticks")
        for name in ("max_append_entries", "max_append_bytes", "max_entry_bytes",
                     "max_inflight_appends", "snapshot_chunk_bytes", "max_snapshot_bytes",
                     "max_members"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.snapshot_backoff_ticks < 0:
            raise ValueError("snapshot_backoff_ticks must be >= 0")
