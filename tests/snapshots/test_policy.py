"""SnapshotPolicy: when to snapshot and where to compact the log."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshots.policy import SnapshotPolicy


def test_defaults_snapshot_every_10000_entries_keeping_5000() -> None:
    assert SnapshotPolicy() == SnapshotPolicy(entries=10_000, trailing=5_000)


@pytest.mark.parametrize(
    ("applied", "last_snapshot", "expected"),
    [(0, 0, False), (99, 0, False), (100, 0, True), (250, 150, True), (249, 150, False)],
)
def test_snapshot_is_due_once_entries_were_applied_since_the_last(
    applied: int, last_snapshot: int, expected: bool
) -> None:
    assert SnapshotPolicy(entries=100, trailing=10).should_snapshot(applied, last_snapshot) is (
        expected
    )


def test_no_snapshot_is_due_right_after_restoring_a_newer_one() -> None:
    assert not SnapshotPolicy(entries=1).should_snapshot(5, 8)


@pytest.mark.parametrize(
    ("trailing", "snapshot_index", "first_kept"),
    [(10, 100, 91), (0, 100, 101), (100, 100, 1), (500, 100, 1), (10, 0, 1), (0, 0, 1)],
)
def test_compaction_keeps_trailing_entries_up_to_the_snapshot_and_never_goes_below_one(
    trailing: int, snapshot_index: int, first_kept: int
) -> None:
    assert SnapshotPolicy(trailing=trailing).compact_before(snapshot_index) == first_kept


@given(st.integers(1, 10**6), st.integers(0, 10**6), st.integers(0, 10**9))
def test_compaction_keeps_exactly_min_trailing_entries_at_or_below_the_snapshot(
    entries: int, trailing: int, snapshot_index: int
) -> None:
    first_kept = SnapshotPolicy(entries, trailing).compact_before(snapshot_index)
    assert first_kept >= 1
    assert first_kept <= snapshot_index + 1  # never drops what the snapshot does not cover
    assert snapshot_index - first_kept + 1 == min(trailing, snapshot_index)


@pytest.mark.parametrize(
    "kwargs",
    [{"entries": 0}, {"entries": -5}, {"trailing": -1}, {"entries": 1.5}, {"trailing": True}],
)
def test_invalid_settings_are_refused_on_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="SnapshotPolicy"):
        SnapshotPolicy(**kwargs)  # type: ignore[arg-type]


def test_negative_indices_are_refused() -> None:
    policy = SnapshotPolicy()
    with pytest.raises(ValueError, match="applied_index"):
        policy.should_snapshot(-1, 0)
    with pytest.raises(ValueError, match="snapshot_index"):
        policy.compact_before(-1)


def test_policy_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SnapshotPolicy().entries = 5  # type: ignore[misc]


def test_while_a_snapshot_is_being_sent_the_next_waits_for_twice_the_entries() -> None:
    """A new snapshot would push the one in flight out of the store (it keeps a few)."""
    policy = SnapshotPolicy(entries=100, trailing=10)
    asked: list[bool] = []

    def sending() -> bool:
        asked.append(True)
        return True

    assert not policy.should_snapshot(249, 150, sending)
    assert not asked, "asked only once a snapshot would be due otherwise"
    assert policy.should_snapshot(250, 150)
    assert not policy.should_snapshot(250, 150, sending)
    assert not policy.should_snapshot(349, 150, sending)
    assert policy.should_snapshot(350, 150, sending)


@pytest.mark.parametrize(
    ("hold", "first_kept"),
    [
        (None, 991),  # nobody lags: trailing entries only
        (995, 991),  # the lagging peer is within the trailing entries already
        (991, 991),
        (950, 950),  # held for a live peer that needs the entries after 950
        (891, 891),  # up to `entries` more than trailing...
        (500, 891),  # ...and no further: the log stays bounded
        (0, 891),
    ],
)
def test_compaction_keeps_what_a_live_peer_needs_within_a_bound(
    hold: int | None, first_kept: int
) -> None:
    assert SnapshotPolicy(entries=100, trailing=10).compact_before(1000, hold) == first_kept


@given(st.integers(1, 10**4), st.integers(0, 10**4), st.integers(0, 10**6),
       st.integers(0, 10**6))
def test_compaction_with_a_hold_never_keeps_less_nor_more_than_its_bound(
    entries: int, trailing: int, snapshot_index: int, hold: int
) -> None:
    policy = SnapshotPolicy(entries, trailing)
    plain = policy.compact_before(snapshot_index)
    held = policy.compact_before(snapshot_index, hold)
    assert 1 <= held <= plain
    assert held <= max(1, hold) or held == max(1, plain - entries)
    assert plain - held <= entries
