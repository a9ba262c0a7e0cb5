"""The core's in-memory Raft log (raftkv/core/log.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftkv.core import Entry
from raftkv.core.log import LogInvariantError, RaftLog


def entries(*terms: int, start: int = 1) -> list[Entry]:
    return [Entry(i, t) for i, t in enumerate(terms, start=start)]


def terms_of(log: RaftLog) -> list[int]:
    return [e.term for e in log.slice(log.first_index(), log.last_index() + 1)]


def make_log(*terms: int, commit: int = 0) -> RaftLog:
    return RaftLog(0, 0, entries(*terms), commit=commit)


# -- construction ---------------------------------------------------------------------------
def test_a_boot_log_is_all_stable() -> None:
    log = make_log(1, 1, 2, commit=2)
    assert (log.first_index(), log.last_index(), log.last_term()) == (1, 3, 2)
    assert log.stable_index == 3
    assert log.unstable_from == 4
    assert log.unstable_entries() == ()


def test_a_boot_log_refuses_a_gap_after_the_snapshot() -> None:
    with pytest.raises(LogInvariantError):
        RaftLog(3, 1, entries(2, start=6))


def test_a_boot_log_refuses_a_commit_beyond_its_end() -> None:
    with pytest.raises(LogInvariantError):
        RaftLog(0, 0, entries(1, 1), commit=3)


# -- maybe_append (AppendEntries receiver steps 2-4) ----------------------------------------
def test_maybe_append_refuses_when_prev_term_mismatches() -> None:
    log = make_log(1, 1, 2)
    assert log.maybe_append(3, 3, entries(3, start=4)) is None
    assert log.maybe_append(5, 2, entries(3, start=6)) is None  # beyond the end
    assert terms_of(log) == [1, 1, 2]


def test_maybe_append_truncates_a_conflicting_suffix_and_appends() -> None:
    log = make_log(1, 1, 2, 2, 2)
    assert log.maybe_append(2, 1, entries(3, 3, start=3)) == 4
    assert terms_of(log) == [1, 1, 3, 3]


def test_maybe_append_keeps_a_longer_matching_log() -> None:
    """A stale or duplicate append must not cut off entries it agrees with (Figure 2, step 3)."""
    log = make_log(1, 1, 2, 2, 2)
    assert log.maybe_append(1, 1, entries(1, 2, start=2)) == 3
    assert terms_of(log) == [1, 1, 2, 2, 2]
    assert log.unstable_entries() == ()


def test_maybe_append_with_no_entries_reports_the_prev_index() -> None:
    log = make_log(1, 1, 2)
    assert log.maybe_append(2, 1, []) == 2
    assert log.last_index() == 3


def test_truncation_moves_unstable_from_and_stable_index_back() -> None:
    log = make_log(1, 1, 1, 1)
    log.append(Entry(5, 1))
    assert (log.stable_index, log.unstable_from) == (4, 5)
    assert log.maybe_append(2, 1, entries(2, 2, start=3)) == 4
    assert log.stable_index == 2
    assert log.unstable_from == 3
    assert log.unstable_entries() == tuple(entries(2, 2, start=3))


def test_maybe_append_refuses_to_truncate_a_committed_entry() -> None:
    log = make_log(1, 1, 2, commit=3)
    with pytest.raises(LogInvariantError):
        log.maybe_append(1, 1, entries(3, 3, start=2))
    assert terms_of(log) == [1, 1, 2]


# -- find_conflict_by_term ------------------------------------------------------------------
FIGURE_7_LEADER = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)


@pytest.mark.parametrize(
    ("index", "term", "expected"),
    [
        (10, 6, (10, 6)),
        (10, 5, (7, 5)),
        (10, 4, (5, 4)),
        (10, 3, (3, 1)),
        (10, 2, (3, 1)),
        (10, 1, (3, 1)),
        (10, 0, (0, 0)),
        (6, 6, (6, 5)),
        (0, 9, (0, 0)),
    ],
)
def test_find_conflict_by_term_hints_the_last_index_at_or_below_the_term(
    index: int, term: int, expected: tuple[int, int]
) -> None:
    assert make_log(*FIGURE_7_LEADER).find_conflict_by_term(index, term) == expected


def test_find_conflict_by_term_stops_at_a_compacted_entry() -> None:
    log = RaftLog(4, 4, entries(5, 5, 6, start=5))
    assert log.find_conflict_by_term(7, 5) == (6, 5)
    assert log.find_conflict_by_term(7, 4) == (4, 4)  # the snapshot's own position
    assert log.find_conflict_by_term(7, 3) == (3, 0)  # compacted: term unknown, committed


nondecreasing_terms = st.lists(st.integers(1, 6), min_size=0, max_size=12).map(sorted)


@given(nondecreasing_terms, st.integers(0, 14), st.integers(0, 7))
def test_find_conflict_by_term_matches_a_linear_scan(
    terms: list[int], index: int, term: int
) -> None:
    log = make_log(*terms)
    index = min(index, log.last_index())
    expected = next(
        ((i, terms[i - 1]) for i in range(index, 0, -1) if terms[i - 1] <= term), (0, 0)
    )
    assert log.find_conflict_by_term(index, term) == expected


# -- is_up_to_date (§5.4.1) -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("last_index", "last_term", "expected"),
    [
        (2, 3, True),  # higher last term wins regardless of length
        (9, 1, False),  # lower last term loses regardless of length
        (3, 2, True),  # same term, same length
        (4, 2, True),  # same term, longer
        (2, 2, False),  # same term, shorter
    ],
)
def test_is_up_to_date_compares_last_term_then_length(
    last_index: int, last_term: int, expected: bool
) -> None:
    assert make_log(1, 1, 2).is_up_to_date(last_index, last_term) is expected


# -- commit and stable ----------------------------------------------------------------------
def test_commit_to_only_moves_forward_and_not_past_the_end() -> None:
    log = make_log(1, 1, 2, commit=1)
    assert log.commit_to(2)
    assert not log.commit_to(1)
    assert log.commit == 2
    with pytest.raises(LogInvariantError):
        log.commit_to(4)


def test_stable_to_advances_when_the_persisted_position_is_still_in_the_log() -> None:
    log = make_log(1)
    log.append(Entry(2, 1))
    log.append(Entry(3, 1))
    log.stable_to(3, 1)
    assert log.stable_index == 3


def test_stable_to_ignores_a_position_that_was_overwritten_since() -> None:
    """A Ready persisted (3, term 1), but the entry at 3 was replaced by term 2 meanwhile."""
    log = make_log(1)
    log.append(Entry(2, 1))
    log.append(Entry(3, 1))
    log.unstable_from = 4  # handed out in a Ready
    log.maybe_append(2, 1, [Entry(3, 2)])
    log.stable_to(3, 1)
    assert log.stable_index == 1
    log.stable_to(3, 2)
    assert log.stable_index == 3


def test_stable_to_never_moves_back() -> None:
    log = make_log(1, 1, 1)
    log.stable_to(2, 1)
    assert log.stable_index == 3


# -- compact --------------------------------------------------------------------------------
def applied_log(*terms: int) -> RaftLog:
    n = len(terms)
    return RaftLog(0, 0, entries(*terms), commit=n, applied=n)


def test_compact_keeps_trailing_entries_for_slow_followers() -> None:
    log = applied_log(1, 1, 2, 2, 3, 3, 3, 3)
    log.compact(6, 3, keep_from=4)
    assert (log.snapshot_index, log.snapshot_term) == (6, 3)
    assert log.first_index() == 4
    assert log.term(4) == 2
    assert log.term(3) is None
    assert (log.last_index(), log.last_term()) == (8, 3)


def test_compact_never_keeps_less_than_the_entries_after_the_snapshot() -> None:
    log = applied_log(1, 1, 2, 2, 3)
    log.compact(3, 2, keep_from=100)
    assert log.first_index() == 4
    assert log.term(3) == 2  # the snapshot position stays known
    assert log.last_index() == 5


def test_compact_of_the_whole_log_leaves_only_the_snapshot_position() -> None:
    log = applied_log(1, 1, 2)
    log.compact(3, 2, keep_from=4)
    assert log.first_index() == 4
    assert (log.last_index(), log.last_term()) == (3, 2)
    log.append(Entry(4, 3))
    assert log.slice(4, 5) == [Entry(4, 3)]


def test_compact_refuses_a_snapshot_beyond_applied() -> None:
    log = RaftLog(0, 0, entries(1, 1, 1), commit=3, applied=2)
    with pytest.raises(LogInvariantError):
        log.compact(3, 1, keep_from=4)


def test_compact_refuses_a_snapshot_whose_term_disagrees_with_the_log() -> None:
    log = applied_log(1, 1, 2)
    with pytest.raises(LogInvariantError):
        log.compact(3, 1, keep_from=4)


def test_entries_from_a_compacted_index_is_an_error() -> None:
    log = applied_log(1, 1, 2, 2)
    log.compact(3, 2, keep_from=3)
    assert log.entries_from(3, 10, 1 << 20) == tuple(entries(2, 2, start=3))
    with pytest.raises(LogInvariantError):
        log.entries_from(2, 10, 1 << 20)


def test_entries_from_respects_count_and_bytes_but_returns_at_least_one() -> None:
    log = RaftLog(0, 0, [Entry(i, 1, data=b"x" * 100) for i in range(1, 6)])
    assert len(log.entries_from(1, 3, 1 << 20)) == 3
    assert len(log.entries_from(1, 10, 250)) == 2  # 116 bytes each
    assert len(log.entries_from(1, 10, 1)) == 1


# -- restore (Figure 13, steps 6-7) ---------------------------------------------------------
def test_restore_keeps_the_suffix_when_the_snapshot_position_matches() -> None:
    log = make_log(1, 1, 2, 2, 3, 3, commit=2)
    assert log.restore(4, 2)
    assert (log.snapshot_index, log.snapshot_term) == (4, 2)
    assert log.first_index() == 5
    assert terms_of(log) == [3, 3]
    assert (log.commit, log.applied) == (4, 4)
    # the storage log is replaced as a whole: the kept suffix is written again
    assert log.stable_index == 4
    assert log.unstable_entries() == tuple(entries(3, 3, start=5))


def test_restore_discards_the_whole_log_when_the_snapshot_position_conflicts() -> None:
    log = make_log(1, 1, 2, 2, 3, 3, commit=2)
    assert not log.restore(4, 3)
    assert (log.last_index(), log.last_term()) == (4, 3)
    assert log.unstable_entries() == ()
    assert (log.commit, log.applied, log.stable_index) == (4, 4, 4)


def test_restore_beyond_the_end_of_the_log_discards_it() -> None:
    log = make_log(1, 1)
    assert not log.restore(9, 4)
    assert (log.first_index(), log.last_index(), log.last_term()) == (10, 9, 4)
    log.append(Entry(10, 4))
    assert log.last_index() == 10
