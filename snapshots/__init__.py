"""Snapshot stores (LMDB, and an in-memory double) and the snapshot policy."""

from snapshots.checksum import CHECKSUM_ALGORITHM, checksum_of
from snapshots.lmdb_store import LmdbSnapshotSink, LmdbSnapshotStore
from snapshots.memory import MemorySnapshotSink, MemorySnapshotStore
from snapshots.policy import SnapshotPolicy

__all__ = [
    "CHECKSUM_ALGORITHM",
    "LmdbSnapshotSink",
    "LmdbSnapshotStore",
    "MemorySnapshotSink",
    "MemorySnapshotStore",
    "SnapshotPolicy",
    "checksum_of",
]
