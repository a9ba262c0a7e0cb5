"""Memory while a snapshot of N MiB is written, sent and installed: it must not grow by N MiB.

    python -m benchmarks.snapshot_memory [--mib 64] [--dir PATH]

In one fresh process, with the real pieces and LMDB stores on disk:

1. write: a key-value state of N MiB (values of 64 KiB) is snapshotted the way the runtime
   does it: `snapshot_view()`, then `iter_snapshot_chunks` streamed into a sink;
2. transfer: a leader RaftNode that holds that snapshot sends it to an empty follower, chunk
   by chunk through its snapshot reader; the follower's ReadyHandler stages the chunks in its
   own LMDB store, publishes the snapshot once the core checked it, and restores a state
   machine from it by streaming (`restore_chunks`).

It prints one JSON line: the snapshot's size and the peak growth of the process's anonymous
memory (RssAnon, sampled after every step) in each phase. RssAnon, not VmRSS: LMDB reads
through a file mapping, whose pages count in VmRSS but are page cache the kernel reclaims at
will; the heap is what would grow by N MiB if a snapshot were held whole.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from raftkv.core import (
    BootState,
    Config,
    Entry,
    HardState,
    Membership,
    Message,
    RaftNode,
    Snapshot,
    SnapshotMeta,
)
from raftkv.kv.commands import Put, encode_command
from raftkv.kv.state_machine import KVStateMachine, iter_snapshot_chunks
from raftkv.runtime.ready_handler import ReadyHandler, chunk_reader
from snapshots.lmdb_store import LmdbSnapshotStore
from storage.memory import MemoryRaftStorage

VALUE_BYTES = 64 << 10
MEMBERS = Membership(frozenset({"n1", "n2"}))


def rss_anon_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class Peak:
    def __init__(self) -> None:
        self.base = rss_anon_bytes()
        self.peak = self.base

    def sample(self) -> None:
        self.peak = max(self.peak, rss_anon_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


class _Counting:
    """The follower's state machine: consumes a restored snapshot chunk by chunk."""

    def __init__(self, peak: Peak) -> None:
        self._peak = peak
        self.applied_index = 0
        self.restored_bytes = 0

    def apply(self, entry: Entry) -> object:
        self.applied_index = entry.index
        return None

    def snapshot_chunks(self) -> Iterator[bytes]:
        return iter(())

    def restore_chunks(self, chunks: Iterable[bytes], index: int) -> None:
        for chunk in chunks:
            self.restored_bytes += len(chunk)
            self._peak.sample()
        self.applied_index = index

    def install(self, state: object, index: int) -> None:
        raise AssertionError("no validator here: the follower restores from its store")


class _Outbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    def send(self, messages: Sequence[Message]) -> None:
        self.messages.extend(messages)


def write_phase(mib: int, store: LmdbSnapshotStore, peak: Peak) -> Snapshot:
    machine = KVStateMachine(max_request_ids=0)
    rng = random.Random(1)
    index = 0
    while machine.size_bytes < mib << 20:
        index += 1
        value = rng.randbytes(VALUE_BYTES // 2).hex()  # a str of VALUE_BYTES
        machine.apply(Entry(index, 1, data=encode_command(Put(f"k{index:08d}", value))))
    peak.base = rss_anon_bytes()  # the state itself is not what is measured
    peak.peak = peak.base
    sink = store.create(SnapshotMeta(index, 1, MEMBERS))
    for chunk in iter_snapshot_chunks(machine.snapshot_view()):
        sink.write(chunk)
        peak.sample()
    return sink.close()


def transfer_phase(snapshot: Snapshot, leader_store: LmdbSnapshotStore,
                   follower_store: LmdbSnapshotStore, peak: Peak) -> int:
    meta = snapshot.meta
    leader = RaftNode(Config("n1", election_timeout_ticks=10),
                      BootState(HardState(1, None, meta.index), snapshot),
                      random.Random(1), snapshot_reader=chunk_reader(leader_store))
    follower = RaftNode(Config("n2", election_timeout_ticks=10),
                        BootState(HardState(), Snapshot(SnapshotMeta(0, 0, MEMBERS))),
                        random.Random(2))
    machine = _Counting(peak)
    out = {"n1": _Outbox(), "n2": _Outbox()}
    handlers = {
        "n1": ReadyHandler(node=leader, storage=MemoryRaftStorage(), snapshots=leader_store,
                           state_machine=_Counting(peak), transport=out["n1"],
                           on_applied=lambda e, r: None, on_read=lambda r, i: None,
                           on_read_failed=lambda r: None),
        "n2": ReadyHandler(node=follower, storage=MemoryRaftStorage(),
                           snapshots=follower_store, state_machine=machine,
                           transport=out["n2"], on_applied=lambda e, r: None,
                           on_read=lambda r, i: None, on_read_failed=lambda r: None),
    }
    nodes = {"n1": leader, "n2": follower}
    leader.campaign()
    for _ in range(1_000_000):
        busy = False
        for nid, node in nodes.items():
            while node.has_ready():
                handlers[nid].handle(node.ready())
                busy = True
                peak.sample()
        for nid in nodes:
            messages, out[nid].messages = out[nid].messages, []
            for m in messages:
                nodes[m.to].step(m)
                busy = True
        if not busy:
            break
    if follower.snapshot_meta != meta:
        raise AssertionError(f"the follower did not install the snapshot: {follower.status()}")
    return machine.restored_bytes


def run(mib: int, base: Path) -> dict[str, int]:
    leader_store = LmdbSnapshotStore(base / "leader", max_map_size_bytes=4 << 30)
    follower_store = LmdbSnapshotStore(base / "follower", max_map_size_bytes=4 << 30)
    try:
        peak = Peak()
        snapshot = write_phase(mib, leader_store, peak)
        write_growth = peak.growth
        peak = Peak()
        restored = transfer_phase(snapshot, leader_store, follower_store, peak)
        return {"snapshot_bytes": snapshot.length, "restored_bytes": restored,
                "write_growth_bytes": write_growth, "transfer_growth_bytes": peak.growth}
    finally:
        leader_store.close()
        follower_store.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(json.dumps(run(args.mib, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
