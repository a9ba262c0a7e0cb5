"""How the core handles snapshot bytes without holding them (sans-IO, standard library only).

A snapshot's bytes live in the driver's snapshot store, never whole in the core:

- Sending (leader): the core knows its latest snapshot as `Snapshot(meta, length, checksum)`
  and asks the driver for one chunk at a time through a `SnapshotReader`, a plain callable
  `(snapshot, offset, size) -> bytes | None` (None: the store no longer holds it; the core
  gives up on that transfer and tries again later). Reads have no side effect, so calling it
  from inside step()/tick() keeps the core deterministic over a deterministic store.
- Receiving (follower): each chunk that passes the checks is handed to the driver in
  `Ready.snapshot_writes` (a `SnapshotWrite`), which appends it to a staged snapshot (a sink
  of its snapshot store) in Ready order; the core keeps only a running checksum and what the
  validator keeps. Once the last chunk is in and the checksum and the validator agree, the
  Ready carries `snapshot` (publish the staged snapshot, install it) and `snapshot_state`
  (what the validator decoded, for the state machine); when a transfer is abandoned or
  refused, `snapshot_discard` tells the driver to drop what it staged. Nothing of a refused
  snapshot is ever published.
- Checking: the declared length is checked against `Config.max_snapshot_bytes` when the first
  chunk arrives and every chunk must stay within it; the checksum (CHECKSUM_ALGORITHM over the
  whole snapshot) is computed here as chunks arrive; the format is checked by a validator the
  driver gives the core, a plain callable returning a `SnapshotDecoder` that is fed every
  chunk in order and may refuse at any point (ValueError or any other exception).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from raftkv.core.types import Snapshot, SnapshotMeta

CHECKSUM_ALGORITHM = "blake2b-256"
"""Of a whole snapshot, as hex: the same in the core, the stores and backups."""
_DIGEST_SIZE_BYTES = 32
CHECKSUM_HEX_CHARS = 2 * _DIGEST_SIZE_BYTES


def new_hasher() -> hashlib.blake2b:
    """An incremental CHECKSUM_ALGORITHM hasher: update() it with every chunk, hexdigest()."""
    return hashlib.blake2b(digest_size=_DIGEST_SIZE_BYTES)


def checksum_of(data: bytes) -> str:
    """The hex checksum of a whole snapshot."""
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE_BYTES).hexdigest()


def is_checksum(value: str) -> bool:
    """Whether `value` has the shape of a checksum: 64 lowercase hex digits."""
    return len(value) == CHECKSUM_HEX_CHARS and all(c in "0123456789abcdef" for c in value)


SnapshotReader = Callable[[Snapshot, int, int], "bytes | None"]
"""(snapshot, offset, size) -> up to `size` bytes of it from `offset` (fewer only at its end),
or None when the store no longer holds it."""


class SnapshotDecoder(Protocol):
    """Checks (and may decode) a snapshot fed to it chunk by chunk, in order."""

    def feed(self, data: bytes) -> None:
        """The next chunk; raise if the bytes so far cannot begin a valid snapshot."""
        ...

    def finish(self) -> object:
        """Every chunk was fed: raise if that is not a whole valid snapshot, else return what
        the state machine restores from (handed to the driver as Ready.snapshot_state)."""
        ...


SnapshotValidator = Callable[[], SnapshotDecoder]
"""Makes a decoder for one incoming snapshot."""


@dataclass(frozen=True, slots=True)
class SnapshotWrite:
    """A checked chunk of an incoming snapshot, for the driver to append to its staged
    snapshot. `offset` 0 starts a new staged snapshot (dropping any other)."""

    meta: SnapshotMeta
    offset: int
    data: bytes = field(repr=False)
