"""Versioned msgpack encoding of Raft entries, hard state, snapshot metas and peer messages.

Every top-level value is a msgpack array that starts with `FORMAT_VERSION`, followed by the
fields in a fixed order (no per-field keys: entries and AppendRequest are encoded per write):

    entry          [1, index, term, kind, data, change]   change: None | [op, node_id, address]
    hard state     [1, term, vote | None, commit]
    snapshot meta  [1, index, term, [voters...], [learners...]]
    message        [1, tag, term, frm, to, <the class's remaining fields in declaration order>]

Entries inside an AppendRequest are each encoded as on disk (`entry` above) and carried as
bytes, so a follower stores what it received without encoding it again; a snapshot meta
inside a SnapshotRequest is `[index, term, [voters], [learners]]`.

Message tags are versions of a message's layout. SnapshotRequest is tag 12 since it carries
the whole snapshot's length and checksum (`..., meta, offset, data, done, length, checksum`;
the checksum is 64 lowercase hex digits); its first layout, tag 7 (no length, no checksum), is
refused with a message that says so: a follower must be able to check a snapshot before it
keeps any of it, so every node of a cluster must run a build that sends tag 12.

Decoding is fed bytes from the network and the disk: anything malformed, truncated, of the
wrong type, out of range or unknown raises `DecodeError` and nothing else.

`raft_message_bound(config)` bounds the encoding of every message a core of that config sends
(the runtime checks it against the peers' frame bound before the node starts).
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypeVar

import msgpack  # type: ignore[import-untyped, unused-ignore]

from raftkv.core.config import Config
from raftkv.core.messages import (
    MESSAGE_TYPES,
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
from raftkv.core.snapshots import is_checksum
from raftkv.core.types import (
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    HardState,
    Membership,
    SnapshotMeta,
)
from raftkv.kv.state_machine import (
    AlarmRecord,
    AlarmResult,
    ApplyResult,
    AuthEnabled,
    AuthRefused,
    BatchResult,
    ConditionFailed,
    DeleteResult,
    InvalidCommand,
    LeaseGrantResult,
    LeaseNotFound,
    LeaseRevokeResult,
    NoSpace,
    PutResult,
    TokenCreated,
    TokenNotFound,
    TokenRevoked,
)

__all__ = [
    "FORMAT_VERSION",
    "DecodeError",
    "decode_entry",
    "decode_hard_state",
    "decode_message",
    "decode_snapshot_meta",
    "encode_entry",
    "encode_hard_state",
    "encode_message",
    "encode_snapshot_meta",
    "raft_message_bound",
]

FORMAT_VERSION: Final = 1


class DecodeError(ValueError):
    """The bytes are not a valid encoding of the value asked for."""


# ---------------------------------------------------------------------------------------------
# Encoding


def _pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _entry_body(e: Entry) -> tuple[object, ...]:
    c = e.change
    change = None if c is None else (c.op, c.node_id, c.address)
    return (e.index, e.term, e.kind, e.data, change)


def _entries_body(entries: tuple[Entry, ...]) -> list[bytes]:
    return [encode_entry(e) for e in entries]


def _meta_body(m: SnapshotMeta) -> tuple[object, ...]:
    return (m.index, m.term, sorted(m.membership.voters), sorted(m.membership.learners))


_ENTRY_CACHE_SIZE: Final = 8192
_entry_cache: dict[tuple[int, int], tuple[Entry, bytes]] = {}


def _entry_elements(e: Entry) -> bytes:
    """The packed fields of `e` (index, term, kind, data, change) without an array header.

    A leader encodes each entry three times (its own disk, two followers); the bytes are
    kept for the newest entries, keyed by (index, term) AND checked to be of the very same
    Entry object, so a cached encoding is only ever reused for the value it was made of."""
    cached = _entry_cache.get((e.index, e.term))
    if cached is not None and cached[0] is e:
        return cached[1]
    packed = _pack(_entry_body(e))[1:]  # strip the fixarray(5) header
    _remember(e, packed)
    return packed


def _remember(e: Entry, elements: bytes) -> None:
    if len(_entry_cache) >= _ENTRY_CACHE_SIZE:
        for old in list(_entry_cache)[: _ENTRY_CACHE_SIZE // 4]:
            del _entry_cache[old]
    _entry_cache[(e.index, e.term)] = (e, elements)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_entry(e: Entry) -> bytes:
    return b"\x96\x01" + _entry_elements(e)  # [FORMAT_VERSION, index, term, kind, data, change]


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + bytes((n,))
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _encode_append(m: AppendRequest) -> bytes:
    """encode_message for the hot message, byte for byte the same, with cached entries."""
    head = _pack((FORMAT_VERSION, _APPEND_TAG, m.term, m.frm, m.to, m.prev_index, m.prev_term))
    parts = [b"\x99", head[1:], _array_header(len(m.entries))]
    for e in m.entries:
        encoded = encode_entry(e)
        parts.append(_bin_header(len(encoded)))
        parts.append(encoded)
    parts.append(_pack(m.commit))
    return b"".join(parts)


def encode_hard_state(hs: HardState) -> bytes:
    return _pack((FORMAT_VERSION, hs.term, hs.vote, hs.commit))


def encode_snapshot_meta(m: SnapshotMeta) -> bytes:
    return _pack((FORMAT_VERSION, *_meta_body(m)))


def encode_message(m: Message) -> bytes:
    if type(m) is AppendRequest:
        return _encode_append(m)
    layout = _LAYOUT_BY_TYPE.get(type(m))
    if layout is None:
        raise TypeError(f"not a Raft message: {type(m).__name__}")
    values = list(layout.get_fields(m))
    for position, convert in layout.converters:
        values[position] = convert(values[position])
    return _pack((FORMAT_VERSION, layout.tag, *values))


# ---------------------------------------------------------------------------------------------
# Decoding: every check names the field, never echoes the (untrusted) value itself.


def _unpack(data: object, what: str, fields: int | None) -> tuple[Any, ...]:
    """The top-level array of `data`, its version checked; `fields` counts what follows it."""
    try:
        value = msgpack.unpackb(data, raw=False, use_list=False)
    except Exception as e:  # msgpack signals bad input with many types; all mean the same here
        raise DecodeError(f"{what}: not a valid msgpack value ({type(e).__name__})") from e
    if type(value) is not tuple or not value:
        raise DecodeError(f"{what}: expected a non-empty array, got {type(value).__name__}")
    version = value[0]
    if type(version) is not int:
        raise DecodeError(f"{what}: format version is not an int")
    if version != FORMAT_VERSION:
        raise DecodeError(
            f"{what}: unsupported format version {version} (this build reads {FORMAT_VERSION})"
        )
    if fields is not None and len(value) != fields + 1:
        raise DecodeError(f"{what}: expected {fields} fields, got {len(value) - 1}")
    return value


def _array(v: object, name: str, length: int | None = None) -> tuple[Any, ...]:
    if type(v) is not tuple or (length is not None and len(v) != length):
        expected = "an array" if length is None else f"an array of {length}"
        raise DecodeError(f"{name}: expected {expected}")
    return v


def _nat(v: object, name: str) -> int:
    if type(v) is not int or v < 0:
        raise DecodeError(f"{name}: expected an int >= 0")
    return v


def _int_or_minus_one(v: object, name: str) -> int:
    if type(v) is not int or v < -1:
        raise DecodeError(f"{name}: expected an int >= -1")
    return v


def _str(v: object, name: str) -> str:
    if type(v) is not str:
        raise DecodeError(f"{name}: expected a string")
    return v


def _bool(v: object, name: str) -> bool:
    if type(v) is not bool:
        raise DecodeError(f"{name}: expected a bool")
    return v


def _bytes(v: object, name: str) -> bytes:
    if type(v) is not bytes:
        raise DecodeError(f"{name}: expected bytes")
    return v


def _checksum(v: object, name: str) -> str:
    if type(v) is not str or not is_checksum(v):
        raise DecodeError(f"{name}: expected a blake2b-256 hex digest")
    return v


def _int_array(v: object, name: str) -> tuple[int, ...]:
    items = _array(v, name)
    for item in items:
        if type(item) is not int:
            raise DecodeError(f"{name}: expected an array of ints")
    return items


def _str_set(v: object, name: str) -> frozenset[str]:
    return frozenset(_str(item, name) for item in _array(v, name))


_KINDS: Final = {k.value: k for k in EntryKind}
_OPS: Final = {op.value: op for op in ConfChangeOp}


_E = TypeVar("_E")


def _enum_member(v: object, members: dict[int, _E], name: str) -> _E:
    member = members.get(v) if type(v) is int else None
    if member is None:
        raise DecodeError(f"{name}: unknown value")
    return member


def _change(v: object) -> ConfChange | None:
    if v is None:
        return None
    op, node_id, address = _array(v, "entry change", 3)
    try:
        return ConfChange(
            _enum_member(op, _OPS, "change op"),
            _str(node_id, "change node_id"),
            _str(address, "change address"),
        )
    except DecodeError:
        raise
    except ValueError as e:
        raise DecodeError(f"entry change: {e}") from e


def _entry(index: object, term: object, kind: object, data: object, change: object) -> Entry:
    entry_kind = _enum_member(kind, _KINDS, "entry kind")
    conf_change = _change(change)
    try:
        return Entry(_nat(index, "entry index"), _nat(term, "entry term"), entry_kind,
                     _bytes(data, "entry data"), conf_change)
    except DecodeError:
        raise
    except ValueError as e:
        raise DecodeError(f"entry: {e}") from e


def _entries(v: object, name: str) -> tuple[Entry, ...]:
    """An AppendRequest's entries: each one encoded as on disk (encode_entry), as bytes; the
    bytes are kept (see _entry_elements) so that saving the entry does not encode it again."""
    out = []
    for item in _array(v, name):
        encoded = _bytes(item, name)
        entry = decode_entry(encoded)
        _remember(entry, encoded[2:])
        out.append(entry)
    return tuple(out)


def _meta(index: object, term: object, voters: object, learners: object) -> SnapshotMeta:
    voter_ids = _str_set(voters, "snapshot voters")
    learner_ids = _str_set(learners, "snapshot learners")
    try:
        return SnapshotMeta(_nat(index, "snapshot index"), _nat(term, "snapshot term"),
                            Membership(voter_ids, learner_ids))
    except DecodeError:
        raise
    except ValueError as e:
        raise DecodeError(f"snapshot meta: {e}") from e


def _nested_meta(v: object, name: str) -> SnapshotMeta:
    return _meta(*_array(v, name, 4))


def decode_entry(data: bytes) -> Entry:
    _, index, term, kind, payload, change = _unpack(data, "entry", 5)
    return _entry(index, term, kind, payload, change)


def decode_hard_state(data: bytes) -> HardState:
    _, term, vote, commit = _unpack(data, "hard state", 3)
    return HardState(
        _nat(term, "hard state term"),
        None if vote is None else _str(vote, "hard state vote"),
        _nat(commit, "hard state commit"),
    )


def decode_snapshot_meta(data: bytes) -> SnapshotMeta:
    _, index, term, voters, learners = _unpack(data, "snapshot meta", 4)
    return _meta(index, term, voters, learners)


def decode_message(data: bytes) -> Message:
    value = _unpack(data, "message", None)
    tag = value[1] if len(value) > 1 else None
    layout = _LAYOUT_BY_TAG.get(tag) if type(tag) is int else None
    if layout is None:
        retired = _RETIRED_TAGS.get(tag) if type(tag) is int else None
        if retired is not None:
            raise DecodeError(f"message: {retired}")
        raise DecodeError("message: unknown or missing message type")
    fields = value[2:]
    if len(fields) != len(layout.checks):
        raise DecodeError(f"{layout.cls.__name__}: expected {len(layout.checks)} fields, "
                          f"got {len(fields)}")
    args = [check(v, name) for check, v, name in zip(layout.checks, fields, layout.names,
                                                       strict=True)]
    return layout.cls(*args)


# ---------------------------------------------------------------------------------------------
# Message layouts: a stable tag per class and a check per field, in declaration order.

_Check = Callable[[object, str], object]


@dataclass(frozen=True, slots=True)
class _Layout:
    tag: int
    cls: Callable[..., Message]
    names: tuple[str, ...]
    checks: tuple[_Check, ...]
    get_fields: Callable[[Message], tuple[Any, ...]]
    converters: tuple[tuple[int, Callable[[Any], object]], ...]
    """Fields that need converting to plain values before packing: (position, convert)."""


_HEAD: Final[tuple[_Check, ...]] = (_nat, _str, _str)  # term, frm, to

_SPECS: Final[dict[type[Message], tuple[int, tuple[_Check, ...]]]] = {
    VoteRequest: (1, (*_HEAD, _nat, _nat, _bool, _bool)),
    VoteResponse: (2, (*_HEAD, _bool, _bool)),
    AppendRequest: (3, (*_HEAD, _nat, _nat, _entries, _nat)),
    AppendResponse: (4, (*_HEAD, _bool, _nat, _nat, _nat)),
    HeartbeatRequest: (5, (*_HEAD, _nat, _nat)),
    HeartbeatResponse: (6, (*_HEAD, _nat)),
    SnapshotRequest: (12, (*_HEAD, _nested_meta, _nat, _bytes, _bool, _nat, _checksum)),
    SnapshotResponse: (8, (*_HEAD, _nat, _int_or_minus_one, _bool)),
    TimeoutNow: (9, _HEAD),
    ReadIndexRequest: (10, (*_HEAD, _int_array)),
    ReadIndexResponse: (11, (*_HEAD, _int_array, _int_or_minus_one)),
}

_RETIRED_TAGS: Final[dict[int, str]] = {
    7: "a SnapshotRequest without length and checksum (tag 7) is no longer accepted: the "
       "sender runs an older build; upgrade every node",
}

_CONVERTERS: Final[dict[_Check, Callable[[Any], object]]] = {
    _entries: _entries_body,
    _nested_meta: _meta_body,
}


def _layout(cls: type[Message], tag: int, checks: tuple[_Check, ...]) -> _Layout:
    names = tuple(f.name for f in dataclasses.fields(cls))
    if len(names) != len(checks):
        raise AssertionError(f"codec layout of {cls.__name__} does not match its fields")
    getter = operator.attrgetter(*names)
    return _Layout(
        tag=tag,
        cls=cls,
        names=names,
        checks=checks,
        get_fields=getter,
        converters=tuple((i, _CONVERTERS[c]) for i, c in enumerate(checks) if c in _CONVERTERS),
    )


_LAYOUT_BY_TYPE: Final[dict[type[Message], _Layout]] = {
    cls: _layout(cls, tag, checks) for cls, (tag, checks) in _SPECS.items()
}
_LAYOUT_BY_TAG: Final[dict[int, _Layout]] = {lay.tag: lay for lay in _LAYOUT_BY_TYPE.values()}
_APPEND_TAG: Final = _LAYOUT_BY_TYPE[AppendRequest].tag

if set(_LAYOUT_BY_TYPE) != set(MESSAGE_TYPES) or len(_LAYOUT_BY_TAG) != len(_SPECS):
    raise AssertionError("every message class needs exactly one codec layout with a unique tag")


ENTRY_OVERHEAD_BYTES: Final = 24
"""The most an entry inside an AppendRequest (its encoding, carried as bytes) takes beyond its
Entry.size_bytes: 16 for one of data, 24 for a membership change."""
MESSAGE_HEAD_BYTES: Final = 1 << 20
"""Room for what a Raft message holds besides its entries or snapshot chunk: term, positions
and two node ids (a few KiB at most: the transport takes ids of up to 256 characters), a
snapshot's checksum and membership, or a ReadIndex message's up to 65,536 read ids
(576 KiB).

A SnapshotRequest carries the whole membership: the room holds MAX_MEMBERS_IN_HEAD members
of the longest ids (256 characters of 4 bytes), and no change makes a cluster grow past
Config.max_members (256 by default; raft_message_bound refuses a config above the room)."""
MAX_MEMBERS_IN_HEAD: Final = 1000


def raft_message_bound(config: Config) -> int:
    """The most len(encode_message(m)) can be for any message `m` a core of `config` sends.
    An AppendRequest holds at most max_append_entries entries whose Entry.size_bytes add up to
    at most max_append_bytes, or one entry alone, of at most max_entry_bytes (the leader
    appends no larger one); a SnapshotRequest holds a chunk of at most snapshot_chunk_bytes;
    anything else fits in MESSAGE_HEAD_BYTES. ValueError for a Config.max_members over
    MAX_MEMBERS_IN_HEAD."""
    if config.max_members > MAX_MEMBERS_IN_HEAD:
        raise ValueError(f"max_members {config.max_members}: a SnapshotRequest's head holds "
                         f"the ids of at most {MAX_MEMBERS_IN_HEAD} members")
    entries = (max(config.max_append_bytes, config.max_entry_bytes)
               + config.max_append_entries * ENTRY_OVERHEAD_BYTES)
    return MESSAGE_HEAD_BYTES + max(entries, config.snapshot_chunk_bytes)


# =============================================================================================
# Frames: every frame between two raftkv processes (peer to peer, Raft process to HTTP worker)
# is a 4-byte big-endian length N of what follows, one `kind` byte, then N - 1 payload bytes
# (raftkv.runtime.framing). Every kind is defined here, and only here.


class FrameKind(enum.IntEnum):
    # Peer to peer (raftkv.runtime.transport)
    HANDSHAKE = 0
    """The connection handshake (raftkv.runtime.transport.handshake); nothing else may come
    before it, and it never comes after it."""
    RAFT = 1
    """One Raft message (encode_message)."""
    FORWARD = 2
    """Follower -> leader: operations only the leader can do (encode_forwards)."""
    FORWARD_RESULT = 3
    """Leader -> follower: their outcomes (encode_forward_results)."""
    # HTTP worker <-> Raft process (raftkv.runtime.workers, raftkv.worker.channel)
    WORKER_HELLO = 16
    """Worker -> Raft process, first frame: [CHANNEL_VERSION, worker index, pid]."""
    WORKER_REQUESTS = 17
    """Worker -> Raft process: a batch of requests (encode_requests)."""
    WORKER_REPLIES = 18
    """Raft process -> worker: a batch of replies (encode_replies)."""
    WORKER_PUSH = 19
    """Raft process -> worker: the node's state as workers need it (encode_node_view)."""
    WORKER_STATS = 20
    """Worker -> Raft process: its request counters, for /metrics and /status."""


PEER_FRAME_KINDS: Final = frozenset({FrameKind.RAFT, FrameKind.FORWARD,
                                     FrameKind.FORWARD_RESULT})
"""The kinds a peer may send once the handshake is done."""


# =============================================================================================
# Errors across processes: a ServiceError travels as [code, message, details] and is raised
# again on the other side as the class registered for its code (raftkv.service).


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: str
    """A ServiceError's stable code (raftkv.service.ServiceError.code)."""
    message: str
    details: dict[str, object] = dataclasses.field(default_factory=dict)
    """Extra fields of the error (e.g. key and current_index of condition_failed)."""


def _error_wire(e: ErrorReply) -> list[object]:
    return [e.code, e.message, e.details]


def _error_from_wire(v: object) -> ErrorReply:
    code, message, details = _array(v, "error", 3)
    if type(details) is not dict:
        raise DecodeError("error details: expected a map")
    return ErrorReply(_str(code, "error code"), _str(message, "error message"), dict(details))


# =============================================================================================
# Apply results (raftkv.kv.state_machine) as the Raft process hands them to a worker. A put's
# value is not sent back: the worker that proposed it has it (decode_apply_result(..) gives
# None in its place and raftkv.worker fills it in).

_R_PUT, _R_DELETE, _R_BATCH, _R_CONDITION, _R_GRANT, _R_REVOKE, _R_NO_LEASE, _R_INVALID = range(8)
_R_NONE, _R_AUTH_ENABLED, _R_TOKEN_CREATED, _R_TOKEN_REVOKED, _R_NO_TOKEN, _R_AUTH_REFUSED = (
    range(8, 14))
_R_NO_SPACE, _R_ALARMS = 14, 15


def encode_alarms(alarms: Sequence[AlarmRecord]) -> list[list[object]]:
    """NOSPACE alarms as [[node_id, cause, index], ...]."""
    return [[a.node_id, a.cause, a.index] for a in alarms]


def decode_alarms(v: object) -> tuple[AlarmRecord, ...]:
    rows = _array(tuple(v) if type(v) is list else v, "alarms")
    alarms = []
    for row in rows:
        node, cause, index = _array(tuple(row) if type(row) is list else row, "alarm", 3)
        alarms.append(AlarmRecord(_str(node, "alarm node"), _str(cause, "alarm cause"),
                                  _nat(index, "alarm index")))
    return tuple(alarms)


def encode_apply_result(result: object, index: int) -> list[object]:
    """`result` of applying the entry at `index` (None for a no-op or membership change)."""
    r = result
    if isinstance(r, PutResult):
        return [_R_PUT, r.index, r.lease, r.ttl_s]
    if isinstance(r, DeleteResult):
        return [_R_DELETE, r.index, r.deleted]
    if isinstance(r, BatchResult):
        return [_R_BATCH, r.index, [
            [_R_PUT, x.index, x.lease, x.ttl_s] if isinstance(x, PutResult)
            else [_R_DELETE, x.index, x.deleted] for x in r.results]]
    if isinstance(r, ConditionFailed):
        return [_R_CONDITION, r.index, r.key, r.current_index]
    if isinstance(r, LeaseGrantResult):
        return [_R_GRANT, r.index, r.ttl_s]
    if isinstance(r, LeaseRevokeResult):
        return [_R_REVOKE, r.index, r.lease_id, r.expired]
    if isinstance(r, LeaseNotFound):
        return [_R_NO_LEASE, r.index, r.lease_id]
    if isinstance(r, InvalidCommand):
        return [_R_INVALID, r.index, r.reason]
    if isinstance(r, TokenCreated):
        return [_R_TOKEN_CREATED, r.index, r.token_id, r.replayed]
    if isinstance(r, TokenRevoked):
        return [_R_TOKEN_REVOKED, r.index, r.token_id]
    if isinstance(r, TokenNotFound):
        return [_R_NO_TOKEN, r.index, r.token_id]
    if isinstance(r, AuthRefused):
        return [_R_AUTH_REFUSED, r.index, r.reason]
    if isinstance(r, AuthEnabled):
        return [_R_AUTH_ENABLED, r.index]
    if isinstance(r, NoSpace):
        return [_R_NO_SPACE, r.index, encode_alarms(r.alarms)]
    if isinstance(r, AlarmResult):
        return [_R_ALARMS, r.index, encode_alarms(r.alarms)]
    return [_R_NONE, index]


def _opt_nat(v: object, name: str) -> int | None:
    return None if v is None else _nat(v, name)


def decode_apply_result(v: object) -> ApplyResult | None:
    a = _array(tuple(v) if type(v) is list else v, "apply result")
    if not a or type(a[0]) is not int:
        raise DecodeError("apply result: no tag")
    tag = a[0]
    try:
        if tag == _R_PUT and len(a) == 4:
            return PutResult(_nat(a[1], "index"), None, _opt_nat(a[2], "lease"),
                             _opt_nat(a[3], "ttl"))
        if tag == _R_DELETE and len(a) == 3:
            return DeleteResult(_nat(a[1], "index"), _bool(a[2], "deleted"))
        if tag == _R_BATCH and len(a) == 3:
            parts: list[PutResult | DeleteResult] = []
            for item in _array(tuple(a[2]) if type(a[2]) is list else a[2], "batch results"):
                part = decode_apply_result(item)
                if not isinstance(part, PutResult | DeleteResult):
                    raise DecodeError("batch result: expected puts and deletes")
                parts.append(part)
            return BatchResult(_nat(a[1], "index"), tuple(parts))
        if tag == _R_CONDITION and len(a) == 4:
            return ConditionFailed(_nat(a[1], "index"), _str(a[2], "key"),
                                   _nat(a[3], "current index"))
        if tag == _R_GRANT and len(a) == 3:
            index = _nat(a[1], "index")
            return LeaseGrantResult(index, index, _nat(a[2], "ttl"))
        if tag == _R_REVOKE and len(a) == 4:
            return LeaseRevokeResult(_nat(a[1], "index"), _nat(a[2], "lease"), (),
                                     _bool(a[3], "expired"))
        if tag == _R_NO_LEASE and len(a) == 3:
            return LeaseNotFound(_nat(a[1], "index"), _nat(a[2], "lease"))
        if tag == _R_INVALID and len(a) == 3:
            return InvalidCommand(_nat(a[1], "index"), _str(a[2], "reason"))
        if tag == _R_NONE and len(a) == 2:
            return None
        if tag == _R_TOKEN_CREATED and len(a) == 4:
            return TokenCreated(_nat(a[1], "index"), _str(a[2], "token"),
                                _bool(a[3], "replayed"))
        if tag == _R_TOKEN_REVOKED and len(a) == 3:
            return TokenRevoked(_nat(a[1], "index"), _str(a[2], "token"))
        if tag == _R_NO_TOKEN and len(a) == 3:
            return TokenNotFound(_nat(a[1], "index"), _str(a[2], "token"))
        if tag == _R_AUTH_REFUSED and len(a) == 3:
            return AuthRefused(_nat(a[1], "index"), _str(a[2], "reason"))
        if tag == _R_AUTH_ENABLED and len(a) == 2:
            return AuthEnabled(_nat(a[1], "index"))
        if tag == _R_NO_SPACE and len(a) == 3:
            return NoSpace(_nat(a[1], "index"), decode_alarms(a[2]))
        if tag == _R_ALARMS and len(a) == 3:
            return AlarmResult(_nat(a[1], "index"), decode_alarms(a[2]))
    except (TypeError, ValueError) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(f"apply result: {e}") from e
    raise DecodeError("apply result: unknown tag or field count")


# =============================================================================================
# Forwarding (peer frames FORWARD / FORWARD_RESULT): a follower hands the leader what only the
# leader can do, and gets each outcome back.
#
#   FORWARD         [FORWARD_VERSION, [[fid, op, args...], ...]]
#       PROPOSE          [fid, 1, data]               a client command (entry data)
#       CONF_CHANGE      [fid, 2, op, node_id, address]
#       LEASE_KEEPALIVE  [fid, 3, lease_id]
#       LEASE_INFO       [fid, 4, lease_id]
#       LEASE_LIST       [fid, 5, limit]
#   FORWARD_RESULT  [FORWARD_VERSION, [[fid, status, payload], ...]]
#       status 0, committed:  payload [index, term]   (PROPOSE, CONF_CHANGE: sent once the
#                                                       entry is committed and applied)
#       status 1, value:      payload a plain value   (the lease operations)
#       status 2, failed:     payload an error [code, message, details]
#
# `fid` is the follower's own id for the operation: random-started per run, so that an answer
# meant for an earlier run of the follower never matches.

FORWARD_VERSION: Final = 1


class ForwardOp(enum.IntEnum):
    PROPOSE = 1
    CONF_CHANGE = 2
    LEASE_KEEPALIVE = 3
    LEASE_INFO = 4
    LEASE_LIST = 5


@dataclass(frozen=True, slots=True)
class Forward:
    fid: int
    op: ForwardOp
    data: bytes = b""
    """PROPOSE: the command."""
    change: ConfChange | None = None
    """CONF_CHANGE: the change."""
    number: int = 0
    """LEASE_*: the lease id, or LEASE_LIST: the limit."""


class ForwardStatus(enum.IntEnum):
    COMMITTED = 0
    VALUE = 1
    FAILED = 2


@dataclass(frozen=True, slots=True)
class ForwardResult:
    fid: int
    status: ForwardStatus
    index: int = 0
    term: int = 0
    value: object = None
    error: ErrorReply | None = None


def encode_forwards(items: Sequence[Forward]) -> bytes:
    wire: list[list[object]] = []
    for f in items:
        if f.op is ForwardOp.PROPOSE:
            wire.append([f.fid, int(f.op), f.data])
        elif f.op is ForwardOp.CONF_CHANGE:
            c = f.change
            assert c is not None
            wire.append([f.fid, int(f.op), int(c.op), c.node_id, c.address])
        else:
            wire.append([f.fid, int(f.op), f.number])
    return _pack((FORWARD_VERSION, wire))


def decode_forwards(data: bytes) -> list[Forward]:
    _, items = _unpack(data, "forward", 1)
    out: list[Forward] = []
    for item in _array(items, "forwards"):
        a = _array(item, "forward")
        if len(a) < 3:
            raise DecodeError("forward: too few fields")
        fid = _nat(a[0], "forward id")
        op = _enum_member(a[1], _FORWARD_OPS, "forward op")
        if op is ForwardOp.PROPOSE and len(a) == 3:
            out.append(Forward(fid, op, data=_bytes(a[2], "forward data")))
        elif op is ForwardOp.CONF_CHANGE and len(a) == 5:
            change = _change(a[2:])
            assert change is not None
            out.append(Forward(fid, op, change=change))
        elif op in _NUMBER_OPS and len(a) == 3:
            out.append(Forward(fid, op, number=_nat(a[2], "forward number")))
        else:
            raise DecodeError("forward: wrong field count for its op")
    return out


def encode_forward_results(items: Sequence[ForwardResult]) -> bytes:
    wire: list[list[object]] = []
    for r in items:
        if r.status is ForwardStatus.COMMITTED:
            wire.append([r.fid, 0, [r.index, r.term]])
        elif r.status is ForwardStatus.VALUE:
            wire.append([r.fid, 1, r.value])
        else:
            assert r.error is not None
            wire.append([r.fid, 2, _error_wire(r.error)])
    return _pack((FORWARD_VERSION, wire))


def decode_forward_results(data: bytes) -> list[ForwardResult]:
    _, items = _unpack(data, "forward result", 1)
    out: list[ForwardResult] = []
    for item in _array(items, "forward results"):
        fid, status, payload = _array(item, "forward result", 3)
        fid = _nat(fid, "forward id")
        if status == 0:
            index, term = _array(payload, "committed", 2)
            out.append(ForwardResult(fid, ForwardStatus.COMMITTED, _nat(index, "index"),
                                     _nat(term, "term")))
        elif status == 1:
            out.append(ForwardResult(fid, ForwardStatus.VALUE, value=_plain(payload)))
        elif status == 2:
            out.append(ForwardResult(fid, ForwardStatus.FAILED,
                                     error=_error_from_wire(payload)))
        else:
            raise DecodeError("forward result: unknown status")
    return out


_FORWARD_OPS: Final = {op.value: op for op in ForwardOp}
_NUMBER_OPS: Final = frozenset({ForwardOp.LEASE_KEEPALIVE, ForwardOp.LEASE_INFO,
                                ForwardOp.LEASE_LIST})


def _plain(v: object) -> object:
    """A decoded value as plain lists (this module decodes arrays as tuples)."""
    if type(v) is tuple:
        return [_plain(x) for x in v]
    if type(v) is dict:
        return {k: _plain(x) for k, x in v.items()}
    return v


# =============================================================================================
# The worker channel (frames WORKER_*): an HTTP worker asks the Raft process, in batches.
#
#   WORKER_REQUESTS  [CHANNEL_VERSION, [[rid, op, timeout_ms, args...], ...]]
#   WORKER_REPLIES   [CHANNEL_VERSION, [[rid, status, payload], ...]]   status 0 ok, 1 error
#   WORKER_PUSH      [CHANNEL_VERSION, {node view}]
#   WORKER_STATS     [CHANNEL_VERSION, {stats}]
#
# `rid` is the worker's id for the request; a reply's payload depends on the op (see
# RequestOp). Requests and replies are typed below; the Raft process never sees a bare tuple.

CHANNEL_VERSION: Final = 1


class RequestOp(enum.IntEnum):
    PROPOSE = 1
    """args [data]: a command (entry data); reply: an apply result (encode_apply_result)."""
    GET = 2
    """args [key, consistency]; reply [value, index, lease] or error key_not_found."""
    LIST = 3
    """args [prefix, limit, consistency]; reply [[key, value, index], ...]."""
    WATCH = 4
    """args [key, after_index | nil]; reply [key, value, index, deleted, changed], at the
    first change or when timeout_ms runs out."""
    STATUS = 5
    """reply: the node's status map (raftkv.service.NodeStatus fields)."""
    READINESS = 6
    """reply [ready, reason]."""
    MEMBERS = 7
    """reply [[id, raft_address, http_address, voter, leader], ...]."""
    JOIN = 8
    """args [node_id | nil, raft_address, voter]; reply: the index of the change."""
    REMOVE = 9
    """args [node_id]; reply: the index of the change."""
    TRANSFER = 10
    """args [target | nil]; reply: the new leader's id, once it leads."""
    BACKUP = 11
    """args [consistency]; reply [index, checksum, length, algorithm], with the snapshot as a
    file descriptor passed along with the reply frame (SCM_RIGHTS)."""
    LEASE_KEEPALIVE = 12
    """args [lease_id]; reply: the TTL."""
    LEASE_INFO = 13
    """args [lease_id]; reply [lease_id, ttl, remaining, [keys], key_count]."""
    LEASE_LIST = 14
    """args [limit]; reply [[lease_id, ttl, remaining, [], key_count], ...]."""
    METRICS = 15
    """reply: the node's metrics in the Prometheus text format (bytes)."""
    TOKENS = 16
    """args [consistency]; reply: the token table (raftkv.auth.TokenTable.to_wire), after the
    read barrier."""
    ALARMS = 17
    """reply: the raised NOSPACE alarms as this node applied them (encode_alarms)."""
    TOKENS_SINCE = 18
    """args [consistency, version]; reply: the token table (TokenTable.to_wire) after the
    read barrier if its version is above `version`, else nil (the caller's copy is current:
    nothing serialised)."""


class Request(NamedTuple):
    """One request of a worker (a named tuple: made per request, so cheap to make)."""

    rid: int
    op: RequestOp
    timeout_s: float
    args: tuple[Any, ...]
    """The op's arguments, checked by decode_requests (types and counts per op)."""


class Reply(NamedTuple):
    """One reply to a worker (a named tuple, like Request)."""

    rid: int
    ok: bool
    payload: object
    """ok: the op's answer; else an ErrorReply."""
    fd: int | None = None
    """A file descriptor that travels with the reply (BACKUP)."""


_ARG_CHECKS: Final[dict[RequestOp, tuple[Callable[[object, str], object], ...]]] = {}


def _key_arg(v: object, name: str) -> str:
    return _str(v, name)


def _opt_str(v: object, name: str) -> str | None:
    return None if v is None else _str(v, name)


def _opt_nat_arg(v: object, name: str) -> int | None:
    return None if v is None else _nat(v, name)


_ARG_CHECKS.update({
    RequestOp.PROPOSE: (_bytes,),
    RequestOp.GET: (_key_arg, _str),
    RequestOp.LIST: (_str, _nat, _str),
    RequestOp.WATCH: (_key_arg, _opt_nat_arg),
    RequestOp.STATUS: (),
    RequestOp.READINESS: (),
    RequestOp.MEMBERS: (),
    RequestOp.JOIN: (_opt_str, _str, _bool),
    RequestOp.REMOVE: (_str,),
    RequestOp.TRANSFER: (_opt_str,),
    RequestOp.BACKUP: (_str,),
    RequestOp.LEASE_KEEPALIVE: (_nat,),
    RequestOp.LEASE_INFO: (_nat,),
    RequestOp.LEASE_LIST: (_nat,),
    RequestOp.METRICS: (),
    RequestOp.TOKENS: (_str,),
    RequestOp.ALARMS: (),
    RequestOp.TOKENS_SINCE: (_str, _nat),
})
_REQUEST_OPS: Final = {op.value: op for op in RequestOp}


def encode_request(rid: int, op: RequestOp, timeout_s: float, *args: object) -> list[object]:
    """One item of a WORKER_REQUESTS batch (the worker packs its batch with pack_batch)."""
    return [rid, op.value, int(timeout_s * 1000), *args]


def pack_batch(items: Sequence[Any]) -> bytes:
    """The payload of WORKER_REQUESTS / WORKER_REPLIES: [CHANNEL_VERSION, items]."""
    return _pack((CHANNEL_VERSION, items))


def decode_requests(data: bytes) -> list[Request]:
    """A WORKER_REQUESTS payload; DecodeError for anything malformed (the channel is local,
    but a worker is a separate program: the Raft process trusts no bytes)."""
    _, items = _unpack_lists(data, "requests")
    out: list[Request] = []
    append = out.append
    propose = RequestOp.PROPOSE
    for item in items:
        if (type(item) is list and len(item) == 4 and item[1] == 1 and type(item[3]) is bytes
                and type(item[0]) is int and item[0] >= 0 and type(item[2]) is int
                and item[2] >= 0):  # the hot path: a write
            append(Request(item[0], propose, item[2] / 1000, (item[3],)))
            continue
        if type(item) is not list or len(item) < 3:
            raise DecodeError("request: expected [rid, op, timeout_ms, args...]")
        rid, op_value, timeout_ms = item[0], item[1], item[2]
        op = _REQUEST_OPS.get(op_value) if type(op_value) is int else None
        if op is None:
            raise DecodeError("request: unknown op")
        checks = _ARG_CHECKS[op]
        args = item[3:]
        if len(args) != len(checks):
            raise DecodeError(f"request {op.name}: expected {len(checks)} arguments")
        for check, arg in zip(checks, args, strict=True):
            check(arg, op.name.lower())
        out.append(Request(_nat(rid, "rid"), op, _nat(timeout_ms, "timeout") / 1000,
                           tuple(args)))
    return out


def encode_reply(reply: Reply) -> list[object]:
    if reply.ok:
        return [reply.rid, 0, reply.payload]
    assert isinstance(reply.payload, ErrorReply)
    return [reply.rid, 1, _error_wire(reply.payload)]


def decode_replies(data: bytes) -> list[Reply]:
    """A WORKER_REPLIES payload (arrays decoded as lists, as the worker hands them on)."""
    _, items = _unpack_lists(data, "replies")
    out: list[Reply] = []
    append = out.append
    for item in items:
        if type(item) is not list or len(item) != 3 or type(item[0]) is not int or item[0] < 0:
            raise DecodeError("reply: expected [rid, status, payload]")
        status = item[1]
        if status == 0:
            append(Reply(item[0], True, item[2]))
        elif status == 1:
            append(Reply(item[0], False, _error_from_list(item[2])))
        else:
            raise DecodeError("reply: unknown status")
    return out


def _error_from_list(v: object) -> ErrorReply:
    if type(v) is not list or len(v) != 3 or type(v[2]) is not dict:
        raise DecodeError("error: expected [code, message, details]")
    return ErrorReply(_str(v[0], "error code"), _str(v[1], "error message"), v[2])


def _unpack_lists(data: bytes, what: str) -> tuple[int, list[Any]]:
    """[version, items] with arrays decoded as lists (the payloads are JSON-like values)."""
    try:
        value = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
    except Exception as e:
        raise DecodeError(f"{what}: not a valid msgpack value ({type(e).__name__})") from e
    if type(value) is not list or len(value) != 2 or type(value[1]) is not list:
        raise DecodeError(f"{what}: expected [version, items]")
    if value[0] != CHANNEL_VERSION:
        raise DecodeError(f"{what}: unsupported channel version {value[0]!r}")
    return value[0], value[1]


def pack_value(value: object) -> bytes:
    """A WORKER_PUSH or WORKER_STATS payload: [CHANNEL_VERSION, value]."""
    return _pack((CHANNEL_VERSION, value))


def unpack_value(data: bytes, what: str) -> object:
    try:
        decoded = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
    except Exception as e:
        raise DecodeError(f"{what}: not a valid msgpack value ({type(e).__name__})") from e
    if type(decoded) is not list or len(decoded) != 2 or decoded[0] != CHANNEL_VERSION:
        raise DecodeError(f"{what}: expected [{CHANNEL_VERSION}, value]")
    return decoded[1]
