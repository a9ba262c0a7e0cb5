"""Typed domain errors raised by the Raft core. Only raftkv/http maps them to statuses."""

from __future__ import annotations

from raftkv.core.types import NodeId


class RaftError(Exception):
    """Base class of everything the core raises on purpose."""


class NotLeader(RaftError):
    """This node cannot take the request; `leader` is who can, when known."""

    def __init__(self, leader: NodeId | None) -> None:
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class ProposalDropped(RaftError):
    """The leader refused the proposal for now (e.g. a leadership transfer is under way)."""


class ProposalTooLarge(RaftError):
    """The entry is larger than Config.max_entry_bytes: no leader appends it, whatever the
    time (every entry must fit in one message to a follower)."""


class ConfChangeRejected(RaftError):
    """The membership change cannot be proposed (one is pending, or it is invalid).

    `transient`: it may well be accepted within a round trip or two, unchanged (the leader
    has not committed an entry in its term yet, another change is uncommitted, or the
    members it needs answer but have not acknowledged the commit index yet)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
