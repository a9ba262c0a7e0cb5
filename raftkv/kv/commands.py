"""Key-value commands and their msgpack envelope.

A command is a frozen value validated on construction: `Put`, `Delete`, or a `Batch` of
them applied atomically at one log index; `LeaseGrant` and `LeaseRevoke`. Each Put/Delete may
carry `prev_index`, a compare-and-swap condition on the key's last-modified index (0 = the key
must be absent). A Put may attach its key to a lease (`lease`), or grant a fresh lease of its
own (`ttl_s`, the shorthand: the lease's id is that entry's index).

On the wire (the data of a log entry) a command travels in a versioned envelope:
`[ENVELOPE_VERSION, request_id | nil, command]`, with

    Put         [0, key, value, prev_index | nil]                       no lease
                [0, key, value, prev_index | nil, lease | nil, ttl | nil]   lease or ttl set
    Delete      [1, key, prev_index | nil]
    Batch       [2, [op, ...]]                   ops: Put (never with ttl) and Delete
    LeaseGrant  [3, ttl]
    LeaseRevoke [4, lease_id, expired]
    AuthEnable  [5, root_digest]                    (raftkv.auth: digests, never secrets)
    TokenCreate [6, token_id, role, [prefix, ...], digest]
    TokenRevoke [7, token_id]
    AlarmRaise  [16, node_id, cause]             cause: one of ALARM_CAUSES
    AlarmDisarm [17]
    MemberIncarnation [18, node_id, incarnation]    (the leader: which data dir a member runs)

A command a client sent with a token travels in version 2 of the envelope, `[2, request_id |
nil, command, token_id]`: the token it was authorised with, which the state machine checks
again when it applies the entry (a token revoked in between writes nothing). Entries without
a token keep version 1, byte for byte.

`decode_command` accepts exactly that and raises `CommandDecodeError` for anything else.

Leases came to version 1 of the envelope as new shapes, not as a new version: every entry an
earlier build wrote decodes exactly as before (a Put without a lease is still written in its
4-field form, byte for byte), and an earlier build refuses the new shapes (unknown tag or field
count), so it applies them as an invalid command. A cluster must therefore run this build on
every node before anyone uses leases.

Tokens came the same way (new tags; an earlier build applies them as invalid commands, so a
cluster runs this build everywhere before it is bootstrapped with auth or creates tokens).

TTLs are whole seconds in [MIN_LEASE_TTL_S, MAX_LEASE_TTL_S], checked when a command is built
and when it is decoded (see MIN_LEASE_TTL_S for why that floor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import msgpack  # type: ignore[import-untyped, unused-ignore]

from raftkv.auth import DIGEST_BYTES, Role, check_prefixes, check_token_id
from raftkv.ports import is_incarnation

JSONValue: TypeAlias = (
    bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
)

ENVELOPE_VERSION = 1
TOKEN_ENVELOPE_VERSION = 2
"""The envelope of a command that carries the token its client was authorised with."""
MAX_KEY_BYTES = 1024
MAX_REQUEST_ID_CHARS = 256
MAX_BATCH_OPS = 1024  # = raftkv.service.MAX_BATCH_OPS, the HTTP limit
MAX_VALUE_DEPTH = 64
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1  # msgpack's integer range

MAX_LEASE_ID = 2**63 - 1
"""A lease's id is the index of the entry that granted it."""

MIN_LEASE_TTL_S = 2
"""The shortest lease. A new leader gives every lease a full TTL and keepalives are confirmed
by a quorum, so no TTL is unsafe; a short one is merely useless: a client that keeps alive
every TTL/3 must reach the new leader within about 2/3 of a TTL after a leader dies, and a
failover takes one to two election timeouts (default 20 ticks of 50 ms: 1 to 2 s). Like etcd
(minimum 1.5 election timeouts, rounded up to whole seconds: 2 s at its and our default
timing), the floor is 2 s. A node whose election timeout is longer should refuse TTLs below
`raftkv.kv.leases.min_lease_ttl_s(election_timeout_s)` before proposing (the replicated floor
cannot depend on one node's settings)."""
MAX_LEASE_TTL_S = 9_000_000_000
"""etcd's maximum (about 285 years): effectively "until revoked", yet a finite deadline."""

_TAG_PUT = 0
_TAG_DELETE = 1
_TAG_BATCH = 2
_TAG_LEASE_GRANT = 3
_TAG_LEASE_REVOKE = 4
_TAG_AUTH_ENABLE = 5
_TAG_TOKEN_CREATE = 6
_TAG_TOKEN_REVOKE = 7
_TAG_ALARM_RAISE = 16  # 16..: apart from the data commands (0..7)
_TAG_ALARM_DISARM = 17
_TAG_MEMBER_INCARNATION = 18


_new = object.__new__
_set = object.__setattr__


class CommandDecodeError(ValueError):
    """The bytes are not a command this version understands."""


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: JSONValue
    prev_index: int | None = None
    """Apply only if the key's last-modified index equals this (0: only if absent)."""
    lease: int | None = None
    """Attach the key to this existing lease (the put applies nothing if it does not exist).
    A put without `lease` or `ttl_s` detaches the key from any lease it was attached to."""
    ttl_s: int | None = None
    """Grant a fresh lease of this TTL, whose id is this entry's index, and attach the key."""

    def __post_init__(self) -> None:
        check_key(self.key)
        check_json_value(self.value)
        _check_prev_index(self.prev_index)
        if self.lease is not None:
            check_lease_id(self.lease)
            if self.ttl_s is not None:
                raise ValueError("a put carries a lease or a ttl, not both")
        if self.ttl_s is not None:
            check_ttl(self.ttl_s)


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
            if isinstance(op, Put) and op.ttl_s is not None:
                # Each would grant a lease whose id is the entry's index: one id, many leases.
                raise ValueError("a put in a batch may carry a lease, not a ttl: "
                                 "grant a lease first")


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """Grant a lease of `ttl_s` seconds; its id is the index of this entry."""

    ttl_s: int

    def __post_init__(self) -> None:
        check_ttl(self.ttl_s)


@dataclass(frozen=True, slots=True)
class LeaseRevoke:
    """Revoke a lease and delete every key attached to it, all in this one entry."""

    lease_id: int
    expired: bool = False
    """True when the leader proposes it because the lease expired; False for a client's
    revoke. It changes nothing in the state, only how the revoke is counted and logged."""

    def __post_init__(self) -> None:
        check_lease_id(self.lease_id)
        if type(self.expired) is not bool:
            raise TypeError("expired must be a bool")


# ------------------------------------------------------------------------------ auth commands
@dataclass(frozen=True, slots=True)
class AuthEnable:
    """Turn auth on with the root token (id raftkv.auth.ROOT_TOKEN_ID, role admin). Written
    in the bootstrap log of a cluster started with a root token, identically by every first
    member; applies once (a second one changes nothing and answers AuthRefused)."""

    root_digest: bytes

    def __post_init__(self) -> None:
        _check_digest(self.root_digest)


@dataclass(frozen=True, slots=True)
class TokenCreate:
    """Add a token. The node that serves the request makes the id and the secret; only the
    secret's digest is in the command (and so in the log, snapshots and backups)."""

    token_id: str
    role: Role
    prefixes: tuple[str, ...]
    digest: bytes

    def __post_init__(self) -> None:
        check_token_id(self.token_id)
        if not isinstance(self.role, Role):
            raise TypeError("a token's role is a raftkv.auth.Role")
        if type(self.prefixes) is not tuple or check_prefixes(self.prefixes) != self.prefixes:
            raise ValueError("a token's prefixes are a sorted tuple without duplicates")
        if self.prefixes and self.role is Role.ADMIN:
            raise ValueError("an admin token is not limited to key prefixes")
        _check_digest(self.digest)


@dataclass(frozen=True, slots=True)
class TokenRevoke:
    token_id: str

    def __post_init__(self) -> None:
        check_token_id(self.token_id)


AuthCommand: TypeAlias = AuthEnable | TokenCreate | TokenRevoke


def _check_digest(digest: object) -> None:
    if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
        raise ValueError(f"a token digest is {DIGEST_BYTES} bytes")


def _auth_to_wire(cmd: AuthCommand) -> list[object]:
    if isinstance(cmd, AuthEnable):
        return [_TAG_AUTH_ENABLE, cmd.root_digest]
    if isinstance(cmd, TokenCreate):
        return [_TAG_TOKEN_CREATE, cmd.token_id, cmd.role.value, list(cmd.prefixes), cmd.digest]
    return [_TAG_TOKEN_REVOKE, cmd.token_id]


def _auth_from_wire(wire: list[object]) -> AuthCommand | None:
    """The auth command in `wire`, None if it is none (ValueError if it is a bad one)."""
    tag = wire[0]
    if tag == _TAG_AUTH_ENABLE and len(wire) == 2:
        return AuthEnable(wire[1])  # type: ignore[arg-type]
    if tag == _TAG_TOKEN_CREATE and len(wire) == 5:
        token_id, role, prefixes, digest = wire[1:]
        if type(role) is not str or type(prefixes) is not list:
            raise ValueError("a token create holds a role name and an array of prefixes")
        return TokenCreate(token_id, Role(role), tuple(prefixes), digest)  # type: ignore[arg-type]
    if tag == _TAG_TOKEN_REVOKE and len(wire) == 2:
        return TokenRevoke(wire[1])  # type: ignore[arg-type]
    return None


# ------------------------------------------------------------------------------ alarms
ALARM_CAUSES = ("quota", "map_full", "disk_full")
"""Why a node raised the NOSPACE alarm: the state machine reached the quota (RAFTKV_QUOTA_BYTES)
before a write was proposed; its LMDB map is at its maximum size; its disk is full."""


@dataclass(frozen=True, slots=True)
class AlarmRaise:
    """Raise the cluster-wide NOSPACE alarm: from the entry that applies it on, every replica
    refuses writes that add data (puts, batches with a put, lease grants) until AlarmDisarm.
    `node_id` is the node that raised it, `cause` one of ALARM_CAUSES."""

    node_id: str
    cause: str

    def __post_init__(self) -> None:
        if type(self.node_id) is not str or not 1 <= len(self.node_id) <= 64:
            raise ValueError("an alarm names the node that raised it (1..64 characters)")
        if self.cause not in ALARM_CAUSES:
            raise ValueError(f"an alarm's cause is one of {', '.join(ALARM_CAUSES)}")


@dataclass(frozen=True, slots=True)
class AlarmDisarm:
    """Clear every alarm (the operator freed space: `raftkv alarm disarm`)."""


@dataclass(frozen=True, slots=True)
class MemberIncarnation:
    """Record which data dir member `node_id` runs on (the random `incarnation` its data dir
    was given when made), the first time a leader sees it: from then on the members refuse
    that node's connections when they present another one (its data dir was wiped or
    replaced) until it is removed (the removal clears the record)."""

    node_id: str
    incarnation: str

    def __post_init__(self) -> None:
        if type(self.node_id) is not str or not 1 <= len(self.node_id) <= 256:
            raise ValueError("a member incarnation names the member (1..256 characters)")
        if not is_incarnation(self.incarnation):
            raise ValueError("an incarnation is 1..64 ASCII letters and digits")


Command: TypeAlias = (Put | Delete | Batch | LeaseGrant | LeaseRevoke | AuthCommand | AlarmRaise
                      | AlarmDisarm | MemberIncarnation)


def adds_data(cmd: Command) -> bool:
    """Whether `cmd` may make the state bigger: refused while the NOSPACE alarm is raised
    (deletes, lease revokes and the alarm commands are not)."""
    if isinstance(cmd, Put | LeaseGrant):
        return True
    if isinstance(cmd, Batch):
        return any(isinstance(op, Put) for op in cmd.ops)
    return False


def check_key(key: object) -> None:
    """Raise ValueError/TypeError unless `key` is a non-empty str of <= MAX_KEY_BYTES."""
    if type(key) is not str:
        raise TypeError(f"a key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("a key must not be empty")
    size = len(key) if key.isascii() else len(_utf8(key))
    if size > MAX_KEY_BYTES:
        raise ValueError(f"a key must be at most {MAX_KEY_BYTES} bytes, got {size}")


def check_ttl(ttl_s: object) -> None:
    """Raise ValueError/TypeError unless `ttl_s` is an int in [MIN_LEASE_TTL_S,
    MAX_LEASE_TTL_S]."""
    if type(ttl_s) is not int:
        raise TypeError(f"a ttl is a whole number of seconds, got {type(ttl_s).__name__}")
    if not MIN_LEASE_TTL_S <= ttl_s <= MAX_LEASE_TTL_S:
        raise ValueError(f"a ttl must be {MIN_LEASE_TTL_S} to {MAX_LEASE_TTL_S} seconds")


def check_lease_id(lease_id: object) -> None:
    """Raise ValueError/TypeError unless `lease_id` is an int in [1, MAX_LEASE_ID]."""
    if type(lease_id) is not int:
        raise TypeError(f"a lease id is an integer, got {type(lease_id).__name__}")
    if not 1 <= lease_id <= MAX_LEASE_ID:
        raise ValueError(f"a lease id must be in [1, {MAX_LEASE_ID}]")


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
    if type(value) is str and value.isascii():
        return  # the common case: a plain ASCII string
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


def encode_command(cmd: Command, request_id: str | None = None,
                   token_id: str | None = None) -> bytes:
    """The entry data for `cmd`; `request_id` makes retries of it idempotent; `token_id`:
    the token the client was authorised with (checked again at apply)."""
    if request_id is not None:
        check_request_id(request_id)
    envelope: list[object] = [ENVELOPE_VERSION, request_id, _command_to_wire(cmd)]
    if token_id is not None:
        check_token_id(token_id)
        envelope = [TOKEN_ENVELOPE_VERSION, request_id, envelope[2], token_id]
    data: bytes = msgpack.packb(envelope, use_bin_type=True)
    return data


def decode_command(data: bytes, *, logged: bool = False) -> tuple[Command, str | None]:
    """The command and request id in entry data; CommandDecodeError if malformed (see
    decode_entry, which also gives the token)."""
    cmd, request_id, _token_id = decode_entry(data, logged=logged)
    return cmd, request_id


def decode_entry(data: bytes, *, logged: bool = False
                 ) -> tuple[Command, str | None, str | None]:
    """The command, request id and token id in entry data; CommandDecodeError if malformed.

    `logged`: the data is a committed log entry (the hot path of applying): a plain put is
    rebuilt without the dataclass's checks, with the same checks done inline (a short ASCII
    string value, the common case, is checked by one call)."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise CommandDecodeError(f"command is not valid msgpack ({type(e).__name__})") from e
    if type(obj) is not list or len(obj) not in (3, 4):
        raise CommandDecodeError("command envelope is not a 3- or 4-element array")
    version = obj[0]
    token_id: str | None = None
    if version == TOKEN_ENVELOPE_VERSION and type(version) is int and len(obj) == 4:
        token_id = obj[3]
        if type(token_id) is not str:
            raise CommandDecodeError("the envelope's token id is not a string")
    elif version != ENVELOPE_VERSION or type(version) is not int or len(obj) != 3:
        shown = version if type(version) is int else type(version).__name__
        raise CommandDecodeError(f"unsupported command envelope version {shown} "
                                 f"of {len(obj)} elements")
    request_id, wire = obj[1], obj[2]
    if (logged and type(wire) is list and len(wire) == 4 and wire[0] == _TAG_PUT
            and type(wire[1]) is str and wire[1] and wire[1].isascii()
            and len(wire[1]) <= MAX_KEY_BYTES
            and (wire[3] is None or (type(wire[3]) is int and wire[3] >= 0))
            and request_id is None
            and ((type(wire[2]) is str and wire[2].isascii()) or _json_ok(wire[2]))):
        put = _new(Put)
        _set(put, "key", wire[1])
        _set(put, "value", wire[2])
        _set(put, "prev_index", wire[3])
        _set(put, "lease", None)
        _set(put, "ttl_s", None)
        return put, request_id, token_id
    try:
        if request_id is not None:
            check_request_id(request_id)
        if token_id is not None:
            check_token_id(token_id)
        return _command_from_wire(wire), request_id, token_id
    except (ValueError, TypeError) as e:
        raise CommandDecodeError(f"malformed command: {e}") from e


def _json_ok(value: object) -> bool:
    try:
        check_json_value(value)
    except (ValueError, TypeError):
        return False
    return True


def _command_to_wire(cmd: Command) -> list[object]:
    if isinstance(cmd, Put):
        if cmd.lease is None and cmd.ttl_s is None:
            return [_TAG_PUT, cmd.key, cmd.value, cmd.prev_index]
        return [_TAG_PUT, cmd.key, cmd.value, cmd.prev_index, cmd.lease, cmd.ttl_s]
    if isinstance(cmd, Delete):
        return [_TAG_DELETE, cmd.key, cmd.prev_index]
    if isinstance(cmd, Batch):
        return [_TAG_BATCH, [_command_to_wire(op) for op in cmd.ops]]
    if isinstance(cmd, LeaseGrant):
        return [_TAG_LEASE_GRANT, cmd.ttl_s]
    if isinstance(cmd, LeaseRevoke):
        return [_TAG_LEASE_REVOKE, cmd.lease_id, cmd.expired]
    if isinstance(cmd, AuthEnable | TokenCreate | TokenRevoke):
        return _auth_to_wire(cmd)
    if isinstance(cmd, AlarmRaise):
        return [_TAG_ALARM_RAISE, cmd.node_id, cmd.cause]
    if isinstance(cmd, AlarmDisarm):
        return [_TAG_ALARM_DISARM]
    if isinstance(cmd, MemberIncarnation):
        return [_TAG_MEMBER_INCARNATION, cmd.node_id, cmd.incarnation]
    raise TypeError(f"not a command: {type(cmd).__name__}")


def _command_from_wire(wire: object) -> Command:
    if type(wire) is list and len(wire) == 2 and wire[0] == _TAG_BATCH:
        ops = wire[1]
        if type(ops) is not list:
            raise ValueError("batch operations are an array")
        return Batch(tuple(_op_from_wire(op) for op in ops))
    if type(wire) is list and wire and type(wire[0]) is int:
        if wire[0] == _TAG_LEASE_GRANT and len(wire) == 2:
            return LeaseGrant(wire[1])
        if wire[0] == _TAG_LEASE_REVOKE and len(wire) == 3:
            return LeaseRevoke(wire[1], wire[2])
        auth = _auth_from_wire(wire)
        if auth is not None:
            return auth
        if wire[0] == _TAG_ALARM_RAISE and len(wire) == 3:
            return AlarmRaise(wire[1], wire[2])
        if wire[0] == _TAG_ALARM_DISARM and len(wire) == 1:
            return AlarmDisarm()
        if wire[0] == _TAG_MEMBER_INCARNATION and len(wire) == 3:
            return MemberIncarnation(wire[1], wire[2])
    return _op_from_wire(wire)


def _op_from_wire(wire: object) -> Put | Delete:
    if type(wire) is not list or not wire:
        raise ValueError("a command is a non-empty array")
    tag = wire[0]
    if type(tag) is not int:
        raise ValueError("a command tag is an integer")
    if tag == _TAG_PUT and len(wire) == 4:
        return Put(wire[1], wire[2], wire[3])
    if tag == _TAG_PUT and len(wire) == 6:
        if wire[4] is None and wire[5] is None:
            raise ValueError("a 6-field put carries a lease or a ttl")  # one encoding each
        return Put(wire[1], wire[2], wire[3], wire[4], wire[5])
    if tag == _TAG_DELETE and len(wire) == 3:
        return Delete(wire[1], wire[2])
    raise ValueError(f"unknown operation tag {tag} with {len(wire)} fields")
