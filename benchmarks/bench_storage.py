"""Storage benchmarks: synced appends per second through LmdbRaftStorage.

    python -m benchmarks.bench_storage [--repetitions N] [--dir PATH]

Each repetition appends to a fresh store in a temporary directory under --dir (fsync cost
depends on the file system there: a tmpfs makes it look free). Figures are medians over the
repetitions. Add another section by writing a `run_..._benchmarks(args) -> str` function and
calling it from `main()`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from raftkv.core.types import Entry, HardState
from storage.lmdb_store import LmdbRaftStorage

BATCH_SIZES = (1, 10, 100, 1000)
ENTRY_BYTES = 100
MAX_SAVES_PER_REPETITION = 300
MIN_SAVES_PER_REPETITION = 20
ENTRIES_PER_REPETITION = 5000


@dataclass(frozen=True, slots=True)
class AppendResult:
    batch_entries: int
    saves: int
    saves_per_s: float
    entries_per_s: float
    mb_per_s: float
    p50_save_ms: float
    p99_save_ms: float


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
        p50_save_ms=1e3 * all_durations[len(all_durations) // 2],
        p99_save_ms=1e3 * all_durations[min(len(all_durations) - 1,
                                            int(len(all_durations) * 0.99))],
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repetitions", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to create the temporary stores (default: system temp dir)")
    parser.add_argument("--snapshot-keys", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--snapshot-repeats", type=int, default=3)
    parser.add_argument("--no-snapshots", action="store_true", help="appends only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raftkv-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"data dir: {root}")
        print(run_append_benchmarks(args, root))
        if not args.no_snapshots:
            from benchmarks import snapshot_bench

            print(f"\nsnapshots of {snapshot_bench.VALUE_BYTES}-byte values "
                  f"(median of {args.snapshot_repeats} repetitions)")
            print(snapshot_bench.format_table(
                snapshot_bench.run(args.snapshot_keys, args.snapshot_repeats, root)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
