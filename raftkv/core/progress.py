"""What a leader knows about each follower's log (etcd-io/raft tracker/progress.go)."""

from __future__ import annotations

import enum
from collections import deque

from raftkv.core.types import Snapshot


class ProgressState(enum.Enum):
    PROBE = "probe"
    """Unknown match: one append at a time until the follower answers."""
    REPLICATE = "replicate"
    """Matching: appends are pipelined, up to a window of in-flight messages."""
    SNAPSHOT = "snapshot"
    """The follower needs entries we compacted: a snapshot is being sent."""


class Inflights:
    """A bounded FIFO of the last index of each append in flight to one follower."""

    __slots__ = ("_capacity", "_queue")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._queue: deque[int] = deque()

    def add(self, last_index: int) -> None:
        if self.full():
            raise OverflowError("inflights window is full")
        self._queue.append(last_index)

    def free_up_to(self, index: int) -> None:
        q = self._queue
        while q and q[0] <= index:
            q.popleft()

    def free_first(self) -> None:
        if self._queue:
            self._queue.popleft()

    def reset(self) -> None:
        self._queue.clear()

    def full(self) -> bool:
        return len(self._queue) >= self._capacity

    def __len__(self) -> int:
        return len(self._queue)


class Progress:
    __slots__ = (
        "idle_ticks",
        "inflights",
        "match",
        "next",
        "probe_sent",
        "read_seq",
        "recent_active",
        "snapshot",
        "snapshot_backoff_ticks",
        "snapshot_offset",
        "state",
    )

    def __init__(self, next_index: int, max_inflight: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflights = Inflights(max_inflight)
        self.snapshot: Snapshot | None = None
        """The snapshot being sent (SNAPSHOT state): the transfer finishes with this one even
        if the leader takes newer ones meanwhile, as long as it stays readable."""
        self.snapshot_offset = 0
        self.recent_active = False
        self.idle_ticks = 0
        """Leader ticks since this peer last answered (reset by every response)."""
        self.snapshot_backoff_ticks = 0
        """While > 0 no snapshot is started for this peer: it refused the last one."""
        self.read_seq = 0
        """The highest heartbeat sequence this peer acknowledged (ReadIndex confirmation)."""

    @property
    def pending_snapshot(self) -> int:
        """The index of the snapshot being sent (SNAPSHOT state), else 0."""
        return self.snapshot.meta.index if self.snapshot is not None else 0

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.snapshot = None
        self.inflights.reset()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflights.reset()

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self.state = ProgressState.SNAPSHOT
        self.snapshot = snapshot
        self.snapshot_offset = 0
        self.probe_sent = False
        self.inflights.reset()

    def maybe_update(self, index: int) -> bool:
        """The follower matches up to `index`; False if that is old news."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an append at prev index `rejected`; False if stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def __repr__(self) -> str:
        return (f"Progress(state={self.state.value}, match={self.match}, next={self.next}, "
                f"inflight={len(self.inflights)})")
