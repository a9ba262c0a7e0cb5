"""A leader's view of one follower (raftkv/core/progress.py): states, updates, inflights."""

from __future__ import annotations

import pytest

from raftkv.core.progress import Inflights, Progress, ProgressState
from raftkv.core.types import Membership, Snapshot, SnapshotMeta


def snapshot_at(index: int) -> Snapshot:
    return Snapshot(SnapshotMeta(index, 1, Membership(frozenset({"n1"}))), 10, "0" * 64)


def progress(state: ProgressState, match: int, next_index: int, window: int = 4) -> Progress:
    pr = Progress(next_index, window)
    pr.match = match
    if state is ProgressState.REPLICATE:
        pr.become_replicate()
        pr.next = next_index
    return pr


# -- transitions ----------------------------------------------------------------------------
def test_new_progress_probes_and_is_not_paused_until_a_probe_is_sent() -> None:
    pr = Progress(6, 4)
    assert pr.state is ProgressState.PROBE
    assert (pr.match, pr.next) == (0, 6)
    assert not pr.is_paused()
    pr.probe_sent = True
    assert pr.is_paused()


def test_become_replicate_starts_right_after_the_match() -> None:
    pr = progress(ProgressState.PROBE, match=5, next_index=9)
    pr.probe_sent = True
    pr.become_replicate()
    assert pr.state is ProgressState.REPLICATE
    assert pr.next == 6
    assert not pr.is_paused()


def test_become_probe_from_replicate_restarts_after_the_match() -> None:
    pr = progress(ProgressState.REPLICATE, match=5, next_index=12)
    pr.inflights.add(8)
    pr.become_probe()
    assert pr.state is ProgressState.PROBE
    assert pr.next == 6
    assert len(pr.inflights) == 0


@pytest.mark.parametrize(("match", "pending", "expected_next"), [(3, 10, 11), (12, 10, 13)])
def test_become_probe_after_a_snapshot_resumes_past_the_snapshot(
    match: int, pending: int, expected_next: int
) -> None:
    pr = progress(ProgressState.PROBE, match=match, next_index=match + 1)
    pr.become_snapshot(snapshot_at(pending))
    pr.become_probe()
    assert pr.state is ProgressState.PROBE
    assert pr.next == expected_next
    assert pr.pending_snapshot == 0
    assert pr.snapshot is None


def test_snapshot_state_is_paused_and_remembers_the_snapshot() -> None:
    pr = progress(ProgressState.REPLICATE, match=2, next_index=3)
    pr.inflights.add(3)
    snap = snapshot_at(10)
    pr.become_snapshot(snap)
    assert pr.state is ProgressState.SNAPSHOT
    assert pr.pending_snapshot == 10
    assert pr.snapshot is snap
    assert pr.snapshot_offset == 0
    assert len(pr.inflights) == 0
    assert pr.is_paused()


# -- maybe_update ---------------------------------------------------------------------------
def test_maybe_update_advances_match_and_next_and_unpauses_a_probe() -> None:
    pr = progress(ProgressState.PROBE, match=2, next_index=3)
    pr.probe_sent = True
    assert pr.maybe_update(7)
    assert (pr.match, pr.next) == (7, 8)
    assert not pr.probe_sent


@pytest.mark.parametrize("index", [1, 5])
def test_maybe_update_with_an_old_index_is_old_news(index: int) -> None:
    pr = progress(ProgressState.REPLICATE, match=5, next_index=10)
    assert not pr.maybe_update(index)
    assert (pr.match, pr.next) == (5, 10)


def test_maybe_update_never_moves_next_backwards() -> None:
    pr = progress(ProgressState.REPLICATE, match=2, next_index=10)
    assert pr.maybe_update(4)
    assert (pr.match, pr.next) == (4, 10)


# -- maybe_decrease_to ----------------------------------------------------------------------
@pytest.mark.parametrize("rejected", [3, 5])
def test_replicate_ignores_a_rejection_at_or_below_the_match(rejected: int) -> None:
    pr = progress(ProgressState.REPLICATE, match=5, next_index=10)
    assert not pr.maybe_decrease_to(rejected, 0)
    assert pr.next == 10


def test_replicate_falls_back_to_right_after_the_match_on_a_fresh_rejection() -> None:
    pr = progress(ProgressState.REPLICATE, match=5, next_index=10)
    assert pr.maybe_decrease_to(8, 2)
    assert pr.next == 6


@pytest.mark.parametrize("rejected", [5, 9, 3])
def test_probe_ignores_a_rejection_of_another_prev_index(rejected: int) -> None:
    pr = progress(ProgressState.PROBE, match=0, next_index=8)
    pr.probe_sent = True
    assert not pr.maybe_decrease_to(rejected, 1)
    assert pr.next == 8
    assert pr.probe_sent


@pytest.mark.parametrize(
    ("match", "rejected", "hint", "expected_next"),
    [
        (0, 7, 2, 3),  # jump straight past the follower's hint
        (0, 7, 10, 7),  # a hint beyond the rejected index cannot move next forward
        (4, 7, 1, 5),  # never below match + 1
        (0, 7, 0, 1),
    ],
)
def test_probe_moves_next_to_the_hint_on_rejection(
    match: int, rejected: int, hint: int, expected_next: int
) -> None:
    pr = progress(ProgressState.PROBE, match=match, next_index=rejected + 1)
    pr.probe_sent = True
    assert pr.maybe_decrease_to(rejected, hint)
    assert pr.next == expected_next
    assert not pr.probe_sent


# -- inflights ------------------------------------------------------------------------------
def test_inflights_window_fills_and_refuses_more() -> None:
    inf = Inflights(3)
    for i in (2, 4, 6):
        assert not inf.full()
        inf.add(i)
    assert inf.full()
    with pytest.raises(OverflowError):
        inf.add(8)


def test_inflights_free_up_to_releases_every_append_at_or_below_the_index() -> None:
    inf = Inflights(4)
    for i in (2, 4, 6, 8):
        inf.add(i)
    inf.free_up_to(5)
    assert len(inf) == 2
    assert not inf.full()
    inf.free_up_to(1)
    assert len(inf) == 2
    inf.free_up_to(8)
    assert len(inf) == 0


def test_inflights_free_first_and_reset() -> None:
    inf = Inflights(2)
    inf.add(1)
    inf.add(2)
    inf.free_first()
    assert len(inf) == 1
    inf.reset()
    assert len(inf) == 0
    inf.free_first()  # freeing an empty window is harmless
    assert len(inf) == 0


def test_replicate_is_paused_exactly_when_the_window_is_full() -> None:
    pr = progress(ProgressState.REPLICATE, match=0, next_index=1, window=2)
    pr.inflights.add(1)
    assert not pr.is_paused()
    pr.inflights.add(2)
    assert pr.is_paused()
    pr.inflights.free_up_to(1)
    assert not pr.is_paused()
