"""A tiny deterministic network of RaftNodes for unit tests (etcd-io/raft's `network`).

No simulator, no clock, no randomness beyond a seeded `random.Random` per node: the test
decides which in-flight messages are delivered, dropped or held back, and when nodes tick.

Each node's Ready cycle is driven synchronously by `process()`, in the documented order:
send `messages` (into the in-flight queue), persist (into a `Disk`), apply committed entries
(into a list), advance. Before anything is persisted, `process()` checks that every
vote/append reply in `Ready.messages` is backed by what is already on that node's disk.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from raftkv.core import (
    AppendResponse,
    BootState,
    Config,
    Entry,
    HardState,
    Membership,
    Message,
    NodeId,
    RaftNode,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotValidator,
    VoteResponse,
)
from raftkv.core.snapshots import checksum_of

MessageFilter = Callable[[Message], bool]


@dataclass
class Disk:
    """What one node has persisted: what would survive a crash."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.meta.index if self.snapshot is not None else 0

    def persist(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = []
        if rd.entries:
            first = rd.entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state


@dataclass
class Peer:
    node: RaftNode
    disk: Disk
    applied: list[Entry] = field(default_factory=list)
    restored: list[Snapshot] = field(default_factory=list)
    installed_data: list[bytes] = field(default_factory=list)
    """The bytes of each snapshot restored, as staged from Ready.snapshot_writes."""
    staged: bytearray = field(default_factory=bytearray)
    discards: int = 0
    read_states: list[ReadState] = field(default_factory=list)
    failed_reads: list[int] = field(default_factory=list)
    readies: list[Ready] = field(default_factory=list)

    @property
    def applied_index(self) -> int:
        if self.applied:
            return self.applied[-1].index
        return self.restored[-1].meta.index if self.restored else 0


def unpersisted_replies(disk: Disk, messages: Iterable[Message]) -> list[Message]:
    """Vote/append replies in `messages` that reveal state `disk` does not hold yet."""
    bad: list[Message] = []
    hs = disk.hard_state
    for m in messages:
        if isinstance(m, VoteResponse) and not m.pre_vote:
            if m.term > hs.term or (m.granted and hs.vote != m.to):
                bad.append(m)
        elif isinstance(m, AppendResponse) and (
            m.term > hs.term or (m.success and m.index > disk.last_index())
        ):
            bad.append(m)
    return bad


def boot_state(
    voters: Iterable[NodeId],
    learners: Iterable[NodeId] = (),
    entries: Sequence[Entry] = (),
    hard_state: HardState | None = None,
) -> BootState:
    membership = Membership(frozenset(voters), frozenset(learners))
    return BootState(
        hard_state=hard_state or HardState(),
        snapshot=Snapshot(SnapshotMeta(0, 0, membership)),
        entries=tuple(entries),
    )


def log_of_terms(*terms: int) -> list[Entry]:
    """Entries 1..n with the given terms (no data)."""
    return [Entry(i, t) for i, t in enumerate(terms, start=1)]


class Network:
    """N nodes and the messages in flight between them; nothing moves unless the test says."""

    def __init__(
        self,
        voters: Sequence[NodeId],
        learners: Sequence[NodeId] = (),
        *,
        joining: Sequence[NodeId] = (),
        boot: Mapping[NodeId, BootState] | None = None,
        seed: int = 0,
        validator: SnapshotValidator | None = None,
        **config: int | bool,
    ) -> None:
        """Boot `voters` and `learners` as one cluster; `joining` nodes boot with the same
        membership without being in it (they wait to be added). `config` goes to every Config.
        Snapshots' bytes live in `snapshot_data` (see snapshot_of); `validator` is every
        node's snapshot validator.
        """
        self.peers: dict[NodeId, Peer] = {}
        self.snapshot_data: dict[str, bytes] = {}
        """checksum -> bytes: the one snapshot store every node reads its chunks from."""
        self.in_flight: list[Message] = []
        self.dropped: list[Message] = []
        self._cut: set[tuple[NodeId, NodeId]] = set()
        for n, nid in enumerate([*voters, *learners, *joining]):
            bs = (boot or {}).get(nid) or boot_state(voters, learners)
            cfg = Config(nid, **config)  # type: ignore[arg-type]
            node = RaftNode(cfg, bs, random.Random(seed * 1000 + n),
                            snapshot_reader=self._read_snapshot, snapshot_validator=validator)
            self.peers[nid] = Peer(node, Disk(bs.hard_state, bs.snapshot, list(bs.entries)))

    def snapshot_of(self, meta: SnapshotMeta, data: bytes) -> Snapshot:
        """Store `data` as the snapshot at `meta` (for compact()); returns what the core knows
        of it."""
        snapshot = Snapshot(meta, len(data), checksum_of(data))
        self.snapshot_data[snapshot.checksum] = data
        return snapshot

    def compact_at_applied(self, nid: NodeId, data: bytes) -> tuple[int, Snapshot]:
        """Store `data` as node `nid`'s snapshot at its applied index and compact its log up
        to there (a peer behind it then needs the snapshot); the index and the snapshot."""
        node = self.node(nid)
        applied = node.log.applied
        meta = SnapshotMeta(applied, node.log.term(applied) or 0, node.membership_at(applied))
        snapshot = self.snapshot_of(meta, data)
        node.compact(snapshot, keep_from=applied + 1)
        return applied, snapshot

    def _read_snapshot(self, snapshot: Snapshot, offset: int, size: int) -> bytes | None:
        data = self.snapshot_data.get(snapshot.checksum)
        return None if data is None else data[offset : offset + size]

    # -- access ------------------------------------------------------------------------------
    def node(self, nid: NodeId) -> RaftNode:
        return self.peers[nid].node

    def leader(self) -> NodeId | None:
        """The leader of the highest term, if there is one."""
        leaders = [p.node for p in self.peers.values() if p.node.role is Role.LEADER]
        return max(leaders, key=lambda n: n.term).id if leaders else None

    # -- the Ready cycle ---------------------------------------------------------------------
    def process(self, nid: NodeId) -> Ready | None:
        """Run one Ready cycle of `nid`: send, persist, apply, advance."""
        rd = self.send_ready(nid)
        if rd is not None:
            self.advance(nid, rd)
        return rd

    def send_ready(self, nid: NodeId) -> Ready | None:
        """First half of a cycle: take `nid`'s Ready and put its messages in flight."""
        p = self.peers[nid]
        if not p.node.has_ready():
            return None
        rd = p.node.ready()
        p.readies.append(rd)
        bad = unpersisted_replies(p.disk, rd.messages)
        assert not bad, f"{nid} sends replies before persisting what they reveal: {bad}"
        self.in_flight.extend(rd.messages)
        return rd

    def advance(self, nid: NodeId, rd: Ready) -> None:
        """Second half of a cycle: persist `rd`, apply it, and advance the node."""
        p = self.peers[nid]
        if rd.snapshot_discard:
            p.staged = bytearray()
            p.discards += 1
        for w in rd.snapshot_writes:
            if w.offset == 0:
                p.staged = bytearray()
            assert w.offset == len(p.staged), f"{nid}: snapshot chunk out of order"
            p.staged += w.data
        p.disk.persist(rd)
        if rd.snapshot is not None:
            assert checksum_of(bytes(p.staged)) == rd.snapshot.checksum
            p.restored.append(rd.snapshot)
            p.installed_data.append(bytes(p.staged))
            p.staged = bytearray()
            p.applied = []
        for e in rd.committed_entries:
            assert e.index == p.applied_index + 1, f"{nid}: {e.index} after {p.applied_index}"
            p.applied.append(e)
        p.read_states.extend(rd.read_states)
        p.failed_reads.extend(rd.failed_reads)
        self.in_flight.extend(m for m in rd.after_persist if m.to != nid)
        p.node.advance(rd)

    def process_all(self) -> None:
        """Run Ready cycles on every node until none has work left."""
        busy = True
        while busy:
            busy = False
            for nid in self.peers:
                while self.process(nid) is not None:
                    busy = True

    # -- the wire ----------------------------------------------------------------------------
    def send(self, *messages: Message) -> None:
        """Put hand-made messages in flight."""
        self.in_flight.extend(messages)

    def take(self, where: MessageFilter | None = None) -> list[Message]:
        """Remove the matching in-flight messages and return them, undelivered."""
        taken: list[Message] = []
        kept: list[Message] = []
        for m in self.in_flight:
            (taken if where is None or where(m) else kept).append(m)
        self.in_flight = kept
        return taken

    def deliver(self, where: MessageFilter | None = None) -> list[Message]:
        """Step the matching in-flight messages into their recipients (cut links drop them).

        Replies the recipients produce stay queued until their next `process()`.
        """
        delivered: list[Message] = []
        for m in self.take(where):
            if (m.frm, m.to) in self._cut or m.to not in self.peers:
                self.dropped.append(m)
                continue
            self.peers[m.to].node.step(m)
            delivered.append(m)
        return delivered

    def drop(self, where: MessageFilter | None = None) -> list[Message]:
        lost = self.take(where)
        self.dropped.extend(lost)
        return lost

    def stabilize(self, where: MessageFilter | None = None, max_rounds: int = 1000) -> None:
        """Process and deliver until no node has a Ready and no message is in flight.

        With `where`, only matching messages are delivered; the others stay in flight.
        """
        for _ in range(max_rounds):
            self.process_all()
            if not self.deliver(where) and not any(
                where is None or where(m) for m in self.in_flight
            ):
                return
        raise AssertionError(f"no quiescence after {max_rounds} rounds")

    # -- faults ------------------------------------------------------------------------------
    def cut(self, a: NodeId, b: NodeId) -> None:
        self._cut |= {(a, b), (b, a)}

    def isolate(self, nid: NodeId) -> None:
        for other in self.peers:
            if other != nid:
                self.cut(nid, other)

    def heal(self) -> None:
        self._cut.clear()

    # -- time --------------------------------------------------------------------------------
    def tick(self, nid: NodeId, ticks: int = 1) -> None:
        """Tick one node, without processing or delivering anything."""
        for _ in range(ticks):
            self.node(nid).tick()

    def run(self, ticks: int, nodes: Iterable[NodeId] | None = None) -> None:
        """`ticks` rounds of: tick every node (or `nodes`) once, then stabilize."""
        ids = list(self.peers if nodes is None else nodes)
        for _ in range(ticks):
            for nid in ids:
                self.node(nid).tick()
            self.stabilize()

    def heartbeat(self, nid: NodeId) -> None:
        """Tick the leader `nid` until it sends heartbeats (which carry the commit index to
        the followers), then stabilize."""
        node = self.node(nid)
        self.tick(nid, node.config.heartbeat_interval_ticks)
        self.stabilize()

    def elect(self, nid: NodeId) -> None:
        """Make `nid` campaign now and let the cluster settle; it must win."""
        self.node(nid).campaign()
        self.stabilize()
        assert self.leader() == nid, f"{nid} did not win: leader is {self.leader()}"


def between(frm: NodeId | None = None, to: NodeId | None = None,
            kind: type | tuple[type, ...] | None = None) -> MessageFilter:
    """A message filter: from `frm`, to `to`, of type `kind` (each optional)."""

    def match(m: Message) -> bool:
        return ((frm is None or m.frm == frm) and (to is None or m.to == to)
                and (kind is None or isinstance(m, kind)))

    return match
