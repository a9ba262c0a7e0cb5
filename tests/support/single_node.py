"""A KVService of one node without Raft, over the real state machine, lease timers and watch
registry: for tests of the client, locks, elections and the CLI over real HTTP, where no
runtime is needed.

Every write is the next log entry of term 1, applied at once to the real KVStateMachine. The
node is always the leader and has applied its own no-op, so it keeps lease time with the real
LeaseExpiry, on `clock` (a test may pass a fake one), and `expire_due()` proposes (here:
applies) a LeaseRevoke(expired=True) for every lease that is due, as the runtime's Raft
process does on its ticks. Watches use the real WatchRegistry. It calls the lease pieces the
way the runtime must (see the lease wiring in the report and in raftkv.kv.leases):

    after applying each entry:  expiry.applied(result, index, now)
                                watches.wants(result, index) -> watches.applied(...)
    on becoming leader:         expiry.became_leader(sm.lease_ttls, now)  (after its no-op)
    on each tick:               for id in expiry.due(now): propose LeaseRevoke(id, True)
    on a keepalive:             expiry.keepalive(id, now)  (one node: no quorum round)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from raftkv import tokens as token_requests
from raftkv.auth import Authorizer, Role, token_digest
from raftkv.core.types import Entry, EntryKind
from raftkv.http import create_app, serve
from raftkv.kv.commands import (
    AlarmDisarm,
    AuthEnable,
    Batch,
    Command,
    Delete,
    LeaseGrant,
    LeaseRevoke,
    Put,
    encode_command,
)
from raftkv.kv.leases import LeaseExpiry
from raftkv.kv.state_machine import (
    AlarmResult,
    ConditionFailed,
    InvalidCommand,
    KVStateMachine,
    LeaseGrantResult,
    LeaseNotFound,
    LeaseRevokeResult,
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
from raftkv.runtime.watch import KeyState, Watch, WatchRegistry
from raftkv.service import (
    MAX_LEASE_KEYS_SHOWN,
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
    LeaseInfo,
    LeaseKeepAliveResult,
    LeaseNotFoundError,
    Member,
    MembershipChangeError,
    NodeStatus,
    OutcomeUnknownError,
    Readiness,
    ReadResult,
    StorageFullError,
    TokenCreateResult,
    TokenInfo,
    TokenRevokeResult,
    WatchResult,
    WriteResult,
)
from raftkv.service import (
    LeaseGrantResult as ServiceLeaseGrant,
)
from raftkv.service import (
    LeaseRevokeResult as ServiceLeaseRevoke,
)
from snapshots.checksum import checksum_of


class SingleNodeService:
    """Thread-safe: one lock around the state, as the runtime's one Raft thread would be.

    `outcome_unknown_puts`: the next that many puts are applied but answered
    OutcomeUnknownError (as when the commit is not seen in time). `root_token`: auth on, as a
    cluster bootstrapped with that root token (its AuthEnable is the first entry)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 root_token: str | None = None) -> None:
        self.clock = clock
        self.sm = KVStateMachine()
        self.expiry = LeaseExpiry()
        self.watches = WatchRegistry()
        self.outcome_unknown_puts = 0
        self.revoked_for_expiry: list[int] = []
        self._lock = threading.Lock()
        if root_token is not None:
            self._apply(encode_command(AuthEnable(token_digest(root_token))))
        self._apply(b"")  # the leader's no-op: the first entry of its term
        self.expiry.became_leader(self.sm.lease_ttls, clock())

    # ------------------------------------------------------------------ the "log"
    def _apply(self, data: bytes) -> object:
        entry = Entry(self.sm.applied_index + 1, 1, EntryKind.NORMAL, data)
        result = self.sm.apply(entry)
        self.expiry.applied(result, entry.index, self.clock())
        if self.watches.wants(result, entry.index):
            self.watches.applied(entry.index, data, result, self.sm.get)
        return result

    def _write(self, build: Callable[[], Command], request_id: str | None) -> object:
        try:
            data = encode_command(build(), request_id)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(str(e)) from None
        with self._lock:
            result = self._apply(data)
        if isinstance(result, ConditionFailed):
            raise ConditionFailedError(f"condition failed for {result.key!r}", key=result.key,
                                       current_index=result.current_index)
        if isinstance(result, LeaseNotFound):
            raise LeaseNotFoundError(f"lease {result.lease_id} not found",
                                     lease_id=result.lease_id)
        if isinstance(result, InvalidCommand):
            raise InvalidRequestError(result.reason)
        if isinstance(result, NoSpace):
            raise StorageFullError("the NOSPACE alarm is raised")
        return result

    def expire_due(self) -> list[int]:
        """Revoke every lease that is due by `clock` (what the leader does on its ticks)."""
        with self._lock:
            due = self.expiry.due(self.clock())
            for lease_id in due:
                self._apply(encode_command(LeaseRevoke(lease_id, expired=True)))
            self.revoked_for_expiry.extend(due)
            return due

    # ------------------------------------------------------------------ keys
    def get(self, key: str, consistency: Consistency, timeout_s: float) -> ReadResult:
        with self._lock:
            record = self.sm.get(key)
            if record is None:
                raise KeyNotFoundError(f"key {key!r} not found")
            return ReadResult(record[0], record[1], self.sm.lease_of(key))

    def list_keys(self, prefix: str, limit: int, consistency: Consistency,
                  timeout_s: float) -> list[KeyValue]:
        with self._lock:
            return [KeyValue(k, v, i) for k, v, i in self.sm.items(prefix, limit)]

    def put(self, key: str, value: object, *, prev_index: int | None = None,
            lease: int | None = None, ttl_s: int | None = None,
            request_id: str | None = None, timeout_s: float) -> WriteResult:
        result = self._write(lambda: Put(key, value, prev_index, lease, ttl_s),  # type: ignore[arg-type]
                             request_id)
        assert isinstance(result, PutResult)
        if self.outcome_unknown_puts > 0:
            self.outcome_unknown_puts -= 1
            raise OutcomeUnknownError("applied, but answered as if the commit was not seen")
        return WriteResult(result.value, result.index, result.lease)

    def delete(self, key: str, *, prev_index: int | None = None,
               request_id: str | None = None, timeout_s: float) -> DeleteResult:
        result = self._write(lambda: Delete(key, prev_index), request_id)
        assert isinstance(result, KVDeleteResult)
        return DeleteResult(result.deleted, result.index)

    def batch(self, ops: list[BatchOp], *, request_id: str | None = None,
              timeout_s: float) -> BatchResult:
        def build() -> Command:
            return Batch(tuple(
                Put(op.key, op.value, op.prev_index, op.lease)  # type: ignore[arg-type]
                if op.op == "put" else Delete(op.key, op.prev_index) for op in ops))

        result = self._write(build, request_id)
        assert isinstance(result, KVBatchResult)
        return BatchResult(result.index, tuple(
            WriteResult(r.value, r.index, r.lease) if isinstance(r, PutResult)
            else DeleteResult(r.deleted, r.index) for r in result.results))

    def watch(self, key: str, after_index: int | None, timeout_s: float) -> WatchResult:
        answered = threading.Event()
        outcome: list[object] = []

        def notify(state: object) -> None:  # called under self._lock
            outcome.append(state)
            answered.set()

        w = Watch(key, after_index, notify)
        with self._lock:
            self.watches.add(w, self.sm.get(key), self.sm.applied_index)
        answered.wait(timeout_s)
        with self._lock:
            if not outcome:  # the time ran out: the key's state now
                state = self.watches.end(w, self.sm.get(key), self.sm.applied_index)
                return WatchResult(key, state.value, state.index, state.deleted, False)
        change = outcome[0]
        assert isinstance(change, KeyState)
        return WatchResult(key, change.value, change.index, change.deleted, True)

    # ------------------------------------------------------------------ leases
    def lease_grant(self, ttl_s: int, *, request_id: str | None = None,
                    timeout_s: float) -> ServiceLeaseGrant:
        result = self._write(lambda: LeaseGrant(ttl_s), request_id)
        assert isinstance(result, LeaseGrantResult)
        return ServiceLeaseGrant(result.lease_id, result.ttl_s, result.index)

    def lease_revoke(self, lease_id: int, *, request_id: str | None = None,
                     timeout_s: float) -> ServiceLeaseRevoke:
        result = self._write(lambda: LeaseRevoke(lease_id), request_id)
        assert isinstance(result, LeaseRevokeResult)
        return ServiceLeaseRevoke(result.lease_id, result.index)

    def lease_keepalive(self, lease_id: int, *, timeout_s: float) -> LeaseKeepAliveResult:
        with self._lock:
            ttl_s = self.expiry.keepalive(lease_id, self.clock())
        if ttl_s is None:
            raise LeaseNotFoundError(f"lease {lease_id} not found", lease_id=lease_id)
        return LeaseKeepAliveResult(lease_id, ttl_s)

    def lease(self, lease_id: int, *, timeout_s: float) -> LeaseInfo:
        with self._lock:
            record = self.sm.lease(lease_id, MAX_LEASE_KEYS_SHOWN)
            remaining = self.expiry.remaining(lease_id, self.clock())
        if record is None:
            raise LeaseNotFoundError(f"lease {lease_id} not found", lease_id=lease_id)
        return LeaseInfo(lease_id, record.ttl_s, remaining or 0.0, record.keys, record.key_count)

    def leases(self, limit: int, *, timeout_s: float) -> list[LeaseInfo]:
        with self._lock:
            now = self.clock()
            return [LeaseInfo(r.lease_id, r.ttl_s, self.expiry.remaining(r.lease_id, now) or 0.0,
                              (), r.key_count) for r in self.sm.leases(limit)]

    # ------------------------------------------------------------------ tokens
    def authorizer(self) -> Authorizer:
        return Authorizer(self.sm.token_table)

    def caught_up_authorizer(self, timeout_s: float) -> Authorizer:
        return Authorizer(self.sm.token_table)  # one node: its table is the cluster's

    def token_create(self, role: Role, prefixes: tuple[str, ...], *,
                     request_id: str | None = None, timeout_s: float) -> TokenCreateResult:
        cmd, secret = token_requests.create_command(self.sm.token_table, role, prefixes)
        answer = token_requests.created(self._write(lambda: cmd, request_id), cmd, secret)
        assert answer is not None
        return answer

    def token_revoke(self, token_id: str, *, request_id: str | None = None,
                     timeout_s: float) -> TokenRevokeResult:
        cmd = token_requests.revoke_command(self.sm.token_table, token_id)
        answer = token_requests.revoked(self._write(lambda: cmd, request_id))
        assert answer is not None
        return answer

    def tokens(self, consistency: Consistency, timeout_s: float) -> list[TokenInfo]:
        return token_requests.token_infos(self.sm.token_table)

    # ------------------------------------------------------------------ the node
    def backup(self, consistency: Consistency, timeout_s: float) -> Backup:
        with self._lock:
            data = b"".join(iter_snapshot_chunks(self.sm.snapshot_view()))
            return Backup(self.sm.applied_index, checksum_of(data), len(data), iter([data]))

    def is_leader(self) -> bool:
        return True

    def leader_http_address(self) -> str | None:
        return None

    def status(self) -> NodeStatus:
        index = self.sm.applied_index
        return NodeStatus("n1", "leader", 1, "n1", index, index, index, 0, (), "single")

    def readiness(self) -> Readiness:
        return Readiness(True, "ok")

    def members(self) -> list[Member]:
        return [Member("n1", "127.0.0.1:1", None, True, True)]

    def join(self, node_id: str | None, raft_address: str, *, voter: bool = True,
             timeout_s: float) -> int:
        raise MembershipChangeError("a single node without Raft")

    def remove(self, node_id: str, *, timeout_s: float) -> int:
        raise MembershipChangeError("a single node without Raft")

    def transfer_leadership(self, target: str | None, *, timeout_s: float) -> str:
        raise MembershipChangeError("a single node without Raft")

    def alarms(self) -> list[Alarm]:
        with self._lock:
            return [Alarm(a.node_id, a.cause, a.index) for a in self.sm.alarms]

    def disarm_alarms(self, *, timeout_s: float) -> int:
        result = self._write(AlarmDisarm, None)
        assert isinstance(result, AlarmResult)
        return result.index


@contextlib.contextmanager
def serving(service: SingleNodeService, threads: int = 8) -> Iterator[str]:
    """Serve `service` with waitress on an ephemeral loopback port; yields its URL."""
    handle = serve(create_app(service), "127.0.0.1", 0, threads=threads)
    thread = threading.Thread(target=handle.run, name=f"waitress-{handle.port}", daemon=True)
    thread.start()
    try:
        yield handle.url
    finally:
        handle.close()
        thread.join(timeout=10)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
