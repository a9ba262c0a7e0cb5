"""The small interfaces between the Raft core's driver and the world (hashicorp/raft style).

Implementations: `storage` (LMDB and in-memory log + hard state), `snapshots` (LMDB and
in-memory snapshot store), `raftkv.kv` (the state machine), `raftkv.runtime` (transport).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from raftkv.core.messages import Message
from raftkv.core.types import Entry, HardState, NodeId, Snapshot, SnapshotMeta


class StorageError(Exception):
    """The disk failed or holds something we cannot trust; the node must stop."""


class StorageFull(StorageError):
    """No room for more writes (LMDB map full / disk full or over quota). Nothing of the
    failed write was written, nothing was lost. `cause` is the NOSPACE alarm's cause to
    raise for it: "map_full" or "disk_full"."""

    def __init__(self, message: str, *, cause: str = "disk_full") -> None:
        super().__init__(message)
        self.cause = cause


MAX_INCARNATION_CHARS = 64


def is_incarnation(value: object) -> bool:
    """A data dir's incarnation (LmdbRaftStorage.incarnation): 1..64 ASCII letters and
    digits. The peer handshake and the MemberIncarnation command carry one."""
    return (type(value) is str and 1 <= len(value) <= MAX_INCARNATION_CHARS
            and value.isascii() and value.isalnum())


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who owns a data dir. Written once when the data dir is created."""

    node_id: NodeId
    cluster_id: str
    format_version: int


class LogStore(Protocol):
    """The durable Raft log. Indices are contiguous from first_index() to last_index()."""

    def first_index(self) -> int:
        """The first stored index; last_index() + 1 when the log is empty."""
        ...

    def last_index(self) -> int:
        """The last stored index; 0 (or the compaction point) when empty."""
        ...

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi (all must be stored)."""
        ...

    def term(self, index: int) -> int | None:
        """The term of the stored entry at `index`, None if not stored."""
        ...

    def compact(self, before_index: int) -> None:
        """Delete stored entries with index < before_index (a snapshot covers them)."""
        ...


class HardStateStore(Protocol):
    def hard_state(self) -> HardState:
        """The last saved hard state; HardState() for a new node."""
        ...


class RaftStorage(LogStore, HardStateStore, Protocol):
    """Log and hard state together, because one Ready is saved in ONE synced transaction."""

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        *,
        reset_log: bool = False,
        sync: bool = True,
    ) -> None:
        """Persist what one Ready asks for, atomically, in this order:
        if reset_log, delete every stored entry (a snapshot replaced the log); delete stored
        entries with index >= entries[0].index (a conflicting suffix); append `entries`;
        write `hard_state` if given. With sync (the default), durable on return.
        Raises StorageFull (nothing written) or StorageError.
        """
        ...

    def identity(self) -> NodeIdentity | None:
        """Who owns this store; None for a brand-new one."""
        ...

    def set_identity(self, identity: NodeIdentity) -> None: ...

    def close(self) -> None: ...


StoredSnapshot = Snapshot
"""A published snapshot: meta, length and checksum (raftkv.core.types.Snapshot). Its bytes
stay in the store; read them in chunks (SnapshotStore.read, SnapshotStore.chunks)."""


class SnapshotSink(Protocol):
    """A snapshot being written. Invisible until close(); cancel() discards it."""

    def write(self, chunk: bytes) -> None: ...

    def close(self) -> StoredSnapshot:
        """Publish atomically (with its length and checksum) and return what was published."""
        ...

    def cancel(self) -> None: ...


class SnapshotStore(Protocol):
    """Snapshots, written and read in chunks: no operation holds a whole snapshot in memory
    (beyond one chunk), whatever its size."""

    def create(self, meta: SnapshotMeta) -> SnapshotSink: ...

    def latest(self) -> StoredSnapshot | None:
        """The newest published snapshot whose checksum verifies (its bytes are read once,
        chunk by chunk, to check); None if there is none."""
        ...

    def read(self, snapshot: StoredSnapshot, offset: int, size: int) -> bytes | None:
        """Up to `size` bytes of `snapshot` from `offset` (fewer only at its end; b"" past
        it); None when the store no longer holds that snapshot. Not checked against the
        checksum here: whoever assembles the bytes checks them."""
        ...

    def chunks(self, snapshot: StoredSnapshot) -> Iterator[bytes]:
        """The whole snapshot, chunk by chunk; after the last chunk, StorageError if the
        bytes do not match its length and checksum (or if it is no longer stored)."""
        ...

    def list(self) -> list[SnapshotMeta]:
        """Published snapshots, newest first."""
        ...

    def close(self) -> None: ...


class StateMachine(Protocol):
    """The replicated application: applies committed entries in order."""

    @property
    def applied_index(self) -> int: ...

    def apply(self, entry: Entry) -> object:
        """Apply one committed entry and return its result for the waiting client."""
        ...

    def snapshot_chunks(self) -> Iterator[bytes]:
        """A consistent serialisation of the state at applied_index, in chunks."""
        ...

    def restore_chunks(self, chunks: Iterable[bytes], index: int) -> None:
        """Replace the state with a snapshot taken at `index`, read chunk by chunk; on any
        error the state is left as it was."""
        ...

    def install(self, state: object, index: int) -> None:
        """Replace the state with what this machine's snapshot validator decoded (the
        core's Ready.snapshot_state) from the snapshot taken at `index`."""
        ...


class Transport(Protocol):
    def send(self, messages: Sequence[Message]) -> None:
        """Queue messages to their `to` peers; never blocks on the network, may drop."""
        ...
