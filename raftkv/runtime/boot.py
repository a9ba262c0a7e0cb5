"""Boot: rebuild a node's durable Raft state from its stores (DESIGN: "On restart a node loads
the latest snapshot, replays the log after it").

Used by the real runtime at start and by the simulator when it restarts a crashed node. It
works through the ports only, and reads them, with one exception below.

What storage may hold, and what is kept (Raft Figure 13, step 6):

- no snapshot: the whole stored log, which must start at index 1;
- a snapshot at index S and the stored entry at S has the snapshot's term: every stored entry,
  including trailing entries before S kept for slow followers;
- a snapshot at S and the stored log starts at S + 1 (a suffix kept when a snapshot from the
  leader was installed): every stored entry;
- otherwise (the entry at S has another term, or the stored log ends before S): nothing. This
  is a crash between publishing a snapshot received from the leader and replacing the log: that
  persist was resetting the log, so the old entries are not ours any more. Boot finishes that
  reset (a synced save with reset_log=True), else the node's next save, which continues from
  S + 1, would not line up with what storage still holds;
- a stored log that starts after S + 1 has lost entries: StorageError, the node must not start.
"""

from __future__ import annotations

from collections.abc import Mapping

from raftkv.core.ready import BootState
from raftkv.core.types import (
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    HardState,
    Membership,
    Snapshot,
    SnapshotMeta,
)
from raftkv.kv.commands import AuthEnable, encode_command
from raftkv.ports import RaftStorage, SnapshotStore, StorageError, StoredSnapshot

__all__ = ["bootstrap_entries", "load_boot_state", "save_bootstrap"]


def bootstrap_entries(peers: Mapping[str, str], root_digest: bytes | None = None) -> list[Entry]:
    """The committed log every first member of a new static cluster writes, identically: one
    ADD_VOTER per member (term 1, in id order), so membership lives in the log and snapshots
    and a node that joins later learns it like any other entry; then, for a cluster
    bootstrapped with auth, one AuthEnable with the root token's digest (never the token), so
    auth is on from the first applied entries, before any client request can be served.

    Every member must be given the same root token: its digest is also part of the cluster id
    (raftkv.settings.derive_cluster_id), so members given different ones refuse each other's
    peer connections instead of holding different committed logs."""
    entries = [
        Entry(i, 1, EntryKind.CONF_CHANGE, change=ConfChange(ConfChangeOp.ADD_VOTER, nid, addr))
        for i, (nid, addr) in enumerate(sorted(peers.items()), start=1)
    ]
    if root_digest is not None:
        entries.append(Entry(len(entries) + 1, 1, EntryKind.NORMAL,
                             data=encode_command(AuthEnable(root_digest))))
    return entries


def save_bootstrap(storage: RaftStorage, peers: Mapping[str, str],
                   root_digest: bytes | None = None) -> None:
    """What a new static cluster's member saves at its first start: bootstrap_entries,
    committed, in term 1."""
    entries = bootstrap_entries(peers, root_digest)
    storage.save(HardState(1, None, len(entries)), entries)


def load_boot_state(
    storage: RaftStorage,
    snapshots: SnapshotStore,
    initial_membership: Membership | None,
    *,
    latest: tuple[StoredSnapshot | None] | None = None,
) -> tuple[BootState, StoredSnapshot | None]:
    """The state a RaftNode starts from, and the stored snapshot to restore the state machine.

    `initial_membership` is the cluster's configuration at index 0, the one its log's
    membership changes apply to. It is used whenever no snapshot was published yet, and a node
    that joins an existing cluster needs it too (the join must hand it over): replaying the
    leader's log on top of any other configuration gives a membership that never existed, e.g.
    voters = {itself} after its own ADD_VOTER, and the node would elect itself alone. None is
    accepted only when a snapshot exists (its meta carries the membership); otherwise
    ValueError.

    `BootState.applied` is the snapshot's index: the caller restores its state machine from the
    returned StoredSnapshot (nothing to restore when it is None) and the core re-applies the
    committed entries after it.

    `latest`: `(snapshots.latest(),)` when the caller has looked it up already (a look-up
    reads and checks the whole snapshot).
    """
    stored = snapshots.latest() if latest is None else latest[0]
    if stored is not None:
        snapshot = stored
    elif initial_membership is None:
        raise ValueError(
            "no snapshot and no initial membership: a node without a snapshot (a new or a "
            "joining node) must be given the cluster's initial membership"
        )
    else:
        snapshot = Snapshot(SnapshotMeta(0, 0, initial_membership))
    entries, stale = _entries_to_keep(storage, snapshot.meta)
    if stale:
        storage.save(None, [], reset_log=True, sync=True)
    hard_state = storage.hard_state()
    last_index = entries[-1].index if entries else snapshot.meta.index
    if hard_state.commit > last_index:
        raise StorageError(
            f"the stored commit index {hard_state.commit} is beyond the stored log "
            f"(snapshot {snapshot.meta.index}, last entry {last_index})"
        )
    boot = BootState(
        hard_state=hard_state,
        snapshot=snapshot,
        entries=tuple(entries),
        applied=snapshot.meta.index,
    )
    return boot, stored


def _entries_to_keep(storage: RaftStorage, meta: SnapshotMeta) -> tuple[list[Entry], bool]:
    """The stored entries to boot with, and whether storage holds a log to throw away."""
    first, last = storage.first_index(), storage.last_index()
    if last < first:
        return [], False
    snap = meta.index
    if first > snap + 1:
        what = f"the snapshot at {snap}" if snap else "index 1 and there is no snapshot"
        raise StorageError(f"the stored log starts at {first}, after {what}: entries are missing")
    if first <= snap and (last < snap or storage.term(snap) != meta.term):
        return [], True  # the snapshot replaced this log (Figure 13); the reset was not saved
    entries = storage.entries(first, last + 1)
    for expected, e in enumerate(entries, start=first):
        if e.index != expected:
            raise StorageError(f"the stored log is not contiguous at index {expected}")
    return entries, False
