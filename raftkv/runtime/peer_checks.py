"""What a peer's Raft message must satisfy before it is stepped into the core.

The codec already checked its shape (types, counts, non-negative numbers) and the transport
that it comes from the peer that authenticated the connection. Here: that it is a message a
correct peer could send. A message that fails is dropped with a rate-limited log line; it
never reaches the core, let alone the disk (one AppendEntries with a gap used to reach the
log store, which refused it as a storage failure and stopped the node).

The core itself drops responses that acknowledge what it never sent (raftkv.core.node,
_possible_response); snapshots are checked by the core before they are installed.
"""

from __future__ import annotations

from typing import Final

from raftkv.core import (
    AppendRequest,
    HeartbeatRequest,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    SnapshotRequest,
    VoteRequest,
)

__all__ = ["MAX_READ_IDS", "check_message"]

MAX_READ_IDS: Final = 65_536
"""Read ids in one ReadIndex message (a follower batches one turn's reads)."""


def check_message(m: Message) -> str | None:
    """None if `m` is a message a correct peer could send; else why not."""
    if isinstance(m, AppendRequest):
        return _check_append(m)
    if isinstance(m, VoteRequest):
        if m.last_log_term > m.term:
            return "a vote request with a last log term above its term"
    elif isinstance(m, HeartbeatRequest | SnapshotRequest):
        return None
    elif isinstance(m, ReadIndexRequest | ReadIndexResponse):
        if len(m.request_ids) > MAX_READ_IDS:
            return f"more than {MAX_READ_IDS} read ids in one message"
    return None


def _check_append(m: AppendRequest) -> str | None:
    if m.prev_term > m.term:
        return "an append whose previous entry's term is above its term"
    expected = m.prev_index + 1
    last_term = m.prev_term
    for e in m.entries:
        if e.index != expected:
            return f"an append with a gap: entry {e.index} where {expected} was due"
        if e.term < last_term or e.term > m.term:
            return (f"an append whose entry {e.index} has term {e.term} (previous "
                    f"{last_term}, leader's {m.term})")
        expected += 1
        last_term = e.term
    return None
