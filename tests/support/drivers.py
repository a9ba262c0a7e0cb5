"""A member of a new cluster, as a test builds a RaftDriver around it: memory stores holding
the bootstrap entries (what a node's first start saves: raftkv.runtime.startup), and the core
booted from them."""

from __future__ import annotations

import random
from collections.abc import Mapping

from raftkv.core import Config, RaftNode
from raftkv.runtime.boot import load_boot_state, save_bootstrap
from raftkv.runtime.driver import BASE_MEMBERSHIP
from snapshots.memory import MemorySnapshotStore
from storage.memory import MemoryRaftStorage

__all__ = ["new_member"]


def new_member(config: Config, members: Mapping[str, str], *, seed: int = 1
               ) -> tuple[RaftNode, MemoryRaftStorage, MemorySnapshotStore]:
    """Node `config.node_id` of a cluster bootstrapped with `members` (id -> raft address):
    its core (random.Random(seed)) and its stores."""
    storage = MemoryRaftStorage()
    save_bootstrap(storage, members)
    snapshots = MemorySnapshotStore()
    boot, _ = load_boot_state(storage, snapshots, BASE_MEMBERSHIP)
    return RaftNode(config, boot, random.Random(seed)), storage, snapshots
