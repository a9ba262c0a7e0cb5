"""Watches of single keys (long polls): the registry the loop thread fires as it applies.

The Raft process makes a `Watch` for a worker's watch request, compares it with the key's
current state (`WatchRegistry.add`) and either answers it at once or files it under its key.
Every applied entry that changed keys passes through `WatchRegistry.applied`, which answers
the watches of those keys (`Watch.notify`); when a watch's time runs out, `WatchRegistry.end`
takes it back and gives the key's state at that moment. Everything here runs on the Raft
process's one thread.

Cost when nobody watches: `wants()` per applied entry is a type check and a truthiness test;
only an entry that deleted keys is decoded (to remember those deletes, below). A lease revoke
(expired or revoked by a client) is a delete like any other: its result lists the keys it
deleted, so it wakes their watches and leaves tombstones without being decoded.

What "changed after index n" means, with no history kept:

- a key that exists changed after n iff its last-modified index is > n;
- a key that does not exist was deleted after n iff its latest delete is > n. The registry
  remembers the index of the latest delete of each key (`tombstones`, the newest
  `max_tombstones`) and the `floor` below which deletes may be forgotten: the index the node
  booted or installed a snapshot at, or of the newest forgotten tombstone. A watch of an
  absent key from an index below the floor cannot be told apart from a missed delete, so it
  is answered at once with the key's current (absent) state: a watch may end early, it never
  misses a change.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final

from raftkv.kv.commands import Batch, CommandDecodeError, Delete, Put, decode_command
from raftkv.kv.state_machine import (
    BatchResult,
    DeleteResult,
    LeaseRevokeResult,
    PutResult,
    Record,
)

__all__ = ["DEFAULT_MAX_TOMBSTONES", "KeyState", "Watch", "WatchRegistry"]

DEFAULT_MAX_TOMBSTONES: Final = 16_384

Lookup = Callable[[str], Record | None]
"""The state machine's get: (value, last-modified index), or None when the key is absent."""


@dataclass(frozen=True, slots=True)
class KeyState:
    """A key's state at `index`: its value and last-modified index, or deleted (value None;
    `index` is the delete's, or the applied index at which it was seen absent)."""

    key: str
    value: object
    index: int
    deleted: bool


class Watch:
    """One watch of `key`, answered once through `notify` (on the loop thread)."""

    __slots__ = ("after_index", "key", "notify")

    def __init__(self, key: str, after_index: int | None,
                 notify: Callable[[KeyState | BaseException], None]) -> None:
        self.key = key
        self.after_index = after_index
        """Changes at indices > after_index count; None: from the applied index at `add`."""
        self.notify = notify
        """Called once: with the change the watch saw, or with the error that ended it."""


class WatchRegistry:
    """The watches of one node by key, with the memory of recent deletes. Loop thread only."""

    def __init__(self, *, floor_index: int = 0,
                 max_tombstones: int = DEFAULT_MAX_TOMBSTONES) -> None:
        if max_tombstones < 1:
            raise ValueError("max_tombstones must be >= 1")
        self._watches: dict[str, dict[Watch, int]] = {}  # key -> {watch: after_index}
        self._count = 0
        self._tombstones: dict[str, int] = {}  # key -> index of its latest delete, oldest first
        self._max_tombstones = max_tombstones
        self._floor = floor_index
        self._closed: BaseException | None = None

    def __len__(self) -> int:
        """Watches waiting."""
        return self._count

    @property
    def floor_index(self) -> int:
        return self._floor

    # ------------------------------------------------------------------ watches
    def add(self, watch: Watch, record: Record | None, applied_index: int) -> bool:
        """Start `watch`, given its key's current `record` and the applied index: answered at
        once (False) when the key changed after the watch's index, else filed until it
        changes (True)."""
        if self._closed is not None:
            watch.notify(self._closed)
            return False
        key = watch.key
        after = applied_index if watch.after_index is None else watch.after_index
        if record is not None:
            if record[1] > after:
                watch.notify(KeyState(key, record[0], record[1], False))
                return False
        else:
            deleted_at = self._tombstones.get(key)
            if deleted_at is not None:
                if deleted_at > after:
                    watch.notify(KeyState(key, None, deleted_at, True))
                    return False
            elif after < self._floor:  # a delete after `after` may have been forgotten
                watch.notify(KeyState(key, None, applied_index, True))
                return False
        self._watches.setdefault(key, {})[watch] = after
        self._count += 1
        return True

    def end(self, watch: Watch, record: Record | None, applied_index: int) -> KeyState:
        """Stop `watch`, still filed (its wait ran out): the key's current state."""
        self._remove(watch)
        if record is None:
            return KeyState(watch.key, None, applied_index, True)
        return KeyState(watch.key, record[0], record[1], False)

    def close(self, error: BaseException) -> None:
        """Fail every watch with `error`, and every watch added from now on."""
        self._closed = error
        watches, self._watches, self._count = self._watches, {}, 0
        for waiting in watches.values():
            for watch in waiting:
                watch.notify(error)

    def _remove(self, watch: Watch) -> None:
        waiting = self._watches.get(watch.key)
        if waiting is not None and waiting.pop(watch, None) is not None:
            self._count -= 1
            if not waiting:
                del self._watches[watch.key]

    # ------------------------------------------------------------------ applied entries
    def wants(self, result: object, index: int) -> bool:
        """Whether the entry at `index` that produced `result` may concern the registry (a
        change to keys with watches, or a delete to remember). Cheap: every entry asks."""
        if isinstance(result, PutResult):
            return bool(self._watches) and result.index == index
        if isinstance(result, DeleteResult):
            return result.deleted and result.index == index  # an idempotent replay: earlier
        if isinstance(result, BatchResult):
            return result.index == index and (bool(self._watches) or any(
                isinstance(r, DeleteResult) and r.deleted for r in result.results))
        if isinstance(result, LeaseRevokeResult):
            return bool(result.keys) and result.index == index
        # A failed condition, a missing lease, an invalid command, a lease grant, a no-op, a
        # membership change: no key changed.
        return False

    def applied(self, index: int, data: bytes, result: object, lookup: Lookup) -> None:
        """The command in `data` was applied at `index` with `result` (for which wants() was
        True) and `lookup` reads the state right after it: remember its deletes and wake the
        watches of the keys it changed."""
        changed: Collection[str]
        deleted: Collection[str]
        if isinstance(result, LeaseRevokeResult):
            self._changed(result.keys, frozenset(result.keys), index, lookup)
            return
        try:
            cmd, _ = decode_command(data, logged=True)
        except CommandDecodeError:
            return  # the state machine applied it, so it decoded there; nothing to do
        if isinstance(cmd, Batch):
            if not isinstance(result, BatchResult):
                return
            ops = tuple(zip(cmd.ops, result.results, strict=True))
            deleted = {op.key for op, r in ops if isinstance(r, DeleteResult) and r.deleted}
            changed = dict.fromkeys(op.key for op, r in ops
                                    if isinstance(op, Put) or op.key in deleted)
        elif isinstance(cmd, Put | Delete):
            changed = (cmd.key,)
            deleted = () if isinstance(cmd, Put) else changed
        else:
            return  # a lease grant or revoke changes keys only through its result (above)
        self._changed(changed, deleted, index, lookup)

    def _changed(self, changed: Collection[str], deleted: Collection[str], index: int,
                 lookup: Lookup) -> None:
        """Remember the deletes among `changed` and wake the watches of its keys."""
        watches = self._watches
        for key in changed:
            if key not in watches and key not in deleted:
                continue  # the common case: one dict lookup per key
            record = lookup(key)  # the state after the entry (a batch may delete, then put)
            if record is None:
                self._remember_delete(key, index)
                if key in watches:
                    self._fire(key, KeyState(key, None, index, True))
            elif key in watches and record[1] == index:
                self._fire(key, KeyState(key, record[0], index, False))

    def restored(self, index: int, lookup: Lookup) -> None:
        """The state machine was replaced by a snapshot, and is now at `index` (the applied
        index: entries after the snapshot may have been applied since). What happened before
        is unknown: deletes are forgotten up to `index`; a watch ends if its key now has a
        newer write, or is absent (it may have been deleted in between: an early end, never a
        missed one)."""
        self._tombstones.clear()
        self._floor = max(self._floor, index)
        for key in list(self._watches):
            record = lookup(key)
            if record is None:
                self._fire(key, KeyState(key, None, index, True))
            else:
                self._fire(key, KeyState(key, record[0], record[1], False))

    def _fire(self, key: str, state: KeyState) -> None:
        """Answer the watches of `key` that started before `state.index`."""
        waiting = self._watches[key]
        fired = [watch for watch, after in waiting.items() if after < state.index]
        for watch in fired:
            del waiting[watch]
            watch.notify(state)
        self._count -= len(fired)
        if not waiting:
            del self._watches[key]

    def _remember_delete(self, key: str, index: int) -> None:
        tombstones = self._tombstones
        tombstones.pop(key, None)  # re-insert: the dict stays ordered by index
        tombstones[key] = index
        if len(tombstones) > self._max_tombstones:
            oldest = next(iter(tombstones))
            self._floor = max(self._floor, tombstones.pop(oldest))
