"""When leases expire: the leader's timers, sans-IO.

The replicated state (raftkv.kv.state_machine) knows which leases exist, their TTLs and their
keys, but nothing about time. `LeaseExpiry` holds the other half, on the leader only: one
deadline per lease on the leader's own monotonic clock. Nothing here reads a clock, sleeps or
does IO: the caller passes `now` (float seconds of ONE monotonic clock, the node's own) into
every call. The Raft process calls it on its one thread.

The rules that keep a lease from ever expiring early:

1. **Only the leader decides, and only through the log.** `due(now)` names the leases whose
   deadline passed; the leader proposes `LeaseRevoke(lease_id, expired=True)` for each, and
   every replica deletes the same keys at the same index when that entry applies. No node
   ever deletes anything by its own clock, and no time is ever stored in the replicated state
   or compared across nodes.
2. **A new leader gives every lease a full TTL.** It cannot know when the old leader last
   renewed a lease (keepalives are not in the log), so it assumes "just now". It starts once
   it has applied everything committed before its term: call `became_leader(leases, now)`
   when the leader applies the first entry of its own term (its no-op), with the state
   machine's `lease_ttls`. Leases granted after that reach it through `granted` (or
   `applied`), revokes through `forget`.
3. **Keepalives are leader-local, and answered only when safe.** A keepalive is not a log
   entry (as in etcd): followers forward it to the leader, whose `keepalive(lease_id, now)`
   restarts that lease's TTL. The leader answers a keepalive only
   (a) after `became_leader` (before, it may not know every lease and its deadlines do not
       run: `keepalive` raises `NotLeaseLeader`; the caller answers "no leader yet, retry"),
   (b) and once a quorum has confirmed its leadership AFTER the renewal: a read barrier
       (ReadIndex round) started after `keepalive()` returned. Without (b) a deposed leader
       that has not noticed yet would promise a client time that the new leader, counting
       from its own start, does not give (etcd learnt this: etcd-io/etcd#15247). If the
       barrier fails, answer "retry": the renewal on a deposed leader is harmless.
4. **What a client may rely on.** A keepalive (or grant) that was SENT at time t and answered
   OK guarantees that the lease is not revoked before t + TTL, by any leader: the answering
   leader renewed at or after t and, by 3(b), any later leader started after that renewal
   and gives a full TTL from its start (2). A client that keeps alive every TTL/3 therefore
   never loses its lease while a quorum is up, provided it reaches the new leader within
   about 2/3 of a TTL after a failover (hence MIN_LEASE_TTL_S).
5. **Clock rates are assumed equal.** Monotonic clocks of healthy machines differ in rate by
   parts per million; no margin is taken for that (nor does etcd take one).

A revoke that `due` returned is not returned again until it is forgotten, fails
(`revoke_failed`, e.g. the proposal was refused) or leadership changes (`stepped_down` forgets
everything; the next `became_leader` starts afresh). Keepalives of a lease whose revoke is
under way, or whose deadline passed, answer None ("not found": it is expiring).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import Final

from raftkv.kv.commands import MIN_LEASE_TTL_S
from raftkv.kv.state_machine import (
    LeaseGrantResult,
    LeaseNotFound,
    LeaseRevokeResult,
    PutResult,
)

__all__ = ["LeaseExpiry", "NotLeaseLeader", "min_lease_ttl_s"]

_HEAP_SLACK: Final = 64


class NotLeaseLeader(Exception):
    """This node does not keep lease time now: it is not the leader, or it is a leader that
    has not yet applied an entry of its own term (`became_leader` not called yet)."""


def min_lease_ttl_s(election_timeout_s: float) -> int:
    """The shortest TTL a node with this (base) election timeout should accept: 1.5 election
    timeouts rounded up to whole seconds (etcd's rule), and never below MIN_LEASE_TTL_S."""
    return max(MIN_LEASE_TTL_S, math.ceil(1.5 * election_timeout_s))


class LeaseExpiry:
    """The leader's lease deadlines. Not thread-safe: one thread (the Raft loop) owns it."""

    def __init__(self) -> None:
        self._leading = False
        self._ttls: dict[int, int] = {}
        self._deadlines: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []
        """(deadline, lease id), with stale pairs left behind by keepalives (skipped)."""
        self._revoking: set[int] = set()
        """Leases `due` returned: a revoke is (being) proposed."""

    @property
    def leading(self) -> bool:
        """True between became_leader and stepped_down: deadlines run and keepalives may be
        answered (after the quorum check of rule 3b)."""
        return self._leading

    def __len__(self) -> int:
        """Leases timed (0 when not leading)."""
        return len(self._deadlines)

    # ------------------------------------------------------------------ leadership
    def became_leader(self, leases: Mapping[int, int], now: float) -> None:
        """The leader applied the first entry of its term: time every lease in `leases`
        (id -> TTL, the state machine's lease_ttls) from `now`, a full TTL each."""
        self._clear()
        self._leading = True
        for lease_id, ttl_s in leases.items():
            self._ttls[lease_id] = ttl_s
            self._deadlines[lease_id] = now + ttl_s
        self._heap = [(deadline, lease_id) for lease_id, deadline in self._deadlines.items()]
        heapq.heapify(self._heap)

    def stepped_down(self) -> None:
        """Leadership was lost or the term changed: forget every deadline."""
        self._clear()
        self._leading = False

    # ------------------------------------------------------------------ applied entries
    def granted(self, lease_id: int, ttl_s: int, now: float) -> None:
        """The leader applied the grant of `lease_id` (ignored when not leading)."""
        if self._leading:
            self._ttls[lease_id] = ttl_s
            self._set(lease_id, now + ttl_s)

    def forget(self, lease_id: int) -> None:
        """The lease no longer exists (its revoke applied)."""
        self._ttls.pop(lease_id, None)
        self._deadlines.pop(lease_id, None)
        self._revoking.discard(lease_id)

    def applied(self, result: object, index: int, now: float) -> None:
        """Feed the result of every applied entry at `index` (call it on every node, leader
        or not: it ignores what does not concern it). Grants (LeaseGrantResult, or a
        PutResult that granted its own lease) start a deadline when leading; revokes, and any
        command that found its lease missing, forget it. Replayed answers (a retry with the
        same request id: result.index != index) change nothing."""
        if isinstance(result, LeaseNotFound):
            self.forget(result.lease_id)
        elif getattr(result, "index", None) != index:
            return
        elif isinstance(result, LeaseGrantResult):
            self.granted(result.lease_id, result.ttl_s, now)
        elif isinstance(result, PutResult):
            if result.ttl_s is not None and result.lease is not None:
                self.granted(result.lease, result.ttl_s, now)
        elif isinstance(result, LeaseRevokeResult):
            self.forget(result.lease_id)

    # ------------------------------------------------------------------ keepalives
    def keepalive(self, lease_id: int, now: float) -> int | None:
        """Restart the lease's TTL from `now` and return the TTL; None if the lease is
        unknown or expiring (its deadline passed, or its revoke is under way): answer
        "lease not found". Raises NotLeaseLeader when not leading. See rule 3: answer the
        client only once a quorum confirmed leadership after this call."""
        if not self._leading:
            raise NotLeaseLeader("not the leader, or the leader has not applied an entry of "
                                 "its own term yet")
        deadline = self._deadlines.get(lease_id)
        if deadline is None or deadline <= now or lease_id in self._revoking:
            return None
        ttl_s = self._ttls[lease_id]
        self._set(lease_id, now + ttl_s)
        return ttl_s

    def remaining(self, lease_id: int, now: float) -> float | None:
        """Seconds until the lease expires by this leader's clock (0.0 when expiring); None if
        unknown. Raises NotLeaseLeader when not leading."""
        if not self._leading:
            raise NotLeaseLeader("only the leader knows how long a lease has left")
        deadline = self._deadlines.get(lease_id)
        if deadline is None:
            return None
        if lease_id in self._revoking:
            return 0.0
        return max(0.0, deadline - now)

    # ------------------------------------------------------------------ expiry
    def due(self, now: float) -> list[int]:
        """Leases whose deadline is at or before `now`, in deadline order: propose
        LeaseRevoke(lease_id, expired=True) for each. Each is returned once (see the module
        doc). Empty when not leading."""
        if not self._leading:
            return []
        heap, deadlines, revoking = self._heap, self._deadlines, self._revoking
        out: list[int] = []
        while heap and heap[0][0] <= now:
            deadline, lease_id = heapq.heappop(heap)
            if deadlines.get(lease_id) == deadline and lease_id not in revoking:
                revoking.add(lease_id)
                out.append(lease_id)
        return out

    def revoke_failed(self, lease_id: int) -> None:
        """The revoke `due` returned could not be proposed (e.g. refused during a leadership
        transfer): `due` returns the lease again."""
        if lease_id in self._revoking:
            self._revoking.discard(lease_id)
            deadline = self._deadlines.get(lease_id)
            if deadline is not None:
                heapq.heappush(self._heap, (deadline, lease_id))

    def next_deadline(self) -> float | None:
        """The earliest deadline not yet returned by `due` (when to call it next), or None."""
        heap, deadlines, revoking = self._heap, self._deadlines, self._revoking
        while heap:
            deadline, lease_id = heap[0]
            if deadlines.get(lease_id) == deadline and lease_id not in revoking:
                return deadline
            heapq.heappop(heap)
        return None

    # ------------------------------------------------------------------ internals
    def _set(self, lease_id: int, deadline: float) -> None:
        self._deadlines[lease_id] = deadline
        heap = self._heap
        heapq.heappush(heap, (deadline, lease_id))
        if len(heap) > 2 * len(self._deadlines) + _HEAP_SLACK:  # stale pairs pile up
            self._heap = [(d, i) for i, d in self._deadlines.items() if i not in self._revoking]
            heapq.heapify(self._heap)

    def _clear(self) -> None:
        self._ttls.clear()
        self._deadlines.clear()
        self._heap = []
        self._revoking.clear()
