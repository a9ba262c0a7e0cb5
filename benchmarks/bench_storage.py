"""Storage benchmarks: synced appends per second through LmdbRaftStorage, and what a commit
costs when several processes commit on the same disk at once.

    python -m benchmarks.bench_storage [--repetitions N] [--dir PATH] [--at-once 1,3]

Each repetition appends to a fresh store in a temporary directory under --dir (fsync cost
depends on the file system there: a tmpfs makes it look free). Figures are medians over the
repetitions. Add another section by writing a `run_..._benchmarks(args) -> str` function and
calling it from `main()`.

Commits at once: a local cluster's nodes share one disk, and at one client connection every
node commits one entry at about the same moment. `--at-once 1,3` times, in 1 and in 3
processes started together (each on files of its own), three things per operation: one page
overwritten and `fdatasync`ed (the disk's floor for one flush); that, then a second page
written through an `O_DSYNC` descriptor (two ordered flushes, as an LMDB commit makes them:
its pages, then its meta page); and `LmdbRaftStorage.save` of one 100-byte entry with the hard
state (what a node's commit does at one connection).

CPU of a commit (`--cycle-writes 1,8,20`): benchmarks.commit_cycle runs a leader and two
followers in this process, on LMDB, without sockets, and gives the CPU (user + kernel) of each
per commit of that many writes, synced and with `unsafe_no_fsync`: what the node's code and
the disk's flushes cost apart from its event loop, sockets and HTTP workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import queue
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import TypeVar

from raftkv.core.types import Entry, HardState
from storage.lmdb_store import LmdbRaftStorage

BATCH_SIZES = (1, 10, 100, 1000)
ENTRY_BYTES = 100
MAX_SAVES_PER_REPETITION = 300
MIN_SAVES_PER_REPETITION = 20
ENTRIES_PER_REPETITION = 5000

_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class AppendResult:
    batch_entries: int
    saves: int
    saves_per_s: float
    entries_per_s: float
    mb_per_s: float
    p50_save_ms: float
    p99_save_ms: float


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The value at `fraction` (0.5: the median) of `ordered`, which is sorted."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def saves_for(batch_entries: int) -> int:
    wanted = ENTRIES_PER_REPETITION // batch_entries
    return max(MIN_SAVES_PER_REPETITION, min(MAX_SAVES_PER_REPETITION, wanted))


def time_synced_appends(data_dir: Path, batch_entries: int, saves: int) -> list[float]:
    """Seconds per save() of `saves` batches (entries + hard state, synced) to a new store."""
    payload = b"x" * ENTRY_BYTES
    batches = [
        [Entry(i, 1, data=payload) for i in range(lo, lo + batch_entries)]
        for lo in range(1, saves * batch_entries + 1, batch_entries)
    ]
    durations: list[float] = []
    with LmdbRaftStorage(data_dir) as store:
        for batch in batches:
            started = time.perf_counter()
            store.save(HardState(1, "n1", batch[0].index - 1), batch)
            durations.append(time.perf_counter() - started)
    return durations


def bench_synced_appends(root: Path, batch_entries: int, repetitions: int) -> AppendResult:
    saves = saves_for(batch_entries)
    rates: list[float] = []
    all_durations: list[float] = []
    for rep in range(repetitions):
        durations = time_synced_appends(root / f"append-{batch_entries}-{rep}", batch_entries,
                                        saves)
        rates.append(saves / sum(durations))
        all_durations.extend(durations)
    saves_per_s = statistics.median(rates)
    entries_per_s = saves_per_s * batch_entries
    all_durations.sort()
    return AppendResult(
        batch_entries=batch_entries,
        saves=saves,
        saves_per_s=saves_per_s,
        entries_per_s=entries_per_s,
        mb_per_s=entries_per_s * ENTRY_BYTES / 1e6,
        p50_save_ms=1e3 * percentile(all_durations, 0.5),
        p99_save_ms=1e3 * percentile(all_durations, 0.99),
    )


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def run_append_benchmarks(args: argparse.Namespace, root: Path) -> str:
    results = [bench_synced_appends(root, n, args.repetitions) for n in BATCH_SIZES]
    rows = [
        [str(r.batch_entries), str(r.saves), f"{r.saves_per_s:,.0f}", f"{r.entries_per_s:,.0f}",
         f"{r.mb_per_s:.2f}", f"{r.p50_save_ms:.2f}", f"{r.p99_save_ms:.2f}"]
        for r in results
    ]
    header = ["batch", "saves/rep", "saves/s", "entries/s", "MB/s", "p50 ms", "p99 ms"]
    title = (f"synced appends, {ENTRY_BYTES}-byte entries + hard state per save "
             f"(median of {args.repetitions} repetitions)")
    return format_table(title, header, rows)


# ------------------------------------------------------------------------- commits at once
PAGE = 4096
Operation = tuple[Callable[[int], None], Callable[[], None]]
"""One timed operation (called with its sequence number) and its clean-up."""


def _flush_op(path: Path, flushes: int) -> Operation:
    """An operation writing one page and flushing it (`flushes` 1), then one more page
    through an O_DSYNC descriptor (2); and its clean-up."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    meta = os.open(path, os.O_RDWR | os.O_DSYNC)
    os.pwrite(fd, b"\0" * (PAGE * 9), 0)  # the pages exist: overwrites, as LMDB's mostly are
    os.fsync(fd)
    page = b"x" * PAGE

    def op(i: int) -> None:
        os.pwrite(fd, page, PAGE * (1 + i % 8))
        os.fdatasync(fd)
        if flushes == 2:
            os.pwrite(meta, page, 0)

    def close() -> None:
        os.close(meta)
        os.close(fd)

    return op, close


def _save_op(path: Path) -> Operation:
    store = LmdbRaftStorage(path)
    payload = b"x" * ENTRY_BYTES

    def op(i: int) -> None:
        store.save(HardState(1, "n1", i), [Entry(i + 1, 1, data=payload)])

    return op, store.close


AT_ONCE_OPS: dict[str, Callable[[Path], Operation]] = {
    "fdatasync": lambda directory: _flush_op(directory / "pages", flushes=1),
    "two flushes": lambda directory: _flush_op(directory / "pages", flushes=2),
    "save": _save_op,
}
"""The operations `--at-once` times (module doc), in the order of its table."""


def time_op_at_once(op_name: str, directory: Path, operations: int, start: Barrier,
                    out: Queue[list[float]]) -> None:
    """In one of the processes started together: `operations` times `op_name` on files of
    this process's own under `directory`, the seconds of each put on `out`."""
    op, close = AT_ONCE_OPS[op_name](directory)
    try:
        op(0)  # warm: the store's first commit also creates its databases
        start.wait()
        durations = []
        for i in range(1, operations + 1):
            started = time.perf_counter()
            op(i)
            durations.append(time.perf_counter() - started)
    finally:
        close()
    out.put(durations)


@dataclass(frozen=True, slots=True)
class AtOnceResult:
    op: str
    processes: int
    p50_us: float
    p99_us: float
    mean_us: float


def bench_at_once(root: Path, op_name: str, processes: int, operations: int,
                  repetitions: int) -> AtOnceResult:
    """`processes` processes time `op_name` together, `repetitions` times; the latency
    figures pool every operation of every process."""
    ctx = multiprocessing.get_context("fork")
    durations: list[float] = []
    for rep in range(repetitions):
        start = ctx.Barrier(processes)
        out: Queue[list[float]] = ctx.Queue()
        procs = []
        for i in range(processes):
            directory = root / f"at-once-{op_name.replace(' ', '-')}-{processes}-{rep}-{i}"
            directory.mkdir(parents=True)
            procs.append(ctx.Process(target=time_op_at_once,
                                     args=(op_name, directory, operations, start, out)))
        for p in procs:
            p.start()
        try:
            got = 0
            while got < processes:
                try:
                    durations.extend(out.get(timeout=0.5))
                    got += 1
                except queue.Empty:
                    failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if failed:  # the others wait at the barrier for it: stop them
                        for p in procs:
                            if p.exitcode is None:
                                p.kill()
                        raise RuntimeError(f"{op_name} at once: a timing process failed "
                                           f"(exit codes {failed})") from None
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.join(timeout=10)
                if p.exitcode is None:
                    p.kill()
                    p.join()
    durations.sort()
    return AtOnceResult(op_name, processes, 1e6 * percentile(durations, 0.5),
                        1e6 * percentile(durations, 0.99), 1e6 * statistics.fmean(durations))


def run_at_once_benchmarks(args: argparse.Namespace, root: Path) -> str:
    results = [bench_at_once(root, op, n, args.at_once_ops, args.repetitions)
               for op in AT_ONCE_OPS for n in args.at_once]
    rows = [[r.op, str(r.processes), f"{r.p50_us:,.0f}", f"{r.p99_us:,.0f}",
             f"{r.mean_us:,.0f}"] for r in results]
    title = (f"commits at once: {args.at_once_ops} operations per process, processes started "
             f"together ({args.repetitions} repetitions; 'save': one {ENTRY_BYTES}-byte entry "
             f"+ hard state)")
    return format_table(title, ["operation", "processes", "p50 us", "p99 us", "mean us"],
                        rows)


def _median_run(runs: Sequence[_R], key: Callable[[_R], float]) -> _R:
    """The run whose `key` is the median (the lower middle one of an even count)."""
    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2]


def run_cycle_benchmarks(args: argparse.Namespace, root: Path) -> str:
    """benchmarks.commit_cycle at each --cycle-writes, synced and not: medians of the
    repetitions (per figure)."""
    from benchmarks import commit_cycle

    results = []
    for writes in args.cycle_writes:
        for synced in (True, False):
            runs = [commit_cycle.measure(root, writes, args.cycle_commits, synced=synced)
                    for _ in range(args.repetitions)]
            # Per role, the run with the median total, with that run's own split.
            leader = _median_run(runs, lambda r: r.leader_us)
            follower = _median_run(runs, lambda r: r.follower_us)
            results.append(dataclasses.replace(
                leader, follower_us=follower.follower_us,
                follower_user_us=follower.follower_user_us,
                follower_sys_us=follower.follower_sys_us))
    title = (f"CPU of a commit, in one process (benchmarks.commit_cycle: three drivers on LMDB, "
             f"no sockets; {args.cycle_commits} commits; per role the run of median CPU of "
             f"{args.repetitions} repetitions; 'no fsync' is RAFTKV_UNSAFE_NO_FSYNC)")
    return format_table(title, commit_cycle.HEADER, commit_cycle.table_rows(results))


def _counts(what: str, maximum: int) -> Callable[[str], list[int]]:
    """An argparse type: a comma-separated list of `what`, each 1..maximum (empty: none)."""

    def parse(text: str) -> list[int]:
        try:
            counts = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of {what}: {text!r}") from None
        if any(n < 1 or n > maximum for n in counts):
            raise argparse.ArgumentTypeError(f"{what} are 1..{maximum}: {text!r}")
        return counts

    return parse


_process_counts = _counts("process counts", 64)
_write_counts = _counts("writes per commit", 1000)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repetitions", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to create the temporary stores (default: system temp dir)")
    parser.add_argument("--snapshot-keys", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--snapshot-repeats", type=int, default=3)
    parser.add_argument("--no-snapshots", action="store_true", help="appends only")
    parser.add_argument("--at-once", type=_process_counts, default=[1, 3],
                        help="process counts for the commits-at-once section, e.g. 1,3 "
                             "(empty: skip it)")
    parser.add_argument("--at-once-ops", type=int, default=500,
                        help="operations per process in the commits-at-once section")
    parser.add_argument("--cycle-writes", type=_write_counts, default=[1, 8, 20],
                        help="writes per commit for the commit-CPU section, e.g. 1,8,20 (the "
                             "batches of c1, c16 and c64; empty: skip it)")
    parser.add_argument("--cycle-commits", type=int, default=1000,
                        help="timed commits per figure in the commit-CPU section")
    args = parser.parse_args(argv)
    if args.cycle_commits < 1:
        parser.error("--cycle-commits must be at least 1")
    if args.at_once_ops < 1:
        parser.error("--at-once-ops must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raftkv-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"data dir: {root}")
        print(run_append_benchmarks(args, root))
        if args.at_once:
            print()
            print(run_at_once_benchmarks(args, root))
        if args.cycle_writes:
            print()
            print(run_cycle_benchmarks(args, root))
        if not args.no_snapshots:
            from benchmarks import snapshot_bench

            print(f"\nsnapshots of {snapshot_bench.VALUE_BYTES}-byte values "
                  f"(median of {args.snapshot_repeats} repetitions)")
            print(snapshot_bench.format_table(
                snapshot_bench.run(args.snapshot_keys, args.snapshot_repeats, root)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
