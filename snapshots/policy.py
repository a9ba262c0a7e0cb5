"""When to take a snapshot, and how much log to keep behind it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SnapshotPolicy:
    """Snapshot every `entries` applied entries; keep `trailing` entries behind a snapshot.

    The trailing entries let a slow follower catch up from the log instead of needing the
    whole snapshot (hashicorp/raft's TrailingLogs).
    """

    entries: int = 10_000
    """Applied entries since the last snapshot that trigger a new one (>= 1)."""
    trailing: int = 5_000
    """Log entries up to the snapshot index kept after compaction (>= 0)."""

    def __post_init__(self) -> None:
        if type(self.entries) is not int or self.entries < 1:
            raise ValueError(f"SnapshotPolicy.entries must be an int >= 1, got {self.entries!r}")
        if type(self.trailing) is not int or self.trailing < 0:
            raise ValueError(
                f"SnapshotPolicy.trailing must be an int >= 0, got {self.trailing!r}"
            )

    def should_snapshot(self, applied_index: int, last_snapshot_index: int) -> bool:
        """True once `entries` entries were applied since the last snapshot."""
        _check_index("applied_index", applied_index)
        _check_index("last_snapshot_index", last_snapshot_index)
        return applied_index - last_snapshot_index >= self.entries

    def compact_before(self, snapshot_index: int) -> int:
        """The first log index to keep after a snapshot at `snapshot_index` (never below 1).

        Entries `compact_before(s)` .. `s` (that is `trailing` of them) stay in the log; pass
        the result to `LogStore.compact(before_index)`.
        """
        _check_index("snapshot_index", snapshot_index)
        return max(1, snapshot_index - self.trailing + 1)


def _check_index(name: str, value: int) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
