"""The key-value state machine: a dict of key -> (value, last-modified index), and leases.

`KVStateMachine` implements `raftkv.ports.StateMachine`. It applies committed entries in
order and returns a typed result for the waiting client. Retries are idempotent: the
result for each of the last `max_request_ids` request ids is remembered (oldest forgotten
first, so every replica forgets the same ones) and a retried command gets its first answer
back without being applied again (PITFALLS.md #8).

Snapshots are taken in two steps so writes stall only briefly: `snapshot_view()` takes a
cheap consistent copy on the caller's (loop) thread, and the pure functions
`iter_snapshot_chunks(view)` / `serialize_snapshot(view)` turn it into bytes on any thread.
The bytes are a stream of msgpack objects: a header, then the data in segments of at most
SEGMENT_KEYS keys (three columns: keys, values, last-modified indices), then the remembered
answers in segments, then (version 2) the leases in segments (two columns: ids, TTLs) and the
attached keys in segments (two columns: keys, lease ids); each segment is packed by one C call,
so a background serialiser gives the GIL back between segments. `parse_snapshot`
(pure, too) and `restore_view` are the reverse; `restore(data, index)` does both.

Leases are replicated state too: lease id -> TTL (whole seconds), and key -> the lease it is
attached to. A lease's id is the index of the entry that granted it (a `LeaseGrant`, or a
`Put` with `ttl_s`), so ids are unique and the same on every replica, with no randomness. A
`LeaseRevoke` deletes every key attached to the lease in that one entry; its result lists them
(sorted), for the watch registry. Nothing here knows about time: when a lease expires is the
leader's decision (raftkv.kv.leases.LeaseExpiry), carried out as a proposed LeaseRevoke
(`expired=True`), so every replica deletes the same keys at the same index.

Attachment rules (as in etcd): a Put with `lease` attaches its key to that lease (moving it from
any other), a Put with `ttl_s` to the fresh lease it grants, a Put with neither detaches it; a
Delete detaches it. A Put or Batch that names a lease that does not exist applies nothing and
returns `LeaseNotFound`; conditions are checked first, operation by operation, so a command
that fails both ways reports whichever failure its first failing operation has.

Tokens (raftkv.auth) are replicated state too, in a section of their own below ("auth"): whether
auth is on, and each token's id, role, key prefixes, secret digest and creation index. They
change only by AuthEnable (once, from the bootstrap log), TokenCreate and TokenRevoke; the
current table is `token_table`, an immutable value any thread may read.

Size and the NOSPACE alarm (issue 14). `size_bytes` is what the quota counts: for every key,
its UTF-8 bytes + its value's msgpack encoding + RECORD_OVERHEAD_BYTES (64), plus LEASE_BYTES per
lease. It is exact and the same on every replica at the same index: every apply keeps it up to
date (a string or number value's encoded size is computed, not re-encoded; only lists and
objects are packed), and a restore recomputes it. Alarms are replicated state: an `AlarmRaise`
entry (node, cause) raises NOSPACE, an `AlarmDisarm` entry clears every alarm; while one is
raised, every replica answers a command that adds data (commands.adds_data) with `NoSpace` and
applies nothing of it (deletes, lease revokes and reads go on). Alarms travel in snapshots as
an optional section ("alarms" in the header, then one segment); a snapshot without it has none.

Values are shared, not copied: treat values returned by `get`, `items` and the results as
read-only.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import operator
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeAlias, TypeVar

import msgpack  # type: ignore[import-untyped, unused-ignore]

from raftkv.auth import (
    MAX_TOKENS,
    ROOT_TOKEN_ID,
    Role,
    TokenRecord,
    TokenTable,
    prefixes_text,
)
from raftkv.core.types import ConfChange, ConfChangeOp, Entry, EntryKind, NodeId
from raftkv.kv.commands import (
    ALARM_CAUSES,
    MAX_LEASE_TTL_S,
    AlarmDisarm,
    AlarmRaise,
    AuthEnable,
    Batch,
    Command,
    CommandDecodeError,
    Delete,
    JSONValue,
    LeaseGrant,
    LeaseRevoke,
    MemberIncarnation,
    Put,
    TokenCreate,
    TokenRevoke,
    adds_data,
    decode_entry,
    encode_command,
)

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "raftkv.kv"
SNAPSHOT_VERSION = 2
"""Version 2 added leases; version 1 snapshots (no leases) are still read."""
_SNAPSHOT_VERSIONS = (1, 2)
SEGMENT_KEYS = 8192
SEGMENT_REQUESTS = 8192
DEFAULT_MAX_REQUEST_IDS = 100_000
MAX_ITEMS_LIMIT = 100_000
_READ_SIZE_BYTES = 1024 * 1024
_K = TypeVar("_K", int, str)


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True, slots=True)
class PutResult:
    index: int
    value: JSONValue
    lease: int | None = None
    """The lease the key is attached to now; None: none."""
    ttl_s: int | None = None
    """Set when this put granted its own lease (`Put.ttl_s`): its TTL; its id is `index`."""


@dataclass(frozen=True, slots=True)
class DeleteResult:
    index: int
    deleted: bool
    """False when the key was absent (the delete still succeeded)."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    index: int
    results: tuple[PutResult | DeleteResult, ...]


@dataclass(frozen=True, slots=True)
class ConditionFailed:
    """A prev_index condition did not hold; nothing of the command was applied."""

    index: int
    key: str
    current_index: int
    """The key's last-modified index when the condition was checked; 0 if absent."""


@dataclass(frozen=True, slots=True)
class LeaseGrantResult:
    index: int
    lease_id: int
    """Always equal to `index`: a lease's id is the index of the entry that granted it."""
    ttl_s: int


@dataclass(frozen=True, slots=True)
class LeaseRevokeResult:
    index: int
    lease_id: int
    keys: tuple[str, ...]
    """The keys this entry deleted, sorted. Empty in a replayed answer (a retry with the
    same request id): the first apply deleted them."""
    expired: bool
    """The leader revoked it because it expired (else a client revoked it)."""


@dataclass(frozen=True, slots=True)
class LeaseNotFound:
    """The command names a lease that does not exist (never granted, revoked, or expired);
    nothing of the command was applied."""

    index: int
    lease_id: int


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """One lease as read from the state machine (see KVStateMachine.lease)."""

    lease_id: int
    ttl_s: int
    keys: tuple[str, ...]
    """Attached keys, sorted; at most the limit asked for (all of them: `key_count`)."""
    key_count: int


@dataclass(frozen=True, slots=True)
class AlarmRecord:
    """One raised NOSPACE alarm: the node that raised it, why (commands.ALARM_CAUSES), and
    the index of the entry that raised it."""

    node_id: NodeId
    cause: str
    index: int


@dataclass(frozen=True, slots=True)
class NoSpace:
    """The NOSPACE alarm is raised: this command would add data, so nothing of it was
    applied. Not remembered for its request id: a retry after the disarm applies."""

    index: int
    alarms: tuple[AlarmRecord, ...]


@dataclass(frozen=True, slots=True)
class AlarmResult:
    """An AlarmRaise or AlarmDisarm applied: the alarms now raised."""

    index: int
    alarms: tuple[AlarmRecord, ...]


@dataclass(frozen=True, slots=True)
class IncarnationResult:
    """A MemberIncarnation applied: the incarnation now recorded for that member (None: it
    is no member), and whether this entry recorded it (False: one was recorded already, or
    the node is no member)."""

    index: int
    node_id: str
    incarnation: str | None
    recorded: bool


@dataclass(frozen=True, slots=True)
class InvalidCommand:
    """The entry's data is not a command this version understands; nothing was applied."""

    index: int
    reason: str


# ------------------------------------------------------------------------------ auth results
@dataclass(frozen=True, slots=True)
class AuthEnabled:
    """Auth is on from this index, with the root token."""

    index: int


@dataclass(frozen=True, slots=True)
class TokenCreated:
    index: int
    token_id: str
    """The id of the token this request created."""
    replayed: bool = False
    """A retry (same request id) of a create that applied earlier, under another id and
    secret: the secret this retry carries is NOT the token's (only the first answer had it)."""


@dataclass(frozen=True, slots=True)
class TokenRevoked:
    index: int
    token_id: str


@dataclass(frozen=True, slots=True)
class TokenNotFound:
    index: int
    token_id: str


@dataclass(frozen=True, slots=True)
class AuthRefused:
    """An auth command that applied nothing; `reason` is one of AUTH_REFUSALS."""

    index: int
    reason: str


AUTH_REFUSALS = {
    "auth_disabled": "the cluster was bootstrapped without auth (no root token): it has no "
                     "tokens",
    "auth_enabled": "auth is already on",
    "token_revoked": "the token this request was sent with was revoked before it applied: "
                     "nothing was written",
    "token_exists": "a token with this id exists already",
    "too_many_tokens": f"the cluster holds {MAX_TOKENS} tokens already: revoke some first",
    "last_admin": "this is the last admin token: create another admin token first",
}
AuthResult: TypeAlias = AuthEnabled | TokenCreated | TokenRevoked | TokenNotFound | AuthRefused

CommandResult: TypeAlias = (
    PutResult | DeleteResult | BatchResult | ConditionFailed | LeaseGrantResult
    | LeaseRevokeResult | LeaseNotFound | AuthResult | NoSpace | AlarmResult
    | IncarnationResult
)
"""What a decoded command returns (ApplyResult without InvalidCommand)."""
ApplyResult: TypeAlias = CommandResult | InvalidCommand
Record: TypeAlias = tuple[JSONValue, int]
"""(value, last-modified index)"""


@dataclass(frozen=True, slots=True)
class RememberedAnswer:
    """The first answer to a request id, without the values: a retry carries them again.

    Keeping values out keeps the memory and the snapshot small (a batch of 1,000 puts
    would otherwise be remembered with all 1,000 values). `fingerprint` is a hash of the
    entry data, so a request id reused for a different command is told apart from a retry.
    """

    fingerprint: bytes
    index: int
    kind: int
    """_PUT, _DELETE, _BATCH, _FAILED, _GRANT, _REVOKE or _NO_LEASE."""
    flags: tuple[bool | None, ...] = ()
    """Per operation: None for a put, the `deleted` flag for a delete."""
    key: str = ""
    """For a failed condition: the key and its last-modified index (`current_index`)."""
    current_index: int = 0
    """For a failed condition: the key's last-modified index; for a missing lease: its id."""


class StateMachineError(Exception):
    """The state machine was driven wrongly (e.g. an entry skipped); the node must stop."""


class SnapshotCorrupt(StateMachineError):
    """Snapshot bytes that are not a valid key-value snapshot."""


# ------------------------------------------------------------------------------ views
@dataclass(frozen=True, slots=True)
class KVSnapshotView:
    """A consistent copy of the state at `applied_index`, owned by whoever holds it."""

    applied_index: int
    data: dict[str, Record]
    requests: dict[str, RememberedAnswer]
    """Remembered answers by request id, oldest first."""
    addresses: dict[NodeId, str]
    leases: dict[int, int] = field(default_factory=dict)
    """Lease id -> TTL in seconds."""
    key_leases: dict[str, int] = field(default_factory=dict)
    """Key -> the lease it is attached to (only attached keys)."""
    auth: TokenTable = field(default_factory=TokenTable)
    """The token table (immutable: shared, not copied)."""
    alarms: dict[tuple[NodeId, str], int] = field(default_factory=dict)
    """(node id, cause) -> the index that raised that NOSPACE alarm."""
    incarnations: dict[NodeId, str] = field(default_factory=dict)
    """Member -> the incarnation of the data dir it runs on (MemberIncarnation)."""
    size_bytes: int = field(default=0, compare=False)
    """KVStateMachine.size_bytes of this state (0: unknown); sizes the snapshot's segments.
    Derived, so not compared (a parsed view does not carry it)."""


# ------------------------------------------------------------------------------ the machine
class KVStateMachine:
    """The replicated dict. Not thread-safe: the runtime's loop thread owns it."""

    def __init__(self, *, max_request_ids: int = DEFAULT_MAX_REQUEST_IDS) -> None:
        if type(max_request_ids) is not int or max_request_ids < 0:
            raise ValueError(f"max_request_ids must be an int >= 0, got {max_request_ids!r}")
        self._max_request_ids = max_request_ids
        self._applied_index = 0
        self._data: dict[str, Record] = {}
        # Remembered answers in insertion order; the deque says which to forget first (a
        # dict alone cannot pop its oldest item in O(1), and an OrderedDict copies slowly).
        self._requests: dict[str, RememberedAnswer] = {}
        self._request_order: deque[str] = deque()
        self._addresses: dict[NodeId, str] = {}
        self._incarnations: dict[NodeId, str] = {}
        self._key_order = _KeyOrder()
        self._lease_ttls: dict[int, int] = {}
        self._key_leases: dict[str, int] = {}
        self._lease_keys: dict[int, set[str]] = {}
        """Lease id -> its attached keys: the inverse of _key_leases, one entry per lease."""
        self._token_table = TokenTable()
        """Replaced whole on every auth change: readers on other threads see one or the
        other, never a half-changed table."""
        self._size = 0
        """size_bytes, kept up to date by every apply (see record_size)."""
        self._alarms: dict[tuple[NodeId, str], int] = {}

    # StateMachine
    @property
    def applied_index(self) -> int:
        return self._applied_index

    def apply(self, entry: Entry) -> ApplyResult | None:
        """Apply the next committed entry; None for no-ops and membership changes.

        Entries at or below applied_index (already covered by a restored snapshot) are
        skipped and return None; a gap raises StateMachineError.
        """
        index = entry.index
        if index <= self._applied_index:
            logger.debug(
                "event=kv_entry_skipped index=%d applied_index=%d", index, self._applied_index
            )
            return None
        if index != self._applied_index + 1:
            raise StateMachineError(
                f"entry {index} applied after {self._applied_index}: entries were skipped"
            )
        self._applied_index = index
        if entry.kind is EntryKind.CONF_CHANGE:
            assert entry.change is not None  # Entry validates this
            self._apply_change(entry.change, index)
            return None
        if not entry.data:
            return None  # the leader's no-op
        try:
            cmd, request_id, token_id = decode_entry(entry.data, logged=True)
        except CommandDecodeError as e:
            logger.warning("event=kv_invalid_command index=%d reason=%s", index, e)
            return InvalidCommand(index, str(e))
        revoked = token_id is not None and not self._token_table.has(token_id)
        if request_id is None or isinstance(cmd, AlarmRaise | AlarmDisarm | MemberIncarnation):
            if revoked:
                return self._refuse_revoked(index, token_id)
            return self._execute(cmd, index)  # the alarm commands are idempotent anyway
        fingerprint = _fingerprint(_fingerprinted(cmd, entry.data, request_id, token_id))
        known = self._requests.get(request_id)
        if revoked:
            # A retry of a request that applied while its token was valid (a 504, then the
            # same Idempotency-Key) is told what happened; it writes nothing new.
            answer = (_replay(known, cmd) if known is not None
                      and known.fingerprint == fingerprint else None)
            if known is None or answer is None:
                return self._refuse_revoked(index, token_id)
            logger.debug("event=kv_retry_answered index=%d first_index=%d", index, known.index)
            return answer
        if known is not None:
            answer = _replay(known, cmd) if known.fingerprint == fingerprint else None
            if answer is None:
                logger.warning(
                    "event=kv_request_id_reused index=%d first_index=%d", index, known.index
                )
                return InvalidCommand(index, "request id already used for a different command")
            logger.debug("event=kv_retry_answered index=%d first_index=%d", index, known.index)
            return answer
        result = self._execute(cmd, index)
        if isinstance(result, NoSpace):
            return result  # nothing applied: a retry after the disarm must apply
        if self._max_request_ids:
            self._requests[request_id] = _remember(fingerprint, result)
            self._request_order.append(request_id)
            if len(self._request_order) > self._max_request_ids:
                del self._requests[self._request_order.popleft()]
        return result

    @staticmethod
    def _refuse_revoked(index: int, token_id: str | None) -> AuthRefused:
        """Authorised by a worker before the token's revoke applied, ordered after it: nothing
        is written (every replica decides it alike, from the replicated table)."""
        logger.info("event=kv_revoked_token_refused index=%d token=%s", index, token_id)
        return AuthRefused(index, "token_revoked")

    def snapshot(self) -> bytes:
        """The whole snapshot as one bytes (small states and tests; see snapshot_chunks)."""
        return serialize_snapshot(self.snapshot_view())

    def snapshot_chunks(self) -> Iterator[bytes]:
        return iter_snapshot_chunks(self.snapshot_view())

    def restore(self, data: bytes, index: int) -> None:
        """Replace the state with a snapshot taken at `index`; SnapshotCorrupt if it is bad.

        On error the state is left as it was.
        """
        self.restore_view(parse_snapshot(data), index)

    def restore_chunks(self, chunks: Iterable[bytes], index: int) -> None:
        """restore() from the snapshot's chunks, never holding its bytes whole; errors the
        chunks raise (a damaged store) pass through, and the state is left as it was."""
        self.restore_view(parse_snapshot_chunks(chunks), index)

    @staticmethod
    def snapshot_decoder() -> KVSnapshotDecoder:
        """The Raft core's snapshot validator for this machine (see install)."""
        return KVSnapshotDecoder()

    def install(self, state: object, index: int) -> None:
        """Replace the state with what snapshot_decoder() decoded from the snapshot at
        `index` (the core's Ready.snapshot_state): no second parse, no read back."""
        if not isinstance(state, KVSnapshotView):
            raise StateMachineError(f"install() needs a KVSnapshotView, not "
                                    f"{type(state).__name__}")
        self.restore_view(state, index)

    # Snapshots in two steps
    def snapshot_view(self) -> KVSnapshotView:
        """A consistent copy (C-speed shallow copies) for serialising on another thread."""
        return KVSnapshotView(
            applied_index=self._applied_index,
            data=self._data.copy(),
            requests=self._requests.copy(),
            addresses=self._addresses.copy(),
            leases=self._lease_ttls.copy(),
            key_leases=self._key_leases.copy(),
            auth=self._token_table,
            alarms=self._alarms.copy(),
            incarnations=self._incarnations.copy(),
            size_bytes=self._size,
        )

    def restore_view(self, view: KVSnapshotView, index: int) -> None:
        if view.applied_index != index:
            raise SnapshotCorrupt(
                f"snapshot holds the state at index {view.applied_index}, "
                f"but was restored as the snapshot at index {index}"
            )
        excess = max(0, len(view.requests) - self._max_request_ids)
        requests = itertools.islice(view.requests.items(), excess, None)
        self._data = view.data.copy()
        self._requests = dict(requests)
        self._request_order = deque(self._requests)
        self._addresses = view.addresses.copy()
        self._lease_ttls = view.leases.copy()
        self._key_leases = view.key_leases.copy()
        self._lease_keys = {lease_id: set() for lease_id in self._lease_ttls}
        for key, lease_id in self._key_leases.items():
            self._lease_keys[lease_id].add(key)
        self._token_table = view.auth
        self._alarms = view.alarms.copy()
        self._incarnations = view.incarnations.copy()
        self._size = _state_size(self._data, self._lease_ttls)
        self._applied_index = view.applied_index
        self._key_order.clear()
        logger.info(
            "event=kv_restored index=%d keys=%d request_ids=%d members=%d leases=%d "
            "size_bytes=%d alarms=%d",
            index, len(self._data), len(self._requests), len(self._addresses),
            len(self._lease_ttls), self._size, len(self._alarms),
        )

    # Reads
    def get(self, key: str) -> Record | None:
        """(value, last-modified index), or None if the key is absent."""
        return self._data.get(key)

    def items(self, prefix: str = "", limit: int = 1000) -> list[tuple[str, JSONValue, int]]:
        """Up to `limit` (key, value, last-modified index) with keys starting with `prefix`,
        in key order."""
        if type(limit) is not int or not 1 <= limit <= MAX_ITEMS_LIMIT:
            raise ValueError(f"limit must be an int in [1, {MAX_ITEMS_LIMIT}]")
        data = self._data
        out: list[tuple[str, JSONValue, int]] = []
        for key in itertools.islice(self._key_order.scan(data, prefix), limit):
            value, mod_index = data[key]
            out.append((key, value, mod_index))
        return out

    def __len__(self) -> int:
        return len(self._data)

    @property
    def addresses(self) -> Mapping[NodeId, str]:
        """node id -> address, from the applied membership changes (read-only)."""
        return MappingProxyType(self._addresses)

    @property
    def incarnations(self) -> Mapping[NodeId, str]:
        """member -> the incarnation of its data dir, once a leader recorded it (read-only)."""
        return MappingProxyType(self._incarnations)

    @property
    def max_request_ids(self) -> int:
        return self._max_request_ids

    # Leases
    def lease_of(self, key: str) -> int | None:
        """The lease `key` is attached to, or None."""
        return self._key_leases.get(key)

    def lease(self, lease_id: int, keys_limit: int = MAX_ITEMS_LIMIT) -> LeaseRecord | None:
        """The lease `lease_id` with up to `keys_limit` of its keys (sorted), or None."""
        ttl_s = self._lease_ttls.get(lease_id)
        if ttl_s is None:
            return None
        keys = self._lease_keys[lease_id]
        shown = heapq.nsmallest(keys_limit, keys) if keys_limit < len(keys) else sorted(keys)
        return LeaseRecord(lease_id, ttl_s, tuple(shown), len(keys))

    def leases(self, limit: int = 1000) -> list[LeaseRecord]:
        """Up to `limit` leases in id order, without their keys (`key_count` says how many)."""
        if type(limit) is not int or not 1 <= limit <= MAX_ITEMS_LIMIT:
            raise ValueError(f"limit must be an int in [1, {MAX_ITEMS_LIMIT}]")
        return [LeaseRecord(lease_id, self._lease_ttls[lease_id], (),
                            len(self._lease_keys[lease_id]))
                for lease_id in heapq.nsmallest(limit, self._lease_ttls)]

    # Tokens
    @property
    def token_table(self) -> TokenTable:
        """Auth on or off, and every token (no secrets): immutable, so any thread may read
        it; it is replaced (a new object, a higher `version`) whenever a token changes."""
        return self._token_table

    @property
    def lease_ttls(self) -> Mapping[int, int]:
        """Lease id -> TTL of every lease (read-only): what a new leader's
        LeaseExpiry.became_leader needs."""
        return MappingProxyType(self._lease_ttls)

    # Size and alarms
    @property
    def size_bytes(self) -> int:
        """The size of the data, as the quota counts it: the sum of record_size over every
        key, plus LEASE_BYTES per lease. Exact (the same on every replica at the same
        index), kept up to date by every apply, recomputed on restore."""
        return self._size

    @property
    def alarms(self) -> tuple[AlarmRecord, ...]:
        """The raised NOSPACE alarms, oldest first; empty: writes are accepted."""
        return tuple(AlarmRecord(node, cause, index)
                     for (node, cause), index in sorted(self._alarms.items(),
                                                         key=lambda item: item[1]))

    @property
    def alarm_active(self) -> bool:
        """One attribute read for the Raft process's per-write check."""
        return bool(self._alarms)

    # Internals
    def _apply_change(self, change: ConfChange, index: int) -> None:
        if change.op is ConfChangeOp.REMOVE:
            self._addresses.pop(change.node_id, None)
            self._incarnations.pop(change.node_id, None)  # it may come back on a new one
        elif change.address:
            self._addresses[change.node_id] = change.address
        logger.debug(
            "event=kv_member_address index=%d op=%s node=%s",
            index, change.op.name.lower(), change.node_id,
        )

    def _execute(self, cmd: Command, index: int) -> CommandResult:
        if self._alarms and adds_data(cmd):
            return NoSpace(index, self.alarms)
        data = self._data
        if isinstance(cmd, Put):
            current = data.get(cmd.key)
            if cmd.prev_index is not None and cmd.prev_index != _mod_index(current):
                return ConditionFailed(index, cmd.key, _mod_index(current))
            lease = cmd.lease
            if lease is not None and lease not in self._lease_ttls:
                return LeaseNotFound(index, lease)
            if cmd.ttl_s is not None:
                lease = self._grant(index, cmd.ttl_s)
            data[cmd.key] = (cmd.value, index)
            if current is None:
                self._key_order.inserted(cmd.key)
            else:
                self._size -= record_size(cmd.key, current[0])
            self._size += record_size(cmd.key, cmd.value)
            self._attach(cmd.key, lease)
            return PutResult(index, cmd.value, lease, cmd.ttl_s)
        if isinstance(cmd, Delete):
            current = data.get(cmd.key)
            if cmd.prev_index is not None and cmd.prev_index != _mod_index(current):
                return ConditionFailed(index, cmd.key, _mod_index(current))
            if current is None:
                return DeleteResult(index, deleted=False)
            del data[cmd.key]
            self._size -= record_size(cmd.key, current[0])
            self._key_order.removed(cmd.key)
            self._attach(cmd.key, None)
            return DeleteResult(index, deleted=True)
        if isinstance(cmd, Batch):
            return self._execute_batch(cmd, index)
        if isinstance(cmd, LeaseGrant):
            return LeaseGrantResult(index, self._grant(index, cmd.ttl_s), cmd.ttl_s)
        if isinstance(cmd, LeaseRevoke):
            return self._revoke(cmd, index)
        if isinstance(cmd, AlarmRaise):
            return self._raise_alarm(cmd, index)
        if isinstance(cmd, AlarmDisarm):
            return self._disarm(index)
        if isinstance(cmd, MemberIncarnation):
            return self._record_incarnation(cmd, index)
        return self._execute_auth(cmd, index)

    def _record_incarnation(self, cmd: MemberIncarnation, index: int) -> IncarnationResult:
        """The first record of a member stays (another one is what the members refuse); a
        node that is no member (removed since the leader proposed it) gets none."""
        known = self._incarnations.get(cmd.node_id)
        if known is not None or cmd.node_id not in self._addresses:
            return IncarnationResult(index, cmd.node_id, known, recorded=False)
        self._incarnations[cmd.node_id] = cmd.incarnation
        logger.info("event=kv_member_incarnation index=%d node=%s incarnation=%s", index,
                    cmd.node_id, cmd.incarnation)
        return IncarnationResult(index, cmd.node_id, cmd.incarnation, recorded=True)

    def _execute_auth(self, cmd: AuthEnable | TokenCreate | TokenRevoke,
                      index: int) -> AuthResult:
        table = self._token_table
        tokens = {t.token_id: t for t in table.tokens}
        if isinstance(cmd, AuthEnable):
            if table.enabled:
                return AuthRefused(index, "auth_enabled")
            root = TokenRecord(ROOT_TOKEN_ID, Role.ADMIN, (), cmd.root_digest, index)
            self._token_table = TokenTable(True, (root,), index)
            logger.info("event=kv_auth_enabled index=%d", index)
            return AuthEnabled(index)
        if not table.enabled:
            return AuthRefused(index, "auth_disabled")
        if isinstance(cmd, TokenCreate):
            if cmd.token_id in tokens or any(t.digest == cmd.digest for t in table.tokens):
                return AuthRefused(index, "token_exists")
            if len(tokens) >= MAX_TOKENS:
                return AuthRefused(index, "too_many_tokens")
            tokens[cmd.token_id] = TokenRecord(cmd.token_id, cmd.role, cmd.prefixes,
                                               cmd.digest, index)
            self._token_table = TokenTable(True, tuple(tokens.values()), index)
            logger.info("event=kv_token_created index=%d token=%s role=%s prefixes=%s", index,
                        cmd.token_id, cmd.role.value, prefixes_text(cmd.prefixes))
            return TokenCreated(index, cmd.token_id)
        revoked = tokens.pop(cmd.token_id, None)
        if revoked is None:
            return TokenNotFound(index, cmd.token_id)
        if revoked.role is Role.ADMIN and not any(
                t.role is Role.ADMIN for t in tokens.values()):
            return AuthRefused(index, "last_admin")
        self._token_table = TokenTable(True, tuple(tokens.values()), index)
        logger.info("event=kv_token_revoked index=%d token=%s", index, cmd.token_id)
        return TokenRevoked(index, cmd.token_id)

    def _raise_alarm(self, cmd: AlarmRaise, index: int) -> AlarmResult:
        key = (cmd.node_id, cmd.cause)
        if key not in self._alarms:
            self._alarms[key] = index
            logger.warning("event=kv_alarm_raised alarm=NOSPACE index=%d node=%s cause=%s "
                           "size_bytes=%d", index, cmd.node_id, cmd.cause, self._size)
        return AlarmResult(index, self.alarms)

    def _disarm(self, index: int) -> AlarmResult:
        if self._alarms:
            logger.warning("event=kv_alarms_disarmed index=%d alarms=%d size_bytes=%d",
                           index, len(self._alarms), self._size)
        self._alarms.clear()
        return AlarmResult(index, ())

    def _execute_batch(
        self, batch: Batch, index: int
    ) -> BatchResult | ConditionFailed | LeaseNotFound:
        """Check and stage every operation in order, then commit all of them or none.

        A condition sees the effect of the batch's earlier operations: after a Put of `k`
        in the same batch, `k`'s last-modified index is this entry's index.
        """
        staged: dict[str, tuple[Record, int | None] | None] = {}
        results: list[PutResult | DeleteResult] = []
        leases = self._lease_ttls
        for op in batch.ops:
            if op.key in staged:
                was = staged[op.key]
                current = None if was is None else was[0]
            else:
                current = self._data.get(op.key)
            if op.prev_index is not None and op.prev_index != _mod_index(current):
                return ConditionFailed(index, op.key, _mod_index(current))
            if isinstance(op, Put):
                if op.lease is not None and op.lease not in leases:
                    return LeaseNotFound(index, op.lease)
                staged[op.key] = ((op.value, index), op.lease)
                results.append(PutResult(index, op.value, op.lease))
            else:
                staged[op.key] = None
                results.append(DeleteResult(index, deleted=current is not None))
        data = self._data
        for key, change in staged.items():
            old = data.get(key)
            if old is not None:
                self._size -= record_size(key, old[0])
            if change is None:
                if old is not None:
                    del data[key]
                    self._key_order.removed(key)
                    self._attach(key, None)
            else:
                data[key] = change[0]
                self._size += record_size(key, change[0][0])
                if old is None:
                    self._key_order.inserted(key)
                self._attach(key, change[1])
        return BatchResult(index, tuple(results))

    def _grant(self, index: int, ttl_s: int) -> int:
        """Grant the lease whose id is `index`; returns the id."""
        self._lease_ttls[index] = ttl_s
        self._size += LEASE_BYTES
        self._lease_keys[index] = set()
        logger.debug("event=kv_lease_granted index=%d lease=%d ttl_s=%d", index, index, ttl_s)
        return index

    def _revoke(self, cmd: LeaseRevoke, index: int) -> LeaseRevokeResult | LeaseNotFound:
        lease_id = cmd.lease_id
        if self._lease_ttls.pop(lease_id, None) is None:
            return LeaseNotFound(index, lease_id)
        keys = sorted(self._lease_keys.pop(lease_id))
        self._size -= LEASE_BYTES
        data, key_leases, key_order = self._data, self._key_leases, self._key_order
        for key in keys:
            self._size -= record_size(key, data[key][0])
            del data[key]
            del key_leases[key]
            key_order.removed(key)
        logger.debug("event=kv_lease_revoked index=%d lease=%d keys=%d expired=%s",
                     index, lease_id, len(keys), cmd.expired)
        return LeaseRevokeResult(index, lease_id, tuple(keys), cmd.expired)

    def _attach(self, key: str, lease: int | None) -> None:
        """Attach `key` (which exists, unless lease is None) to `lease`; None detaches."""
        key_leases = self._key_leases
        old = key_leases.get(key)
        if old == lease:
            return
        if old is not None:
            self._lease_keys[old].discard(key)
        if lease is None:
            del key_leases[key]
        else:
            key_leases[key] = lease
            self._lease_keys[lease].add(key)


# ------------------------------------------------------------------------------ sizes
RECORD_OVERHEAD_BYTES = 64
"""Counted per key on top of its key and value bytes: roughly what a record costs beyond them
(its index and framing in a snapshot; in memory, its dict slot, tuple, index and string
headers take ~150-200 bytes), so that many tiny keys cannot slip under the quota. With it,
a node's memory for the data stays within about 3x size_bytes whatever the record sizes
(measured: 2.6x for 10-byte values, 1.9x for 100-byte, 1.2x for 1 KiB)."""
LEASE_BYTES = 16
"""Counted per lease (its id and TTL)."""
_PACK = msgpack.Packer(use_bin_type=True).pack


def record_size(key: str, value: JSONValue) -> int:
    """What one key counts toward the quota: its UTF-8 bytes, its value's msgpack encoding
    (as in the log entry that wrote it), and RECORD_OVERHEAD_BYTES."""
    key_bytes = len(key) if key.isascii() else len(key.encode("utf-8"))
    return key_bytes + encoded_size(value) + RECORD_OVERHEAD_BYTES


def encoded_size(value: JSONValue) -> int:
    """len(msgpack.packb(value, use_bin_type=True)), without packing scalars: a string's size
    comes from its length (O(1) when ASCII), a number's from its range. Only lists and
    objects are packed (a small object takes about 0.6 us)."""
    kind = type(value)
    if kind is str:
        assert isinstance(value, str)
        n = len(value) if value.isascii() else len(value.encode("utf-8"))
        return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)
    if kind is int:
        assert isinstance(value, int)
        if -32 <= value < 128:
            return 1
        if value > 0:
            return 2 if value < 1 << 8 else 3 if value < 1 << 16 else 5 if value < 1 << 32 else 9
        return (2 if value >= -(1 << 7) else 3 if value >= -(1 << 15)
                else 5 if value >= -(1 << 31) else 9)
    if value is None or kind is bool:
        return 1
    if kind is float:
        return 9
    return len(_PACK(value))


def _state_size(data: Mapping[str, Record], leases: Mapping[int, int]) -> int:
    return (sum(record_size(key, record[0]) for key, record in data.items())
            + LEASE_BYTES * len(leases))


def _mod_index(record: Record | None) -> int:
    return 0 if record is None else record[1]


_PUT, _DELETE, _BATCH, _FAILED, _GRANT, _REVOKE, _NO_LEASE = 0, 1, 2, 3, 4, 5, 6
# Auth answers: the token id (or the refusal's reason) is kept in RememberedAnswer.key.
_AUTH_ON, _TOKEN_MADE, _TOKEN_GONE, _NO_TOKEN, _AUTH_NO = 7, 8, 9, 10, 11
_KINDS = frozenset((_PUT, _DELETE, _BATCH, _FAILED, _GRANT, _REVOKE, _NO_LEASE,
                    _AUTH_ON, _TOKEN_MADE, _TOKEN_GONE, _NO_TOKEN, _AUTH_NO))
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_ANSWER_FIELDS = tuple(
    operator.attrgetter(name)
    for name in ("fingerprint", "index", "kind", "flags", "key", "current_index")
)
_FLAGS = {None: (None,), True: (True,), False: (False,)}  # shared, not one tuple per answer


def _fingerprint(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _fingerprinted(cmd: Command, data: bytes, request_id: str,
                   token_id: str | None) -> bytes:
    """What a retry must repeat to be recognised as one: the entry data without the token
    it was sent with (a retry may come with another token of the client's), except for a
    token create, whose id and secret the serving node makes anew for each attempt: its role
    and prefixes."""
    if isinstance(cmd, TokenCreate):
        return encode_command(TokenCreate("-", cmd.role, cmd.prefixes, bytes(32)))
    if token_id is not None:
        return encode_command(cmd, request_id)
    return data


def _remember_auth(fingerprint: bytes, result: AuthResult) -> RememberedAnswer:
    if isinstance(result, AuthEnabled):
        return RememberedAnswer(fingerprint, result.index, _AUTH_ON)
    if isinstance(result, TokenCreated):
        return RememberedAnswer(fingerprint, result.index, _TOKEN_MADE, key=result.token_id)
    if isinstance(result, TokenRevoked):
        return RememberedAnswer(fingerprint, result.index, _TOKEN_GONE, key=result.token_id)
    if isinstance(result, TokenNotFound):
        return RememberedAnswer(fingerprint, result.index, _NO_TOKEN, key=result.token_id)
    return RememberedAnswer(fingerprint, result.index, _AUTH_NO, key=result.reason)


def _replay_auth(known: RememberedAnswer, cmd: Command) -> AuthResult | None:
    index, kind = known.index, known.kind
    if kind == _AUTH_ON and isinstance(cmd, AuthEnable):
        return AuthEnabled(index)
    if kind == _TOKEN_MADE and isinstance(cmd, TokenCreate):
        return TokenCreated(index, known.key, replayed=cmd.token_id != known.key)
    if kind == _TOKEN_GONE and isinstance(cmd, TokenRevoke):
        return TokenRevoked(index, known.key)
    if kind == _NO_TOKEN and isinstance(cmd, TokenRevoke):
        return TokenNotFound(index, known.key)
    if kind == _AUTH_NO and isinstance(cmd, AuthEnable | TokenCreate | TokenRevoke):
        return AuthRefused(index, known.key)
    return None


def _remember(fingerprint: bytes, result: CommandResult) -> RememberedAnswer:
    """What to keep of a first answer: the rest comes from the retried command itself."""
    if isinstance(result, AuthEnabled | TokenCreated | TokenRevoked | TokenNotFound
                  | AuthRefused):
        return _remember_auth(fingerprint, result)
    if isinstance(result, PutResult):
        return RememberedAnswer(fingerprint, result.index, _PUT, _FLAGS[None])
    if isinstance(result, DeleteResult):
        return RememberedAnswer(fingerprint, result.index, _DELETE, _FLAGS[result.deleted])
    if isinstance(result, BatchResult):
        flags = tuple(r.deleted if isinstance(r, DeleteResult) else None for r in result.results)
        return RememberedAnswer(fingerprint, result.index, _BATCH, flags)
    if isinstance(result, LeaseGrantResult):
        return RememberedAnswer(fingerprint, result.index, _GRANT)
    if isinstance(result, LeaseRevokeResult):
        return RememberedAnswer(fingerprint, result.index, _REVOKE)
    if isinstance(result, LeaseNotFound):
        return RememberedAnswer(fingerprint, result.index, _NO_LEASE,
                                current_index=result.lease_id)
    if not isinstance(result, ConditionFailed):
        raise TypeError(f"{type(result).__name__} is never remembered")
    return RememberedAnswer(
        fingerprint, result.index, _FAILED, key=result.key, current_index=result.current_index
    )


def _replay(known: RememberedAnswer, cmd: Command) -> ApplyResult | None:
    """The first answer again, with the values from the retried command (None: no match)."""
    index = known.index
    if known.kind >= _AUTH_ON:
        return _replay_auth(known, cmd)
    if known.kind == _FAILED:
        return ConditionFailed(index, known.key, known.current_index)
    if known.kind == _NO_LEASE:
        return LeaseNotFound(index, known.current_index)
    if known.kind == _PUT and isinstance(cmd, Put):
        lease = index if cmd.ttl_s is not None else cmd.lease
        return PutResult(index, cmd.value, lease, cmd.ttl_s)
    if known.kind == _GRANT and isinstance(cmd, LeaseGrant):
        return LeaseGrantResult(index, index, cmd.ttl_s)
    if known.kind == _REVOKE and isinstance(cmd, LeaseRevoke):
        return LeaseRevokeResult(index, cmd.lease_id, (), cmd.expired)
    if known.kind == _DELETE and isinstance(cmd, Delete) and known.flags[0] is not None:
        return DeleteResult(index, known.flags[0])
    if known.kind == _BATCH and isinstance(cmd, Batch) and len(cmd.ops) == len(known.flags):
        results: list[PutResult | DeleteResult] = []
        for op, flag in zip(cmd.ops, known.flags, strict=True):
            if isinstance(op, Put) and flag is None:
                results.append(PutResult(index, op.value, op.lease))
            elif isinstance(op, Delete) and flag is not None:
                results.append(DeleteResult(index, flag))
            else:
                return None
        return BatchResult(index, tuple(results))
    return None


class _KeyOrder:
    """The keys in sorted order for prefix scans, maintained lazily so writes stay O(1).

    A sorted list is built on the first scan. Afterwards new keys are only noted (and
    deleted keys stay in the list, filtered out on scan); a scan merges the few new keys
    in, and folds them into the list (O(n)) once they exceed 1/16 of it. If writes pile up
    with no scan, the list is dropped (bounding memory) and rebuilt by the next scan.
    """

    _MIN_SLACK = 1024

    def __init__(self) -> None:
        self._sorted: list[str] | None = None
        self._added: list[str] = []
        self._removed = 0

    def clear(self) -> None:
        self._sorted = None
        self._added = []
        self._removed = 0

    def inserted(self, key: str) -> None:
        if self._sorted is not None:
            self._added.append(key)
            self._drop_if_stale()

    def removed(self, key: str) -> None:
        if self._sorted is not None:
            self._removed += 1
            self._drop_if_stale()

    def scan(self, live: Mapping[str, object], prefix: str) -> Iterator[str]:
        """Live keys starting with `prefix`, in order (do not mutate `live` meanwhile)."""
        if self._sorted is None:
            self._sorted = sorted(live)
            self._added = []
            self._removed = 0
        elif len(self._added) + self._removed > self._slack():
            added = set(self._added)
            merged = [k for k in self._sorted if k in live and k not in added]
            merged.extend(k for k in added if k in live)
            merged.sort()
            self._sorted = merged
            self._added = []
            self._removed = 0
        extra = sorted({k for k in self._added if k.startswith(prefix)})
        last: str | None = None
        for key in heapq.merge(_prefixed(self._sorted, prefix), extra):
            if key == last:
                continue  # deleted, then added again: in both lists
            last = key
            if key in live:
                yield key

    def _slack(self) -> int:
        return max(self._MIN_SLACK, len(self._sorted or ()) // 16)

    def _drop_if_stale(self) -> None:
        if len(self._added) + self._removed > 4 * self._slack():
            self.clear()


def _prefixed(keys: list[str], prefix: str) -> Iterator[str]:
    i = bisect_left(keys, prefix)
    n = len(keys)
    while i < n:
        key = keys[i]
        if not key.startswith(prefix):
            return
        yield key
        i += 1


# ------------------------------------------------------------------------------ snapshot bytes
def iter_snapshot_chunks(view: KVSnapshotView) -> Iterator[bytes]:
    """The snapshot of `view` as a sequence of byte chunks (pure; run it on any thread).

    Feed the chunks to a SnapshotSink; their concatenation is `serialize_snapshot(view)`.
    """
    packer = msgpack.Packer(use_bin_type=True)
    header: dict[str, object] = {
        "format": SNAPSHOT_FORMAT,
        "v": SNAPSHOT_VERSION,
        "applied_index": view.applied_index,
        "keys": len(view.data),
        "requests": len(view.requests),
        "addresses": view.addresses,
        "leases": len(view.leases),
        "attached": len(view.key_leases),
    }
    if view.alarms:
        header["alarms"] = len(view.alarms)  # optional section: absent means none
    if view.incarnations:
        header["incarnations"] = view.incarnations  # optional: absent means none
    yield packer.pack(header)
    # Columns, built with map() over existing objects: no container per key, so the
    # serialiser does not wake the garbage collector (a full collection of a big heap
    # stalls every thread for tens of milliseconds).
    per_segment = _keys_per_segment(len(view.data), view.size_bytes)
    keys, records = iter(view.data.keys()), iter(view.data.values())
    while segment_keys := list(itertools.islice(keys, per_segment)):
        segment = list(itertools.islice(records, per_segment))
        yield packer.pack(
            (segment_keys, list(map(_FIRST, segment)), list(map(_SECOND, segment)))
        )
    request_ids, answers = iter(view.requests.keys()), iter(view.requests.values())
    while segment_ids := list(itertools.islice(request_ids, SEGMENT_REQUESTS)):
        segment_answers = list(itertools.islice(answers, SEGMENT_REQUESTS))
        yield packer.pack(
            [segment_ids, *(list(map(get, segment_answers)) for get in _ANSWER_FIELDS)]
        )
    yield from _pairs_in_segments(packer, view.leases)
    yield from _pairs_in_segments(packer, view.key_leases)
    if view.alarms:  # one segment: (node ids, causes, indices)
        (nodes, causes), indices = zip(*view.alarms, strict=True), view.alarms.values()
        yield packer.pack((list(nodes), list(causes), list(indices)))
    yield from _sections(packer, view)


# Named sections: optional state after the version-2 content, each one msgpack map
# {"section": name, ...}, written only when it holds something (a snapshot without them is
# byte for byte what the build before them wrote) and read as empty when absent. A reader
# refuses a section it does not know: a replica must never drop state silently.
_AUTH_SECTION = "auth"


def _sections(packer: msgpack.Packer, view: KVSnapshotView) -> Iterator[bytes]:
    if view.auth.enabled:
        yield packer.pack({"section": _AUTH_SECTION, "table": view.auth.to_wire()})


SEGMENT_TARGET_BYTES = 1 << 20
"""About how much data one segment of keys holds (see _keys_per_segment)."""


def _keys_per_segment(keys: int, size_bytes: int) -> int:
    """Keys per data segment: SEGMENT_KEYS, fewer when the average record is large, so a
    segment (one msgpack object, built whole) stays near SEGMENT_TARGET_BYTES."""
    if not keys or size_bytes <= 0:
        return SEGMENT_KEYS
    return max(1, min(SEGMENT_KEYS, SEGMENT_TARGET_BYTES * keys // size_bytes))


def _pairs_in_segments(packer: msgpack.Packer, pairs: Mapping[_K, int]) -> Iterator[bytes]:
    firsts, seconds = iter(pairs.keys()), iter(pairs.values())
    while segment := list(itertools.islice(firsts, SEGMENT_KEYS)):
        yield packer.pack((segment, list(itertools.islice(seconds, SEGMENT_KEYS))))


def serialize_snapshot(view: KVSnapshotView) -> bytes:
    """The snapshot of `view` as bytes (pure; run it on any thread)."""
    return b"".join(iter_snapshot_chunks(view))


def parse_snapshot(data: bytes) -> KVSnapshotView:
    """The view serialised in `data` (pure); SnapshotCorrupt if `data` is not one."""
    decoder = KVSnapshotDecoder()
    decoder.feed(data)
    return decoder.finish()


def parse_snapshot_chunks(chunks: Iterable[bytes]) -> KVSnapshotView:
    """The view serialised in the concatenation of `chunks`, read one chunk at a time."""
    decoder = KVSnapshotDecoder()
    for chunk in chunks:
        decoder.feed(chunk)
    return decoder.finish()


class KVSnapshotDecoder:
    """Checks and decodes a key-value snapshot fed chunk by chunk, in order (the Raft core's
    snapshot validator: raftkv.core.snapshots.SnapshotDecoder).

    feed() raises SnapshotCorrupt as soon as the bytes so far cannot begin a valid snapshot
    (garbage is refused on its first chunk), finish() once they are not a whole one, and
    otherwise returns the KVSnapshotView. It holds what it decoded so far plus at most one
    incomplete msgpack object (a segment) of undecoded bytes, never the whole snapshot.
    """

    _STAGES = ("data", "requests", "leases", "attached", "alarms")

    def __init__(self) -> None:
        # max_buffer_size=0: msgpack's maximum (2**32-1). What is buffered is one incomplete
        # object; the Raft core bounds a whole incoming snapshot (Config.max_snapshot_bytes).
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, use_list=True,
                                          max_buffer_size=0)
        self._fed = 0
        self._header: dict[str, object] | None = None
        self._stage = -1  # -1: the header; len(_STAGES): everything was read
        self._applied_index = 0
        self._counts: tuple[int, ...] = ()
        self._addresses: dict[NodeId, str] = {}
        self._data: dict[str, Record] = {}
        self._requests: dict[str, RememberedAnswer] = {}
        self._leases: dict[int, int] = {}
        self._key_leases: dict[str, int] = {}
        self._alarms: dict[tuple[NodeId, str], int] = {}
        self._incarnations: dict[NodeId, str] = {}
        self._auth: TokenTable | None = None

    def feed(self, data: bytes) -> None:
        self._fed += len(data)
        try:
            self._unpacker.feed(data)
            for obj in self._unpacker:
                self._take(obj)
        except SnapshotCorrupt:
            raise
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as e:
            raise SnapshotCorrupt(
                f"key-value snapshot is malformed: {type(e).__name__}: {e}") from e

    def finish(self) -> KVSnapshotView:
        if self._header is None:
            raise SnapshotCorrupt("key-value snapshot is truncated (no header)")
        if self._stage < len(self._STAGES) or self._unpacker.tell() != self._fed:
            raise SnapshotCorrupt("key-value snapshot is truncated")
        return KVSnapshotView(self._applied_index, self._data, self._requests,
                              self._addresses, self._leases, self._key_leases,
                              auth=self._auth or TokenTable(), alarms=self._alarms,
                              incarnations=self._incarnations)

    # ------------------------------------------------------------------ one object at a time
    def _take(self, obj: object) -> None:
        if self._stage < 0:
            self._take_header(obj)
        elif self._stage >= len(self._STAGES):
            self._take_section(obj)
            return
        else:
            stage = self._STAGES[self._stage]
            if stage == "data":
                self._take_data(obj)
            elif stage == "requests":
                self._take_requests(obj)
            elif stage == "leases":
                self._take_pairs(obj, self._leases, int, "lease")
            elif stage == "attached":
                self._take_pairs(obj, self._key_leases, str, "attached key")
            else:
                self._take_alarms(obj)
        self._next_stage()

    def _next_stage(self) -> None:
        """Move past every stage whose count is reached (checking what a stage needs)."""
        have = (self._data, self._requests, self._leases, self._key_leases, self._alarms)
        while self._stage < len(self._STAGES):
            if self._stage >= 0:
                if len(have[self._stage]) < self._counts[self._stage]:
                    return
                if len(have[self._stage]) != self._counts[self._stage]:
                    raise SnapshotCorrupt(
                        f"key-value snapshot has more or repeated {self._STAGES[self._stage]} "
                        "than its header says")
                self._end_of(self._STAGES[self._stage])
            elif self._header is None:
                return
            self._stage += 1

    def _end_of(self, stage: str) -> None:
        if stage == "leases" and any(
                not 0 < lease_id <= self._applied_index or not 0 < ttl_s <= MAX_LEASE_TTL_S
                for lease_id, ttl_s in self._leases.items()):
            raise SnapshotCorrupt("key-value snapshot has a bad lease")
        if stage == "attached" and any(
                key not in self._data or lease_id not in self._leases
                for key, lease_id in self._key_leases.items()):
            raise SnapshotCorrupt(
                "key-value snapshot attaches a key or a lease it does not hold")

    def _take_header(self, header: object) -> None:
        if type(header) is not dict or header.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotCorrupt("not a key-value snapshot (no format header)")
        version = header.get("v")
        if version not in _SNAPSHOT_VERSIONS or type(version) is not int:
            raise SnapshotCorrupt(
                f"key-value snapshot version {version!r} is not supported "
                f"(this build reads versions {', '.join(map(str, _SNAPSHOT_VERSIONS))})"
            )
        applied_index, n_keys, n_requests = (
            header["applied_index"], header["keys"], header["requests"]
        )
        n_leases, n_attached = (header["leases"], header["attached"]) if version >= 2 else (0, 0)
        n_alarms = header.get("alarms", 0)  # an optional section (issue 14): absent, none
        addresses = header["addresses"]
        counts = (n_keys, n_requests, n_leases, n_attached, n_alarms)
        if not all(type(v) is int and v >= 0 for v in (applied_index, *counts)):
            raise SnapshotCorrupt("key-value snapshot header has bad counts")
        if type(addresses) is not dict or not all(
            type(k) is str and type(v) is str for k, v in addresses.items()
        ):
            raise SnapshotCorrupt("key-value snapshot header has a bad address book")
        incarnations = header.get("incarnations", {})  # optional: absent, none recorded
        if type(incarnations) is not dict or not all(
            type(k) is str and type(v) is str for k, v in incarnations.items()
        ):
            raise SnapshotCorrupt("key-value snapshot header has bad member incarnations")
        self._header = header
        self._applied_index = applied_index
        self._counts = counts
        self._addresses = addresses
        self._incarnations = incarnations

    def _take_data(self, segment: object) -> None:
        if type(segment) is not list or len(segment) != 3:
            raise SnapshotCorrupt("key-value snapshot has a bad data segment")
        keys, values, mod_indices = segment
        if not (
            type(keys) is list
            and type(values) is list
            and type(mod_indices) is list
            and 0 < len(keys) == len(values) == len(mod_indices)
            and set(map(type, keys)) == {str}
            and set(map(type, mod_indices)) == {int}
            and min(mod_indices) > 0
            and max(mod_indices) <= self._applied_index
        ):
            raise SnapshotCorrupt("key-value snapshot has a bad data segment")
        self._data.update(zip(keys, zip(values, mod_indices, strict=True), strict=True))

    def _take_requests(self, segment: object) -> None:
        if type(segment) is not list or not segment:
            raise SnapshotCorrupt("key-value snapshot has a bad request segment")
        if len(segment) != 1 + len(_ANSWER_FIELDS) or not all(
            type(column) is list and len(column) == len(segment[0]) for column in segment
        ):
            raise SnapshotCorrupt("key-value snapshot has a bad request segment")
        requests = self._requests
        for request_id, *fields in zip(*segment, strict=True):
            if type(request_id) is not str:
                raise SnapshotCorrupt("key-value snapshot has a bad request id")
            requests[request_id] = _answer_from_wire(fields, self._applied_index)

    def _take_section(self, section: object) -> None:
        """A named section after the counted content (see _sections)."""
        if type(section) is not dict or type(section.get("section")) is not str:
            raise SnapshotCorrupt("key-value snapshot has trailing data")
        name = section["section"]
        if name != _AUTH_SECTION or self._auth is not None:
            raise SnapshotCorrupt(f"key-value snapshot has an unknown or repeated section "
                                  f"{name[:40]!r}")
        auth = TokenTable.from_wire(section["table"])
        if auth.version > self._applied_index or any(
                t.created_index > self._applied_index for t in auth.tokens):
            raise SnapshotCorrupt("key-value snapshot has a token from after its index")
        self._auth = auth

    def _take_alarms(self, segment: object) -> None:
        if not (
            type(segment) is list
            and len(segment) == 3
            and all(type(column) is list for column in segment)
            and 0 < len(segment[0]) == len(segment[1]) == len(segment[2])
            and all(type(node) is str and node for node in segment[0])
            and all(cause in ALARM_CAUSES for cause in segment[1])
            and all(type(i) is int and 0 < i <= self._applied_index for i in segment[2])
        ):
            raise SnapshotCorrupt("key-value snapshot has a bad alarm segment")
        self._alarms.update(zip(zip(segment[0], segment[1], strict=True), segment[2],
                                strict=True))

    @staticmethod
    def _take_pairs(segment: object, pairs: dict[_K, int], first_type: type[_K],
                    what: str) -> None:
        """One segment of (first, int) pairs in two columns."""
        if not (
            type(segment) is list
            and len(segment) == 2
            and type(segment[0]) is list
            and type(segment[1]) is list
            and 0 < len(segment[0]) == len(segment[1])
            and set(map(type, segment[0])) == {first_type}
            and set(map(type, segment[1])) == {int}
        ):
            raise SnapshotCorrupt(f"key-value snapshot has a bad {what} segment")
        pairs.update(zip(segment[0], segment[1], strict=True))


def _answer_from_wire(wire: list[object], applied_index: int) -> RememberedAnswer:
    fingerprint, index, kind, flags, key, current_index = wire
    if not (
        type(fingerprint) is bytes
        and type(index) is int
        and 0 < index <= applied_index
        and kind in _KINDS
        and type(kind) is int
        and type(flags) is list
        and all(f is None or type(f) is bool for f in flags)
        and type(key) is str
        and type(current_index) is int
        and current_index >= 0
    ):
        raise SnapshotCorrupt("key-value snapshot has a bad remembered answer")
    shared = _FLAGS.get(flags[0]) if len(flags) == 1 else None
    return RememberedAnswer(
        fingerprint, index, kind, shared or tuple(flags), key, current_index
    )
