"""The client with tokens, over real HTTP (tests/support/single_node.py with auth on): the
token is sent, 401/403 raise Unauthenticated/Forbidden without retries, token management,
a retried create whose secret was lost is replaced, and locks keep the token."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from raftkv.auth import Role
from raftkv.client import Client, Forbidden, TokenConflict, Unauthenticated
from raftkv.service import TokenInfo
from tests.support.single_node import SingleNodeService, serving

ROOT = "root-" + "z" * 40


@pytest.fixture
def node() -> SingleNodeService:
    return SingleNodeService(root_token=ROOT)


@pytest.fixture
def url(node: SingleNodeService) -> Iterator[str]:
    with serving(node) as address:
        yield address


def client(url: str, token: str | None) -> Client:
    return Client([url], timeout_s=2.0, retries=3, token=token, sleep=lambda s: None)


def test_no_token_and_a_bad_one_are_unauthenticated_at_once(url: str) -> None:
    for token in (None, "not-a-token"):
        with client(url, token) as kv, pytest.raises(Unauthenticated) as e:
            kv.get("k")
        assert e.value.status == 401 and e.value.code == "unauthenticated"
        assert ROOT not in str(e.value)


def test_roles_prefixes_and_management(url: str) -> None:
    with client(url, ROOT) as admin:
        read = admin.token_create("read", ["app/"])
        write = admin.token_create(Role.WRITE, ("app/",))
        assert read.role is Role.READ and read.prefixes == ("app/",)
        assert read.token.startswith("rkv_") and read.token != write.token
        listed = admin.tokens()
        assert TokenInfo(read.token_id, Role.READ, ("app/",), read.index) in listed
        assert {t.token_id for t in listed} == {"root", read.token_id, write.token_id}
    with client(url, write.token) as w:
        w.put("app/a", 1)
        with pytest.raises(Forbidden) as e:
            w.put("other", 1)
        assert e.value.status == 403
        with pytest.raises(Forbidden):
            w.tokens()
    with client(url, read.token) as r:
        assert r.get("app/a").value == 1
        assert [kv.key for kv in r.list("app/")] == ["app/a"]
        with pytest.raises(Forbidden):
            r.put("app/a", 2)
    with client(url, ROOT) as admin:
        admin.token_revoke(write.token_id)
        with pytest.raises(TokenConflict):
            admin.token_revoke("root")  # the last admin token
    with client(url, write.token) as w, pytest.raises(Unauthenticated):
        w.put("app/a", 3)


def test_clone_and_locks_keep_the_token(url: str) -> None:
    with client(url, ROOT) as admin:
        locker = admin.token_create("write").token
        limited = admin.token_create("write", ["_lock/"]).token
    with client(url, locker) as kv:
        with kv.lock("job", ttl=5) as lock:  # its keepalive thread uses a clone
            assert lock.held
            assert kv.clone().get(lock.key).value is not None
            key, lease = lock.key, lock.lease_id
        assert not kv.list("_lock/")  # released: the lease revoked, the key deleted
    with client(url, limited) as kv:
        with pytest.raises(Forbidden):
            kv.clone().put("app/x", 1)
        # A prefix-limited token may take a lock, but not revoke a lease: a revoke deletes
        # whatever keys are attached to it, whoever attached them. Its lock is released by
        # the lease's expiry instead (raftkv.http.auth, Need.WRITE_ALL).
        grant = kv.lease_grant(5)
        kv.put(key, "mine", lease=grant.lease_id)
        with pytest.raises(Forbidden):
            kv.lease_revoke(grant.lease_id)
    assert lease is not None


def test_a_retried_create_replaces_a_token_whose_secret_was_lost(
        url: str, node: SingleNodeService, monkeypatch: pytest.MonkeyPatch) -> None:
    real = node.token_create
    lost: list[str] = []

    def first_answer_lost(role: Role, prefixes: tuple[str, ...], *, request_id: str | None,
                          timeout_s: float) -> object:
        answer = real(role, prefixes, request_id=request_id, timeout_s=timeout_s)
        if not lost:
            lost.append(answer.token_id)
            from raftkv.service import OutcomeUnknownError
            raise OutcomeUnknownError("the commit was not seen in time")
        return answer

    monkeypatch.setattr(node, "token_create", first_answer_lost)
    with client(url, ROOT) as admin:
        made = admin.token_create("read")
        ids = {t.token_id for t in admin.tokens()}
    assert lost and made.token_id != lost[0]
    assert lost[0] not in ids and made.token_id in ids
    with client(url, made.token) as r:
        r.list("")
