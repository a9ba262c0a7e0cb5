"""benchmarks.accounting: a run's CPU per operation, per process, per worker request."""

from __future__ import annotations

import math

import pytest

from benchmarks.accounting import MIN_WORKER_REQUESTS, WorkerCounts, account
from benchmarks.procstat import CLK_TCK, NodeSample, ProcSample, node_usage


def ps(pid: int, cpu_s: float, cs: int = 0, start: int = 1) -> ProcSample:
    return ProcSample(pid, start, cpu_s, 0.0, cs, 0, 1)


LEADER, FOLLOWER = "127.0.0.1:1", "127.0.0.1:2"


def test_per_op_figures_by_process_and_node_role() -> None:
    usage = {
        LEADER: node_usage(NodeSample(ps(1, 10.0, 100), {11: ps(11, 5.0), 12: ps(12, 5.0)}),
                           NodeSample(ps(1, 10.5, 1100), {11: ps(11, 5.6), 12: ps(12, 5.4)})),
        FOLLOWER: node_usage(NodeSample(ps(2, 3.0), {21: ps(21, 1.0)}),
                             NodeSample(ps(2, 3.2), {21: ps(21, 1.0)})),
    }
    cpu = account(usage, LEADER, ops=1000, window_s=2.0, main_name="raft")
    assert cpu.server_cpu_s == pytest.approx(1.7)
    assert cpu.server_ms_per_op == pytest.approx(1.7)
    assert cpu.server_cores == pytest.approx(0.85)
    assert cpu.leader_cores == pytest.approx(0.75)
    assert cpu.leader_us_per_op == pytest.approx(1500)
    assert cpu.leader_main_us_per_op == pytest.approx(500)
    assert cpu.leader_main_cs_per_op == pytest.approx(1.0)
    assert cpu.leader_main_voluntary_cs_per_op == pytest.approx(1.0)
    assert cpu.follower_main_us_per_op == {FOLLOWER: pytest.approx(200)}
    assert cpu.follower_us_per_op == {FOLLOWER: pytest.approx(200)}
    assert cpu.node_cpu_s == {LEADER: pytest.approx(1.5), FOLLOWER: pytest.approx(0.2)}
    roles = {(r.node_role, r.process, r.pid) for r in cpu.processes}
    assert roles == {("leader", "raft", 1), ("leader", "worker", 11), ("leader", "worker", 12),
                     ("follower", "raft", 2), ("follower", "worker", 21)}
    assert cpu.leader_worker_us_per_request == {}  # no worker counts given


def test_worker_us_per_request_is_quiet_to_quiet_and_needs_enough_requests() -> None:
    before = WorkerCounts({11: (0, 1000), 12: (1, 50), 13: (2, 10)},
                          NodeSample(ps(1, 0.0), {11: ps(11, 1.0), 12: ps(12, 1.0),
                                                  13: ps(13, 1.0)}))
    after = WorkerCounts({11: (0, 3000), 12: (1, 50 + MIN_WORKER_REQUESTS - 1),
                          14: (2, 500)},  # worker 2 was restarted: a new pid
                         NodeSample(ps(1, 0.0), {11: ps(11, 1.4), 12: ps(12, 1.1),
                                                 14: ps(14, 0.2)}))
    window = node_usage(before.sample, after.sample)
    cpu = account({LEADER: window}, LEADER, ops=2000, window_s=1.0, main_name="raft",
                  before={LEADER: before}, after={LEADER: after})
    assert cpu.leader_worker_us_per_request == {"0": pytest.approx(200)}
    rows = {r.pid: r for r in cpu.processes if r.process == "worker"}
    assert rows[11].requests == 2000 and rows[11].worker == 0
    assert rows[12].requests == MIN_WORKER_REQUESTS - 1 and rows[12].us_per_request is None
    assert rows[14].worker == 2 and rows[14].requests is None  # no count from before
    assert rows[13].seen == "gone"
    assert cpu.processes_changed == 2


def test_no_ops_gives_nan_not_a_crash() -> None:
    usage = {LEADER: node_usage(NodeSample(ps(1, 1.0)), NodeSample(ps(1, 1.0 + 1 / CLK_TCK)))}
    cpu = account(usage, LEADER, ops=0, window_s=1.0, main_name="etcd")
    assert math.isnan(cpu.server_ms_per_op)
    assert cpu.processes[0].process == "etcd"
