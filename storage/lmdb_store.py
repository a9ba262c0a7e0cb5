"""The Raft log and hard state of one node in one LMDB environment (`<data_dir>/data.mdb`).

Named databases:
    log         8-byte big-endian index -> codec.encode_entry(entry)
    hard_state  b"hard_state"           -> codec.encode_hard_state(hard_state)
    meta        b"store_format"         -> 8-byte big-endian STORE_FORMAT_VERSION, written at
                                           creation; it marks the environment as ours
                b"log_start"            -> the first index while the log is empty (where the
                                           log was compacted or reset to)
                b"node_id", b"cluster_id" (UTF-8), b"identity_format" (8-byte big-endian)

Durability: the environment is opened with sync=True and metasync=True (never writemap or
map_async), so every write transaction is fsynced when it commits; `save()` is one write
transaction. `save(sync=False)` is therefore also durable: the protocol allows an unsynced save
to survive a crash, and a separate unsynced path would buy little with LMDB.

Threading: one thread (the runtime loop) owns the store. Growing the map replaces the memory
map, so no other thread may read while that thread writes.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias, TypeVar

import lmdb

from raftkv import codec
from raftkv.core.types import Entry, HardState
from raftkv.ports import NodeIdentity, StorageError, StorageFull

__all__ = ["STORE_FORMAT_VERSION", "LmdbRaftStorage"]

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION: Final = 1
DEFAULT_MAP_SIZE_BYTES: Final = 1 << 30
DEFAULT_MAX_MAP_SIZE_BYTES: Final = 64 << 30
DEFAULT_COMPACT_CHUNK_ENTRIES: Final = 10_000

_U64: Final = struct.Struct(">Q")
_HARD_STATE: Final = b"hard_state"
_FORMAT: Final = b"store_format"
_LOG_START: Final = b"log_start"
_NODE_ID: Final = b"node_id"
_CLUSTER_ID: Final = b"cluster_id"
_IDENTITY_FORMAT: Final = b"identity_format"
_FULL_ERRNOS: Final = (errno.ENOSPC, errno.EDQUOT)

_T = TypeVar("_T")
if TYPE_CHECKING:
    _Txn: TypeAlias = lmdb.Transaction[bytes]


def _u64(n: int) -> bytes:
    return _U64.pack(n)


class LmdbRaftStorage:
    """RaftStorage (raftkv.ports) on LMDB; behaves like storage.memory.MemoryRaftStorage."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        map_size_bytes: int = DEFAULT_MAP_SIZE_BYTES,
        max_map_size_bytes: int = DEFAULT_MAX_MAP_SIZE_BYTES,
        compact_chunk_entries: int = DEFAULT_COMPACT_CHUNK_ENTRIES,
        unsafe_no_fsync: bool = False,
    ) -> None:
        if not 0 < map_size_bytes <= max_map_size_bytes:
            raise ValueError("need 0 < map_size_bytes <= max_map_size_bytes")
        if compact_chunk_entries < 1:
            raise ValueError("compact_chunk_entries must be >= 1")
        self._dir = Path(data_dir)
        self._file = self._dir / "data.mdb"
        self._max_map_size_bytes = max_map_size_bytes
        self._compact_chunk_entries = compact_chunk_entries
        self._env = self._open_env(map_size_bytes, unsafe_no_fsync)
        self._closed = False
        try:
            self._log, self._hard, self._meta = self._write(self._open_dbs)
        except BaseException:
            self.close()
            raise
        if unsafe_no_fsync:
            log.warning("event=storage_unsafe_no_fsync path=%s detail=commits are not fsynced; "
                        "a power cut can lose acknowledged writes", self._file)

    # LogStore

    def first_index(self) -> int:
        with self._reading() as txn:
            return self._first(txn)

    def last_index(self) -> int:
        with self._reading() as txn:
            return self._last(txn)

    def entries(self, lo: int, hi: int) -> list[Entry]:
        with self._reading() as txn:
            first, last = self._first(txn), self._last(txn)
            if lo < first or hi > last + 1 or lo > hi:
                raise StorageError(f"entries [{lo}, {hi}) not stored (have [{first}, {last}])")
            out: list[Entry] = []
            if lo == hi:
                return out
            cursor = txn.cursor(db=self._log)
            if not cursor.set_key(_u64(lo)):
                raise self._corrupt(f"the log skips index {lo}")
            for index, (key, value) in zip(range(lo, hi), cursor.iternext(), strict=False):
                if key != _u64(index):
                    raise self._corrupt(f"the log skips index {index}")
                out.append(self._decode(index, value))
            if len(out) != hi - lo:
                raise self._corrupt(f"the log ends before index {hi - 1}")
            return out

    def term(self, index: int) -> int | None:
        if not 0 < index < 1 << 64:
            return None
        with self._reading() as txn:
            value = txn.get(_u64(index), db=self._log)
            return None if value is None else self._decode(index, value).term

    def compact(self, before_index: int) -> None:
        """Delete entries < before_index in transactions of at most compact_chunk_entries.

        A crash in between leaves a contiguous suffix of the log, which is still valid.
        """
        if before_index <= self.first_index():
            return
        while not self._write(lambda txn: self._compact_chunk(txn, before_index)):
            pass

    # HardStateStore

    def hard_state(self) -> HardState:
        with self._reading() as txn:
            value = txn.get(_HARD_STATE, db=self._hard)
        if value is None:
            return HardState()
        try:
            return codec.decode_hard_state(value)
        except codec.DecodeError as e:
            raise self._corrupt(f"the hard state is unreadable ({e})") from e

    # RaftStorage

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        *,
        reset_log: bool = False,
        sync: bool = True,
    ) -> None:
        """One write transaction, fsynced on commit, also with sync=False (see module doc)."""
        for expected, e in enumerate(entries, start=entries[0].index if entries else 0):
            if e.index != expected:
                raise StorageError("entries to save are not contiguous")
        items = [(_u64(e.index), codec.encode_entry(e)) for e in entries]
        hs = None if hard_state is None else codec.encode_hard_state(hard_state)

        def write(txn: _Txn) -> None:
            if reset_log:
                txn.put(_LOG_START, _u64(self._first(txn)), db=self._meta)
                txn.drop(self._log, delete=False)
            if entries:
                self._truncate_from(txn, entries[0].index)
                _, added = txn.cursor(db=self._log).putmulti(items, append=True)
                if added != len(items):
                    raise self._corrupt("entries could not be appended after the log's end")
            if hs is not None:
                txn.put(_HARD_STATE, hs, db=self._hard)

        self._write(write)

    def identity(self) -> NodeIdentity | None:
        with self._reading() as txn:
            node_id = txn.get(_NODE_ID, db=self._meta)
            cluster_id = txn.get(_CLUSTER_ID, db=self._meta)
            version = txn.get(_IDENTITY_FORMAT, db=self._meta)
        if node_id is None or cluster_id is None or version is None:
            return None
        try:
            return NodeIdentity(node_id.decode(), cluster_id.decode(), _U64.unpack(version)[0])
        except (UnicodeDecodeError, struct.error) as e:
            raise self._corrupt("the node identity is unreadable") from e

    def set_identity(self, identity: NodeIdentity) -> None:
        if not 0 <= identity.format_version < 1 << 64:
            raise ValueError("identity format_version must fit in 64 bits")

        def write(txn: _Txn) -> None:
            txn.put(_NODE_ID, identity.node_id.encode(), db=self._meta)
            txn.put(_CLUSTER_ID, identity.cluster_id.encode(), db=self._meta)
            txn.put(_IDENTITY_FORMAT, _u64(identity.format_version), db=self._meta)

        self._write(write)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()

    def __enter__(self) -> LmdbRaftStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Opening

    def _open_env(self, map_size_bytes: int, unsafe_no_fsync: bool) -> lmdb.Environment:
        if self._dir.exists() and not self._dir.is_dir():
            raise StorageError(f"data dir {self._dir} is a file, not a directory; "
                               "point the data dir at a directory")
        if self._file.exists() and not self._file.is_file():
            raise StorageError(f"{self._file} is not a regular file; point the data dir at a "
                               "raftkv data dir or an empty directory")
        try:
            env = lmdb.open(str(self._dir), map_size=map_size_bytes, subdir=True, max_dbs=3,
                            sync=not unsafe_no_fsync, metasync=not unsafe_no_fsync,
                            writemap=False, map_async=False, max_spare_txns=1)
        except lmdb.InvalidError as e:
            raise StorageError(f"{self._file} is not an LMDB file ({e}); it is not a raftkv "
                               "data dir: point the data dir elsewhere or move the file away"
                               ) from e
        except (lmdb.Error, OSError) as e:
            raise StorageError(f"cannot open LMDB data dir {self._dir} ({e}); check that it "
                               "exists, is writable and is not open in another process") from e
        try:
            size = self._file.stat().st_size
            needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        except (lmdb.Error, OSError) as e:
            env.close()
            raise StorageError(f"cannot inspect {self._file} ({e})") from e
        if size < needed:
            env.close()
            raise StorageError(f"{self._file} is truncated ({size} bytes, LMDB needs {needed}); "
                               "restore the data dir or rebuild this node from its peers")
        return env

    def _open_dbs(self, txn: _Txn) -> tuple[lmdb._Database, lmdb._Database, lmdb._Database]:
        """Create our databases in an empty environment, or check that it is ours."""
        if not txn.cursor().first():
            dbs = tuple(self._env.open_db(name, txn=txn) for name in (b"log", b"hard_state",
                                                                       b"meta"))
            txn.put(_FORMAT, _u64(STORE_FORMAT_VERSION), db=dbs[2])
            txn.put(_LOG_START, _u64(1), db=dbs[2])
            return dbs[0], dbs[1], dbs[2]
        foreign = (f"{self._file} is an LMDB environment but not a raftkv log store "
                   "(no format marker); point the data dir elsewhere")
        try:
            meta = self._env.open_db(b"meta", txn=txn, create=False)
        except (lmdb.NotFoundError, lmdb.IncompatibleError) as e:
            raise StorageError(foreign) from e
        version = txn.get(_FORMAT, db=meta)
        if version is None or len(version) != _U64.size:
            raise StorageError(foreign)
        if _U64.unpack(version)[0] > STORE_FORMAT_VERSION:
            raise StorageError(
                f"{self._file} was written by a newer raftkv (store format "
                f"{_U64.unpack(version)[0]}, this build reads up to {STORE_FORMAT_VERSION}); "
                "upgrade raftkv to open it")
        try:
            log_db = self._env.open_db(b"log", txn=txn, create=False)
            hard_db = self._env.open_db(b"hard_state", txn=txn, create=False)
        except (lmdb.NotFoundError, lmdb.IncompatibleError) as e:
            raise self._corrupt("the log or hard_state database is missing") from e
        return log_db, hard_db, meta

    # Transactions

    @contextmanager
    def _reading(self) -> Iterator[_Txn]:
        self._check_open()
        try:
            with self._env.begin() as txn:
                yield txn
        except lmdb.Error as e:
            raise self._failure("read", e) from e

    def _write(self, body: Callable[[_Txn], _T]) -> _T:
        """Run `body` in one write transaction; grow the map and retry when it is full."""
        self._check_open()
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError as e:
                self._grow_map(e)
            except lmdb.Error as e:
                if e.code in _FULL_ERRNOS:
                    raise StorageFull(f"no space left for {self._file} ({e}); nothing was "
                                      "written: free disk space, then restart") from e
                raise self._failure("write", e) from e

    def _grow_map(self, cause: lmdb.MapFullError) -> None:
        size = self._env.info()["map_size"]
        if size >= self._max_map_size_bytes:
            raise StorageFull(
                f"LMDB map of {self._file} is full at {size} bytes (max_map_size_bytes="
                f"{self._max_map_size_bytes}); nothing was written: raise max_map_size_bytes "
                "(with the disk space to match) or compact the log") from cause
        new_size = min(2 * size, self._max_map_size_bytes)
        try:
            self._env.set_mapsize(new_size)
        except lmdb.Error as e:
            raise self._failure("map resize", e) from e
        log.info("event=storage_map_grown path=%s map_size_bytes=%d", self._file, new_size)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"storage {self._file} is closed")

    def _failure(self, action: str, e: lmdb.Error) -> StorageError:
        return StorageError(f"LMDB {action} failed in {self._file}: {e}. The node must stop: "
                            "check the disk (space, permissions, I/O errors) and restart; if the "
                            "file is damaged, rebuild this node from its peers")

    def _corrupt(self, what: str) -> StorageError:
        return StorageError(f"{self._file} is corrupt: {what}; rebuild this node from its peers "
                            "or restore its data dir")

    # Log internals (inside a transaction)

    def _first(self, txn: _Txn) -> int:
        cursor = txn.cursor(db=self._log)
        if cursor.first():
            return int(_U64.unpack(cursor.key())[0])
        start = txn.get(_LOG_START, db=self._meta)
        if start is None or len(start) != _U64.size:
            raise self._corrupt("the log start is missing")
        return int(_U64.unpack(start)[0])

    def _last(self, txn: _Txn) -> int:
        cursor = txn.cursor(db=self._log)
        if cursor.last():
            return int(_U64.unpack(cursor.key())[0])
        return self._first(txn) - 1

    def _decode(self, index: int, value: bytes) -> Entry:
        try:
            entry = codec.decode_entry(value)
        except codec.DecodeError as e:
            raise self._corrupt(f"log entry {index} is unreadable ({e})") from e
        if entry.index != index:
            raise self._corrupt(f"log entry under key {index} has index {entry.index}")
        return entry

    def _truncate_from(self, txn: _Txn, first: int) -> None:
        """Check that an append at `first` extends the log, and delete entries >= first."""
        cursor = txn.cursor(db=self._log)
        if not cursor.last():
            return  # an empty log accepts any start
        log_first, log_last = self._first(txn), int(_U64.unpack(cursor.key())[0])
        if first < log_first or first > log_last + 1:
            raise StorageError(f"append at {first} leaves a gap or precedes the log "
                               f"[{log_first}, {log_last}]")
        if cursor.set_key(_u64(first)):
            while cursor.delete():
                pass

    def _compact_chunk(self, txn: _Txn, before_index: int) -> bool:
        """Delete up to compact_chunk_entries entries < before_index; True when all are gone."""
        cursor = txn.cursor(db=self._log)
        cursor.first()
        for _ in range(self._compact_chunk_entries):
            key = cursor.key()
            if not key or _U64.unpack(key)[0] >= before_index:
                break
            cursor.delete()
        else:
            return False
        txn.put(_LOG_START, _u64(before_index), db=self._meta)
        return True
