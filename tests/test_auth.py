"""raftkv.auth: digests, principals' rules, the token table's wire form, the Authorizer, the
bearer header and the root token file."""

from __future__ import annotations

from pathlib import Path

import pytest

from raftkv.auth import (
    DIGEST_BYTES,
    MAX_TOKEN_PREFIXES,
    Authorizer,
    Principal,
    Role,
    RootTokenError,
    TokenRecord,
    TokenTable,
    check_prefixes,
    check_token_id,
    new_secret,
    new_token_id,
    parse_bearer,
    read_root_token_file,
    token_digest,
)


def record(token_id: str, role: Role, prefixes: tuple[str, ...] = (), secret: str = "",
           index: int = 5) -> TokenRecord:
    return TokenRecord(token_id, role, prefixes, token_digest(secret or f"s-{token_id}"), index)


def test_digest_is_stable_keyed_to_its_use_and_32_bytes() -> None:
    d = token_digest("abc")
    assert len(d) == DIGEST_BYTES == 32
    assert d == token_digest("abc")
    assert d != token_digest("abd")
    import hashlib
    assert d != hashlib.blake2b(b"abc", digest_size=32).digest()  # personalised


def test_new_secrets_are_256_bit_and_distinct() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    assert all(s.startswith("rkv_") and len(s) == 47 for s in secrets)
    assert len(new_token_id()) == 16
    check_token_id(new_token_id())


def test_principal_rules() -> None:
    read = Principal("r", Role.READ, ("app/",))
    assert read.may_read("app/x") and not read.may_read("other")
    assert not read.may_write("app/x")
    assert read.may_list("app/") and read.may_list("app/sub") and not read.may_list("ap")
    assert not read.may_list("")
    write = Principal("w", Role.WRITE, ("app/", "b/"))
    assert write.may_write("b/1") and write.may_write("app/1") and not write.may_write("c")
    assert write.may_write_some and not write.may_write_all
    assert Principal("w2", Role.WRITE).may_write_all
    admin = Principal("a", Role.ADMIN)
    assert admin.may_write("anything") and admin.may_list("") and admin.is_admin
    assert not Principal("r2", Role.READ).may_write_some


def test_authorizer() -> None:
    table = TokenTable(True, (record("root", Role.ADMIN, secret="root-secret"),
                              record("t1", Role.READ, ("a/",), secret="t1-secret")), 7)
    auth = Authorizer(table)
    assert auth.enabled
    assert auth.authenticate("root-secret") == Principal("root", Role.ADMIN)
    assert auth.authenticate("t1-secret") == Principal("t1", Role.READ, ("a/",))
    for bad in (None, "", "t1-secre", "t1-secret ", "x" * 10_000):
        assert auth.authenticate(bad) is None
    assert not Authorizer(TokenTable()).enabled


def test_table_wire_round_trip_and_checks() -> None:
    table = TokenTable(True, (record("root", Role.ADMIN), record("t", Role.WRITE, ("a", "b"))), 9)
    assert TokenTable.from_wire(table.to_wire()) == table
    assert TokenTable.from_wire(TokenTable().to_wire()) == TokenTable()
    wire = table.to_wire()
    tokens = wire["tokens"]
    assert isinstance(tokens, list)
    for broken in (
        {**wire, "enabled": False},                               # tokens but auth off
        {**wire, "tokens": [*tokens, tokens[0]]},                 # repeated id
        {**wire, "version": -1},
        {**wire, "tokens": [["t", "superuser", [], bytes(32), 1]]},
        {**wire, "tokens": [["t", "read", ["b", "a"], bytes(32), 1]]},  # unsorted prefixes
        {**wire, "tokens": [["t", "read", [], bytes(31), 1]]},
        {**wire, "tokens": [["t", "read", [], bytes(32), 0]]},
        {**wire, "tokens": [["bad id", "read", [], bytes(32), 1]]},
    ):
        with pytest.raises((ValueError, TypeError)):
            TokenTable.from_wire(broken)


def test_a_table_covers_a_wire_table_no_newer_and_alike_from_its_header() -> None:
    table = TokenTable(True, (record("root", Role.ADMIN),), 9)
    older = TokenTable(True, (record("root", Role.ADMIN),), 7).to_wire()
    assert table.covers(table.to_wire()) and table.covers(older)
    assert not table.covers(TokenTable(True, (record("root", Role.ADMIN),), 10).to_wire())
    assert not TokenTable().covers(table.to_wire())  # auth switched on: not covered
    garbage: list[object] = [None, [], {"version": "9", "enabled": True}, {"enabled": True}]
    for wire in garbage:
        assert not table.covers(wire)  # decoded (and refused) by from_wire instead


def test_check_prefixes() -> None:
    assert check_prefixes(["b/", "a/", "b/"]) == ("a/", "b/")
    with pytest.raises(ValueError):
        check_prefixes([""])
    with pytest.raises(ValueError):
        check_prefixes([f"p{i}" for i in range(MAX_TOKEN_PREFIXES + 1)])
    with pytest.raises(TypeError):
        check_prefixes([1])


@pytest.mark.parametrize(("header", "token"), [
    (None, None), ("", None), ("Bearer", None), ("Bearer   ", None), ("Basic abc", None),
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER rkv_x-y", "rkv_x-y"),
])
def test_parse_bearer(header: str | None, token: str | None) -> None:
    assert parse_bearer(header) == token


def test_root_token_file(tmp_path: Path) -> None:
    good = tmp_path / "root"
    good.write_text("  " + "ab" * 32 + "\n")
    assert read_root_token_file(good) == "ab" * 32
    secret = "short-secret-value"
    short = tmp_path / "short"
    short.write_text(secret)
    with pytest.raises(RootTokenError) as e:
        read_root_token_file(short)
    assert secret not in str(e.value)
    spaced = tmp_path / "spaced"
    spaced.write_text("a" * 20 + " " + "b" * 20)
    with pytest.raises(RootTokenError):
        read_root_token_file(spaced)
    with pytest.raises(RootTokenError, match="cannot read"):
        read_root_token_file(tmp_path / "absent")
