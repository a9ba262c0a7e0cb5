"""Versioned msgpack encoding of Raft entries, hard state, snapshot metas and peer messages.

Every top-level value is a msgpack array that starts with `FORMAT_VERSION`, followed by the
fields in a fixed order (no per-field keys: entries and AppendRequest are encoded per write):

    entry          [1, index, term, kind, data, change]   change: None | [op, node_id, address]
    hard state     [1, term, vote | None, commit]
    snapshot meta  [1, index, term, [voters...], [learners...]]
    message        [1, tag, term, frm, to, <the class's remaining fields in declaration order>]

Entries inside an AppendRequest are `[index, term, kind, data, change]` (no version of their
own), a snapshot meta inside a SnapshotRequest is `[index, term, [voters], [learners]]`.

Message tags are versions of a message's layout. SnapshotRequest is tag 12 since it carries
the whole snapshot's length and checksum (`..., meta, offset, data, done, length, checksum`;
the checksum is 64 lowercase hex digits); its first layout, tag 7 (no length, no checksum), is
refused with a message that says so: a follower must be able to check a snapshot before it
keeps any of it, so every node of a cluster must run a build that sends tag 12.

Decoding is fed bytes from the network and the disk: anything malformed, truncated, of the
wrong type, out of range or unknown raises `DecodeError` and nothing else.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgpack  # type: ignore[import-untyped, unused-ignore]

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


def _entries_body(entries: tuple[Entry, ...]) -> list[tuple[object, ...]]:
    return [_entry_body(e) for e in entries]


def _meta_body(m: SnapshotMeta) -> tuple[object, ...]:
    return (m.index, m.term, sorted(m.membership.voters), sorted(m.membership.learners))


def encode_entry(e: Entry) -> bytes:
    return _pack((FORMAT_VERSION, *_entry_body(e)))


def encode_hard_state(hs: HardState) -> bytes:
    return _pack((FORMAT_VERSION, hs.term, hs.vote, hs.commit))


def encode_snapshot_meta(m: SnapshotMeta) -> bytes:
    return _pack((FORMAT_VERSION, *_meta_body(m)))


def encode_message(m: Message) -> bytes:
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
    return tuple(_entry(*_array(item, name, 5)) for item in _array(v, name))


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

if set(_LAYOUT_BY_TYPE) != set(MESSAGE_TYPES) or len(_LAYOUT_BY_TAG) != len(_SPECS):
    raise AssertionError("every message class needs exactly one codec layout with a unique tag")
