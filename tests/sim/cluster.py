"""The deterministic cluster simulator (FoundationDB / TigerBeetle style).

One process, one seed, virtual time. Everything random comes from one `random.Random(seed)`;
events wait in a heap ordered by (virtual time, sequence number). Each node is the real core
(RaftNode) with in-memory stores that survive a crash, the register state machine of
tests/sim/model.py and the runtime's ReadyHandler, driven the way the runtime drives it:

    rd = node.ready(); handler.begin(rd)      # messages leave now
    ... a random fsync delay of virtual time ...
    handler.persist(rd); handler.finish(rd)   # then the next Ready

While a persist is in flight the node keeps stepping messages, ticks and client requests; a
crash in that window loses the Ready. The network delays (and so reorders), drops, duplicates
and partitions messages; faults come and go on a schedule drawn from the seed and all heal at
the heal time, after which the cluster must converge. Clients record a history that is checked
for linearizability at the end; tests/sim/invariants.py checks safety after every event.

A failure raises AssertionError("SIM FAILURE seed=... profile=... nodes=...") with the
violation, the last events and the command that replays the seed.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar, cast

from raftkv.core.config import Config
from raftkv.core.errors import ConfChangeRejected, NotLeader, ProposalDropped, RaftError
from raftkv.core.messages import (
    AppendRequest,
    AppendResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from raftkv.core.node import RaftNode
from raftkv.core.ready import Ready
from raftkv.core.types import (
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    HardState,
    Membership,
    NodeId,
    Role,
    SnapshotMeta,
)
from raftkv.runtime.boot import load_boot_state
from raftkv.runtime.ready_handler import ReadyHandler, chunk_reader
from snapshots.memory import MemorySnapshotStore
from snapshots.policy import SnapshotPolicy
from storage.memory import MemoryRaftStorage
from tests.sim.invariants import Invariants, InvariantViolation
from tests.sim.model import (
    DELETE,
    PUT,
    Applied,
    Command,
    RegisterMachine,
    SimMachine,
    encode_command,
)
from tests.sim.profiles import Profile, profile_for_seed
from tests.support.linearizability import Operation, Outcome, check_history, format_violation

US_PER_MS = 1000
_T = TypeVar("_T")

# Event kinds (the heap holds (time_us, seq, kind, a, b) tuples).
TICK = "tick"
DELIVER = "deliver"
PERSIST = "persist"
CRASH = "crash"
RESTART = "restart"
FAULT_START = "fault_start"
FAULT_END = "fault_end"
CLIENT = "client"
OP_TIMEOUT = "op_timeout"
OPERATOR = "operator"
HEAL = "heal"
LIVENESS = "liveness"


BASE_MEMBERSHIP = Membership(frozenset())
"""The configuration at index 0, as in the runtime (raftkv.runtime.driver.BASE_MEMBERSHIP):
empty, because the first log entries add the initial members."""
BOOTSTRAP_TERM = 1


def bootstrap_log(members: Sequence[NodeId]) -> tuple[HardState, list[Entry]]:
    """What every initial member has on disk before its first start, as the runtime writes it
    (raftkv.runtime.boot.bootstrap_entries): one committed ADD_VOTER entry per member, in
    term 1. A node that joins later starts empty and learns the members from the log."""
    entries = [
        Entry(i, BOOTSTRAP_TERM, EntryKind.CONF_CHANGE, change=ConfChange(ConfChangeOp.ADD_VOTER,
                                                                            nid))
        for i, nid in enumerate(sorted(members), start=1)
    ]
    return HardState(BOOTSTRAP_TERM, None, len(entries)), entries


@dataclass(frozen=True, slots=True)
class SimOptions:
    tick_ms: float = 10.0
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 1
    max_append_entries: int = 8
    max_append_bytes: int = 400
    max_inflight_appends: int = 4
    snapshot_chunk_bytes: int = 64
    liveness_bound_ms: float = 20_000
    """After the heal time the cluster must converge within this much virtual time."""
    liveness_check_ms: float = 50
    direct_checks: bool = True
    """Also check the durability rules against the disks (see invariants.py)."""
    trace: bool = False
    """Hash every event into SimResult.digest (the determinism test)."""
    history_lines: int = 60


@dataclass(frozen=True, slots=True)
class Fault:
    """A network fault, plain data: `blocked` holds the directed links it cuts."""

    fault_id: int
    kind: str
    blocked: frozenset[tuple[NodeId, NodeId]]
    description: str


@dataclass(slots=True)
class ClientOp:
    client: int
    kind: str  # "read" | "write" | "delete"
    key: str
    value: str | None
    node: NodeId
    invoke_us: int
    seq: int
    commit_at_invoke: int = 0
    op_id: int = 0
    index: int = 0
    request_id: int = 0
    outcome: Outcome | None = None
    """None while the operation is pending."""


@dataclass(slots=True)
class Client:
    cid: int
    seq: int = 0
    op: ClientOp | None = None
    leader_guess: NodeId | None = None
    scripted: bool = False
    """Issued by a scenario test: one operation, no follow-up."""


@dataclass
class SimStats:
    events: int = 0
    messages_sent: int = 0
    messages_dropped: int = 0
    crashes: int = 0
    whole_cluster_restarts: int = 0
    persist_crashes: int = 0
    snapshots_taken: int = 0
    snapshots_installed: int = 0
    elections: int = 0
    max_term: int = 0
    conf_changes: int = 0
    conf_changes_rejected: int = 0
    conf_changes_proposed: dict[str, int] = field(default_factory=dict)
    """Changes the leader accepted, by operation (ADD_LEARNER, ADD_VOTER, REMOVE)."""
    transfers: int = 0
    transfers_rejected: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SimResult:
    seed: int
    profile: str
    nodes: int
    virtual_ms: float
    heal_ms: float
    converged_ms: float
    """Virtual time from the heal to convergence."""
    operations: int
    checked_operations: int
    digest: str
    stats: SimStats


@dataclass
class SimSummary:
    """What a batch of seeds did, for the one-line report at the end of the run."""

    seeds: int = 0
    wall_s: float = 0.0
    longest_ms: float = 0.0
    longest_seed: str = ""
    slowest_convergence_ms: float = 0.0
    operations: int = 0
    checked_operations: int = 0
    events: int = 0
    by_profile: dict[str, int] = field(default_factory=dict)
    injected_bugs: dict[str, dict[str, object]] = field(default_factory=dict)

    def add(self, r: SimResult, wall_s: float) -> None:
        self.seeds += 1
        self.wall_s += wall_s
        if r.virtual_ms > self.longest_ms:
            self.longest_ms = r.virtual_ms
            self.longest_seed = f"seed {r.seed} {r.profile}/{r.nodes}"
        self.slowest_convergence_ms = max(self.slowest_convergence_ms, r.converged_ms)
        self.operations += r.operations
        self.checked_operations += r.checked_operations
        self.events += r.stats.events
        name = f"{r.profile}/{r.nodes}"
        self.by_profile[name] = self.by_profile.get(name, 0) + 1

    def line(self) -> str:
        return (
            f"sim: {self.seeds} seeds in {self.wall_s:.1f} s wall; longest simulated run "
            f"{self.longest_ms / 1000:.2f} s ({self.longest_seed}); slowest convergence after "
            f"the heal {self.slowest_convergence_ms:.0f} ms; {self.checked_operations} of "
            f"{self.operations} client operations checked for linearizability; "
            f"{self.events} events"
        )


class SimFailure(AssertionError):
    """A failed seed; the message is the full report."""


class PowerCut(Exception):
    """Raised by SimStorage.save when the simulator cuts the power in the middle of a persist."""


class SimStorage(MemoryRaftStorage):
    """MemoryRaftStorage whose next save() can be armed to fail like a power cut: nothing of
    that save is written (as in MemoryRaftStorage, it is one transaction)."""

    def __init__(self) -> None:
        super().__init__()
        self.power_cut_on_next_save = False

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        *,
        reset_log: bool = False,
        sync: bool = True,
    ) -> None:
        if self.power_cut_on_next_save:
            self.power_cut_on_next_save = False
            raise PowerCut("power cut during save")
        super().save(hard_state, entries, reset_log=reset_log, sync=sync)


class _NodeTransport:
    def __init__(self, cluster: Cluster, node: SimNode) -> None:
        self._cluster = cluster
        self._node = node

    def send(self, messages: Sequence[Message]) -> None:
        self._cluster._send(self._node, messages)


class SimNode:
    """One simulated server: stores that survive crashes, and the volatile rest."""

    def __init__(self, nid: NodeId, config: Config, snapshot_every: int, tick_us: int) -> None:
        self.id = nid
        self.config = config
        self.tick_us = tick_us
        self.storage = SimStorage()
        self.snapshots = MemorySnapshotStore(retain=2)
        self.sm: SimMachine = RegisterMachine()
        self.raft: RaftNode | None = None
        self.handler: ReadyHandler | None = None
        self.incarnation = 0
        self.inflight: Ready | None = None
        self.pending_writes: dict[int, ClientOp] = {}
        self.pending_reads: dict[int, ClientOp] = {}
        self.snapshot_every = snapshot_every
        self.seen: tuple[Role, int, NodeId | None] = (Role.FOLLOWER, 0, None)

    @property
    def alive(self) -> bool:
        return self.raft is not None


class Cluster:
    def __init__(
        self,
        seed: int,
        profile: Profile,
        nodes: int,
        options: SimOptions | None = None,
        replay_hint: str | None = None,
    ) -> None:
        self.seed = seed
        self.profile = profile
        self.n = nodes
        self.opt = options or SimOptions()
        self.replay_hint = replay_hint or f"RAFTKV_SIM_SEED={seed} make sim"
        self.rng = random.Random(seed)
        self.now = 0
        self._heap: list[tuple[int, int, str, object, object]] = []
        self._seq = 0
        self.members = [f"n{i}" for i in range(1, nodes + 1)]
        self.ids = self.members + [f"n{i}" for i in range(nodes + 1, nodes + 1 + profile.spares)]
        self.nodes: dict[NodeId, SimNode] = {}
        snapshot_every = profile.snapshot_every
        for nid in self.ids:
            every = self.rng.randint(*snapshot_every) if snapshot_every else 0
            drift = self.rng.uniform(-profile.clock_drift, profile.clock_drift)
            config = Config(
                node_id=nid,
                election_timeout_ticks=self.opt.election_timeout_ticks,
                heartbeat_interval_ticks=self.opt.heartbeat_interval_ticks,
                max_append_entries=self.opt.max_append_entries,
                max_append_bytes=self.opt.max_append_bytes,
                max_inflight_appends=self.opt.max_inflight_appends,
                snapshot_chunk_bytes=self.opt.snapshot_chunk_bytes,
            )
            tick_us = round(self.opt.tick_ms * US_PER_MS * (1 + drift))
            self.nodes[nid] = SimNode(nid, config, every, tick_us)
            if nid in self.members:
                self.nodes[nid].storage.save(*bootstrap_log(self.members))
        self.inv = Invariants(self.nodes, direct_checks=self.opt.direct_checks,
                              bootstrap_term=BOOTSTRAP_TERM)
        self.stats = SimStats()
        self.heal_us = self._ms(self.rng.uniform(*profile.heal_ms))
        self.deadline_us = self.heal_us + self._ms(self.opt.liveness_bound_ms)
        self.healed = False
        self.converged_us: int | None = None
        self.loss = profile.loss
        self.dup = profile.dup
        self._faults: dict[int, Fault] = {}
        self._blocked: frozenset[tuple[NodeId, NodeId]] = frozenset()
        self._next_fault_id = 1
        self._filters: dict[int, Callable[[Message], Message | None]] = {}
        self.clients = {cid: Client(cid) for cid in range(1, profile.clients + 1)}
        self.checked_operations = 0
        self.history: list[Operation] = []
        self._op_id = 0
        self._request_id = 0
        self._log: deque[tuple[int, str, object, object]] = deque(maxlen=self.opt.history_lines)
        self._digest = hashlib.sha256() if self.opt.trace else None
        self._handlers: dict[str, Callable[[object, object], None]] = {
            TICK: self._on_tick,
            DELIVER: self._on_deliver,
            PERSIST: self._on_persist,
            CRASH: self._on_crash,
            RESTART: self._on_restart,
            FAULT_START: self._on_fault_start,
            FAULT_END: self._on_fault_end,
            CLIENT: self._on_client,
            OP_TIMEOUT: self._on_op_timeout,
            OPERATOR: self._on_operator,
            HEAL: self._on_heal,
            LIVENESS: self._on_liveness,
        }

    # =====================================================================================
    # Running
    # =====================================================================================
    def run(self) -> SimResult:
        """Run the seed to convergence and check the history; raises SimFailure."""
        with self.reporting():
            self.start()
            self._loop(self.deadline_us)
            if self.converged_us is None:
                raise InvariantViolation(self._liveness_report())
            self.finish()
        return self.result()

    @contextmanager
    def reporting(self) -> Iterator[None]:
        """Turn a violation or an exception inside into a SimFailure with the report."""
        try:
            yield
        except InvariantViolation as e:
            raise self._failure(str(e)) from None
        except SimFailure:
            raise
        except Exception as e:  # the core (or the simulator) blew up: report it as a failure
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            raise self._failure(f"exception: {type(e).__name__}: {e}\n" + "".join(tb[-6:])) from e

    def start(self) -> None:
        for sn in self.nodes.values():
            self._boot(sn)
        for c in self.clients.values():
            self._at(self._ms(self.rng.uniform(0, 50)), CLIENT, c.cid)
        self._schedule_faults()
        if self.profile.conf_changes or self.profile.transfers:
            self._at(self._ms(self.rng.uniform(*self.profile.operator_gap_ms)), OPERATOR)
        self._at(self.heal_us, HEAL)

    def _loop(self, until_us: int, stop: Callable[[], bool] | None = None) -> None:
        heap = self._heap
        handlers = self._handlers
        stats = self.stats
        while heap and heap[0][0] <= until_us and self.converged_us is None:
            t, _, kind, a, b = heapq.heappop(heap)
            self.now = t
            stats.events += 1
            handlers[kind](a, b)
            if stop is not None and stop():
                return
        if self.converged_us is None:
            self.now = max(self.now, until_us)  # nothing happens until then

    def finish(self) -> None:
        """End the run: operations still waiting get an unknown outcome; check the history."""
        for sn in self.nodes.values():
            for op in list(sn.pending_writes.values()) + list(sn.pending_reads.values()):
                self._complete(op, Outcome.UNKNOWN)
            sn.pending_writes.clear()
            sn.pending_reads.clear()
        result = check_history(self.history)
        self.checked_operations = result.checked_operations
        if not result.ok:
            details = "\n".join(format_violation(v) for v in result.violations[:3])
            raise InvariantViolation(f"linearizability check failed:\n{details}")

    def result(self) -> SimResult:
        converged = self.converged_us if self.converged_us is not None else self.now
        return SimResult(
            seed=self.seed,
            profile=self.profile.name,
            nodes=self.n,
            virtual_ms=self.now / US_PER_MS,
            heal_ms=self.heal_us / US_PER_MS,
            converged_ms=max(0, converged - self.heal_us) / US_PER_MS,
            operations=len(self.history),
            checked_operations=self.checked_operations,
            digest=self._digest.hexdigest() if self._digest is not None else "",
            stats=self.stats,
        )

    # =====================================================================================
    # Scripting (targeted scenario tests)
    # =====================================================================================
    def run_for(self, ms: float) -> None:
        with self.reporting():
            self._loop(self.now + self._ms(ms))

    def run_until(self, condition: Callable[[], bool], within_ms: float, what: str) -> None:
        """Run until `condition` holds (checked after every event); fail after `within_ms`."""
        with self.reporting():
            if condition():
                return
            self._loop(self.now + self._ms(within_ms), condition)
            if not condition():
                raise InvariantViolation(f"scenario: not {what} within {within_ms} ms")

    def leader(self) -> SimNode | None:
        """The live leader with the highest term, if any."""
        return self._leader()

    def node(self, nid: NodeId) -> RaftNode:
        raft = self.nodes[nid].raft
        assert raft is not None, f"{nid} is down"
        return raft

    def act(self, nid: NodeId, action: Callable[[RaftNode], _T]) -> _T:
        """Call `action` on a live node's core (e.g. transfer_leader), then drive it."""
        with self.reporting():
            sn = self.nodes[nid]
            assert sn.raft is not None, f"{nid} is down"
            out = action(sn.raft)
            self._touch(sn)
            return out

    def cut(self, links: set[tuple[NodeId, NodeId]], description: str) -> int:
        """Start a network fault that blocks `links` until `mend(fault_id)`."""
        fid = self._next_fault_id
        self._next_fault_id += 1
        self._faults[fid] = Fault(fid, "scripted", frozenset(links), description)
        self._recompute_blocked()
        self._note("fault", None, f"fault #{fid} start: {description}")
        return fid

    def intercept(self, rewrite: Callable[[Message], Message | None], description: str) -> int:
        """Until `mend(id)`, every message sent goes through `rewrite`: it returns the
        message to deliver (itself, or a changed copy) or None to drop it."""
        fid = self._next_fault_id
        self._next_fault_id += 1
        self._filters[fid] = rewrite
        self._note("fault", None, f"fault #{fid} start: {description}")
        return fid

    def isolate(self, nid: NodeId) -> int:
        others = [x for x in self.ids if x != nid]
        links = {(nid, y) for y in others} | {(y, nid) for y in others}
        return self.cut(links, f"isolate {nid}")

    def mend(self, fault_id: int) -> None:
        self._on_fault_end(fault_id, None)

    def crash(self, nid: NodeId) -> None:
        with self.reporting():
            self._crash(self.nodes[nid], "scripted")

    def restart(self, nid: NodeId) -> None:
        with self.reporting():
            self._boot(self.nodes[nid])

    def submit(self, nid: NodeId, kind: str, key: str, value: str | None = None) -> ClientOp:
        """A one-off client operation at `nid` (its outcome lands in the history)."""
        cid = len(self.clients) + 1
        self.clients[cid] = Client(cid, scripted=True)
        with self.reporting():
            return self._issue(self.clients[cid], kind, key, value, nid)

    def heal_and_converge(self) -> SimResult:
        """Heal everything, wait for convergence, check the history."""
        with self.reporting():
            self.heal_us = self.now
            self._on_heal(None, None)
            self.deadline_us = self.now + self._ms(self.opt.liveness_bound_ms)
            self._loop(self.deadline_us)
            if self.converged_us is None:
                raise InvariantViolation(self._liveness_report())
            self.finish()
        return self.result()

    def _at(self, t_us: int, kind: str, a: object = None, b: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t_us, self._seq, kind, a, b))

    def _after(self, delay_ms: float, kind: str, a: object = None, b: object = None) -> None:
        self._at(self.now + self._ms(delay_ms), kind, a, b)

    @staticmethod
    def _ms(ms: float) -> int:
        return round(ms * US_PER_MS)

    # =====================================================================================
    # Nodes: boot, tick, drive the Ready loop, crash, restart
    # =====================================================================================
    def _new_machine(self) -> SimMachine:
        """The state machine a booting node starts from (tests/sim/leases.py: the KV one)."""
        return RegisterMachine()

    def _boot(self, sn: SimNode) -> None:
        boot, stored = load_boot_state(sn.storage, sn.snapshots, BASE_MEMBERSHIP)
        sm = self._new_machine()
        if stored is not None:
            sm.restore_chunks(sn.snapshots.chunks(stored), stored.meta.index)
        sn.sm = sm
        raft = RaftNode(sn.config, boot, random.Random(self.rng.getrandbits(64)),
                        snapshot_reader=chunk_reader(sn.snapshots),
                        snapshot_validator=sm.snapshot_decoder)
        sn.raft = raft
        sn.inflight = None
        sn.handler = ReadyHandler(
            node=raft,
            storage=sn.storage,
            snapshots=sn.snapshots,
            state_machine=sm,
            transport=_NodeTransport(self, sn),
            on_applied=lambda e, r: self._on_applied(sn, e, r),
            on_read=lambda rid, idx: self._on_read(sn, rid, idx),
            on_read_failed=lambda rid: self._on_read_failed(sn, rid),
        )
        sn.seen = (raft.role, raft.term, raft.leader)
        self.inv.on_persisted(sn)
        hs = boot.hard_state
        self._note(
            "boot", sn.id,
            f"term={hs.term} vote={hs.vote} commit={hs.commit} snapshot={boot.snapshot.meta.index}"
            f" entries={len(boot.entries)}",
        )
        self._at(self.now + self.rng.randrange(1, sn.tick_us), TICK, sn.id, sn.incarnation)
        self._touch(sn)

    def _touch(self, sn: SimNode) -> None:
        """After an event on a node: drive its Ready loop, then check the invariants."""
        self._pump(sn)
        raft = sn.raft
        if raft is None:
            return
        seen = (raft.role, raft.term, raft.leader)
        if seen != sn.seen:
            sn.seen = seen
            self._note_role(sn, raft)
        self.inv.observe(sn)

    def _note_role(self, sn: SimNode, raft: RaftNode) -> None:
        if raft.role is Role.LEADER:
            self.stats.elections += 1
            self.stats.max_term = max(self.stats.max_term, raft.term)
            self._note("state", sn.id, f"became leader term={raft.term}")
            if not self.healed and self.rng.random() < self.profile.crash_new_leader:
                delay_ms = self.rng.uniform(*self.profile.new_leader_crash_ms)
                self._after(delay_ms, CRASH, sn.id, ("new leader", sn.incarnation))
        elif raft.role is Role.FOLLOWER:
            self._note("state", sn.id, f"follower term={raft.term} leader={raft.leader}")
        else:
            self._note("state", sn.id, f"became {raft.role.value} term={raft.term}")

    def _pump(self, sn: SimNode) -> None:
        for _ in range(100):
            raft, handler = sn.raft, sn.handler
            if raft is None or handler is None or sn.inflight is not None:
                return
            if not raft.has_ready():
                return
            rd = raft.ready()
            handler.begin(rd)
            if rd.must_sync or rd.snapshot is not None:
                sn.inflight = rd
                delay_us = self._ms(self.rng.uniform(*self.profile.fsync_ms))
                self._at(self.now + delay_us, PERSIST, sn.id, (sn.incarnation, rd))
                if not self.healed and self.rng.random() < self.profile.crash_during_persist:
                    when = self.now + self.rng.randrange(0, delay_us + 1)
                    self._at(when, CRASH, sn.id, ("during persist", sn.incarnation))
                return
            handler.persist(rd)
            handler.finish(rd)
            self._after_finish(sn)
        raise AssertionError(f"{sn.id}: the Ready loop did not settle")

    def _on_persist(self, nid: object, payload: object) -> None:
        sn = self.nodes[str(nid)]
        incarnation, rd = cast(tuple[int, Ready], payload)
        if sn.incarnation != incarnation or sn.handler is None:
            return
        if (rd.snapshot is not None and not self.healed
                and self.rng.random() < self.profile.crash_mid_snapshot):
            sn.storage.power_cut_on_next_save = True
        try:
            sn.handler.persist(rd)
        except PowerCut:
            # The snapshot is published, the log it replaces is not reset: boot sorts it out.
            self.stats.persist_crashes += 1
            self._crash(sn, "power cut between publishing a snapshot and saving the log")
            self._after(self.rng.uniform(*self.profile.downtime_ms), RESTART, sn.id,
                        sn.incarnation)
            return
        self._note("persist", sn.id, rd)
        self.inv.on_persisted(sn)
        sn.inflight = None
        if rd.snapshot is not None:
            self.stats.snapshots_installed += 1
        sn.handler.finish(rd)
        self._after_finish(sn)
        self._touch(sn)

    def _after_finish(self, sn: SimNode) -> None:
        """Take a snapshot now and then, and compact the log behind it."""
        raft = sn.raft
        if not sn.snapshot_every or raft is None:
            return
        index = sn.sm.applied_index
        # The runtime's policy (raftkv.runtime.driver): trailing + 1 keeps the entry at the
        # snapshot's index too, as this simulator always has.
        policy = SnapshotPolicy(sn.snapshot_every, self.profile.trailing + 1)
        if not policy.should_snapshot(index, raft.snapshot_meta.index, raft.sending_snapshot):
            return
        term = raft.log.term(index)
        assert term is not None, f"{sn.id}: no term for applied index {index}"
        meta = SnapshotMeta(index, term, raft.membership_at(index))
        sink = sn.snapshots.create(meta)
        for chunk in sn.sm.snapshot_chunks():
            sink.write(chunk)
        stored = sink.close()
        keep_from = policy.compact_before(index, raft.compaction_hold())
        raft.compact(stored, keep_from)
        sn.storage.compact(keep_from)
        self.stats.snapshots_taken += 1
        self._note("snapshot", sn.id, f"snapshot at {index}/{term}, log kept from {keep_from}")

    def _on_tick(self, nid: object, incarnation: object) -> None:
        sn = self.nodes[str(nid)]
        if sn.incarnation != incarnation or sn.raft is None:
            return
        self._at(self.now + sn.tick_us, TICK, nid, incarnation)
        sn.raft.tick()
        self._touch(sn)

    def _on_crash(self, target: object, detail: object) -> None:
        if self.healed:
            return
        if target == "schedule":
            self._random_crash()
            return
        sn = self.nodes[str(target)]
        reason, incarnation = cast(tuple[str, int], detail)
        if sn.incarnation != incarnation or sn.raft is None:
            return
        if reason == "during persist":
            self.stats.persist_crashes += 1
        self._crash(sn, reason)
        self._after(self.rng.uniform(*self.profile.downtime_ms), RESTART, sn.id, sn.incarnation)

    def _random_crash(self) -> None:
        alive = [sn for sn in self.nodes.values() if sn.alive]
        if alive and self.rng.random() < self.profile.whole_cluster_restart:
            self.stats.whole_cluster_restarts += 1
            self._note("fault", None, "whole-cluster crash")
            for sn in alive:
                self._crash(sn, "whole cluster")
                self._after(self.rng.uniform(*self.profile.downtime_ms), RESTART, sn.id,
                            sn.incarnation)
            return
        leader = self._leader()
        if leader is not None and self.rng.random() < self.profile.crash_leader:
            victim: SimNode | None = leader
        else:
            victim = self.rng.choice(alive) if alive else None
        if victim is not None:
            self._crash(victim, "random")
            self._after(self.rng.uniform(*self.profile.downtime_ms), RESTART, victim.id,
                        victim.incarnation)

    def _crash(self, sn: SimNode, reason: str) -> None:
        self.stats.crashes += 1
        lost = " (a persist was in flight)" if sn.inflight is not None else ""
        self._note("crash", sn.id, f"crash ({reason}){lost}")
        sn.raft = None
        sn.handler = None
        sn.inflight = None
        sn.storage.crash()
        sn.snapshots.crash()
        sn.incarnation += 1
        for op in list(sn.pending_writes.values()) + list(sn.pending_reads.values()):
            self._complete(op, Outcome.UNKNOWN)
        sn.pending_writes.clear()
        sn.pending_reads.clear()

    def _on_restart(self, nid: object, incarnation: object) -> None:
        sn = self.nodes[str(nid)]
        if sn.incarnation != incarnation or sn.alive:
            return
        self._boot(sn)

    # =====================================================================================
    # Network
    # =====================================================================================
    def _send(self, sn: SimNode, messages: Sequence[Message]) -> None:
        rng = self.rng
        lo, hi = self.profile.delay_ms
        for sent in messages:
            self.inv.on_send(sn, sent)
            self.stats.messages_sent += 1
            if sent.to == sent.frm:
                self._at(self.now, DELIVER, sent)
                continue
            if (sent.frm, sent.to) in self._blocked:
                self._drop(sent, "partition")
                continue
            m = self._intercept(sent) if self._filters else sent
            if m is None:
                continue
            if self.loss and rng.random() < self.loss:
                self._drop(m, "loss")
                continue
            self._at(self.now + self._ms(rng.uniform(lo, hi)), DELIVER, m)
            if self.dup and rng.random() < self.dup:
                self._at(self.now + self._ms(rng.uniform(lo, hi)), DELIVER, m)

    def _intercept(self, m: Message) -> Message | None:
        for f in self._filters.values():
            out = f(m)
            if out is None:
                self._drop(m, "filter")
                return None
            if out is not m:
                self._note("rewrite", m, out)
            m = out
        return m

    def _drop(self, m: Message, reason: str) -> None:
        self.stats.messages_dropped += 1
        self._note("drop", reason, m)

    def _on_deliver(self, msg: object, _: object) -> None:
        m: Message = msg  # type: ignore[assignment]
        sn = self.nodes.get(m.to)
        if sn is None or sn.raft is None:
            return
        if (m.frm, m.to) in self._blocked:
            self._drop(m, "partition")
            return
        self._note("deliver", None, m)
        sn.raft.step(m)
        self._touch(sn)

    def _schedule_faults(self) -> None:
        p = self.profile
        if p.partitions:
            # One network fault at a time: each starts a gap after the previous one ended.
            t = self.rng.uniform(*p.partition_gap_ms)
            while self._ms(t) < self.heal_us:
                length = self.rng.uniform(*p.partition_length_ms)
                self._at(self._ms(t), FAULT_START, self.rng.choice(p.partitions), length)
                t += length + self.rng.uniform(*p.partition_gap_ms)
        if p.crash_gap_ms is not None:
            t = self.rng.uniform(*p.crash_gap_ms)
            while self._ms(t) < self.heal_us:
                self._at(self._ms(t), CRASH, "schedule")
                t += self.rng.uniform(*p.crash_gap_ms)

    def _on_fault_start(self, kind: object, length_ms: object) -> None:
        if self.healed:
            return
        fault = self._make_fault(str(kind))
        self._faults[fault.fault_id] = fault
        self._recompute_blocked()
        self._note("fault", None, f"fault #{fault.fault_id} start: {fault.description}")
        assert isinstance(length_ms, float)
        self._after(length_ms, FAULT_END, fault.fault_id)

    def _make_fault(self, kind: str) -> Fault:
        rng = self.rng
        ids = self.ids
        fid = self._next_fault_id
        self._next_fault_id += 1
        blocked: set[tuple[NodeId, NodeId]] = set()
        if kind == "symmetric":
            shuffled = ids[:]
            rng.shuffle(shuffled)
            k = rng.randint(1, len(ids) // 2)
            a, b = sorted(shuffled[:k]), sorted(shuffled[k:])
            blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
            desc = f"partition {a} | {b}"
        elif kind == "one_way":
            x = rng.choice(ids)
            others = [y for y in ids if y != x]
            targets = sorted(rng.sample(others, rng.randint(1, len(others))))
            if rng.random() < 0.5:
                blocked = {(x, y) for y in targets}
                desc = f"one-way: {x} cannot send to {targets}"
            else:
                blocked = {(y, x) for y in targets}
                desc = f"one-way: {targets} cannot send to {x}"
        else:
            leader = self._leader() if kind == "isolate_leader" else None
            x = leader.id if leader is not None else rng.choice(ids)
            blocked = {(x, y) for y in ids if y != x} | {(y, x) for y in ids if y != x}
            desc = f"isolate {'leader ' if leader is not None else ''}{x}"
        return Fault(fid, kind, frozenset(blocked), desc)

    def _on_fault_end(self, fault_id: object, _: object) -> None:
        fid = int(fault_id)  # type: ignore[call-overload]
        if self._filters.pop(fid, None) is not None:
            self._note("fault", None, f"fault #{fid} end")
        fault = self._faults.pop(fid, None)
        if fault is not None:
            self._recompute_blocked()
            self._note("fault", None, f"fault #{fault.fault_id} end")

    def _recompute_blocked(self) -> None:
        blocked: set[tuple[NodeId, NodeId]] = set()
        for f in self._faults.values():
            blocked |= f.blocked
        self._blocked = frozenset(blocked)

    def _on_heal(self, _a: object, _b: object) -> None:
        self.healed = True
        self._faults.clear()
        self._filters.clear()
        self._blocked = frozenset()
        self.loss = self.dup = 0.0
        self._note("fault", None, "heal: partitions removed, loss off, every node restarts")
        for sn in self.nodes.values():
            if not sn.alive:
                self._boot(sn)
        self._after(self.opt.liveness_check_ms, LIVENESS)

    # =====================================================================================
    # Clients
    # =====================================================================================
    def _on_client(self, cid: object, _: object) -> None:
        c = self.clients[cid]  # type: ignore[index]
        if self.healed:
            return
        p, rng = self.profile, self.rng
        r = rng.random()
        kind = "read" if r < p.read_ratio else "delete" if r < p.read_ratio + p.delete_ratio \
            else "write"
        key = f"k{rng.randrange(p.keys)}"
        if c.leader_guess is not None and rng.random() < p.follow_leader:
            nid = c.leader_guess
        else:
            nid = rng.choice(self.ids)
        value = f"c{c.cid}.{c.seq + 1}" if kind == "write" else None
        self._issue(c, kind, key, value, nid)

    def _issue(
        self, c: Client, kind: str, key: str, value: str | None, nid: NodeId
    ) -> ClientOp:
        c.seq += 1
        op = ClientOp(c.cid, kind, key, value, nid, self.now, c.seq)
        c.op = op
        sn = self.nodes[nid]
        raft = sn.raft
        if raft is None:
            self._note("client", nid, f"c{c.cid} {kind} {key}: node is down")
            c.leader_guess = None
            self._complete(op, Outcome.FAILED)
            return op
        if kind == "read":
            self._request_id += 1
            op.request_id = self._request_id
            op.commit_at_invoke = self.inv.max_commit
            sn.pending_reads[op.request_id] = op
            self._note("client", nid, f"c{c.cid} read {key} rid={op.request_id}")
            raft.read_index(op.request_id)
        else:
            self._op_id += 1
            op.op_id = self._op_id
            cmd = Command(op.op_id, PUT if kind == "write" else DELETE, key, value)
            try:
                op.index = raft.propose(encode_command(cmd))
            except NotLeader as e:
                c.leader_guess = e.leader
                self._complete(op, Outcome.FAILED)
            except ProposalDropped:
                self._complete(op, Outcome.FAILED)
            else:
                stale = sn.pending_writes.pop(op.index, None)
                if stale is not None:  # its entry was truncated away: the index is reused
                    self._complete(stale, Outcome.UNKNOWN)
                sn.pending_writes[op.index] = op
                self._note("client", nid,
                           f"c{c.cid} {kind} {key}={value} op={op.op_id} index={op.index}")
        if c.op is op:
            self._after(self.profile.op_timeout_ms, OP_TIMEOUT, c.cid, op.seq)
        self._touch(sn)
        return op

    def _on_op_timeout(self, cid: object, seq: object) -> None:
        c = self.clients[cid]  # type: ignore[index]
        op = c.op
        if op is None or op.seq != seq:
            return
        sn = self.nodes[op.node]
        if op.kind == "read":
            sn.pending_reads.pop(op.request_id, None)
        elif sn.pending_writes.get(op.index) is op:
            del sn.pending_writes[op.index]
        self._complete(op, Outcome.UNKNOWN)

    def _on_applied(self, sn: SimNode, entry: Entry, result: object) -> None:
        self.inv.on_applied(sn.id, entry, sn.sm)
        op = sn.pending_writes.pop(entry.index, None)
        if op is not None:
            assert isinstance(result, Applied)
            self._complete(op, Outcome.OK if result.op_id == op.op_id else Outcome.UNKNOWN)

    def _on_read(self, sn: SimNode, request_id: int, index: int) -> None:
        op = sn.pending_reads.pop(request_id, None)
        if op is None:
            return  # timed out already, or a duplicated answer
        self.inv.on_read(sn.id, request_id, index, op.commit_at_invoke)
        sm = sn.sm
        assert isinstance(sm, RegisterMachine), "register reads are served by registers"
        op.value = sm.values.get(op.key)
        self._complete(op, Outcome.OK)

    def _on_read_failed(self, sn: SimNode, request_id: int) -> None:
        op = sn.pending_reads.pop(request_id, None)
        if op is not None:
            self._complete(op, Outcome.FAILED)

    def _complete(self, op: ClientOp, outcome: Outcome) -> None:
        c = self.clients[op.client]
        if c.op is not op:
            return
        c.op = None
        op.outcome = outcome
        complete = None if outcome is Outcome.UNKNOWN else self.now
        self.history.append(
            Operation(op.client, op.kind, op.key, op.value, op.invoke_us, complete, outcome)
        )
        self.stats.outcomes[outcome.name] = self.stats.outcomes.get(outcome.name, 0) + 1
        value = f"={op.value}" if op.kind != "delete" else ""
        self._note("client", op.node, f"c{op.client} {op.kind} {op.key}{value} -> {outcome.name}")
        if not self.healed and not c.scripted:
            pause = self.profile.backoff_ms if outcome is Outcome.FAILED else self.profile.think_ms
            self._after(self.rng.uniform(*pause), CLIENT, c.cid)

    # =====================================================================================
    # Operator: membership changes and leader transfers
    # =====================================================================================
    def _on_operator(self, _a: object, _b: object) -> None:
        if self.healed:
            return
        p = self.profile
        self._after(self.rng.uniform(*p.operator_gap_ms), OPERATOR)
        leader = self._leader()
        if leader is None or leader.raft is None:
            return
        raft = leader.raft
        actions = (["conf"] if p.conf_changes else []) + (["transfer"] if p.transfers else [])
        action = self.rng.choice(actions)
        if action == "conf":
            self._change_membership(leader, raft)
        else:
            voters = sorted(raft.membership.voters - {leader.id})
            if voters:
                to = self.rng.choice(voters)
                self.stats.transfers += 1
                try:
                    raft.transfer_leader(to)
                    self._note("operator", leader.id, f"transfer leadership to {to}")
                except RaftError as e:
                    self.stats.transfers_rejected += 1
                    self._note("operator", leader.id, f"transfer to {to} refused: {e}")
        self._touch(leader)

    def _change_membership(self, leader: SimNode, raft: RaftNode) -> None:
        m = raft.membership
        outside = sorted(nid for nid in self.ids if nid not in m.voters)
        rng = self.rng
        if outside and (len(m.voters) <= 2 or rng.random() < 0.6):
            # As the service does it: a new node joins as a learner and a learner is promoted
            # (the core refuses to promote one that has not caught up: strict reconfiguration).
            target = rng.choice(outside)
            op = ConfChangeOp.ADD_VOTER if target in m.learners else ConfChangeOp.ADD_LEARNER
            change = ConfChange(op, target)
        elif len(m.voters) > 2 and (self.n == 3 or len(m.voters) > 3):
            voters = sorted(m.voters)
            target = leader.id if rng.random() < 0.15 else rng.choice(voters)
            change = ConfChange(ConfChangeOp.REMOVE, target)
        else:
            return
        self.stats.conf_changes += 1
        try:
            index = raft.propose_conf_change(change)
            self._note("operator", leader.id,
                       f"propose {change.op.name} {change.node_id} at index {index}")
            name = change.op.name
            self.stats.conf_changes_proposed[name] = self.stats.conf_changes_proposed.get(name,
                                                                                          0) + 1
        except (ConfChangeRejected, NotLeader, ProposalDropped) as e:
            self.stats.conf_changes_rejected += 1
            self._note("operator", leader.id,
                       f"{change.op.name} {change.node_id} rejected: {e}")

    # =====================================================================================
    # Liveness after the heal
    # =====================================================================================
    def _leader(self) -> SimNode | None:
        """The live leader with the highest term, if any."""
        best: SimNode | None = None
        for sn in self.nodes.values():
            raft = sn.raft
            if raft is not None and raft.role is Role.LEADER and (
                best is None or best.raft is None or raft.term > best.raft.term
            ):
                best = sn
        return best

    def _on_liveness(self, _a: object, _b: object) -> None:
        if self._converged():
            self.converged_us = self.now
            self._note("state", None, "converged")
        else:
            self._after(self.opt.liveness_check_ms, LIVENESS)

    def _converged(self) -> bool:
        leader = self._leader()
        if leader is None or leader.raft is None:
            return False
        lr = leader.raft
        members = lr.membership.members
        for nid in sorted(members):
            sn = self.nodes.get(nid)
            if sn is None or sn.raft is None or sn.inflight is not None:
                return False
            r = sn.raft
            if r.term != lr.term or (nid in lr.membership.voters and r.leader != leader.id):
                return False
            if (r.log.last_index(), r.log.commit) != (lr.log.last_index(), lr.log.commit):
                return False
            if r.log.commit != r.log.last_index() or sn.sm.applied_index != r.log.commit:
                return False
            if sn.sm.values != leader.sm.values or sn.sm.chain != leader.sm.chain:
                return False
        return True

    def _liveness_report(self) -> str:
        lines = [
            f"liveness: the cluster did not converge within {self.opt.liveness_bound_ms:.0f} ms "
            f"of virtual time after the heal at t={self.heal_us / 1e6:.3f}",
        ]
        for sn in self.nodes.values():
            r = sn.raft
            if r is None:
                lines.append(f"  {sn.id}: down")
                continue
            lines.append(
                f"  {sn.id}: {r.role.value} term={r.term} leader={r.leader} "
                f"last={r.log.last_index()} commit={r.log.commit} applied={sn.sm.applied_index} "
                f"voters={sorted(r.membership.voters)} learners={sorted(r.membership.learners)}"
            )
        return "\n".join(lines)

    # =====================================================================================
    # Event log and failure report
    # =====================================================================================
    def _note(self, kind: str, a: object, b: object) -> None:
        record = (self.now, kind, a, b)
        self._log.append(record)
        if self._digest is not None:
            self._digest.update(_format_record(record).encode())
            self._digest.update(b"\n")

    def _failure(self, violation: str) -> SimFailure:
        lines = [
            f"SIM FAILURE seed={self.seed} profile={self.profile.name} nodes={self.n}",
            violation,
            f"last {len(self._log)} events (virtual time in seconds):",
        ]
        lines += ["  " + _format_record(r) for r in self._log]
        lines.append(f"replay: {self.replay_hint}")
        return SimFailure("\n".join(lines))


# =========================================================================================
# Formatting
# =========================================================================================
def _format_record(record: tuple[int, str, object, object]) -> str:
    t, kind, a, b = record
    ts = f"t={t / 1e6:.6f}"
    if kind == "deliver":
        return f"{ts} {describe_message(b)}"  # type: ignore[arg-type]
    if kind == "drop":
        return f"{ts} DROP ({a}) {describe_message(b)}"  # type: ignore[arg-type]
    if kind == "persist":
        return f"{ts} {a} persisted {describe_ready(b)}"  # type: ignore[arg-type]
    if kind == "rewrite":
        return (f"{ts} REWRITE {describe_message(a)}"  # type: ignore[arg-type]
                f" into {describe_message(b)}")  # type: ignore[arg-type]
    if a is None:
        return f"{ts} {b}"
    return f"{ts} {a} {b}"


def describe_ready(rd: Ready) -> str:
    parts = []
    if rd.hard_state is not None:
        hs = rd.hard_state
        parts.append(f"hs={hs.term}/{hs.vote}/{hs.commit}")
    if rd.snapshot is not None:
        parts.append(f"snapshot={rd.snapshot.meta.index}/{rd.snapshot.meta.term}")
    if rd.entries:
        parts.append(f"entries={rd.entries[0].index}..{rd.entries[-1].index}"
                     f" (terms {rd.entries[0].term}..{rd.entries[-1].term})")
    if rd.committed_entries:
        parts.append(f"apply={rd.committed_entries[0].index}..{rd.committed_entries[-1].index}")
    return " ".join(parts) or "-"


def describe_message(m: Message) -> str:
    head = f"{m.frm} -> {m.to} {type(m).__name__} term={m.term}"
    if isinstance(m, AppendRequest):
        span = f" [{m.entries[0].index}..{m.entries[-1].index}]" if m.entries else ""
        return (f"{head} prev={m.prev_index}/{m.prev_term} n={len(m.entries)}{span}"
                f" commit={m.commit}")
    if isinstance(m, AppendResponse):
        hint = f" hint={m.hint_index}/{m.hint_term}" if not m.success else ""
        return f"{head} {'ok' if m.success else 'reject'} index={m.index}{hint}"
    if isinstance(m, VoteRequest):
        flags = (" pre" if m.pre_vote else "") + (" transfer" if m.transfer else "")
        return f"{head} last={m.last_log_index}/{m.last_log_term}{flags}"
    if isinstance(m, VoteResponse):
        return f"{head} {'granted' if m.granted else 'rejected'}{' pre' if m.pre_vote else ''}"
    if isinstance(m, HeartbeatRequest):
        return f"{head} commit={m.commit} seq={m.read_seq}"
    if isinstance(m, HeartbeatResponse):
        return f"{head} seq={m.read_seq}"
    if isinstance(m, SnapshotRequest):
        done = " done" if m.done else ""
        return (f"{head} snap={m.meta.index}/{m.meta.term} off={m.offset} "
                f"len={len(m.data)}{done}")
    if isinstance(m, SnapshotResponse):
        return f"{head} snap={m.snapshot_index} next={m.next_offset}{' done' if m.done else ''}"
    if isinstance(m, ReadIndexRequest):
        return f"{head} ids={list(m.request_ids)}"
    if isinstance(m, ReadIndexResponse):
        return f"{head} ids={list(m.request_ids)} index={m.index}"
    assert isinstance(m, TimeoutNow)
    return head


# =========================================================================================
# Entry points
# =========================================================================================
def run_seed(
    seed: int,
    profile: Profile | None = None,
    nodes: int | None = None,
    options: SimOptions | None = None,
    replay_hint: str | None = None,
) -> SimResult:
    """Run one seed; raises SimFailure (an AssertionError) on any violation."""
    default_profile, default_nodes = profile_for_seed(seed)
    cluster = Cluster(
        seed,
        profile if profile is not None else default_profile,
        nodes if nodes is not None else default_nodes,
        options,
        replay_hint,
    )
    return cluster.run()
