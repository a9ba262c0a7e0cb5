"""benchmarks.bench_storage's commits-at-once section: each operation does what it says, the
processes' figures are pooled, a failing process fails the figure instead of hanging it."""

from __future__ import annotations

import argparse
import multiprocessing
import os
from multiprocessing.queues import Queue
from pathlib import Path

import pytest

from benchmarks import bench_storage
from benchmarks.bench_storage import (
    PAGE,
    Operation,
    bench_at_once,
    parse_args,
    time_op_at_once,
)
from storage.lmdb_store import LmdbRaftStorage


def _run_in_process(op_name: str, directory: Path, operations: int) -> list[float]:
    ctx = multiprocessing.get_context("fork")
    out: Queue[list[float]] = ctx.Queue()
    time_op_at_once(op_name, directory, operations, ctx.Barrier(1), out)
    return out.get(timeout=10)


def test_save_commits_one_entry_and_the_hard_state_per_operation(tmp_path: Path) -> None:
    durations = _run_in_process("save", tmp_path, 7)
    assert len(durations) == 7 and all(d > 0 for d in durations)
    with LmdbRaftStorage(tmp_path) as store:
        # the warm-up save (entry 1), then one entry per timed operation
        assert (store.first_index(), store.last_index()) == (1, 8)
        assert store.hard_state().commit == 7


@pytest.mark.parametrize(("op_name", "meta_written"), [("fdatasync", False),
                                                       ("two flushes", True)])
def test_flush_operations_overwrite_pages(tmp_path: Path, op_name: str,
                                          meta_written: bool) -> None:
    durations = _run_in_process(op_name, tmp_path, 12)
    assert len(durations) == 12
    data = (tmp_path / "pages").read_bytes()
    assert len(data) == 9 * PAGE  # overwrites only: the file never grew
    assert data[PAGE:9 * PAGE] == b"x" * (8 * PAGE)  # 12 operations cycle over the 8 pages
    assert data[:PAGE] == (b"x" * PAGE if meta_written else b"\0" * PAGE)


def test_each_process_has_a_store_of_its_own_and_their_figures_are_pooled(
        tmp_path: Path) -> None:
    result = bench_at_once(tmp_path, "save", processes=3, operations=4, repetitions=2)
    assert (result.op, result.processes) == ("save", 3)
    assert 0 < result.p50_us <= result.p99_us
    assert result.mean_us > 0
    stores = sorted(p.name for p in tmp_path.iterdir())
    assert len(stores) == 6  # a store of its own per process and repetition
    for name in stores:
        with LmdbRaftStorage(tmp_path / name) as store:
            assert store.last_index() == 5


def test_a_failing_process_fails_the_figure(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench_storage._save_op
    parent = os.getpid()

    def second_fails(path: Path) -> Operation:
        if os.getpid() != parent and path.name.endswith("-1"):
            raise OSError("disk gone")
        return real(path)

    monkeypatch.setitem(bench_storage.AT_ONCE_OPS, "save", second_fails)
    with pytest.raises(RuntimeError, match="a timing process failed"):
        bench_at_once(tmp_path, "save", processes=2, operations=3, repetitions=1)


def test_at_once_arguments() -> None:
    assert parse_args([]).at_once == [1, 3]
    assert parse_args(["--at-once", ""]).at_once == []
    assert parse_args(["--at-once", "2,5"]).at_once == [2, 5]
    for bad in (["--at-once", "0"], ["--at-once", "x"], ["--at-once-ops", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_the_section_prints_every_operation_and_count(tmp_path: Path) -> None:
    args = argparse.Namespace(at_once=[1, 2], at_once_ops=3, repetitions=1)
    table = bench_storage.run_at_once_benchmarks(args, tmp_path)
    rows = [line.split() for line in table.splitlines()[3:]]
    assert [(" ".join(r[:-4]), r[-4]) for r in rows] == [
        ("fdatasync", "1"), ("fdatasync", "2"), ("two flushes", "1"), ("two flushes", "2"),
        ("save", "1"), ("save", "2")]
    for r in rows:
        p50, p99 = (float(v.replace(",", "")) for v in r[-3:-1])
        assert 0 < p50 <= p99
