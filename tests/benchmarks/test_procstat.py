"""benchmarks.procstat: /proc parsing, and what each process of a node spent between two
samples, on fake /proc trees and on real short-lived processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.procstat import (
    APPEARED,
    BOTH,
    CLK_TCK,
    GONE,
    NodeSample,
    ProcSample,
    child_pids,
    node_usage,
    parse_ctxt_switches,
    parse_stat,
    read_sample,
    sample_node,
)
from raftkv.localcluster import wait_until


def stat_line(pid: int, comm: str, utime: int, stime: int, cutime: int = 0, cstime: int = 0,
              start: int = 1000) -> str:
    """A /proc/<pid>/stat line: fields 14-17 and 22 as given, the rest plausible."""
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560", "100", "0", "0", "0",
              str(utime), str(stime), str(cutime), str(cstime), "20", "0", "1", "0",
              str(start), "1000000", "100"] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def status_text(voluntary: int, involuntary: int) -> str:
    return (f"Name:\tpython\nState:\tS (sleeping)\nThreads:\t1\n"
            f"voluntary_ctxt_switches:\t{voluntary}\n"
            f"nonvoluntary_ctxt_switches:\t{involuntary}\n")


def fake_process(proc: Path, pid: int, *, utime: int, stime: int, cutime: int = 0,
                 start: int = 1000, threads: dict[int, tuple[int, int]] | None = None,
                 children: dict[int, list[int]] | None = None) -> None:
    base = proc / str(pid)
    (base / "task").mkdir(parents=True, exist_ok=True)
    (base / "stat").write_text(stat_line(pid, "python -m x", utime, stime, cutime,
                                         start=start))
    for tid, (v, i) in (threads or {pid: (0, 0)}).items():
        (base / "task" / str(tid)).mkdir(exist_ok=True)
        (base / "task" / str(tid) / "status").write_text(status_text(v, i))
        kids = (children or {}).get(tid, [])
        (base / "task" / str(tid) / "children").write_text(
            "".join(f"{k} " for k in kids))


# --------------------------------------------------------------------------- parsing
def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    line = stat_line(42, "weird) (name", utime=250, stime=50, cutime=30, cstime=20, start=777)
    start, cpu_s, children_s = parse_stat(line)
    assert start == 777
    assert cpu_s == pytest.approx(300 / CLK_TCK)
    assert children_s == pytest.approx(50 / CLK_TCK)


def test_parse_ctxt_switches() -> None:
    assert parse_ctxt_switches(status_text(12, 3)) == (12, 3)
    assert parse_ctxt_switches("Name:\tx\n") == (0, 0)


def test_read_sample_sums_context_switches_over_threads(tmp_path: Path) -> None:
    fake_process(tmp_path, 10, utime=100, stime=20, threads={10: (5, 1), 11: (7, 2)})
    s = read_sample(10, tmp_path)
    assert s is not None
    assert s.cpu_s == pytest.approx(120 / CLK_TCK)
    assert (s.voluntary_cs, s.involuntary_cs, s.threads) == (12, 3, 2)
    assert read_sample(99, tmp_path) is None


def test_children_of_every_thread_are_found(tmp_path: Path) -> None:
    fake_process(tmp_path, 10, utime=1, stime=1, threads={10: (0, 0), 11: (0, 0)},
                 children={10: [20, 21], 11: [22]})
    for pid in (20, 21, 22):
        fake_process(tmp_path, pid, utime=pid, stime=0)
    assert child_pids(10, tmp_path) == [20, 21, 22]
    node = sample_node(10, tmp_path)
    assert set(node.children) == {20, 21, 22}
    assert node.children[21].cpu_s == pytest.approx(21 / CLK_TCK)


# --------------------------------------------------------------------------- the window
def sample(pid: int, cpu_ticks: int, cs: int = 0, start: int = 1000,
           children_ticks: int = 0) -> ProcSample:
    return ProcSample(pid, start, cpu_ticks / CLK_TCK, children_ticks / CLK_TCK, cs, 0, 1)


def test_a_process_seen_at_both_ends_counts_its_difference() -> None:
    u = node_usage(NodeSample(sample(1, 100, 10), {2: sample(2, 50, 5)}),
                   NodeSample(sample(1, 160, 25), {2: sample(2, 80, 9)}))
    assert u.main is not None and u.main.seen == BOTH
    assert u.main.cpu_s == pytest.approx(60 / CLK_TCK)
    assert u.main.context_switches == 15
    assert [(c.pid, c.seen, c.context_switches) for c in u.children] == [(2, BOTH, 4)]
    assert u.cpu_s == pytest.approx(90 / CLK_TCK)
    assert u.children_changed == 0


def test_a_worker_that_appeared_counts_all_it_spent() -> None:
    u = node_usage(NodeSample(sample(1, 100)), NodeSample(sample(1, 100), {3: sample(3, 40, 7)}))
    (child,) = u.children
    assert (child.seen, child.context_switches) == (APPEARED, 7)
    assert child.cpu_s == pytest.approx(40 / CLK_TCK)
    assert u.children_changed == 1


def test_a_worker_that_ended_is_found_in_its_parents_reaped_time() -> None:
    # Worker 2 had spent 50 ticks at the open, died at 80 and was reaped; worker 4 started
    # and ended inside the window having spent 15: cutime grew by 80 + 15.
    opened = NodeSample(sample(1, 100, children_ticks=0), {2: sample(2, 50)})
    closed = NodeSample(sample(1, 110, children_ticks=95), {})
    u = node_usage(opened, closed)
    (gone,) = u.children
    assert (gone.pid, gone.seen, gone.cpu_s) == (2, GONE, 0.0)
    assert u.reaped_cpu_s == pytest.approx((30 + 15) / CLK_TCK)
    assert u.cpu_s == pytest.approx((10 + 30 + 15) / CLK_TCK)


def test_a_reused_pid_is_a_new_process() -> None:
    opened = NodeSample(sample(1, 100), {2: sample(2, 500, start=1000)})
    closed = NodeSample(sample(1, 100, children_ticks=520), {2: sample(2, 30, start=5000)})
    u = node_usage(opened, closed)
    assert sorted((c.seen, round(c.cpu_s * CLK_TCK)) for c in u.children) == [
        (APPEARED, 30), (GONE, 0)]
    assert u.reaped_cpu_s == pytest.approx(20 / CLK_TCK)


# --------------------------------------------------------------------------- real processes
PARENT = textwrap.dedent("""
    import subprocess, sys
    burn = "while True: pass"
    child = None
    for line in sys.stdin:
        if line.strip() == "spawn":
            child = subprocess.Popen([sys.executable, "-c", burn])
            print(child.pid, flush=True)
        elif line.strip() == "reap":
            child.kill()
            child.wait()
            print("reaped", flush=True)
""")


def test_real_processes_a_child_that_appears_burns_and_is_reaped() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdin is not None and parent.stdout is not None
    child = 0
    try:
        first = sample_node(parent.pid)
        assert first.main is not None and first.children == {}
        parent.stdin.write("spawn\n")
        parent.stdin.flush()
        child = int(parent.stdout.readline())

        def burned(at_least: float) -> bool:
            s = read_sample(child)
            return s is not None and s.cpu_s >= at_least

        wait_until(lambda: burned(0.2), 30, "the child to burn 0.2 s of CPU")
        second = sample_node(parent.pid)
        assert child in second.children
        appeared = node_usage(first, second)
        (c,) = appeared.children
        assert c.seen == APPEARED and c.cpu_s >= 0.2

        spent = second.children[child].cpu_s
        wait_until(lambda: burned(spent + 0.2), 30, "the child to burn 0.2 s more")
        parent.stdin.write("reap\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "reaped"
        third = sample_node(parent.pid)
        assert third.children == {}
        gone = node_usage(second, third)
        assert [x.seen for x in gone.children] == [GONE]
        assert gone.reaped_cpu_s >= 0.2 - 2 / CLK_TCK
        assert gone.cpu_s >= gone.reaped_cpu_s
    finally:
        if child and read_sample(child) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
