"""Minimal reproductions of bugs the simulator found, one test per bug.

Each test drives RaftNodes by hand (no simulator) down the path the failing seed took, so the
bug stays pinned even if the simulator's schedules change.
"""

from __future__ import annotations

import random

import pytest

from raftkv.core import (
    AppendRequest,
    AppendResponse,
    BootState,
    ConfChange,
    ConfChangeOp,
    Config,
    Entry,
    EntryKind,
    HardState,
    Membership,
    RaftNode,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    VoteResponse,
)
from raftkv.runtime.boot import load_boot_state
from snapshots.memory import MemorySnapshotStore
from storage.memory import MemoryRaftStorage

VOTERS = frozenset({"n1", "n2", "n3"})


def _new_node(nid: str, voters: frozenset[str] = VOTERS) -> RaftNode:
    boot = BootState(HardState(), Snapshot(SnapshotMeta(0, 0, Membership(voters))))
    return RaftNode(Config(nid), boot, random.Random(7))


def _cycle(node: RaftNode) -> Ready:
    """Persist and apply whatever the node has (synchronously), then advance."""
    rd = node.ready()
    node.advance(rd)
    return rd


def _elect_n1() -> RaftNode:
    n1 = _new_node("n1")
    n1.campaign()  # pre-vote
    n1.step(VoteResponse(1, "n2", "n1", granted=True, pre_vote=True))
    _cycle(n1)  # persists term 1 + vote; our own vote is counted after that
    n1.step(VoteResponse(1, "n2", "n1", granted=True))
    assert n1.role is Role.LEADER
    _cycle(n1)  # persists the no-op at index 1
    n1.step(AppendResponse(1, "n2", "n1", True, 1))
    assert n1.log.commit == 1
    _cycle(n1)
    return n1


def test_leader_steps_down_cleanly_when_the_ack_commits_its_own_removal() -> None:
    """Dissertation §4.2.2: a leader removed from the configuration steps down once the
    removal commits. Found by the simulator (seed 5, profile membership, 3 nodes): the ack
    that committed the removal made _maybe_commit() step the leader down, and
    _step_append_response() then kept going as a leader and raised KeyError on the emptied
    progress map (`self._progress[to]` in _send_append)."""
    n1 = _elect_n1()
    n1.step(AppendResponse(1, "n3", "n1", True, 1))  # n3 caught up: the strict check allows it
    index = n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n1"))
    _cycle(n1)  # the removal is on n1's disk
    n1.step(AppendResponse(1, "n3", "n1", True, index))
    assert n1.log.commit == 1  # the new configuration {n2, n3} needs both
    n1.step(AppendResponse(1, "n2", "n1", True, index))  # this ack commits the removal
    assert n1.log.commit == index
    assert n1.role is Role.FOLLOWER
    assert n1.id not in n1.membership.voters


def test_boot_refuses_a_node_with_neither_a_snapshot_nor_the_initial_membership() -> None:
    """Found by the simulator when spare nodes joined (profile membership + 1 spare, seed 1,
    3 nodes: "two leaders in term 2: n4 and n1"). The initial members booted on an implicit
    configuration at index 0 ({n1, n2, n3}); the joiner n4 booted with initial_membership=None,
    which load_boot_state turned into an empty configuration. Replaying the leader's log on top
    of it, n4 computed voters = {n4} after its own ADD_VOTER and elected itself alone. Every
    node must boot on the same configuration at index 0 (the runtime: an empty one, plus a
    bootstrap log of ADD_VOTER entries, see runtime.boot.bootstrap_entries); load_boot_state no
    longer guesses one."""
    with pytest.raises(ValueError, match="initial membership"):
        load_boot_state(MemoryRaftStorage(), MemorySnapshotStore(), None)


def test_joining_node_rebuilds_the_membership_from_the_bootstrap_log() -> None:
    """The runtime's scheme: an empty configuration at index 0, the initial members added by
    the first (committed) log entries, so a joiner replaying the log sees every voter."""
    boot, _ = load_boot_state(MemoryRaftStorage(), MemorySnapshotStore(),
                              Membership(frozenset()))
    n4 = RaftNode(Config("n4"), boot, random.Random(7))

    def add(index: int, term: int, op: ConfChangeOp, nid: str) -> Entry:
        return Entry(index, term, EntryKind.CONF_CHANGE, change=ConfChange(op, nid))

    log = (
        add(1, 1, ConfChangeOp.ADD_VOTER, "n1"),
        add(2, 1, ConfChangeOp.ADD_VOTER, "n2"),
        add(3, 1, ConfChangeOp.ADD_VOTER, "n3"),
        Entry(4, 2),
        add(5, 2, ConfChangeOp.ADD_LEARNER, "n4"),
        add(6, 2, ConfChangeOp.ADD_VOTER, "n4"),
    )
    n4.step(AppendRequest(2, "n1", "n4", 0, 0, log, 6))
    _cycle(n4)
    assert n4.membership.voters == VOTERS | {"n4"}
    n4.campaign()
    _cycle(n4)
    assert n4.role is Role.PRE_CANDIDATE  # it needs two more votes: it cannot win alone
