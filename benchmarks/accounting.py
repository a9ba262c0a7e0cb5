"""Where the servers' CPU went in one run: per process, per operation.

Inputs: what every process of every node spent in the measurement window
(benchmarks.procstat.NodeUsage, by node), the operations completed in that window, which node
led, and, for raftkv, each node's per-worker request counts read at a quiet moment before and
after the run (benchmarks.clusters.WorkerCounts).

- us/op, context switches/op: a process's CPU (context switches) in the window divided by the
  operations completed in the window (keys for batches; acknowledged writes for the watch
  point). The window is the load generator's; the servers are sampled when it opens and
  closes.
- us/request of a raftkv worker: its CPU divided by the requests it answered, both counted
  from the quiet moment before the run to the quiet moment after it (warmup and drain
  included), because a worker's request count reaches /status only about once a second. A
  worker restarted in between has no such figure, nor has one that answered fewer than
  MIN_WORKER_REQUESTS (the harness's own few requests, at 10 ms of CPU clock resolution,
  would make a meaningless figure).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from benchmarks.procstat import BOTH, NodeSample, NodeUsage, ProcessUsage, process_usage

__all__ = ["CpuRecord", "ProcessRow", "WorkerCounts", "account"]

LEADER: Final = "leader"
FOLLOWER: Final = "follower"
MIN_WORKER_REQUESTS: Final = 100


@dataclass(frozen=True, slots=True)
class WorkerCounts:
    """One raftkv node's HTTP workers at one quiet moment: the requests each has answered
    since it started, and the node's processes sampled from /proc right then."""

    requests: dict[int, tuple[int, int]]
    """pid -> (worker index, requests answered since it started)."""
    sample: NodeSample


@dataclass(frozen=True, slots=True)
class ProcessRow:
    node: str
    node_role: str
    """LEADER or FOLLOWER (at the start of the run)."""
    process: str
    """`raft` (a raftkv node's Raft process), `worker`, or the system's name (an etcd member)."""
    pid: int
    worker: int | None
    """The worker's index (raftkv /status), when known."""
    seen: str
    """procstat.BOTH, APPEARED or GONE."""
    cpu_s: float
    context_switches: int
    """Voluntary + involuntary (preemptions: other tenants of the machine show there)."""
    voluntary_cs: int
    us_per_op: float
    cs_per_op: float
    requests: int | None = None
    """Requests the worker answered, quiet to quiet (module doc)."""
    run_cpu_s: float | None = None
    """Its CPU over that same span."""
    us_per_request: float | None = None


@dataclass(frozen=True, slots=True)
class CpuRecord:
    ops: int
    window_s: float
    server_cpu_s: float
    """Every process of every node, in the window."""
    server_ms_per_op: float
    server_cores: float
    leader_cores: float
    """Every process of the leader."""
    leader_us_per_op: float
    leader_main_us_per_op: float
    """The leader's Raft process (raftkv) or the leader member (etcd)."""
    leader_main_cs_per_op: float
    leader_main_voluntary_cs_per_op: float
    """The context switches it asked for (a wait, a blocking call), per op."""
    leader_worker_us_per_request: dict[str, float]
    """By worker index."""
    follower_main_us_per_op: dict[str, float]
    """By node: each follower's Raft process (etcd: the member)."""
    follower_us_per_op: dict[str, float]
    """By node: every process of each follower."""
    reaped_cpu_s: float
    """CPU of workers that ended in the window, found in their parent's (procstat)."""
    processes_changed: int
    """Processes that started or ended in the window (a worker restart: read with care)."""
    node_cpu_s: dict[str, float] = field(default_factory=dict)
    """By node: every process of it, reaped workers included."""
    processes: list[ProcessRow] = field(default_factory=list)


def _per(value: float, ops: int, scale: float) -> float:
    return value * scale / ops if ops > 0 else float("nan")


def _worker_runs(before: WorkerCounts | None,
                 after: WorkerCounts | None) -> dict[int, tuple[int, int, float]]:
    """pid -> (worker index, requests, CPU s) from quiet to quiet, for the workers that lived
    through both moments."""
    if before is None or after is None:
        return {}
    out: dict[int, tuple[int, int, float]] = {}
    for pid, (index, end_count) in after.requests.items():
        start = before.requests.get(pid)
        if start is None or start[0] != index:
            continue
        usage = process_usage(before.sample.children.get(pid), after.sample.children.get(pid))
        if usage is None or usage.seen != BOTH:
            continue
        out[pid] = (index, end_count - start[1], usage.cpu_s)
    return out


def account(usage: Mapping[str, NodeUsage], leader: str, ops: int, window_s: float,
            main_name: str, before: Mapping[str, WorkerCounts] | None = None,
            after: Mapping[str, WorkerCounts] | None = None) -> CpuRecord:
    """The run's CpuRecord (module doc). `usage`, `before` and `after` are by node (its
    client address); `main_name` names the node's main process (`raft`, `etcd`)."""
    rows: list[ProcessRow] = []
    follower_main: dict[str, float] = {}
    follower_all: dict[str, float] = {}
    worker_us: dict[str, float] = {}
    leader_main_us = leader_main_cs = leader_main_vcs = float("nan")
    for node, u in sorted(usage.items()):
        role = LEADER if node == leader else FOLLOWER
        index_of: dict[int, int] = {}
        for tally in ((before or {}).get(node), (after or {}).get(node)):
            if tally is not None:
                index_of.update({pid: idx for pid, (idx, _) in tally.requests.items()})
        runs = _worker_runs((before or {}).get(node), (after or {}).get(node))

        def row(p: ProcessUsage, kind: str, node: str = node, role: str = role,
                index_of: dict[int, int] = index_of,
                runs: dict[int, tuple[int, int, float]] = runs) -> ProcessRow:
            run = runs.get(p.pid) if kind == "worker" else None
            per_request = (run[2] * 1e6 / run[1]
                           if run is not None and run[1] >= MIN_WORKER_REQUESTS else None)
            return ProcessRow(
                node=node, node_role=role, process=kind, pid=p.pid,
                worker=index_of.get(p.pid) if kind == "worker" else None, seen=p.seen,
                cpu_s=p.cpu_s, context_switches=p.context_switches,
                voluntary_cs=p.voluntary_cs,
                us_per_op=_per(p.cpu_s, ops, 1e6), cs_per_op=_per(p.context_switches, ops, 1),
                requests=None if run is None else run[1],
                run_cpu_s=None if run is None else run[2], us_per_request=per_request)

        if u.main is not None:
            main_row = row(u.main, main_name)
            rows.append(main_row)
            if role == LEADER:
                leader_main_us, leader_main_cs = main_row.us_per_op, main_row.cs_per_op
                leader_main_vcs = _per(main_row.voluntary_cs, ops, 1)
            else:
                follower_main[node] = main_row.us_per_op
        for child in u.children:
            child_row = row(child, "worker")
            rows.append(child_row)
            if (role == LEADER and child_row.us_per_request is not None
                    and child_row.worker is not None):
                worker_us[str(child_row.worker)] = child_row.us_per_request
        if role == FOLLOWER:
            follower_all[node] = _per(u.cpu_s, ops, 1e6)
    total = sum(u.cpu_s for u in usage.values())
    lead = usage.get(leader)
    lead_cpu = lead.cpu_s if lead is not None else float("nan")
    seconds = max(window_s, 1e-9)
    return CpuRecord(
        ops=ops, window_s=window_s, server_cpu_s=total,
        server_ms_per_op=_per(total, ops, 1e3), server_cores=total / seconds,
        leader_cores=lead_cpu / seconds, leader_us_per_op=_per(lead_cpu, ops, 1e6),
        leader_main_us_per_op=leader_main_us, leader_main_cs_per_op=leader_main_cs,
        leader_main_voluntary_cs_per_op=leader_main_vcs,
        leader_worker_us_per_request=worker_us, follower_main_us_per_op=follower_main,
        follower_us_per_op=follower_all,
        reaped_cpu_s=sum(u.reaped_cpu_s for u in usage.values()),
        processes_changed=sum(u.children_changed for u in usage.values()),
        node_cpu_s={node: u.cpu_s for node, u in usage.items()}, processes=rows)
