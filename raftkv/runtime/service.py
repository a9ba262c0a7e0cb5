"""NodeService: the KVService of a running node, on top of the Raft loop.

Request threads call it; it hands work to the loop thread and waits on Waiters with a
deadline. A write that was proposed but not seen applied in time is "outcome unknown".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from raftkv.core import ConfChange, ConfChangeOp, Role, Status
from raftkv.kv.commands import (
    AlarmDisarm,
    AlarmRaise,
    Batch,
    Command,
    Delete,
    Put,
    adds_data,
    encode_command,
)
from raftkv.kv.state_machine import (
    AlarmRecord,
    AlarmResult,
    ConditionFailed,
    InvalidCommand,
    KVSnapshotView,
    NoSpace,
    PutResult,
    iter_snapshot_chunks,
)
from raftkv.kv.state_machine import (
    BatchResult as KVBatchResult,
)
from raftkv.kv.state_machine import (
    DeleteResult as KVDeleteResult,
)
from raftkv.runtime.loop import RaftLoop, ReadGrant
from raftkv.runtime.waiter import Waiter
from raftkv.runtime.watch import KeyState, Watch
from raftkv.service import (
    Alarm,
    Backup,
    BatchOp,
    BatchResult,
    ConditionFailedError,
    Consistency,
    DeleteResult,
    InvalidRequestError,
    KeyNotFoundError,
    KeyValue,
    LeaseGrantResult,
    LeaseInfo,
    LeaseKeepAliveResult,
    LeaseRevokeResult,
    Member,
    MembershipChangeError,
    NodeStatus,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    Readiness,
    ReadResult,
    ReadTimeoutError,
    ServiceError,
    StorageFullError,
    UnavailableError,
    WatchResult,
    WriteResult,
)
from snapshots.checksum import CHECKSUM_ALGORITHM, new_hasher

PeerHttpLookup = Callable[[str], str | None]
PeerProbe = Callable[[str, float], str]
"""(raft address, timeout) -> the node id listening there."""

DEFAULT_MAX_WATCHES = 16
"""Each watch holds an HTTP worker thread while it waits: keep most of them for the rest."""
MAX_BACKUPS = 2
"""Backups streaming at once; each holds a copy of the state machine's dicts."""
_LOOP_ANSWER_S = 5.0


class NodeService:
    def __init__(
        self,
        *,
        loop: RaftLoop,
        cluster_id: str,
        http_address: str,
        peer_http_address: PeerHttpLookup,
        probe_node_id: PeerProbe,
        max_watches: int = DEFAULT_MAX_WATCHES,
        quota_bytes: int = 2 << 30,
    ) -> None:
        self._loop = loop
        self._quota_bytes = quota_bytes
        self._alarm_proposed_at = -1e9
        self._cluster_id = cluster_id
        self._http_address = http_address
        self._peer_http = peer_http_address
        self._probe = probe_node_id
        self._max_watches = max_watches
        self._watch_slots = threading.BoundedSemaphore(max_watches)
        self._backup_slots = threading.BoundedSemaphore(MAX_BACKUPS)

    # ------------------------------------------------------------------ reads
    def get(self, key: str, consistency: Consistency, timeout_s: float) -> ReadResult:
        self._read_barrier(consistency, timeout_s)
        record = self._loop.sm.get(key)
        if record is None:
            raise KeyNotFoundError(f"key {key!r} not found", leader=self.leader_http_address())
        return ReadResult(record[0], record[1])

    def list_keys(self, prefix: str, limit: int, consistency: Consistency,
                  timeout_s: float) -> list[KeyValue]:
        self._read_barrier(consistency, timeout_s)
        sm = self._loop.sm
        rows = self._wait(self._loop.call(lambda: sm.items(prefix, limit)), timeout_s,
                          ReadTimeoutError("the read timed out"))
        assert isinstance(rows, list)
        return [KeyValue(k, v, i) for k, v, i in rows]

    def _read_barrier(self, consistency: Consistency, timeout_s: float) -> None:
        loop = self._loop
        if consistency is Consistency.STALE:
            return
        if consistency is Consistency.LEADER and loop.role is Role.LEADER:
            return
        # LINEARIZABLE everywhere; LEADER on a follower is served as linearizable too.
        deadline = time.monotonic() + timeout_s
        grant = self._wait(loop.submit_read(deadline), timeout_s,
                           ReadTimeoutError("leadership could not be confirmed in time",
                                            leader=self.leader_http_address()))
        assert isinstance(grant, ReadGrant)

    # ------------------------------------------------------------------ watches
    def watch(self, key: str, after_index: int | None, timeout_s: float) -> WatchResult:
        if not self._watch_slots.acquire(blocking=False):
            raise UnavailableError(f"this node serves {self._max_watches} watches already; "
                                   "retry later or watch through another node")
        try:
            return self._watch(key, after_index, timeout_s)
        finally:
            self._watch_slots.release()

    def _watch(self, key: str, after_index: int | None, timeout_s: float) -> WatchResult:
        loop = self._loop
        sm, watches = loop.sm, loop.watches
        watch = Watch(key, after_index)
        started = loop.call(lambda: watches.add(watch, sm.get(key), sm.applied_index))
        if watch.wait(timeout_s):
            if watch.error is not None:
                raise watch.error
            change = watch.change
            assert change is not None
            return _watch_result(change, changed=True)
        if started.error is not None:  # never filed: the node is stopping
            raise started.error
        ended = self._wait(
            loop.call(lambda: watches.end(watch, sm.get(key), sm.applied_index)),
            _LOOP_ANSWER_S, UnavailableError("the node is busy; retry"))
        assert isinstance(ended, tuple)
        state, changed = ended
        assert isinstance(state, KeyState)
        return _watch_result(state, changed=bool(changed))

    def end_watches(self) -> None:
        """Answer every watch now (503) and refuse new ones: the node is stopping."""
        watches = self._loop.watches
        self._loop.call(lambda: watches.close(UnavailableError("the node is stopping")))

    # ------------------------------------------------------------------ backups
    def backup(self, consistency: Consistency, timeout_s: float) -> Backup:
        if not self._backup_slots.acquire(blocking=False):
            raise UnavailableError(f"{MAX_BACKUPS} backups are streaming from this node "
                                   "already; retry later")
        try:
            self._read_barrier(consistency, timeout_s)
            view = self._wait(self._loop.call(self._loop.sm.snapshot_view), timeout_s,
                              ReadTimeoutError("the node did not take the snapshot in time"))
            assert isinstance(view, KVSnapshotView)
            # The checksum goes in the headers, before the body: one pass to hash, one to
            # stream, and the serialised bytes are never held whole.
            hasher, length = new_hasher(), 0
            for chunk in iter_snapshot_chunks(view):
                hasher.update(chunk)
                length += len(chunk)
        except BaseException:
            self._backup_slots.release()
            raise
        return Backup(view.applied_index, hasher.hexdigest(), length,
                      _BackupStream(view, self._backup_slots), CHECKSUM_ALGORITHM)

    # ------------------------------------------------------------------ writes
    def put(self, key: str, value: object, *, prev_index: int | None = None,
            lease: int | None = None, ttl_s: int | None = None,
            request_id: str | None = None, timeout_s: float) -> WriteResult:
        if lease is not None or ttl_s is not None:
            raise _no_leases()
        cmd = _command(lambda: Put(key, value, prev_index))  # type: ignore[arg-type]
        result = self._write(cmd, request_id, timeout_s)
        if isinstance(result, PutResult):
            return WriteResult(result.value, result.index)
        raise self._unexpected(result)

    def delete(self, key: str, *, prev_index: int | None = None,
               request_id: str | None = None, timeout_s: float) -> DeleteResult:
        cmd = _command(lambda: Delete(key, prev_index))
        result = self._write(cmd, request_id, timeout_s)
        if isinstance(result, KVDeleteResult):
            return DeleteResult(result.deleted, result.index)
        raise self._unexpected(result)

    def batch(self, ops: list[BatchOp], *, request_id: str | None = None,
              timeout_s: float) -> BatchResult:
        if any(op.lease is not None for op in ops):
            raise _no_leases()

        def build() -> Command:
            return Batch(tuple(
                Put(op.key, op.value, op.prev_index) if op.op == "put"  # type: ignore[arg-type]
                else Delete(op.key, op.prev_index) for op in ops))

        result = self._write(_command(build), request_id, timeout_s)
        if isinstance(result, KVBatchResult):
            return BatchResult(result.index, tuple(
                WriteResult(r.value, r.index) if isinstance(r, PutResult)
                else DeleteResult(r.deleted, r.index) for r in result.results))
        raise self._unexpected(result)

    def _write(self, cmd: Command, request_id: str | None, timeout_s: float) -> object:
        try:
            data = encode_command(cmd, request_id)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(str(e)) from None
        if adds_data(cmd):
            self._check_space(len(data))
        w = self._loop.submit_proposal(data)
        result = self._wait(w, timeout_s, OutcomeUnknownError(
            "the write was not seen committed in time: it may or may not have been applied; "
            "retry with the same Idempotency-Key", leader=self.leader_http_address()))
        if isinstance(result, NoSpace):
            raise _storage_full(result.alarms)
        if isinstance(result, ConditionFailed):
            raise ConditionFailedError(
                f"condition failed for key {result.key!r}: its index is {result.current_index}",
                key=result.key, current_index=result.current_index)
        return result

    # ------------------------------------------------------------------ quota and alarms
    ALARM_RETRY_S = 1.0
    """At most one AlarmRaise proposal per this many seconds from one node."""

    def _check_space(self, write_bytes: int) -> None:
        """Before a write that adds data is proposed: refuse it while the NOSPACE alarm is
        raised, and raise the alarm (through the log) when the write would take the state
        past the quota. Two attribute reads and one comparison on the hot path."""
        sm = self._loop.sm
        if sm.alarm_active:
            raise _storage_full(sm.alarms)
        if sm.size_bytes + write_bytes > self._quota_bytes:
            self.raise_alarm("quota")
            raise StorageFullError(
                f"the key-value data is at {sm.size_bytes} of its {self._quota_bytes}-byte "
                "quota (RAFTKV_QUOTA_BYTES): the NOSPACE alarm is being raised, writes that add "
                "data are refused on every node; reads and deletes work. Delete keys, then "
                "`raftkv alarm disarm`", leader=self.leader_http_address())

    def raise_alarm(self, cause: str) -> None:
        """Propose AlarmRaise(this node, cause) without waiting (a follower forwards it);
        at most once per ALARM_RETRY_S while it is not applied yet."""
        now = time.monotonic()
        if now - self._alarm_proposed_at < self.ALARM_RETRY_S:
            return
        self._alarm_proposed_at = now
        self._loop.submit_proposal(encode_command(AlarmRaise(self._loop.core.id, cause)))

    def alarms(self) -> list[Alarm]:
        loop = self._loop
        records = self._wait(loop.call(lambda: loop.sm.alarms), _LOOP_ANSWER_S,
                             UnavailableError("the node is busy; retry"))
        assert isinstance(records, tuple)
        return [Alarm(r.node_id, r.cause, r.index) for r in records]

    def disarm_alarms(self, *, timeout_s: float) -> int:
        result = self._write(AlarmDisarm(), None, timeout_s)
        if isinstance(result, AlarmResult):
            self._alarm_proposed_at = -1e9
            return result.index
        raise self._unexpected(result)

    def _unexpected(self, result: object) -> ServiceError:
        if isinstance(result, InvalidCommand):
            return InvalidRequestError(result.reason)
        return UnavailableError(f"unexpected result {type(result).__name__}")

    def _wait(self, w: Waiter, timeout_s: float, on_timeout: ServiceError) -> object:
        if not w.wait(timeout_s):
            raise on_timeout
        if w.error is not None:
            err = w.error
            if isinstance(err, ServiceError) and err.leader is None:
                err.leader = self.leader_http_address()
            raise err
        return w.result

    # ------------------------------------------------------------------ leases
    # Not served by this runtime: the multi-process runtime wires raftkv.kv.leases in.
    def lease_grant(self, ttl_s: int, *, request_id: str | None = None,
                    timeout_s: float) -> LeaseGrantResult:
        raise _no_leases()

    def lease_revoke(self, lease_id: int, *, request_id: str | None = None,
                     timeout_s: float) -> LeaseRevokeResult:
        raise _no_leases()

    def lease_keepalive(self, lease_id: int, *, timeout_s: float) -> LeaseKeepAliveResult:
        raise _no_leases()

    def lease(self, lease_id: int, *, timeout_s: float) -> LeaseInfo:
        raise _no_leases()

    def leases(self, limit: int, *, timeout_s: float) -> list[LeaseInfo]:
        raise _no_leases()

    # ------------------------------------------------------------------ cluster
    def is_leader(self) -> bool:
        return self._loop.role is Role.LEADER

    def leader_http_address(self) -> str | None:
        leader = self._loop.leader
        if leader is None:
            return None
        if leader == self._loop.core.id:
            return self._http_address
        return self._peer_http(leader)

    def status(self) -> NodeStatus:
        loop = self._loop
        both = self._wait(loop.call(lambda: (loop.core.status(), loop.sm.alarms)), 2.0,
                          UnavailableError("the node is busy; retry"))
        assert isinstance(both, tuple)
        st, alarms = both
        assert isinstance(st, Status)
        return NodeStatus(
            id=st.node_id, role=st.role.value, term=st.term, leader=st.leader,
            commit_index=st.commit_index, applied_index=loop.sm.applied_index,
            last_index=st.last_index, snapshot_index=st.snapshot_index,
            members=tuple(self._members_from(st.membership.voters, st.membership.learners,
                                             st.leader)),
            cluster_id=self._cluster_id,
            extra={
                "leader_http_address": self.leader_http_address(),
                "storage_full": loop.storage_full,
                "size_bytes": loop.sm.size_bytes,
                "quota_bytes": self._quota_bytes,
                "alarms": [{"node": a.node_id, "cause": a.cause, "index": a.index}
                           for a in alarms],
                "watches": len(loop.watches),
                "peers": {nid: {"match": p.match, "next": p.next, "state": p.state,
                                "recent_active": p.recent_active, "caught_up": p.caught_up}
                          for nid, p in st.peers.items() if nid != st.node_id},
            },
        )

    def readiness(self) -> Readiness:
        loop = self._loop
        if loop.fatal is not None:
            return Readiness(False, f"node stopped: {loop.fatal}")
        if loop.leader is None:
            return Readiness(False, "no leader is known yet")
        commit = loop.core.log.commit
        if loop.sm.applied_index < commit:
            return Readiness(False, f"applying the log ({loop.sm.applied_index}/{commit})")
        return Readiness(True, "ok")

    def members(self) -> list[Member]:
        m = self._loop.core.membership
        return self._members_from(m.voters, m.learners, self._loop.leader)

    def _members_from(self, voters: frozenset[str], learners: frozenset[str],
                      leader: str | None) -> list[Member]:
        out = []
        me = self._loop.core.id
        for nid in sorted(voters | learners):
            http = self._http_address if nid == me else self._peer_http(nid)
            out.append(Member(nid, self._loop.address_of(nid) or "", http, nid in voters,
                              nid == leader))
        return out

    def join(self, node_id: str | None, raft_address: str, *, voter: bool = True,
             timeout_s: float) -> int:
        if node_id is None:
            try:
                node_id = self._probe(raft_address, min(timeout_s, 5.0))
            except Exception as e:  # whatever the probe meets (a refused handshake, a
                # listener that is no raftkv node...) is the caller's address, never a 500
                raise MembershipChangeError(
                    f"could not learn which node listens at {raft_address} "
                    f"({type(e).__name__}: {e}); give the node's id with the address"
                ) from None
        membership = self._loop.core.membership
        if node_id in membership.voters or (node_id in membership.learners and not voter):
            if self._loop.address_of(node_id) == raft_address:
                return self._loop.core.log.commit  # already a member: nothing to do
            raise MembershipChangeError(f"{node_id} is already a member with another address; "
                                        "remove it first")
        if node_id in membership.learners:
            # Promote a learner now (the leader also promotes learners once caught up).
            change = ConfChange(ConfChangeOp.ADD_VOTER, node_id,
                                self._loop.address_of(node_id) or raft_address)
            return self._conf_change(change, timeout_s)
        # New members start as learners; the leader promotes them once caught up.
        change = ConfChange(ConfChangeOp.ADD_LEARNER, node_id, raft_address)
        return self._conf_change(change, timeout_s)

    def remove(self, node_id: str, *, timeout_s: float) -> int:
        return self._conf_change(ConfChange(ConfChangeOp.REMOVE, node_id), timeout_s)

    def transfer_leadership(self, target: str | None, *, timeout_s: float) -> str:
        loop = self._loop
        if not self.is_leader():
            leader = self.leader_http_address()
            if leader is None:
                raise NoLeaderError("no leader is known yet; retry")
            raise NotLeaderError(f"ask the leader ({loop.leader}) at {leader}", leader=leader)
        picked = self._wait(loop.call(lambda: loop.transfer_leadership(target)), timeout_s,
                            OutcomeUnknownError("the leadership transfer timed out"))
        assert isinstance(picked, str)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if loop.leader == picked and loop.role is not Role.LEADER:
                return picked
            time.sleep(0.01)
        raise OutcomeUnknownError(f"leadership did not move to {picked} in time")

    def _conf_change(self, change: ConfChange, timeout_s: float) -> int:
        loop = self._loop
        inner = self._wait(loop.call(lambda: loop.propose_conf_change(change)), timeout_s,
                           OutcomeUnknownError("the membership change timed out"))
        assert isinstance(inner, Waiter)
        self._wait(inner, timeout_s, OutcomeUnknownError(
            "the membership change was not seen committed in time"))
        return loop.sm.applied_index


def _storage_full(alarms: tuple[AlarmRecord, ...]) -> StorageFullError:
    raised = ", ".join(f"{a.node_id}: {a.cause}" for a in alarms) or "just disarmed"
    return StorageFullError(
        f"the cluster's NOSPACE alarm is raised ({raised}): writes that add data are refused "
        "on every node; reads, deletes and lease revokes work. Free space (delete keys; for "
        "map_full/disk_full, on that node's disk), then `raftkv alarm disarm`")


def _watch_result(state: KeyState, *, changed: bool) -> WatchResult:
    return WatchResult(state.key, state.value, state.index, state.deleted, changed)


class _BackupStream:
    """The chunks of a backup, once; gives its slot back when exhausted or closed (the WSGI
    server closes it, also when the client goes away)."""

    def __init__(self, view: KVSnapshotView, slots: threading.BoundedSemaphore) -> None:
        self._chunks: Iterator[bytes] | None = iter_snapshot_chunks(view)
        self._slots = slots

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._chunks is None:
            raise StopIteration
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._chunks is not None:
            self._chunks = None  # drops the view
            self._slots.release()


def _no_leases() -> InvalidRequestError:
    return InvalidRequestError("leases are not served by this node's runtime yet")


def _command(build: Callable[[], Command]) -> Command:
    try:
        return build()
    except (ValueError, TypeError) as e:
        raise InvalidRequestError(str(e)) from None
