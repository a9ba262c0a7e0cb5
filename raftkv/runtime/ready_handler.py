"""How a Ready is handled: written once, used by the real runtime and by the simulator.

    begin(rd)    send the messages that may leave before the persist; apply the committed
                 entries (they are on this node's disk already: a Ready's committed entries
                 never include its own new entries) and release the reads they satisfy
    persist(rd)  incoming snapshot chunks into the staged snapshot, publish it when the core
                 installs it, then entries + hard state in one synced transaction
    finish(rd)   send the replies that had to wait for the persist (acknowledgements);
                 install a snapshot (then apply what the Ready committed after it), then
                 advance()

Applying before the persist lets the answers to committed writes leave before the node
blocks on its next fsync. A Ready that installs a snapshot applies after the persist: the
state machine is replaced by what was just saved.

The runtime calls the three in a row on its loop thread; the simulator lets virtual time
pass between persist() starting and finishing, and a crash in between loses the Ready.

Snapshots never pass through here whole: the core reads chunks of its own snapshots through
`chunk_reader(store)` (given to RaftNode as its snapshot_reader), and an incoming snapshot is
staged chunk by chunk in a sink of the snapshot store, published only once the core checked
it (length cap, checksum, format; see raftkv.core.snapshots), and dropped otherwise.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

from raftkv.core.node import RaftNode
from raftkv.core.ready import Ready
from raftkv.core.snapshots import SnapshotReader, SnapshotWrite
from raftkv.core.types import Entry, HardState, ReadState, Snapshot, SnapshotMeta
from raftkv.ports import (
    RaftStorage,
    SnapshotSink,
    SnapshotStore,
    StateMachine,
    StorageError,
    Transport,
)

AppliedCallback = Callable[[Entry, object], None]
ReadCallback = Callable[[int, int], None]
"""(request_id, read_index) once the state machine applied up to read_index."""
FailedReadCallback = Callable[[int], None]
PersistTimer = Callable[[float, int], None]
"""(seconds, entries) of each synced save."""
ApplyTimer = Callable[[float], None]
"""seconds to apply the committed entries of one Ready."""


def chunk_reader(store: SnapshotStore) -> SnapshotReader:
    """The core's snapshot reader over `store` (RaftNode(snapshot_reader=...))."""

    def read(snapshot: Snapshot, offset: int, size: int) -> bytes | None:
        return store.read(snapshot, offset, size)

    return read


class ReadyHandler:
    def __init__(
        self,
        *,
        node: RaftNode,
        storage: RaftStorage,
        snapshots: SnapshotStore,
        state_machine: StateMachine,
        transport: Transport,
        on_applied: AppliedCallback,
        on_read: ReadCallback,
        on_read_failed: FailedReadCallback,
        on_persist_timed: PersistTimer | None = None,
        on_apply_timed: ApplyTimer | None = None,
    ) -> None:
        self.node = node
        self.storage = storage
        self.snapshots = snapshots
        self.state_machine = state_machine
        self.transport = transport
        self._on_applied = on_applied
        self._on_read = on_read
        self._on_read_failed = on_read_failed
        self._on_persist_timed = on_persist_timed
        self._on_apply_timed = on_apply_timed
        self._waiting_reads: list[tuple[int, int]] = []  # heap of (index, request_id)
        self.before_persist: Callable[[], None] | None = None
        """Runs between begin and persist in handle() (the runtime sends its answers)."""
        self._unsynced_hard_state: HardState | None = None
        self._staged: SnapshotSink | None = None
        """The incoming snapshot being received, unpublished (see persist)."""
        self._staged_meta: SnapshotMeta | None = None
        self._staged_bytes = 0

    def handle(self, rd: Ready) -> None:
        """The whole cycle, for a driver whose persist is synchronous (the runtime), timed
        for the optional timers; `before_persist` runs between begin and persist."""
        self.begin(rd)
        if self.before_persist is not None and rd.must_sync:
            self.before_persist()
        if rd.must_sync and self._on_persist_timed is not None:
            started = time.perf_counter()
            self.persist(rd)
            self._on_persist_timed(time.perf_counter() - started, len(rd.entries))
        else:
            self.persist(rd)
        self.finish(rd)

    def begin(self, rd: Ready) -> None:
        if rd.messages:
            self.transport.send(rd.messages)
        if rd.snapshot is None:
            self._apply(rd)

    def persist(self, rd: Ready) -> None:
        if rd.snapshot_discard:
            self.discard_staged()
        for write in rd.snapshot_writes:
            self._stage(write)
        if rd.snapshot is not None:
            self._publish_staged(rd.snapshot)
        if rd.must_sync:
            self.storage.save(rd.hard_state or self._unsynced_hard_state, rd.entries,
                              reset_log=rd.snapshot is not None, sync=True)
            self._unsynced_hard_state = None
        elif rd.hard_state is not None:
            # Only the commit index moved: it rides along with the next synced save
            # (a lagging commit index on disk is safe: it is learned again).
            self._unsynced_hard_state = rd.hard_state

    def finish(self, rd: Ready) -> None:
        if rd.after_persist:
            me = self.node.id
            replies = [m for m in rd.after_persist if m.to != me]
            if replies:
                self.transport.send(replies)
        if rd.snapshot is not None:
            sm = self.state_machine
            if rd.snapshot_state is not None:
                sm.install(rd.snapshot_state, rd.snapshot.meta.index)
            else:
                sm.restore_chunks(self.snapshots.chunks(rd.snapshot), rd.snapshot.meta.index)
            self._apply(rd)
        self.node.advance(rd)

    def _apply(self, rd: Ready) -> None:
        if rd.committed_entries:
            sm = self.state_machine
            on_applied = self._on_applied
            started = time.perf_counter() if self._on_apply_timed is not None else 0.0
            for entry in rd.committed_entries:
                on_applied(entry, sm.apply(entry))
            if self._on_apply_timed is not None:
                self._on_apply_timed(time.perf_counter() - started)
        for rs in rd.read_states:
            self._wait_read(rs)
        for rid in rd.failed_reads:
            self._on_read_failed(rid)
        self._release_reads()

    def discard_staged(self) -> None:
        """Drop the incoming snapshot being staged, if any (nothing of it was published)."""
        staged, self._staged = self._staged, None
        self._staged_meta, self._staged_bytes = None, 0
        if staged is not None:
            staged.cancel()

    def _stage(self, write: SnapshotWrite) -> None:
        if write.offset == 0:
            self.discard_staged()
            self._staged = self.snapshots.create(write.meta)
            self._staged_meta = write.meta
        elif (self._staged is None or self._staged_meta != write.meta
              or self._staged_bytes != write.offset):
            # The core hands chunks out in order; anything else is a bug, not the network.
            raise StorageError(f"snapshot chunk at {write.offset} for {write.meta.index} does "
                               f"not follow the staged snapshot ({self._staged_bytes} bytes)")
        assert self._staged is not None
        try:
            self._staged.write(write.data)
        except BaseException:
            self.discard_staged()
            raise
        self._staged_bytes += len(write.data)

    def _publish_staged(self, snapshot: Snapshot) -> None:
        staged = self._staged
        if staged is None or self._staged_meta != snapshot.meta:
            raise StorageError(f"the core installs snapshot {snapshot.meta.index}, but it is "
                               "not the one staged")
        self._staged, self._staged_meta, self._staged_bytes = None, None, 0
        try:
            published = staged.close()
        except BaseException:
            staged.cancel()
            raise
        if (published.length, published.checksum) != (snapshot.length, snapshot.checksum):
            raise StorageError(f"snapshot {snapshot.meta.index} was published with another "
                               "length or checksum than the core checked: the disk is suspect")

    def _wait_read(self, rs: ReadState) -> None:
        heapq.heappush(self._waiting_reads, (rs.index, rs.request_id))

    def _release_reads(self) -> None:
        applied = self.state_machine.applied_index
        q = self._waiting_reads
        while q and q[0][0] <= applied:
            index, rid = heapq.heappop(q)
            self._on_read(rid, index)
