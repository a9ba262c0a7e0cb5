"""LMDB snapshot store behaviour beyond the shared contract: chunks on disk, the map size,
what it refuses to open, and how LMDB errors surface."""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path
from typing import Any

import lmdb
import pytest

from raftkv.core.types import Membership, SnapshotMeta
from raftkv.ports import StorageError, StorageFull
from snapshots.lmdb_store import MIB, LmdbSnapshotStore
from tests.snapshots.test_contract import data_of, raw_chunk_count, write_and_die
from tests.support.lmdb_faults import FailingEnv, lmdb_error

MEMBERS = Membership(frozenset({"n1"}))


def meta(index: int) -> SnapshotMeta:
    return SnapshotMeta(index, 1, MEMBERS)


def publish(store: LmdbSnapshotStore, index: int, data: bytes) -> None:
    sink = store.create(meta(index))
    sink.write(data)
    sink.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "snapshots"


# Chunks


def test_chunks_reach_disk_as_they_fill_and_memory_holds_less_than_one(path: Path) -> None:
    store = LmdbSnapshotStore(path, chunk_size_bytes=100)
    sink = store.create(meta(1))
    for _ in range(25):
        sink.write(b"x" * 37)  # 925 bytes: 9 full chunks and 25 bytes pending
        assert sink.buffered_bytes < 100

    assert store.chunk_count() == 9
    assert store.list() == []
    sink.close()
    assert store.chunk_count() == 10
    store.close()


def test_one_large_write_is_split_into_chunks(path: Path) -> None:
    store = LmdbSnapshotStore(path, chunk_size_bytes=1000)
    sink = store.create(meta(1))
    sink.write(bytes(10_500))

    assert store.chunk_count() == 10
    assert sink.buffered_bytes == 500
    sink.close()
    store.close()


def test_cancel_deletes_the_written_chunks(path: Path) -> None:
    store = LmdbSnapshotStore(path, chunk_size_bytes=10)
    publish(store, 1, b"a" * 30)
    sink = store.create(meta(2))
    sink.write(b"b" * 55)
    assert store.chunk_count() == 3 + 5

    sink.cancel()
    assert store.chunk_count() == 3
    store.close()


def test_chunks_of_snapshots_beyond_retain_are_deleted_on_publish(path: Path) -> None:
    store = LmdbSnapshotStore(path, retain=2, chunk_size_bytes=10)
    publish(store, 1, b"a" * 100)
    publish(store, 2, b"b" * 20)
    publish(store, 3, b"c" * 30)

    assert store.chunk_count() == 2 + 3
    store.close()


def test_reopen_deletes_chunks_left_by_a_writer_that_died(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LmdbSnapshotStore(path, chunk_size_bytes=10)
    publish(store, 1, b"a" * 30)
    store.close()
    write_and_die(path, meta(2), b"b" * 95, chunk_size=10)
    assert raw_chunk_count(path) == 3 + 9

    with caplog.at_level(logging.INFO):
        store = LmdbSnapshotStore(path, chunk_size_bytes=10)

    assert store.chunk_count() == 3
    assert any("event=snapshot_partial_discarded" in r.getMessage() for r in caplog.records)
    publish(store, 3, b"c" * 20)  # a fresh id: never mixed with the dead writer's chunks
    latest = store.latest()
    assert latest is not None and data_of(store, latest) == b"c" * 20
    store.close()


# Damage


def test_missing_chunk_is_detected_and_skipped(path: Path) -> None:
    store = LmdbSnapshotStore(path, chunk_size_bytes=10)
    publish(store, 1, b"a" * 30)
    publish(store, 2, b"b" * 30)
    store.close()
    env = lmdb.open(str(path), max_dbs=4)
    with env.begin(write=True) as txn:
        chunks = env.open_db(b"chunks", txn=txn, create=False)
        assert txn.delete((2).to_bytes(8, "big") + (1).to_bytes(4, "big"), db=chunks)
    env.close()

    store = LmdbSnapshotStore(path, chunk_size_bytes=10)
    latest = store.latest()
    assert latest is not None and latest.meta == meta(1)
    store.close()


def test_unreadable_catalog_record_is_skipped_with_a_warning(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LmdbSnapshotStore(path)
    publish(store, 1, b"a")
    publish(store, 2, b"b")
    store.close()
    env = lmdb.open(str(path), max_dbs=4)
    with env.begin(write=True) as txn:
        catalog = env.open_db(b"catalog", txn=txn, create=False)
        txn.put((2).to_bytes(8, "big"), b"\xc1 not msgpack", db=catalog)
    env.close()

    store = LmdbSnapshotStore(path)
    with caplog.at_level(logging.WARNING):
        assert store.list() == [meta(1)]
        latest = store.latest()
    assert latest is not None and latest.meta == meta(1)
    assert any("reason=bad_catalog_record" in r.getMessage() for r in caplog.records)
    store.close()


# The map size


def test_map_grows_when_full(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = LmdbSnapshotStore(path, map_size_bytes=MIB, max_map_size_bytes=64 * MIB)
    data = bytes(range(256)) * (12 * 4096)  # 12 MiB

    with caplog.at_level(logging.INFO):
        publish(store, 1, data)

    assert store.map_size_bytes >= 16 * MIB
    latest = store.latest()
    assert latest is not None and data_of(store, latest) == data
    assert any("event=lmdb_map_grown" in r.getMessage() and str(path) in r.getMessage()
               for r in caplog.records)
    store.close()


def test_full_map_at_its_maximum_raises_storage_full_and_loses_nothing(path: Path) -> None:
    store = LmdbSnapshotStore(path, map_size_bytes=MIB, max_map_size_bytes=2 * MIB)
    publish(store, 1, b"kept")
    sink = store.create(meta(2))

    with pytest.raises(StorageFull, match="max_map_size_bytes"):
        for _ in range(4):
            sink.write(bytes(MIB))
    with pytest.raises(ValueError, match="failed"):
        sink.write(b"more")
    sink.cancel()

    latest = store.latest()
    assert latest is not None and (latest.meta, data_of(store, latest)) == (meta(1), b"kept")
    publish(store, 3, b"small")  # usable again once the failed snapshot is cancelled
    assert store.list() == [meta(3), meta(1)]
    store.close()


# What it refuses to open


def test_refuses_a_directory_holding_a_foreign_file_and_names_it(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("hello")

    with pytest.raises(StorageError, match=r"notes\.txt"):
        LmdbSnapshotStore(path)


def test_refuses_a_garbage_data_file_and_names_it(path: Path) -> None:
    path.mkdir()
    (path / "data.mdb").write_bytes(b"this is not an lmdb file" * 1000)

    with pytest.raises(StorageError, match=r"data\.mdb"):
        LmdbSnapshotStore(path)


def test_refuses_an_lmdb_environment_that_is_not_a_snapshot_store(path: Path) -> None:
    env = lmdb.open(str(path), max_dbs=4)
    env.open_db(b"log")
    env.close()

    with pytest.raises(StorageError, match=r"data\.mdb.*not a raftkv snapshot store"):
        LmdbSnapshotStore(path)


def test_refuses_a_path_that_is_a_file(path: Path) -> None:
    path.write_text("x")

    with pytest.raises(StorageError, match="not a directory"):
        LmdbSnapshotStore(path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"map_size_bytes": 1024},
        {"map_size_bytes": 4 * MIB, "max_map_size_bytes": 2 * MIB},
        {"chunk_size_bytes": 0},
        {"retain": 0},
    ],
)
def test_refuses_bad_settings(path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LmdbSnapshotStore(path, **kwargs)


# LMDB errors


# The errors are shaped as py-lmdb raises them: the errno decides, not the message's text
# (EIO is a plain lmdb.Error; ENOSPC is a DiskError with code ENOSPC).


def test_lmdb_error_becomes_storage_error_naming_the_path(path: Path) -> None:
    store = LmdbSnapshotStore(path)
    real_env = store._lmdb.env
    store._lmdb.env = FailingEnv(lmdb_error(lmdb.Error, "mdb_txn_begin", errno.EIO))  # type: ignore[assignment]

    with pytest.raises(StorageError, match=re.escape(str(path))) as raised:
        store.list()
    assert not isinstance(raised.value, StorageFull)
    assert "Input/output error" in str(raised.value)
    store._lmdb.env = real_env
    store.close()


def test_disk_full_error_becomes_storage_full(path: Path) -> None:
    store = LmdbSnapshotStore(path)
    real_env = store._lmdb.env
    store._lmdb.env = FailingEnv(lmdb_error(lmdb.DiskError, "mdb_txn_commit", errno.ENOSPC))  # type: ignore[assignment]

    with pytest.raises(StorageFull, match=re.escape(str(path))):
        store.create(meta(1)).write(bytes(2 * MIB))
    store._lmdb.env = real_env
    store.close()


def test_a_store_opened_without_discarding_keeps_unpublished_chunks_until_asked(
        path: Path) -> None:
    """A node opens its store with discard_partial=False and discards once its data dir
    proved sound: a damaged catalog makes every chunk look unpublished, and a start that
    then fails must not have deleted them (found by damaging data dirs)."""
    store = LmdbSnapshotStore(path, chunk_size_bytes=10)
    publish(store, 1, b"a" * 30)
    store.close()
    write_and_die(path, meta(2), b"b" * 95, chunk_size=10)

    store = LmdbSnapshotStore(path, chunk_size_bytes=10, discard_partial=False)
    assert store.chunk_count() == 3 + 9
    publish(store, 3, b"c" * 20)  # a fresh id all the same: after the dead writer's
    assert store.chunk_count() == 3 + 9 + 2
    store.discard_partial()
    assert store.chunk_count() == 3 + 2
    latest = store.latest()
    assert latest is not None and data_of(store, latest) == b"c" * 20
    store.close()
