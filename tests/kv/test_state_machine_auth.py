"""Tokens in the key-value state machine: the auth commands and their encoding, enabling auth
once, creating and revoking tokens, idempotent retries (a retried create is told apart), and
the "auth" snapshot section (absent when auth is off; restored; refused when damaged)."""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest

from raftkv.auth import ROOT_TOKEN_ID, Authorizer, Principal, Role, TokenTable, token_digest
from raftkv.core.types import Entry
from raftkv.kv.commands import (
    AuthEnable,
    CommandDecodeError,
    Put,
    TokenCreate,
    TokenRevoke,
    decode_command,
    decode_entry,
    encode_command,
)
from raftkv.kv.state_machine import (
    AuthEnabled,
    AuthRefused,
    InvalidCommand,
    KVStateMachine,
    PutResult,
    SnapshotCorrupt,
    TokenCreated,
    TokenNotFound,
    TokenRevoked,
    parse_snapshot,
    serialize_snapshot,
)

ROOT = "r" * 64


class Driver:
    def __init__(self) -> None:
        self.sm = KVStateMachine()

    def apply(self, cmd: object, request_id: str | None = None,
              token_id: str | None = None) -> object:
        index = self.sm.applied_index + 1
        data = encode_command(cmd, request_id, token_id)  # type: ignore[arg-type]
        return self.sm.apply(Entry(index, 1, data=data))


def create(token_id: str, role: Role = Role.READ, prefixes: tuple[str, ...] = (),
           secret: str | None = None) -> TokenCreate:
    return TokenCreate(token_id, role, prefixes, token_digest(secret or f"secret-{token_id}"))


def enabled() -> Driver:
    d = Driver()
    assert d.apply(AuthEnable(token_digest(ROOT))) == AuthEnabled(1)
    return d


@pytest.mark.parametrize("cmd", [
    AuthEnable(bytes(range(32))),
    TokenCreate("abc", Role.WRITE, ("a/", "b/"), bytes(32)),
    TokenCreate("x.y-z_1", Role.ADMIN, (), bytes(32)),
    TokenRevoke("abc"),
])
def test_commands_round_trip(cmd: object) -> None:
    assert decode_command(encode_command(cmd, "rid")) == (cmd, "rid")  # type: ignore[arg-type]


@pytest.mark.parametrize("wire", [
    [5, b"short"],
    [5, "x" * 32],
    [6, "id", "root", [], bytes(32)],
    [6, "id", "read", ["b", "a"], bytes(32)],
    [6, "id", "admin", ["a"], bytes(32)],
    [6, "bad id", "read", [], bytes(32)],
    [6, "id", "read", "a", bytes(32)],
    [7, ""],
    [7, 5],
])
def test_bad_auth_commands_are_refused(wire: list[object]) -> None:
    with pytest.raises(CommandDecodeError):
        decode_command(msgpack.packb([1, None, wire], use_bin_type=True))


def test_auth_is_off_until_enabled_and_enabled_once() -> None:
    d = Driver()
    assert d.sm.token_table == TokenTable()
    assert d.apply(create("t1")) == AuthRefused(1, "auth_disabled")
    assert d.apply(TokenRevoke("t1")) == AuthRefused(2, "auth_disabled")
    assert d.apply(AuthEnable(token_digest(ROOT))) == AuthEnabled(3)
    table = d.sm.token_table
    assert table.enabled and table.version == 3
    assert Authorizer(table).authenticate(ROOT) == Principal(ROOT_TOKEN_ID, Role.ADMIN)
    assert d.apply(AuthEnable(token_digest("another" * 8))) == AuthRefused(4, "auth_enabled")
    assert d.sm.token_table is table


def test_create_and_revoke() -> None:
    d = enabled()
    assert d.apply(create("t1", Role.WRITE, ("app/",))) == TokenCreated(2, "t1")
    assert d.apply(create("t1")) == AuthRefused(3, "token_exists")
    assert d.apply(create("t2", secret="secret-t1")) == AuthRefused(4, "token_exists")
    auth = Authorizer(d.sm.token_table)
    assert auth.authenticate("secret-t1") == Principal("t1", Role.WRITE, ("app/",))
    record = next(t for t in d.sm.token_table.tokens if t.token_id == "t1")
    assert record.created_index == 2
    assert d.apply(TokenRevoke("t1")) == TokenRevoked(5, "t1")
    assert d.apply(TokenRevoke("t1")) == TokenNotFound(6, "t1")
    assert Authorizer(d.sm.token_table).authenticate("secret-t1") is None
    assert d.sm.token_table.version == 5


def test_the_last_admin_token_cannot_be_revoked() -> None:
    d = enabled()
    assert d.apply(TokenRevoke(ROOT_TOKEN_ID)) == AuthRefused(2, "last_admin")
    d.apply(create("a2", Role.ADMIN))
    assert d.apply(TokenRevoke(ROOT_TOKEN_ID)) == TokenRevoked(4, ROOT_TOKEN_ID)
    assert Authorizer(d.sm.token_table).authenticate(ROOT) is None
    assert d.apply(TokenRevoke("a2")) == AuthRefused(5, "last_admin")


def test_a_command_carries_its_token_in_envelope_2_and_without_one_stays_in_1() -> None:
    put = Put("k", 1)
    assert msgpack.unpackb(encode_command(put, "rid"))[0] == 1
    data = encode_command(put, "rid", "t1")
    assert msgpack.unpackb(data) == [2, "rid", [0, "k", 1, None], "t1"]
    assert decode_entry(data) == (put, "rid", "t1")
    assert decode_entry(data, logged=True) == (put, "rid", "t1")
    assert decode_command(data) == (put, "rid")
    for bad in ([2, None, [0, "k", 1, None], 7], [2, None, [0, "k", 1, None], "bad id"],
                [2, None, [0, "k", 1, None]], [1, None, [0, "k", 1, None], "t1"]):
        with pytest.raises(CommandDecodeError):
            decode_command(msgpack.packb(bad, use_bin_type=True))


def test_a_write_whose_token_was_revoked_before_it_applied_writes_nothing() -> None:
    """Found by a helper: a worker authorises a request with its copy of the token table and
    proposes it; a revoke ordered before it in the log did not stop it (3-9 writes with a
    revoked token acknowledged after the revoke's index in 6 runs of 7; a revoked admin made
    admin tokens that kept working). The state machine checks the token again at apply."""
    d = enabled()
    assert d.apply(create("w1", Role.WRITE)) == TokenCreated(2, "w1")
    assert d.apply(create("a2", Role.ADMIN)) == TokenCreated(3, "a2")
    assert d.apply(Put("k", "before"), None, "w1") == PutResult(4, "before", None)
    assert d.apply(TokenRevoke("w1"), None, "a2") == TokenRevoked(5, "w1")
    assert d.apply(Put("k", "after"), "rid-1", "w1") == AuthRefused(6, "token_revoked")
    assert d.sm.get("k") == ("before", 4)
    assert d.apply(TokenRevoke("a2"), None, ROOT_TOKEN_ID) == TokenRevoked(7, "a2")
    assert d.apply(create("a3", Role.ADMIN), None, "a2") == AuthRefused(8, "token_revoked")
    assert [t.token_id for t in d.sm.token_table.tokens] == [ROOT_TOKEN_ID]
    # Not remembered: the same request id with a live token applies.
    assert d.apply(Put("k", "after"), "rid-1", ROOT_TOKEN_ID) == PutResult(9, "after", None)


def test_a_retry_of_a_write_that_applied_before_its_token_was_revoked_is_told_so() -> None:
    """Found by a review: the retry (a 504, then the same Idempotency-Key, let in by a worker
    whose token table lagged) got 401 "nothing was written" for a write that was in the
    store. It is answered with what the write did, and writes nothing new; a new request, or
    the request id with another command, is still refused."""
    d = enabled()
    d.apply(create("w1", Role.WRITE))
    assert d.apply(Put("k", "v"), "rid-1", "w1") == PutResult(3, "v", None)
    assert d.apply(TokenRevoke("w1")) == TokenRevoked(4, "w1")
    assert d.apply(Put("k", "v"), "rid-1", "w1") == PutResult(3, "v", None)
    assert d.sm.get("k") == ("v", 3)
    assert d.apply(Put("k", "other"), "rid-1", "w1") == AuthRefused(6, "token_revoked")
    assert d.apply(Put("k", "v"), "rid-2", "w1") == AuthRefused(7, "token_revoked")
    assert d.sm.get("k") == ("v", 3)


def test_a_retry_with_another_token_of_the_client_is_the_same_request() -> None:
    d = enabled()
    d.apply(create("w1", Role.WRITE))
    d.apply(create("w2", Role.WRITE))
    assert d.apply(Put("k", 1), "rid-1", "w1") == PutResult(4, 1, None)
    assert d.apply(Put("k", 1), "rid-1", "w2") == PutResult(4, 1, None)
    assert d.apply(Put("k", 1), "rid-1") == PutResult(4, 1, None)
    assert d.sm.get("k") == (1, 4)


def test_retries_with_a_request_id() -> None:
    d = enabled()
    assert d.apply(create("t1", Role.READ, ("a/",)), "req-1") == TokenCreated(2, "t1")
    # The same entry applied again (a duplicate of the same proposal): its secret is the one.
    assert d.apply(create("t1", Role.READ, ("a/",)), "req-1") == TokenCreated(2, "t1")
    # A retry through the API: another id and secret, same role and prefixes.
    assert d.apply(create("t9", Role.READ, ("a/",), secret="new"), "req-1") == TokenCreated(
        2, "t1", replayed=True)
    assert [t.token_id for t in d.sm.token_table.tokens] == [ROOT_TOKEN_ID, "t1"]
    # The request id reused for another create is not a retry.
    result = d.apply(create("t3", Role.WRITE), "req-1")
    assert isinstance(result, InvalidCommand)
    assert d.apply(TokenRevoke("t1"), "req-2") == TokenRevoked(6, "t1")
    assert d.apply(TokenRevoke("t1"), "req-2") == TokenRevoked(6, "t1")
    assert d.apply(TokenRevoke("zz"), "req-3") == TokenNotFound(8, "zz")
    assert d.apply(TokenRevoke("zz"), "req-3") == TokenNotFound(8, "zz")
    assert d.apply(TokenRevoke(ROOT_TOKEN_ID), "req-4") == AuthRefused(10, "last_admin")
    assert d.apply(TokenRevoke(ROOT_TOKEN_ID), "req-4") == AuthRefused(10, "last_admin")


def test_snapshot_without_auth_has_no_section() -> None:
    d = Driver()
    d.apply(Put("k", 1))
    data = serialize_snapshot(d.sm.snapshot_view())
    assert b"section" not in data
    assert parse_snapshot(data).auth == TokenTable()


def test_snapshot_carries_the_tokens_and_the_remembered_answers() -> None:
    d = enabled()
    d.apply(create("t1", Role.WRITE, ("app/",)), "req-1")
    d.apply(Put("app/x", 1))
    data = d.sm.snapshot()
    other = KVStateMachine()
    other.restore(data, d.sm.applied_index)
    assert other.token_table == d.sm.token_table
    assert Authorizer(other.token_table).authenticate("secret-t1") is not None
    # A retry after the restore still gets the first answer.
    retry = encode_command(create("t5", Role.WRITE, ("app/",), secret="x"), "req-1")
    assert other.apply(Entry(4, 1, data=retry)) == TokenCreated(2, "t1", replayed=True)
    # And restoring a snapshot without auth turns it off again.
    plain = Driver()
    plain.apply(Put("a", 1))
    plain.apply(Put("b", 1))
    plain.apply(Put("c", 1))
    other.restore(plain.sm.snapshot(), 3)
    assert other.token_table == TokenTable()
    assert isinstance(other.apply(Entry(4, 1, data=encode_command(Put("d", 1)))), PutResult)


def test_damaged_sections_are_refused() -> None:
    d = enabled()
    good = d.sm.snapshot()
    packer = msgpack.Packer(use_bin_type=True)
    section = {"section": "auth", "table": d.sm.token_table.to_wire()}
    for extra in (
        packer.pack(section),                                    # repeated
        packer.pack({"section": "quotas"}),                      # unknown
        packer.pack([1, 2]),                                     # not a section
    ):
        with pytest.raises(SnapshotCorrupt):
            parse_snapshot(good + extra)
    future = d.sm.token_table.to_wire()
    future["version"] = 99
    base = Driver().sm.snapshot_view()
    plain = serialize_snapshot(base)  # applied index 0
    with pytest.raises(SnapshotCorrupt):
        parse_snapshot(plain + packer.pack({"section": "auth", "table": future}))
    with pytest.raises(SnapshotCorrupt):
        parse_snapshot(plain + packer.pack({"section": "auth", "table": {"enabled": 1}}))
