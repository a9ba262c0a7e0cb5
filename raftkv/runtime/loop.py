"""The loop thread: the only owner of the Raft core, the stores and the state machine.

Each iteration drains everything queued (client proposals, reads, peer messages, forwarded
writes), ticks on a monotonic clock, then handles every Ready: send, persist ONCE (one
LMDB transaction and fsync however many writes arrived: group commit), apply, advance.
Request threads talk to it only through `submit_*` methods and Waiters.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from raftkv import codec
from raftkv.core import (
    BootState,
    ConfChange,
    ConfChangeOp,
    ConfChangeRejected,
    Entry,
    EntryKind,
    HardState,
    Membership,
    NotLeader,
    ProposalDropped,
    RaftError,
    RaftNode,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)
from raftkv.core.ready import Ready
from raftkv.kv.state_machine import KVSnapshotView, KVStateMachine, iter_snapshot_chunks
from raftkv.metrics import NodeMetrics
from raftkv.ports import RaftStorage, SnapshotStore, StorageError, StorageFull
from raftkv.runtime.boot import load_boot_state
from raftkv.runtime.ready_handler import ReadyHandler, chunk_reader
from raftkv.runtime.waiter import Waiter, WakeSignal
from raftkv.runtime.watch import WatchRegistry
from raftkv.service import (
    MembershipChangeError,
    NoLeaderError,
    OutcomeUnknownError,
    ServiceError,
    StorageFullError,
    UnavailableError,
)
from snapshots.policy import SnapshotPolicy

log = logging.getLogger("raftkv.node")

FRAME_RAFT = 1
FRAME_FORWARD = 2
FRAME_FORWARD_RESULT = 3
FRAME_FORWARD_CONF = 4

_EV_MESSAGE = 0
_EV_PROPOSE = 1
_EV_READ = 2
_EV_CALL = 3
_EV_FORWARD = 4
_EV_FORWARD_RESULT = 5
_EV_FORWARD_CONF = 6

#: The configuration "at index 0" of every raftkv cluster: empty, because a cluster's first
#: log entries add its initial members (see server._write_bootstrap_log), so replaying the log
#: from the start (a restart without snapshot, or a node that joins) rebuilds the membership.
BASE_MEMBERSHIP = Membership(frozenset())

_RECENT_RESULTS = 4096
_MAX_FORWARD_BATCH = 4096


class FrameSender(Protocol):
    """What the loop needs of the peer transport."""

    def send(self, to: str, kind: int, payload: bytes) -> bool: ...

    def set_peers(self, peers: Mapping[str, str]) -> None: ...


@dataclass(frozen=True, slots=True)
class ReadGrant:
    """A linearizable read may be served: the state machine has applied `index`."""

    index: int


class _Transport:
    """Adapts the frame transport to the ports.Transport the ReadyHandler expects."""

    def __init__(self, frames: FrameSender) -> None:
        self._frames = frames

    def send(self, messages: Any) -> None:
        encode = codec.encode_message
        for m in messages:
            self._frames.send(m.to, FRAME_RAFT, encode(m))


class RaftLoop:
    def __init__(
        self,
        *,
        core: RaftNode,
        storage: RaftStorage,
        snapshots: SnapshotStore,
        state_machine: KVStateMachine,
        frames: FrameSender,
        addresses: Mapping[str, str],
        tick_s: float,
        snapshot_policy: SnapshotPolicy,
        on_fatal: Callable[[str], None],
        rng: random.Random,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self._rng = rng
        self.metrics = metrics or NodeMetrics()
        self.core = core
        self.storage = storage
        self.snapshots = snapshots
        self.sm = state_machine
        self.frames = frames
        self._tick_s = tick_s
        self._policy = snapshot_policy
        self._on_fatal = on_fatal
        self._addresses: dict[str, str] = dict(addresses)
        self._addresses.update(state_machine.addresses)
        log_view = core.log
        for e in log_view.slice(log_view.first_index(), log_view.last_index() + 1):
            if e.kind is EntryKind.CONF_CHANGE and e.change is not None:
                self._note_address(e.change)
        self._handler = ReadyHandler(
            node=core, storage=storage, snapshots=snapshots, state_machine=state_machine,
            transport=_Transport(frames), on_applied=self._on_applied,
            on_read=self._on_read, on_read_failed=self._on_read_failed,
            on_persist_timed=self._persist_timed, on_apply_timed=self._apply_timed)
        self._inbox: collections.deque[tuple[int, Any]] = collections.deque()
        self._wake = WakeSignal()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # index -> (term, waiter, what the entry must hold: command bytes or a ConfChange;
        # None for our own proposals, whose (index, term) is unique to them)
        self._proposals: dict[int, tuple[int, Waiter, _Expect]] = {}
        self._recent: collections.OrderedDict[int, tuple[Entry, object]] = (
            collections.OrderedDict())
        self._reads: dict[int, tuple[float, Waiter]] = {}
        self._next_read_id = 1
        self._forward_out: list[tuple[int, bytes]] = []
        self._forwarded: dict[int, tuple[float, Waiter, _Expect]] = {}
        # Random start: an answer the leader queued for an earlier run of this node (before a
        # restart) must not match a forward of this run.
        self._next_forward_id = rng.getrandbits(52)
        self._snapshot_in_progress = False
        self._last_snapshot_index = core.snapshot_meta.index
        self._soft = SoftState(core.role, core.leader, core.term)
        self._members = core.membership
        self.watches = WatchRegistry(floor_index=state_machine.applied_index)
        """Long polls on keys (raftkv.runtime.watch); loop thread only."""
        self.storage_full = False
        self._dropped_count = 0
        self._dropped_log_at = 0.0
        self.fatal: str | None = None
        self._ticks = 0
        self._reachable: dict[str, bool] = {}
        self.stopped = threading.Event()

    # ------------------------------------------------------------------ thread-safe API
    def start(self) -> None:
        self._sync_peers()
        self._thread = threading.Thread(target=self._run, name="raft-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit_proposal(self, data: bytes) -> Waiter:
        w = Waiter()
        self._post(_EV_PROPOSE, (data, w))
        return w

    def submit_read(self, deadline: float) -> Waiter:
        w = Waiter()
        self._post(_EV_READ, (deadline, w))
        return w

    def call(self, fn: Callable[[], object]) -> Waiter:
        """Run fn on the loop thread; its result (or exception) lands in the Waiter."""
        w = Waiter()
        self._post(_EV_CALL, (fn, w))
        return w

    def deliver(self, frm: str, kind: int, payload: bytes) -> None:
        """Transport callback (reader threads): decode and queue; never raises."""
        try:
            if kind == FRAME_RAFT:
                self._post(_EV_MESSAGE, codec.decode_message(payload))
            elif kind == FRAME_FORWARD:
                self._post(_EV_FORWARD, (frm, _decode_forward(payload)))
            elif kind == FRAME_FORWARD_CONF:
                self._post(_EV_FORWARD_CONF, (frm, _decode_forward_conf(payload)))
            elif kind == FRAME_FORWARD_RESULT:
                self._post(_EV_FORWARD_RESULT, _decode_forward_result(payload))
            else:
                log.warning("event=frame_dropped peer=%s reason=unknown_kind kind=%d", frm, kind)
        except Exception as e:  # nothing from the network may crash the node
            log.warning("event=frame_dropped peer=%s reason=malformed error=%s", frm, e)

    @property
    def role(self) -> Role:
        return self._soft.role

    @property
    def leader(self) -> str | None:
        return self._soft.leader

    def _post(self, ev: int, payload: Any) -> None:
        if self.fatal is not None:
            _fail_payload(ev, payload, UnavailableError(f"node stopped: {self.fatal}"))
            return
        self._inbox.append((ev, payload))
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            self._loop()
        except StorageError as e:
            self._die(f"storage failure: {e}")
        except Exception as e:
            log.exception("event=loop_crashed error=%s", e)
            self._die(f"internal error in the Raft loop: {e}")
        finally:
            self._fail_everything(UnavailableError("node is stopping"))
            self.watches.close(UnavailableError("node is stopping"))
            self.stopped.set()

    def _loop(self) -> None:
        clock = time.monotonic
        next_tick = clock() + self._tick_s
        inbox = self._inbox
        while not self._stop.is_set():
            if not inbox:
                self._wake.wait(next_tick - clock())
            for _ in range(len(inbox)):
                ev, payload = inbox.popleft()
                self._dispatch(ev, payload)
            now = clock()
            if now >= next_tick:
                self.core.tick()
                self._ticks += 1
                next_tick += self._tick_s
                if now - next_tick > 5 * self._tick_s:
                    next_tick = now + self._tick_s  # we were stalled: do not burst ticks
                if self._ticks % 10 == 0:
                    self._housekeeping(now)
            self._handle_readies()
            if self._forward_out:
                self._flush_forwards()

    def _dispatch(self, ev: int, payload: Any) -> None:
        core = self.core
        if ev == _EV_MESSAGE:
            core.step(payload)
        elif ev == _EV_PROPOSE:
            data, w = payload
            self._propose(data, w)
        elif ev == _EV_READ:
            deadline, w = payload
            rid = self._next_read_id
            self._next_read_id += 1
            self._reads[rid] = (deadline, w)
            core.read_index(rid)
        elif ev == _EV_FORWARD:
            frm, items = payload
            self._serve_forwarded(frm, items)
        elif ev == _EV_FORWARD_CONF:
            frm, items = payload
            self._serve_forwarded_conf(frm, items)
        elif ev == _EV_FORWARD_RESULT:
            self._forward_results(payload)
        else:
            fn, w = payload
            try:
                w.set_result(fn())
            except Exception as e:
                w.set_error(e)

    def _handle_readies(self) -> None:
        core = self.core
        while core.has_ready():
            rd = core.ready()
            for why in rd.dropped:
                self._log_dropped(why)
            if rd.soft_state is not None:
                self._on_soft_state(rd.soft_state)
            for e in rd.entries:
                if e.kind is EntryKind.CONF_CHANGE and e.change is not None:
                    self._note_address(e.change)
            try:
                self._handle(rd)
            except StorageFull as e:
                self._on_storage_full(e)
                return
            if self.storage_full and rd.must_sync:
                self.storage_full = False
                log.warning("event=storage_writable node=%s", core.id)
            if core.membership != self._members:
                self._on_membership_change()
        if not self._snapshot_in_progress and self._policy.should_snapshot(
                self.sm.applied_index, self._last_snapshot_index):
            self._start_snapshot()

    def _handle(self, rd: Ready) -> None:
        self._handler.handle(rd)
        if rd.snapshot is not None:
            self.watches.restored(self.sm.applied_index, self.sm.get)
            self.metrics.snapshots.labels("installed").inc()
            log.info("event=snapshot_installed node=%s index=%d term=%d bytes=%d",
                     self.core.id, rd.snapshot.meta.index, rd.snapshot.meta.term,
                     rd.snapshot.length)

    def _log_dropped(self, why: str) -> None:
        """A peer message the core ignored as invalid: one warning per 10 s, counted."""
        self._dropped_count += 1
        now = time.monotonic()
        if now >= self._dropped_log_at:
            self._dropped_log_at = now + 10.0
            log.warning("event=peer_message_dropped node=%s dropped=%d reason=%s",
                        self.core.id, self._dropped_count, why)

    def _persist_timed(self, seconds: float, entries: int) -> None:
        self.metrics.fsync_seconds.observe(seconds)
        self.metrics.batch_entries.observe(entries)

    def _apply_timed(self, seconds: float) -> None:
        self.metrics.apply_seconds.observe(seconds)

    def metrics_state(self) -> dict[str, object]:
        """Scrape-time gauges (any thread: plain attribute reads)."""
        core = self.core
        return {
            "term": self._soft.term, "role": self._soft.role.value,
            "commit_index": core.log.commit, "applied_index": self.sm.applied_index,
            "last_index": core.log.last_index(), "snapshot_index": self._last_snapshot_index,
            "peers": dict(self._reachable),
        }

    def note_peer_state(self, peer: str, up: bool) -> None:
        """Transport callback: a peer link went up or down."""
        self._reachable[peer] = up

    # ------------------------------------------------------------------ writes
    def _propose(self, data: bytes, w: Waiter) -> None:
        core = self.core
        if self.storage_full:
            w.set_error(StorageFullError("the disk (LMDB map) is full: writes are refused; "
                                         "reads still work"))
            self.metrics.proposals.labels("rejected").inc()
            return
        if core.role is Role.LEADER:
            try:
                index = core.propose(data)
            except (NotLeader, ProposalDropped) as e:
                w.set_error(NoLeaderError(str(e)))
                self.metrics.proposals.labels("rejected").inc()
                return
            self._proposals[index] = (core.term, w, None)
        elif core.leader is not None:
            fid = self._next_forward_id
            self._next_forward_id += 1
            self._forwarded[fid] = (time.monotonic(), w, data)
            self._forward_out.append((fid, data))
        else:
            w.set_error(NoLeaderError("no leader is known yet"))

    def _flush_forwards(self) -> None:
        out, self._forward_out = self._forward_out, []
        leader = self.core.leader
        sent = 0  # items handed to the transport: they may commit whatever happens next
        if leader is not None and leader != self.core.id:
            for i in range(0, len(out), _MAX_FORWARD_BATCH):
                chunk = out[i : i + _MAX_FORWARD_BATCH]
                if not self.frames.send(leader, FRAME_FORWARD, msgpack.packb(chunk)):
                    break
                sent += len(chunk)
        if sent < len(out):
            # Only what never left this node surely has no effect.
            for fid, _ in out[sent:]:
                entry = self._forwarded.pop(fid, None)
                if entry is not None:
                    entry[1].set_error(NoLeaderError("cannot reach the leader"))

    def _serve_forwarded(self, frm: str, items: list[tuple[int, bytes]]) -> None:
        core = self.core
        results: list[tuple[int, int, int, str]] = []
        for fid, data in items:
            if self.storage_full:
                results.append((fid, 0, 0, StorageFullError.code))
                continue
            try:
                index = core.propose(data)
            except (NotLeader, ProposalDropped):
                results.append((fid, 0, 0, NoLeaderError.code))
                continue
            results.append((fid, index, core.term, ""))
        self.frames.send(frm, FRAME_FORWARD_RESULT, msgpack.packb(results))

    def _serve_forwarded_conf(self, frm: str,
                              items: list[tuple[int, ConfChange | None]]) -> None:
        core = self.core
        results: list[tuple[int, int, int, str]] = []
        for fid, change in items:
            if change is None:
                results.append((fid, 0, 0, f"{MembershipChangeError.code}:invalid change"))
                continue
            try:
                index = core.propose_conf_change(change)
            except (NotLeader, ProposalDropped):
                results.append((fid, 0, 0, NoLeaderError.code))
                continue
            except RaftError as e:
                results.append((fid, 0, 0, f"{MembershipChangeError.code}:{e}"))
                continue
            self._note_address(change)
            results.append((fid, index, core.term, ""))
        self.frames.send(frm, FRAME_FORWARD_RESULT, msgpack.packb(results))

    def _forward_results(self, results: list[tuple[int, int, int, str]]) -> None:
        applied = self.sm.applied_index
        for fid, index, term, err in results:
            entry = self._forwarded.pop(fid, None)
            if entry is None:
                continue
            _, w, expect = entry
            if err:
                code, _, message = err.partition(":")
                exc: ServiceError
                if code == StorageFullError.code:
                    exc = StorageFullError("the leader's disk is full")
                elif code == MembershipChangeError.code:
                    exc = MembershipChangeError(message or "the leader refused the change")
                else:
                    exc = NoLeaderError("the leader changed; retry")
                w.set_error(exc)
            elif index <= applied:
                got = self._recent.get(index)
                if got is not None and got[0].term == term and _holds(got[0], expect):
                    w.set_result(got[1])
                else:
                    w.set_error(OutcomeUnknownError("the write's outcome is unknown"))
            else:
                self._proposals[index] = (term, w, expect)

    def _on_applied(self, entry: Entry, result: object) -> None:
        pending = self._proposals.pop(entry.index, None)
        if pending is not None:
            term, w, expect = pending
            if term == entry.term and _holds(entry, expect):
                w.set_result(result)
                self.metrics.proposals.labels("committed").inc()
            elif term == entry.term:
                # Never hand a client another write's answer (a mix-up of forwarded ids).
                log.error("event=forward_mismatch node=%s index=%d", self.core.id, entry.index)
                w.set_error(OutcomeUnknownError("the write's outcome is unknown"))
            else:
                w.set_error(NoLeaderError("the write was overwritten by a new leader; retry"))
                self.metrics.proposals.labels("dropped").inc()
        if self.watches.wants(result, entry.index):
            self.watches.applied(entry.index, entry.data, result, self.sm.get)
        recent = self._recent
        recent[entry.index] = (entry, result)
        if len(recent) > _RECENT_RESULTS:
            recent.popitem(last=False)
        if entry.kind is EntryKind.CONF_CHANGE and entry.change is not None:
            self._note_address(entry.change)
            log.info("event=member_%s node=%s member=%s index=%d",
                     "removed" if entry.change.op is ConfChangeOp.REMOVE else "added",
                     self.core.id, entry.change.node_id, entry.index)

    # ------------------------------------------------------------------ reads
    def _on_read(self, request_id: int, index: int) -> None:
        entry = self._reads.pop(request_id, None)
        if entry is not None:
            entry[1].set_result(ReadGrant(index))

    def _on_read_failed(self, request_id: int) -> None:
        entry = self._reads.pop(request_id, None)
        if entry is not None:
            entry[1].set_error(NoLeaderError("leadership could not be confirmed; retry"))

    # ------------------------------------------------------------------ membership
    def propose_conf_change(self, change: ConfChange) -> Waiter:
        """Loop thread only (use call()): propose a membership change; a follower forwards
        it to the leader over the peer transport."""
        w = Waiter()
        core = self.core
        if core.role is not Role.LEADER:
            leader = core.leader
            if leader is None or leader == core.id:
                w.set_error(NoLeaderError("no leader is known yet; retry"))
                return w
            fid = self._next_forward_id
            self._next_forward_id += 1
            item = [fid, int(change.op), change.node_id, change.address]
            if self.frames.send(leader, FRAME_FORWARD_CONF, msgpack.packb([item])):
                self._forwarded[fid] = (time.monotonic(), w, change)
            else:
                w.set_error(NoLeaderError("cannot reach the leader"))
            return w
        try:
            index = self.core.propose_conf_change(change)
        except (ConfChangeRejected, ProposalDropped) as e:
            w.set_error(MembershipChangeError(str(e)))
            return w
        except RaftError as e:
            w.set_error(MembershipChangeError(str(e)))
            return w
        self._note_address(change)
        self._proposals[index] = (self.core.term, w, None)
        return w

    def _note_address(self, change: ConfChange) -> None:
        if change.op is not ConfChangeOp.REMOVE and change.address:
            self._addresses[change.node_id] = change.address

    def _on_membership_change(self) -> None:
        self._members = self.core.membership
        self._sync_peers()

    def _sync_peers(self) -> None:
        # A node that is joining knows no members yet: it accepts every known address.
        members = set(self.core.membership.members or self._addresses)
        # A leader that is removing itself is no member in the configuration its followers
        # appended, but it still replicates until that configuration commits: keep talking
        # to the leader (dissertation §4.2.2), or its removal can only commit through an
        # election.
        if self.core.leader is not None:
            members.add(self.core.leader)
        peers = {nid: self._addresses[nid] for nid in members
                 if nid != self.core.id and nid in self._addresses}
        self.frames.set_peers(peers)

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
        """Loop thread only (use call()): start handing leadership to `target`, or to the
        most caught-up live voter; returns the chosen node."""
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

    def learn_addresses(self, addresses: Mapping[str, str]) -> None:
        """Loop thread only (use call()): peer addresses learned outside the log."""
        for nid, addr in addresses.items():
            if nid != self.core.id and addr:
                self._addresses[nid] = addr
        self._sync_peers()

    def address_of(self, node_id: str) -> str | None:
        return self._addresses.get(node_id)

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
        started = time.monotonic()
        try:
            sink = self.snapshots.create(meta)
            try:
                for chunk in iter_snapshot_chunks(view):  # streamed: never whole in memory
                    sink.write(chunk)
            except BaseException:
                sink.cancel()
                raise
            stored = sink.close()
        except StorageError as e:
            log.error("event=snapshot_failed node=%s index=%d error=%s", self.core.id,
                      meta.index, e)
            self.call(self._snapshot_done_failed)
            return
        seconds = time.monotonic() - started
        self.metrics.snapshot_seconds.observe(seconds)
        self.metrics.snapshot_bytes.set(stored.length)
        self.metrics.snapshots.labels("taken").inc()
        self.call(lambda: self._snapshot_done(stored, seconds))

    def _snapshot_done_failed(self) -> None:
        self._snapshot_in_progress = False

    def _snapshot_done(self, snapshot: Snapshot, seconds: float) -> None:
        self._snapshot_in_progress = False
        meta = snapshot.meta
        keep_from = self._policy.compact_before(meta.index)
        self.core.compact(snapshot, keep_from)
        self.storage.compact(keep_from)
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
        if ss.term != prev.term or (prev.role is Role.LEADER and ss.role is not Role.LEADER):
            # Leadership or term changed: writes in flight above the commit index may or may
            # not commit. Those at or below it are decided (e.g. the entry whose commit made
            # this leader step down: its own removal) and wait for their apply, where
            # _on_applied compares terms; unless a snapshot already covered them.
            err = OutcomeUnknownError("leadership changed before the write was applied")
            applied = self.sm.applied_index
            undecided = [i for i in self._proposals if i > core.log.commit or i <= applied]
            for index in undecided:
                self._proposals.pop(index)[1].set_error(err)
            self.metrics.proposals.labels("unknown").inc(len(undecided))
        if ss.leader != prev.leader:
            self.metrics.leader_changes.inc()
        if ss.leader != prev.leader:
            if prev.leader is not None and prev.leader not in core.membership.members:
                self._sync_peers()  # the link to a removed leader was kept only while it led
            if prev.leader is not None:
                # Writes forwarded to the previous leader may or may not commit. (With no
                # previous leader, anything forwarded went to the new one: leave it.)
                for _, w, _ in self._forwarded.values():
                    w.set_error(OutcomeUnknownError("the leader changed while forwarding"))
                self._forwarded.clear()

    def _housekeeping(self, now: float) -> None:
        expired = [rid for rid, (deadline, _) in self._reads.items() if deadline < now]
        for rid in expired:
            self._reads.pop(rid)[1].set_error(NoLeaderError("read timed out"))
        stale = [fid for fid, (t, _, _) in self._forwarded.items() if now - t > 60]
        for fid in stale:
            self._forwarded.pop(fid)[1].set_error(OutcomeUnknownError("no answer from leader"))
        self._promote_caught_up_learners()

    def _on_storage_full(self, e: StorageFull) -> None:
        """Nothing of the failed Ready reached the disk. Forget it as a crash would, by
        rebuilding the core from storage, and refuse writes until a save succeeds."""
        if not self.storage_full:
            log.error("event=storage_full node=%s error=%s action=refusing_writes", self.core.id,
                      e)
        self.storage_full = True
        full = StorageFullError("the disk (LMDB map) is full: writes are refused; reads "
                                "still work")
        # Only a node without peers knows that a write whose entry was not saved is lost
        # (with peers, the entry was sent before the save failed and may commit there); a
        # saved entry may commit in any case. _fail_everything answers the rest "unknown".
        if not self.core.membership.members - {self.core.id}:
            saved = self.core.log.stable_index
            for index in [i for i in self._proposals if i > saved]:
                self._proposals.pop(index)[1].set_error(full)
        self._fail_everything(full)
        self.core = self._reboot_core()
        self._handler.node = self.core
        self._soft = SoftState(self.core.role, self.core.leader, self.core.term)

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

    def _fail_everything(self, err: ServiceError) -> None:
        """Fail every waiter with `err`, except writes already handed to Raft (proposed
        here, or forwarded to the leader): those may still commit whatever happens to this
        node (their entries can be on disk, or on the followers: ReadyHandler.begin sends
        before the persist), so their outcome is unknown."""
        in_flight = OutcomeUnknownError(f"{err.message}; the write was already proposed and "
                                        "may still be applied")
        for _, w, _ in self._proposals.values():
            w.set_error(in_flight)
        self._proposals.clear()
        for _, w, _ in self._forwarded.values():
            w.set_error(in_flight)
        self._forwarded.clear()
        for _, w in self._reads.values():
            w.set_error(err)
        self._reads.clear()
        while self._inbox:
            ev, payload = self._inbox.popleft()
            _fail_payload(ev, payload, err)

    def _die(self, reason: str) -> None:
        self.fatal = reason
        log.critical("event=node_stopped node=%s reason=%s", self.core.id, reason)
        self._on_fatal(reason)


_Expect = bytes | ConfChange | None


def _holds(entry: Entry, expect: _Expect) -> bool:
    """Does the applied entry hold what a forwarded proposal sent?"""
    if expect is None:
        return True
    if isinstance(expect, ConfChange):
        return entry.change == expect
    return entry.data == expect


def _fail_payload(ev: int, payload: Any, err: BaseException) -> None:
    if ev in (_EV_PROPOSE, _EV_READ, _EV_CALL):
        payload[1].set_error(err)


def _decode_forward(payload: bytes) -> list[tuple[int, bytes]]:
    items = msgpack.unpackb(payload, raw=False)
    if not isinstance(items, list):
        raise ValueError("forward frame is not a list")
    out = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int
                or not isinstance(item[1], bytes)):
            raise ValueError("bad forward item")
        out.append((item[0], item[1]))
    return out


def _decode_forward_conf(payload: bytes) -> list[tuple[int, ConfChange | None]]:
    items = msgpack.unpackb(payload, raw=False)
    if not isinstance(items, list):
        raise ValueError("forward conf frame is not a list")
    out: list[tuple[int, ConfChange | None]] = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 4 or type(item[0]) is not int
                or type(item[1]) is not int or not isinstance(item[2], str)
                or not isinstance(item[3], str)):
            raise ValueError("bad forward conf item")
        try:
            change: ConfChange | None = ConfChange(ConfChangeOp(item[1]), item[2], item[3])
        except ValueError:
            change = None
        out.append((item[0], change))
    return out


def _decode_forward_result(payload: bytes) -> list[tuple[int, int, int, str]]:
    items = msgpack.unpackb(payload, raw=False)
    if not isinstance(items, list):
        raise ValueError("forward result frame is not a list")
    out = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 4
                or not all(type(x) is int for x in item[:3]) or not isinstance(item[3], str)):
            raise ValueError("bad forward result item")
        out.append((item[0], item[1], item[2], item[3]))
    return out
