"""Tokens, roles and the authorisation check, as plain values (standard library only).

A cluster bootstrapped with a root token has auth ON: every request but /health and /ready
carries `Authorization: Bearer <token>`, and the token's role (and key prefixes) decide what
it may do. A cluster bootstrapped without one has auth OFF (everything open, as before).

Roles:

- `read`: GET keys, lists and watches; `write`: read + puts, deletes, batches, leases. Either
  may be limited to key prefixes: then every key it touches must start with one of them, and
  a list's prefix must start with one of them.
- `admin`: everything, plus /cluster changes, POST /cluster/leader, /snapshot and /auth/tokens.

Token state is replicated (raftkv.kv.state_machine keeps the table; commands in
raftkv.kv.commands). Only DIGESTS of secrets are stored, logged or sent anywhere: a
`TokenTable` (what a node's HTTP workers need to answer the check locally) holds ids, roles,
prefixes and digests, never a secret.

Why a fast hash and no salt: every secret a node makes is 256 random bits (`new_secret`), and a
root token must be at least MIN_ROOT_TOKEN_CHARS long (the docs say: `openssl rand -hex 32`).
Salts and slow KDFs protect LOW-entropy passwords against dictionaries and precomputed tables;
against 2^256 possible secrets neither exists, and brute force is hopeless at any hash speed.
The digest is BLAKE2b-256, personalised for this use (domain separation), which costs about a
microsecond per request. Being unsalted, the same secret has the same digest on every node, so
the first members of a cluster can write the root token's digest into their identical bootstrap
logs, and a request is checked by one dict lookup by digest, confirmed with a constant-time
comparison (hmac.compare_digest). Timing can at most tell an attacker something about the
digest of a secret they chose, which says nothing about any real secret (preimage resistance).
"""

from __future__ import annotations

import base64
import contextvars
import enum
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from raftkv.files import FileProblem, read_small_file

__all__ = [
    "DIGEST_BYTES",
    "MAX_TOKENS",
    "MAX_TOKEN_PREFIXES",
    "REQUEST_TOKEN_ID",
    "ROOT_TOKEN_ID",
    "Authorizer",
    "Principal",
    "Role",
    "RootTokenError",
    "TokenRecord",
    "TokenTable",
    "check_prefixes",
    "check_token_id",
    "may_be_made_secret",
    "new_secret",
    "new_token_id",
    "parse_bearer",
    "read_root_token_file",
    "token_digest",
]

DIGEST_BYTES: Final = 32
ROOT_TOKEN_ID: Final = "root"
"""The id of the token a cluster was bootstrapped with (role admin, no prefixes)."""
TOKEN_ID_CHARS: Final = 16
"""New token ids: 16 hex digits (64 random bits) made by the node that serves the create."""
MAX_TOKEN_ID_CHARS: Final = 64
MAX_TOKENS: Final = 10_000
"""Tokens a cluster holds at most (the table is pushed whole to HTTP workers)."""
MAX_TOKEN_PREFIXES: Final = 32
MAX_PREFIX_BYTES: Final = 1024
MIN_ROOT_TOKEN_CHARS: Final = 32
MAX_SECRET_CHARS: Final = 512
SECRET_BYTES: Final = 32
"""Random bytes in a new secret."""
SECRET_PREFIX: Final = "rkv_"
"""New secrets start with this, so secret scanners and people can recognise them."""
_PERSON: Final = b"raftkv-token-v1"


class Role(enum.Enum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


def token_digest(secret: str) -> bytes:
    """The stored form of a secret: BLAKE2b-256, personalised (see the module doc)."""
    return hashlib.blake2b(secret.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES,
                           person=_PERSON).digest()


def new_secret() -> str:
    """A fresh secret: SECRET_PREFIX + 256 random bits in URL-safe base64 (47 characters)."""
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


_MADE_SECRET_CHARS: Final = len(SECRET_PREFIX) + len(
    base64.urlsafe_b64encode(bytes(SECRET_BYTES)).rstrip(b"="))


def may_be_made_secret(secret: str) -> bool:
    """Whether `secret` has the form new_secret() gives (what a token created through
    /auth/tokens carries), without telling whether any token has it."""
    return len(secret) == _MADE_SECRET_CHARS and secret.startswith(SECRET_PREFIX)


def new_token_id() -> str:
    return secrets.token_hex(TOKEN_ID_CHARS // 2)


def check_token_id(token_id: object) -> str:
    """ValueError/TypeError unless `token_id` is 1..64 of [A-Za-z0-9_.-]."""
    if type(token_id) is not str:
        raise TypeError(f"a token id is a str, got {type(token_id).__name__}")
    if not 1 <= len(token_id) <= MAX_TOKEN_ID_CHARS or not token_id.isascii() or not all(
            c.isalnum() or c in "_.-" for c in token_id):
        raise ValueError(f"a token id is 1..{MAX_TOKEN_ID_CHARS} letters, digits, '_', '.' "
                         "or '-'")
    return token_id


def check_prefixes(prefixes: Iterable[object]) -> tuple[str, ...]:
    """The prefixes as a sorted tuple without duplicates; ValueError/TypeError if one is not a
    non-empty str of at most MAX_PREFIX_BYTES, or there are more than MAX_TOKEN_PREFIXES."""
    out: set[str] = set()
    for prefix in prefixes:
        if type(prefix) is not str:
            raise TypeError(f"a key prefix is a str, got {type(prefix).__name__}")
        try:
            size = len(prefix.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("a key prefix holds a lone surrogate") from None
        if not 1 <= size <= MAX_PREFIX_BYTES:
            raise ValueError(f"a key prefix is 1..{MAX_PREFIX_BYTES} bytes of UTF-8")
        out.add(prefix)
    if len(out) > MAX_TOKEN_PREFIXES:
        raise ValueError(f"a token has at most {MAX_TOKEN_PREFIXES} key prefixes")
    return tuple(sorted(out))


# --------------------------------------------------------------------------- principals
@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: the token's id, role and key prefixes (empty: all keys)."""

    token_id: str
    role: Role
    prefixes: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def _key_allowed(self, key: str) -> bool:
        return not self.prefixes or key.startswith(self.prefixes)

    def may_read(self, key: str) -> bool:
        return self.role is Role.ADMIN or self._key_allowed(key)

    def may_write(self, key: str) -> bool:
        return self.role is Role.ADMIN or (self.role is Role.WRITE and self._key_allowed(key))

    def may_list(self, prefix: str) -> bool:
        """A list of keys starting with `prefix`: allowed when every such key is readable,
        i.e. `prefix` itself starts with an allowed prefix."""
        return self.role is Role.ADMIN or self._key_allowed(prefix)

    @property
    def may_write_some(self) -> bool:
        """Has write rights (on some keys): leases."""
        return self.role in (Role.WRITE, Role.ADMIN)

    @property
    def may_write_all(self) -> bool:
        """Write rights on every key: needed where the keys touched are not known up front
        (revoking a lease deletes whatever keys are attached to it)."""
        return self.role is Role.ADMIN or (self.role is Role.WRITE and not self.prefixes)


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One token as the state machine keeps it: never its secret."""

    token_id: str
    role: Role
    prefixes: tuple[str, ...]
    digest: bytes
    created_index: int
    """The index of the entry that created it (for the root token: its bootstrap entry)."""

    def to_wire(self) -> list[object]:
        return [self.token_id, self.role.value, list(self.prefixes), self.digest,
                self.created_index]

    @staticmethod
    def from_wire(wire: object) -> TokenRecord:
        """ValueError/TypeError unless `wire` is what to_wire() makes."""
        if type(wire) is not list or len(wire) != 5:
            raise ValueError("a token record is a 5-element array")
        token_id, role, prefixes, digest, created_index = wire
        if type(prefixes) is not list:
            raise TypeError("a token's prefixes are an array")
        if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
            raise ValueError(f"a token digest is {DIGEST_BYTES} bytes")
        if type(created_index) is not int or created_index < 1:
            raise ValueError("a token's creation index is an int >= 1")
        if type(role) is not str:
            raise TypeError("a token's role is a str")
        checked = check_prefixes(prefixes)
        if list(checked) != prefixes:
            raise ValueError("a token's prefixes are sorted and unique")
        return TokenRecord(check_token_id(token_id), Role(role), checked, digest,
                           created_index)

    @property
    def principal(self) -> Principal:
        return Principal(self.token_id, self.role, self.prefixes)


@dataclass(frozen=True, slots=True)
class TokenTable:
    """The replicated token state, as pushed to HTTP workers: whether auth is on, and every
    token (ids, roles, prefixes, digests; never a secret). `version` is the index of the entry
    that last changed it (0: never), so a receiver can tell a newer table from an older."""

    enabled: bool = False
    tokens: tuple[TokenRecord, ...] = ()
    version: int = 0
    _ids: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", frozenset(t.token_id for t in self.tokens))

    def has(self, token_id: str) -> bool:
        """Whether the token exists (created and not revoked): one set lookup."""
        return token_id in self._ids

    def to_wire(self) -> dict[str, object]:
        """A msgpack-able map (for a snapshot section or a push to a worker)."""
        return {"enabled": self.enabled, "version": self.version,
                "tokens": [t.to_wire() for t in self.tokens]}

    def covers(self, wire: object) -> bool:
        """Whether a table in to_wire()'s form has nothing this one lacks (no newer version,
        the same enabled), told from its header alone: a worker skips decoding it."""
        return (type(wire) is dict and type(wire.get("version")) is int
                and wire["version"] <= self.version and wire.get("enabled") is self.enabled)

    @staticmethod
    def from_wire(wire: object) -> TokenTable:
        if type(wire) is not dict:
            raise TypeError("a token table is a map")
        enabled, version, tokens = wire["enabled"], wire["version"], wire["tokens"]
        if type(enabled) is not bool or type(version) is not int or version < 0:
            raise ValueError("a token table has a bad header")
        if type(tokens) is not list or len(tokens) > MAX_TOKENS:
            raise ValueError("a token table's tokens are an array of at most MAX_TOKENS")
        records = tuple(TokenRecord.from_wire(t) for t in tokens)
        if len({r.token_id for r in records}) != len(records):
            raise ValueError("a token table repeats a token id")
        if records and not enabled:
            raise ValueError("a token table with tokens has auth enabled")
        return TokenTable(enabled, records, version)


class Authorizer:
    """Answers "who is this bearer?" from a TokenTable, locally (no round trip): what every
    HTTP worker holds. Immutable; build a new one when the table changes."""

    __slots__ = ("_by_digest", "enabled", "table")

    def __init__(self, table: TokenTable) -> None:
        self.table = table
        self.enabled = table.enabled
        self._by_digest: Mapping[bytes, TokenRecord] = {t.digest: t for t in table.tokens}

    def authenticate(self, secret: str | None) -> Principal | None:
        """The principal of the token whose secret this is; None for no or an unknown secret.
        (With auth off there is nobody to be: None too; check `enabled` first.)"""
        if not secret or len(secret) > MAX_SECRET_CHARS:
            return None
        digest = token_digest(secret)
        record = self._by_digest.get(digest)
        # The lookup compared digests; confirm in constant time all the same.
        if record is None or not hmac.compare_digest(record.digest, digest):
            return None
        return record.principal


REQUEST_TOKEN_ID: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "raftkv_request_token_id", default=None)
"""The id of the token the current request was authorised with (None: auth is off, or an
open route). Set by the HTTP worker's auth check in the request's own greenlet (each has its
own context); the commands the request proposes carry it, and apply checks it again."""

OPEN_AUTHORIZER: Final = Authorizer(TokenTable())
"""Auth off: what a cluster bootstrapped without a root token has."""


def parse_bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when absent or not a
    bearer token. Never raises, never logs the value."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


# --------------------------------------------------------------------------- root token
class RootTokenError(ValueError):
    """The root token file cannot be used; the message never quotes its content."""


def read_root_token_file(path: str | Path) -> str:
    """The root token in `path`: its content without surrounding whitespace, at least
    MIN_ROOT_TOKEN_CHARS printable ASCII characters without spaces (e.g. the 64 hex digits of
    `openssl rand -hex 32`). Read once, at a cluster's first start; never logged."""
    try:
        raw = read_small_file(str(path), 4096)
    except FileProblem as e:
        raise RootTokenError(f"cannot read the root token file: {e}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise RootTokenError(f"the root token file {path} is not ASCII text") from None
    if not MIN_ROOT_TOKEN_CHARS <= len(token) <= MAX_SECRET_CHARS or not all(
            "!" <= c <= "~" for c in token):
        raise RootTokenError(
            f"the root token in {path} must be {MIN_ROOT_TOKEN_CHARS}..{MAX_SECRET_CHARS} "
            "printable characters without spaces, e.g. the output of `openssl rand -hex 32`")
    return token


def prefixes_text(prefixes: Sequence[str]) -> str:
    """For log lines and tables: `*` for all keys."""
    return ",".join(prefixes) if prefixes else "*"
