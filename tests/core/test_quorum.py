"""Majority arithmetic (raftkv/core/quorum.py), checked against brute-force definitions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftkv.core.quorum import VoteResult, has_quorum, majority, quorum_index, vote_result

NAMES = [f"n{i}" for i in range(1, 8)]
voter_sets = st.frozensets(st.sampled_from(NAMES), max_size=7)
# Acks may name non-voters too: they must never count.
acked_maps = st.dictionaries(st.sampled_from([*NAMES, "x1", "x2"]), st.integers(0, 20))
vote_maps = st.dictionaries(st.sampled_from([*NAMES, "x1"]), st.booleans())


@pytest.mark.parametrize(("size", "expected"), [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (5, 3),
                                                (6, 4), (7, 4)])
def test_majority_is_more_than_half(size: int, expected: int) -> None:
    assert majority(NAMES[:size]) == expected


def brute_force_quorum_index(voters: frozenset[str], acked: dict[str, int]) -> int:
    """The largest v that at least a majority of voters reached."""
    candidates = {0} | {acked.get(v, 0) for v in voters}
    return max(
        v for v in candidates
        if sum(1 for voter in voters if acked.get(voter, 0) >= v) >= len(voters) // 2 + 1
    )


@given(voter_sets.filter(bool), acked_maps)
def test_quorum_index_is_the_largest_value_a_majority_reached(
    voters: frozenset[str], acked: dict[str, int]
) -> None:
    assert quorum_index(voters, acked) == brute_force_quorum_index(voters, acked)


def test_quorum_index_of_no_voters_is_zero() -> None:
    assert quorum_index(frozenset(), {"n1": 5}) == 0


@pytest.mark.parametrize(
    ("size", "acked", "expected"),
    [
        (1, {"n1": 7}, 7),
        (3, {}, 0),
        (3, {"n1": 5}, 0),
        (3, {"n1": 5, "n2": 3}, 3),
        (3, {"n1": 5, "n2": 3, "n3": 4}, 4),
        (4, {"n1": 5, "n2": 5, "n3": 1, "n4": 1}, 1),  # even size: 2 of 4 is not a quorum
        (4, {"n1": 5, "n2": 5, "n3": 5, "n4": 1}, 5),
    ],
)
def test_quorum_index_examples(size: int, acked: dict[str, int], expected: int) -> None:
    assert quorum_index(NAMES[:size], acked) == expected


def test_quorum_index_ignores_non_voters() -> None:
    assert quorum_index({"n1", "n2", "n3"}, {"n1": 9, "x1": 9, "x2": 9}) == 0


@pytest.mark.parametrize(
    ("size", "votes", "expected"),
    [
        (1, {"n1": True}, VoteResult.WON),
        (1, {"n1": False}, VoteResult.LOST),
        (1, {}, VoteResult.PENDING),
        (3, {"n1": True}, VoteResult.PENDING),
        (3, {"n1": True, "n2": True}, VoteResult.WON),
        (3, {"n1": True, "n2": False}, VoteResult.PENDING),
        (3, {"n1": True, "n2": False, "n3": False}, VoteResult.LOST),
        (4, {"n1": True, "n2": True}, VoteResult.PENDING),
        (4, {"n1": True, "n2": True, "n3": False}, VoteResult.PENDING),
        (4, {"n1": True, "n2": True, "n3": False, "n4": False}, VoteResult.LOST),
        (4, {"n1": True, "n2": False, "n3": False}, VoteResult.LOST),
        (4, {"n1": True, "n2": True, "n3": True}, VoteResult.WON),
        (5, {"n1": True, "n2": True, "n3": False, "n4": False}, VoteResult.PENDING),
        (5, {"n1": True, "x1": True, "n2": True}, VoteResult.PENDING),  # x1 is not a voter
    ],
)
def test_vote_result_examples(size: int, votes: dict[str, bool], expected: VoteResult) -> None:
    assert vote_result(NAMES[:size], votes) is expected


def test_vote_result_of_no_voters_is_lost() -> None:
    assert vote_result(frozenset(), {"n1": True}) is VoteResult.LOST


@given(voter_sets.filter(bool), vote_maps)
def test_vote_result_matches_counting(voters: frozenset[str], votes: dict[str, bool]) -> None:
    need = len(voters) // 2 + 1
    granted = sum(1 for v in voters if votes.get(v) is True)
    undecided = sum(1 for v in voters if v not in votes)
    if granted >= need:
        expected = VoteResult.WON
    elif granted + undecided < need:
        expected = VoteResult.LOST
    else:
        expected = VoteResult.PENDING
    assert vote_result(voters, votes) is expected


@given(voter_sets, st.frozensets(st.sampled_from([*NAMES, "x1"])))
def test_has_quorum_means_a_majority_of_voters_is_active(
    voters: frozenset[str], active: frozenset[str]
) -> None:
    expected = bool(voters) and len(voters & active) > len(voters) / 2
    assert has_quorum(voters, active) is expected
