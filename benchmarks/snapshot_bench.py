"""Snapshot benchmark: save and load a key-value state through LmdbSnapshotStore.

    python -m benchmarks.snapshot_bench [--keys 100000 1000000] [--repeats 3] [--dir PATH]

For each state size (keys with 100-byte string values, plus up to 100,000 remembered
request ids, as a busy node would have) it measures, as medians over the repeats:

- write pause: time on the caller's (loop) thread in `snapshot_view()`; writes stall only
  for this long;
- save: serialise the view (`iter_snapshot_chunks`) and write it to a new
  LmdbSnapshotStore in a temporary directory, synced and published;
- load: open the store, `latest()` (read and verify the checksum) and `restore_chunks()`;
- loop stall while saving in the background: the save run on a worker thread while the
  caller's thread spins, measuring the longest time it could not run (the GIL).

fsync cost depends on the file system under --dir (a tmpfs makes it look free).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from raftkv.core.types import Entry, Membership, SnapshotMeta
from raftkv.kv.commands import Batch, Put, encode_command
from raftkv.kv.state_machine import KVSnapshotView, KVStateMachine, iter_snapshot_chunks
from snapshots.lmdb_store import LmdbSnapshotStore

VALUE_BYTES = 100
BATCH_KEYS = 1000
REMEMBERED_REQUEST_IDS = 100_000
MEMBERS = Membership(frozenset({"n1", "n2", "n3"}))


def build_machine(keys: int) -> KVStateMachine:
    """`keys` keys through apply(): batches first, then single puts with request ids."""
    machine = KVStateMachine()
    value = "v" * VALUE_BYTES
    singles = min(keys, REMEMBERED_REQUEST_IDS)
    batched = keys - singles
    index = 0
    for start in range(0, batched, BATCH_KEYS):
        stop = min(start + BATCH_KEYS, batched)
        ops = tuple(Put(f"key/{i:09d}", value) for i in range(start, stop))
        index += 1
        machine.apply(Entry(index, 1, data=encode_command(Batch(ops))))
    for i in range(batched, keys):
        index += 1
        data = encode_command(Put(f"key/{i:09d}", value), f"request-{i}")
        machine.apply(Entry(index, 1, data=data))
    return machine


def save(view: KVSnapshotView, path: Path) -> int:
    """Serialise `view` into a new store at `path`; the snapshot's size in bytes."""
    store = LmdbSnapshotStore(path, map_size_bytes=1 << 30)
    try:
        sink = store.create(SnapshotMeta(view.applied_index, 1, MEMBERS))
        size = 0
        for chunk in iter_snapshot_chunks(view):
            sink.write(chunk)
            size += len(chunk)
        sink.close()
        return size
    finally:
        store.close()


def load(path: Path) -> KVStateMachine:
    store = LmdbSnapshotStore(path, map_size_bytes=1 << 30)
    try:
        snapshot = store.latest()
        assert snapshot is not None, "the snapshot just saved is missing"
        machine = KVStateMachine()
        machine.restore_chunks(store.chunks(snapshot), snapshot.meta.index)
        return machine
    finally:
        store.close()


def max_stall_while(work: threading.Thread) -> float:
    """Run `work` and spin on this thread until it ends; the longest gap between spins."""
    work.start()
    longest = 0.0
    last = time.perf_counter()
    while work.is_alive():
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    work.join()
    return longest


def measure(keys: int, repeats: int, base_dir: Path | None) -> dict[str, float | int]:
    machine = build_machine(keys)
    pauses, saves, loads, stalls = [], [], [], []
    size = 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=base_dir) as tmp:
            gc.collect()
            started = time.perf_counter()
            view = machine.snapshot_view()
            pauses.append(time.perf_counter() - started)

            started = time.perf_counter()
            size = save(view, Path(tmp) / "fg")
            saves.append(time.perf_counter() - started)

            started = time.perf_counter()
            loaded = load(Path(tmp) / "fg")
            loads.append(time.perf_counter() - started)
            assert len(loaded) == keys and loaded.applied_index == machine.applied_index
            del loaded

            gc.collect()
            worker = threading.Thread(target=save, args=(view, Path(tmp) / "bg"))
            stalls.append(max_stall_while(worker))
            del view
    return {
        "keys": keys,
        "snapshot_bytes": size,
        "write_pause_ms": statistics.median(pauses) * 1000,
        "save_s": statistics.median(saves),
        "load_s": statistics.median(loads),
        "bg_save_max_loop_stall_ms": statistics.median(stalls) * 1000,
    }


def run(
    keys_list: Sequence[int] = (100_000, 1_000_000),
    repeats: int = 3,
    base_dir: Path | None = None,
) -> list[dict[str, float | int]]:
    """One row per state size, medians over `repeats`."""
    return [measure(keys, repeats, base_dir) for keys in keys_list]


def format_table(rows: Sequence[dict[str, float | int]]) -> str:
    header = (
        f"{'keys':>10} {'snapshot MB':>12} {'write pause ms':>15} {'save s':>8} "
        f"{'load s':>8} {'bg-save loop stall ms':>22}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['keys']:>10,} {r['snapshot_bytes'] / 1e6:>12.1f} {r['write_pause_ms']:>15.1f} "
            f"{r['save_s']:>8.2f} {r['load_s']:>8.2f} {r['bg_save_max_loop_stall_ms']:>22.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary stores go")
    args = parser.parse_args(argv)
    print(f"values of {VALUE_BYTES} bytes; medians of {args.repeats} repeats")
    print(format_table(run(args.keys, args.repeats, args.dir)))


if __name__ == "__main__":
    main()
