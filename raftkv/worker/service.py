"""`RemoteService`: the KVService of a node as its HTTP workers see it.

Every method asks the Raft process over the channel (raftkv.worker.channel) and turns the
answer into the service's typed results and errors; the worker keeps nothing but the node's
role and leader, pushed to it. Commands are built and validated here, once (raftkv.kv.commands);
the Raft process proposes their bytes as they are.

Waits: a write the Raft process has not answered within its timeout has an unknown outcome
(OutcomeUnknownError, 504: retry with the same Idempotency-Key); a read, ReadTimeoutError. If
the Raft process goes away, a write in flight is OutcomeUnknownError and anything else
UnavailableError.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from raftkv import codec
from raftkv import tokens as token_requests
from raftkv.auth import OPEN_AUTHORIZER, REQUEST_TOKEN_ID, Authorizer, Role, TokenTable
from raftkv.codec import Reply, RequestOp
from raftkv.http.green import GreenCondition
from raftkv.kv.commands import (
    AlarmDisarm,
    Batch,
    Command,
    Delete,
    LeaseGrant,
    LeaseRevoke,
    Put,
    encode_command,
)
from raftkv.kv.state_machine import (
    AUTH_REFUSALS,
    AlarmResult,
    AuthRefused,
    ConditionFailed,
    InvalidCommand,
    LeaseGrantResult,
    LeaseNotFound,
    LeaseRevokeResult,
    NoSpace,
    PutResult,
)
from raftkv.kv.state_machine import (
    BatchResult as KVBatchResult,
)
from raftkv.kv.state_machine import (
    DeleteResult as KVDeleteResult,
)
from raftkv.service import (
    Alarm,
    Backup,
    BatchOp,
    BatchResult,
    ConditionFailedError,
    Consistency,
    DeleteResult,
    InvalidRequestError,
    KeyValue,
    LeaseInfo,
    LeaseKeepAliveResult,
    LeaseNotFoundError,
    Member,
    NodeStatus,
    OutcomeUnknownError,
    Readiness,
    ReadResult,
    ReadTimeoutError,
    ServiceError,
    TokenCreateResult,
    TokenInfo,
    TokenRevokeResult,
    UnauthenticatedError,
    UnavailableError,
    WatchResult,
    WriteResult,
    error_from_code,
    nospace_error,
)
from raftkv.service import (
    LeaseGrantResult as ServiceLeaseGrant,
)
from raftkv.service import (
    LeaseRevokeResult as ServiceLeaseRevoke,
)
from raftkv.worker.channel import LOST, TIMED_OUT, ChannelClient

__all__ = ["BackupFile", "NodeView", "RemoteService"]

WATCH_SLACK_S: Final = 5.0
"""A watch is answered by the Raft process when its time runs out; the worker waits this much
longer before it gives up on the Raft process."""
WATCH_TOKEN_REVOKED: Final = ("the token this watch was sent with was revoked while it waited: "
                              "nothing of the key is told to a revoked token")
STATUS_TIMEOUT_S: Final = 5.0
_BLOCK_BYTES: Final = 256 << 10


class NodeView:
    """What the Raft process pushes to its workers (raftkv.runtime.process._view)."""

    def __init__(self) -> None:
        self.role = "follower"
        self.leader: str | None = None
        self.leader_http: str | None = None
        self.fatal: str | None = None
        self.stopping = False
        self.authorizer = OPEN_AUTHORIZER
        """The node's token table (digests only), as an Authorizer; replaced when a newer
        table arrives."""

    def update(self, view: dict[str, Any]) -> None:
        self.role = str(view.get("role", self.role))
        leader = view.get("leader")
        self.leader = leader if isinstance(leader, str) else None
        leader_http = view.get("leader_http")
        self.leader_http = leader_http if isinstance(leader_http, str) else None
        fatal = view.get("fatal")
        self.fatal = fatal if isinstance(fatal, str) else None
        self.stopping = bool(view.get("stopping"))
        wire = view.get("auth")
        if wire is not None:
            self.update_tokens(wire)

    def update_tokens(self, wire: object) -> bool:
        """Take a token table (TokenTable.to_wire) if it is newer than the one held; False
        for a malformed one (the one held is kept). One no newer is not decoded at all."""
        current = self.authorizer.table
        if current.covers(wire):
            return True
        try:
            table = TokenTable.from_wire(wire)
        except (ValueError, TypeError, KeyError):
            return False
        if table.version > current.version or table.enabled != current.enabled:
            self.authorizer = Authorizer(table)
        return True


class BackupFile:
    """A backup's snapshot in an (unlinked) file the Raft process handed over: read by
    waitress's file wrapper, or iterated in blocks."""

    def __init__(self, fd: int) -> None:
        self._file = io.FileIO(fd, "rb", closefd=True)
        self._file.seek(0)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size) or b""

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def __iter__(self) -> Iterator[bytes]:
        while block := self._file.read(_BLOCK_BYTES):
            yield block

    def close(self) -> None:
        self._file.close()


def _command(build: Callable[[], Command], request_id: str | None) -> bytes:
    """The entry data of the command `build` makes, carrying the token the request was
    authorised with (the state machine refuses it if that token was revoked meanwhile)."""
    try:
        return encode_command(build(), request_id, REQUEST_TOKEN_ID.get())
    except (ValueError, TypeError) as e:
        raise InvalidRequestError(str(e)) from None


class RemoteService:
    def __init__(self, channel: ChannelClient, view: NodeView) -> None:
        self._channel = channel
        self._view = view
        # Token catch-ups (caught_up_authorizer): one in flight at a time per worker.
        self._catch_up_done = GreenCondition(channel.dispatcher)
        self._catch_ups_begun = 0
        self._catch_ups_ended = 0
        """Equal to _catch_ups_begun but while one flies."""
        self._catch_up_outcome: Authorizer | ServiceError = OPEN_AUTHORIZER

    # ------------------------------------------------------------------ plumbing
    def _ask(self, op: RequestOp, timeout_s: float, *args: object,
             on_timeout: Callable[[], ServiceError], wait_s: float | None = None,
             write: bool = False) -> Any:
        outcome = self._channel.call(op, timeout_s, *args, wait_s=wait_s)
        if outcome is TIMED_OUT:
            raise on_timeout()
        if outcome is LOST:
            if write:
                raise OutcomeUnknownError("the node's Raft process stopped while the write "
                                          "was in flight: it may or may not have been "
                                          "applied; retry with the same Idempotency-Key")
            raise UnavailableError("the node's Raft process is not running")
        assert isinstance(outcome, Reply)
        if outcome.ok:
            return outcome.fd if op is RequestOp.BACKUP else outcome.payload, outcome.payload
        error = outcome.payload
        assert isinstance(error, codec.ErrorReply)
        raise error_from_code(error.code, error.message, error.details,
                              leader=self._view.leader_http)

    def _result(self, op: RequestOp, timeout_s: float, *args: object,
                on_timeout: Callable[[], ServiceError], wait_s: float | None = None,
                write: bool = False) -> Any:
        return self._ask(op, timeout_s, *args, on_timeout=on_timeout, wait_s=wait_s,
                         write=write)[1]

    def _read_timeout(self) -> ServiceError:
        return ReadTimeoutError("the read timed out (leadership could not be confirmed in "
                                "time)", leader=self._view.leader_http)

    def _write_timeout(self) -> ServiceError:
        return OutcomeUnknownError(
            "the write was not seen committed in time: it may or may not have been applied; "
            "retry with the same Idempotency-Key", leader=self._view.leader_http)

    def _busy(self) -> ServiceError:
        return UnavailableError("the node did not answer in time; retry")

    def _write(self, data: bytes, timeout_s: float) -> object:
        payload = self._result(RequestOp.PROPOSE, timeout_s, data,
                               on_timeout=self._write_timeout, write=True)
        try:
            result = codec.decode_apply_result(payload)
        except codec.DecodeError as e:
            raise UnavailableError(f"the node gave a bad answer ({e})") from None
        if isinstance(result, ConditionFailed):
            raise ConditionFailedError(
                f"condition failed for key {result.key!r}: its index is {result.current_index}",
                key=result.key, current_index=result.current_index,
                leader=self._view.leader_http)
        if isinstance(result, LeaseNotFound):
            raise LeaseNotFoundError(f"lease {result.lease_id} does not exist",
                                     lease_id=result.lease_id)
        if isinstance(result, InvalidCommand):
            raise InvalidRequestError(result.reason)
        if isinstance(result, AuthRefused) and result.reason == "token_revoked":
            raise UnauthenticatedError(AUTH_REFUSALS["token_revoked"])
        if isinstance(result, NoSpace):
            raise nospace_error(((a.node_id, a.cause) for a in result.alarms),
                                self._view.leader_http)
        return result

    @staticmethod
    def _unexpected(result: object) -> ServiceError:
        return UnavailableError(f"unexpected result {type(result).__name__}")

    # ------------------------------------------------------------------ keys
    def get(self, key: str, consistency: Consistency, timeout_s: float) -> ReadResult:
        value, index, lease = self._result(RequestOp.GET, timeout_s, key, consistency.value,
                                           on_timeout=self._read_timeout)
        return ReadResult(value, index, lease)

    def list_keys(self, prefix: str, limit: int, consistency: Consistency,
                  timeout_s: float) -> list[KeyValue]:
        rows = self._result(RequestOp.LIST, timeout_s, prefix, limit, consistency.value,
                            on_timeout=self._read_timeout)
        return [KeyValue(k, v, i) for k, v, i in rows]

    def put(self, key: str, value: object, *, prev_index: int | None = None,
            lease: int | None = None, ttl_s: int | None = None,
            request_id: str | None = None, timeout_s: float) -> WriteResult:
        data = _command(lambda: Put(key, value, prev_index, lease, ttl_s),  # type: ignore[arg-type]
                        request_id)
        result = self._write(data, timeout_s)
        if isinstance(result, PutResult):
            return WriteResult(value, result.index, result.lease)
        raise self._unexpected(result)

    def delete(self, key: str, *, prev_index: int | None = None,
               request_id: str | None = None, timeout_s: float) -> DeleteResult:
        result = self._write(_command(lambda: Delete(key, prev_index), request_id), timeout_s)
        if isinstance(result, KVDeleteResult):
            return DeleteResult(result.deleted, result.index)
        raise self._unexpected(result)

    def batch(self, ops: list[BatchOp], *, request_id: str | None = None,
              timeout_s: float) -> BatchResult:
        def build() -> Command:
            return Batch(tuple(
                Put(op.key, op.value, op.prev_index, op.lease)  # type: ignore[arg-type]
                if op.op == "put" else Delete(op.key, op.prev_index) for op in ops))

        result = self._write(_command(build, request_id), timeout_s)
        if isinstance(result, KVBatchResult) and len(result.results) == len(ops):
            return BatchResult(result.index, tuple(
                WriteResult(op.value, r.index, r.lease) if isinstance(r, PutResult)
                else DeleteResult(r.deleted, r.index)
                for op, r in zip(ops, result.results, strict=True)))
        raise self._unexpected(result)

    def watch(self, key: str, after_index: int | None, timeout_s: float) -> WatchResult:
        row = self._result(RequestOp.WATCH, timeout_s, key, after_index,
                           on_timeout=self._busy, wait_s=timeout_s + WATCH_SLACK_S)
        # A watch waits for up to a minute: the token it was let in with may have been
        # revoked meanwhile. The Raft process pushes the new token table before it sends the
        # answers of the turn that applied the revoke, so a watch that ends once this node
        # applied the revoke tells a revoked token nothing (neither a change nor the key).
        token_id = REQUEST_TOKEN_ID.get()
        if token_id is not None and not self._view.authorizer.table.has(token_id):
            raise UnauthenticatedError(WATCH_TOKEN_REVOKED)
        k, value, index, deleted, changed = row
        return WatchResult(k, value, index, deleted, changed)

    # ------------------------------------------------------------------ leases
    def lease_grant(self, ttl_s: int, *, request_id: str | None = None,
                    timeout_s: float) -> ServiceLeaseGrant:
        result = self._write(_command(lambda: LeaseGrant(ttl_s), request_id), timeout_s)
        if isinstance(result, LeaseGrantResult):
            return ServiceLeaseGrant(result.lease_id, result.ttl_s, result.index)
        raise self._unexpected(result)

    def lease_revoke(self, lease_id: int, *, request_id: str | None = None,
                     timeout_s: float) -> ServiceLeaseRevoke:
        result = self._write(_command(lambda: LeaseRevoke(lease_id), request_id), timeout_s)
        if isinstance(result, LeaseRevokeResult):
            return ServiceLeaseRevoke(result.lease_id, result.index)
        raise self._unexpected(result)

    def lease_keepalive(self, lease_id: int, *, timeout_s: float) -> LeaseKeepAliveResult:
        ttl_s = self._result(RequestOp.LEASE_KEEPALIVE, timeout_s, lease_id,
                             on_timeout=self._read_timeout)
        return LeaseKeepAliveResult(lease_id, int(ttl_s))

    def lease(self, lease_id: int, *, timeout_s: float) -> LeaseInfo:
        row = self._result(RequestOp.LEASE_INFO, timeout_s, lease_id,
                           on_timeout=self._read_timeout)
        return _lease_info(row)

    def leases(self, limit: int, *, timeout_s: float) -> list[LeaseInfo]:
        rows = self._result(RequestOp.LEASE_LIST, timeout_s, limit,
                            on_timeout=self._read_timeout)
        return [_lease_info(row) for row in rows]

    # ------------------------------------------------------------------ the node
    def is_leader(self) -> bool:
        return self._view.role == "leader"

    def leader_http_address(self) -> str | None:
        return self._view.leader_http

    def status(self) -> NodeStatus:
        raw = self._result(RequestOp.STATUS, STATUS_TIMEOUT_S, on_timeout=self._busy)
        members = tuple(Member(**m) for m in raw.pop("members"))
        return NodeStatus(members=members, **raw)

    def readiness(self) -> Readiness:
        if self._view.fatal is not None:
            return Readiness(False, f"node stopped: {self._view.fatal}")
        if self._view.stopping:
            return Readiness(False, "the node is stopping")
        ready, reason = self._result(RequestOp.READINESS, STATUS_TIMEOUT_S,
                                     on_timeout=self._busy)
        return Readiness(bool(ready), str(reason))

    def members(self) -> list[Member]:
        rows = self._result(RequestOp.MEMBERS, STATUS_TIMEOUT_S, on_timeout=self._busy)
        return [Member(**m) for m in rows]

    def join(self, node_id: str | None, raft_address: str, *, voter: bool = True,
             timeout_s: float) -> int:
        index = self._result(RequestOp.JOIN, timeout_s, node_id, raft_address, voter,
                             on_timeout=lambda: OutcomeUnknownError(
                                 "the membership change was not seen committed in time"),
                             write=True)
        return int(index)

    def remove(self, node_id: str, *, timeout_s: float) -> int:
        index = self._result(RequestOp.REMOVE, timeout_s, node_id,
                             on_timeout=lambda: OutcomeUnknownError(
                                 "the membership change was not seen committed in time"),
                             write=True)
        return int(index)

    def transfer_leadership(self, target: str | None, *, timeout_s: float) -> str:
        leader = self._result(RequestOp.TRANSFER, timeout_s, target,
                              on_timeout=lambda: OutcomeUnknownError(
                                  "the leadership transfer timed out"))
        return str(leader)

    def backup(self, consistency: Consistency, timeout_s: float) -> Backup:
        fd, payload = self._ask(RequestOp.BACKUP, timeout_s, consistency.value,
                                on_timeout=self._read_timeout)
        index, checksum, length, algorithm = payload
        if fd is None:
            raise UnavailableError("the backup file did not arrive; retry")
        return Backup(index, checksum, length, BackupFile(fd),  # type: ignore[arg-type]
                      algorithm)

    # ------------------------------------------------------------------ tokens
    def authorizer(self) -> Authorizer:
        return self._view.authorizer

    def caught_up_authorizer(self, timeout_s: float) -> Authorizer:
        """One catch-up in flight at a time per worker: a caller takes the outcome of the
        first catch-up that BEGAN after it came (one already flying may have read the table
        before the caller's token was made), so however many unknown bearers arrive together,
        the Raft process sees at most one such read per worker at a time. A catch-up asks
        with the deadline of the caller that began it; one that timed out that way is not the
        answer for a caller with time left, who takes the next one (a caller with a tiny
        ?timeout cannot make the others' look-ups fail)."""
        deadline = time.monotonic() + timeout_s
        wanted = self._catch_ups_begun + 1
        while True:
            while self._catch_ups_ended < wanted:
                if self._catch_ups_ended == self._catch_ups_begun:  # none flying: this asks
                    return self._catch_up(deadline)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._catch_up_done.wait(remaining):
                    raise self._read_timeout()
            outcome = self._catch_up_outcome
            if isinstance(outcome, ReadTimeoutError) and time.monotonic() < deadline:
                wanted = self._catch_ups_ended + 1
                continue
            if isinstance(outcome, ServiceError):
                raise outcome
            return outcome

    def _catch_up(self, deadline: float) -> Authorizer:
        self._catch_ups_begun += 1
        outcome: Authorizer | ServiceError = UnavailableError(
            "the token table could not be read; retry")
        try:
            view = self._view
            wire = self._result(RequestOp.TOKENS_SINCE, max(0.0, deadline - time.monotonic()),
                                Consistency.LINEARIZABLE.value, view.authorizer.table.version,
                                on_timeout=self._read_timeout)
            if wire is not None and not view.update_tokens(wire):
                raise UnavailableError("the node gave a bad answer (a malformed token table)")
            outcome = view.authorizer
        except ServiceError as e:
            outcome = e
        finally:  # whatever happened, the callers waiting go on with its outcome
            self._catch_ups_ended = self._catch_ups_begun
            self._catch_up_outcome = outcome
            self._catch_up_done.notify_all()
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    def token_create(self, role: Role, prefixes: tuple[str, ...], *,
                     request_id: str | None = None, timeout_s: float) -> TokenCreateResult:
        cmd, secret = token_requests.create_command(self._view.authorizer.table, role, prefixes)
        result = self._write(_command(lambda: cmd, request_id), timeout_s)
        answer = token_requests.created(result, cmd, secret)
        if answer is None:
            raise self._unexpected(result)
        return answer

    def token_revoke(self, token_id: str, *, request_id: str | None = None,
                     timeout_s: float) -> TokenRevokeResult:
        cmd = token_requests.revoke_command(self._view.authorizer.table, token_id)
        result = self._write(_command(lambda: cmd, request_id), timeout_s)
        answer = token_requests.revoked(result)
        if answer is None:
            raise self._unexpected(result)
        return answer

    def tokens(self, consistency: Consistency, timeout_s: float) -> list[TokenInfo]:
        wire = self._result(RequestOp.TOKENS, timeout_s, consistency.value,
                            on_timeout=self._read_timeout)
        try:
            table = TokenTable.from_wire(wire)
        except (ValueError, TypeError, KeyError) as e:
            raise UnavailableError(f"the node gave a bad answer ({e})") from None
        return token_requests.token_infos(table)

    # ------------------------------------------------------------------ alarms
    def alarms(self) -> list[Alarm]:
        wire = self._result(RequestOp.ALARMS, STATUS_TIMEOUT_S, on_timeout=self._busy)
        try:
            records = codec.decode_alarms(wire)
        except codec.DecodeError as e:
            raise UnavailableError(f"the node gave a bad answer ({e})") from None
        return [Alarm(r.node_id, r.cause, r.index) for r in records]

    def disarm_alarms(self, *, timeout_s: float) -> int:
        result = self._write(_command(AlarmDisarm, None), timeout_s)
        if isinstance(result, AlarmResult):
            return result.index
        raise self._unexpected(result)

    def render_metrics(self) -> bytes:
        text = self._result(RequestOp.METRICS, STATUS_TIMEOUT_S, on_timeout=self._busy)
        return bytes(text)


def _lease_info(row: list[Any]) -> LeaseInfo:
    lease_id, ttl_s, remaining, keys, key_count = row
    return LeaseInfo(int(lease_id), int(ttl_s), float(remaining), tuple(keys), int(key_count))
