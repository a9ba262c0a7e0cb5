"""CPU time and context switches of server processes, read from /proc, and what each process
spent between two samples (the benchmark's measurement window).

A node is a main process (a raftkv node's Raft process; an etcd member) and its child
processes (a raftkv node's HTTP workers). `sample_node` reads, for the main process and every
child it has at that moment:

- CPU: utime + stime of /proc/<pid>/stat (fields 14 and 15: every thread of the process, the
  threads that ended included), and cutime + cstime (16, 17: the children it has reaped);
- context switches: voluntary_ctxt_switches + nonvoluntary_ctxt_switches of
  /proc/<pid>/task/<tid>/status, summed over the threads alive at the sample (the kernel counts
  them per thread; a thread that ended between two samples takes its count with it);
- the start time (field 22), which tells a process apart from a later one given the same pid.

`node_usage(opened, closed)` is what each process spent in between:

- a process seen at both samples: the difference;
- a process seen only at the close (a worker started during the window): all it spent, since
  it spent all of it in the window;
- a process seen only at the open (a worker that ended during the window): its own figures
  are gone with it, but once the main process reaped it, its whole CPU time was added to the
  main process's cutime + cstime. So the node's `reaped_cpu_s` is the growth of the main
  process's cutime + cstime less what those processes had spent by the open (a process that
  both started and ended in the window is counted whole). Their context switches are lost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "APPEARED",
    "BOTH",
    "GONE",
    "PROC",
    "NodeSample",
    "NodeUsage",
    "ProcSample",
    "ProcessUsage",
    "child_pids",
    "node_usage",
    "process_usage",
    "read_sample",
    "sample_node",
    "usage_by_node",
]

PROC: Final = Path("/proc")
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

BOTH: Final = "both"
"""Seen at the open and at the close."""
APPEARED: Final = "appeared"
"""Seen at the close only: started during the window."""
GONE: Final = "gone"
"""Seen at the open only: ended during the window."""


@dataclass(frozen=True, slots=True)
class ProcSample:
    pid: int
    start_ticks: int
    """Field 22 of /proc/<pid>/stat: with the pid, names the process."""
    cpu_s: float
    """utime + stime, seconds."""
    children_cpu_s: float
    """cutime + cstime: the CPU of the children it has reaped, seconds."""
    voluntary_cs: int
    involuntary_cs: int
    threads: int


def parse_stat(text: str) -> tuple[int, float, float]:
    """(start ticks, utime + stime seconds, cutime + cstime seconds) of a /proc/<pid>/stat
    line. The command name, in parentheses, may hold spaces and parentheses: the fields are
    counted from the last ')'."""
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): field n is fields[n - 3].
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return int(fields[19]), (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


def parse_ctxt_switches(text: str) -> tuple[int, int]:
    """(voluntary, nonvoluntary) context switches of a /proc/<pid>/task/<tid>/status text."""
    voluntary = involuntary = 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "voluntary_ctxt_switches":
            voluntary = int(value)
        elif name == "nonvoluntary_ctxt_switches":
            involuntary = int(value)
    return voluntary, involuntary


def read_sample(pid: int, proc: Path = PROC) -> ProcSample | None:
    """The process's figures now; None if it is gone."""
    base = proc / str(pid)
    try:
        start, cpu_s, children_s = parse_stat((base / "stat").read_text())
        tids = os.listdir(base / "task")
    except (OSError, ValueError, IndexError):
        return None
    voluntary = involuntary = 0
    for tid in tids:
        try:
            v, i = parse_ctxt_switches((base / "task" / tid / "status").read_text())
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        voluntary += v
        involuntary += i
    return ProcSample(pid, start, cpu_s, children_s, voluntary, involuntary, len(tids))


def child_pids(pid: int, proc: Path = PROC) -> list[int]:
    """The children of every thread of the process (/proc/<pid>/task/<tid>/children)."""
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        try:
            text = (proc / str(pid) / "task" / tid / "children").read_text()
        except OSError:
            continue
        found += [int(p) for p in text.split()]
    return sorted(set(found))


@dataclass(frozen=True, slots=True)
class NodeSample:
    """One node's processes at one moment."""

    main: ProcSample | None
    children: dict[int, ProcSample] = field(default_factory=dict)
    """By pid."""


def sample_node(pid: int, proc: Path = PROC, *, with_children: bool = True) -> NodeSample:
    main = read_sample(pid, proc)
    if main is None or not with_children:
        return NodeSample(main)
    children = {}
    for child in child_pids(pid, proc):
        s = read_sample(child, proc)
        if s is not None:
            children[child] = s
    return NodeSample(main, children)


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    pid: int
    cpu_s: float
    voluntary_cs: int
    involuntary_cs: int
    seen: str
    """BOTH, APPEARED or GONE (see the module doc)."""

    @property
    def context_switches(self) -> int:
        return self.voluntary_cs + self.involuntary_cs


def process_usage(opened: ProcSample | None, closed: ProcSample | None) -> ProcessUsage | None:
    """What one process (one pid) spent between the samples (module doc)."""
    if opened is not None and closed is not None and opened.start_ticks != closed.start_ticks:
        opened = None  # the pid was reused: a new process
    if closed is None:
        if opened is None:
            return None
        return ProcessUsage(opened.pid, 0.0, 0, 0, GONE)
    if opened is None:
        return ProcessUsage(closed.pid, closed.cpu_s, closed.voluntary_cs,
                            closed.involuntary_cs, APPEARED)
    return ProcessUsage(closed.pid, max(0.0, closed.cpu_s - opened.cpu_s),
                        max(0, closed.voluntary_cs - opened.voluntary_cs),
                        max(0, closed.involuntary_cs - opened.involuntary_cs), BOTH)


@dataclass(frozen=True, slots=True)
class NodeUsage:
    main: ProcessUsage | None
    children: tuple[ProcessUsage, ...]
    reaped_cpu_s: float
    """CPU that children which ended in the window spent in it (module doc)."""

    @property
    def cpu_s(self) -> float:
        own = 0.0 if self.main is None else self.main.cpu_s
        return own + sum(c.cpu_s for c in self.children) + self.reaped_cpu_s

    @property
    def children_changed(self) -> int:
        """Children that started or ended during the window."""
        return sum(1 for c in self.children if c.seen != BOTH)


def node_usage(opened: NodeSample, closed: NodeSample) -> NodeUsage:
    main = process_usage(opened.main, closed.main)
    children: list[ProcessUsage] = []
    gone_before_s = 0.0
    for pid in sorted(set(opened.children) | set(closed.children)):
        before, after = opened.children.get(pid), closed.children.get(pid)
        usage = process_usage(before, after)
        if usage is None:
            continue
        if before is not None and (after is None or after.start_ticks != before.start_ticks):
            gone_before_s += before.cpu_s
            if after is not None:  # the pid was reused: the old process ended too
                children.append(ProcessUsage(pid, 0.0, 0, 0, GONE))
        children.append(usage)
    reaped = 0.0
    if main is not None and main.seen == BOTH and opened.main and closed.main:
        grown = closed.main.children_cpu_s - opened.main.children_cpu_s
        reaped = max(0.0, grown - gone_before_s) if grown > 0 else 0.0
    return NodeUsage(main, tuple(children), reaped)


def usage_by_node(opened: Mapping[str, NodeSample],
                  closed: Mapping[str, NodeSample]) -> dict[str, NodeUsage]:
    """node_usage of every node sampled at both ends."""
    return {node: node_usage(opened[node], closed[node])
            for node in opened if node in closed}
