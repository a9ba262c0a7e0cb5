"""Leases and locks in the deterministic simulator.

`LeaseCluster` is the simulator of tests/sim/cluster.py with the real KVStateMachine (wrapped
to keep the running checksum the invariants compare) and the real LeaseExpiry on every node,
driven the way the runtime must drive them (raftkv.kv.leases has the rules):

- every applied entry goes to `expiry.applied(result, index, now)`;
- a leader that applies the first entry of its own term calls `expiry.became_leader(
  sm.lease_ttls, now)`; a node whose role or term changed since calls `stepped_down()` before
  it uses its expiry again;
- on each tick the leader proposes LeaseRevoke(id, expired=True) for each of `expiry.due(now)`
  (`revoke_failed` when the proposal is refused);
- a keepalive to the leader calls `expiry.keepalive(id, now)` and is answered OK only once a
  ReadIndex round started after it is confirmed (rule 3b).

Each node's lease clock is its own: virtual time plus an offset drawn at every boot (a
monotonic clock starts anywhere), so nothing may compare times across nodes or incarnations.
Rates are equal (rule 5).

Clients (no register clients: the history checked for linearizability is empty) live next
to a home node: a client reaches a node only if its home node can (both ways), so a
partition cuts clients off with their node, as it would in a real network:

- lock clients take a lease, create the lock key on it only if absent, hold it for a while
  keeping the lease alive every TTL/3, then release it by revoking the lease; some die instead
  (stop everything, so the lease expires with the key);
- key clients attach keys to a lease (or give a key a lease of its own with `ttl`), keep it
  alive for a while, then revoke it or abandon it to expiry.

Invariants, besides the Raft ones checked after every event:

1. (direct; off with SimOptions(direct_checks=False)) an expiry revoke that applies was
   proposed no earlier than (a) TTL after its proposer became leader, and (b) every promise
   made for that lease: TTL after its grant was proposed, and TTL after every renewal a
   keepalive was answered OK for (checked both when the revoke applies and when a later
   keepalive answer comes);
2. (end to end) lock safety: for each lock, the intervals during which a client believed it
   held the lock (from its acquiring answer to the send time of its last keepalive answered OK
   plus the TTL, cut short by its release, its death or a "lease not found") never overlap,
   and the fencing tokens (the acquiring indices) increase with them.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from raftkv.core.errors import NotLeader, ProposalDropped
from raftkv.core.node import RaftNode
from raftkv.core.types import Entry, NodeId, Role
from raftkv.kv.commands import (
    MIN_LEASE_TTL_S,
    Command,
    LeaseGrant,
    LeaseRevoke,
    Put,
    encode_command,
)
from raftkv.kv.leases import LeaseExpiry
from raftkv.kv.state_machine import (
    ConditionFailed,
    KVSnapshotDecoder,
    KVStateMachine,
    LeaseGrantResult,
    LeaseNotFound,
    LeaseRevokeResult,
    PutResult,
)
from tests.sim.cluster import Cluster, SimNode, SimOptions, SimResult
from tests.sim.invariants import InvariantViolation
from tests.sim.profiles import Profile

US = 1_000_000
LEASE_CLIENT = "lease_client"
LEASE_TIMEOUT = "lease_timeout"


# =========================================================================================
# The state machine
# =========================================================================================
class LeaseMachine:
    """The KVStateMachine with the running checksum of tests/sim/model.RegisterMachine."""

    def __init__(self) -> None:
        self.kv = KVStateMachine(max_request_ids=1000)
        self.chain = 0

    @property
    def applied_index(self) -> int:
        return self.kv.applied_index

    def apply(self, entry: Entry) -> object:
        if entry.index != self.kv.applied_index + 1:
            raise AssertionError(
                f"apply out of order: entry {entry.index} after applied {self.applied_index}")
        self.chain = zlib.crc32(b"%d/%d:" % (entry.index, entry.term) + entry.data, self.chain)
        return self.kv.apply(entry)

    def snapshot(self) -> bytes:
        return self.chain.to_bytes(4, "big") + self.kv.snapshot()

    def snapshot_chunks(self) -> Iterator[bytes]:
        yield self.chain.to_bytes(4, "big")
        yield from self.kv.snapshot_chunks()

    def restore(self, data: bytes, index: int) -> None:
        self.kv.restore(data[4:], index)
        self.chain = int.from_bytes(data[:4], "big")

    def restore_chunks(self, chunks: Iterable[bytes], index: int) -> None:
        self.restore(b"".join(chunks), index)

    @staticmethod
    def snapshot_decoder() -> _ChainedDecoder:
        return _ChainedDecoder()

    def install(self, state: object, index: int) -> None:
        assert isinstance(state, tuple)
        chain, view = state
        self.kv.install(view, index)
        self.chain = chain

    @property
    def values(self) -> tuple[object, ...]:
        """The whole state, to compare replicas (the convergence check)."""
        view = self.kv.snapshot_view()
        return view.data, view.leases, view.key_leases


class _ChainedDecoder:
    """LeaseMachine's snapshot validator: 4 bytes of chain, then the key-value snapshot
    (checked by the real KVSnapshotDecoder as the chunks arrive)."""

    def __init__(self) -> None:
        self._head = b""
        self._kv = KVSnapshotDecoder()

    def feed(self, data: bytes) -> None:
        need = 4 - len(self._head)
        if need > 0:
            self._head += data[:need]
            data = data[need:]
        if data:
            self._kv.feed(data)

    def finish(self) -> object:
        if len(self._head) != 4:
            raise ValueError("truncated")
        return int.from_bytes(self._head, "big"), self._kv.finish()


# =========================================================================================
# Workload and profiles
# =========================================================================================
@dataclass(frozen=True, slots=True)
class LeaseWorkload:
    lock_clients: int = 3
    key_clients: int = 2
    locks: int = 1
    ttl_s: int = MIN_LEASE_TTL_S
    hold_ms: tuple[float, float] = (50, 1000)
    retry_ms: tuple[float, float] = (20, 200)
    """A lock client's pause after finding the lock taken."""
    think_ms: tuple[float, float] = (5, 100)
    die: float = 0.25
    """Probability that a holder (or a key client) dies instead of releasing."""
    dead_ms: tuple[float, float] = (300, 3000)
    keys: int = 4
    key_life_ms: tuple[float, float] = (200, 3000)
    keepalive_retry_ms: tuple[float, float] = (30, 120)
    keepalives_per_ttl: int = 3
    """Clients keep alive every TTL / this (raftkv.coordination: 3)."""


_LEASE_BASE = Profile("leases", heal_ms=(5000, 7000), clients=0)
LEASES_CALM = replace(_LEASE_BASE, name="leases-calm", loss=0.01)
LEASES_CRASHES = replace(
    _LEASE_BASE, name="leases-crashes", crash_gap_ms=(1200, 3000), crash_leader=0.6,
    downtime_ms=(30, 800), crash_during_persist=0.003, whole_cluster_restart=0.1,
    snapshot_every=(15, 40), trailing=3, loss=0.02)
LEASES_PARTITIONS = replace(
    _LEASE_BASE, name="leases-partitions", partitions=("isolate_leader", "symmetric",
                                                       "one_way"),
    partition_gap_ms=(200, 900), partition_length_ms=(300, 2500), loss=0.02,
    delay_ms=(0.5, 10.0))
LEASES_CHAOS = replace(
    _LEASE_BASE, name="leases-chaos", loss=0.04, dup=0.04, delay_ms=(0.5, 15.0),
    partitions=("isolate_leader", "symmetric", "one_way", "isolate_node"),
    partition_gap_ms=(200, 900), partition_length_ms=(200, 2000),
    crash_gap_ms=(1000, 2500), crash_during_persist=0.002, whole_cluster_restart=0.05,
    crash_mid_snapshot=0.2, snapshot_every=(15, 40), trailing=4, transfers=True,
    operator_gap_ms=(300, 900))
LEASE_PROFILES: tuple[Profile, ...] = (LEASES_CALM, LEASES_CRASHES, LEASES_PARTITIONS,
                                       LEASES_CHAOS)
# For the injected bugs: a leader isolated for longer than a TTL while clients keep alive.
STALE_LEADERS = replace(
    LEASES_PARTITIONS, name="stale_leaders", partitions=("isolate_leader",),
    partition_gap_ms=(300, 800), partition_length_ms=(2500, 4000), loss=0.0)
FAILOVERS = replace(
    LEASES_CRASHES, name="failovers", crash_gap_ms=(200, 700), crash_leader=0.9,
    whole_cluster_restart=0.0, crash_during_persist=0.0)


def lease_profile_for_seed(seed: int) -> tuple[Profile, int]:
    profile = LEASE_PROFILES[seed % len(LEASE_PROFILES)]
    nodes = 3 if (seed // len(LEASE_PROFILES)) % 2 == 0 else 5
    return profile, nodes


# =========================================================================================
# Clients
# =========================================================================================
@dataclass(slots=True)
class LeaseOp:
    client: int
    kind: str  # "grant" | "put" | "keepalive" | "revoke"
    node: NodeId
    seq: int
    sent_us: int
    lease: int | None = None
    index: int = 0
    term: int = 0
    request_id: int = 0
    renew_us: int = 0
    ttl_s: int = 0


@dataclass(slots=True)
class Hold:
    client: int
    start_us: int
    token: int
    end_us: int | None = None


@dataclass(slots=True)
class LeaseClient:
    cid: int
    role: str  # "lock" | "keys"
    phase: str = "idle"  # idle, acquiring, holding, living, releasing, dead
    seq: int = 0
    wake: int = 0
    op: LeaseOp | None = None
    leader_guess: NodeId | None = None
    lease: int | None = None
    valid_until_us: int = 0
    """The send time of the last grant or keepalive answered OK, plus the TTL."""
    next_keepalive_us: int = 0
    until_us: int = 0
    """holding: release (or die) then; living: revoke (or die) then; dead: revive then."""
    dies: bool = False
    lock_key: str = ""
    hold: Hold | None = None
    keys_left: int = 0
    revoke_attempts: int = 0
    home: NodeId = ""
    """The node this client sits next to (see the module doc)."""


@dataclass(slots=True)
class NodeLeases:
    """A node's volatile lease state: its timers and its own clock."""

    expiry: LeaseExpiry
    clock_offset_s: float
    lease_term: int | None = None
    """The term became_leader was called in (None: not keeping lease time)."""


@dataclass(frozen=True, slots=True)
class RevokeProposal:
    lease: int
    proposed_us: int
    leader: NodeId
    term: int


@dataclass(slots=True)
class LeaseStats:
    granted: int = 0
    revoked: int = 0
    expired: int = 0
    keepalives_ok: int = 0
    acquired: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    """(op kind, result type) -> count."""
    holds: dict[str, list[Hold]] = field(default_factory=dict)


# =========================================================================================
# The cluster
# =========================================================================================
class LeaseCluster(Cluster):
    def __init__(self, seed: int, profile: Profile, nodes: int,
                 options: SimOptions | None = None, replay_hint: str | None = None,
                 workload: LeaseWorkload | None = None) -> None:
        super().__init__(seed, profile, nodes, options, replay_hint or (
            f"RAFTKV_SIM_SEED={seed} .venv/bin/python -m pytest tests/sim/test_leases.py "
            "-k test_lease_seed"))
        self.workload = workload or LeaseWorkload()
        self.leases: dict[NodeId, NodeLeases] = {}
        self.lease_clients: dict[int, LeaseClient] = {}
        self.lease_stats = LeaseStats()
        self._writes: dict[NodeId, dict[int, LeaseOp]] = {nid: {} for nid in self.ids}
        self._keepalives: dict[int, LeaseOp] = {}
        self._grant_proposals: dict[tuple[int, int], int] = {}
        self._revoke_proposals: dict[tuple[int, int], RevokeProposal] = {}
        self._leader_start: dict[tuple[NodeId, int], int] = {}
        self._ttl: dict[int, int] = {}
        self._promised: dict[int, tuple[int, str]] = {}
        """lease -> (virtual time before which no revoke may be proposed, why)."""
        self._expired: dict[int, RevokeProposal] = {}
        self._checked: set[int] = set()
        self._handlers[LEASE_CLIENT] = self._on_lease_client
        self._handlers[LEASE_TIMEOUT] = self._on_lease_timeout
        w = self.workload
        for i in range(w.lock_clients + w.key_clients):
            role = "lock" if i < w.lock_clients else "keys"
            self.lease_clients[i + 1] = LeaseClient(i + 1, role, lock_key=f"lock{i % w.locks}",
                                                    home=self.members[i % len(self.members)])

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        super().start()
        for c in self.lease_clients.values():
            self._wake(c, self.rng.uniform(0, 100))

    def _converged(self) -> bool:
        """As the register simulator's, and every lease has expired: the clients stop at
        the heal, so the leader must revoke every lease within about a TTL (liveness)."""
        if not super()._converged():
            return False
        leader = self._leader()
        assert leader is not None
        sm = leader.sm
        assert isinstance(sm, LeaseMachine)
        return not sm.kv.lease_ttls

    def finish(self) -> None:
        super().finish()
        for c in self.lease_clients.values():
            self._end_hold(c, self.now)
        self._check_lock_safety()

    # ------------------------------------------------------------------ scripting
    def propose(self, nid: NodeId, cmd: Command) -> int:
        """Propose `cmd` on the leader `nid` as a client would (for scenario tests)."""
        with self.reporting():
            sn = self.nodes[nid]
            assert sn.raft is not None, f"{nid} is down"
            index = sn.raft.propose(encode_command(cmd))
            if isinstance(cmd, LeaseGrant) or (isinstance(cmd, Put) and cmd.ttl_s is not None):
                self._grant_proposals[(index, sn.raft.term)] = self.now
            self._touch(sn)
            return index

    def leader_started(self, nid: NodeId, term: int) -> int | None:
        """When `nid` became leader of `term` (virtual microseconds)."""
        return self._leader_start.get((nid, term))

    def expired(self, lease: int) -> RevokeProposal | None:
        """The applied expiry of `lease`, if any."""
        return self._expired.get(lease)

    # ------------------------------------------------------------------ the driver
    def _new_machine(self) -> LeaseMachine:
        return LeaseMachine()

    def _boot(self, sn: SimNode) -> None:
        self.leases[sn.id] = NodeLeases(LeaseExpiry(), self.rng.uniform(0, 1000))
        super()._boot(sn)

    def _local_now(self, sn: SimNode) -> float:
        return self.now / US + self.leases[sn.id].clock_offset_s

    def _sync_lease_role(self, sn: SimNode) -> NodeLeases:
        """Step the timers down if the node is no longer the leader of the term they run for."""
        st = self.leases[sn.id]
        raft = sn.raft
        if st.lease_term is not None and (
                raft is None or raft.role is not Role.LEADER or raft.term != st.lease_term):
            st.expiry.stepped_down()
            st.lease_term = None
        return st

    def _note_role(self, sn: SimNode, raft: RaftNode) -> None:
        super()._note_role(sn, raft)
        if raft.role is Role.LEADER:
            self._leader_start.setdefault((sn.id, raft.term), self.now)
        self._sync_lease_role(sn)

    def _on_applied(self, sn: SimNode, entry: Entry, result: object) -> None:
        self.inv.on_applied(sn.id, entry, sn.sm)
        raft = sn.raft
        assert raft is not None
        st = self._sync_lease_role(sn)
        now = self._local_now(sn)
        st.expiry.applied(result, entry.index, now)
        if raft.role is Role.LEADER and entry.term == raft.term and st.lease_term != raft.term:
            sm = sn.sm
            assert isinstance(sm, LeaseMachine)
            st.expiry.became_leader(sm.kv.lease_ttls, now)
            st.lease_term = raft.term
        if entry.index not in self._checked:
            self._checked.add(entry.index)
            self._check_applied(entry, result)
        op = self._writes[sn.id].pop(entry.index, None)
        if op is not None:
            self._completed(op, result if entry.term == op.term else None)

    def _on_tick(self, nid: object, incarnation: object) -> None:
        super()._on_tick(nid, incarnation)
        sn = self.nodes[str(nid)]
        raft = sn.raft
        if sn.incarnation != incarnation or raft is None:
            return
        st = self._sync_lease_role(sn)
        due = st.expiry.due(self._local_now(sn))
        for lease in due:
            try:
                index = raft.propose(encode_command(LeaseRevoke(lease, expired=True)))
            except (NotLeader, ProposalDropped):
                st.expiry.revoke_failed(lease)
                continue
            self._revoke_proposals[(index, raft.term)] = RevokeProposal(
                lease, self.now, sn.id, raft.term)
            self._note("lease", sn.id, f"expire lease {lease} at index {index}")
        if due:
            self._touch(sn)

    def _on_read(self, sn: SimNode, request_id: int, index: int) -> None:
        op = self._keepalives.pop(request_id, None)
        if op is None:
            super()._on_read(sn, request_id, index)
        else:
            self._keepalive_ok(op)

    def _on_read_failed(self, sn: SimNode, request_id: int) -> None:
        op = self._keepalives.pop(request_id, None)
        if op is None:
            super()._on_read_failed(sn, request_id)
        else:
            self._completed(op, None)

    def _crash(self, sn: SimNode, reason: str) -> None:
        super()._crash(sn, reason)
        writes, self._writes[sn.id] = self._writes[sn.id], {}
        lost = list(writes.values())
        for rid, op in list(self._keepalives.items()):
            if op.node == sn.id:
                del self._keepalives[rid]
                lost.append(op)
        for op in lost:
            self._completed(op, None)

    def _keepalive_needs_quorum(self) -> bool:
        """Rule 3b (an injected bug turns it off)."""
        return True

    # ------------------------------------------------------------------ invariant 1
    def _promise(self, lease: int, until_us: int, why: str) -> None:
        known = self._promised.get(lease)
        if known is None or until_us > known[0]:
            self._promised[lease] = (until_us, why)
        expired = self._expired.get(lease)
        if expired is not None and self.opt.direct_checks and expired.proposed_us < until_us:
            raise InvariantViolation(
                f"lease {lease}: {why}, promising it until t={until_us / US:.6f}, but its "
                f"expiry was proposed by {expired.leader} (term {expired.term}) at "
                f"t={expired.proposed_us / US:.6f} and applied")

    def _check_applied(self, entry: Entry, result: object) -> None:
        if isinstance(result, LeaseGrantResult | PutResult) and result.index == entry.index:
            lease, ttl = ((result.lease_id, result.ttl_s) if isinstance(result, LeaseGrantResult)
                          else (result.lease, result.ttl_s))
            if lease is not None and ttl is not None:
                self._ttl[lease] = ttl
                self.lease_stats.granted += 1
                proposed = self._grant_proposals.get((entry.index, entry.term))
                assert proposed is not None, f"grant at {entry.index} was never proposed"
                self._promise(lease, proposed + ttl * US,
                              f"its grant was proposed at t={proposed / US:.6f}")
        if not isinstance(result, LeaseRevokeResult) or result.index != entry.index:
            return
        lease = result.lease_id
        if not result.expired:
            self.lease_stats.revoked += 1
            return
        self.lease_stats.expired += 1
        proposal = self._revoke_proposals.get((entry.index, entry.term))
        assert proposal is not None and proposal.lease == lease
        self._expired[lease] = proposal
        if not self.opt.direct_checks:
            return
        ttl_us = self._ttl[lease] * US
        start = self._leader_start.get((proposal.leader, proposal.term))
        assert start is not None, f"{proposal.leader} proposed as an unseen leader"
        if proposal.proposed_us < start + ttl_us:
            raise InvariantViolation(
                f"lease {lease} (TTL {ttl_us // US} s) expired by {proposal.leader} at "
                f"t={proposal.proposed_us / US:.6f}, less than a TTL after it became leader of "
                f"term {proposal.term} at t={start / US:.6f}: a new leader must give every "
                "lease a full TTL")
        promised, why = self._promised.get(lease, (0, ""))
        if proposal.proposed_us < promised:
            raise InvariantViolation(
                f"lease {lease} (TTL {ttl_us // US} s) expired by {proposal.leader} (term "
                f"{proposal.term}) at t={proposal.proposed_us / US:.6f}, before "
                f"t={promised / US:.6f}: {why}")

    # ------------------------------------------------------------------ invariant 2
    def _end_hold(self, c: LeaseClient, at_us: int) -> None:
        hold = c.hold
        if hold is None:
            return
        c.hold = None
        hold.end_us = min(at_us, c.valid_until_us)
        self._note("lease", None, f"c{c.cid} held {c.lock_key} token={hold.token} "
                                  f"[{hold.start_us / US:.6f}, {hold.end_us / US:.6f})")
        if hold.end_us > hold.start_us:
            self.lease_stats.holds.setdefault(c.lock_key, []).append(hold)

    def _check_lock_safety(self) -> None:
        for key, holds in sorted(self.lease_stats.holds.items()):
            ordered = sorted(holds, key=lambda h: h.start_us)
            for a, b in itertools.pairwise(ordered):
                assert a.end_us is not None
                if b.start_us < a.end_us:
                    raise InvariantViolation(
                        f"lock safety: c{a.client} held {key} (token {a.token}) until "
                        f"t={a.end_us / US:.6f}, but c{b.client} acquired it (token {b.token}) "
                        f"at t={b.start_us / US:.6f}")
                if b.token <= a.token:
                    raise InvariantViolation(
                        f"lock safety: fencing tokens went back on {key}: c{a.client} held "
                        f"token {a.token}, the next holder c{b.client} got {b.token}")

    # ------------------------------------------------------------------ the clients
    def _wake(self, c: LeaseClient, delay_ms: float) -> None:
        c.wake += 1
        self._after(delay_ms, LEASE_CLIENT, c.cid, c.wake)

    def _wake_at(self, c: LeaseClient, at_us: int) -> None:
        self._wake(c, max(0, at_us - self.now) / 1000)

    def _on_lease_client(self, cid: object, wake: object) -> None:
        c = self.lease_clients[cid]  # type: ignore[index]
        if wake != c.wake or c.op is not None or self.healed:
            return
        self._step(c)

    def _step(self, c: LeaseClient) -> None:
        w, rng, now = self.workload, self.rng, self.now
        if c.phase == "dead":
            if now < c.until_us:
                self._wake_at(c, c.until_us)
                return
            c.phase, c.lease = "idle", None
        if c.lease is not None and c.phase in ("acquiring", "holding", "living") \
                and now >= c.valid_until_us:
            self._end_hold(c, c.valid_until_us)  # no keepalive answered in time: lost
            self._note("lease", None, f"c{c.cid} lost lease {c.lease}")
            c.phase = "giving_up"  # revoke it all the same, as raftkv.coordination does
        if c.phase == "giving_up":
            assert c.lease is not None
            c.phase = "releasing"
            self._write(c, LeaseRevoke(c.lease))
            return
        if c.phase == "idle":
            if c.role == "keys" and rng.random() < 0.5:
                key = f"key{rng.randrange(w.keys)}"
                self._write(c, Put(key, f"c{c.cid}", ttl_s=w.ttl_s))
            else:
                self._write(c, LeaseGrant(w.ttl_s))
            return
        if c.phase in ("holding", "living") and now >= c.until_us:
            self._end_hold(c, now)
            if c.dies:
                self._note("lease", None, f"c{c.cid} dies holding lease {c.lease}")
                c.phase, c.until_us = "dead", now + int(rng.uniform(*w.dead_ms) * 1000)
                self._wake_at(c, c.until_us)
            else:
                c.phase = "releasing"
                assert c.lease is not None
                self._write(c, LeaseRevoke(c.lease))
            return
        if now >= c.next_keepalive_us:
            self._keepalive(c)
            return
        if c.phase == "acquiring":
            assert c.lease is not None
            self._write(c, Put(c.lock_key, f"c{c.cid}", prev_index=0, lease=c.lease))
            return
        if c.phase == "living" and c.keys_left > 0:
            c.keys_left -= 1
            key = f"key{rng.randrange(w.keys)}"
            self._write(c, Put(key, f"c{c.cid}", lease=c.lease if rng.random() < 0.85
                               else None))
            return
        self._wake_at(c, min(c.next_keepalive_us, c.until_us, c.valid_until_us))

    def _node_for(self, c: LeaseClient) -> SimNode:
        if c.leader_guess is not None and self.rng.random() < self.profile.follow_leader:
            return self.nodes[c.leader_guess]
        return self.nodes[self.rng.choice(self.ids)]

    def _reaches(self, c: LeaseClient, sn: SimNode) -> bool:
        """Whether the client can talk to `sn` now (and `sn` is up)."""
        blocked = self._blocked
        return sn.raft is not None and (sn.id == c.home or (
            (c.home, sn.id) not in blocked and (sn.id, c.home) not in blocked))

    def _new_op(self, c: LeaseClient, kind: str, sn: SimNode) -> LeaseOp:
        c.seq += 1
        op = LeaseOp(c.cid, kind, sn.id, c.seq, self.now, lease=c.lease)
        c.op = op
        self._after(self.profile.op_timeout_ms, LEASE_TIMEOUT, c.cid, c.seq)
        return op

    def _write(self, c: LeaseClient, cmd: Command) -> None:
        sn = self._node_for(c)
        kind = "grant" if isinstance(cmd, LeaseGrant) else "revoke" if isinstance(
            cmd, LeaseRevoke) else "put"
        op = self._new_op(c, kind, sn)
        raft = sn.raft
        if raft is None or not self._reaches(c, sn):
            c.leader_guess = None
            self._completed(op, None)
            return
        try:
            op.index = raft.propose(encode_command(cmd))
        except NotLeader as e:
            c.leader_guess = e.leader
            self._completed(op, None)
            return
        except ProposalDropped:
            self._completed(op, None)
            return
        op.term = raft.term
        if isinstance(cmd, LeaseGrant) or (isinstance(cmd, Put) and cmd.ttl_s is not None):
            self._grant_proposals[(op.index, op.term)] = self.now
        stale = self._writes[sn.id].pop(op.index, None)
        if stale is not None:  # its entry was truncated away: the index is reused
            self._completed(stale, None)
        self._writes[sn.id][op.index] = op
        self._touch(sn)

    def _keepalive(self, c: LeaseClient) -> None:
        sn = self._node_for(c)
        op = self._new_op(c, "keepalive", sn)
        raft = sn.raft
        if raft is None or not self._reaches(c, sn):
            c.leader_guess = None
            self._completed(op, None)
            return
        st = self._sync_lease_role(sn)
        if not st.expiry.leading:  # not the leader, or not ready: NotLeaseLeader, retry
            c.leader_guess = raft.leader if raft.leader != sn.id else None
            self._completed(op, None)
            return
        assert op.lease is not None
        ttl = st.expiry.keepalive(op.lease, self._local_now(sn))
        if ttl is None:
            self._completed(op, LeaseNotFound(0, op.lease))
            return
        op.renew_us, op.ttl_s = self.now, ttl
        if not self._keepalive_needs_quorum():
            self._keepalive_ok(op)
            return
        self._request_id += 1
        op.request_id = self._request_id
        self._keepalives[op.request_id] = op
        raft.read_index(op.request_id)
        self._touch(sn)

    def _keepalive_ok(self, op: LeaseOp) -> None:
        assert op.lease is not None
        self.lease_stats.keepalives_ok += 1
        self._promise(op.lease, op.renew_us + op.ttl_s * US,
                      f"a keepalive was answered OK for a renewal at t={op.renew_us / US:.6f} "
                      f"by {op.node}")
        self._completed(op, op)

    def _on_lease_timeout(self, cid: object, seq: object) -> None:
        c = self.lease_clients[cid]  # type: ignore[index]
        op = c.op
        if op is None or op.seq != seq:
            return
        if self._writes[op.node].get(op.index) is op:
            del self._writes[op.node][op.index]
        self._keepalives.pop(op.request_id, None)
        self._completed(op, None)

    def _completed(self, op: LeaseOp, result: object) -> None:
        """The answer to `op` (None: failed or unknown outcome) reaches its client. Called from
        inside a node's Ready handling too: it only changes the client and schedules it."""
        c = self.lease_clients[op.client]
        if c.op is not op:
            return
        c.op = None
        name = f"{op.kind}:{type(result).__name__ if result is not op else 'ok'}"
        self.lease_stats.outcomes[name] = self.lease_stats.outcomes.get(name, 0) + 1
        w, rng, now = self.workload, self.rng, self.now
        think = rng.uniform(*w.think_ms)
        if op.kind == "keepalive":
            if result is op and op.lease == c.lease:
                c.valid_until_us = max(c.valid_until_us, op.sent_us + op.ttl_s * US)
                c.next_keepalive_us = op.sent_us + op.ttl_s * US // w.keepalives_per_ttl
            elif isinstance(result, LeaseNotFound) and op.lease == c.lease:
                self._end_hold(c, now)
                c.phase, c.lease = "idle", None
            else:
                c.next_keepalive_us = now + int(rng.uniform(*w.keepalive_retry_ms) * 1000)
            self._wake(c, 0)
            return
        if op.kind == "revoke":
            if result is None and c.revoke_attempts < 5:  # resent, like Client's retries
                c.revoke_attempts += 1
                c.phase = "giving_up"
                self._wake(c, rng.uniform(*w.keepalive_retry_ms))
                return
            c.phase, c.lease, c.revoke_attempts = "idle", None, 0
            self._wake(c, think)
            return
        if result is None:
            if op.kind == "put" and c.phase == "acquiring":
                # The put may yet apply, making this client the holder without knowing it:
                # give the lease up (if that fails too, it expires).
                c.phase = "giving_up"
                self._wake(c, 0)
                return
            self._wake(c, think)
            return
        if op.kind == "grant" or (c.phase == "idle" and isinstance(result, PutResult)):
            lease = result.lease_id if isinstance(result, LeaseGrantResult) else (
                result.lease if isinstance(result, PutResult) else None)
            assert lease is not None, result
            ttl_us = w.ttl_s * US
            c.lease = lease
            c.valid_until_us = op.sent_us + ttl_us
            c.next_keepalive_us = op.sent_us + ttl_us // w.keepalives_per_ttl
            if c.role == "lock":
                c.phase = "acquiring"
            else:
                c.phase = "living"
                c.keys_left = rng.randint(0, 3)
                c.until_us = now + int(rng.uniform(*w.key_life_ms) * 1000)
                c.dies = rng.random() < w.die
            self._wake(c, 0)
            return
        if isinstance(result, LeaseNotFound):
            c.phase, c.lease = "idle", None
            self._wake(c, think)
            return
        if c.phase == "acquiring":
            if isinstance(result, ConditionFailed):
                self._wake(c, rng.uniform(*w.retry_ms))
                return
            assert isinstance(result, PutResult), result
            self.lease_stats.acquired += 1
            c.hold = Hold(c.cid, now, result.index)
            c.phase = "holding"
            c.until_us = now + int(rng.uniform(*w.hold_ms) * 1000)
            c.dies = rng.random() < w.die
            self._note("lease", None, f"c{c.cid} acquired {c.lock_key} token={result.index}")
        self._wake(c, 0 if c.phase == "holding" else think)


def run_lease_seed(seed: int, profile: Profile | None = None, nodes: int | None = None,
                   options: SimOptions | None = None, replay_hint: str | None = None,
                   workload: LeaseWorkload | None = None) -> SimResult:
    """Run one lease seed; raises SimFailure (an AssertionError) on any violation."""
    default_profile, default_nodes = lease_profile_for_seed(seed)
    cluster = LeaseCluster(seed, profile or default_profile, nodes or default_nodes, options,
                           replay_hint, workload)
    return cluster.run()


def run_lease_cluster(seed: int, profile: Profile | None = None, nodes: int | None = None,
                      options: SimOptions | None = None,
                      workload: LeaseWorkload | None = None) -> LeaseCluster:
    """Like run_lease_seed, but returns the cluster (its lease_stats) as well."""
    default_profile, default_nodes = lease_profile_for_seed(seed)
    cluster = LeaseCluster(seed, profile or default_profile, nodes or default_nodes, options,
                           None, workload)
    cluster.run()
    return cluster
