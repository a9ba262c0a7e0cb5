"""Key-value commands and their msgpack envelope.

A command is a frozen value validated on construction: `Put`, `Delete`, or a `Batch` of
them applied atomically at one log index. Each Put/Delete may carry `prev_index`, a
compare-and-swap condition on the key's last-modified index (0 = the key must be absent).

On the wire (the data of a log entry) a command travels in a versioned envelope:
`[ENVELOPE_VERSION, request_id | nil, command]`, with
`Put = [0, key, value, prev_index | nil]`, `Delete = [1, key, prev_index | nil]` and
`Batch = [2, [op, ...]]`. `decode_command` accepts exactly that and raises
`CommandDecodeError` for anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import msgpack  # type: ignore[import-untyped, unused-ignore]

JSONValue: TypeAlias = (
    bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
)

ENVELOPE_VERSION = 1
MAX_KEY_BYTES = 1024
MAX_REQUEST_ID_CHARS = 256
MAX_BATCH_OPS = 1024  # = raftkv.service.MAX_BATCH_OPS, the HTTP limit
MAX_VALUE_DEPTH = 64
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1  # msgpack's integer range

_TAG_PUT = 0
_TAG_DELETE = 1
_TAG_BATCH = 2


class CommandDecodeError(ValueError):
    """The bytes are not a command this version understands."""


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: JSONValue
    prev_index: int | None = None
    """Apply only if the key's last-modified index equals this (0: only if absent)."""

    def __post_init__(self) -> None:
        check_key(self.key)
        check_json_value(self.value)
        _check_prev_index(self.prev_index)


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prev_index: int | None = None
    """Apply only if the key's last-modified index equals this (0: only if absent)."""

    def __post_init__(self) -> None:
        check_key(self.key)
        _check_prev_index(self.prev_index)


@dataclass(frozen=True, slots=True)
class Batch:
    """Puts and deletes applied in order, all or nothing, at one log index."""

    ops: tuple[Put | Delete, ...]

    def __post_init__(self) -> None:
        if type(self.ops) is not tuple:
            raise TypeError("Batch.ops must be a tuple")
        if not 1 <= len(self.ops) <= MAX_BATCH_OPS:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH_OPS} operations, got {len(self.ops)}")
        for op in self.ops:
            if not isinstance(op, Put | Delete):
                raise TypeError(f"a batch holds Put and Delete only, got {type(op).__name__}")


Command: TypeAlias = Put | Delete | Batch


def check_key(key: object) -> None:
    """Raise ValueError/TypeError unless `key` is a non-empty str of <= MAX_KEY_BYTES."""
    if type(key) is not str:
        raise TypeError(f"a key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("a key must not be empty")
    size = len(key) if key.isascii() else len(_utf8(key))
    if size > MAX_KEY_BYTES:
        raise ValueError(f"a key must be at most {MAX_KEY_BYTES} bytes, got {size}")


def check_request_id(request_id: object) -> None:
    if type(request_id) is not str:
        raise TypeError(f"a request id must be a str, got {type(request_id).__name__}")
    if not 1 <= len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise ValueError(f"a request id must have 1 to {MAX_REQUEST_ID_CHARS} characters")
    if not request_id.isascii():
        _utf8(request_id)


def check_json_value(value: object) -> None:
    """Raise ValueError/TypeError unless `value` is a JSON value msgpack can carry.

    JSON values are None, bool, int (within msgpack's 64-bit range), finite float, str,
    list, and dict with str keys, nested at most MAX_VALUE_DEPTH deep. Messages name the
    offending type, never the value.
    """
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if item is None or type(item) is bool:
            continue
        if type(item) is str:
            if not item.isascii():
                _utf8(item)
            continue
        if type(item) is int:
            if not _INT_MIN <= item <= _INT_MAX:
                raise ValueError("an integer is outside the 64-bit range")
            continue
        if type(item) is float:
            if not math.isfinite(item):
                raise ValueError("a number must be finite (no NaN or infinity)")
            continue
        if type(item) is not list and type(item) is not dict:
            raise TypeError(f"{type(item).__name__} is not a JSON value")
        if depth >= MAX_VALUE_DEPTH:
            raise ValueError(f"a value is nested deeper than {MAX_VALUE_DEPTH} levels")
        if isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
            continue
        assert isinstance(item, dict)
        for k, v in item.items():
            if type(k) is not str:
                raise TypeError(f"an object key must be a str, got {type(k).__name__}")
            if not k.isascii():
                _utf8(k)
            stack.append((v, depth + 1))


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # its message would quote the text
        raise ValueError("a string holds a lone surrogate, which UTF-8 cannot carry") from None


def _check_prev_index(prev_index: object) -> None:
    if prev_index is not None and (type(prev_index) is not int or prev_index < 0):
        raise ValueError("prev_index must be None or an int >= 0")


def encode_command(cmd: Command, request_id: str | None = None) -> bytes:
    """The entry data for `cmd`; `request_id` makes retries of it idempotent."""
    if request_id is not None:
        check_request_id(request_id)
    data: bytes = msgpack.packb(
        [ENVELOPE_VERSION, request_id, _command_to_wire(cmd)], use_bin_type=True
    )
    return data


def decode_command(data: bytes) -> tuple[Command, str | None]:
    """The command and request id in entry data; CommandDecodeError if malformed."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise CommandDecodeError(f"command is not valid msgpack ({type(e).__name__})") from e
    if type(obj) is not list or len(obj) != 3:
        raise CommandDecodeError("command envelope is not a 3-element array")
    version, request_id, wire = obj
    if version != ENVELOPE_VERSION or type(version) is not int:
        shown = version if type(version) is int else type(version).__name__
        raise CommandDecodeError(f"unsupported command envelope version {shown}")
    try:
        if request_id is not None:
            check_request_id(request_id)
        return _command_from_wire(wire), request_id
    except (ValueError, TypeError) as e:
        raise CommandDecodeError(f"malformed command: {e}") from e


def _command_to_wire(cmd: Command) -> list[object]:
    if isinstance(cmd, Put):
        return [_TAG_PUT, cmd.key, cmd.value, cmd.prev_index]
    if isinstance(cmd, Delete):
        return [_TAG_DELETE, cmd.key, cmd.prev_index]
    if isinstance(cmd, Batch):
        return [_TAG_BATCH, [_command_to_wire(op) for op in cmd.ops]]
    raise TypeError(f"not a command: {type(cmd).__name__}")


def _command_from_wire(wire: object) -> Command:
    if type(wire) is list and len(wire) == 2 and wire[0] == _TAG_BATCH:
        ops = wire[1]
        if type(ops) is not list:
            raise ValueError("batch operations are an array")
        return Batch(tuple(_op_from_wire(op) for op in ops))
    return _op_from_wire(wire)


def _op_from_wire(wire: object) -> Put | Delete:
    if type(wire) is not list or not wire:
        raise ValueError("a command is a non-empty array")
    tag = wire[0]
    if type(tag) is not int:
        raise ValueError("a command tag is an integer")
    if tag == _TAG_PUT and len(wire) == 4:
        return Put(wire[1], wire[2], wire[3])
    if tag == _TAG_DELETE and len(wire) == 3:
        return Delete(wire[1], wire[2])
    raise ValueError(f"unknown operation tag {tag} with {len(wire)} fields")
