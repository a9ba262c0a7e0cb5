"""When to take a snapshot, and how much log to keep behind it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _never() -> bool:
    return False


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

    def should_snapshot(self, applied_index: int, last_snapshot_index: int,
                        sending: Callable[[], bool] = _never) -> bool:
        """True once `entries` entries were applied since the last snapshot; twice as many
        while the leader is `sending` a snapshot to a peer (RaftNode.sending_snapshot, asked
        only once `entries` were applied: the check runs every loop turn): the store keeps
        only the newest few snapshots, and the transfer in flight must not lose its snapshot
        to newer ones before it finishes."""
        _check_index("applied_index", applied_index)
        _check_index("last_snapshot_index", last_snapshot_index)
        since = applied_index - last_snapshot_index
        return since >= self.entries and (since >= 2 * self.entries or not sending())

    def compact_before(self, snapshot_index: int, hold: int | None = None) -> int:
        """The first log index to keep after a snapshot at `snapshot_index` (never below 1).

        Entries `compact_before(s)` .. `s` (that is `trailing` of them) stay in the log; pass
        the result to `LogStore.compact(before_index)`. `hold` (RaftNode.compaction_hold) is
        the lowest index a live peer still needs: entries from it stay too, up to `entries`
        more than `trailing`, so the log stays bounded whatever a peer does.
        """
        _check_index("snapshot_index", snapshot_index)
        first = max(1, snapshot_index - self.trailing + 1)
        if hold is not None and hold < first:
            _check_index("hold", hold)
            first = max(1, hold, first - self.entries)
        return first


def _check_index(name: str, value: int) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
