"""The snapshot checksum: one algorithm, shared by every SnapshotStore implementation.

The same bytes get the same checksum in every store, so a snapshot copied between stores
(or sent to a peer) can be checked against the checksum it was published with.
"""

from __future__ import annotations

import hashlib

CHECKSUM_ALGORITHM = "blake2b-256"
_DIGEST_SIZE_BYTES = 32


def new_hasher() -> hashlib.blake2b:
    """An incremental hasher: update() it with every chunk, then hexdigest()."""
    return hashlib.blake2b(digest_size=_DIGEST_SIZE_BYTES)


def checksum_of(data: bytes) -> str:
    """The hex checksum of a whole snapshot."""
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE_BYTES).hexdigest()
