"""The Raft log and hard state of one node in one LMDB environment (`<data_dir>/data.mdb`).

Named databases:
    log         8-byte big-endian index -> codec.encode_entry(entry)
    hard_state  b"hard_state"           -> codec.encode_hard_state(hard_state)
    meta        b"store_format"         -> 8-byte big-endian STORE_FORMAT_VERSION, written at
                                           creation; it marks the environment as ours
                b"log_start"            -> the first index while the log is empty (where the
                                           log was compacted or reset to)
                b"node_id", b"cluster_id" (UTF-8), b"identity_format" (8-byte big-endian)
                b"joining"              -> b"1" while a joined node has not yet applied its
                                           own addition (absent otherwise)
                b"incarnation"          -> this data dir's random id (ASCII), made once

Durability: the environment is opened (storage.lmdb_env) with sync=True and metasync=True
(never writemap or map_async), so every write transaction is fsynced when it commits; `save()`
is one write transaction. `save(sync=False)` is therefore also durable: the protocol allows an
unsynced save to survive a crash, and a separate unsynced path would buy little with LMDB.

Threading: one thread (the runtime loop) owns the store; storage.lmdb_env serialises the
transactions anyway, so growing the map never races a reader.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import lmdb

from raftkv import codec
from raftkv.core.types import Entry, HardState
from raftkv.ports import NodeIdentity, StorageError, is_incarnation
from storage.lmdb_env import LmdbEnvironment

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
_JOINING: Final = b"joining"
_INCARNATION: Final = b"incarnation"

if TYPE_CHECKING:
    from storage.lmdb_env import WriteTxn as _Txn


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
        if compact_chunk_entries < 1:
            raise ValueError("compact_chunk_entries must be >= 1")
        self._dir = Path(data_dir)
        self._file = self._dir / "data.mdb"
        self._compact_chunk_entries = compact_chunk_entries
        self._lmdb = self._open_env(map_size_bytes, max_map_size_bytes, unsafe_no_fsync)
        try:
            self._log, self._hard, self._meta = self._lmdb.write(self._open_dbs)
        except BaseException:
            self.close()
            raise
        if unsafe_no_fsync:
            log.warning("event=storage_unsafe_no_fsync path=%s detail=commits are not fsynced; "
                        "a power cut can lose acknowledged writes", self._file)

    # LogStore

    def first_index(self) -> int:
        with self._lmdb.reading() as txn:
            return self._first(txn)

    def last_index(self) -> int:
        with self._lmdb.reading() as txn:
            return self._last(txn)

    def entries(self, lo: int, hi: int) -> list[Entry]:
        with self._lmdb.reading() as txn:
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
        with self._lmdb.reading() as txn:
            value = txn.get(_u64(index), db=self._log)
            return None if value is None else self._decode(index, value).term

    def compact(self, before_index: int) -> None:
        """Delete entries < before_index in transactions of at most compact_chunk_entries.

        A crash in between leaves a contiguous suffix of the log, which is still valid.
        """
        if before_index <= self.first_index():
            return
        while not self._lmdb.write(lambda txn: self._compact_chunk(txn, before_index)):
            pass

    # HardStateStore

    def hard_state(self) -> HardState:
        with self._lmdb.reading() as txn:
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

        self._lmdb.write(write)

    def identity(self) -> NodeIdentity | None:
        with self._lmdb.reading() as txn:
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

        self._lmdb.write(write)

    def joining(self) -> bool:
        """True from the moment this node's join learnt the cluster until the node has
        applied its own addition: a node stopped in between waits for that again when
        restarted, instead of serving from the partial state it stored."""
        with self._lmdb.reading() as txn:
            value = txn.get(_JOINING, db=self._meta)
        if value not in (None, b"1"):
            raise self._corrupt("the joining mark is unreadable")
        return value is not None

    def set_joining(self, joining: bool) -> None:
        def write(txn: _Txn) -> None:
            if joining:
                txn.put(_JOINING, b"1", db=self._meta)
            else:
                txn.delete(_JOINING, db=self._meta)

        self._lmdb.write(write)

    def incarnation(self) -> str:
        """This data dir's incarnation: a random id made the first time it is asked for
        (once per data dir), so that a wiped or replaced one differs. The members record the
        one they see (raftkv.kv.commands.MemberIncarnation)."""
        with self._lmdb.reading() as txn:
            value = txn.get(_INCARNATION, db=self._meta)
        if value is None:  # (one process per data dir: nobody else makes one meanwhile)
            made = secrets.token_hex(16)
            self._lmdb.write(lambda txn: txn.put(_INCARNATION, made.encode(), db=self._meta))
            return made
        text = value.decode("ascii", "replace")
        if not is_incarnation(text):
            raise self._corrupt("the data dir's incarnation is unreadable")
        return text

    def close(self) -> None:
        self._lmdb.close()

    def __enter__(self) -> LmdbRaftStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Opening

    def _open_env(self, map_size_bytes: int, max_map_size_bytes: int,
                  unsafe_no_fsync: bool) -> LmdbEnvironment:
        if self._dir.exists() and not self._dir.is_dir():
            raise StorageError(f"data dir {self._dir} is a file, not a directory; "
                               "point the data dir at a directory")
        if self._file.exists() and not self._file.is_file():
            raise StorageError(f"{self._file} is not a regular file; point the data dir at a "
                               "raftkv data dir or an empty directory")
        return LmdbEnvironment(
            self._dir, what="the Raft log store", map_size_bytes=map_size_bytes,
            max_map_size_bytes=max_map_size_bytes, max_dbs=3, sync=not unsafe_no_fsync,
            not_ours="it is not a raftkv data dir: point the data dir elsewhere or move the "
                     "file away",
            damaged="if the file is damaged, rebuild this node from its peers or restore its "
                    "data dir")

    def _open_dbs(self, txn: _Txn) -> tuple[lmdb._Database, lmdb._Database, lmdb._Database]:
        """Create our databases in an empty environment, or check that it is ours."""
        if not txn.cursor().first():
            env = self._lmdb.env
            dbs = tuple(env.open_db(name, txn=txn) for name in (b"log", b"hard_state", b"meta"))
            txn.put(_FORMAT, _u64(STORE_FORMAT_VERSION), db=dbs[2])
            txn.put(_LOG_START, _u64(1), db=dbs[2])
            return dbs[0], dbs[1], dbs[2]
        foreign = (f"{self._file} is an LMDB environment but not a raftkv log store "
                   "(no format marker); point the data dir elsewhere")
        try:
            meta = self._lmdb.env.open_db(b"meta", txn=txn, create=False)
        except (lmdb.NotFoundError, lmdb.IncompatibleError) as e:
            raise StorageError(foreign) from e
        version = txn.get(_FORMAT, db=meta)
        if version is None or len(version) != _U64.size:
            raise StorageError(foreign)
        if _U64.unpack(version)[0] == 0:  # no build ever wrote it: the marker is damaged
            raise self._corrupt("the store format marker is 0")
        if _U64.unpack(version)[0] > STORE_FORMAT_VERSION:
            raise StorageError(
                f"{self._file} was written by a newer raftkv (store format "
                f"{_U64.unpack(version)[0]}, this build reads up to {STORE_FORMAT_VERSION}); "
                "upgrade raftkv to open it")
        try:
            log_db = self._lmdb.env.open_db(b"log", txn=txn, create=False)
            hard_db = self._lmdb.env.open_db(b"hard_state", txn=txn, create=False)
        except (lmdb.NotFoundError, lmdb.IncompatibleError) as e:
            raise self._corrupt("the log or hard_state database is missing") from e
        return log_db, hard_db, meta

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
