"""The watch registry (raftkv.runtime.watch), driven as the Raft process drives it: entries
are applied to a real KVStateMachine and their results handed to wants()/applied(); each
watch's answer arrives through its notify callback (here a Probe records it)."""

from __future__ import annotations

from raftkv.core.types import Entry, EntryKind
from raftkv.kv.commands import (
    Batch,
    Command,
    Delete,
    LeaseGrant,
    LeaseRevoke,
    Put,
    encode_command,
)
from raftkv.kv.state_machine import KVStateMachine
from raftkv.runtime.watch import KeyState, Watch, WatchRegistry
from raftkv.service import UnavailableError


class Probe:
    """A watch and what its notify callback received (the Raft process sends it to a
    worker instead)."""

    def __init__(self, key: str, after_index: int | None) -> None:
        self.outcomes: list[KeyState | BaseException] = []
        self.watch = Watch(key, after_index, self.outcomes.append)

    def wait(self, _timeout_s: float) -> bool:
        """Answered yet? (nothing waits: the registry answers synchronously)"""
        return bool(self.outcomes)

    @property
    def change(self) -> KeyState | None:
        assert len(self.outcomes) <= 1, "a watch is answered once"
        first = self.outcomes[0] if self.outcomes else None
        return first if isinstance(first, KeyState) else None

    @property
    def error(self) -> BaseException | None:
        first = self.outcomes[0] if self.outcomes else None
        return first if isinstance(first, BaseException) else None


class Node:
    """A state machine and a registry, wired like RaftDriver._on_applied wires them."""

    def __init__(self, max_tombstones: int = 100) -> None:
        self.sm = KVStateMachine()
        self.watches = WatchRegistry(floor_index=self.sm.applied_index,
                                     max_tombstones=max_tombstones)
        self.decoded = 0

    def apply(self, cmd: Command | None, request_id: str | None = None) -> int:
        index = self.sm.applied_index + 1
        data = b"" if cmd is None else encode_command(cmd, request_id)
        result = self.sm.apply(Entry(index, 1, EntryKind.NORMAL, data))
        if self.watches.wants(result, index):
            self.decoded += 1
            self.watches.applied(index, data, result, self.sm.get)
        return index

    def watch(self, key: str, after_index: int | None) -> Probe:
        probe = Probe(key, after_index)
        filed = self.watches.add(probe.watch, self.sm.get(key), self.sm.applied_index)
        assert filed == (not probe.outcomes)
        return probe


def test_put_wakes_a_watch_of_its_key_with_the_new_value_and_index() -> None:
    node = Node()
    first = node.apply(Put("k", 1))
    w = node.watch("k", first)
    assert not w.wait(0)
    index = node.apply(Put("k", 2))
    assert w.wait(0)
    assert w.change == KeyState("k", 2, index, deleted=False)
    assert len(node.watches) == 0


def test_write_to_another_key_leaves_the_watch_waiting() -> None:
    node = Node()
    w = node.watch("k", None)
    node.apply(Put("other", 1))
    node.apply(Batch((Put("x", 1), Put("y", 2))))
    assert not w.wait(0)
    assert len(node.watches) == 1


def test_key_modified_after_the_watch_index_answers_at_once() -> None:
    node = Node()
    older = node.apply(Put("k", "old"))
    newer = node.apply(Put("k", "new"))
    w = node.watch("k", older)
    assert w.wait(0)
    assert w.change == KeyState("k", "new", newer, deleted=False)
    assert len(node.watches) == 0


def test_watch_from_the_current_index_waits() -> None:
    node = Node()
    index = node.apply(Put("k", 1))
    w = node.watch("k", index)
    assert not w.wait(0)


def test_watch_without_an_index_waits_for_the_next_change() -> None:
    node = Node()
    node.apply(Put("k", 1))
    w = node.watch("k", None)
    assert not w.wait(0)
    index = node.apply(Put("k", 2))
    assert w.change == KeyState("k", 2, index, deleted=False)


def test_change_at_or_below_a_future_watch_index_does_not_wake_it() -> None:
    # A client that saw index 10 on the leader watches a follower that has applied less.
    node = Node()
    w = node.watch("k", 10)
    node.apply(Put("k", "seen already"))
    while node.sm.applied_index < 9:
        node.apply(None)
    assert node.apply(Put("k", "seen at 10")) == 10
    assert not w.wait(0)
    index = node.apply(Put("k", "new"))
    assert w.change == KeyState("k", "new", index, deleted=False)


def test_delete_wakes_the_watch_as_deleted() -> None:
    node = Node()
    first = node.apply(Put("k", 1))
    w = node.watch("k", first)
    index = node.apply(Delete("k"))
    assert w.change == KeyState("k", None, index, deleted=True)


def test_delete_before_the_watch_arrives_answers_it_at_once() -> None:
    # The client read k at `seen`; k was deleted before its watch reached the node.
    node = Node()
    seen = node.apply(Put("k", 1))
    deleted_at = node.apply(Delete("k"))
    w = node.watch("k", seen)
    assert w.change == KeyState("k", None, deleted_at, deleted=True)


def test_watch_of_a_key_deleted_at_or_before_its_index_waits_for_its_creation() -> None:
    node = Node()
    node.apply(Put("k", 1))
    deleted_at = node.apply(Delete("k"))
    w = node.watch("k", deleted_at)
    assert not w.wait(0)
    index = node.apply(Put("k", 2))
    assert w.change == KeyState("k", 2, index, deleted=False)


def test_watch_of_a_key_that_never_existed_waits() -> None:
    node = Node()
    node.apply(Put("other", 1))
    w = node.watch("k", 0)
    assert not w.wait(0)


def test_delete_of_an_absent_key_is_no_change() -> None:
    node = Node()
    w = node.watch("k", None)
    node.apply(Delete("k"))
    assert not w.wait(0)


def test_failed_condition_is_no_change() -> None:
    node = Node()
    first = node.apply(Put("k", 1))
    w = node.watch("k", first)
    node.apply(Put("k", 2, prev_index=first + 100))
    assert not w.wait(0)


def test_idempotent_retry_is_no_change() -> None:
    node = Node()
    first = node.apply(Put("k", 1), request_id="r1")
    w = node.watch("k", first)
    node.apply(Put("k", 1), request_id="r1")  # answered from memory, not applied again
    assert not w.wait(0)


def test_batch_wakes_the_watches_of_the_keys_it_changed_with_their_final_state() -> None:
    node = Node()
    base = node.apply(Batch((Put("a", 0), Put("b", 0), Put("c", 0))))
    wa, wb, wc, wd = (node.watch(k, base) for k in "abcd")
    index = node.apply(Batch((Put("a", 1), Delete("b"), Put("c", 1), Delete("c"), Put("c", 2))))
    assert wa.change == KeyState("a", 1, index, deleted=False)
    assert wb.change == KeyState("b", None, index, deleted=True)
    assert wc.change == KeyState("c", 2, index, deleted=False)
    assert not wd.wait(0)
    assert len(node.watches) == 1


def test_entries_are_not_decoded_when_nobody_watches_and_nothing_is_deleted() -> None:
    node = Node()
    for i in range(10):
        node.apply(Put(f"k{i}", i))
    node.apply(Batch(tuple(Put(f"b{i}", i) for i in range(100))))
    node.apply(Delete("absent"))  # deleted nothing
    assert node.decoded == 0
    node.apply(Delete("k1"))  # remembered, for a later watch
    assert node.decoded == 1


def test_several_watches_of_one_key_all_wake() -> None:
    node = Node()
    watches = [node.watch("k", None) for _ in range(3)]
    index = node.apply(Put("k", "v"))
    assert [w.change for w in watches] == [KeyState("k", "v", index, deleted=False)] * 3


def test_end_returns_the_current_state_and_forgets_the_watch() -> None:
    node = Node()
    index = node.apply(Put("k", "v"))
    w = node.watch("k", index)
    state = node.watches.end(w.watch, node.sm.get("k"), node.sm.applied_index)
    assert state == KeyState("k", "v", index, deleted=False)
    assert len(node.watches) == 0
    node.apply(Put("k", "later"))
    assert not w.wait(0)


def test_end_of_an_absent_key_reports_it_deleted_at_the_applied_index() -> None:
    node = Node()
    w = node.watch("k", None)
    applied = node.apply(Put("other", 1))
    assert node.watches.end(w.watch, None, applied) == KeyState("k", None, applied, True)


def test_a_watch_is_answered_once_with_its_first_change_and_then_forgotten() -> None:
    node = Node()
    w = node.watch("k", None)
    index = node.apply(Put("k", 1))
    node.apply(Put("k", 2))
    assert w.outcomes == [KeyState("k", 1, index, deleted=False)]
    assert len(node.watches) == 0


def test_forgotten_deletes_raise_the_floor_and_an_older_watch_of_an_absent_key_ends_at_once(
) -> None:
    node = Node(max_tombstones=2)
    seen = node.apply(Batch(tuple(Put(k, 0) for k in "abc")))
    node.apply(Delete("a"))
    node.apply(Delete("b"))
    node.apply(Delete("c"))  # "a" is forgotten: the floor moves to its delete
    assert node.watches.floor_index == seen + 1
    w = node.watch("a", seen)
    assert w.change == KeyState("a", None, node.sm.applied_index, deleted=True)
    # A watch from at or above the floor can still be told: nothing happened since.
    assert not node.watch("a", node.sm.applied_index).wait(0)


def test_snapshot_restore_ends_watches_whose_key_changed_or_vanished() -> None:
    node = Node()
    base = node.apply(Batch((Put("same", 0), Put("newer", 0), Put("gone", 0))))
    w_same, w_newer, w_gone = (node.watch(k, base) for k in ("same", "newer", "gone"))
    # The leader's state, sent as a snapshot: "newer" rewritten, "gone" deleted.
    leader = KVStateMachine()
    leader.restore(node.sm.snapshot(), base)
    leader.apply(Entry(base + 1, 1, EntryKind.NORMAL, encode_command(Put("newer", 1))))
    leader.apply(Entry(base + 2, 1, EntryKind.NORMAL, encode_command(Delete("gone"))))
    node.sm.restore(leader.snapshot(), base + 2)
    node.watches.restored(node.sm.applied_index, node.sm.get)
    assert not w_same.wait(0)
    assert w_newer.change == KeyState("newer", 1, base + 1, deleted=False)
    assert w_gone.change == KeyState("gone", None, base + 2, deleted=True)
    assert node.watches.floor_index == base + 2


def test_close_fails_waiting_and_later_watches() -> None:
    node = Node()
    w = node.watch("k", None)
    node.watches.close(UnavailableError("stopping"))
    assert w.wait(0) and isinstance(w.error, UnavailableError)
    assert len(node.watches) == 0
    later = node.watch("k", None)
    assert later.wait(0) and isinstance(later.error, UnavailableError)


# ------------------------------------------------------------------ leases
def test_lease_expiry_wakes_the_watches_of_its_keys_as_deletes() -> None:
    node = Node()
    lease = node.apply(LeaseGrant(10))
    a = node.apply(Put("a", 1, lease=lease))
    node.apply(Put("b", 2, lease=lease))
    node.apply(Put("other", 3))
    wa, wb, w_other = node.watch("a", a), node.watch("b", None), node.watch("other", None)
    revoked = node.apply(LeaseRevoke(lease, expired=True))
    assert wa.change == KeyState("a", None, revoked, deleted=True)
    assert wb.change == KeyState("b", None, revoked, deleted=True)
    assert not w_other.wait(0)


def test_lease_revoke_leaves_tombstones_for_later_watches() -> None:
    node = Node()
    seen = node.apply(Put("k", 1, ttl_s=10))
    revoked = node.apply(LeaseRevoke(seen))  # nobody watches: remembered all the same
    assert node.decoded == 1
    w = node.watch("k", seen)
    assert w.change == KeyState("k", None, revoked, deleted=True)


def test_put_with_a_lease_wakes_a_watch_like_any_put() -> None:
    node = Node()
    lease = node.apply(LeaseGrant(10))
    w = node.watch("k", None)
    index = node.apply(Put("k", "v", lease=lease))
    assert w.change == KeyState("k", "v", index, deleted=False)


def test_lease_grants_retried_revokes_and_missing_leases_are_no_change() -> None:
    node = Node()
    lease = node.apply(LeaseGrant(10))
    node.apply(Put("k", 1, lease=lease))
    node.apply(LeaseRevoke(lease), request_id="r")
    node.apply(Put("k", 2))
    w = node.watch("k", None)
    node.apply(LeaseGrant(10))
    node.apply(LeaseRevoke(lease), request_id="r")  # answered from memory: deletes nothing
    node.apply(Put("k", 3, lease=12345))  # no such lease: applies nothing
    node.apply(LeaseRevoke(999))
    assert not w.wait(0)
    assert node.sm.get("k") == (2, 4)
