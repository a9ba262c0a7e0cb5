"""An in-memory KVService for the HTTP layer's tests, with switches to raise every error.

Thread-safe (the waitress tests call it from worker threads). Every operation is recorded in
`calls` so a test can check what reached the service (request ids, timeouts, consistency).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from raftkv.auth import (
    ROOT_TOKEN_ID,
    Authorizer,
    Role,
    TokenRecord,
    TokenTable,
    new_secret,
    token_digest,
)
from raftkv.service import (
    Alarm,
    AuthDisabledError,
    Backup,
    BatchOp,
    BatchResult,
    ConditionFailedError,
    Consistency,
    DeleteResult,
    KeyNotFoundError,
    KeyValue,
    LeaseGrantResult,
    LeaseInfo,
    LeaseKeepAliveResult,
    LeaseNotFoundError,
    LeaseRevokeResult,
    Member,
    MembershipChangeError,
    NodeStatus,
    Readiness,
    ReadResult,
    TokenConflictError,
    TokenCreateResult,
    TokenInfo,
    TokenNotFoundError,
    TokenRevokeResult,
    WatchResult,
    WriteResult,
)
from snapshots.checksum import checksum_of


@dataclass(frozen=True, slots=True)
class Call:
    op: str
    key: str | None = None
    request_id: str | None = None
    timeout_s: float | None = None
    consistency: Consistency | None = None
    prev_index: int | None = None
    after_index: int | None = None
    lease: int | None = None
    ttl_s: int | None = None


class FakeService:
    """Switches:
    - `fail_next`: exceptions raised by the next operations, first in first out;
    - `fail_with`: an exception raised by every operation while set;
    - `leader`, `leader_address`: what is_leader() and leader_http_address() answer;
    - `ready`: what readiness() answers;
    - `remaining_s`: what every lease reports as its remaining time; `expire(id)` ends a lease
      as the leader would (its keys deleted).
    """

    def __init__(self, *, node_id: str = "n1", leader: bool = True,
                 leader_address: str | None = None) -> None:
        self.node_id = node_id
        self.leader = leader
        self.leader_address = leader_address
        self.ready = Readiness(True, "")
        self.fail_next: deque[Exception] = deque()
        self.fail_with: Exception | None = None
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._data: dict[str, tuple[object, int]] = {}
        self._index = 0
        self._done: dict[str, object] = {}
        self._members = [Member(node_id, "127.0.0.1:7001", leader_address, True, leader)]
        self._leases: dict[int, int] = {}  # lease id -> ttl
        self._key_leases: dict[str, int] = {}
        self.remaining_s = 1.5
        self.raised_alarms: list[Alarm] = []
        self.token_table = TokenTable()
        self.lagging_token_table: TokenTable | None = None
        """While set: this node's own copy of the table, older than the cluster's
        (`token_table`): authorizer() answers from it, caught_up_authorizer() from the
        cluster's."""
        self.during_catch_up: Callable[[], None] | None = None
        """Called inside caught_up_authorizer (a test's clock moves on there)."""
        self._token_ids = 0

    def enable_auth(self, root_secret: str) -> None:
        """Auth on, with this root token (as a cluster bootstrapped with it)."""
        root = TokenRecord(ROOT_TOKEN_ID, Role.ADMIN, (), token_digest(root_secret), 1)
        self.token_table = TokenTable(True, (root,), 1)

    def add_token(self, role: Role, prefixes: tuple[str, ...] = ()) -> str:
        """A new token of that role (auth must be on); its secret."""
        return self.token_create(role, prefixes, timeout_s=1.0).token

    # ------------------------------------------------------------------ helpers
    def _enter(self, call: Call) -> None:
        self.calls.append(call)
        if self.fail_next:
            raise self.fail_next.popleft()
        if self.fail_with is not None:
            raise self.fail_with

    def calls_of(self, op: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.op == op]

    def _check_lease(self, lease: int | None) -> None:
        if lease is not None and lease not in self._leases:
            raise LeaseNotFoundError(f"lease {lease} not found", lease_id=lease)

    def _attach(self, key: str, lease: int | None) -> None:
        if lease is None:
            self._key_leases.pop(key, None)
        else:
            self._key_leases[key] = lease

    def expire(self, lease_id: int) -> None:
        """The lease expires: it and its keys are gone (at a new index)."""
        with self._lock:
            del self._leases[lease_id]
            self._index += 1
            for key in [k for k, lease in self._key_leases.items() if lease == lease_id]:
                del self._key_leases[key], self._data[key]

    def _check(self, key: str, prev_index: int | None) -> None:
        if prev_index is None:
            return
        current = self._data.get(key, (None, 0))[1]
        if current != prev_index:
            raise ConditionFailedError(f"{key!r} is at index {current}, not {prev_index}",
                                       key=key, current_index=current)

    # ------------------------------------------------------------------ KVService
    def get(self, key: str, consistency: Consistency, timeout_s: float) -> ReadResult:
        with self._lock:
            self._enter(Call("get", key, timeout_s=timeout_s, consistency=consistency))
            if key not in self._data:
                raise KeyNotFoundError(f"no key {key!r}")
            value, index = self._data[key]
            return ReadResult(value, index, self._key_leases.get(key))

    def list_keys(self, prefix: str, limit: int, consistency: Consistency,
                  timeout_s: float) -> list[KeyValue]:
        with self._lock:
            self._enter(Call("list", prefix, timeout_s=timeout_s, consistency=consistency))
            keys = sorted(k for k in self._data if k.startswith(prefix))[:limit]
            return [KeyValue(k, *self._data[k]) for k in keys]

    def put(self, key: str, value: object, *, prev_index: int | None = None,
            lease: int | None = None, ttl_s: int | None = None,
            request_id: str | None = None, timeout_s: float) -> WriteResult:
        with self._lock:
            self._enter(Call("put", key, request_id, timeout_s, prev_index=prev_index,
                             lease=lease, ttl_s=ttl_s))
            if request_id is not None and request_id in self._done:
                done = self._done[request_id]
                assert isinstance(done, WriteResult)
                return done
            self._check(key, prev_index)
            self._check_lease(lease)
            self._index += 1
            if ttl_s is not None:
                self._leases[self._index] = ttl_s
                lease = self._index
            self._data[key] = (value, self._index)
            self._attach(key, lease)
            result = WriteResult(value, self._index, lease)
            if request_id is not None:
                self._done[request_id] = result
            return result

    def delete(self, key: str, *, prev_index: int | None = None,
               request_id: str | None = None, timeout_s: float) -> DeleteResult:
        with self._lock:
            self._enter(Call("delete", key, request_id, timeout_s, prev_index=prev_index))
            self._check(key, prev_index)
            self._index += 1
            self._key_leases.pop(key, None)
            return DeleteResult(self._data.pop(key, None) is not None, self._index)

    def batch(self, ops: list[BatchOp], *, request_id: str | None = None,
              timeout_s: float) -> BatchResult:
        with self._lock:
            self._enter(Call("batch", None, request_id, timeout_s))
            for op in ops:
                self._check(op.key, op.prev_index)
                self._check_lease(op.lease)
            self._index += 1
            results: list[WriteResult | DeleteResult] = []
            for op in ops:
                if op.op == "put":
                    self._data[op.key] = (op.value, self._index)
                    self._attach(op.key, op.lease)
                    results.append(WriteResult(op.value, self._index, op.lease))
                else:
                    deleted = self._data.pop(op.key, None) is not None
                    self._attach(op.key, None)
                    results.append(DeleteResult(deleted, self._index))
            return BatchResult(self._index, tuple(results))

    # ------------------------------------------------------------------ leases
    def lease_grant(self, ttl_s: int, *, request_id: str | None = None,
                    timeout_s: float) -> LeaseGrantResult:
        with self._lock:
            self._enter(Call("lease_grant", None, request_id, timeout_s, ttl_s=ttl_s))
            self._index += 1
            self._leases[self._index] = ttl_s
            return LeaseGrantResult(self._index, ttl_s, self._index)

    def lease_revoke(self, lease_id: int, *, request_id: str | None = None,
                     timeout_s: float) -> LeaseRevokeResult:
        with self._lock:
            self._enter(Call("lease_revoke", None, request_id, timeout_s, lease=lease_id))
            self._check_lease(lease_id)
        self.expire(lease_id)
        return LeaseRevokeResult(lease_id, self._index)

    def lease_keepalive(self, lease_id: int, *, timeout_s: float) -> LeaseKeepAliveResult:
        with self._lock:
            self._enter(Call("lease_keepalive", None, None, timeout_s, lease=lease_id))
            self._check_lease(lease_id)
            return LeaseKeepAliveResult(lease_id, self._leases[lease_id])

    def _lease_info(self, lease_id: int, with_keys: bool) -> LeaseInfo:
        keys = sorted(k for k, lease in self._key_leases.items() if lease == lease_id)
        return LeaseInfo(lease_id, self._leases[lease_id], self.remaining_s,
                         tuple(keys) if with_keys else (), len(keys))

    def lease(self, lease_id: int, *, timeout_s: float) -> LeaseInfo:
        with self._lock:
            self._enter(Call("lease", None, None, timeout_s, lease=lease_id))
            self._check_lease(lease_id)
            return self._lease_info(lease_id, True)

    def leases(self, limit: int, *, timeout_s: float) -> list[LeaseInfo]:
        with self._lock:
            self._enter(Call("leases", None, None, timeout_s))
            return [self._lease_info(i, False) for i in sorted(self._leases)[:limit]]

    # ------------------------------------------------------------------ tokens
    def authorizer(self) -> Authorizer:
        lagging = self.lagging_token_table
        return Authorizer(self.token_table if lagging is None else lagging)

    def caught_up_authorizer(self, timeout_s: float) -> Authorizer:
        with self._lock:
            self._enter(Call("caught_up_authorizer", timeout_s=timeout_s))
            if self.during_catch_up is not None:
                self.during_catch_up()
            return Authorizer(self.token_table)

    def token_create(self, role: Role, prefixes: tuple[str, ...], *,
                     request_id: str | None = None, timeout_s: float) -> TokenCreateResult:
        with self._lock:
            self._enter(Call("token_create", None, request_id, timeout_s))
            if not self.token_table.enabled:
                raise AuthDisabledError("auth is off")
            if request_id is not None and request_id in self._done:
                done = self._done[request_id]
                assert isinstance(done, TokenCreateResult)
                raise TokenConflictError("already created", token_id=done.token_id)
            self._index += 1
            self._token_ids += 1
            secret = new_secret()
            token_id = f"t{self._token_ids}"
            record = TokenRecord(token_id, role, prefixes, token_digest(secret), self._index)
            self.token_table = TokenTable(True, (*self.token_table.tokens, record), self._index)
            result = TokenCreateResult(token_id, secret, role, prefixes, self._index)
            if request_id is not None:
                self._done[request_id] = result
            return result

    def token_revoke(self, token_id: str, *, request_id: str | None = None,
                     timeout_s: float) -> TokenRevokeResult:
        with self._lock:
            self._enter(Call("token_revoke", token_id, request_id, timeout_s))
            if not self.token_table.enabled:
                raise AuthDisabledError("auth is off")
            left = tuple(t for t in self.token_table.tokens if t.token_id != token_id)
            if len(left) == len(self.token_table.tokens):
                raise TokenNotFoundError(f"no token {token_id!r}")
            self._index += 1
            self.token_table = TokenTable(True, left, self._index)
            return TokenRevokeResult(token_id, self._index)

    def tokens(self, consistency: Consistency, timeout_s: float) -> list[TokenInfo]:
        with self._lock:
            self._enter(Call("tokens", timeout_s=timeout_s, consistency=consistency))
            return [TokenInfo(t.token_id, t.role, t.prefixes, t.created_index)
                    for t in self.token_table.tokens]

    def backup(self, consistency: Consistency, timeout_s: float) -> Backup:
        """The sorted items as JSON, in chunks of 7 bytes (a stand-in for a snapshot)."""
        with self._lock:
            self._enter(Call("backup", timeout_s=timeout_s, consistency=consistency))
            data = json.dumps(sorted(self._data.items())).encode()
            chunks = [data[i:i + 7] for i in range(0, len(data), 7)]
            return Backup(self._index, checksum_of(data), len(data), iter(chunks))

    def watch(self, key: str, after_index: int | None, timeout_s: float) -> WatchResult:
        """No waiting: the key's state, `changed` when it was written after after_index."""
        with self._lock:
            self._enter(Call("watch", key, timeout_s=timeout_s, after_index=after_index))
            if key not in self._data:
                return WatchResult(key, None, self._index, True, False)
            value, index = self._data[key]
            return WatchResult(key, value, index, False,
                               after_index is not None and index > after_index)

    def is_leader(self) -> bool:
        return self.leader

    def leader_http_address(self) -> str | None:
        return self.leader_address

    def status(self) -> NodeStatus:
        with self._lock:
            self._enter(Call("status"))
            return NodeStatus(
                id=self.node_id, role="leader" if self.leader else "follower", term=3,
                leader=self.node_id if self.leader else "n2", commit_index=self._index,
                applied_index=self._index, last_index=self._index, snapshot_index=0,
                members=tuple(self._members), cluster_id="c-test", extra={"pending": 0})

    def readiness(self) -> Readiness:
        return self.ready

    def members(self) -> list[Member]:
        with self._lock:
            self._enter(Call("members"))
            return list(self._members)

    def join(self, node_id: str | None, raft_address: str, *, voter: bool = True,
             timeout_s: float) -> int:
        with self._lock:
            self._enter(Call("join", node_id, timeout_s=timeout_s))
            new_id = node_id or f"n{len(self._members) + 1}"
            if any(m.id == new_id for m in self._members):
                raise MembershipChangeError(f"{new_id} is already a member")
            self._members.append(Member(new_id, raft_address, None, voter, False))
            self._index += 1
            return self._index

    def transfer_leadership(self, target: str | None, *, timeout_s: float) -> str:
        with self._lock:
            self._enter(Call("transfer_leadership", target, timeout_s=timeout_s))
            others = [m.id for m in self._members if not m.leader and m.voter]
            if target is None:
                if not others:
                    raise MembershipChangeError("no voter to hand leadership to")
                target = others[0]
            if target not in others:
                raise MembershipChangeError(f"{target} is not a voter that can lead")
            self._members = [Member(m.id, m.raft_address, m.http_address, m.voter,
                                    m.id == target) for m in self._members]
            return target

    def alarms(self) -> list[Alarm]:
        self._enter(Call("alarms"))
        with self._lock:
            return list(self.raised_alarms)

    def disarm_alarms(self, *, timeout_s: float) -> int:
        self._enter(Call("disarm_alarms", timeout_s=timeout_s))
        with self._lock:
            self.raised_alarms.clear()
            self._index += 1
            return self._index

    def remove(self, node_id: str, *, timeout_s: float) -> int:
        with self._lock:
            self._enter(Call("remove", node_id, timeout_s=timeout_s))
            if not any(m.id == node_id for m in self._members):
                raise MembershipChangeError(f"{node_id} is not a member")
            self._members = [m for m in self._members if m.id != node_id]
            self._index += 1
            return self._index
