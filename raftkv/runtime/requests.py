"""What the Raft process does for its HTTP workers' requests (raftkv.codec.RequestOp).

A worker sends typed requests over its channel; `RequestHandler.handle` does each on the loop
thread and answers through `Replier` once the outcome is known: a write once committed and
applied, a linearizable read once the state machine applied up to its read index (all reads of
a turn share one ReadIndex round), a watch at the first change or when its time runs out.
Nothing here blocks the loop: the only slow things (a probe of a joining node's address, the
serialisation of a backup) run on short-lived threads and come back through the loop.

A join adds a new member only once a probe found a raftkv node of this cluster answering at
its address as the id it names (the id the probe learns, for a join that names none),
with a certificate naming that id under peer TLS: the same handshake a link runs, from the
member asked (the change then goes to the leader, forwarded if this node is not it), leaving
from the address this node's links leave from. Without it, a node that is not listening, or
is another node, would be added as a learner that never catches up (every handshake of the
leader's link failing) until removed. A join that names its id meets the membership checks
first: a member's re-join, a promotion and a refusal need no probe. At most MAX_PROBES
probes run at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from raftkv import codec
from raftkv.codec import Request, RequestOp
from raftkv.core import ConfChange, ConfChangeOp, Role, SoftState
from raftkv.kv.state_machine import (
    MAX_ITEMS_LIMIT,
    KVSnapshotView,
    iter_snapshot_chunks,
)
from raftkv.runtime.driver import Completion, RaftDriver
from raftkv.runtime.eventloop import EventLoop, Timer
from raftkv.runtime.transport.handshake import PeerInfo
from raftkv.runtime.transport.probe import ProbeFailed, probe
from raftkv.runtime.watch import KeyState, Watch
from raftkv.service import (
    Consistency,
    InvalidRequestError,
    KeyNotFoundError,
    Member,
    MembershipChangeError,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    ServiceError,
    UnavailableError,
)
from snapshots.checksum import CHECKSUM_ALGORITHM, new_hasher

__all__ = ["MAX_BACKUPS", "MAX_PROBES", "MAX_WATCHES", "Replier", "RequestHandler"]

log = logging.getLogger(__name__)

MAX_BACKUPS: Final = 2
"""Backups being written at once; each holds a copy of the state machine's dicts."""
MAX_WATCHES: Final = 100_000
"""Watches one node keeps waiting (each costs a few hundred bytes here and in a worker)."""
PROBE_TIMEOUT_S: Final = 5.0
MAX_PROBES: Final = 8
"""Joins' probes running at once (each a thread, a connection and up to PROBE_TIMEOUT_S);
a join beyond them is a 503 to retry."""
PROBE_MISMATCH: Final = "mismatch"
"""MembershipChangeError.probe of a join whose probe found another node, or none of this
cluster, at the address: asking again will not change it (a joining node gives up)."""


class Replier(Protocol):
    """A worker channel, as the handler answers it."""

    def reply_ok(self, rid: int, payload: object, fd: int | None = None) -> None: ...

    def reply_error(self, rid: int, error: ServiceError) -> None: ...


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    http_address: str
    data_dir: Path
    token: str
    tls: ssl.SSLContext | None = None
    """The client context of peer TLS, when this node dials peers with TLS (a probe too)."""
    source_host: str | None = None
    """The local address this node's peer links leave from (process.peer_source_host), a
    probe too: None, the kernel picks."""


class _Answer:
    """A Completion that answers one request: ok(value) -> payload(value)."""

    __slots__ = ("_encode", "_replier", "_rid")

    def __init__(self, replier: Replier, rid: int,
                 encode: Callable[[object], object] | None = None) -> None:
        self._replier = replier
        self._rid = rid
        self._encode = encode

    def ok(self, value: object) -> None:
        encode = self._encode
        if encode is None:
            self._replier.reply_ok(self._rid, value)
            return
        try:
            payload = encode(value)
        except ServiceError as e:
            self._replier.reply_error(self._rid, e)
            return
        self._replier.reply_ok(self._rid, payload)

    def fail(self, error: ServiceError) -> None:
        self._replier.reply_error(self._rid, error)


def _apply_result(value: object) -> object:
    return codec.encode_apply_result(value, 0)


class RequestHandler:
    def __init__(self, *, driver: RaftDriver, loop: EventLoop, info: NodeInfo,
                 cluster_id: Callable[[], str], peer_http: Callable[[str], str | None],
                 extra_status: Callable[[], dict[str, object]],
                 render_metrics: Callable[[], bytes]) -> None:
        self._driver = driver
        self._loop = loop
        self._info = info
        self._cluster_id = cluster_id
        self._peer_http = peer_http
        self._extra_status = extra_status
        self._render_metrics = render_metrics
        self._backups = 0
        self._probes = 0
        self._transfers: list[tuple[str, float, _Answer]] = []
        driver.state_listeners.append(self._on_state)
        self._ops: dict[RequestOp, Callable[[Replier, Request], None]] = {
            RequestOp.PROPOSE: self._propose,
            RequestOp.GET: self._get,
            RequestOp.LIST: self._list,
            RequestOp.WATCH: self._watch,
            RequestOp.STATUS: self._status,
            RequestOp.READINESS: self._readiness,
            RequestOp.MEMBERS: self._members,
            RequestOp.JOIN: self._join,
            RequestOp.REMOVE: self._remove,
            RequestOp.TRANSFER: self._transfer,
            RequestOp.BACKUP: self._backup,
            RequestOp.LEASE_KEEPALIVE: self._lease_keepalive,
            RequestOp.LEASE_INFO: self._lease_info,
            RequestOp.LEASE_LIST: self._lease_list,
            RequestOp.METRICS: self._metrics,
            RequestOp.TOKENS: self._tokens,
            RequestOp.ALARMS: self._alarms,
            RequestOp.TOKENS_SINCE: self._tokens,
        }

    def handle(self, replier: Replier, requests: list[Request]) -> None:
        """One frame of requests from a worker."""
        driver = self._driver
        ops = self._ops
        for request in requests:
            if driver.fatal is not None:
                replier.reply_error(request.rid, UnavailableError(
                    f"node stopped: {driver.fatal}"))
                continue
            try:
                ops[request.op](replier, request)
            except ServiceError as e:
                replier.reply_error(request.rid, e)

    # ------------------------------------------------------------------ writes
    def _propose(self, replier: Replier, request: Request) -> None:
        self._driver.propose(request.args[0], _Answer(replier, request.rid, _apply_result))

    # ------------------------------------------------------------------ reads
    def _barrier(self, consistency: str, deadline: float, then: Completion) -> None:
        """Call `then.ok(None)` when a read of this consistency may be served."""
        driver = self._driver
        try:
            level = Consistency(consistency)
        except ValueError:
            then.fail(InvalidRequestError(f"unknown consistency {consistency[:20]!r}"))
            return
        if level is Consistency.STALE or (level is Consistency.LEADER
                                          and driver.role is Role.LEADER):
            then.ok(None)
            return
        driver.read(deadline, then)

    def _get(self, replier: Replier, request: Request) -> None:
        key, consistency = request.args
        sm = self._driver.sm

        def answer(_index: object) -> object:
            record = sm.get(key)
            if record is None:
                raise KeyNotFoundError(f"key {key!r} not found")
            return [record[0], record[1], sm.lease_of(key)]

        self._barrier(consistency, time.monotonic() + request.timeout_s,
                      _Answer(replier, request.rid, answer))

    def _list(self, replier: Replier, request: Request) -> None:
        prefix, limit, consistency = request.args
        sm = self._driver.sm
        limit = max(1, min(limit, MAX_ITEMS_LIMIT))

        def answer(_index: object) -> object:
            return [list(row) for row in sm.items(prefix, limit)]

        self._barrier(consistency, time.monotonic() + request.timeout_s,
                      _Answer(replier, request.rid, answer))

    # ------------------------------------------------------------------ watches
    def _watch(self, replier: Replier, request: Request) -> None:
        key, after_index = request.args
        driver = self._driver
        watches = driver.watches
        if len(watches) >= MAX_WATCHES:
            raise UnavailableError(f"this node serves {MAX_WATCHES} watches already; retry "
                                   "later or watch through another node")
        rid = request.rid
        timer: list[Timer] = []

        def notify(outcome: KeyState | BaseException) -> None:
            if timer:
                timer[0].cancel()
            if isinstance(outcome, ServiceError):
                replier.reply_error(rid, outcome)
            elif isinstance(outcome, BaseException):
                replier.reply_error(rid, UnavailableError(str(outcome)))
            else:
                replier.reply_ok(rid, _watch_row(outcome, changed=True))

        watch = Watch(key, after_index, notify)
        sm = driver.sm
        if watches.add(watch, sm.get(key), sm.applied_index):

            def expire() -> None:
                state = watches.end(watch, sm.get(key), sm.applied_index)
                replier.reply_ok(rid, _watch_row(state, changed=False))

            timer.append(self._loop.call_later(request.timeout_s, expire))

    # ------------------------------------------------------------------ node state
    def _status(self, replier: Replier, request: Request) -> None:
        driver = self._driver
        st = driver.core.status()
        extra: dict[str, object] = {
            "leader_http_address": self.leader_http_address(),
            "storage_full": driver.storage_full is not None,
            "size_bytes": driver.sm.size_bytes,
            "quota_bytes": driver.quota_bytes,
            "alarms": [{"node": a.node_id, "cause": a.cause, "index": a.index}
                       for a in driver.sm.alarms],
            "watches": len(driver.watches),
            "leases": len(driver.sm.lease_ttls),
            "peers": {nid: {"match": p.match, "next": p.next, "state": p.state,
                            "recent_active": p.recent_active, "caught_up": p.caught_up}
                      for nid, p in st.peers.items() if nid != st.node_id},
        }
        extra.update(self._extra_status())
        members = self._members_of(st.membership.voters, st.membership.learners, st.leader)
        replier.reply_ok(request.rid, {
            "id": st.node_id, "role": st.role.value, "term": st.term, "leader": st.leader,
            "commit_index": st.commit_index, "applied_index": driver.sm.applied_index,
            "last_index": st.last_index, "snapshot_index": st.snapshot_index,
            "members": [dataclasses.asdict(m) for m in members],
            "cluster_id": self._cluster_id(), "extra": extra,
        })

    def _readiness(self, replier: Replier, request: Request) -> None:
        driver = self._driver
        if driver.fatal is not None:
            answer = [False, f"node stopped: {driver.fatal}"]
        elif driver.leader is None:
            answer = [False, "no leader is known yet"]
        elif driver.sm.applied_index < driver.core.log.commit:
            answer = [False, f"applying the log ({driver.sm.applied_index}/"
                             f"{driver.core.log.commit})"]
        else:
            answer = [True, "ok"]
        replier.reply_ok(request.rid, answer)

    def _members(self, replier: Replier, request: Request) -> None:
        m = self._driver.core.membership
        members = self._members_of(m.voters, m.learners, self._driver.leader)
        replier.reply_ok(request.rid, [dataclasses.asdict(x) for x in members])

    def _members_of(self, voters: frozenset[str], learners: frozenset[str],
                    leader: str | None) -> list[Member]:
        me = self._info.node_id
        return [Member(nid, self._driver.address_of(nid) or "",
                       self._info.http_address if nid == me else self._peer_http(nid),
                       nid in voters, nid == leader)
                for nid in sorted(voters | learners)]

    def leader_http_address(self) -> str | None:
        leader = self._driver.leader
        if leader is None:
            return None
        if leader == self._info.node_id:
            return self._info.http_address
        return self._peer_http(leader)

    # ------------------------------------------------------------------ membership
    def _join(self, replier: Replier, request: Request) -> None:
        node_id, address, voter = request.args
        # The probe ends by half the request's timeout: its answer, not a 504, says what failed.
        probe_s = min(PROBE_TIMEOUT_S, request.timeout_s / 2)
        if node_id is not None:
            self._join_as(replier, request.rid, node_id, address, voter, probe_s)
            return
        # No id given: ask whoever listens at the address, and add that node.
        self._probe(address, None, probe_s,
                    lambda peer: self._join_as(replier, request.rid, peer.node_id, address,
                                               voter, None),
                    lambda error: replier.reply_error(request.rid, error))

    def _join_as(self, replier: Replier, rid: int, node_id: str, address: str,
                 voter: bool, probe_s: float | None) -> None:
        """`probe_s`: a new member is added only once a probe of `address` (this long at
        most) found node `node_id` there; None: it was probed already."""
        driver = self._driver
        if driver.fatal is not None:  # stopped while the probe ran: as handle() on arrival
            replier.reply_error(rid, UnavailableError(f"node stopped: {driver.fatal}"))
            return
        membership = driver.core.membership
        done = _Answer(replier, rid, lambda _result: driver.sm.applied_index)
        known = driver.address_of(node_id)
        moved = MembershipChangeError(f"{node_id} is already a member with another address; "
                                      "remove it first")
        if node_id in membership.voters or (node_id in membership.learners and not voter):
            if known == address and node_id in driver.sm.addresses:
                replier.reply_ok(rid, driver.sm.applied_index)  # already a member
                return
            if known == address:  # appended, not applied here: it may yet be overwritten
                done.fail(UnavailableError(f"the addition of {node_id} is not committed yet; "
                                           "retry"))
                return
            done.fail(moved)
            return
        if node_id in membership.learners and known and known != address:
            done.fail(moved)  # a promotion never moves a member: it kept the old address
            return
        taken = next((m for m in sorted(membership.voters | membership.learners)
                      if m != node_id and driver.address_of(m) == address), None)
        if taken is not None:
            done.fail(MembershipChangeError(f"{address} is the address of member {taken}: a "
                                            "new member needs an address of its own"))
            return
        limit = driver.core.config.max_members
        if not membership.has_room_for(node_id, limit):
            # Refused before any probe (the leader's core checks again when proposed).
            done.fail(MembershipChangeError(
                f"the cluster has {len(membership.members)} members, its limit of {limit}: "
                f"remove one before {node_id} can join"))
            return
        if node_id in membership.learners:
            # Promote a learner now (the leader also promotes learners once caught up). No
            # probe: the core promotes only a learner caught up, over a link that checked it.
            change = ConfChange(ConfChangeOp.ADD_VOTER, node_id,
                                driver.address_of(node_id) or address)
        elif probe_s is not None:
            # A new member, once `node_id` answers at `address` (else it would stay a learner
            # that never catches up: the leader's link to it would fail every handshake).
            # The checks run again then: the membership may have changed meanwhile.
            self._probe(address, node_id, probe_s,
                        lambda _peer: self._join_as(replier, rid, node_id, address, voter,
                                                    None),
                        done.fail)
            return
        else:
            # New members start as learners; the leader promotes them once caught up.
            change = ConfChange(ConfChangeOp.ADD_LEARNER, node_id, address)
        driver.propose_conf_change(change, done)

    def _probe(self, address: str, expected: str | None, timeout_s: float,
               then: Callable[[PeerInfo], None], failed: Callable[[ServiceError], None]) -> None:
        """Who listens at `address` (node `expected`, if not None), asked off the loop; the
        answer comes back on the loop: `then(peer)`, or `failed(error)`: a 503 when nothing
        answered (the node may not listen yet: retry) or MAX_PROBES run already, a 409
        marked probe="mismatch" when something else did."""
        if self._probes >= MAX_PROBES:
            failed(UnavailableError(f"too many joins being checked ({MAX_PROBES} probes run on "
                                    "this node); retry"))
            return
        info = self._info
        cluster_id = self._cluster_id()
        post = self._loop.call_soon_threadsafe

        def answer(outcome: Callable[[], None]) -> None:  # on the loop
            self._probes -= 1
            outcome()

        def ask() -> None:
            error: ServiceError
            try:
                peer = probe(address, token=info.token, node_id=info.node_id,
                             cluster_id=cluster_id, timeout_s=timeout_s, tls=info.tls,
                             source_host=info.source_host)
            except ProbeFailed as e:
                error = _probe_error(address, expected, e)
            except ValueError as e:
                error = MembershipChangeError(f"{address} is not a raft address to probe: {e}")
            except Exception as e:  # a bug: the join is answered, the slot given back
                log.exception("event=join_probe_failed address=%s", address)
                error = UnavailableError(f"the join's probe of {address} failed "
                                         f"({type(e).__name__}); see the node's log; retry")
            else:
                if expected is None or peer.node_id == expected:
                    post(lambda: answer(lambda: then(peer)))
                    return
                error = MembershipChangeError(
                    f"the node at {address} answers as {peer.node_id}, not {expected}: give "
                    f"{expected}'s own raft address", probe=PROBE_MISMATCH)
            post(lambda: answer(lambda: failed(error)))

        self._probes += 1
        try:
            threading.Thread(target=ask, name="join-probe", daemon=True).start()
        except RuntimeError as e:  # no thread to be had
            self._probes -= 1
            failed(UnavailableError(f"the join's probe could not be started: {e}; retry"))

    def _remove(self, replier: Replier, request: Request) -> None:
        (node_id,) = request.args
        driver = self._driver
        # The removal's index: this node's applied index once it applied the entry, or the
        # index the leader sent when this node is the one removed (it never applies it).
        driver.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, node_id), _Answer(
            replier, request.rid,
            lambda result: result if type(result) is int else driver.sm.applied_index),
            wait_s=request.timeout_s / 2)  # a refusal-for-now's wait ends before the 504

    def _transfer(self, replier: Replier, request: Request) -> None:
        (target,) = request.args
        driver = self._driver
        if driver.role is not Role.LEADER:
            leader = self.leader_http_address()
            if leader is None:
                raise NoLeaderError("no leader is known yet; retry")
            raise NotLeaderError(f"ask the leader ({driver.leader}) at {leader}", leader=leader)
        picked = driver.transfer_leadership(target)
        done = _Answer(replier, request.rid)
        if picked == driver.core.id:
            done.ok(picked)
            return
        self._transfers.append((picked, time.monotonic() + request.timeout_s, done))
        self._loop.call_later(request.timeout_s, self._expire_transfers)

    def _on_state(self, ss: SoftState) -> None:
        if not self._transfers:
            return
        keep = []
        for picked, deadline, done in self._transfers:
            if ss.leader == picked and ss.role is not Role.LEADER:
                done.ok(picked)
            else:
                keep.append((picked, deadline, done))
        self._transfers = keep

    def _expire_transfers(self) -> None:
        now = time.monotonic()
        keep = []
        for picked, deadline, done in self._transfers:
            if deadline <= now:
                done.fail(OutcomeUnknownError(f"leadership did not move to {picked} in time"))
            else:
                keep.append((picked, deadline, done))
        self._transfers = keep

    # ------------------------------------------------------------------ backups
    def _backup(self, replier: Replier, request: Request) -> None:
        (consistency,) = request.args
        if self._backups >= MAX_BACKUPS:
            raise UnavailableError(f"{MAX_BACKUPS} backups are being taken on this node "
                                   "already; retry later")
        self._backups += 1
        rid = request.rid

        def failed(error: ServiceError) -> None:
            self._backups -= 1
            replier.reply_error(rid, error)

        def start(_index: object) -> None:
            view = self._driver.sm.snapshot_view()  # consistent, cheap, on the loop
            try:
                threading.Thread(target=self._write_backup, args=(replier, rid, view),
                                 name="backup-writer", daemon=True).start()
            except RuntimeError as e:  # no thread to be had: the slot is free again
                failed(UnavailableError(f"the backup could not be started: {e}"))

        self._barrier(consistency, time.monotonic() + request.timeout_s,
                      _Callback(start, failed))

    def _write_backup(self, replier: Replier, rid: int, view: KVSnapshotView) -> None:
        """Off the loop: the snapshot into an unlinked file, then its fd to the worker."""
        try:
            hasher, length = new_hasher(), 0
            with tempfile.TemporaryFile(dir=self._info.data_dir, prefix=".backup-") as f:
                for chunk in iter_snapshot_chunks(view):
                    hasher.update(chunk)
                    f.write(chunk)
                    length += len(chunk)
                f.flush()
                fd = os.dup(f.fileno())
        except Exception as e:  # the slot is freed and the client answered, whatever failed
            if isinstance(e, OSError):
                reason = f"the backup could not be written: {e.strerror or e}"
            else:  # a bug, not the disk
                log.exception("event=backup_failed rid=%d", rid)
                reason = f"the backup failed ({type(e).__name__}); see the node's log"
            error = UnavailableError(reason)
            self._loop.call_soon_threadsafe(lambda: self._backup_done(replier, rid, None,
                                                                      error))
            return
        answer = [view.applied_index, hasher.hexdigest(), length, CHECKSUM_ALGORITHM]
        self._loop.call_soon_threadsafe(lambda: self._backup_done(replier, rid, (answer, fd),
                                                                  None))

    def _backup_done(self, replier: Replier, rid: int, result: tuple[list[Any], int] | None,
                     error: ServiceError | None) -> None:
        self._backups -= 1
        if result is None:
            assert error is not None
            replier.reply_error(rid, error)
            return
        answer, fd = result
        try:
            replier.reply_ok(rid, answer, fd=fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ leases
    def _lease_keepalive(self, replier: Replier, request: Request) -> None:
        self._driver.lease_keepalive(request.args[0], time.monotonic() + request.timeout_s,
                                     _Answer(replier, request.rid))

    def _lease_info(self, replier: Replier, request: Request) -> None:
        self._driver.lease_info(request.args[0], time.monotonic() + request.timeout_s,
                                _Answer(replier, request.rid))

    def _lease_list(self, replier: Replier, request: Request) -> None:
        self._driver.lease_list(max(1, min(request.args[0], 10_000)),
                                time.monotonic() + request.timeout_s,
                                _Answer(replier, request.rid))

    # ------------------------------------------------------------------ tokens
    def _tokens(self, replier: Replier, request: Request) -> None:
        """TOKENS [consistency] and TOKENS_SINCE [consistency, version]: the table after the
        barrier (for TOKENS_SINCE only if newer than `version`, else nil)."""
        consistency, since = (*request.args, -1)[:2]
        sm = self._driver.sm

        def answer(_index: object) -> object:
            table = sm.token_table
            return table.to_wire() if table.version > since else None

        self._barrier(consistency, time.monotonic() + request.timeout_s,
                      _Answer(replier, request.rid, answer))

    def _alarms(self, replier: Replier, request: Request) -> None:
        replier.reply_ok(request.rid, codec.encode_alarms(self._driver.sm.alarms))

    # ------------------------------------------------------------------ metrics
    def _metrics(self, replier: Replier, request: Request) -> None:
        replier.reply_ok(request.rid, self._render_metrics())


class _Callback:
    """A Completion made of two functions."""

    __slots__ = ("_fail", "_ok")

    def __init__(self, ok: Callable[[object], None],
                 fail: Callable[[ServiceError], None]) -> None:
        self._ok = ok
        self._fail = fail

    def ok(self, value: object) -> None:
        self._ok(value)

    def fail(self, error: ServiceError) -> None:
        self._fail(error)


def _probe_error(address: str, expected: str | None, e: ProbeFailed) -> ServiceError:
    """The answer to a join whose probe of `address` failed so: a 503 to retry when nothing
    answered in full, else a 409 marked probe="mismatch" that says what answered."""
    node = expected or "the node"
    if e.mismatch is None:
        return UnavailableError(f"no raftkv node answered at {address} ({e}): retry once it "
                                "listens there, or check that this is its raft address (a "
                                "server that never speaks first, an HTTP port say, is not)")
    if e.mismatch == "certificate":
        what = (f"the peer certificate presented at {address} does not prove it is {node} "
                f"({e}): a member presents its own certificate, naming its id, from the "
                "cluster's CA")
    elif e.mismatch == "cluster":
        what = (f"the node at {address} belongs to another cluster, or holds another cluster "
                f"token ({e}): a member needs this cluster's token and id")
    elif e.mismatch == "version":
        what = f"the node at {address} speaks another protocol version ({e}): upgrade it"
    else:
        what = (f"what answers at {address} is not a raftkv node ({e}): give {node}'s raft "
                "address, not its HTTP one")
    return MembershipChangeError(what, probe=PROBE_MISMATCH)


def _watch_row(state: KeyState, *, changed: bool) -> list[object]:
    return [state.key, state.value, state.index, state.deleted, changed]
