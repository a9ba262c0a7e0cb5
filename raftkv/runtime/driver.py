"""The Raft driver: the core, the stores and the state machine, on the event loop's one thread.

Everything that changes Raft state goes through here: client proposals (from the HTTP workers
or forwarded by followers), reads, Raft messages from peers, ticks, membership changes,
snapshots and lease expiry. At the end of every loop turn `process()` handles the core's
Readies with the ONE ReadyHandler (raftkv.runtime.ready_handler): send, persist once (group
commit: one LMDB transaction and fsync for everything the turn brought), apply, advance.

Outcomes leave through `Completion`s: `ok(value)` once a write is committed and applied (the
apply result) or a read may be served (the read index, with the state machine applied up to
it), `fail(ServiceError)` otherwise. A write already handed to Raft is never failed as if it
had no effect: when its fate is unknown it fails with OutcomeUnknownError.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from raftkv import codec
from raftkv.core import (
    AppendRequest,
    BootState,
    ConfChange,
    ConfChangeOp,
    ConfChangeRejected,
    Entry,
    EntryKind,
    HardState,
    Membership,
    Message,
    NotLeader,
    ProposalDropped,
    ProposalTooLarge,
    RaftError,
    RaftNode,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    SoftState,
)
from raftkv.core.ready import Ready
from raftkv.kv.commands import (
    AlarmRaise,
    CommandDecodeError,
    LeaseRevoke,
    MemberIncarnation,
    adds_data,
    decode_command,
    encode_command,
)
from raftkv.kv.leases import LeaseExpiry, NotLeaseLeader
from raftkv.kv.state_machine import (
    AlarmResult,
    AuthEnabled,
    AuthRefused,
    DeleteResult,
    KVSnapshotView,
    KVStateMachine,
    PutResult,
    TokenCreated,
    TokenRevoked,
    iter_snapshot_chunks,
)
from raftkv.metrics import NodeMetrics
from raftkv.ports import RaftStorage, SnapshotStore, StorageError, StorageFull
from raftkv.runtime.boot import load_boot_state
from raftkv.runtime.ready_handler import ReadyHandler, chunk_reader
from raftkv.runtime.transport.refusals import RateLimitedLog
from raftkv.runtime.watch import WatchRegistry
from raftkv.service import (
    MAX_LEASE_KEYS_SHOWN,
    InvalidRequestError,
    LeaseNotFoundError,
    MembershipChangeError,
    NoLeaderError,
    OutcomeUnknownError,
    ServiceError,
    StorageFullError,
    UnavailableError,
    nospace_error,
)
from snapshots.policy import SnapshotPolicy

__all__ = ["BASE_MEMBERSHIP", "Completion", "FrameSender", "RaftDriver"]

log = logging.getLogger(__name__)

BASE_MEMBERSHIP: Final = Membership(frozenset())
"""The configuration "at index 0" of every raftkv cluster: empty, because a cluster's first
log entries add its initial members (raftkv.runtime.startup), so replaying the log from the
start rebuilds the membership."""

RECENT_RESULTS: Final = 4096
AUTH_RESULTS: Final = (AuthEnabled, TokenCreated, TokenRevoked, AuthRefused)
HOUSEKEEPING_TICKS: Final = 10
LINK_DRAIN_TICKS: Final = 20
"""How many ticks a removed member's link may stay for its last frames to leave."""
INCARNATION_RETRY_S: Final = 5.0
"""How long a leader waits for a MemberIncarnation it proposed before proposing it again."""
ALARM_RETRY_S: Final = 1.0
"""At most one AlarmRaise proposal per this many seconds from one node."""
SAVE_RETRY_S: Final = 1.0
"""After the disk refused a save for want of space: how long new entries from the leader are
left for it to resend (each failed save rebuilds the core from the disk)."""
DROPPED_LOG_S: Final = 10.0
"""At most one log line per this many seconds for peer messages the core dropped."""
TOO_LARGE_LOG_S: Final = 10.0
"""At most one log line per this many seconds for each kind of the driver's own proposals
(AlarmRaise, LeaseRevoke, MemberIncarnation) the core refuses as over max_entry_bytes."""
CONF_CHANGE_WAIT_S: Final = 2.0
"""How long a removal the leader refuses only for now (ConfChangeRejected.transient: no entry
of its term committed yet, another change uncommitted, members that answer but lag an
acknowledgement, a leadership transfer under way) is tried again before the refusal is the
answer. A removal forwarded by a follower waits as long as the leader's own bound allows
(the forward carries no deadline). Only removals wait: a join's checks (id and address not
taken) were made against the membership of its asking."""


class Completion(Protocol):
    """Where one operation's outcome goes (a worker's reply, a follower's forward result)."""

    def ok(self, value: object) -> None: ...

    def fail(self, error: ServiceError) -> None: ...


class FrameSender(Protocol):
    """What the driver needs of the peer transport."""

    def send(self, to: str, kind: int, payload: bytes) -> bool: ...

    def flush(self) -> None: ...

    def has_output(self, to: str) -> bool: ...

    def has_link(self, to: str) -> bool: ...

    def set_peers(self, peers: Mapping[str, str]) -> None: ...


Expect = bytes | ConfChange | None
"""What an applied entry must hold to answer a proposal: the command bytes or the change of a
forwarded one; None for this node's own proposals, whose (index, term) is theirs alone."""


@dataclass(slots=True)
class _Pending:
    term: int
    expect: Expect
    done: Completion


@dataclass(slots=True)
class _WaitingChange:
    """A membership change the leader refused for now, tried again at every turn."""
    change: ConfChange
    proposed: Callable[[int], None]
    failed: Callable[[ServiceError], None]
    until: float


class _Transport:
    """ports.Transport for the ReadyHandler: Raft messages as RAFT frames, written at once
    (appends leave before the leader's own fsync)."""

    def __init__(self, frames: FrameSender) -> None:
        self._frames = frames

    def send(self, messages: Sequence[Message]) -> None:
        encode = codec.encode_message
        send = self._frames.send
        kind = codec.FrameKind.RAFT
        for m in messages:
            send(m.to, kind, encode(m))
        self._frames.flush()


def holds(entry: Entry, expect: Expect) -> bool:
    """Does the applied entry hold what the proposal sent?"""
    if expect is None:
        return True
    if isinstance(expect, ConfChange):
        return entry.change == expect
    return entry.data == expect


class RaftDriver:
    def __init__(
        self,
        *,
        core: RaftNode,
        storage: RaftStorage,
        snapshots: SnapshotStore,
        state_machine: KVStateMachine,
        frames: FrameSender,
        addresses: Mapping[str, str],
        snapshot_policy: SnapshotPolicy,
        rng: random.Random,
        metrics: NodeMetrics,
        post: Callable[[Callable[[], None]], None],
        clock: Callable[[], float] = time.monotonic,
        boot_commit: int = 0,
        wake_at: Callable[[float], object] | None = None,
        persist_defer_s: float = 0.0,
        quota_bytes: int = 2 << 30,
        conf_change_wait_s: float = CONF_CHANGE_WAIT_S,
    ) -> None:
        """`post` runs a callback on the loop thread from another thread (the snapshot
        writer). `boot_commit`: membership changes up to this index were logged before.
        `quota_bytes`: the state machine's size beyond which writes that add data raise the
        NOSPACE alarm (RAFTKV_QUOTA_BYTES). `conf_change_wait_s`: how long a removal
        refused only for now is tried again (at most CONF_CHANGE_WAIT_S; the runtime
        keeps it within half the request timeout, so the answer comes before the client's
        504)."""
        self.core = core
        self.storage = storage
        self.snapshots = snapshots
        self.sm = state_machine
        self.frames = frames
        self.metrics = metrics
        self._rng = rng
        self._post = post
        self._clock = clock
        self._wake_at: Callable[[float], object] = wake_at or (lambda _when: None)
        self.persist_defer_s = persist_defer_s
        """How long the leader's next fsync may wait for acks (0: never); see
        _defer_persist."""
        self._conf_change_wait_s = conf_change_wait_s
        self._defer_started = 0.0
        self._policy = snapshot_policy
        self._boot_commit = boot_commit
        self._addresses: dict[str, str] = dict(addresses)
        self._addresses.update(state_machine.addresses)
        log_view = core.log
        for e in log_view.slice(log_view.first_index(), log_view.last_index() + 1):
            if e.kind is EntryKind.CONF_CHANGE and e.change is not None:
                self._note_address(e.change)
        self.handler = ReadyHandler(
            node=core, storage=storage, snapshots=snapshots, state_machine=state_machine,
            transport=_Transport(frames), on_applied=self._on_applied,
            on_read=self._on_read, on_read_failed=self._on_read_failed,
            on_persist_timed=self._persist_timed, on_apply_timed=self._apply_timed)
        self._proposals: dict[int, _Pending] = {}
        self._waiting_changes: list[_WaitingChange] = []
        self._recent: list[tuple[Entry, object] | None] = [None] * RECENT_RESULTS
        """The last RECENT_RESULTS applied entries and their results, by index modulo."""
        self._reads: dict[int, tuple[float, Completion]] = {}
        self._next_read_id = rng.getrandbits(52)
        """Read ids start at a random value each run, as forward ids do: a follower's reads go
        to the leader by id, and the leader may answer them after this node restarted (the
        answer queued while the link was down). With ids restarting at 1, an answer for the
        previous run's read served a new read of the same id at an old read index: a stale
        read (found by the fault tests, seed 107, secure, kills)."""
        self._soft = SoftState(core.role, core.leader, core.term)
        self._members = core.membership
        self._applied_membership = core.membership
        """The configuration applied as of the last tick (until the first: the latest one):
        its members keep their links."""
        self._link_drain_ticks = 0
        self.incarnation = ""
        """This node's data dir's incarnation (the runtime sets it; "" in tests: none)."""
        self._seen_incarnations: dict[str, str] = {}
        """Members' incarnations seen in handshakes and not recorded yet (for the leader)."""
        self._incarnation_retry_at: dict[str, float] = {}
        self.watches = WatchRegistry(floor_index=state_machine.applied_index)
        self.leases = LeaseExpiry()
        self._lease_term: int | None = None
        self._snapshot_in_progress = False
        self._last_snapshot_index = core.snapshot_meta.index
        self._ticks = 0
        self.quota_bytes = quota_bytes
        self.storage_full: str | None = None
        """The cause ("map_full" or "disk_full") while this node's storage is full: latched
        until its alarm was applied and disarmed (see _storage_full_cleared)."""
        self._full_alarm_seen = False
        self._retry_save_at = 0.0
        self._alarm_proposed_at = -1e9
        self._dropped_count = 0
        self._dropped_log_at = 0.0
        self._too_large_log = RateLimitedLog(TOO_LARGE_LOG_S, clock=self._clock)
        self.fatal: str | None = None
        self.reachable: dict[str, bool] = {}
        self.state_listeners: list[Callable[[SoftState], None]] = []
        """Called after every role, term or leader change, and after the token table changed
        (the workers' copy of the node's state is pushed then)."""
        self.forwarder: Forwarding | None = None
        """Set by the composition root: follower-to-leader forwarding."""

    # ------------------------------------------------------------------ state
    @property
    def role(self) -> Role:
        return self._soft.role

    @property
    def leader(self) -> str | None:
        return self._soft.leader

    @property
    def term(self) -> int:
        return self._soft.term

    def address_of(self, node_id: str) -> str | None:
        return self._addresses.get(node_id)

    @property
    def last_snapshot_index(self) -> int:
        return self._last_snapshot_index

    def note_peer_state(self, peer: str, up: bool) -> None:
        self.reachable[peer] = up

    # ------------------------------------------------------------------ writes
    def propose(self, data: bytes, done: Completion) -> None:
        """Propose a client command; `done` gets the apply result (or the error). A follower
        forwards it to the leader. A command over the core's max_entry_bytes is refused here
        (invalid_request, on any node: no leader appends it). A command that adds data is
        refused here (507) while the NOSPACE alarm is raised, or when it would take the state
        past the quota (which raises the alarm)."""
        try:
            self.core.check_proposal_size(data)
        except ProposalTooLarge as e:
            self.metrics.proposals_rejected.inc()
            done.fail(InvalidRequestError(str(e)))
            return
        refusal = self._space_refusal(data)
        if refusal is not None:
            self.metrics.proposals_rejected.inc()
            done.fail(refusal)
            return
        core = self.core
        if core.role is Role.LEADER:
            try:
                index = self.propose_here(data)
            except ServiceError as e:
                done.fail(e)
                return
            self._proposals[index] = _Pending(core.term, None, done)
        elif core.leader is not None and self.forwarder is not None:
            self.forwarder.forward_proposal(data, done)
        else:
            done.fail(NoLeaderError("no leader is known yet"))

    def propose_here(self, data: bytes) -> int:
        """As the leader, append `data` to the log; its index. NoLeaderError when it
        cannot for now, InvalidRequestError when it never will (over max_entry_bytes)."""
        try:
            return self.core.propose(data)
        except (NotLeader, ProposalDropped) as e:
            self.metrics.proposals_rejected.inc()
            raise NoLeaderError(str(e)) from None
        except ProposalTooLarge as e:
            self.metrics.proposals_rejected.inc()
            raise InvalidRequestError(str(e)) from None

    # ------------------------------------------------------------------ quota and alarms
    def _space_refusal(self, data: bytes) -> StorageFullError | None:
        """Why a client command must not be proposed for lack of space, or None. On the hot
        path: two attribute reads and a comparison; the command is decoded only when the
        alarm is raised or the quota would be passed (deletes still go through)."""
        sm = self.sm
        if (self.storage_full is None and not sm.alarm_active
                and sm.size_bytes + len(data) <= self.quota_bytes):
            return None
        try:
            cmd, _ = decode_command(data)
        except CommandDecodeError:
            return None  # the state machine answers it (invalid_command)
        if not adds_data(cmd):
            return None
        if sm.alarm_active:  # the leader's address: the worker adds it to every error
            return nospace_error((a.node_id, a.cause) for a in sm.alarms)
        cause = self.storage_full or "quota"
        self.raise_alarm(cause)
        if cause == "quota":
            what = (f"the key-value data is at {sm.size_bytes} of its {self.quota_bytes}-byte "
                    "quota (RAFTKV_QUOTA_BYTES)")
        elif cause == "map_full":
            what = "this node's LMDB map is at its maximum size (RAFTKV_MAX_MAP_SIZE_MB)"
        else:
            what = "this node's disk is full"
        return StorageFullError(
            f"{what}: the NOSPACE alarm is being raised, and writes that add data are refused "
            "on every node; reads and deletes work. Free space, then `raftkv alarm disarm`")

    def raise_alarm(self, cause: str) -> None:
        """Propose AlarmRaise(this node, cause) without waiting (a follower forwards it), at
        most once per ALARM_RETRY_S, unless it is raised already."""
        now = self._clock()
        core = self.core
        if now - self._alarm_proposed_at < ALARM_RETRY_S or any(
                a.node_id == core.id and a.cause == cause for a in self.sm.alarms):
            return
        self._alarm_proposed_at = now
        data = encode_command(AlarmRaise(core.id, cause))
        log.warning("event=alarm_raising alarm=NOSPACE node=%s cause=%s size_bytes=%d "
                    "quota_bytes=%d", core.id, cause, self.sm.size_bytes, self.quota_bytes)
        if core.role is Role.LEADER:
            try:
                core.propose(data)
            except (NotLeader, ProposalDropped):
                self._alarm_proposed_at = -1e9  # try again at the next chance
            except ProposalTooLarge as e:  # tried again after ALARM_RETRY_S, in vain
                self._own_proposal_too_large("alarm_raise", e)
        elif core.leader is not None and self.forwarder is not None:
            self.forwarder.forward_proposal(data, _IGNORED)
        else:
            self._alarm_proposed_at = -1e9

    def propose_conf_change(self, change: ConfChange, done: Completion,
                            wait_s: float | None = None) -> None:
        """Propose a membership change here or forward it to the leader; `done` gets the
        result once applied. `wait_s` bounds how long a removal refused only for now may
        wait here (see propose_conf_change_here)."""
        core = self.core
        if core.role is not Role.LEADER:
            if core.leader is None or core.leader == core.id or self.forwarder is None:
                done.fail(NoLeaderError("no leader is known yet; retry"))
            else:
                self.forwarder.forward_conf_change(change, done)
            return

        def proposed(index: int) -> None:
            self._proposals[index] = _Pending(self.core.term, None, done)

        self.propose_conf_change_here(change, proposed, done.fail, wait_s)

    def propose_conf_change_here(self, change: ConfChange, proposed: Callable[[int], None],
                                 failed: Callable[[ServiceError], None],
                                 wait_s: float | None = None) -> None:
        """As the leader, append a membership change and pass its index to `proposed`; a
        removal the core refuses only for now is tried again for up to `conf_change_wait_s`
        (or `wait_s`, if shorter). `failed` gets MembershipChangeError or NoLeaderError when
        it cannot be appended, InvalidRequestError when it never will (its entry is over
        max_entry_bytes)."""
        wait = 0.0
        if change.op is ConfChangeOp.REMOVE:
            wait = self._conf_change_wait_s if wait_s is None else min(wait_s,
                                                                       self._conf_change_wait_s)
        self._waiting_changes.append(
            _WaitingChange(change, proposed, failed, self._clock() + wait))
        self._retry_conf_changes()

    def _retry_conf_changes(self) -> None:
        waiting, self._waiting_changes = self._waiting_changes, []
        now = self._clock()
        for w in waiting:
            try:
                index = self.core.propose_conf_change(w.change)
            except NotLeader as e:
                w.failed(NoLeaderError(str(e)))
            except (ConfChangeRejected, ProposalDropped) as e:
                if now < w.until and (isinstance(e, ProposalDropped) or e.transient):
                    self._waiting_changes.append(w)
                else:
                    w.failed(MembershipChangeError(str(e)))
            except ProposalTooLarge as e:
                w.failed(InvalidRequestError(str(e)))
            except RaftError as e:
                w.failed(MembershipChangeError(str(e)))
            else:
                self._note_address(w.change)
                w.proposed(index)

    def on_apply(self, index: int, term: int, done: Completion) -> None:
        """`done` gets the result of the entry this leader just proposed at (index, term)."""
        self._proposals[index] = _Pending(term, None, done)

    def await_entry(self, index: int, term: int, expect: Expect, done: Completion) -> None:
        """A proposal made through the leader (forwarded) sits at (index, term): answer `done`
        when this node applies it, if the entry there holds `expect`."""
        self.core.learn_commit(index, term)
        if index <= self.sm.applied_index:
            got = self._recent[index % RECENT_RESULTS]
            if (got is not None and got[0].index == index and got[0].term == term
                    and holds(got[0], expect)):
                done.ok(got[1])
            else:
                done.fail(OutcomeUnknownError("the write's outcome is unknown"))
            return
        self._proposals[index] = _Pending(term, expect, done)

    # ------------------------------------------------------------------ reads
    def read(self, deadline: float, done: Completion) -> None:
        """A linearizable read barrier (ReadIndex): `done.ok(index)` once a quorum confirmed
        this leader's leadership after now and the state machine applied up to `index`.
        All reads of one turn share one heartbeat round (the core batches them)."""
        rid = self._next_read_id
        self._next_read_id += 1
        self._reads[rid] = (deadline, done)
        self.core.read_index(rid)

    def _on_read(self, request_id: int, index: int) -> None:
        entry = self._reads.pop(request_id, None)
        if entry is not None:
            entry[1].ok(index)

    def _on_read_failed(self, request_id: int) -> None:
        entry = self._reads.pop(request_id, None)
        if entry is not None:
            entry[1].fail(NoLeaderError("leadership could not be confirmed; retry"))

    # ------------------------------------------------------------------ leases
    def lease_keepalive(self, lease_id: int, deadline: float, done: Completion) -> None:
        """Restart a lease's TTL (raftkv.kv.leases, rule 3): on the leader, once it applied
        an entry of its term, then answered (the TTL) after a quorum confirmed it still
        leads; a follower forwards it."""
        if self.core.role is not Role.LEADER:
            self._forward_lease(codec.ForwardOp.LEASE_KEEPALIVE, lease_id, done)
            return
        try:
            ttl_s = self.leases.keepalive(lease_id, self._clock())
        except NotLeaseLeader:
            done.fail(NoLeaderError("the leader is still taking office; retry"))
            return
        if ttl_s is None:
            done.fail(LeaseNotFoundError(f"lease {lease_id} does not exist (or is expiring)",
                                         lease_id=lease_id))
            return
        self.read(deadline, _Mapped(done, lambda _index: ttl_s))

    def lease_info(self, lease_id: int, deadline: float, done: Completion) -> None:
        """One lease as [id, ttl, remaining, [keys], key_count], read on the leader after a
        read barrier (a follower forwards it)."""
        if self.core.role is not Role.LEADER:
            self._forward_lease(codec.ForwardOp.LEASE_INFO, lease_id, done)
            return

        def answer(_index: object) -> object:
            record = self.sm.lease(lease_id, MAX_LEASE_KEYS_SHOWN)
            if record is None:
                raise LeaseNotFoundError(f"lease {lease_id} does not exist",
                                         lease_id=lease_id)
            return self._lease_row(record.lease_id, record.ttl_s, list(record.keys),
                                   record.key_count)

        self.read(deadline, _Mapped(done, answer))

    def lease_list(self, limit: int, deadline: float, done: Completion) -> None:
        """Up to `limit` leases as rows (without keys), read like lease_info."""
        if self.core.role is not Role.LEADER:
            self._forward_lease(codec.ForwardOp.LEASE_LIST, limit, done)
            return
        self.read(deadline, _Mapped(done, lambda _index: [
            self._lease_row(r.lease_id, r.ttl_s, [], r.key_count)
            for r in self.sm.leases(limit)]))

    def _lease_row(self, lease_id: int, ttl_s: int, keys: list[str],
                   key_count: int) -> list[object]:
        try:
            remaining = self.leases.remaining(lease_id, self._clock())
        except NotLeaseLeader:
            remaining = float(ttl_s)  # taking office: every lease gets a full TTL
        return [lease_id, ttl_s, float(ttl_s if remaining is None else remaining), keys,
                key_count]

    def _forward_lease(self, op: codec.ForwardOp, number: int, done: Completion) -> None:
        if self.core.leader is None or self.forwarder is None:
            done.fail(NoLeaderError("no leader is known yet; retry"))
        else:
            self.forwarder.forward_lease(op, number, done)

    # ------------------------------------------------------------------ peers
    def step(self, peer_id: str, m: Message) -> str | None:
        """A Raft message from the peer that authenticated its connection: stepped, or
        refused with the reason (it claims another sender, or is not for this node). The
        core drops what a correct peer could not send (raftkv.core.node._malformed)."""
        if m.frm != peer_id:
            return f"{type(m).__name__} claims to be from {m.frm[:64]!r}"
        if m.to != self.core.id:
            return f"{type(m).__name__} is for {m.to[:64]!r}"
        if (self.storage_full is not None and self._clock() < self._retry_save_at
                and (isinstance(m, SnapshotRequest)
                     or (isinstance(m, AppendRequest) and m.entries))):
            return None  # the disk just refused a save: the leader resends later
        self.core.step(m)  # the core checks the rest (Ready.dropped: _log_dropped)
        return None

    # ------------------------------------------------------------------ the turn
    def tick(self) -> None:
        if self.fatal is not None:
            return
        self.core.tick()
        applied = self.core.membership_at(self.sm.applied_index)
        if applied != self._applied_membership:
            # A tick runs before its turn's apply, so what earlier turns applied has been
            # answered and flushed: a removed node's link can go now, not with its answer,
            # unless that answer still waits behind other frames to it, or the link refused
            # it and the forwarder keeps it to offer again (a bounded wait).
            gone = self._applied_membership.members - applied.members
            forwarder = self.forwarder
            if (any(self.frames.has_output(p)
                    or (forwarder is not None and forwarder.keeps_answers_for(p))
                    for p in gone)
                    and self._link_drain_ticks < LINK_DRAIN_TICKS):
                self._link_drain_ticks += 1
            else:
                self._link_drain_ticks = 0
                self._applied_membership = applied
                self.sync_peers()
        self._ticks += 1
        if self._ticks % HOUSEKEEPING_TICKS == 0:
            self._housekeeping(self._clock())
        if self.leases.leading:
            self._expire_leases()

    def process(self) -> None:
        """Handle every Ready (end of the loop turn)."""
        if self.fatal is not None:
            return
        if self._waiting_changes:
            self._retry_conf_changes()  # the acknowledgements stepped this turn may do
        if self._defer_persist():
            return
        try:
            self._handle_readies()
        except StorageError as e:
            self.die(f"storage failure: {e}")

    def _defer_persist(self) -> bool:
        """Should the leader's next fsync wait for the acks of what it saved already?

        The loop is one thread: while it fsyncs it reads nothing. The followers' acks for the
        previous batch arrive about one fsync after it was sent; a new fsync started just
        before they arrive holds them (and so the commit of that batch, and its answers) for
        a whole fsync more. So the leader waits, at most `persist_defer_s`, while entries it
        saved are not committed yet, then saves the new ones (with more writes in the batch
        meanwhile) and applies the committed ones in the same Ready."""
        core = self.core
        log = core.log
        if (core.role is not Role.LEADER or log.commit >= log.stable_index
                or log.unstable_from > log.last_index() or self.persist_defer_s <= 0):
            self._defer_started = 0.0
            return False
        now = self._clock()
        if not self._defer_started:
            self._defer_started = now
            self._wake_at(now + self.persist_defer_s)
            return True
        if now - self._defer_started < self.persist_defer_s:
            return True
        self._defer_started = 0.0
        return False

    def _handle_readies(self) -> None:
        core = self.core
        while core.has_ready():
            rd = core.ready()
            for why in rd.dropped:
                self._log_dropped(why)
            if rd.soft_state is not None:
                self._on_soft_state(rd.soft_state)
            # What a member presented goes with its removal, seen in these entries (its
            # re-add may be in them too) or covered by a snapshot.
            for e in rd.entries:
                if e.kind is EntryKind.CONF_CHANGE and e.change is not None:
                    self._note_address(e.change)
                    if e.change.op is ConfChangeOp.REMOVE:
                        self._forget_incarnation(e.change.node_id)
            if rd.snapshot is not None:
                for nid in list(self._seen_incarnations):
                    self._forget_incarnation(nid)
            try:
                self._handle(rd)
            except StorageFull as e:
                self._on_storage_full(e)
                return
            if self.storage_full is not None and rd.must_sync and self._storage_full_cleared():
                log.warning("event=storage_writable node=%s cause=%s", core.id,
                            self.storage_full)
                self.storage_full = None
                self._full_alarm_seen = False
            if core.membership != self._members:
                self._on_membership_change()
        if not self._snapshot_in_progress and self._policy.should_snapshot(
                self.sm.applied_index, self._last_snapshot_index, self.core.sending_snapshot):
            self._start_snapshot()

    def _handle(self, rd: Ready) -> None:
        self.handler.handle(rd)
        if rd.snapshot is not None:
            self._fail_covered(self.sm.applied_index)
            self.watches.restored(self.sm.applied_index, self.sm.get)
            self.metrics.snapshots.labels("installed").inc()
            self._state_changed()
            if self.leases.leading:  # a leader never installs one; be safe all the same
                self.leases.stepped_down()
                self._lease_term = None
            log.info("event=snapshot_installed node=%s index=%d term=%d bytes=%d",
                     self.core.id, rd.snapshot.meta.index, rd.snapshot.meta.term,
                     rd.snapshot.length)

    def _fail_covered(self, applied: int) -> None:
        """Writes waiting for entries an installed snapshot covered (a forwarded write's
        position, learnt from the leader, that never reached this node's log): they are
        committed, but this node never applied them and cannot tell their results."""
        covered = [i for i in self._proposals if i <= applied]
        if covered:
            self._fail_unknown(covered, OutcomeUnknownError(
                "a snapshot covered the write before this node applied it: the write's "
                "outcome is unknown"))

    def _fail_unknown(self, indexes: list[int], err: OutcomeUnknownError) -> None:
        """Answer the writes waiting at `indexes` with `err` (their outcome is unknown)."""
        for index in indexes:
            self._proposals.pop(index).done.fail(err)
        self.metrics.proposals_unknown.inc(len(indexes))

    def _log_dropped(self, why: str) -> None:
        """A peer message the core ignored as invalid: counted, one warning per
        DROPPED_LOG_S."""
        self._dropped_count += 1
        self.metrics.peer_messages_dropped.inc()
        now = self._clock()
        if now >= self._dropped_log_at:
            self._dropped_log_at = now + DROPPED_LOG_S
            log.warning("event=peer_message_dropped node=%s dropped=%d reason=%s",
                        self.core.id, self._dropped_count, why)

    def _own_proposal_too_large(self, proposal: str, e: ProposalTooLarge) -> None:
        """The core refused a proposal of the driver's own as over Config.max_entry_bytes (a
        config that leaves too little room): logged at most once per TOO_LARGE_LOG_S for
        each kind; the caller retries as it does after any refusal."""
        if self._too_large_log.admit(self.core.id, proposal) is not None:
            log.error("event=proposal_too_large node=%s proposal=%s error=%s", self.core.id,
                      proposal, e)

    def _persist_timed(self, seconds: float, entries: int) -> None:
        self.metrics.fsync_seconds.observe(seconds)
        self.metrics.batch_entries.observe(entries)

    def _apply_timed(self, seconds: float) -> None:
        self.metrics.apply_seconds.observe(seconds)

    def _on_applied(self, entry: Entry, result: object) -> None:
        index = entry.index
        if self._proposals:
            pending = self._proposals.pop(index, None)
            if pending is not None:
                self._answer(entry, pending, result)
        if self.watches.wants(result, index):
            self.watches.applied(index, entry.data, result, self.sm.get)
        kind = type(result)
        if kind is not DeleteResult and (kind is not PutResult
                                         or result.ttl_s is not None):  # type: ignore[attr-defined]
            # Not a plain put or delete: a lease, an auth change, a batch, a no-op...
            self.leases.applied(result, index, self._clock())
            self.metrics.note_lease_result(result, index)
            if isinstance(result, AUTH_RESULTS):
                self._state_changed()  # the token table changed: workers must see it now
            elif (isinstance(result, AlarmResult) and self.storage_full is not None
                  and any(a.node_id == self.core.id for a in result.alarms)):
                self._full_alarm_seen = True
        if self._lease_term != entry.term and entry.term == self.core.term and (
                self.core.role is Role.LEADER):
            # The leader applied the first entry of its term: it knows every lease now.
            self.leases.became_leader(self.sm.lease_ttls, self._clock())
            self._lease_term = entry.term
        self._recent[index % RECENT_RESULTS] = (entry, result)
        if entry.change is not None:
            self._note_address(entry.change)
            log.log(logging.INFO if index > self._boot_commit else logging.DEBUG,
                    "event=member_%s node=%s member=%s index=%d",
                    "removed" if entry.change.op is ConfChangeOp.REMOVE else "added",
                    self.core.id, entry.change.node_id, index)

    def _answer(self, entry: Entry, pending: _Pending, result: object) -> None:
        if pending.term == entry.term and holds(entry, pending.expect):
            pending.done.ok(result)
            self.metrics.proposals_committed.inc()
        elif pending.term == entry.term:
            # Never hand a client another write's answer (a mix-up of forwarded ids).
            log.error("event=forward_mismatch node=%s index=%d", self.core.id, entry.index)
            pending.done.fail(OutcomeUnknownError("the write's outcome is unknown"))
        else:
            pending.done.fail(NoLeaderError("the write was overwritten by a new leader; retry"))
            self.metrics.proposals_dropped.inc()

    # ------------------------------------------------------------------ leases
    def _expire_leases(self) -> None:
        for lease_id in self.leases.due(self._clock()):
            if self.core.role is not Role.LEADER:
                self.leases.revoke_failed(lease_id)
                continue
            try:
                index = self.core.propose(encode_command(LeaseRevoke(lease_id, expired=True)))
            except (NotLeader, ProposalDropped):
                self.leases.revoke_failed(lease_id)
                continue
            except ProposalTooLarge as e:  # due again at the next tick, in vain
                self.leases.revoke_failed(lease_id)
                self._own_proposal_too_large("lease_revoke", e)
                continue
            log.debug("event=lease_expiring node=%s lease=%d index=%d", self.core.id,
                      lease_id, index)

    # ------------------------------------------------------------------ membership
    def _note_address(self, change: ConfChange) -> None:
        if change.op is not ConfChangeOp.REMOVE and change.address:
            self._addresses[change.node_id] = change.address

    def _forget_incarnation(self, node_id: str) -> None:
        self._seen_incarnations.pop(node_id, None)
        self._incarnation_retry_at.pop(node_id, None)

    def _on_membership_change(self) -> None:
        self._members = self.core.membership
        self.sync_peers()

    def sync_peers(self) -> None:
        # A node that is joining knows no members yet: it accepts every known address.
        members = set(self.core.membership.members or self._addresses)
        # A leader that is removing itself is no member in the configuration its followers
        # appended, but it still replicates until that configuration commits: keep talking
        # to the leader (dissertation §4.2.2), or its removal can only commit through an
        # election.
        if self.core.leader is not None:
            members.add(self.core.leader)
        # A member being removed keeps its link until the removal is applied, and until the
        # next tick after that: a removal it forwarded itself is answered over that link.
        members.update(self._applied_membership.members)
        members.update(self.core.membership_at(self.sm.applied_index).members)
        self.frames.set_peers({nid: self._addresses[nid] for nid in members
                               if nid != self.core.id and nid in self._addresses})

    def learn_addresses(self, addresses: Mapping[str, str]) -> None:
        """Peer addresses learned outside the log (a joining node asks the cluster)."""
        for nid, addr in addresses.items():
            if nid != self.core.id and addr:
                self._addresses[nid] = addr
        self.sync_peers()

    def _promote_caught_up_learners(self) -> None:
        core = self.core
        if core.role is not Role.LEADER or not core.membership.learners:
            return
        status = core.status()
        for nid in sorted(core.membership.learners):
            peer = status.peers.get(nid)
            if peer is not None and peer.match >= status.commit_index:
                try:
                    core.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, nid,
                                                        self._addresses.get(nid, "")))
                    log.info("event=learner_promoted node=%s member=%s", core.id, nid)
                except RaftError:
                    pass  # another change is pending; try again later
                return

    def transfer_leadership(self, target: str | None) -> str:
        """Start handing leadership to `target`, or to the most caught-up live voter;
        returns the chosen node. MembershipChangeError when there is none."""
        core = self.core
        status = core.status()
        if target is None:
            voters = [nid for nid, p in status.peers.items()
                      if nid != core.id and nid in status.membership.voters and p.recent_active]
            if not voters:
                raise MembershipChangeError("no live voter to hand leadership to")
            target = max(voters, key=lambda nid: (status.peers[nid].match, nid))
        if target == core.id:
            return target
        try:
            core.transfer_leader(target)
        except RaftError as e:
            raise MembershipChangeError(str(e)) from None
        log.info("event=leadership_transfer node=%s to=%s term=%d", core.id, target, core.term)
        return target

    # ------------------------------------------------------------------ snapshots
    def _start_snapshot(self) -> None:
        core = self.core
        index = self.sm.applied_index
        term = core.log.term(index)
        if term is None or index <= core.snapshot_meta.index:
            return
        meta = SnapshotMeta(index, term, core.membership_at(index))
        view = self.sm.snapshot_view()  # a cheap consistent copy, on this thread
        self._snapshot_in_progress = True
        threading.Thread(target=self._write_snapshot, args=(meta, view),
                         name="snapshot-writer", daemon=True).start()

    def _write_snapshot(self, meta: SnapshotMeta, view: KVSnapshotView) -> None:
        """Off the loop: serialise and save, streamed (never whole in memory); the result
        goes back to the loop."""
        started = time.monotonic()
        try:
            sink = self.snapshots.create(meta)
            try:
                for chunk in iter_snapshot_chunks(view):
                    sink.write(chunk)
            except BaseException:
                sink.cancel()
                raise
            snapshot = sink.close()
        except StorageError as e:
            error = str(e)
            log.error("event=snapshot_failed node=%s index=%d error=%s", self.core.id,
                      meta.index, error)
            self._post(self._snapshot_failed)
            return
        seconds = time.monotonic() - started
        self.metrics.snapshot_seconds.observe(seconds)
        self.metrics.snapshot_bytes.set(snapshot.length)
        self.metrics.snapshots.labels("taken").inc()
        self._post(lambda: self._snapshot_done(snapshot, seconds))

    def _snapshot_failed(self) -> None:
        self._snapshot_in_progress = False

    def _snapshot_done(self, snapshot: Snapshot, seconds: float) -> None:
        self._snapshot_in_progress = False
        if self.fatal is not None:
            return
        meta = snapshot.meta
        keep_from = self._policy.compact_before(meta.index, self.core.compaction_hold())
        self.core.compact(snapshot, keep_from)
        try:
            self.storage.compact(keep_from)
        except StorageError as e:
            self.die(f"storage failure while compacting the log: {e}")
            return
        self._last_snapshot_index = meta.index
        log.info("event=snapshot_taken node=%s index=%d term=%d bytes=%d seconds=%.3f",
                 self.core.id, meta.index, meta.term, snapshot.length, seconds)

    # ------------------------------------------------------------------ state changes
    def _on_soft_state(self, ss: SoftState) -> None:
        prev = self._soft
        self._soft = ss
        core = self.core
        if ss.role is not prev.role or ss.term != prev.term:
            log.info("event=became_%s node=%s term=%d leader=%s last_index=%d commit=%d",
                     ss.role.value, core.id, ss.term, ss.leader or "-",
                     core.log.last_index(), core.log.commit)
        elif ss.leader != prev.leader:
            log.info("event=leader_changed node=%s term=%d leader=%s", core.id, ss.term,
                     ss.leader or "-")
        if self._lease_term is not None and (ss.role is not Role.LEADER
                                             or ss.term != self._lease_term):
            self.leases.stepped_down()
            self._lease_term = None
        if ss.term != prev.term or (prev.role is Role.LEADER and ss.role is not Role.LEADER):
            # Leadership or term changed: writes in flight above the commit index may or may
            # not commit. Those at or below it are decided (e.g. the entry whose commit made
            # this leader step down: its own removal) and wait for their apply, where
            # _on_applied compares terms; unless a snapshot already covered them.
            err = OutcomeUnknownError("leadership changed before the write was applied")
            applied = self.sm.applied_index
            self._fail_unknown(
                [i for i in self._proposals if i > core.log.commit or i <= applied], err)
        if ss.leader != prev.leader:
            self.metrics.leader_changes.inc()
            if prev.leader is not None and prev.leader not in core.membership.members:
                self.sync_peers()  # the link to a removed leader was kept only while it led
        # A new leader, or the same one in a new term (it restarted, or stepped down, and was
        # elected again: seen here with no turn between): what was forwarded to it before
        # may never be answered. (From no leader to one: only a node's wait for its own
        # removal is left.)
        new_leader = ss.leader != prev.leader or (ss.term != prev.term
                                                  and prev.leader is not None)
        if new_leader and self.forwarder is not None and (prev.leader is not None
                                                          or self.forwarder.waiting):
            self.forwarder.leader_changed()
        for listener in self.state_listeners:
            listener(ss)

    def _state_changed(self) -> None:
        for listener in self.state_listeners:
            listener(self._soft)

    # ------------------------------------------------------------------ incarnations
    def check_incarnation(self, node_id: str, incarnation: str) -> str | None:
        """Member `node_id`'s handshake presented `incarnation` (its data dir's): why it is
        refused, when the cluster recorded another one for it (its data dir was wiped or
        replaced: a voter that forgot its votes and log can elect a node that missed
        committed writes), else None. A first one is noted for the leader to record."""
        known = self.sm.incarnations.get(node_id)
        if known is None:
            if node_id in self.core.membership.members:  # (not a link kept after a removal)
                self._seen_incarnations[node_id] = incarnation
            return None
        if known != incarnation:
            return (f"runs on another data dir (incarnation {incarnation}) than the one the "
                    f"cluster recorded for it ({known}): it was wiped or replaced")
        return None

    def _record_incarnations(self, now: float) -> None:
        """The leader proposes MemberIncarnation for each member it has seen (itself too)
        that has none recorded (at most once per INCARNATION_RETRY_S each)."""
        core = self.core
        if core.role is not Role.LEADER:
            return
        recorded = self.sm.incarnations
        seen = self._seen_incarnations
        if self.incarnation and core.id not in recorded:
            seen[core.id] = self.incarnation
        for nid, incarnation in list(seen.items()):
            if nid in recorded:
                del seen[nid]
                continue
            if nid not in self.sm.addresses or now < self._incarnation_retry_at.get(nid, 0.0):
                continue  # no member (yet): its addition applies first
            try:
                core.propose(encode_command(MemberIncarnation(nid, incarnation)))
            except ProposalTooLarge as e:  # tried again after INCARNATION_RETRY_S, in vain
                self._own_proposal_too_large("member_incarnation", e)
            except (NotLeader, ProposalDropped, ValueError):
                return
            self._incarnation_retry_at[nid] = now + INCARNATION_RETRY_S

    def _housekeeping(self, now: float) -> None:
        self._record_incarnations(now)
        expired = [rid for rid, (deadline, _) in self._reads.items() if deadline < now]
        for rid in expired:
            self._reads.pop(rid)[1].fail(NoLeaderError("read timed out"))
        if self.forwarder is not None:
            self.forwarder.expire(now)
        self._promote_caught_up_learners()
        if self.storage_full is not None and not self._full_alarm_seen:
            self.raise_alarm(self.storage_full)  # until it is applied

    def _storage_full_cleared(self) -> bool:
        """After a successful save: may the storage-full latch go? Once this node's alarm
        was applied and then disarmed (an operator freed space); a node alone at once (no
        alarm can commit without its own disk)."""
        if not self.core.membership.members - {self.core.id}:
            return True
        return self._full_alarm_seen and not self.sm.alarm_active

    def _on_storage_full(self, e: StorageFull) -> None:
        """Nothing of the failed Ready reached the disk. Forget it as a crash would, by
        rebuilding the core from storage (a leader steps down: it cannot log), refuse
        writes that add data, and raise the NOSPACE alarm through the others (a full disk
        is not a failed one: the node keeps serving reads, and catches up once there is
        room)."""
        cause = e.cause if e.cause in ("map_full", "disk_full") else "disk_full"
        if self.storage_full is None:
            log.error("event=storage_full node=%s cause=%s error=%s action=refusing_writes",
                      self.core.id, cause, e)
        self.storage_full = cause
        self._full_alarm_seen = False
        self._retry_save_at = self._clock() + SAVE_RETRY_S
        full = StorageFullError("this node's storage is full: writes that add data are "
                                "refused; reads still work")
        # Only a node without peers knows that a write whose entry was not saved is lost
        # (with peers, the entry was sent before the save failed and may commit there); a
        # saved entry may commit in any case. fail_everything answers the rest "unknown".
        if not self.core.membership.members - {self.core.id}:
            saved = self.core.log.stable_index
            for index in [i for i in self._proposals if i > saved]:
                self._proposals.pop(index).done.fail(full)
        self.fail_everything(full)
        self.core = self._reboot_core()
        self.handler.node = self.core
        if self.forwarder is not None:
            self.forwarder.core = self.core
        prev = self._soft
        # The leader of the same term is still the leader: hearing from it again is no change.
        leader = prev.leader if prev.term == self.core.term and prev.leader != self.core.id \
            else None
        self._soft = SoftState(self.core.role, leader, self.core.term)
        self.leases.stepped_down()
        self._lease_term = None
        for listener in self.state_listeners:
            listener(self._soft)
        self.raise_alarm(cause)

    def _reboot_core(self) -> RaftNode:
        boot, _ = load_boot_state(self.storage, self.snapshots, BASE_MEMBERSHIP)
        applied = self.sm.applied_index
        hs = boot.hard_state
        # Everything applied was committed and is on this disk (the core applies only
        # persisted entries), so the commit index on disk may be raised to it.
        boot = BootState(HardState(hs.term, hs.vote, max(hs.commit, applied)), boot.snapshot,
                         boot.entries, applied)
        return RaftNode(self.core.config, boot, self._rng,
                        snapshot_reader=chunk_reader(self.snapshots),
                        snapshot_validator=self.sm.snapshot_decoder)

    def fail_everything(self, err: ServiceError) -> None:
        """Fail every waiting operation with `err`, except writes already handed to Raft
        (proposed here, or forwarded to the leader): those may still commit whatever happens
        to this node, so their outcome is unknown."""
        in_flight = OutcomeUnknownError(f"{err.message}; the write was already proposed and "
                                        "may still be applied")
        for pending in self._proposals.values():
            pending.done.fail(in_flight)
        self._proposals.clear()
        waiting, self._waiting_changes = self._waiting_changes, []
        not_made = UnavailableError(f"{err.message}; the membership change was not made, "
                                    "retry")
        for change in waiting:  # never proposed: surely without effect
            change.failed(not_made)
        if self.forwarder is not None:
            self.forwarder.fail_all(in_flight)
        for _, done in self._reads.values():
            done.fail(err)
        self._reads.clear()

    def die(self, reason: str) -> None:
        """A local storage failure: stop serving (the composition root stops the node)."""
        if self.fatal is not None:
            return
        self.fatal = reason
        log.critical("event=node_stopped node=%s reason=%s", self.core.id, reason)
        self.fail_everything(UnavailableError(f"node stopped: {reason}"))
        self.watches.close(UnavailableError("the node stopped"))
        for listener in self.state_listeners:
            listener(self._soft)


class _Ignored:
    """A completion nobody waits for (the node's own alarm proposals)."""

    __slots__ = ()

    def ok(self, value: object) -> None:
        pass

    def fail(self, error: ServiceError) -> None:
        pass


_IGNORED: Final = _Ignored()


class _Mapped:
    """A completion that answers `done` with fn(value); a ServiceError fn raises fails it."""

    __slots__ = ("_done", "_fn")

    def __init__(self, done: Completion, fn: Callable[[object], object]) -> None:
        self._done = done
        self._fn = fn

    def ok(self, value: object) -> None:
        try:
            result = self._fn(value)
        except ServiceError as e:
            self._done.fail(e)
            return
        self._done.ok(result)

    def fail(self, error: ServiceError) -> None:
        self._done.fail(error)


class Forwarding(Protocol):
    """Follower-to-leader forwarding, as the driver uses it (raftkv.runtime.forwarding)."""

    core: RaftNode

    def forward_proposal(self, data: bytes, done: Completion) -> None: ...

    def forward_conf_change(self, change: ConfChange, done: Completion) -> None: ...

    def forward_lease(self, op: codec.ForwardOp, number: int, done: Completion) -> None: ...

    def leader_changed(self) -> None: ...

    @property
    def waiting(self) -> int: ...

    def expire(self, now: float) -> None: ...

    def fail_all(self, error: ServiceError) -> None: ...

    def keeps_answers_for(self, peer: str) -> bool: ...
