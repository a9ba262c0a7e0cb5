"""In-memory SnapshotStore for the simulator and tests.

It keeps the contract of the LMDB store: a snapshot is invisible until its sink is closed,
the newest `retain` snapshots are kept, latest() skips (and logs) a snapshot whose data
no longer matches its checksum, and read()/chunks() give its bytes in pieces (held whole here:
it is a test double). Test hooks: `corrupt()` damages a stored snapshot's data and
`crash()` forgets every snapshot still being written, like a power cut.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from raftkv.core.types import SnapshotMeta
from raftkv.ports import StorageError, StoredSnapshot
from snapshots.checksum import checksum_of, new_hasher

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Published:
    snapshot_id: int
    meta: SnapshotMeta
    data: bytes
    checksum: str

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.meta.index, self.meta.term, self.snapshot_id)

    @property
    def stored(self) -> StoredSnapshot:
        return StoredSnapshot(self.meta, len(self.data), self.checksum)


class MemorySnapshotStore:
    """A SnapshotStore held in a list; `retain` newest snapshots are kept."""

    def __init__(self, *, retain: int = 2) -> None:
        if type(retain) is not int or retain < 1:
            raise ValueError(f"retain must be an int >= 1, got {retain!r}")
        self._retain = retain
        self._lock = threading.Lock()
        self._published: list[_Published] = []  # newest first
        self._next_id = 1
        self._generation = 0  # bumped by crash(): sinks of an older generation are dead
        self._closed = False

    # SnapshotStore
    def create(self, meta: SnapshotMeta) -> MemorySnapshotSink:
        with self._lock:
            self._check_open()
            snapshot_id = self._next_id
            self._next_id += 1
            return MemorySnapshotSink(self, snapshot_id, meta, self._generation)

    def latest(self) -> StoredSnapshot | None:
        with self._lock:
            self._check_open()
            candidates = list(self._published)
        for snap in candidates:
            if checksum_of(snap.data) == snap.checksum:
                return snap.stored
            logger.warning(
                "event=snapshot_corrupt store=memory snapshot_id=%d index=%d term=%d "
                "reason=checksum_mismatch action=skipped",
                snap.snapshot_id, snap.meta.index, snap.meta.term,
            )
        return None

    def read(self, snapshot: StoredSnapshot, offset: int, size: int) -> bytes | None:
        if offset < 0 or size < 0:
            raise ValueError("offset and size must be >= 0")
        data = self._data_of(snapshot)
        return None if data is None else data[offset : offset + size]

    def chunks(self, snapshot: StoredSnapshot) -> Iterator[bytes]:
        data = self._data_of(snapshot)
        if data is None:
            raise StorageError(f"snapshot {snapshot.meta.index}/{snapshot.meta.term} is no "
                               "longer in the memory snapshot store")
        for start in range(0, len(data), self.CHUNK_BYTES):
            yield data[start : start + self.CHUNK_BYTES]
        if len(data) != snapshot.length or checksum_of(data) != snapshot.checksum:
            raise StorageError(f"snapshot {snapshot.meta.index}/{snapshot.meta.term} does not "
                               "match its length and checksum")

    CHUNK_BYTES = 1 << 16
    """What chunks() yields at a time."""

    def _data_of(self, snapshot: StoredSnapshot) -> bytes | None:
        with self._lock:
            self._check_open()
            for snap in self._published:
                if snap.stored == snapshot:
                    return snap.data
        return None

    def list(self) -> list[SnapshotMeta]:
        with self._lock:
            self._check_open()
            return [snap.meta for snap in self._published]

    def close(self) -> None:
        with self._lock:
            self._closed = True

    # Test hooks
    def corrupt(self, index: int) -> None:
        """Flip one bit of the data of the published snapshot at `index` (checksum kept)."""
        with self._lock:
            for i, snap in enumerate(self._published):
                if snap.meta.index == index:
                    damaged = bytearray(snap.data or b"\x00")
                    damaged[len(damaged) // 2] ^= 0x01
                    self._published[i] = _Published(
                        snap.snapshot_id, snap.meta, bytes(damaged), snap.checksum
                    )
                    return
        raise KeyError(f"no published snapshot at index {index}")

    def crash(self) -> None:
        """Forget every unpublished snapshot, like a power cut; the store stays usable."""
        with self._lock:
            self._generation += 1
            self._closed = False

    # Called by the sink
    def _publish(self, sink_generation: int, snap: _Published) -> None:
        with self._lock:
            self._check_open()
            if sink_generation != self._generation:
                raise StorageError("the snapshot store crashed while this snapshot was written")
            self._published.append(snap)
            self._published.sort(key=lambda s: s.order, reverse=True)
            dropped = self._published[self._retain :]
            del self._published[self._retain :]
        logger.info(
            "event=snapshot_published store=memory snapshot_id=%d index=%d term=%d bytes=%d",
            snap.snapshot_id, snap.meta.index, snap.meta.term, len(snap.data),
        )
        for old in dropped:
            logger.info(
                "event=snapshot_deleted store=memory snapshot_id=%d index=%d term=%d",
                old.snapshot_id, old.meta.index, old.meta.term,
            )

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the memory snapshot store is closed")


class MemorySnapshotSink:
    """A snapshot being written to a MemorySnapshotStore; invisible until close()."""

    def __init__(
        self, store: MemorySnapshotStore, snapshot_id: int, meta: SnapshotMeta, generation: int
    ) -> None:
        self._store = store
        self._id = snapshot_id
        self._meta = meta
        self._generation = generation
        self._chunks: list[bytes] = []
        self._hasher = new_hasher()
        self._state = "open"

    def write(self, chunk: bytes) -> None:
        self._check_writable()
        self._hasher.update(chunk)
        self._chunks.append(bytes(chunk))

    def close(self) -> StoredSnapshot:
        self._check_writable()
        self._state = "closed"
        data = b"".join(self._chunks)
        self._chunks = []
        published = _Published(self._id, self._meta, data, self._hasher.hexdigest())
        self._store._publish(self._generation, published)
        return published.stored

    def cancel(self) -> None:
        if self._state == "open":
            self._state = "cancelled"
            self._chunks = []

    def _check_writable(self) -> None:
        if self._state != "open":
            raise ValueError(f"snapshot sink is {self._state}")
