"""Majority arithmetic over a set of voters (etcd-io/raft quorum/majority.go)."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

from raftkv.core.types import NodeId


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


def majority(voters: Collection[NodeId]) -> int:
    """How many voters make a quorum (1 for an empty set: nothing can win it)."""
    return len(voters) // 2 + 1


def quorum_index(voters: Collection[NodeId], acked: Mapping[NodeId, int]) -> int:
    """The largest value that a quorum of voters has reached (missing voters count as 0).

    Used for the commit index (acked = match index) and for read confirmations
    (acked = heartbeat sequence). 0 when there are no voters.
    """
    if not voters:
        return 0
    values = sorted((acked.get(v, 0) for v in voters), reverse=True)
    return values[majority(voters) - 1]


def vote_result(voters: Collection[NodeId], votes: Mapping[NodeId, bool]) -> VoteResult:
    """WON once a quorum granted, LOST once a quorum can no longer be reached."""
    if not voters:
        return VoteResult.LOST
    granted = sum(1 for v in voters if votes.get(v) is True)
    rejected = sum(1 for v in voters if votes.get(v) is False)
    need = majority(voters)
    if granted >= need:
        return VoteResult.WON
    if len(voters) - rejected < need:
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(voters: Collection[NodeId], active: Collection[NodeId]) -> bool:
    return bool(voters) and sum(1 for v in voters if v in active) >= majority(voters)
