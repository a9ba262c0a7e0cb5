"""The core's in-memory view of the Raft log.

The whole uncompacted log lives in memory (the snapshot policy bounds it), so the core
never reads storage. Positions the log tracks:

    snapshot_index <= commit, applied <= ...      committed entries are never truncated
    first_index() .. last_index()                 entries held (may start before the snapshot:
                                                  trailing entries kept for slow followers)
    stable_index                                  highest index known to be on disk
    unstable_from                                 first index not yet handed out in a Ready
"""

from __future__ import annotations

from collections.abc import Sequence

from raftkv.core.types import Entry


class LogInvariantError(AssertionError):
    """The log was asked to do something Raft forbids (e.g. truncate a committed entry)."""


class RaftLog:
    __slots__ = (
        "_entries",
        "_offset",
        "applied",
        "commit",
        "snapshot_index",
        "snapshot_term",
        "stable_index",
        "unstable_from",
    )

    def __init__(
        self,
        snapshot_index: int,
        snapshot_term: int,
        entries: Sequence[Entry] = (),
        commit: int = 0,
        applied: int | None = None,
    ) -> None:
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        first = entries[0].index if entries else snapshot_index + 1
        if first > snapshot_index + 1:
            raise LogInvariantError(
                f"log starts at {first}, after the snapshot at {snapshot_index}: entries missing"
            )
        for expected, e in enumerate(entries, start=first):
            if e.index != expected:
                raise LogInvariantError(f"log is not contiguous at {expected}")
        self._offset = first  # index of _entries[0]
        self._entries = list(entries)
        if entries and first <= snapshot_index:
            t = self._entries[snapshot_index - first].term if snapshot_index >= first else None
            if t is not None and t != snapshot_term:
                raise LogInvariantError(
                    f"entry {snapshot_index} has term {t} but the snapshot says {snapshot_term}"
                )
        last = self.last_index()
        self.commit = max(commit, snapshot_index)
        if self.commit > last:
            raise LogInvariantError(f"commit index {self.commit} is beyond the last entry {last}")
        self.applied = snapshot_index if applied is None else applied
        if not snapshot_index <= self.applied <= self.commit:
            raise LogInvariantError(
                f"applied {self.applied} outside [snapshot {snapshot_index}, commit {self.commit}]"
            )
        self.stable_index = last
        self.unstable_from = last + 1

    # -- positions -------------------------------------------------------------------------
    def first_index(self) -> int:
        return self._offset

    def last_index(self) -> int:
        return self._offset + len(self._entries) - 1 if self._entries else self.snapshot_index

    def last_term(self) -> int:
        t = self.term(self.last_index())
        assert t is not None
        return t

    def term(self, index: int) -> int | None:
        """The term at `index`; None when compacted away or beyond the end."""
        pos = index - self._offset
        if 0 <= pos < len(self._entries):
            return self._entries[pos].term
        if index == self.snapshot_index:
            return self.snapshot_term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: is a candidate's log at least as up to date as ours?"""
        mine = self.last_term()
        return last_term > mine or (last_term == mine and last_index >= self.last_index())

    # -- reading ---------------------------------------------------------------------------
    def entry(self, index: int) -> Entry:
        return self._entries[index - self._offset]

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi; all must be held."""
        if lo < self._offset or hi > self.last_index() + 1:
            raise LogInvariantError(f"slice [{lo}, {hi}) outside [{self._offset}, "
                                    f"{self.last_index()}]")
        return self._entries[lo - self._offset : hi - self._offset]

    def entries_from(self, lo: int, max_count: int, max_bytes: int) -> tuple[Entry, ...]:
        """Up to max_count entries from `lo` and about max_bytes (at least one if any)."""
        start = lo - self._offset
        if start < 0:
            raise LogInvariantError(f"entries from {lo}: compacted (first is {self._offset})")
        batch = self._entries[start : start + max_count]
        size = 0
        for n, e in enumerate(batch):
            size += e.size_bytes
            if size > max_bytes and n > 0:
                return tuple(batch[:n])
        return tuple(batch)

    def unstable_entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries[self.unstable_from - self._offset :])

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest position <= index whose term is <= term (fast backtracking hint)."""
        while index > 0:
            t = self.term(index)
            if t is None or t <= term:
                return index, t or 0
            index -= 1
        return 0, 0

    # -- changing --------------------------------------------------------------------------
    def append(self, entry: Entry) -> None:
        if entry.index != self.last_index() + 1:
            raise LogInvariantError(f"append at {entry.index} after {self.last_index()}")
        if not self._entries:
            self._offset = entry.index
        self._entries.append(entry)

    def maybe_append(
        self, prev_index: int, prev_term: int, entries: Sequence[Entry]
    ) -> int | None:
        """AppendEntries receiver steps 2-4; the last index known to match, or None."""
        if not self.match_term(prev_index, prev_term):
            return None
        for n, e in enumerate(entries):
            if not self.match_term(e.index, e.term):
                if e.index <= self.commit:
                    raise LogInvariantError(
                        f"entry {e.index} conflicts with a committed entry (commit {self.commit})"
                    )
                self.truncate_and_append(entries[n:])
                break
        return prev_index + len(entries)

    def truncate_and_append(self, entries: Sequence[Entry]) -> None:
        """Replace everything from entries[0].index on with `entries`."""
        first = entries[0].index
        if first > self.last_index() + 1:
            raise LogInvariantError(f"append at {first} leaves a gap after {self.last_index()}")
        if not self._entries:
            self._offset = first
        del self._entries[first - self._offset :]
        self._entries.extend(entries)
        self.unstable_from = min(self.unstable_from, first)
        self.stable_index = min(self.stable_index, first - 1)

    def commit_to(self, index: int) -> bool:
        if index <= self.commit:
            return False
        if index > self.last_index():
            raise LogInvariantError(f"commit {index} beyond last index {self.last_index()}")
        self.commit = index
        return True

    def stable_to(self, index: int, term: int) -> None:
        """A Ready that ended with (index, term) was persisted."""
        if self.term(index) == term and index > self.stable_index:
            self.stable_index = index

    def compact(self, snapshot_index: int, snapshot_term: int, keep_from: int) -> None:
        """A snapshot covers up to snapshot_index; drop held entries before keep_from."""
        if snapshot_index > self.applied:
            raise LogInvariantError(
                f"snapshot at {snapshot_index} is beyond applied {self.applied}"
            )
        if self.term(snapshot_index) not in (snapshot_term, None):
            raise LogInvariantError(f"snapshot term {snapshot_term} disagrees with the log")
        if snapshot_index > self.snapshot_index:
            self.snapshot_index = snapshot_index
            self.snapshot_term = snapshot_term
        keep_from = min(keep_from, self.snapshot_index + 1)
        drop = min(max(0, keep_from - self._offset), len(self._entries))
        if drop:
            del self._entries[:drop]
            self._offset += drop
        if not self._entries:
            self._offset = self.snapshot_index + 1

    def restore(self, snapshot_index: int, snapshot_term: int) -> bool:
        """Install a snapshot (Raft Figure 13, steps 6-7). True if the log suffix was kept."""
        keep = self.match_term(snapshot_index, snapshot_term)
        if keep:
            del self._entries[: snapshot_index + 1 - self._offset]
        else:
            self._entries = []
        self._offset = snapshot_index + 1
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self.commit = max(self.commit, snapshot_index)
        self.applied = snapshot_index
        # The storage log is replaced as a whole; a kept suffix is written again.
        self.unstable_from = snapshot_index + 1
        self.stable_index = snapshot_index
        return keep
