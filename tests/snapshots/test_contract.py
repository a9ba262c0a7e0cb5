"""The SnapshotStore contract (raftkv.ports): the in-memory double and LMDB behave the same.

Each test gets a `Harness` from `open_store(retain=...)`: `h.store` is the store under test;
`h.reopen()` closes and reopens it; `h.crash_mid_write(meta, data)` has a writer die after
writing part of a snapshot (LMDB: a real child process killed before close(); memory:
`crash()`); `h.corrupt(index)` damages the stored data of a published snapshot behind the
store's back (LMDB: a chunk value edited in the database file).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest

from raftkv.core.types import Membership, SnapshotMeta
from raftkv.ports import SnapshotStore, StorageError, StoredSnapshot
from snapshots.checksum import checksum_of
from snapshots.lmdb_store import LmdbSnapshotStore, decode_catalog_record
from snapshots.memory import MemorySnapshotStore

REPO_ROOT = Path(__file__).resolve().parents[2]
LMDB_CHUNK_SIZE_BYTES = 64  # small, so every test crosses chunk boundaries
MEMBERS = Membership(frozenset({"n1", "n2", "n3"}))


def meta(index: int, term: int = 1, members: Membership = MEMBERS) -> SnapshotMeta:
    return SnapshotMeta(index, term, members)


def payload(index: int, size: int = 300) -> bytes:
    """Distinct data per index, longer than a few LMDB test chunks."""
    return (f"snapshot-{index}:".encode() * size)[:size]


def publish(store: SnapshotStore, m: SnapshotMeta, data: bytes, pieces: int = 3) -> None:
    sink = store.create(m)
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        sink.write(data[start : start + step])
    assert sink.close().meta == m


def data_of(store: SnapshotStore, snapshot: StoredSnapshot) -> bytes:
    """A published snapshot's bytes, read back in chunks (checked against its checksum)."""
    return b"".join(store.chunks(snapshot))


class Harness:
    def __init__(
        self,
        store: SnapshotStore,
        reopen: Callable[[], SnapshotStore],
        crash_mid_write: Callable[[SnapshotMeta, bytes], SnapshotStore],
        corrupt: Callable[[int], SnapshotStore],
    ) -> None:
        self.store = store
        self._reopen = reopen
        self._crash_mid_write = crash_mid_write
        self._corrupt = corrupt

    def reopen(self) -> SnapshotStore:
        self.store = self._reopen()
        return self.store

    def crash_mid_write(self, m: SnapshotMeta, partial_data: bytes) -> SnapshotStore:
        self.store = self._crash_mid_write(m, partial_data)
        return self.store

    def corrupt(self, index: int) -> SnapshotStore:
        self.store = self._corrupt(index)
        return self.store


def memory_harness(tmp_path: Path, retain: int) -> Harness:
    store = MemorySnapshotStore(retain=retain)

    def reopen() -> SnapshotStore:
        store.crash()  # keeps what was published, like a reopen
        return store

    def crash_mid_write(m: SnapshotMeta, partial_data: bytes) -> SnapshotStore:
        store.create(m).write(partial_data)
        store.crash()
        return store

    def corrupt(index: int) -> SnapshotStore:
        store.corrupt(index)
        return store

    return Harness(store, reopen, crash_mid_write, corrupt)


_WRITE_AND_DIE = """
import os, sys
from raftkv.core.types import Membership, SnapshotMeta
from snapshots.lmdb_store import LmdbSnapshotStore
path, chunk_size, index, term = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = LmdbSnapshotStore(path, chunk_size_bytes=chunk_size)
sink = store.create(SnapshotMeta(index, term, Membership(frozenset({"n1"}))))
sink.write(sys.stdin.buffer.read())
os._exit(0)  # die mid-snapshot: no close(), no cancel(), the environment left open
"""


def write_and_die(path: Path, m: SnapshotMeta, partial_data: bytes, chunk_size: int) -> None:
    """Run a child process that writes part of a snapshot into `path` and dies."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(
        [sys.executable, "-c", _WRITE_AND_DIE, str(path), str(chunk_size), str(m.index),
         str(m.term)],
        input=partial_data, cwd=REPO_ROOT, env=env, check=True, timeout=60,
    )


def raw_chunk_count(path: Path) -> int:
    """Chunk records in the store's database, read behind the store's back (store closed)."""
    env = lmdb.open(str(path), max_dbs=4, readonly=True, lock=False)
    try:
        chunks = env.open_db(b"chunks", create=False)
        with env.begin() as txn:
            return int(txn.stat(chunks)["entries"])
    finally:
        env.close()


def corrupt_lmdb_chunk(path: Path, index: int) -> None:
    """Flip one bit in the first chunk of the published snapshot at `index` (store closed)."""
    env = lmdb.open(str(path), max_dbs=4)
    try:
        catalog = env.open_db(b"catalog", create=False)
        chunks = env.open_db(b"chunks", create=False)
        with env.begin(write=True) as txn:
            for key, value in txn.cursor(catalog).iternext():
                snapshot_id = int.from_bytes(key, "big")
                if decode_catalog_record(snapshot_id, value).meta.index == index:
                    chunk_key = key + (0).to_bytes(4, "big")
                    chunk = bytearray(txn.get(chunk_key, db=chunks) or b"")
                    assert chunk, "the snapshot to corrupt has no first chunk"
                    chunk[len(chunk) // 2] ^= 0x01
                    txn.put(chunk_key, bytes(chunk), db=chunks)
                    return
        raise KeyError(f"no published snapshot at index {index}")
    finally:
        env.close()


def lmdb_harness(tmp_path: Path, retain: int) -> Harness:
    path = tmp_path / "snapshots"
    harness: Harness

    def open_store() -> LmdbSnapshotStore:
        return LmdbSnapshotStore(
            path, retain=retain, chunk_size_bytes=LMDB_CHUNK_SIZE_BYTES, map_size_bytes=1 << 22
        )

    def reopen() -> SnapshotStore:
        harness.store.close()
        return open_store()

    def crash_mid_write(m: SnapshotMeta, partial_data: bytes) -> SnapshotStore:
        harness.store.close()
        chunks_before = raw_chunk_count(path)
        write_and_die(path, m, partial_data, LMDB_CHUNK_SIZE_BYTES)
        assert raw_chunk_count(path) > chunks_before, "the writer died before writing a chunk"
        return open_store()

    def corrupt(index: int) -> SnapshotStore:
        harness.store.close()
        corrupt_lmdb_chunk(path, index)
        return open_store()

    harness = Harness(open_store(), reopen, crash_mid_write, corrupt)
    return harness


OpenStore = Callable[..., Harness]


@pytest.fixture(params=[memory_harness, lmdb_harness], ids=["memory", "lmdb"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    opened: list[Harness] = []

    def open_(retain: int = 2) -> Harness:
        harness: Harness = request.param(tmp_path, retain)
        opened.append(harness)
        return harness

    yield open_
    for harness in opened:
        harness.store.close()


@pytest.fixture
def h(open_store: OpenStore) -> Harness:
    return open_store()


# A new store


def test_new_store_has_no_snapshots(h: Harness) -> None:
    assert h.store.latest() is None
    assert h.store.list() == []


def test_retain_below_one_is_refused(open_store: OpenStore) -> None:
    with pytest.raises(ValueError, match="retain"):
        open_store(retain=0)


# Publishing


def test_published_snapshot_is_latest_with_its_meta_data_and_checksum(h: Harness) -> None:
    data = payload(7)
    publish(h.store, meta(7, 2), data)

    latest = h.store.latest()
    assert latest is not None
    assert latest.meta == meta(7, 2)
    assert data_of(h.store, latest) == data
    assert latest.checksum == checksum_of(data)
    assert h.store.list() == [meta(7, 2)]


def test_chunks_of_any_size_are_joined_in_order(h: Harness) -> None:
    data = bytes(range(256)) * 5
    sink = h.store.create(meta(3))
    for piece in (data[:1], data[1:2], data[2:200], data[200:1000], b"", data[1000:]):
        sink.write(piece)
    sink.close()

    latest = h.store.latest()
    assert latest is not None and data_of(h.store, latest) == data


def test_empty_snapshot_round_trips(h: Harness) -> None:
    h.store.create(meta(1)).close()

    latest = h.store.latest()
    assert latest is not None
    assert (latest.meta, data_of(h.store, latest), latest.checksum) == (
        meta(1), b"", checksum_of(b""))


def test_membership_with_learners_round_trips(h: Harness) -> None:
    members = Membership(frozenset({"n1", "n2"}), frozenset({"n4", "n3"}))
    publish(h.store, meta(9, 3, members), payload(9))
    h.reopen()

    latest = h.store.latest()
    assert latest is not None and latest.meta.membership == members
    assert h.store.list() == [meta(9, 3, members)]


def test_snapshot_is_invisible_until_its_sink_is_closed(h: Harness) -> None:
    publish(h.store, meta(4), payload(4))
    sink = h.store.create(meta(8))
    sink.write(payload(8))

    assert h.store.list() == [meta(4)]
    latest = h.store.latest()
    assert latest is not None and latest.meta == meta(4)

    sink.close()
    assert h.store.list() == [meta(8), meta(4)]


def test_cancelled_snapshot_is_never_published(h: Harness) -> None:
    sink = h.store.create(meta(5))
    sink.write(payload(5))
    sink.cancel()
    sink.cancel()  # a second cancel is harmless

    assert h.store.latest() is None
    assert h.store.list() == []
    with pytest.raises(ValueError, match="cancelled"):
        sink.close()
    publish(h.store, meta(6), payload(6))
    assert h.store.list() == [meta(6)]


def test_sink_refuses_writes_after_close(h: Harness) -> None:
    sink = h.store.create(meta(2))
    sink.write(b"abc")
    sink.close()

    with pytest.raises(ValueError, match="closed"):
        sink.write(b"more")
    with pytest.raises(ValueError, match="closed"):
        sink.close()
    sink.cancel()  # cancelling a published snapshot does nothing
    assert h.store.list() == [meta(2)]


def test_two_sinks_can_be_written_at_once(h: Harness) -> None:
    first, second = h.store.create(meta(10)), h.store.create(meta(20))
    a, b = payload(10, 500), payload(20, 700)
    for i in range(0, 700, 50):
        first.write(a[i : i + 50])
        second.write(b[i : i + 50])
    second.close()
    first.close()

    latest = h.store.latest()
    assert latest is not None and (latest.meta, data_of(h.store, latest)) == (meta(20), b)
    assert h.store.list() == [meta(20), meta(10)]


# Ordering and retention


def test_list_is_newest_first_by_index_not_by_publication(open_store: OpenStore) -> None:
    h = open_store(retain=3)
    for index in (10, 30, 20):
        publish(h.store, meta(index), payload(index))

    assert [m.index for m in h.store.list()] == [30, 20, 10]
    latest = h.store.latest()
    assert latest is not None and data_of(h.store, latest) == payload(30)


@pytest.mark.parametrize("retain", [1, 2, 3])
def test_only_the_newest_retain_snapshots_are_kept(open_store: OpenStore, retain: int) -> None:
    h = open_store(retain=retain)
    for index in range(1, 6):
        publish(h.store, meta(index), payload(index))

    assert [m.index for m in h.store.list()] == list(range(5, 5 - retain, -1))
    h.reopen()
    assert [m.index for m in h.store.list()] == list(range(5, 5 - retain, -1))


# Damage and crashes


def test_corrupted_latest_falls_back_to_the_previous_and_warns(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    publish(h.store, meta(1), payload(1))
    publish(h.store, meta(2), payload(2))
    h.corrupt(2)

    with caplog.at_level(logging.WARNING):
        latest = h.store.latest()

    assert latest is not None
    assert (latest.meta, data_of(h.store, latest)) == (meta(1), payload(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("event=snapshot_corrupt" in w and "index=2" in w for w in warnings)
    assert h.store.list() == [meta(2), meta(1)]  # still listed: it was published


def test_no_latest_when_every_snapshot_is_corrupted(h: Harness) -> None:
    publish(h.store, meta(1), payload(1))
    publish(h.store, meta(2), payload(2))
    h.corrupt(1)
    h.corrupt(2)

    assert h.store.latest() is None


def test_published_snapshots_survive_a_reopen(h: Harness) -> None:
    publish(h.store, meta(3, 2), payload(3))
    h.reopen()

    latest = h.store.latest()
    assert latest is not None
    assert (latest.meta, data_of(h.store, latest)) == (meta(3, 2), payload(3))


def test_writer_crash_mid_snapshot_leaves_no_partial_snapshot(h: Harness) -> None:
    publish(h.store, meta(4), payload(4))
    h.crash_mid_write(meta(9), payload(9, 1000))

    assert h.store.list() == [meta(4)]
    latest = h.store.latest()
    assert latest is not None and (latest.meta, data_of(h.store, latest)) == (meta(4), payload(4))
    # The store carries on: a later snapshot publishes whole, without the dead one's chunks.
    publish(h.store, meta(12), payload(12, 900))
    latest = h.store.latest()
    assert latest is not None
    assert (latest.meta, data_of(h.store, latest)) == (meta(12), payload(12, 900))


def test_closed_store_refuses_use(h: Harness) -> None:
    h.store.close()

    with pytest.raises(StorageError, match="closed"):
        h.store.latest()
    with pytest.raises(StorageError, match="closed"):
        h.store.create(meta(1))


# Reading in chunks (no operation holds a whole snapshot)


def test_close_returns_what_was_published(h: Harness) -> None:
    data = payload(7, 1000)
    sink = h.store.create(meta(7))
    sink.write(data)
    published = sink.close()
    assert (published.meta, published.length, published.checksum) == (
        meta(7), len(data), checksum_of(data))
    assert h.store.latest() == published


@pytest.mark.parametrize(("offset", "size"), [(0, 1), (0, 64), (10, 200), (63, 2), (64, 64),
                                              (299, 50), (0, 10_000), (300, 5), (400, 5)])
def test_read_gives_any_range_across_chunk_boundaries(h: Harness, offset: int,
                                                      size: int) -> None:
    data = payload(3, 300)
    publish(h.store, meta(3), data)
    latest = h.store.latest()
    assert latest is not None
    assert h.store.read(latest, offset, size) == data[offset : offset + size]


def test_read_of_a_snapshot_no_longer_stored_is_none(open_store: OpenStore) -> None:
    h = open_store(retain=1)
    publish(h.store, meta(1), payload(1))
    first = h.store.latest()
    assert first is not None
    publish(h.store, meta(2), payload(2))
    assert h.store.read(first, 0, 10) is None
    with pytest.raises(StorageError, match="no longer"):
        list(h.store.chunks(first))


def test_chunks_of_a_damaged_snapshot_end_in_a_storage_error(h: Harness) -> None:
    publish(h.store, meta(1), payload(1))
    latest = h.store.latest()
    assert latest is not None
    h.corrupt(1)
    with pytest.raises(StorageError):
        list(h.store.chunks(latest))
