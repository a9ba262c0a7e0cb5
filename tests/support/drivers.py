"""A member of a new cluster, as a test builds a RaftDriver around it: memory stores holding
the bootstrap entries (what a node's first start saves: raftkv.runtime.startup), and the core
booted from them; or the next run of a member on its stores."""

from __future__ import annotations

import random
from collections.abc import Mapping

from raftkv.core import Config, RaftNode
from raftkv.kv.state_machine import KVStateMachine
from raftkv.ports import RaftStorage, SnapshotStore
from raftkv.runtime.boot import load_boot_state, save_bootstrap
from raftkv.runtime.driver import BASE_MEMBERSHIP
from raftkv.runtime.ready_handler import chunk_reader
from snapshots.memory import MemorySnapshotStore
from storage.memory import MemoryRaftStorage

__all__ = ["new_member", "restarted_member"]


def new_member(config: Config, members: Mapping[str, str], *, seed: int = 1
               ) -> tuple[RaftNode, MemoryRaftStorage, MemorySnapshotStore]:
    """Node `config.node_id` of a cluster bootstrapped with `members` (id -> raft address):
    its core (random.Random(seed)) and its stores."""
    storage = MemoryRaftStorage()
    save_bootstrap(storage, members)
    snapshots = MemorySnapshotStore()
    boot, _ = load_boot_state(storage, snapshots, BASE_MEMBERSHIP)
    return RaftNode(config, boot, random.Random(seed)), storage, snapshots


def restarted_member(config: Config, storage: RaftStorage, snapshots: SnapshotStore, *,
                     seed: int) -> tuple[RaftNode, KVStateMachine]:
    """The next run of node `config.node_id` on its stores, as raftkv.runtime.startup opens
    it: the state machine restored from the latest snapshot, the core booted after it (it
    re-applies the committed log)."""
    sm = KVStateMachine()
    latest = snapshots.latest()
    if latest is not None:
        sm.restore_chunks(snapshots.chunks(latest), latest.meta.index)
    boot, _ = load_boot_state(storage, snapshots, BASE_MEMBERSHIP, latest=(latest,))
    core = RaftNode(config, boot, random.Random(seed), snapshot_reader=chunk_reader(snapshots),
                    snapshot_validator=sm.snapshot_decoder)
    return core, sm
