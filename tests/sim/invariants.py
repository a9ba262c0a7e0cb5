"""Safety invariants the simulator checks after every event (and at some sends).

Raft's guarantees (paper §5, Figure 3) plus the durability rules of DESIGN.md:

- election safety: at most one leader per term, over the whole run (restarts included);
- log matching: one entry per (index, term) ever, and the same previous term behind it (with
  the first rule this gives the whole property by induction);
- a committed entry never changes: every node's committed prefix extends one canonical log;
- leader completeness: a new leader holds everything committed in earlier terms;
- state machine safety: every node applies the same entry at each index (and, by a running
  checksum of the applied entries, holds the same state at each applied index);
- term and vote never go backwards: per incarnation in memory, and on disk over the whole run;
- terms come from candidates: no node has a term no real (non-pre-vote) candidate reached;
- durability ("direct" checks, which look at the disks): a granted vote or an append
  acknowledgement leaves a node only once it is on disk; a leader sends nothing before its term
  and vote are on disk; an entry commits only once a majority of voters hold it on disk, and a
  leader's commit index moves only to an entry of its own term (§5.4.2); a ReadIndex read is
  served at an index at least the commit index known anywhere when it was requested.

The checker sees the nodes through `NodeView` and keeps shadows of what it saw last, so each
check only looks at what changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from raftkv.core import quorum
from raftkv.core.messages import (
    AppendRequest,
    AppendResponse,
    HeartbeatRequest,
    Message,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from raftkv.core.node import RaftNode
from raftkv.core.types import Entry, NodeId, Role
from snapshots.memory import MemorySnapshotStore
from storage.memory import MemoryRaftStorage

_LEADER_MESSAGES = (AppendRequest, HeartbeatRequest, SnapshotRequest, TimeoutNow)


class InvariantViolation(AssertionError):
    """A safety property does not hold."""


class ChainedMachine(Protocol):
    """A state machine that keeps a running checksum of what it applied (tests/sim/model.py)."""

    @property
    def applied_index(self) -> int: ...
    @property
    def chain(self) -> int: ...


class NodeView(Protocol):
    @property
    def id(self) -> NodeId: ...
    @property
    def incarnation(self) -> int: ...
    @property
    def raft(self) -> RaftNode | None: ...
    @property
    def storage(self) -> MemoryRaftStorage: ...
    @property
    def snapshots(self) -> MemorySnapshotStore: ...
    @property
    def sm(self) -> ChainedMachine: ...


@dataclass(slots=True)
class _Shadow:
    """What the checker saw of one node incarnation after the previous event."""

    incarnation: int = -1
    term: int = 0
    vote: NodeId | None = None
    role: Role = Role.FOLLOWER
    offset: int = 1
    entries: list[Entry] = field(default_factory=list)
    snapshot: tuple[int, int] = (0, 0)
    commit_checked: int = 0
    leader_commit: int = 0
    applied: int = 0


def _durable_snapshot_index(view: NodeView) -> int:
    metas = view.snapshots.list()
    return metas[0].index if metas else 0


class Invariants:
    def __init__(
        self,
        views: Mapping[NodeId, NodeView],
        *,
        direct_checks: bool = True,
        bootstrap_term: int = 0,
    ) -> None:
        self._views = views
        self.direct_checks = direct_checks
        self._shadows: dict[NodeId, _Shadow] = {nid: _Shadow() for nid in views}
        self.leaders: dict[int, NodeId] = {}
        """Every (term -> leader) seen."""
        self.max_real_term = bootstrap_term
        """The highest term any node reached as a real candidate or leader (or the term of
        the bootstrap log every initial member starts with)."""
        self._by_pos: dict[tuple[int, int], Entry] = {}
        self._prev_term: dict[tuple[int, int], int] = {}
        self._canon: dict[int, Entry] = {}
        """The canonical committed log (index -> entry), as far as any node held it."""
        self._canon_term: dict[int, int] = {}
        self._leader_commit_by_term: dict[int, int] = {}
        self.max_commit = 0
        """The highest commit index any node reached: committed for sure."""
        self._applied: dict[int, Entry] = {}
        self._chain: dict[int, int] = {}
        self._durable_hs: dict[NodeId, tuple[int, NodeId | None]] = {}

    # ---------------------------------------------------------------- per event
    def observe(self, view: NodeView) -> None:
        """Check one live node after an event that touched it."""
        node = view.raft
        if node is None:
            return
        sh = self._shadows[view.id]
        if sh.incarnation != view.incarnation:
            self._shadows[view.id] = sh = _Shadow(incarnation=view.incarnation)
            sh.term, sh.vote = node.term, node.vote
            sh.commit_checked = 0
        self._check_term_and_vote(view, node, sh)
        self._check_log(view, node, sh)
        self._check_leader(view, node, sh)
        self._check_applied_state(view, sh)
        sh.term, sh.vote, sh.role = node.term, node.vote, node.role

    def _check_term_and_vote(self, view: NodeView, node: RaftNode, sh: _Shadow) -> None:
        if node.term < sh.term:
            raise InvariantViolation(f"{view.id}: term went back from {sh.term} to {node.term}")
        if node.term == sh.term and sh.vote is not None and node.vote != sh.vote:
            raise InvariantViolation(
                f"{view.id}: vote changed within term {node.term}: {sh.vote} -> {node.vote}"
            )
        if node.role is Role.CANDIDATE or node.role is Role.LEADER:
            self.max_real_term = max(self.max_real_term, node.term)
        if node.term > self.max_real_term:
            raise InvariantViolation(
                f"{view.id}: has term {node.term}, but no node was ever a (non-pre-vote) "
                f"candidate beyond term {self.max_real_term}: a term was introduced without "
                "an election"
            )

    def _check_log(self, view: NodeView, node: RaftNode, sh: _Shadow) -> None:
        log = node.log
        cur: list[Entry] = log._entries
        off: int = log._offset
        old = sh.entries
        d = off - sh.offset
        n = len(old) - d
        if d >= 0 and 0 <= n <= len(cur) and (n == 0 or cur[:n] == old[d:]):
            start = n  # only new entries at the end (the common case)
        else:
            start = 0  # truncated, replaced or restored: check everything again
            sh.commit_checked = min(sh.commit_checked, off - 1)
        snap = (log.snapshot_index, log.snapshot_term)
        if start < len(cur) or snap != sh.snapshot:
            self._check_entries(view.id, cur, off, start, snap)
            sh.entries = list(cur)
            sh.offset = off
            if snap != sh.snapshot:
                self._check_canon_term(view.id, snap[0], snap[1], "snapshot")
                sh.snapshot = snap
        commit = log.commit
        if commit > sh.commit_checked:
            for i in range(max(sh.commit_checked + 1, off), commit + 1):
                self._check_committed(view.id, cur[i - off])
            sh.commit_checked = commit
            self.max_commit = max(self.max_commit, commit)

    def _check_entries(
        self, nid: NodeId, cur: list[Entry], off: int, start: int, snap: tuple[int, int]
    ) -> None:
        by_pos, prev_term = self._by_pos, self._prev_term
        for pos in range(start, len(cur)):
            e = cur[pos]
            i = off + pos
            if e.index != i:
                raise InvariantViolation(f"{nid}: log holds entry {e.index} at position {i}")
            key = (i, e.term)
            seen = by_pos.get(key)
            if seen is None:
                by_pos[key] = e
            elif seen is not e and seen != e:
                raise InvariantViolation(
                    f"log matching: two different entries at index {i} term {e.term}: "
                    f"{seen!r} and {nid} holds {e!r}"
                )
            if pos > 0:
                pt: int | None = cur[pos - 1].term
            elif i - 1 == snap[0]:
                pt = snap[1]
            else:
                pt = None
            if pt is not None:
                known = prev_term.get(key)
                if known is None:
                    prev_term[key] = pt
                elif known != pt:
                    raise InvariantViolation(
                        f"log matching: {nid} holds entry {i} term {e.term} after an entry of "
                        f"term {pt}, another log has it after term {known}"
                    )

    def _check_committed(self, nid: NodeId, e: Entry) -> None:
        c = self._canon.get(e.index)
        if c is None:
            self._canon[e.index] = e
            self._check_canon_term(nid, e.index, e.term, "committed entry")
        elif c is not e and c != e:
            raise InvariantViolation(
                f"committed entry changed: {nid} has {e!r} committed at index {e.index}, "
                f"the committed log has {c!r}"
            )

    def _check_canon_term(self, nid: NodeId, index: int, term: int, what: str) -> None:
        if index == 0:
            return
        known = self._canon_term.get(index)
        if known is None:
            self._canon_term[index] = term
        elif known != term:
            raise InvariantViolation(
                f"committed entry changed: {nid}'s {what} at index {index} has term {term}, "
                f"the committed log has term {known}"
            )

    def _check_leader(self, view: NodeView, node: RaftNode, sh: _Shadow) -> None:
        if node.role is not Role.LEADER:
            return
        term = node.term
        if sh.role is not Role.LEADER or sh.term != term:
            other = self.leaders.get(term)
            if other is not None and other != view.id:
                raise InvariantViolation(f"two leaders in term {term}: {other} and {view.id}")
            self.leaders[term] = view.id
            sh.leader_commit = node.log.commit
            self._check_leader_completeness(view.id, node)
        commit = node.log.commit
        if commit > sh.leader_commit:
            sh.leader_commit = commit
            if commit > self._leader_commit_by_term.get(term, 0):
                self._leader_commit_by_term[term] = commit
            if self.direct_checks:
                if node.log.term(commit) != term:
                    raise InvariantViolation(
                        f"{view.id} (leader, term {term}) advanced its commit index to {commit}, "
                        f"an entry of term {node.log.term(commit)}: a leader commits by counting "
                        "replicas only entries of its own term (§5.4.2, Figure 8)"
                    )
                self._check_commit_is_durable(view.id, node, commit)

    def _check_leader_completeness(self, nid: NodeId, node: RaftNode) -> None:
        earlier = [c for t, c in self._leader_commit_by_term.items() if t < node.term]
        c = max(earlier, default=0)
        if c == 0:
            return
        log = node.log
        if log.last_index() < c:
            raise InvariantViolation(
                f"leader completeness: {nid} became leader of term {node.term} with last index "
                f"{log.last_index()}, but index {c} was committed in an earlier term"
            )
        t = log.term(c)
        known = self._canon_term.get(c)
        if t is not None and known is not None and t != known:
            raise InvariantViolation(
                f"leader completeness: {nid} became leader of term {node.term} with term {t} "
                f"at index {c}, which was committed with term {known}"
            )

    def _check_commit_is_durable(self, nid: NodeId, node: RaftNode, commit: int) -> None:
        term = node.log.term(commit)
        holders = sorted(
            vid for vid in node.membership.voters
            if vid in self._views and (
                self._views[vid].storage.term(commit) == term
                or _durable_snapshot_index(self._views[vid]) >= commit
            )
        )
        if len(holders) < quorum.majority(node.membership.voters):
            raise InvariantViolation(
                f"{nid} (leader, term {node.term}) committed index {commit} (term {term}) but "
                f"only {holders or 'no voter'} of voters {sorted(node.membership.voters)} "
                "hold it on disk"
            )

    def _check_applied_state(self, view: NodeView, sh: _Shadow) -> None:
        sm = view.sm
        if sm.applied_index != sh.applied:
            sh.applied = sm.applied_index
            self._check_chain(view.id, sm)

    def _check_chain(self, nid: NodeId, sm: ChainedMachine) -> None:
        index = sm.applied_index
        if index == 0:
            return
        known = self._chain.get(index)
        if known is None:
            self._chain[index] = sm.chain
        elif known != sm.chain:
            raise InvariantViolation(
                f"state machine divergence: {nid} at applied index {index} has checksum "
                f"{sm.chain:#x}, another node had {known:#x}"
            )

    # ---------------------------------------------------------------- hooks
    def on_applied(self, nid: NodeId, entry: Entry, sm: ChainedMachine) -> None:
        seen = self._applied.get(entry.index)
        if seen is None:
            self._applied[entry.index] = entry
        elif seen is not entry and seen != entry:
            raise InvariantViolation(
                f"state machine safety: {nid} applied {entry!r} at index {entry.index}, "
                f"another node applied {seen!r}"
            )
        self._check_chain(nid, sm)

    def on_send(self, view: NodeView, m: Message) -> None:
        """A message leaves `view` (called for every message handed to the network)."""
        if isinstance(m, VoteRequest):
            if not m.pre_vote:
                self.max_real_term = max(self.max_real_term, m.term)
            return
        if not self.direct_checks or m.to == m.frm:
            return
        if isinstance(m, _LEADER_MESSAGES):
            hs = view.storage.hard_state()
            if hs.term < m.term or (hs.term == m.term and hs.vote != m.frm):
                raise InvariantViolation(
                    f"{m.frm} sends {type(m).__name__} as leader of term {m.term} but its disk "
                    f"holds term {hs.term} vote {hs.vote}: after a crash it could lead the "
                    "same term again"
                )
        elif isinstance(m, VoteResponse) and m.granted and not m.pre_vote:
            hs = view.storage.hard_state()
            if hs.term < m.term or (hs.term == m.term and hs.vote != m.to):
                raise InvariantViolation(
                    f"{m.frm} granted its vote to {m.to} in term {m.term} before persisting "
                    f"it (disk: term {hs.term} vote {hs.vote})"
                )
        elif isinstance(m, AppendResponse) and m.success and m.index > 0:
            st = view.storage
            if st.term(m.index) is None and _durable_snapshot_index(view) < m.index:
                raise InvariantViolation(
                    f"{m.frm} acknowledged entries up to {m.index} to {m.to} (term {m.term}) "
                    f"but its disk holds only [{st.first_index()}, {st.last_index()}] and "
                    f"snapshot {_durable_snapshot_index(view)}"
                )

    def on_persisted(self, view: NodeView) -> None:
        """The node's disk changed: the durable term and vote never go back."""
        hs = view.storage.hard_state()
        prev = self._durable_hs.get(view.id)
        if prev is not None:
            term, vote = prev
            if hs.term < term:
                raise InvariantViolation(
                    f"{view.id}: term on disk went back from {term} to {hs.term}"
                )
            if hs.term == term and vote is not None and hs.vote != vote:
                raise InvariantViolation(
                    f"{view.id}: vote on disk changed within term {term}: {vote} -> {hs.vote}"
                )
        self._durable_hs[view.id] = (hs.term, hs.vote)

    def on_read(self, nid: NodeId, request_id: int, index: int, commit_at_invoke: int) -> None:
        if self.direct_checks and index < commit_at_invoke:
            raise InvariantViolation(
                f"stale read: {nid} served read {request_id} at index {index}, but index "
                f"{commit_at_invoke} was already committed when the read was requested"
            )

    # ---------------------------------------------------------------- queries
    def committed_entry(self, index: int) -> Entry | None:
        return self._canon.get(index)

    def leader_of(self, term: int) -> NodeId | None:
        return self.leaders.get(term)
