"""A follower forwards writes to the leader and answers once it applied the entry itself.

Regression (found by the fault tests, seed 101, kills): after a follower restarted, the
leader could deliver an answer it had queued for the follower's previous run; forward ids
restarted at 1, so that answer matched a new write, which was then acknowledged with
another client's entry and result. Forward ids now start at a random value, and a
forwarded write completes only with an entry that holds exactly what it sent.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Mapping

import msgpack
import pytest

from raftkv import codec
from raftkv.core import (
    AppendRequest,
    BootState,
    ConfChange,
    ConfChangeOp,
    Config,
    Entry,
    EntryKind,
    HardState,
    RaftNode,
    Snapshot,
    SnapshotMeta,
)
from raftkv.kv.commands import Put, encode_command
from raftkv.kv.state_machine import KVStateMachine, PutResult
from raftkv.runtime.loop import (
    BASE_MEMBERSHIP,
    FRAME_FORWARD,
    FRAME_FORWARD_RESULT,
    FRAME_RAFT,
    RaftLoop,
)
from raftkv.runtime.waiter import Waiter
from raftkv.service import OutcomeUnknownError
from snapshots.memory import MemorySnapshotStore
from snapshots.policy import SnapshotPolicy
from storage.memory import MemoryRaftStorage

MEMBERS = {"n1": "127.0.0.1:1", "n2": "127.0.0.1:2", "n3": "127.0.0.1:3"}


class FakeFrames:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bytes]] = []
        self.cond = threading.Condition()

    def send(self, to: str, kind: int, payload: bytes) -> bool:
        with self.cond:
            self.sent.append((to, kind, payload))
            self.cond.notify_all()
        return True

    def set_peers(self, peers: Mapping[str, str]) -> None:
        pass

    def wait_for(self, kind: int) -> bytes:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(k == kind for _, k, _ in self.sent), 5.0)
            assert ok, f"no frame of kind {kind} was sent"
            return next(p for _, k, p in self.sent if k == kind)


@pytest.fixture
def follower() -> Iterator[tuple[RaftLoop, FakeFrames]]:
    storage = MemoryRaftStorage()
    bootstrap = [Entry(i, 1, EntryKind.CONF_CHANGE,
                       change=ConfChange(ConfChangeOp.ADD_VOTER, nid, addr))
                 for i, (nid, addr) in enumerate(sorted(MEMBERS.items()), start=1)]
    storage.save(HardState(1, None, 3), bootstrap)
    boot = BootState(HardState(1, None, 3), Snapshot(SnapshotMeta(0, 0, BASE_MEMBERSHIP)),
                     tuple(bootstrap))
    core = RaftNode(Config("n2", election_timeout_ticks=1000), boot, random.Random(2))
    frames = FakeFrames()
    loop = RaftLoop(core=core, storage=storage, snapshots=MemorySnapshotStore(),
                    state_machine=KVStateMachine(), frames=frames, addresses=MEMBERS,
                    tick_s=0.05, snapshot_policy=SnapshotPolicy(), on_fatal=lambda _: None,
                    rng=random.Random(7))
    loop.start()
    try:
        yield loop, frames
    finally:
        loop.stop()


def _append_from_leader(loop: RaftLoop, data: bytes) -> None:
    """n1, leader of term 2, sends its no-op (4) and one write (5), committed."""
    m = AppendRequest(2, "n1", "n2", 3, 1, (Entry(4, 2), Entry(5, 2, data=data)), 5)
    loop.deliver("n1", FRAME_RAFT, codec.encode_message(m))


def _forward_and_get_id(loop: RaftLoop, frames: FakeFrames, data: bytes) -> tuple[int, Waiter]:
    # n1 leads term 2 (stepped before the proposal: the inbox is handled in order).
    loop.deliver("n1", FRAME_RAFT, codec.encode_message(
        AppendRequest(2, "n1", "n2", 3, 1, (), 3)))
    waiter = loop.submit_proposal(data)
    [[fid, sent]] = msgpack.unpackb(frames.wait_for(FRAME_FORWARD))
    assert sent == data
    return fid, waiter


def test_forwarded_write_is_answered_with_its_own_entry(
        follower: tuple[RaftLoop, FakeFrames]) -> None:
    loop, frames = follower
    mine = encode_command(Put("k", "mine"))
    fid, waiter = _forward_and_get_id(loop, frames, mine)
    loop.deliver("n1", FRAME_FORWARD_RESULT, msgpack.packb([[fid, 5, 2, ""]]))
    _append_from_leader(loop, mine)
    assert waiter.wait(5.0)
    assert waiter.error is None
    assert waiter.result == PutResult(5, "mine")


def test_answer_meant_for_an_earlier_run_never_acknowledges_another_write(
        follower: tuple[RaftLoop, FakeFrames]) -> None:
    loop, frames = follower
    mine = encode_command(Put("k", "mine"))
    fid, waiter = _forward_and_get_id(loop, frames, mine)
    assert fid > 1_000, "forward ids must not restart at small numbers after a restart"
    # A stale answer (an id of a previous run) is ignored...
    loop.deliver("n1", FRAME_FORWARD_RESULT, msgpack.packb([[1, 5, 2, ""]]))
    # ...and even an answer that names our id but an index holding someone else's write
    # does not acknowledge ours with their result.
    loop.deliver("n1", FRAME_FORWARD_RESULT, msgpack.packb([[fid, 5, 2, ""]]))
    _append_from_leader(loop, encode_command(Put("k", "theirs")))
    assert waiter.wait(5.0)
    assert isinstance(waiter.error, OutcomeUnknownError)


class RefusingFrames(FakeFrames):
    """Takes `accept` frames, then refuses (a full queue)."""

    def __init__(self, accept: int) -> None:
        super().__init__()
        self.accept = accept

    def send(self, to: str, kind: int, payload: bytes) -> bool:
        if self.accept <= 0:
            return False
        self.accept -= 1
        return super().send(to, kind, payload)


def test_only_forwards_that_never_left_fail_as_surely_without_effect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward batch that could not be queued fails with 'no leader' (surely no effect);
    batches already handed to the transport keep waiting: they may still commit."""
    from raftkv.runtime import loop as loop_module
    from raftkv.service import NoLeaderError

    monkeypatch.setattr(loop_module, "_MAX_FORWARD_BATCH", 1)
    storage = MemoryRaftStorage()
    boot = BootState(HardState(), Snapshot(SnapshotMeta(0, 0, BASE_MEMBERSHIP)))
    core = RaftNode(Config("n2"), boot, random.Random(2))
    frames = RefusingFrames(accept=1)
    loop = RaftLoop(core=core, storage=storage, snapshots=MemorySnapshotStore(),
                    state_machine=KVStateMachine(), frames=frames, addresses=MEMBERS,
                    tick_s=0.05, snapshot_policy=SnapshotPolicy(), on_fatal=lambda _: None,
                    rng=random.Random(7))
    core.leader = "n1"  # a follower that knows its leader (the loop thread is not running)
    first, second = Waiter(), Waiter()
    loop._propose(encode_command(Put("a", 1)), first)
    loop._propose(encode_command(Put("b", 2)), second)
    loop._flush_forwards()
    assert isinstance(second.error, NoLeaderError)
    assert not first.done
