"""The snapshot checksum: one algorithm, shared by every SnapshotStore implementation, the Raft
core (which checks a snapshot received from the leader against it) and backups.

The same bytes get the same checksum in every store, so a snapshot copied between stores
(or sent to a peer) can be checked against the checksum it was published with. The one
implementation lives in raftkv.core.snapshots (the core may import only itself).
"""

from __future__ import annotations

from raftkv.core.snapshots import CHECKSUM_ALGORITHM, checksum_of, new_hasher

__all__ = ["CHECKSUM_ALGORITHM", "checksum_of", "new_hasher"]
