"""LmdbRaftStorage beyond the shared contract: a full map, foreign or damaged files, options."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lmdb
import pytest

from raftkv.core.types import Entry, HardState
from raftkv.ports import StorageError, StorageFull
from storage.lmdb_store import STORE_FORMAT_VERSION, LmdbRaftStorage

SMALL_MAP_BYTES = 64 << 10


def batch(lo: int, count: int, term: int = 1, size: int = 1000) -> list[Entry]:
    return [Entry(i, term, data=bytes([i % 251]) * size) for i in range(lo, lo + count)]


def fill_until_full(store: LmdbRaftStorage) -> tuple[int, HardState]:
    """Save batches until StorageFull; the last index and hard state saved before it."""
    last, hs = 0, HardState()
    for _ in range(100_000):
        next_hs = HardState(last + 1, "n1", last)
        try:
            store.save(next_hs, batch(last + 1, 4))
        except StorageFull:
            return last, hs
        last, hs = last + 4, next_hs
    raise AssertionError("the store never filled up")


def test_full_map_raises_storage_full_and_loses_nothing(tmp_path: Path) -> None:
    store = LmdbRaftStorage(tmp_path, map_size_bytes=SMALL_MAP_BYTES,
                            max_map_size_bytes=SMALL_MAP_BYTES)
    last, hs = fill_until_full(store)
    assert last > 0
    assert store.last_index() == last
    assert store.hard_state() == hs
    assert store.entries(1, last + 1) == [e for i in range(1, last + 1, 4) for e in batch(i, 4)]
    with pytest.raises(StorageFull, match="max_map_size_bytes"):
        store.save(HardState(99, None, 0), batch(last + 1, 4))
    assert store.hard_state() == hs
    store.close()
    with LmdbRaftStorage(tmp_path, map_size_bytes=SMALL_MAP_BYTES,
                         max_map_size_bytes=SMALL_MAP_BYTES) as reopened:
        assert reopened.last_index() == last
        assert reopened.hard_state() == hs


def test_storage_full_message_names_the_data_file(tmp_path: Path) -> None:
    store = LmdbRaftStorage(tmp_path, map_size_bytes=SMALL_MAP_BYTES,
                            max_map_size_bytes=SMALL_MAP_BYTES)
    with pytest.raises(StorageFull, match=str(tmp_path / "data.mdb")):
        store.save(None, batch(1, 1000))
    assert store.last_index() == 0
    store.close()


def test_map_grows_up_to_the_max(tmp_path: Path) -> None:
    store = LmdbRaftStorage(tmp_path, map_size_bytes=SMALL_MAP_BYTES,
                            max_map_size_bytes=64 << 20)
    written = batch(1, 2000)  # ~2 MB, 30 times the initial map
    for i in range(0, len(written), 100):
        store.save(HardState(1, None, i), written[i:i + 100])
    assert store.entries(1, 2001) == written
    store.close()
    assert (tmp_path / "data.mdb").stat().st_size > 2_000_000


def test_map_growth_stops_at_the_max_with_storage_full(tmp_path: Path) -> None:
    store = LmdbRaftStorage(tmp_path, map_size_bytes=SMALL_MAP_BYTES,
                            max_map_size_bytes=4 * SMALL_MAP_BYTES)
    last, _ = fill_until_full(store)
    assert last * 1000 > 2 * SMALL_MAP_BYTES  # it grew well past the initial map
    assert store.entries(1, last + 1)[-1] == batch(last, 1)[0]
    store.close()


def test_max_map_size_below_map_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LmdbRaftStorage(tmp_path, map_size_bytes=2 << 20, max_map_size_bytes=1 << 20)


def test_reopening_keeps_data_after_growth_beyond_the_configured_map(tmp_path: Path) -> None:
    with LmdbRaftStorage(tmp_path, map_size_bytes=SMALL_MAP_BYTES,
                         max_map_size_bytes=64 << 20) as store:
        store.save(None, batch(1, 500))
    with LmdbRaftStorage(tmp_path, map_size_bytes=SMALL_MAP_BYTES,
                         max_map_size_bytes=64 << 20) as store:
        assert store.entries(1, 501) == batch(1, 500)
        store.save(None, batch(501, 10))
        assert store.last_index() == 510


# Refusing what is not ours


def test_garbage_data_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "data.mdb").write_bytes(os.urandom(3 * 4096))
    with pytest.raises(StorageError, match=r"data\.mdb is not an LMDB file"):
        LmdbRaftStorage(tmp_path)


def test_truncated_data_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    with LmdbRaftStorage(tmp_path) as store:
        store.save(HardState(1, None, 0), batch(1, 200))
    data_file = tmp_path / "data.mdb"
    os.truncate(data_file, 4 * 4096)
    with pytest.raises(StorageError, match=rf"{data_file} is truncated"):
        LmdbRaftStorage(tmp_path)


def test_foreign_lmdb_environment_is_refused(tmp_path: Path) -> None:
    with lmdb.open(str(tmp_path)) as env, env.begin(write=True) as txn:
        txn.put(b"someone", b"else")
    with pytest.raises(StorageError, match=r"data\.mdb is an LMDB environment but not a raftkv"):
        LmdbRaftStorage(tmp_path)


def test_foreign_lmdb_with_a_meta_database_but_no_marker_is_refused(tmp_path: Path) -> None:
    with lmdb.open(str(tmp_path), max_dbs=2) as env:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"version", b"1", db=meta)
    with pytest.raises(StorageError, match="not a raftkv"):
        LmdbRaftStorage(tmp_path)


def test_foreign_lmdb_with_a_plain_meta_key_is_refused(tmp_path: Path) -> None:
    with lmdb.open(str(tmp_path)) as env, env.begin(write=True) as txn:
        txn.put(b"meta", b"not a database")
    with pytest.raises(StorageError, match="not a raftkv"):
        LmdbRaftStorage(tmp_path)


def test_newer_store_format_is_refused_asking_for_an_upgrade(tmp_path: Path) -> None:
    LmdbRaftStorage(tmp_path).close()
    with lmdb.open(str(tmp_path), max_dbs=3) as env:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"store_format", (STORE_FORMAT_VERSION + 1).to_bytes(8, "big"), db=meta)
    with pytest.raises(StorageError, match=r"data\.mdb was written by a newer raftkv.*upgrade"):
        LmdbRaftStorage(tmp_path)


def test_a_file_given_as_data_dir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_text("hello")
    with pytest.raises(StorageError, match="not-a-dir is a file"):
        LmdbRaftStorage(path)


def test_a_directory_named_data_mdb_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.mdb").mkdir()
    with pytest.raises(StorageError, match=r"data\.mdb is not a regular file"):
        LmdbRaftStorage(tmp_path)


def test_opening_the_same_data_dir_twice_in_one_process_is_refused(tmp_path: Path) -> None:
    with LmdbRaftStorage(tmp_path), pytest.raises(StorageError, match=str(tmp_path)):
        LmdbRaftStorage(tmp_path)


def test_corrupt_log_entry_raises_storage_error_naming_the_file(tmp_path: Path) -> None:
    with LmdbRaftStorage(tmp_path) as store:
        store.save(None, batch(1, 3))
    with lmdb.open(str(tmp_path), max_dbs=3) as env:
        log_db = env.open_db(b"log")
        with env.begin(write=True) as txn:
            txn.put((2).to_bytes(8, "big"), b"\xc1garbage", db=log_db)
    with LmdbRaftStorage(tmp_path) as store:
        assert store.term(1) == 1
        with pytest.raises(StorageError, match=r"data\.mdb is corrupt: log entry 2"):
            store.term(2)
        with pytest.raises(StorageError, match="corrupt"):
            store.entries(1, 4)


def test_reads_after_close_raise_storage_error(tmp_path: Path) -> None:
    store = LmdbRaftStorage(tmp_path)
    store.close()
    store.close()  # closing twice is fine
    with pytest.raises(StorageError, match="closed"):
        store.last_index()


# Options and compaction


def test_unsafe_no_fsync_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="storage.lmdb_store"):
        LmdbRaftStorage(tmp_path, unsafe_no_fsync=True).close()
    assert any(r.levelno == logging.WARNING and "unsafe_no_fsync" in r.getMessage()
               for r in caplog.records)


def test_default_open_logs_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="storage.lmdb_store"):
        LmdbRaftStorage(tmp_path).close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_compact_in_small_chunks_removes_everything_below(tmp_path: Path) -> None:
    with LmdbRaftStorage(tmp_path, compact_chunk_entries=3) as store:
        store.save(None, batch(1, 20, size=10))
        store.compact(15)
        assert (store.first_index(), store.last_index()) == (15, 20)
        store.compact(21)
        assert (store.first_index(), store.last_index()) == (21, 20)


def test_unsynced_save_is_durable_with_lmdb(tmp_path: Path) -> None:
    with LmdbRaftStorage(tmp_path) as store:
        store.save(HardState(2, "n1", 0), batch(1, 2), sync=False)
    with LmdbRaftStorage(tmp_path) as store:
        assert store.last_index() == 2
        assert store.hard_state() == HardState(2, "n1", 0)


def _put_meta(path: Path, key: bytes, value: bytes) -> None:
    """Write `key` in the store's meta db behind its back (damage)."""
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(key, value, db=env.open_db(b"meta", txn=txn))
    env.close()


def test_the_joining_mark_is_kept_until_cleared_and_a_damaged_one_is_refused(
        tmp_path: Path) -> None:
    with LmdbRaftStorage(tmp_path / "raft") as store:
        assert not store.joining()
        store.set_joining(True)
    with LmdbRaftStorage(tmp_path / "raft") as store:
        assert store.joining()
        store.set_joining(False)
        assert not store.joining()
        store.set_joining(False)  # clearing none is no error
    _put_meta(tmp_path / "raft", b"joining", b"bad")
    with LmdbRaftStorage(tmp_path / "raft") as store, pytest.raises(StorageError,
                                                                    match="joining mark"):
        store.joining()


def test_a_data_dir_gets_one_incarnation_for_good_and_a_new_one_another(
        tmp_path: Path) -> None:
    with LmdbRaftStorage(tmp_path / "raft") as store:
        made = store.incarnation()
        assert made == store.incarnation() and len(made) == 32 and made.isalnum()
    with LmdbRaftStorage(tmp_path / "raft") as store:
        assert store.incarnation() == made  # kept across a restart
    with LmdbRaftStorage(tmp_path / "other") as store:
        assert store.incarnation() != made  # a wiped or new data dir differs
    _put_meta(tmp_path / "raft", b"incarnation", b"not/alnum")
    with LmdbRaftStorage(tmp_path / "raft") as store, pytest.raises(StorageError,
                                                                    match="incarnation"):
        store.incarnation()
