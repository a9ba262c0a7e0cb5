"""In-memory RaftStorage for the simulator and tests.

It behaves like the LMDB store, including across a crash: `crash()` keeps what was saved
with sync=True and forgets what was saved with sync=False since the last synced save.
"""

from __future__ import annotations

from collections.abc import Sequence

from raftkv.core.types import Entry, HardState
from raftkv.ports import NodeIdentity, StorageError


class MemoryRaftStorage:
    def __init__(self) -> None:
        self._offset = 1  # index of _entries[0]
        self._entries: list[Entry] = []
        self._hard_state = HardState()
        self._identity: NodeIdentity | None = None
        self._durable: tuple[int, list[Entry], HardState] = (1, [], HardState())
        self._closed = False

    # LogStore
    def first_index(self) -> int:
        return self._offset

    def last_index(self) -> int:
        return self._offset + len(self._entries) - 1

    def entries(self, lo: int, hi: int) -> list[Entry]:
        if lo < self._offset or hi > self.last_index() + 1 or lo > hi:
            raise StorageError(f"entries [{lo}, {hi}) not stored "
                               f"(have [{self._offset}, {self.last_index()}])")
        return self._entries[lo - self._offset : hi - self._offset]

    def term(self, index: int) -> int | None:
        if self._offset <= index <= self.last_index():
            return self._entries[index - self._offset].term
        return None

    def compact(self, before_index: int) -> None:
        drop = min(max(0, before_index - self._offset), len(self._entries))
        if drop:
            del self._entries[:drop]
            self._offset += drop
        if not self._entries and before_index > self._offset:
            self._offset = before_index
        self._snapshot_durable()

    # HardStateStore
    def hard_state(self) -> HardState:
        return self._hard_state

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        *,
        reset_log: bool = False,
        sync: bool = True,
    ) -> None:
        self._check_open()
        # Validate everything first: a rejected save writes nothing, like an aborted txn.
        if entries:
            first = entries[0].index
            for expected, e in enumerate(entries, start=first):
                if e.index != expected:
                    raise StorageError("entries to save are not contiguous")
            if (self._entries and not reset_log
                    and (first < self._offset or first > self.last_index() + 1)):
                raise StorageError(f"append at {first} leaves a gap or precedes the log "
                                   f"[{self._offset}, {self.last_index()}]")
        if reset_log:
            self._entries = []
            if entries:
                self._offset = entries[0].index
        if entries:
            first = entries[0].index
            if not self._entries:
                self._offset = first
            del self._entries[first - self._offset :]
            self._entries.extend(entries)
        if hard_state is not None:
            self._hard_state = hard_state
        if sync:
            self._snapshot_durable()

    def identity(self) -> NodeIdentity | None:
        return self._identity

    def set_identity(self, identity: NodeIdentity) -> None:
        self._identity = identity

    def close(self) -> None:
        self._closed = True

    # Test hooks
    def crash(self) -> None:
        """Lose everything not synced, like a power cut; the store is usable again."""
        self._offset, entries, self._hard_state = self._durable
        self._entries = list(entries)
        self._closed = False

    def _snapshot_durable(self) -> None:
        self._durable = (self._offset, list(self._entries), self._hard_state)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("storage is closed")
