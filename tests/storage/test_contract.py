"""The RaftStorage contract (raftkv.ports): the in-memory double and LMDB behave the same.

Each test gets a `Harness`: `h.store` is the store under test, `h.crash()` simulates a power
cut (memory: `crash()`; LMDB: close and reopen the data dir) and returns the store to use next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from raftkv.core.types import ConfChange, ConfChangeOp, Entry, EntryKind, HardState
from raftkv.ports import NodeIdentity, RaftStorage, StorageError
from storage.lmdb_store import LmdbRaftStorage
from storage.memory import MemoryRaftStorage


class Harness:
    def __init__(self, store: RaftStorage, crash: Callable[[], RaftStorage]) -> None:
        self.store = store
        self._crash = crash

    def crash(self) -> RaftStorage:
        self.store = self._crash()
        return self.store


def _memory_harness(tmp_path: Path) -> Harness:
    store = MemoryRaftStorage()

    def crash() -> RaftStorage:
        store.crash()
        return store

    return Harness(store, crash)


def _lmdb_harness(tmp_path: Path) -> Harness:
    data_dir = tmp_path / "raft"
    harness: Harness

    def crash() -> RaftStorage:
        harness.store.close()
        return LmdbRaftStorage(data_dir, map_size_bytes=1 << 24)

    harness = Harness(LmdbRaftStorage(data_dir, map_size_bytes=1 << 24), crash)
    return harness


@pytest.fixture(params=[_memory_harness, _lmdb_harness], ids=["memory", "lmdb"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    harness: Harness = request.param(tmp_path)
    yield harness
    harness.store.close()


def entries(lo: int, hi: int, term: int, tag: bytes = b"") -> list[Entry]:
    return [Entry(i, term, data=tag + str(i).encode()) for i in range(lo, hi)]


def terms(store: RaftStorage) -> list[int]:
    return [e.term for e in store.entries(store.first_index(), store.last_index() + 1)]


# A new store


def test_new_store_is_empty(h: Harness) -> None:
    s = h.store
    assert (s.first_index(), s.last_index()) == (1, 0)
    assert s.entries(1, 1) == []
    assert s.term(0) is None
    assert s.term(1) is None
    assert s.hard_state() == HardState()
    assert s.identity() is None


# Appending and reading


def test_save_appends_entries_and_reads_any_range(h: Harness) -> None:
    written = entries(1, 11, term=1)
    h.store.save(None, written)
    assert (h.store.first_index(), h.store.last_index()) == (1, 10)
    assert h.store.entries(1, 11) == written
    assert h.store.entries(4, 7) == written[3:6]
    assert h.store.entries(10, 11) == written[9:]
    assert h.store.entries(5, 5) == []


def test_entries_round_trip_every_field(h: Harness) -> None:
    written = [
        Entry(1, 1),
        Entry(2, 1, data=b"\x00\xff" * 50),
        Entry(3, 2, EntryKind.CONF_CHANGE, change=ConfChange(ConfChangeOp.ADD_LEARNER, "n4",
                                                              "10.0.0.4:7000")),
    ]
    h.store.save(None, written)
    assert h.store.entries(1, 4) == written


def test_save_appends_at_last_index_plus_one_keeping_existing_entries(h: Harness) -> None:
    h.store.save(None, entries(1, 4, term=1))
    h.store.save(None, entries(4, 6, term=2))
    assert terms(h.store) == [1, 1, 1, 2, 2]


@pytest.mark.parametrize(("lo", "hi"), [(0, 3), (2, 7), (4, 3), (7, 8)])
def test_entries_outside_the_log_raise_storage_error(h: Harness, lo: int, hi: int) -> None:
    h.store.save(None, entries(1, 6, term=1))
    with pytest.raises(StorageError):
        h.store.entries(lo, hi)


def test_term_returns_the_stored_term_and_none_outside_the_log(h: Harness) -> None:
    h.store.save(None, [*entries(1, 3, term=1), *entries(3, 5, term=3)])
    assert [h.store.term(i) for i in range(0, 6)] == [None, 1, 1, 3, 3, None]
    assert h.store.term(-1) is None


def test_save_truncates_conflicting_suffix(h: Harness) -> None:
    h.store.save(None, entries(1, 8, term=1))
    replacement = entries(4, 6, term=2, tag=b"new")
    h.store.save(None, replacement)
    assert h.store.last_index() == 5
    assert h.store.entries(1, 6) == entries(1, 4, term=1) + replacement
    assert h.store.term(6) is None


def test_save_overwriting_from_first_index_replaces_whole_log(h: Harness) -> None:
    h.store.save(None, entries(1, 5, term=1))
    h.store.save(None, entries(1, 3, term=2))
    assert terms(h.store) == [2, 2]


def test_save_rejects_append_leaving_a_gap_and_writes_nothing(h: Harness) -> None:
    h.store.save(HardState(1, "n1", 0), entries(1, 4, term=1))
    with pytest.raises(StorageError):
        h.store.save(HardState(2, "n2", 1), entries(6, 8, term=2))
    assert terms(h.store) == [1, 1, 1]
    assert h.store.hard_state() == HardState(1, "n1", 0)


def test_save_rejects_append_before_first_index(h: Harness) -> None:
    h.store.save(None, entries(1, 10, term=1))
    h.store.compact(5)
    with pytest.raises(StorageError):
        h.store.save(None, entries(3, 6, term=2))
    assert (h.store.first_index(), h.store.last_index()) == (5, 9)
    assert terms(h.store) == [1] * 5


def test_save_rejects_non_contiguous_entries_and_writes_nothing(h: Harness) -> None:
    h.store.save(HardState(1, "n1", 0), entries(1, 6, term=1))
    bad = [Entry(3, 2), Entry(5, 2)]
    with pytest.raises(StorageError):
        h.store.save(HardState(2, None, 0), bad)
    assert terms(h.store) == [1] * 5
    assert h.store.hard_state() == HardState(1, "n1", 0)


def test_save_reset_log_replaces_the_log_with_the_new_entries(h: Harness) -> None:
    h.store.save(None, entries(1, 6, term=1))
    h.store.save(None, entries(100, 103, term=4), reset_log=True)
    assert (h.store.first_index(), h.store.last_index()) == (100, 102)
    assert h.store.term(5) is None
    assert terms(h.store) == [4, 4, 4]


def test_save_reset_log_without_entries_empties_the_log_at_its_first_index(h: Harness) -> None:
    h.store.save(None, entries(1, 6, term=1))
    h.store.compact(3)
    h.store.save(HardState(2, None, 5), [], reset_log=True)
    assert (h.store.first_index(), h.store.last_index()) == (3, 2)
    assert h.store.term(3) is None
    assert h.store.hard_state() == HardState(2, None, 5)


def test_save_accepts_any_start_after_the_log_was_reset(h: Harness) -> None:
    h.store.save(None, entries(1, 6, term=1))
    h.store.save(None, [], reset_log=True)
    h.store.save(None, entries(50, 52, term=3))
    assert (h.store.first_index(), h.store.last_index()) == (50, 51)


# Hard state


@pytest.mark.parametrize("hard_state", [HardState(3, "n2", 7), HardState(1, None, 0),
                                        HardState(2**40, "n\u00e9", 2**40)])
def test_hard_state_round_trips(h: Harness, hard_state: HardState) -> None:
    h.store.save(hard_state, [])
    assert h.store.hard_state() == hard_state


def test_save_without_hard_state_keeps_the_previous_one(h: Harness) -> None:
    h.store.save(HardState(2, "n1", 0), [])
    h.store.save(None, entries(1, 3, term=2))
    assert h.store.hard_state() == HardState(2, "n1", 0)


def test_save_of_hard_state_alone_leaves_the_log_untouched(h: Harness) -> None:
    h.store.save(None, entries(1, 4, term=1))
    h.store.save(HardState(5, None, 3), [])
    assert terms(h.store) == [1, 1, 1]


# Identity


def test_identity_round_trips(h: Harness) -> None:
    identity = NodeIdentity("n1", "cluster-\u00e9", 3)
    h.store.set_identity(identity)
    assert h.store.identity() == identity


def test_identity_survives_crash(h: Harness) -> None:
    identity = NodeIdentity("n2", "c1", 1)
    h.store.set_identity(identity)
    assert h.crash().identity() == identity


# Compaction


def test_compact_removes_entries_before_the_index(h: Harness) -> None:
    h.store.save(None, entries(1, 11, term=1))
    h.store.compact(4)
    assert (h.store.first_index(), h.store.last_index()) == (4, 10)
    assert h.store.term(3) is None
    assert h.store.entries(4, 11) == entries(4, 11, term=1)
    with pytest.raises(StorageError):
        h.store.entries(3, 5)


def test_compact_at_or_before_first_index_changes_nothing(h: Harness) -> None:
    h.store.save(None, entries(1, 6, term=1))
    h.store.compact(3)
    h.store.compact(3)
    h.store.compact(1)
    assert (h.store.first_index(), h.store.last_index()) == (3, 5)


def test_compact_of_everything_keeps_the_compaction_point(h: Harness) -> None:
    h.store.save(None, entries(1, 11, term=1))
    h.store.compact(11)
    assert (h.store.first_index(), h.store.last_index()) == (11, 10)
    assert h.store.entries(11, 11) == []
    assert h.store.term(10) is None


def test_compact_past_the_last_index_moves_the_compaction_point_there(h: Harness) -> None:
    h.store.save(None, entries(1, 6, term=1))
    h.store.compact(20)
    assert (h.store.first_index(), h.store.last_index()) == (20, 19)
    h.store.compact(20)
    assert (h.store.first_index(), h.store.last_index()) == (20, 19)


def test_compact_of_an_empty_log_moves_the_compaction_point(h: Harness) -> None:
    h.store.compact(8)
    assert (h.store.first_index(), h.store.last_index()) == (8, 7)


def test_append_continues_after_compacting_everything(h: Harness) -> None:
    h.store.save(None, entries(1, 6, term=1))
    h.store.compact(6)
    h.store.save(None, entries(6, 8, term=2))
    assert (h.store.first_index(), h.store.last_index()) == (6, 7)
    assert terms(h.store) == [2, 2]


# Crash semantics


def test_synced_save_survives_crash(h: Harness) -> None:
    h.store.save(HardState(3, "n3", 2), entries(1, 5, term=3))
    s = h.crash()
    assert s.entries(1, 5) == entries(1, 5, term=3)
    assert s.hard_state() == HardState(3, "n3", 2)


def test_truncation_survives_crash(h: Harness) -> None:
    h.store.save(None, entries(1, 8, term=1))
    h.store.save(None, entries(3, 4, term=2))
    s = h.crash()
    assert (s.first_index(), s.last_index()) == (1, 3)
    assert s.term(3) == 2


def test_compaction_point_survives_crash(h: Harness) -> None:
    h.store.save(None, entries(1, 6, term=1))
    h.store.compact(9)
    s = h.crash()
    assert (s.first_index(), s.last_index()) == (9, 8)


def test_reset_log_survives_crash(h: Harness) -> None:
    h.store.save(None, entries(1, 6, term=1))
    h.store.save(HardState(4, None, 40), entries(40, 42, term=4), reset_log=True)
    s = h.crash()
    assert (s.first_index(), s.last_index()) == (40, 41)
    assert s.hard_state() == HardState(4, None, 40)


def test_unsynced_save_is_kept_whole_or_lost_whole_by_a_crash(h: Harness) -> None:
    h.store.save(HardState(1, "n1", 0), entries(1, 4, term=1))
    h.store.save(HardState(2, "n2", 1), entries(3, 6, term=2), sync=False)
    s = h.crash()
    before = ([1, 1, 1], HardState(1, "n1", 0))
    after = ([1, 1, 2, 2, 2], HardState(2, "n2", 1))
    assert (terms(s), s.hard_state()) in (before, after)


def test_save_after_close_raises_storage_error(h: Harness) -> None:
    h.store.close()
    with pytest.raises(StorageError):
        h.store.save(HardState(1, None, 0), entries(1, 2, term=1))
