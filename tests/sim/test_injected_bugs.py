"""The simulator must catch classic Raft bugs: each is injected into the core (only inside its
test, with monkeypatch) and must be reported within a bounded number of seeds; the same seeds
must pass without it, so the violation is the bug's.

Several invariants look straight at the durability rules (a vote or an ack leaves only after
the persist, a commit needs a majority on disk, a read index is never behind the commit
index, ...). Those catch the durability bugs at once; for them the test also searches with
those direct checks off, to show that the end-to-end checks (election safety, leader
completeness, committed log, linearizability of the client history) catch them as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from raftkv.core.log import LogInvariantError, RaftLog
from raftkv.core.messages import Message, VoteRequest, VoteResponse
from raftkv.core.node import RaftNode
from raftkv.core.types import Entry
from tests.sim.cluster import SimFailure, SimOptions, SimSummary, run_seed
from tests.sim.profiles import DIVERGENCE, FIGURE8, PERSIST_CRASHES, STALE_READS, Profile
from tests.sim.test_sim import figure8

pytestmark = pytest.mark.sim

MAX_SEEDS = 200
"""A bug must be caught within this many seeds."""


# =========================================================================================
# The bugs, at the core's hook points
# =========================================================================================
def commit_previous_term_by_count(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(RaftNode, "_may_commit_by_count", lambda self, index: True)


def vote_before_persist(mp: pytest.MonkeyPatch) -> None:
    original = RaftNode._send_after_persist

    def send_after_persist(self: RaftNode, m: Message) -> None:
        if isinstance(m, VoteResponse):
            self._send(m)
        else:
            original(self, m)

    mp.setattr(RaftNode, "_send_after_persist", send_after_persist)


def read_without_quorum(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(RaftNode, "_read_needs_quorum_check", lambda self: False)


def vote_for_stale_candidate(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(RaftLog, "is_up_to_date", lambda self, last_index, last_term: True)


def keep_conflicting_suffix(mp: pytest.MonkeyPatch) -> None:
    def maybe_append(
        self: RaftLog, prev_index: int, prev_term: int, entries: Sequence[Entry]
    ) -> int | None:
        if not self.match_term(prev_index, prev_term):
            return None
        for e in entries:
            if self.match_term(e.index, e.term):
                continue
            if e.index <= self.commit:
                raise LogInvariantError(f"entry {e.index} conflicts with a committed entry")
            if e.index <= self.last_index():
                # The bug: overwrite in place and keep the stale entries after it.
                self._entries[e.index - self._offset] = e
                self.stable_index = min(self.stable_index, e.index - 1)
            else:
                self.append(e)
            self.unstable_from = min(self.unstable_from, e.index)
        return prev_index + len(entries)

    mp.setattr(RaftLog, "maybe_append", maybe_append)


def leader_counts_unpersisted(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(RaftNode, "_leader_self_match", lambda self: self.log.last_index())


def pre_vote_changes_term(mp: pytest.MonkeyPatch) -> None:
    original = RaftNode._step_vote_request

    def step_vote_request(self: RaftNode, m: VoteRequest) -> None:
        if m.pre_vote and m.term > self.term:
            self.term = m.term
            self.vote = None
        original(self, m)

    mp.setattr(RaftNode, "_step_vote_request", step_vote_request)


@dataclass(frozen=True, slots=True)
class InjectedBug:
    key: str
    description: str
    inject: Callable[[pytest.MonkeyPatch], None]
    profile: Profile
    nodes: int
    end_to_end: str | None = None
    """How to show the bug without the direct durability checks: "seeds" (search again with
    them off) or "figure8" (the scripted Figure 8 scenario)."""


BUGS = (
    InjectedBug("a", "commit a previous-term entry by counting replicas",
                commit_previous_term_by_count, FIGURE8, 5, end_to_end="figure8"),
    InjectedBug("b", "answer a vote before persisting it",
                vote_before_persist, PERSIST_CRASHES, 3, end_to_end="seeds"),
    InjectedBug("c", "serve ReadIndex without the heartbeat quorum",
                read_without_quorum, STALE_READS, 5, end_to_end="seeds"),
    InjectedBug("d", "grant a vote to a less up-to-date candidate",
                vote_for_stale_candidate, DIVERGENCE, 5),
    InjectedBug("e", "a follower keeps a conflicting suffix instead of truncating it",
                keep_conflicting_suffix, DIVERGENCE, 5),
    InjectedBug("f", "the leader counts itself for entries it has not persisted",
                leader_counts_unpersisted, PERSIST_CRASHES, 3, end_to_end="seeds"),
    InjectedBug("g", "a pre-vote changes the voter's term",
                pre_vote_changes_term, DIVERGENCE, 3),
)


def _violation_of(report: str) -> str:
    """The violation part of a SimFailure report, on one line."""
    lines = report.splitlines()[1:]
    end = next((i for i, line in enumerate(lines) if line.startswith("last ")), len(lines))
    text = " / ".join(line.strip() for line in lines[:end] if line.strip())
    return text if len(text) <= 240 else text[:237] + "..."


def _first_failing_seed(bug: InjectedBug, options: SimOptions) -> tuple[int, str] | None:
    for seed in range(MAX_SEEDS):
        try:
            run_seed(seed, bug.profile, bug.nodes, options,
                     replay_hint=f"pytest tests/sim/test_injected_bugs.py -k 'bug_{bug.key}'")
        except SimFailure as failure:
            return seed, str(failure)
    return None


@pytest.mark.parametrize("bug", BUGS, ids=lambda b: f"bug_{b.key}")
def test_injected_bug_is_caught(bug: InjectedBug, sim_summary: SimSummary) -> None:
    with pytest.MonkeyPatch.context() as mp:
        bug.inject(mp)
        found = _first_failing_seed(bug, SimOptions())
        assert found is not None, (
            f"injected bug ({bug.key}) {bug.description} was not caught in {MAX_SEEDS} seeds "
            f"of profile {bug.profile.name}"
        )
        seed, report = found
        violation = _violation_of(report)
        record: dict[str, object] = {
            "description": bug.description,
            "seed": seed,
            "seeds_needed": seed + 1,
            "profile": f"{bug.profile.name}/{bug.nodes}",
            "violation": violation,
        }
        if bug.end_to_end == "seeds":
            e2e = _first_failing_seed(bug, SimOptions(direct_checks=False))
            assert e2e is not None, (
                f"bug ({bug.key}) is caught only by the direct durability checks"
            )
            record["end_to_end"] = (
                f"seed {e2e[0]} without the direct checks: {_violation_of(e2e[1])}"
            )
        elif bug.end_to_end == "figure8":
            with pytest.raises(SimFailure) as caught:
                figure8(1, SimOptions(max_append_entries=1, direct_checks=False))
            record["end_to_end"] = (
                f"scripted Figure 8 without the direct checks: "
                f"{_violation_of(str(caught.value))}"
            )
    # Without the bug, every seed searched passes.
    for s in range(seed + 1):
        run_seed(s, bug.profile, bug.nodes)
    if bug.end_to_end == "figure8":
        figure8(1, SimOptions(max_append_entries=1, direct_checks=False))
    sim_summary.injected_bugs[bug.key] = record
    print(f"\ninjected bug ({bug.key}) {bug.description}: caught at seed {seed} "
          f"({seed + 1} seed(s), {bug.profile.name}/{bug.nodes}): {violation}")
