"""benchmarks.commit_cycle: its figures are of replication that happened (every write answered
and applied alike on the three nodes), and a cluster that does not replicate fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import commit_cycle
from benchmarks.bench_storage import parse_args, run_cycle_benchmarks
from raftkv.core.messages import AppendRequest
from raftkv.runtime.driver import RaftDriver


def test_a_run_times_every_phase_of_commits_that_replicated(tmp_path: Path) -> None:
    result = commit_cycle.measure(tmp_path, 4, 30, synced=False)
    assert (result.writes, result.commits, result.synced) == (4, 30, False)
    assert result.leader_user_us + result.leader_sys_us > 0
    assert result.follower_user_us + result.follower_sys_us > 0
    assert list(tmp_path.iterdir()) == []  # its stores are removed


def test_a_follower_that_drops_appends_fails_the_run(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the followers' acks nothing commits: no write is answered."""
    step = RaftDriver.step

    def deaf_follower(self: RaftDriver, peer: str, m: object) -> str | None:
        if self.core.id == "n3" or (self.core.id == "n2" and peer == commit_cycle.LEADER
                                    and isinstance(m, AppendRequest) and m.entries):
            return None  # dropped
        return step(self, peer, m)  # type: ignore[arg-type]

    monkeypatch.setattr(RaftDriver, "step", deaf_follower)
    with pytest.raises(commit_cycle.CycleError, match="writes were answered"):
        commit_cycle.measure(tmp_path, 2, 5, synced=False)


def test_the_storage_benchmark_section_prints_each_batch_synced_and_not(tmp_path: Path) -> None:
    args = parse_args(["--repetitions", "1", "--cycle-writes", "1,3", "--cycle-commits", "5"])
    table = run_cycle_benchmarks(args, tmp_path)
    lines = table.splitlines()
    rows = [line.split() for line in lines[3:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "synced"), ("1", "no"), ("3", "synced"),
                                          ("3", "no")]
    assert "5 commits" in lines[0]


def test_writes_per_commit_are_checked() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--cycle-writes", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--cycle-commits", "0"])
    assert parse_args(["--cycle-writes", ""]).cycle_writes == []
