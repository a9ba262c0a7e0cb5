"""SnapshotStore on LMDB, in a directory of its own.

Layout (named databases):

- `meta`: the format marker (`format` -> b"raftkv-snapshots/1").
- `chunks`: (snapshot id: u64 big-endian, chunk number: u32 big-endian) -> up to
  `chunk_size_bytes` of snapshot data. A sink writes each chunk in its own synced
  transaction as soon as it fills, so writing needs memory for one chunk only.
- `catalog`: snapshot id -> msgpack record (index, term, sorted voters and learners,
  length, chunk count, checksum). A snapshot exists once its record does: the sink's
  close() writes the record, and deletes the snapshots beyond `retain`, in ONE synced
  transaction. Chunks without a record (a crash mid-write) are deleted on open.

"Newest" means the highest (index, term), then the latest created. The environment is
storage.lmdb_env's: LMDB's map size is a hard cap, doubled on MapFullError up to
`max_map_size_bytes`, beyond which writes raise StorageFull (nothing is lost), as they do when
the disk is full. Any other LMDB error raises StorageError naming the directory.
"""

from __future__ import annotations

import builtins
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import lmdb
import msgpack  # type: ignore[import-untyped, unused-ignore]

from raftkv.core.types import Membership, SnapshotMeta
from raftkv.ports import StorageError, StoredSnapshot
from snapshots.checksum import CHECKSUM_ALGORITHM, new_hasher
from storage.lmdb_env import LmdbEnvironment

logger = logging.getLogger(__name__)

FORMAT_MARKER = b"raftkv-snapshots/1"
RECORD_VERSION = 1
_LMDB_FILES = frozenset({"data.mdb", "lock.mdb"})
_DB_META = b"meta"
_DB_CATALOG = b"catalog"
_DB_CHUNKS = b"chunks"
_ID = struct.Struct(">Q")
_CHUNK_KEY = struct.Struct(">QI")

MIB = 1024 * 1024
GIB = 1024 * MIB

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CatalogRecord:
    """What the catalog says about one published snapshot."""

    snapshot_id: int
    meta: SnapshotMeta
    length_bytes: int
    chunks: int
    checksum: str

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.meta.index, self.meta.term, self.snapshot_id)

    @property
    def stored(self) -> StoredSnapshot:
        return StoredSnapshot(self.meta, self.length_bytes, self.checksum)


def encode_catalog_record(record: CatalogRecord) -> bytes:
    meta = record.meta
    payload = {
        "v": RECORD_VERSION,
        "index": meta.index,
        "term": meta.term,
        "voters": sorted(meta.membership.voters),
        "learners": sorted(meta.membership.learners),
        "length": record.length_bytes,
        "chunks": record.chunks,
        "algorithm": CHECKSUM_ALGORITHM,
        "checksum": record.checksum,
    }
    data: bytes = msgpack.packb(payload, use_bin_type=True)
    return data


def decode_catalog_record(snapshot_id: int, data: bytes) -> CatalogRecord:
    """Decode a catalog record; ValueError if it is malformed."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ValueError(f"catalog record is not msgpack: {e}") from e
    if not isinstance(obj, dict) or obj.get("v") != RECORD_VERSION:
        raise ValueError("catalog record has an unknown version")
    if obj.get("algorithm") != CHECKSUM_ALGORITHM:
        raise ValueError("catalog record names an unknown checksum algorithm")
    index, term, length, chunks, checksum = (
        obj.get("index"), obj.get("term"), obj.get("length"), obj.get("chunks"),
        obj.get("checksum"),
    )
    voters, learners = obj.get("voters"), obj.get("learners")
    if not all(type(v) is int for v in (index, term, length, chunks)):
        raise ValueError("catalog record has a non-integer position or size")
    if not isinstance(checksum, str):
        raise ValueError("catalog record has no checksum")
    if not (_str_list(voters) and _str_list(learners)):
        raise ValueError("catalog record has a malformed membership")
    assert isinstance(index, int) and isinstance(term, int)
    assert isinstance(length, int) and isinstance(chunks, int)
    assert isinstance(voters, list) and isinstance(learners, list)
    meta = SnapshotMeta(index, term, Membership(frozenset(voters), frozenset(learners)))
    return CatalogRecord(snapshot_id, meta, length, chunks, checksum)


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


class LmdbSnapshotStore:
    """A durable SnapshotStore in its own LMDB environment at `path`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retain: int = 2,
        map_size_bytes: int = 256 * MIB,
        max_map_size_bytes: int = 64 * GIB,
        chunk_size_bytes: int = MIB,
        discard_partial: bool = True,
    ) -> None:
        """`discard_partial`: delete, now, the chunks of snapshots a writer left unpublished
        (it died). A node passes False and calls `discard_partial()` once its data dir has
        proven sound: when the catalog itself is damaged, every chunk looks unpublished, and a
        start that then fails must not have deleted them."""
        if type(retain) is not int or retain < 1:
            raise ValueError(f"retain must be an int >= 1, got {retain!r}")
        if map_size_bytes < MIB:
            raise ValueError(f"map_size_bytes must be at least 1 MiB, got {map_size_bytes}")
        if max_map_size_bytes < map_size_bytes:
            raise ValueError(
                f"max_map_size_bytes ({max_map_size_bytes}) < map_size_bytes ({map_size_bytes})"
            )
        if not 1 <= chunk_size_bytes <= 64 * MIB:
            raise ValueError(f"chunk_size_bytes must be in [1, 64 MiB], got {chunk_size_bytes}")
        self.path = Path(path)
        self._retain = retain
        self._chunk_size_bytes = chunk_size_bytes
        self._ids = threading.Lock()  # guards _next_id; the environment has its own lock
        self._check_directory()
        self._lmdb = LmdbEnvironment(
            self.path, what="the snapshot store", map_size_bytes=map_size_bytes,
            max_map_size_bytes=max_map_size_bytes, max_dbs=4,
            not_ours="it is not a raftkv snapshot store: move it away (the node then gets a "
                     "snapshot from the leader)",
            damaged="if the store is damaged, move the directory away and the node will get a "
                    "snapshot from the leader")
        try:
            self._init_databases()
            self._next_id = (self.discard_partial() if discard_partial
                             else self._highest_id()) + 1
        except BaseException:
            self._lmdb.close()
            raise

    # ---------------------------------------------------------------- SnapshotStore
    def create(self, meta: SnapshotMeta) -> LmdbSnapshotSink:
        self._check_open()
        with self._ids:
            snapshot_id = self._next_id
            self._next_id += 1
        return LmdbSnapshotSink(self, snapshot_id, meta, self._chunk_size_bytes)

    def latest(self) -> StoredSnapshot | None:
        def read(txn: lmdb.Transaction[memoryview]) -> StoredSnapshot | None:
            for record in self._records(txn):
                problem = self._verify(txn, record)
                if problem is None:
                    return record.stored
                logger.warning(
                    "event=snapshot_corrupt store=lmdb path=%s snapshot_id=%d index=%d term=%d "
                    "reason=%s action=skipped",
                    self.path, record.snapshot_id, record.meta.index, record.meta.term, problem,
                )
            return None

        return self._read(read)

    def read(self, snapshot: StoredSnapshot, offset: int, size: int) -> bytes | None:
        if offset < 0 or size < 0:
            raise ValueError("offset and size must be >= 0")

        def read(txn: lmdb.Transaction[memoryview]) -> bytes | None:
            record = self._find(txn, snapshot)
            if record is None:
                return None
            left = max(0, record.length_bytes - offset)
            return self._read_range(txn, record, offset, min(size, left))

        return self._read(read)

    def chunks(self, snapshot: StoredSnapshot) -> Iterator[bytes]:
        """Each stored chunk in its own short read transaction (a long one would hold the
        environment's lock while the caller works on the chunks)."""
        hasher, length = new_hasher(), 0
        what = f"snapshot {snapshot.meta.index}/{snapshot.meta.term} in {self.path}"
        def read_chunk(txn: lmdb.Transaction[memoryview], n: int) -> bytes | None:
            record = self._find(txn, snapshot)
            if record is None:
                raise StorageError(f"{what} is no longer stored")
            if n >= record.chunks:
                return None
            value = txn.get(_CHUNK_KEY.pack(record.snapshot_id, n), db=self._chunks)
            if value is None:
                raise StorageError(f"{what} is missing chunk {n}")
            return bytes(value)

        chunk_no = 0
        while True:
            chunk = self._read(lambda txn: read_chunk(txn, chunk_no))  # noqa: B023
            if chunk is None:
                break
            hasher.update(chunk)
            length += len(chunk)
            chunk_no += 1
            yield chunk
        if length != snapshot.length or hasher.hexdigest() != snapshot.checksum:
            raise StorageError(f"{what} does not match its length and checksum: the store is "
                               "damaged; move it away and the node gets a snapshot from the "
                               "leader")

    def list(self) -> list[SnapshotMeta]:
        return self._read(lambda txn: [r.meta for r in self._records(txn)])

    def close(self) -> None:
        self._lmdb.close()

    # ---------------------------------------------------------------- introspection
    def chunk_count(self) -> int:
        """Stored chunk records, published or being written (for tests and status)."""
        return self._read(lambda txn: int(txn.stat(self._chunks)["entries"]))

    @property
    def map_size_bytes(self) -> int:
        return self._lmdb.map_size_bytes

    # ---------------------------------------------------------------- opening
    def _check_directory(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StorageError(
                f"snapshot store path {self.path} exists and is not a directory; "
                "point the snapshot store at a directory of its own"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            names = sorted(p.name for p in self.path.iterdir())
        except OSError as e:
            raise StorageError(
                f"cannot create or list the snapshot store directory {self.path}: {e}; "
                "check that it is writable"
            ) from e
        for name in names:
            if name not in _LMDB_FILES:
                raise StorageError(
                    f"snapshot store directory {self.path} holds a file that is not ours: "
                    f"{self.path / name}; the snapshot store needs a directory of its own "
                    "(move that file away or choose another directory)"
                )

    def _init_databases(self) -> None:
        data_file = self._lmdb.file
        env = self._lmdb.env

        def init(txn: lmdb.Transaction[bytes]) -> None:
            main_keys = list(txn.cursor().iternext(keys=True, values=False))
            if not main_keys:  # a brand-new store
                meta_db = env.open_db(_DB_META, txn=txn)
                txn.put(b"format", FORMAT_MARKER, db=meta_db)
            elif _DB_META not in main_keys:
                raise StorageError(
                    f"{data_file} is an LMDB file but not a raftkv snapshot store (no format "
                    "marker); point the snapshot store at a directory of its own"
                )
            else:
                meta_db = env.open_db(_DB_META, txn=txn, create=False)
                marker = txn.get(b"format", db=meta_db)
                if marker != FORMAT_MARKER:
                    raise StorageError(
                        f"{data_file} has snapshot store format {marker!r}, this build reads "
                        f"{FORMAT_MARKER!r}; upgrade raftkv or move the directory away"
                    )
            self._catalog = env.open_db(_DB_CATALOG, txn=txn)
            self._chunks = env.open_db(_DB_CHUNKS, txn=txn)

        self._lmdb.write(init)

    def _highest_id(self) -> int:
        """The highest snapshot id in the catalog or among the chunks."""

        def read(txn: lmdb.Transaction[memoryview]) -> int:
            cursor = txn.cursor(self._catalog)
            published = int(_ID.unpack(cursor.key())[0]) if cursor.last() else 0
            cursor = txn.cursor(self._chunks)
            chunked = int(_CHUNK_KEY.unpack(cursor.key())[0]) if cursor.last() else 0
            return max(published, chunked)

        return self._read(read)

    def discard_partial(self) -> int:
        """Delete chunks that no catalog record owns; return the highest snapshot id seen."""

        def discard(txn: lmdb.Transaction[bytes]) -> tuple[int, dict[int, int]]:
            published = {_ID.unpack(k)[0] for k in txn.cursor(self._catalog).iternext(values=False)}
            highest = max(published, default=0)
            orphans: dict[int, int] = {}
            doomed: list[bytes] = []
            for key in txn.cursor(self._chunks).iternext(values=False):
                snapshot_id, _ = _CHUNK_KEY.unpack(key)
                highest = max(highest, snapshot_id)
                if snapshot_id not in published:
                    orphans[snapshot_id] = orphans.get(snapshot_id, 0) + 1
                    doomed.append(key)
            for key in doomed:
                txn.delete(key, db=self._chunks)
            return highest, orphans

        highest, orphans = self._write(discard)
        for snapshot_id, chunks in sorted(orphans.items()):
            logger.info(
                "event=snapshot_partial_discarded path=%s snapshot_id=%d chunks=%d",
                self.path, snapshot_id, chunks,
            )
        return highest

    # ---------------------------------------------------------------- used by the sink
    def _put_chunk(self, snapshot_id: int, chunk_no: int, chunk: bytes) -> None:
        key = _CHUNK_KEY.pack(snapshot_id, chunk_no)
        self._write(lambda txn: txn.put(key, chunk, db=self._chunks))

    def _publish(self, record: CatalogRecord) -> builtins.list[CatalogRecord]:
        """Write the catalog record and drop snapshots beyond `retain`, in ONE transaction."""
        value = encode_catalog_record(record)

        def publish(txn: lmdb.Transaction[bytes]) -> list[CatalogRecord]:
            txn.put(_ID.pack(record.snapshot_id), value, db=self._catalog)
            ranked: list[tuple[tuple[int, int, int], int, CatalogRecord | None]] = []
            for key, raw in txn.cursor(self._catalog).iternext():
                snapshot_id = _ID.unpack(key)[0]
                try:
                    old = decode_catalog_record(snapshot_id, raw)
                    ranked.append((old.order, snapshot_id, old))
                except ValueError:  # unreadable: rank it oldest, so it goes first
                    ranked.append(((-1, -1, snapshot_id), snapshot_id, None))
            ranked.sort()
            dropped: list[CatalogRecord] = []
            for _, old_id, old_record in ranked[: max(0, len(ranked) - self._retain)]:
                txn.delete(_ID.pack(old_id), db=self._catalog)
                self._delete_chunks(txn, old_id)
                if old_record is not None:
                    dropped.append(old_record)
            return dropped

        return self._write(publish)

    def _discard(self, snapshot_id: int) -> int:
        return self._write(lambda txn: self._delete_chunks(txn, snapshot_id))

    # ---------------------------------------------------------------- internals
    def _delete_chunks(self, txn: lmdb.Transaction[bytes], snapshot_id: int) -> int:
        prefix = _ID.pack(snapshot_id)
        doomed: list[bytes] = []
        cursor = txn.cursor(self._chunks)
        if cursor.set_range(prefix):
            for key in cursor.iternext(values=False):
                if key[:8] != prefix:
                    break
                doomed.append(key)
        for key in doomed:
            txn.delete(key, db=self._chunks)
        return len(doomed)

    def _records(self, txn: lmdb.Transaction[memoryview]) -> builtins.list[CatalogRecord]:
        records: list[CatalogRecord] = []
        for key, value in txn.cursor(self._catalog).iternext():
            snapshot_id = _ID.unpack(key)[0]
            try:
                records.append(decode_catalog_record(snapshot_id, bytes(value)))
            except ValueError as e:
                logger.warning(
                    "event=snapshot_corrupt store=lmdb path=%s snapshot_id=%d "
                    "reason=bad_catalog_record detail=%r action=skipped",
                    self.path, snapshot_id, str(e),
                )
        records.sort(key=lambda r: r.order, reverse=True)
        return records

    def _verify(self, txn: lmdb.Transaction[memoryview], record: CatalogRecord) -> str | None:
        """Why the snapshot's stored bytes do not verify, or None (hashed chunk by chunk,
        never joined)."""
        prefix = _ID.pack(record.snapshot_id)
        hasher, length, count = new_hasher(), 0, 0
        cursor = txn.cursor(self._chunks)
        found = cursor.set_range(prefix)
        while found:
            key = cursor.key()
            if bytes(key[:8]) != prefix:
                break
            if _CHUNK_KEY.unpack(key)[1] != count:
                return "missing_chunk"
            value = cursor.value()
            hasher.update(value)
            length += len(value)
            count += 1
            found = cursor.next()
        if count != record.chunks:
            return "missing_chunk"
        if length != record.length_bytes:
            return "length_mismatch"
        if hasher.hexdigest() != record.checksum:
            return "checksum_mismatch"
        return None

    def _find(self, txn: lmdb.Transaction[memoryview],
              snapshot: StoredSnapshot) -> CatalogRecord | None:
        for record in self._records(txn):
            if record.stored == snapshot:
                return record
        return None

    def _read_range(self, txn: lmdb.Transaction[memoryview], record: CatalogRecord,
                    offset: int, size: int) -> bytes | None:
        """`size` bytes from `offset` (within the snapshot); None if chunks are missing.
        Every chunk but the last has the size of chunk 0 (whatever chunk size wrote it)."""
        if size <= 0:
            return b""
        first = txn.get(_CHUNK_KEY.pack(record.snapshot_id, 0), db=self._chunks)
        if first is None or not len(first):
            return None
        chunk_size = len(first)
        n, skip = divmod(offset, chunk_size)
        parts: list[bytes] = []
        left = size
        while left > 0:
            value = txn.get(_CHUNK_KEY.pack(record.snapshot_id, n), db=self._chunks)
            if value is None:
                return None
            piece = value[skip : skip + left]
            if not len(piece):
                return None
            parts.append(bytes(piece))
            left -= len(piece)
            n, skip = n + 1, 0
        return b"".join(parts)

    def _read(self, fn: Callable[[lmdb.Transaction[memoryview]], _T]) -> _T:
        with self._lmdb.reading_buffers() as txn:
            return fn(txn)

    def _write(self, fn: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        """Run `fn` in a synced write transaction (storage.lmdb_env: map growth, full)."""
        return self._lmdb.write(fn)

    def _check_open(self) -> None:
        if self._lmdb.closed:
            raise StorageError(f"the snapshot store at {self.path} is closed")


class LmdbSnapshotSink:
    """A snapshot being written: chunks go to disk as they fill; invisible until close()."""

    def __init__(
        self, store: LmdbSnapshotStore, snapshot_id: int, meta: SnapshotMeta, chunk_size: int
    ) -> None:
        self._store = store
        self._id = snapshot_id
        self._meta = meta
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._chunks_written = 0
        self._length = 0
        self._hasher = new_hasher()
        self._state = "open"

    @property
    def snapshot_id(self) -> int:
        return self._id

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in memory, waiting to fill a chunk (never more than one chunk)."""
        return len(self._buffer)

    def write(self, chunk: bytes) -> None:
        self._check_writable()
        try:
            self._hasher.update(chunk)
            self._length += len(chunk)
            view = memoryview(chunk)
            size = self._chunk_size
            if self._buffer:
                take = size - len(self._buffer)
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) == size:
                    self._flush(bytes(self._buffer))
                    self._buffer.clear()
            while len(view) >= size:
                self._flush(bytes(view[:size]))
                view = view[size:]
            self._buffer += view
        except BaseException:
            self._state = "failed"
            raise

    def close(self) -> StoredSnapshot:
        self._check_writable()
        try:
            if self._buffer:
                self._flush(bytes(self._buffer))
                self._buffer.clear()
            record = CatalogRecord(
                self._id, self._meta, self._length, self._chunks_written,
                self._hasher.hexdigest(),
            )
            dropped = self._store._publish(record)
        except BaseException:
            self._state = "failed"
            raise
        self._state = "closed"
        logger.info(
            "event=snapshot_published store=lmdb path=%s snapshot_id=%d index=%d term=%d "
            "bytes=%d chunks=%d",
            self._store.path, self._id, self._meta.index, self._meta.term, self._length,
            self._chunks_written,
        )
        for old in dropped:
            logger.info(
                "event=snapshot_deleted store=lmdb path=%s snapshot_id=%d index=%d term=%d",
                self._store.path, old.snapshot_id, old.meta.index, old.meta.term,
            )
        return record.stored

    def cancel(self) -> None:
        """Discard the snapshot and delete its chunks; a no-op once closed or cancelled."""
        if self._state in ("closed", "cancelled"):
            return
        self._state = "cancelled"
        self._buffer = bytearray()
        deleted = self._store._discard(self._id)
        logger.info(
            "event=snapshot_cancelled store=lmdb path=%s snapshot_id=%d index=%d chunks=%d",
            self._store.path, self._id, self._meta.index, deleted,
        )

    def _flush(self, chunk: bytes) -> None:
        self._store._put_chunk(self._id, self._chunks_written, chunk)
        self._chunks_written += 1

    def _check_writable(self) -> None:
        if self._state != "open":
            raise ValueError(f"snapshot sink is {self._state}")

