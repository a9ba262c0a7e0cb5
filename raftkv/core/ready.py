"""What the core hands its driver (Ready), and what the driver hands the core at boot."""

from __future__ import annotations

from dataclasses import dataclass, field

from raftkv.core.messages import Message
from raftkv.core.snapshots import SnapshotWrite
from raftkv.core.types import Entry, HardState, ReadState, Snapshot, SoftState


@dataclass(frozen=True, slots=True)
class BootState:
    """A node's durable state as loaded at start.

    `snapshot` is the latest snapshot (for a brand-new cluster: index 0, term 0, the initial
    membership, length 0); `entries` are the stored log entries after it; `applied` is the
    index the state machine already holds (normally snapshot.meta.index).
    """

    hard_state: HardState
    snapshot: Snapshot
    entries: tuple[Entry, ...] = ()
    applied: int | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the driver. Handle it in this order, then call advance():

    1. send `messages` (they never depend on what this Ready persists);
    2. persist: if `snapshot_discard`, drop the staged incoming snapshot; append every
       `snapshot_writes` chunk to the staged snapshot (offset 0 starts a new one); if
       `snapshot`, publish the staged snapshot (it is that one, checked) and drop the whole
       stored log; then save `entries` (replacing any stored entry at or after
       entries[0].index) and `hard_state`, in one transaction, synced when `must_sync`;
    3. send `after_persist` (replies that reveal what step 2 persisted: vote and append
       acknowledgements), now that it is persisted;
    4. restore the state machine from `snapshot` if any (from `snapshot_state` when the core
       has a validator, else from the published bytes), apply `committed_entries`, and
       serve `read_states` once applied >= their index; fail `failed_reads`;
    5. advance(ready).

    Replies that depend on persisted state (vote and append acknowledgements) are in
    `after_persist`, apart from `messages`, so that they cannot leave before the persist; the
    driver sends them right after it (not a Ready later: a follower's acknowledgement leaves
    as soon as its fsync returns). Those addressed to this node itself (a leader counting its
    own persisted entries) are stepped by advance().
    """

    soft_state: SoftState | None
    hard_state: HardState | None
    must_sync: bool
    snapshot: Snapshot | None
    entries: tuple[Entry, ...]
    messages: tuple[Message, ...]
    committed_entries: tuple[Entry, ...]
    read_states: tuple[ReadState, ...]
    failed_reads: tuple[int, ...]
    after_persist: tuple[Message, ...] = field(default=(), repr=False)
    """Send once this Ready is persisted, not before (see above); advance() steps the ones
    addressed to this node itself."""
    serial: int = field(default=0, repr=False)
    snapshot_writes: tuple[SnapshotWrite, ...] = field(default=(), repr=False)
    snapshot_discard: bool = False
    snapshot_state: object = field(default=None, repr=False)
    """What the snapshot validator decoded from `snapshot` (None without a validator)."""
    dropped: tuple[str, ...] = ()
    """Why messages from peers were ignored as invalid (a forged TimeoutNow, a snapshot that
    failed its checks...): for the driver to log, rate-limited. Nothing to do otherwise."""
