"""Raft as a pure state machine (etcd-io/raft's RawNode, in Python).

Inputs: tick(), step(message), propose(data), propose_conf_change(change),
read_index(request_id), transfer_leader(to), compact(snapshot, keep_from).
Output: ready() -> Ready, handled by the driver, then advance(ready).

No sockets, threads, clocks, files or third-party imports: time is tick(), randomness is an
injected random.Random, and everything that must reach the disk first is in the Ready.
Steps may be taken between ready() and advance() (the driver may persist asynchronously);
at most one Ready is outstanding at a time.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from raftkv.core import quorum
from raftkv.core.config import Config
from raftkv.core.errors import (
    ConfChangeRejected,
    NotLeader,
    ProposalDropped,
    ProposalTooLarge,
    RaftError,
)
from raftkv.core.log import RaftLog
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
from raftkv.core.progress import Progress, ProgressState
from raftkv.core.ready import BootState, Ready
from raftkv.core.snapshots import (
    SnapshotDecoder,
    SnapshotReader,
    SnapshotValidator,
    SnapshotWrite,
    is_checksum,
)
from raftkv.core.snapshots import (
    new_hasher as new_snapshot_hasher,
)
from raftkv.core.types import (
    ENTRY_HEAD_BYTES,
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    HardState,
    Membership,
    NodeId,
    ReadState,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)

MAX_READ_IDS = 65_536
"""Read ids in one ReadIndex message: a follower sends one turn's reads in as few messages as
that takes; the node that receives a ReadIndex message (request or response) holding more
drops it whole, answering none of its ids (_malformed)."""


@dataclass(frozen=True, slots=True)
class PeerStatus:
    match: int
    next: int
    state: str
    recent_active: bool
    caught_up: bool = False
    """Started and caught up, as the strict reconfiguration check counts it (caught_up)."""


@dataclass(frozen=True, slots=True)
class Status:
    node_id: NodeId
    role: Role
    term: int
    vote: NodeId | None
    leader: NodeId | None
    commit_index: int
    applied_index: int
    last_index: int
    stable_index: int
    snapshot_index: int
    membership: Membership
    peers: dict[NodeId, PeerStatus]
    transferring_to: NodeId | None


@dataclass(slots=True)
class _PendingRead:
    request_id: int
    origin: NodeId | None  # None: this node's own client
    index: int
    seq: int


@dataclass(slots=True)
class _IncomingSnapshot:
    meta: SnapshotMeta
    length: int
    checksum: str
    hasher: hashlib.blake2b
    decoder: SnapshotDecoder | None
    received: int = 0


class RaftNode:
    def __init__(self, config: Config, boot: BootState, rng: random.Random, *,
                 snapshot_reader: SnapshotReader | None = None,
                 snapshot_validator: SnapshotValidator | None = None) -> None:
        """`snapshot_reader` reads chunks of this node's snapshots (without one it cannot send
        a snapshot); `snapshot_validator` checks the format of incoming ones (without one,
        only their size and checksum are checked). See raftkv.core.snapshots."""
        self.config = config
        self._read_snapshot = snapshot_reader
        self._snapshot_validator = snapshot_validator
        self._snapshot_backoff = config.snapshot_backoff_ticks or config.election_timeout_ticks
        self.id: NodeId = config.node_id
        self._rng = rng
        hs = boot.hard_state
        meta = boot.snapshot.meta
        self.log = RaftLog(meta.index, meta.term, boot.entries, hs.commit, boot.applied)
        self._snapshot = boot.snapshot
        self.term = hs.term
        self.vote: NodeId | None = hs.vote
        self.role = Role.FOLLOWER
        self.leader: NodeId | None = None
        # Membership takes effect when its entry is appended (Raft dissertation §4.1):
        # _base_membership holds at the snapshot; _conf_entries are changes after it.
        self._base_membership = meta.membership
        self._conf_entries: list[tuple[int, Membership]] = []
        self.membership = meta.membership
        self._scan_conf_entries(meta.index + 1)
        self._pending_conf_index = 0

        self._progress: dict[NodeId, Progress] = {}
        self._votes: dict[NodeId, bool] = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = config.election_timeout_ticks
        self._lead_transferee: NodeId | None = None

        self._outbox: list[Message] = []
        self._after_persist: list[Message] = []
        self._append_pending = False  # new entries or commit to broadcast (lazily, batched)
        self._heartbeat_pending = False  # a read needs a fresh quorum confirmation

        self._read_seq = 0
        self._pending_reads: list[_PendingRead] = []
        self._reads_waiting_for_term_commit: list[tuple[int, NodeId | None]] = []
        self._forward_reads: list[int] = []
        self._read_states: list[ReadState] = []
        self._failed_reads: list[int] = []
        self._dropped: list[str] = []

        self._incoming_snapshot: _IncomingSnapshot | None = None
        self._snapshot_to_install: Snapshot | None = None
        self._snapshot_state: object = None
        self._snapshot_writes: list[SnapshotWrite] = []
        self._snapshot_discard = False

        self._prev_hard_state = HardState(self.term, self.vote, self.log.commit)
        self._prev_soft_state = SoftState(self.role, self.leader, self.term)
        self._outstanding: int | None = None
        self._ready_serial = 0
        self._reset_election_timeout()

    # =====================================================================================
    # Inputs
    # =====================================================================================
    def tick(self) -> None:
        """One unit of logical time has passed."""
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (tests, or a single-node bootstrap)."""
        if self.role is not Role.LEADER and self._promotable():
            self._campaign(transfer=False)

    def propose(self, data: bytes) -> int:
        """Append client data to the leader's log; returns its index (not yet committed).
        ProposalTooLarge if its entry would be over Config.max_entry_bytes."""
        self._check_can_propose()
        entry = Entry(self.log.last_index() + 1, self.term, EntryKind.NORMAL, data)
        self._check_entry_size(entry.size_bytes)
        self._append_entry(entry)
        return entry.index

    def check_proposal_size(self, data: bytes) -> None:
        """ProposalTooLarge if `propose(data)` would raise it, on any node (a follower refuses
        such a command before it forwards it to the leader). Once per proposal: a length
        check, no Entry made."""
        self._check_entry_size(len(data) + ENTRY_HEAD_BYTES)

    def propose_conf_change(self, change: ConfChange) -> int:
        """Propose a single-server membership change; returns its index. ProposalTooLarge if
        its entry would be over Config.max_entry_bytes."""
        self._check_can_propose()
        entry = Entry(self.log.last_index() + 1, self.term, EntryKind.CONF_CHANGE, change=change)
        self._check_entry_size(entry.size_bytes)
        if self.log.term(self.log.commit) != self.term:
            raise ConfChangeRejected("the leader has not committed an entry in its term yet",
                                     transient=True)
        if self._pending_conf_index > self.log.commit:
            raise ConfChangeRejected("another membership change is still uncommitted",
                                     transient=True)
        try:
            new = self.membership.apply(change)
        except ValueError as e:
            raise ConfChangeRejected(str(e)) from None
        self._check_strict_reconfiguration(change, new)
        if not self.membership.has_room_for(change.node_id, self.config.max_members):
            limit = self.config.max_members
            raise ConfChangeRejected(
                f"adding {change.node_id} would make {len(new.members)} members (voters and "
                f"learners), more than the cluster's limit of {limit}: remove "
                f"{len(new.members) - limit} first")
        self._append_entry(entry)
        return entry.index

    def caught_up(self, nid: NodeId) -> bool:
        """Whether this leader counts `nid` as started and caught up (strict reconfiguration).

        The leader itself always is. Any other member is when both hold:
        - started: the leader heard from it (any response) within the last election timeout
          (`election_timeout_ticks` of the leader's ticks), and
        - caught up: its log is known to match the leader's up to the leader's commit index
          (progress `match` >= commit).
        A member that never answered this leader has match 0, so it is never caught up, even
        right after an election (when check-quorum still counts every peer as active).
        """
        if nid == self.id:
            return self.role is Role.LEADER
        pr = self._progress.get(nid)
        return self._started(nid) and pr is not None and pr.match >= self.log.commit

    def _started(self, nid: NodeId) -> bool:
        """The leader heard from `nid` within the last election timeout (or is `nid`)."""
        if self.role is not Role.LEADER:
            return False
        pr = self._progress.get(nid)
        return nid == self.id or (
            pr is not None and pr.idle_ticks < self.config.election_timeout_ticks)

    def _check_strict_reconfiguration(self, change: ConfChange, new: Membership) -> None:
        """Refuse a change that could leave the cluster without a working quorum (etcd's
        --strict-reconfig-check, with learners): a brand-new member joins as a learner only;
        ADD_VOTER promotes a learner that is caught up (or repeats a voter, a no-op); and a
        change of the voters must leave at least a quorum of the NEW voters started and caught
        up (see caught_up). Changes that keep the voters (learners) are not checked."""
        nid = change.node_id
        old = self.membership
        if change.op is ConfChangeOp.ADD_VOTER and nid not in old.voters:
            if nid not in old.learners:
                raise ConfChangeRejected(
                    f"{nid} is not a member: a new member joins as a learner first and is "
                    "promoted to voter once it has caught up")
            if not self.caught_up(nid):
                raise ConfChangeRejected(self._lag_reason(nid, "cannot be promoted yet"),
                                         transient=self._started(nid))
        if new.voters == old.voters:
            return
        need = quorum.majority(new.voters)
        ready = sorted(v for v in new.voters if self.caught_up(v))
        if len(ready) < need:
            behind = ", ".join(self._lag_reason(v, "")
                               for v in sorted(new.voters) if v not in ready)
            started = sum(1 for v in new.voters if self._started(v))
            raise ConfChangeRejected(
                f"{change.op.name.lower()} {nid} would leave {len(ready)} started, caught-up "
                f"voter(s) ({', '.join(ready) or 'none'}) of the {len(new.voters)} in the new "
                f"configuration, fewer than its quorum of {need}: {behind}",
                transient=started >= need)  # enough answer: they are only behind

    def _lag_reason(self, nid: NodeId, what: str) -> str:
        pr = self._progress.get(nid)
        head = f"{nid} {what}".rstrip() + ": "
        if pr is None:
            return head + "the leader tracks no progress for it"
        if pr.idle_ticks >= self.config.election_timeout_ticks:
            return head + (f"not heard from for {pr.idle_ticks} ticks "
                           f"(>= the election timeout of {self.config.election_timeout_ticks})")
        return head + f"has the log up to {pr.match}, the commit index is {self.log.commit}"

    def read_index(self, request_id: int) -> None:
        """Ask for a linearizable read; a ReadState (or failed read) appears in a Ready."""
        if self.role is Role.LEADER:
            self._leader_read(request_id, None)
        elif self.leader is not None:
            self._forward_reads.append(request_id)
        else:
            self._failed_reads.append(request_id)

    def learn_commit(self, index: int, term: int) -> None:
        """The leader said the entry (index, term) is committed (a ReadIndex answer, or the
        answer to a forwarded write). If this log holds an entry of that term at that index,
        everything up to it matches the leader's log (Log Matching) and is committed too:
        a follower waiting on it need not wait for the next append or heartbeat."""
        if self.role is Role.LEADER or index <= self.log.commit:
            return
        if self.log.term(index) == term:
            self.log.commit_to(index)
            self._on_commit(index)

    def transfer_leader(self, to: NodeId) -> None:
        """Hand leadership to a caught-up voter (TimeoutNow, dissertation §3.10)."""
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if to == self.id:
            return
        if to not in self.membership.voters:
            raise RaftError(f"{to} is not a voter")
        if self._lead_transferee == to:
            return
        self._lead_transferee = to
        self._election_elapsed = 0
        if self._progress[to].match == self.log.last_index():
            self._send(TimeoutNow(self.term, self.id, to))
        else:
            self._send_append(to)

    def compact(self, snapshot: Snapshot, keep_from: int) -> None:
        """The application took `snapshot` (at or below applied); drop entries < keep_from."""
        meta = snapshot.meta
        if meta.index <= self._snapshot.meta.index:
            return
        self.log.compact(meta.index, meta.term, keep_from)
        self._snapshot = snapshot
        self._base_membership = self.membership_at(meta.index)
        self._conf_entries = [(i, m) for i, m in self._conf_entries if i > meta.index]

    def _live_peers(self) -> list[Progress]:
        """The progress of the peers that answered this leader within an election timeout
        (none on a node that is not the leader)."""
        if self.role is not Role.LEADER:
            return []
        live = self.config.election_timeout_ticks
        return [pr for nid, pr in self._progress.items()
                if nid != self.id and pr.idle_ticks < live]

    def sending_snapshot(self) -> bool:
        """True while this leader sends a snapshot to a peer that answered it within an
        election timeout. A new snapshot taken meanwhile does not restart that transfer, but
        enough of them make the store drop the one in flight: the driver waits longer before
        the next (SnapshotPolicy.should_snapshot)."""
        return any(pr.state is ProgressState.SNAPSHOT for pr in self._live_peers())

    def compaction_hold(self) -> int | None:
        """The first log index to keep for the peers that answered this leader within an
        election timeout, or None (every one of them has the whole log, or not the leader):
        the last entry a lagging peer holds (its term is the consistency check of the append
        that sends the next), or the index of the snapshot being sent to it (the entries after
        it are what it needs once installed: compacting past them makes the install useless
        at once, and under a high write rate a follower never catches up).
        SnapshotPolicy.compact_before keeps them, within a bound."""
        last = self.log.last_index()
        needs = [pr.pending_snapshot if pr.state is ProgressState.SNAPSHOT else pr.match
                 for pr in self._live_peers()]
        return min((need for need in needs if 0 < need < last), default=None)

    def step(self, m: Message) -> None:
        """Feed one message from a peer."""
        if m.to != self.id:
            return
        if isinstance(m, TimeoutNow) and (m.term != self.term or m.frm != self.leader
                                          or self.role is not Role.FOLLOWER):
            # Only the leader of our current term may make us campaign at once (a transfer);
            # from anyone else it is forged or stale: ignored, and our term stays as it is.
            self._drop(f"TimeoutNow from {m.frm} in term {m.term} ignored: not from the "
                       f"leader of the current term ({self.term}, leader {self.leader or '-'})")
            return
        problem = _malformed(m)
        if problem is not None:
            self._drop(f"{type(m).__name__} from {m.frm} in term {m.term} ignored: {problem}")
            return
        if m.term > self.term:
            if isinstance(m, VoteRequest):
                in_lease = (
                    self.config.check_quorum
                    and self.leader is not None
                    and self._election_elapsed < self.config.election_timeout_ticks
                )
                if in_lease and not m.transfer:
                    return  # a live leader was heard recently: do not let it be disrupted
            if isinstance(m, VoteRequest) and m.pre_vote:
                pass  # a pre-vote never changes our term
            elif isinstance(m, VoteResponse) and m.pre_vote and m.granted:
                pass  # the term of our own pre-vote campaign (term + 1)
            elif isinstance(m, AppendRequest | HeartbeatRequest | SnapshotRequest):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if isinstance(m, AppendRequest | HeartbeatRequest) and (
                self.config.check_quorum or self.config.pre_vote
            ):
                # A stale leader (e.g. after a partition): tell it the new term, once that
                # term is on disk (it may have been raised by a step not yet persisted).
                self._send_after_persist(AppendResponse(self.term, self.id, m.frm, False, 0))
            elif isinstance(m, VoteRequest) and m.pre_vote:
                self._send_after_persist(
                    VoteResponse(self.term, self.id, m.frm, granted=False, pre_vote=True)
                )
            return

        if isinstance(m, AppendRequest | HeartbeatRequest | SnapshotRequest) and (
                self.role is Role.LEADER or self.leader not in (None, m.frm)):
            # A term has one leader: a second one claiming this term is impossible from a
            # correct peer, and must not take over (nor make a leader step down).
            self._drop(f"{type(m).__name__} from {m.frm} in term {m.term} ignored: "
                       f"{self.leader} leads this term")
            return
        if isinstance(m, VoteRequest):
            self._step_vote_request(m)
        elif isinstance(m, VoteResponse):
            self._step_vote_response(m)
        elif isinstance(m, AppendRequest):
            self._follow(m.frm)
            self._step_append_request(m)
        elif isinstance(m, HeartbeatRequest):
            self._follow(m.frm)
            self._step_heartbeat_request(m)
        elif isinstance(m, SnapshotRequest):
            self._follow(m.frm)
            self._step_snapshot_request(m)
        elif isinstance(m, TimeoutNow):
            if self.role is not Role.LEADER and self._promotable():
                self._campaign(transfer=True)
        elif isinstance(m, ReadIndexRequest):
            if self.role is Role.LEADER:
                for rid in m.request_ids:
                    self._leader_read(rid, m.frm)
            else:
                self._send(ReadIndexResponse(self.term, self.id, m.frm, m.request_ids, -1))
        elif isinstance(m, ReadIndexResponse):
            if m.index < 0:
                self._failed_reads.extend(m.request_ids)
            else:
                # The read index is the leader's commit index, at an entry of its term.
                self.learn_commit(m.index, m.term)
                self._read_states.extend(ReadState(rid, m.index) for rid in m.request_ids)
        elif self.role is Role.LEADER:
            pr = self._progress.get(m.frm)
            if pr is None or not self._possible_response(m):
                return
            pr.recent_active = True
            pr.idle_ticks = 0
            if isinstance(m, AppendResponse):
                self._step_append_response(m, pr)
            elif isinstance(m, HeartbeatResponse):
                self._step_heartbeat_response(m, pr)
            else:
                self._step_snapshot_response(m, pr)

    # =====================================================================================
    # Output
    # =====================================================================================
    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        self._flush()
        log = self.log
        return bool(
            self._outbox
            or self._after_persist
            or log.unstable_from <= log.last_index()
            or self._snapshot_to_install is not None
            or self._snapshot_writes
            or self._snapshot_discard
            or self._read_states
            or self._failed_reads
            or self._dropped
            or min(log.commit, log.stable_index) > log.applied
            or self._hard_state() != self._prev_hard_state
            or self._soft_state() != self._prev_soft_state
        )

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise RaftError("the previous Ready was not advanced")
        self._flush()
        log = self.log
        hs = self._hard_state()
        ss = self._soft_state()
        entries = log.unstable_entries()
        snapshot = self._snapshot_to_install
        hi = min(log.commit, log.stable_index)
        committed = tuple(log.slice(log.applied + 1, hi + 1)) if hi > log.applied else ()
        prev = self._prev_hard_state
        self._ready_serial += 1
        rd = Ready(
            soft_state=ss if ss != self._prev_soft_state else None,
            hard_state=hs if hs != prev else None,
            must_sync=bool(entries) or snapshot is not None
            or hs.term != prev.term or hs.vote != prev.vote,
            snapshot=snapshot,
            entries=entries,
            messages=tuple(self._outbox),
            committed_entries=committed,
            read_states=tuple(self._read_states),
            failed_reads=tuple(self._failed_reads),
            after_persist=tuple(self._after_persist),
            serial=self._ready_serial,
            snapshot_writes=tuple(self._snapshot_writes),
            snapshot_discard=self._snapshot_discard,
            snapshot_state=self._snapshot_state,
            dropped=tuple(self._dropped),
        )
        self._outstanding = self._ready_serial
        self._outbox = []
        self._after_persist = []
        self._read_states = []
        self._failed_reads = []
        self._dropped = []
        self._snapshot_to_install = None
        self._snapshot_state = None
        self._snapshot_writes = []
        self._snapshot_discard = False
        self._prev_hard_state = hs
        self._prev_soft_state = ss
        log.unstable_from = log.last_index() + 1
        log.applied = max(log.applied, hi)
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied `rd`."""
        if self._outstanding != rd.serial:
            raise RaftError("advance() got a Ready that is not the outstanding one")
        self._outstanding = None
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
        if self.role is Role.LEADER:
            self._maybe_commit()
        for m in rd.after_persist:
            if m.to == self.id:  # the driver sent the others once it persisted
                self.step(m)

    # =====================================================================================
    # Queries
    # =====================================================================================
    def membership_at(self, index: int) -> Membership:
        """The configuration in force at log position `index` (for snapshot metadata)."""
        current = self._base_membership
        for i, m in self._conf_entries:
            if i > index:
                break
            current = m
        return current

    @property
    def snapshot_meta(self) -> SnapshotMeta:
        return self._snapshot.meta

    def status(self) -> Status:
        peers = {
            nid: PeerStatus(pr.match, pr.next, pr.state.value, pr.recent_active,
                            self.caught_up(nid))
            for nid, pr in self._progress.items()
        }
        return Status(
            node_id=self.id,
            role=self.role,
            term=self.term,
            vote=self.vote,
            leader=self.leader,
            commit_index=self.log.commit,
            applied_index=self.log.applied,
            last_index=self.log.last_index(),
            stable_index=self.log.stable_index,
            snapshot_index=self._snapshot.meta.index,
            membership=self.membership,
            peers=peers,
            transferring_to=self._lead_transferee,
        )

    # =====================================================================================
    # Roles
    # =====================================================================================
    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.leader = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_election_timeout()
        self._votes = {}
        self._lead_transferee = None
        self._progress = {}
        self._append_pending = False
        self._heartbeat_pending = False
        self._abandon_incoming_snapshot()
        self._fail_pending_reads()

    def _reset_election_timeout(self) -> None:
        et = self.config.election_timeout_ticks
        self._randomized_election_timeout = self._rng.randrange(et, 2 * et)

    def _become_follower(self, term: int, leader: NodeId | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def _become_pre_candidate(self) -> None:
        # Term and vote stay as they are: a pre-vote must not disturb anyone (§9.6).
        self._reset(self.term)
        self.role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        self._sync_progress()
        for pr in self._progress.values():
            pr.recent_active = True
        self._pending_conf_index = self.log.last_index()
        # Commit a no-op of our own term before anything else (§8, Figure 8).
        self._append_entry(Entry(self.log.last_index() + 1, self.term))

    def _follow(self, leader: NodeId) -> None:
        """A valid message from the leader of our term arrived."""
        if self.role is not Role.FOLLOWER:
            self._become_follower(self.term, leader)
        self.leader = leader
        self._election_elapsed = 0

    def _promotable(self) -> bool:
        return self.id in self.membership.voters

    # =====================================================================================
    # Elections
    # =====================================================================================
    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable() and self._election_elapsed >= self._randomized_election_timeout:
            self._election_elapsed = 0
            self._campaign(transfer=False)

    def _campaign(self, transfer: bool) -> None:
        pre_vote = self.config.pre_vote and not transfer
        if pre_vote:
            self._become_pre_candidate()
            term = self.term + 1
            self._votes[self.id] = True  # a pre-vote needs nothing persisted
        else:
            self._become_candidate()
            term = self.term
            # Our own vote counts only once term and vote are on disk.
            self._send_after_persist(VoteResponse(term, self.id, self.id, granted=True))
        if self._tally_votes():
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for peer in sorted(self.membership.voters - {self.id}):
            self._send(VoteRequest(term, self.id, peer, last_index, last_term,
                                   pre_vote=pre_vote, transfer=transfer))

    def _tally_votes(self) -> bool:
        """Act on the votes so far; True if the campaign is over."""
        result = quorum.vote_result(self.membership.voters, self._votes)
        if result is quorum.VoteResult.WON:
            if self.role is Role.PRE_CANDIDATE:
                self._campaign_after_pre_vote()
            else:
                self._become_leader()
            return True
        if result is quorum.VoteResult.LOST:
            self._become_follower(self.term, None)
            return True
        return False

    def _campaign_after_pre_vote(self) -> None:
        self._become_candidate()
        self._send_after_persist(VoteResponse(self.term, self.id, self.id, granted=True))
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for peer in sorted(self.membership.voters - {self.id}):
            self._send(VoteRequest(self.term, self.id, peer, last_index, last_term))

    def _step_vote_request(self, m: VoteRequest) -> None:
        can_vote = (
            self.vote == m.frm
            or (self.vote is None and self.leader is None)
            or (m.pre_vote and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.last_log_index, m.last_log_term):
            self._send_after_persist(
                VoteResponse(m.term, self.id, m.frm, granted=True, pre_vote=m.pre_vote)
            )
            if not m.pre_vote:
                self._election_elapsed = 0
                self.vote = m.frm
        else:
            self._send_after_persist(
                VoteResponse(self.term, self.id, m.frm, granted=False, pre_vote=m.pre_vote)
            )

    def _step_vote_response(self, m: VoteResponse) -> None:
        if m.pre_vote:
            if self.role is not Role.PRE_CANDIDATE or m.term != self.term + (1 if m.granted else 0):
                return
        elif self.role is not Role.CANDIDATE or m.term != self.term:
            return
        self._votes.setdefault(m.frm, m.granted)
        self._tally_votes()

    # =====================================================================================
    # Leader
    # =====================================================================================
    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        for pr in self._progress.values():
            pr.idle_ticks += 1
            if pr.snapshot_backoff_ticks:
                pr.snapshot_backoff_ticks -= 1
        if self._election_elapsed >= self.config.election_timeout_ticks:
            self._election_elapsed = 0
            if self.config.check_quorum:
                active = {nid for nid, pr in self._progress.items() if pr.recent_active}
                active.add(self.id)
                if not quorum.has_quorum(self.membership.voters, active):
                    self._become_follower(self.term, None)
                    return
                for nid, pr in self._progress.items():
                    pr.recent_active = nid == self.id
            self._lead_transferee = None  # a transfer that took this long has failed
        if self._heartbeat_elapsed >= self.config.heartbeat_interval_ticks:
            self._heartbeat_elapsed = 0
            self._heartbeat_pending = True

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if self._lead_transferee is not None:
            raise ProposalDropped(f"leadership is being transferred to {self._lead_transferee}")

    def _check_entry_size(self, size_bytes: int) -> None:
        """Every entry (of Entry.size_bytes `size_bytes`) must fit in one AppendRequest that
        fits in one frame to a follower (Config.max_entry_bytes): the link refuses a larger
        frame, and that follower would stall."""
        if size_bytes > self.config.max_entry_bytes:
            raise ProposalTooLarge(
                f"the entry would be {size_bytes} bytes; a log entry holds at most "
                f"{self.config.max_entry_bytes}")

    def _append_entry(self, entry: Entry) -> None:
        self.log.append(entry)
        if entry.kind is EntryKind.CONF_CHANGE:
            self._pending_conf_index = entry.index
            self._note_conf_entry(entry)
            self._rebuild_membership()
        self._append_pending = True

    def _leader_self_match(self) -> int:
        """The leader counts itself only for entries on its own disk."""
        return self.log.stable_index

    def _may_commit_by_count(self, index: int) -> bool:
        """Only entries of the current term commit by counting replicas (§5.4.2)."""
        return self.log.term(index) == self.term

    def _maybe_commit(self) -> bool:
        me = self._progress.get(self.id)
        if me is not None:
            me.match = max(me.match, self._leader_self_match())
        matches = {nid: pr.match for nid, pr in self._progress.items()}
        index = quorum.quorum_index(self.membership.voters, matches)
        if index > self.log.commit and self._may_commit_by_count(index):
            self._on_commit(index)
            return True
        return False

    def _on_commit(self, index: int) -> None:
        # Followers learn the new commit index from the next append or heartbeat (or, for a
        # follower waiting on it, from a ReadIndex answer or a forwarded write's answer:
        # learn_commit), never from an append that carries nothing else (and its ack).
        self.log.commit_to(index)
        if self.role is Role.LEADER:
            if self.id not in self.membership.voters and index >= self._pending_conf_index:
                # Our own removal is committed: step down (dissertation §4.2.2). First tell
                # the followers the new commit index, and hand leadership to the most
                # caught-up voter, so the cluster does not wait out an election timeout.
                self._broadcast_appends(with_commit=True)
                last = self.log.last_index()
                caught_up = [nid for nid in self._peers()
                             if nid in self.membership.voters
                             and self._progress[nid].match == last]
                if caught_up:
                    self._send(TimeoutNow(self.term, self.id, caught_up[0]))
                self._become_follower(self.term, None)
                return
            if self._reads_waiting_for_term_commit and self.log.term(index) == self.term:
                waiting, self._reads_waiting_for_term_commit = (
                    self._reads_waiting_for_term_commit, [])
                for rid, origin in waiting:
                    self._leader_read(rid, origin)

    def _sync_progress(self) -> None:
        """Track exactly the current members."""
        members = self.membership.members | {self.id}
        for nid in list(self._progress):
            if nid not in members:
                del self._progress[nid]
        for nid in members:
            if nid not in self._progress:
                pr = Progress(self.log.last_index() + 1, self.config.max_inflight_appends)
                if nid == self.id:
                    pr.match = self._leader_self_match()
                    pr.state = ProgressState.REPLICATE
                self._progress[nid] = pr

    def _peers(self) -> list[NodeId]:
        return sorted(nid for nid in self._progress if nid != self.id)

    def _send_append(self, to: NodeId, allow_empty: bool = False) -> bool:
        """Send the next AppendRequest to `to` if its progress allows; True if sent."""
        pr = self._progress[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        prev_term = self.log.term(prev_index)
        if prev_term is None or pr.next < self.log.first_index():
            self._start_snapshot(to, pr)
            return False
        entries: tuple[Entry, ...] = ()
        if pr.next <= self.log.last_index():
            entries = self.log.entries_from(
                pr.next, self.config.max_append_entries, self.config.max_append_bytes)
        if not entries and not allow_empty:
            return False
        self._send(AppendRequest(self.term, self.id, to, prev_index, prev_term, entries,
                                 self.log.commit))
        if entries:
            if pr.state is ProgressState.REPLICATE:
                pr.next = entries[-1].index + 1
                pr.inflights.add(entries[-1].index)
            else:
                pr.probe_sent = True
        elif pr.state is ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _broadcast_appends(self, *, with_commit: bool = False) -> None:
        """Send every peer the entries it lacks (as far as its progress allows); with
        `with_commit`, an empty append to the peers that get none, for the commit index."""
        for peer in self._peers():
            pr = self._progress[peer]
            sent = False
            while self._send_append(peer):
                sent = True
            if (with_commit and not sent and pr.state is ProgressState.REPLICATE
                    and not pr.is_paused()):
                self._send_append(peer, allow_empty=True)

    def _broadcast_heartbeats(self) -> None:
        self._read_seq += 1
        for peer in self._peers():
            pr = self._progress[peer]
            commit = min(pr.match, self.log.commit)
            self._send(HeartbeatRequest(self.term, self.id, peer, commit, self._read_seq))

    def _possible_response(self, m: Message) -> bool:
        """A response can only acknowledge what this leader could have sent: an index it
        has, a heartbeat round it started. Anything else is dropped: a follower cannot
        claim to match entries that do not exist (that would commit beyond the log), nor
        confirm a read round that never was."""
        if isinstance(m, AppendResponse):
            last = self.log.last_index()
            return 0 <= m.index <= last and 0 <= m.hint_index <= max(last, m.index)
        if isinstance(m, HeartbeatResponse):
            return m.read_seq <= self._read_seq
        return True

    def _step_append_response(self, m: AppendResponse, pr: Progress) -> None:
        if not m.success:
            hint = m.hint_index
            if m.hint_term > 0:
                hint, _ = self.log.find_conflict_by_term(m.hint_index, m.hint_term)
            if pr.maybe_decrease_to(m.index, hint):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm, allow_empty=True)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        elif pr.state is ProgressState.REPLICATE:
            pr.inflights.free_up_to(m.index)
        if self._maybe_commit():
            if self.role is not Role.LEADER:
                return  # that commit removed us from the configuration: we stepped down
            # otherwise _flush() broadcasts the new commit index
        elif was_paused:
            self._send_append(m.frm, allow_empty=True)  # at least carries the commit index
        while self._send_append(m.frm):
            pass
        if m.frm == self._lead_transferee and pr.match == self.log.last_index():
            self._send(TimeoutNow(self.term, self.id, m.frm))

    def _step_heartbeat_response(self, m: HeartbeatResponse, pr: Progress) -> None:
        pr.probe_sent = False
        if pr.state is ProgressState.REPLICATE and pr.inflights.full():
            pr.inflights.free_first()  # an append may have been lost; keep the pipe moving
        if pr.state is ProgressState.SNAPSHOT:
            self._send_snapshot_chunk(m.frm, pr)
        elif pr.match < self.log.last_index():
            self._send_append(m.frm, allow_empty=True)
        if m.read_seq > pr.read_seq:
            pr.read_seq = m.read_seq
            self._release_confirmed_reads()

    # =====================================================================================
    # Snapshots (leader side sends in chunks; follower assembles then installs)
    # =====================================================================================
    def _start_snapshot(self, to: NodeId, pr: Progress) -> None:
        if not pr.recent_active or pr.snapshot_backoff_ticks:
            return  # the peer may be down, or it refused our last snapshot: not yet
        pr.become_snapshot(self._snapshot)
        self._send_snapshot_chunk(to, pr)

    def _send_snapshot_chunk(self, to: NodeId, pr: Progress) -> None:
        """The chunk at the transfer's offset, of the snapshot the transfer started with: a
        newer snapshot does not restart it (snapshots taken faster than one transfer takes
        would never let it finish). Only if that one is no longer readable (the store
        dropped it for newer ones) does the transfer start over with the newest."""
        snap = pr.snapshot
        assert snap is not None  # SNAPSHOT state: become_snapshot set it
        chunk = self._snapshot_chunk(snap, pr.snapshot_offset)
        if chunk is None and snap.meta != self._snapshot.meta:
            snap = self._snapshot
            pr.become_snapshot(snap)
            chunk = self._snapshot_chunk(snap, 0)
        if chunk is None:
            # Not readable, e.g. being replaced by a newer one being published: stop this
            # transfer and offer a snapshot again after the back-off.
            self._abort_snapshot(pr)
            return
        off = pr.snapshot_offset
        done = off + len(chunk) >= snap.length
        self._send(SnapshotRequest(self.term, self.id, to, snap.meta, off, chunk, done,
                                   snap.length, snap.checksum))

    def _snapshot_chunk(self, snap: Snapshot, off: int) -> bytes | None:
        size = min(self.config.snapshot_chunk_bytes, max(0, snap.length - off))
        chunk = self._read_snapshot(snap, off, size) if self._read_snapshot else None
        return chunk if chunk is not None and len(chunk) == size else None

    def _abort_snapshot(self, pr: Progress) -> None:
        pr.snapshot = None  # the follower does not have it: probe from its match
        pr.become_probe()
        pr.snapshot_backoff_ticks = self._snapshot_backoff

    def _step_snapshot_response(self, m: SnapshotResponse, pr: Progress) -> None:
        if pr.state is not ProgressState.SNAPSHOT:
            return
        if m.next_offset < 0:
            if m.snapshot_index == pr.pending_snapshot:
                self._abort_snapshot(pr)
            return
        snap = pr.snapshot
        if snap is None or m.snapshot_index != snap.meta.index:
            return  # about a transfer this one replaced
        if m.done or m.next_offset == pr.snapshot_offset:
            return  # finished (an AppendResponse follows the install) or a duplicate
        if m.next_offset > snap.length:
            return  # not an offset of this snapshot
        pr.snapshot_offset = m.next_offset
        self._send_snapshot_chunk(m.frm, pr)

    def _step_snapshot_request(self, m: SnapshotRequest) -> None:
        inc = self._incoming_snapshot
        # The first chunk again, of the very transfer under way (a leader resends its current
        # chunk on a heartbeat response, often before the first chunk's answer came back):
        # a duplicate, answered with the offset reached below. Starting over would drop and
        # restage what arrived, again and again on a slow disk.
        repeated = (inc is not None and inc.received > 0 and inc.meta == m.meta
                    and inc.length == m.length and inc.checksum == m.checksum)
        if m.offset == 0 and not repeated:
            self._abandon_incoming_snapshot()
            if m.meta.index <= self.log.commit:
                # Nothing new in it: say so at once rather than receive it for nothing.
                self._send(SnapshotResponse(self.term, self.id, m.frm, m.meta.index, 0,
                                            done=True))
                self._send_after_persist(
                    AppendResponse(self.term, self.id, m.frm, True, self.log.commit))
                return
            problem = self._snapshot_offer_problem(m)
            if problem is not None:
                self._refuse_snapshot(m, problem)
                return
            decoder = None
            if self._snapshot_validator is not None:
                try:
                    decoder = self._snapshot_validator()
                except Exception as e:  # the validator's own failure: refuse, do not crash
                    self._refuse_snapshot(m, f"the validator failed: {type(e).__name__}: {e}")
                    return
            inc = self._incoming_snapshot = _IncomingSnapshot(
                m.meta, m.length, m.checksum, new_snapshot_hasher(), decoder)
        if (inc is None or inc.meta != m.meta or inc.length != m.length
                or inc.checksum != m.checksum or m.offset != inc.received):
            same = inc is not None and inc.meta == m.meta
            expected = inc.received if same and inc is not None else 0
            self._send(SnapshotResponse(self.term, self.id, m.frm, m.meta.index, expected))
            return
        end = inc.received + len(m.data)
        if end > inc.length or m.done != (end == inc.length):
            self._refuse_snapshot(m, f"chunk at {m.offset} of {len(m.data)} bytes does not fit "
                                     f"the declared length {inc.length} (done={m.done})")
            return
        inc.hasher.update(m.data)
        if inc.decoder is not None:
            try:
                inc.decoder.feed(m.data)
            except Exception as e:  # whatever the bytes make the decoder raise: refuse
                self._refuse_snapshot(m, f"not a valid snapshot: {type(e).__name__}: {e}")
                return
        inc.received = end
        self._snapshot_writes.append(SnapshotWrite(m.meta, m.offset, m.data))
        if not m.done:
            self._send(SnapshotResponse(self.term, self.id, m.frm, m.meta.index, end))
            return
        if inc.hasher.hexdigest() != inc.checksum:
            self._refuse_snapshot(m, "checksum mismatch: the bytes received are not the "
                                     "snapshot the leader described")
            return
        state: object = None
        if inc.decoder is not None:
            try:
                state = inc.decoder.finish()
            except Exception as e:
                self._refuse_snapshot(m, f"not a valid snapshot: {type(e).__name__}: {e}")
                return
        self._send(SnapshotResponse(self.term, self.id, m.frm, m.meta.index, end, done=True))
        if m.meta.index <= self.log.commit:  # the commit index moved past it meanwhile
            self._abandon_incoming_snapshot()  # nothing new in it: not even its last chunk
            ack = self.log.commit
        else:
            self._incoming_snapshot = None
            self._install_snapshot(Snapshot(m.meta, inc.length, inc.checksum), state)
            ack = m.meta.index
        self._send_after_persist(AppendResponse(self.term, self.id, m.frm, True, ack))

    def _snapshot_offer_problem(self, m: SnapshotRequest) -> str | None:
        """Why the first chunk of a snapshot cannot be accepted, or None."""
        cap = self.config.max_snapshot_bytes
        if m.length > cap:
            return f"it is {m.length} bytes, over this node's cap of {cap}"
        if not is_checksum(m.checksum):
            return "its checksum is not a blake2b-256 hex digest"
        return None

    def _refuse_snapshot(self, m: SnapshotRequest, why: str) -> None:
        """Drop the transfer (nothing of it is published) and tell the leader to back off."""
        self._abandon_incoming_snapshot()
        self._send(SnapshotResponse(self.term, self.id, m.frm, m.meta.index, -1))
        self._drop(f"snapshot {m.meta.index}/{m.meta.term} from {m.frm} refused: {why}")

    def _abandon_incoming_snapshot(self) -> None:
        """Forget the transfer in progress; the driver drops what it staged of it."""
        inc = self._incoming_snapshot
        if inc is None:
            return
        self._incoming_snapshot = None
        self._snapshot_writes = [w for w in self._snapshot_writes if w.meta != inc.meta]
        self._snapshot_discard = True

    def _install_snapshot(self, snapshot: Snapshot, state: object) -> None:
        meta = snapshot.meta
        self.log.restore(meta.index, meta.term)
        self._snapshot = snapshot
        self._snapshot_to_install = snapshot
        self._snapshot_state = state
        self._base_membership = meta.membership
        self._conf_entries = []
        self._scan_conf_entries(meta.index + 1)

    # =====================================================================================
    # Follower
    # =====================================================================================
    def _step_append_request(self, m: AppendRequest) -> None:
        log = self.log
        if m.prev_index < log.commit:
            self._send_after_persist(AppendResponse(self.term, self.id, m.frm, True, log.commit))
            return
        last_new = log.maybe_append(m.prev_index, m.prev_term, m.entries)
        if last_new is None:
            hint_index = min(m.prev_index, log.last_index())
            hint_index, hint_term = log.find_conflict_by_term(hint_index, m.prev_term)
            self._send_after_persist(AppendResponse(
                self.term, self.id, m.frm, False, m.prev_index, hint_index, hint_term))
            return
        if m.entries and (
            any(e.kind is EntryKind.CONF_CHANGE for e in m.entries)
            or (self._conf_entries and self._conf_entries[-1][0] >= m.entries[0].index)
        ):
            self._scan_conf_entries(m.entries[0].index)
        if log.commit_to(min(m.commit, last_new)):
            self._on_commit(log.commit)
        self._send_after_persist(AppendResponse(self.term, self.id, m.frm, True, last_new))

    def _step_heartbeat_request(self, m: HeartbeatRequest) -> None:
        if self.log.commit_to(min(m.commit, self.log.last_index())):
            self._on_commit(self.log.commit)
        self._send(HeartbeatResponse(self.term, self.id, m.frm, m.read_seq))

    # =====================================================================================
    # Membership
    # =====================================================================================
    def _note_conf_entry(self, e: Entry) -> None:
        if e.kind is EntryKind.CONF_CHANGE and e.change is not None:
            current = self._conf_entries[-1][1] if self._conf_entries else self._base_membership
            try:
                self._conf_entries.append((e.index, current.apply(e.change)))
            except ValueError:
                self._conf_entries.append((e.index, current))  # invalid change: a no-op

    def _scan_conf_entries(self, from_index: int) -> None:
        """The log changed from `from_index` on: recompute the configurations after it."""
        self._conf_entries = [(i, m) for i, m in self._conf_entries if i < from_index]
        lo = max(from_index, self._snapshot.meta.index + 1, self.log.first_index())
        for e in self.log.slice(lo, self.log.last_index() + 1):
            self._note_conf_entry(e)
        self._rebuild_membership()

    def _rebuild_membership(self) -> None:
        new = self._conf_entries[-1][1] if self._conf_entries else self._base_membership
        if new != self.membership:
            self.membership = new
            if self.role is Role.LEADER:
                self._sync_progress()
                self._maybe_commit()

    # =====================================================================================
    # Reads (ReadIndex, dissertation §6.4)
    # =====================================================================================
    def _leader_read(self, request_id: int, origin: NodeId | None) -> None:
        if self.log.term(self.log.commit) != self.term:
            self._reads_waiting_for_term_commit.append((request_id, origin))
            return
        read = _PendingRead(request_id, origin, self.log.commit, self._read_seq + 1)
        if self._read_needs_quorum_check():
            self._pending_reads.append(read)
            self._heartbeat_pending = True
        else:
            self._release_read(read)

    def _read_needs_quorum_check(self) -> bool:
        return self.membership.voters != {self.id}

    def _release_confirmed_reads(self) -> None:
        if not self._pending_reads:
            return
        acked = {nid: pr.read_seq for nid, pr in self._progress.items()}
        acked[self.id] = self._read_seq
        confirmed = quorum.quorum_index(self.membership.voters, acked)
        keep: list[_PendingRead] = []
        for read in self._pending_reads:
            if read.seq <= confirmed:
                self._release_read(read)
            else:
                keep.append(read)
        self._pending_reads = keep

    def _release_read(self, read: _PendingRead) -> None:
        if read.origin is None:
            self._read_states.append(ReadState(read.request_id, read.index))
        else:
            self._send(ReadIndexResponse(self.term, self.id, read.origin, (read.request_id,),
                                         read.index))

    def _fail_pending_reads(self) -> None:
        pending = [(r.request_id, r.origin) for r in self._pending_reads]
        pending += self._reads_waiting_for_term_commit
        self._pending_reads = []
        self._reads_waiting_for_term_commit = []
        for rid, origin in pending:
            if origin is None:
                self._failed_reads.append(rid)
            else:
                self._send(ReadIndexResponse(self.term, self.id, origin, (rid,), -1))
        if self._forward_reads:
            self._failed_reads.extend(self._forward_reads)
            self._forward_reads = []

    # =====================================================================================
    # Plumbing
    # =====================================================================================
    def _send(self, m: Message) -> None:
        self._outbox.append(m)

    _MAX_DROPPED_NOTES = 64

    def _drop(self, why: str) -> None:
        """A message from a peer was ignored as invalid: say why in the next Ready (bounded:
        a flood of bad messages costs the driver one batch of log lines per Ready)."""
        if len(self._dropped) < self._MAX_DROPPED_NOTES:
            self._dropped.append(why)

    def _send_after_persist(self, m: Message) -> None:
        """Replies that reveal persisted state leave only after the next persist."""
        self._after_persist.append(m)

    def _flush(self) -> None:
        """Turn lazily batched work into messages (called when a Ready is built)."""
        if self.role is Role.LEADER:
            if self._append_pending:
                self._append_pending = False
                self._broadcast_appends()
            if self._heartbeat_pending:
                self._heartbeat_pending = False
                self._broadcast_heartbeats()
        else:
            self._append_pending = False
            self._heartbeat_pending = False
        if self._forward_reads:
            if self.leader is not None and self.role is Role.FOLLOWER:
                reads = self._forward_reads
                for i in range(0, len(reads), MAX_READ_IDS):
                    self._send(ReadIndexRequest(self.term, self.id, self.leader,
                                                tuple(reads[i : i + MAX_READ_IDS])))
            else:
                self._failed_reads.extend(self._forward_reads)
            self._forward_reads = []

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.commit)

    def _soft_state(self) -> SoftState:
        return SoftState(self.role, self.leader, self.term)



def _malformed(m: Message) -> str | None:
    """What makes a decodable message impossible for a correct peer to send, or None.

    Checked before the message can touch anything: a correct leader sends entries that follow
    prev_index one by one, in terms that never go down, none above its own term; a snapshot
    of a term above the sender's does not exist; a candidate's last log term is not above its
    term; a read batch is bounded (MAX_READ_IDS). (The transport checks who sent it.)"""
    if isinstance(m, AppendRequest) and m.entries:
        expected, term = m.prev_index + 1, m.prev_term
        for e in m.entries:
            if e.index != expected:
                return f"entry {e.index} does not follow {expected - 1}"
            if e.term < term or e.term > m.term:
                return f"entry {e.index} has term {e.term}, out of order or above the sender's"
            expected, term = expected + 1, e.term
    elif isinstance(m, SnapshotRequest) and m.meta.term > m.term:
        return f"a snapshot of term {m.meta.term} from a leader of term {m.term}"
    elif isinstance(m, VoteRequest) and m.last_log_term > m.term:
        return f"a last log term {m.last_log_term} above the candidate's term"
    elif isinstance(m, ReadIndexRequest | ReadIndexResponse) and (
            len(m.request_ids) > MAX_READ_IDS):
        return f"more than {MAX_READ_IDS} read ids in one message"
    return None
