"""Authorisation in the HTTP app (raftkv.http.auth) and the token API, against the fake
service: the one permission table covers every responder; 401/403 in the JSON error shape;
roles, prefixes, batches, lists, leases, admin-only routes, /metrics and /status; token
create, list and revoke; no secret in any answer but the create's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from falcon.testing import Result, TestClient

from raftkv.auth import Role, new_secret
from raftkv.http import auth as auth_module
from raftkv.http import create_app
from raftkv.http.auth import CATCH_UP_TIMEOUT_S, PERMISSIONS
from raftkv.service import NoLeaderError
from tests.http.fake_service import FakeService

ROOT = "root-secret-" + "x" * 40
JSON = {"Content-Type": "application/json"}


class Sink:
    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        pass

    def render(self) -> bytes:
        return b"# metrics\n"


@pytest.fixture
def fake() -> FakeService:
    f = FakeService(leader_address="127.0.0.1:8001")
    f.enable_auth(ROOT)
    return f


@pytest.fixture
def client(fake: FakeService) -> TestClient:
    return TestClient(create_app(fake, metrics=Sink()))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error(result: Result, status: int, code: str) -> dict[str, Any]:
    assert result.status_code == status, result.text
    body = result.json
    assert body["error"] == code and body["message"] and "leader" in body
    return body  # type: ignore[no-any-return]


def _routes(app: Any) -> Iterator[tuple[str, str]]:
    stack = list(app._router._roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.resource is None:
            continue
        for method, responder in node.method_map.items():
            if getattr(responder, "__self__", None) is node.resource:
                yield node.uri_template, method


def test_every_responder_is_in_the_table() -> None:
    app = create_app(FakeService(), metrics=Sink())
    served = set(_routes(app))
    assert served == set(PERMISSIONS), (served - set(PERMISSIONS), set(PERMISSIONS) - served)


def test_auth_off_needs_no_token() -> None:
    client = TestClient(create_app(FakeService(), metrics=Sink()))
    assert client.simulate_put("/keys/a", json={"value": 1}).status_code == 200
    assert client.simulate_get("/snapshot").status_code == 200
    listed = client.simulate_get("/auth/tokens")
    assert listed.json == {"enabled": False, "tokens": []}
    error(client.simulate_post("/auth/tokens", json={"role": "read"}), 409, "auth_disabled")


def test_open_routes_and_401(client: TestClient) -> None:
    assert client.simulate_get("/health").status_code == 200
    assert client.simulate_get("/ready").status_code == 200
    for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {ROOT}"},
                    {"Authorization": "Bearer"}):
        result = client.simulate_get("/keys/a", headers=headers)
        body = error(result, 401, "unauthenticated")
        assert result.headers["www-authenticate"].startswith("Bearer")
        assert ROOT not in result.text and "wrong" not in body["message"]
    for path in ("/status", "/metrics", "/cluster"):
        error(client.simulate_get(path), 401, "unauthenticated")
    assert client.simulate_get("/keys/a", headers=bearer(ROOT)).status_code == 404  # admin
    # No route: 404 as ever (nothing to protect); a wrong method needs a token like admin.
    assert client.simulate_get("/nowhere").status_code == 404


def test_read_token(client: TestClient, fake: FakeService) -> None:
    client.simulate_put("/keys/app/x", json={"value": 1}, headers=bearer(ROOT))
    client.simulate_put("/keys/other", json={"value": 2}, headers=bearer(ROOT))
    read = bearer(fake.add_token(Role.READ, ("app/",)))
    assert client.simulate_get("/keys/app/x", headers=read).json["value"] == 1
    assert client.simulate_get("/keys/app/x", params={"wait": "true", "index": "0"},
                               headers=read).status_code == 200
    body = error(client.simulate_get("/keys/other", headers=read), 403, "forbidden")
    assert "read" in body["message"]
    error(client.simulate_put("/keys/app/x", json={"value": 3}, headers=read), 403, "forbidden")
    error(client.simulate_delete("/keys/app/x", headers=read), 403, "forbidden")
    assert client.simulate_get("/keys", params={"prefix": "app/"}, headers=read).json[
        "keys"][0]["key"] == "app/x"
    assert client.simulate_get("/keys", params={"prefix": "app/x"},
                               headers=read).status_code == 200
    error(client.simulate_get("/keys", headers=read), 403, "forbidden")
    error(client.simulate_get("/keys", params={"prefix": "ap"}, headers=read), 403, "forbidden")
    error(client.simulate_post("/leases", json={"ttl": 10}, headers=read), 403, "forbidden")
    for path in ("/status", "/metrics", "/cluster"):
        assert client.simulate_get(path, headers=read).status_code == 200, path


def test_write_token_with_prefixes(client: TestClient, fake: FakeService) -> None:
    write = bearer(fake.add_token(Role.WRITE, ("app/", "b/")))
    assert client.simulate_put("/keys/app/1", json={"value": 1}, headers=write).status_code == 200
    assert client.simulate_post("/keys/b/1", json={"value": 1}, headers=write).status_code == 200
    assert client.simulate_get("/keys/app/1", headers=write).status_code == 200
    error(client.simulate_put("/keys/c/1", json={"value": 1}, headers=write), 403, "forbidden")
    error(client.simulate_delete("/keys/c/1", headers=write), 403, "forbidden")
    before = len(fake.calls_of("batch"))
    ok = {"ops": [{"op": "put", "key": "app/2", "value": 2}, {"op": "delete", "key": "b/1"}]}
    assert client.simulate_post("/batch", json=ok, headers=write).status_code == 200
    bad = {"ops": [{"op": "put", "key": "app/3", "value": 3}, {"op": "delete", "key": "c/1"}]}
    body = error(client.simulate_post("/batch", json=bad, headers=write), 403, "forbidden")
    assert "c/1" in body["message"]
    assert len(fake.calls_of("batch")) == before + 1  # the refused batch never reached it
    lease = client.simulate_post("/leases", json={"ttl": 10}, headers=write).json["id"]
    assert client.simulate_get(f"/leases/{lease}", headers=write).status_code == 200
    assert client.simulate_post(f"/leases/{lease}/keepalive",
                                headers=write).status_code == 200
    error(client.simulate_delete(f"/leases/{lease}", headers=write), 403, "forbidden")
    unlimited = bearer(fake.add_token(Role.WRITE))
    assert client.simulate_delete(f"/leases/{lease}", headers=unlimited).status_code == 200


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/snapshot", None),
    ("POST", "/cluster/join", {"id": "n9", "address": "127.0.0.1:9"}),
    ("DELETE", "/cluster/members/n1", None),
    ("POST", "/cluster/leader", None),
    ("GET", "/auth/tokens", None),
    ("POST", "/auth/tokens", {"role": "read"}),
    ("DELETE", "/auth/tokens/t1", None),
])
def test_admin_only(client: TestClient, fake: FakeService, method: str, path: str,
                    body: object) -> None:
    for role in (Role.READ, Role.WRITE):
        headers = bearer(fake.add_token(role))
        error(client.simulate_request(method, path, json=body, headers=headers), 403,
              "forbidden")
    error(client.simulate_request(method, path, json=body), 401, "unauthenticated")
    fake.leader = True
    result = client.simulate_request(method, path, json=body, headers=bearer(ROOT))
    assert result.status_code not in (401, 403), result.text


def test_metrics_open(fake: FakeService) -> None:
    client = TestClient(create_app(fake, metrics=Sink(), metrics_open=True))
    assert client.simulate_get("/metrics").status_code == 200
    assert client.simulate_get("/status").status_code == 200
    error(client.simulate_get("/cluster"), 401, "unauthenticated")
    error(client.simulate_get("/keys/a"), 401, "unauthenticated")


def test_token_api(client: TestClient, fake: FakeService) -> None:
    admin = bearer(ROOT)
    made = client.simulate_post("/auth/tokens", json={"role": "write", "prefixes": ["app/"]},
                                headers=admin)
    assert made.status_code == 200, made.text
    body = made.json
    assert set(body) == {"id", "token", "role", "prefixes", "index"}
    assert body["role"] == "write" and body["prefixes"] == ["app/"]
    secret, token_id = body["token"], body["id"]
    assert client.simulate_put("/keys/app/k", json={"value": 1},
                               headers=bearer(secret)).status_code == 200
    listed = client.simulate_get("/auth/tokens", headers=admin)
    assert listed.json["enabled"] is True
    assert {"id": token_id, "role": "write", "prefixes": ["app/"],
            "created_index": body["index"]} in listed.json["tokens"]
    assert secret not in listed.text and "digest" not in listed.text
    revoked = client.simulate_delete(f"/auth/tokens/{token_id}", headers=admin)
    assert revoked.json == {"id": token_id, "revoked": True, "index": revoked.json["index"]}
    error(client.simulate_put("/keys/app/k", json={"value": 1}, headers=bearer(secret)),
          401, "unauthenticated")
    error(client.simulate_delete(f"/auth/tokens/{token_id}", headers=admin), 404,
          "token_not_found")
    error(client.simulate_delete("/auth/tokens/bad%20id", headers=admin), 400, "invalid_field")


@pytest.mark.parametrize("body", [
    {}, {"role": "root"}, {"role": "read", "prefixes": "app/"},
    {"role": "read", "prefixes": [""]}, {"role": "admin", "prefixes": ["a"]},
    {"role": "read", "extra": 1},
])
def test_bad_token_requests(client: TestClient, body: dict[str, object]) -> None:
    result = client.simulate_post("/auth/tokens", json=body, headers=bearer(ROOT))
    assert result.status_code == 400, result.text


def test_a_retried_create_is_a_conflict_naming_the_token(client: TestClient) -> None:
    headers = {**bearer(ROOT), "Idempotency-Key": "k1"}
    first = client.simulate_post("/auth/tokens", json={"role": "read"}, headers=headers)
    again = client.simulate_post("/auth/tokens", json={"role": "read"}, headers=headers)
    body = error(again, 409, "token_conflict")
    assert body["id"] == first.json["id"]
    assert first.json["token"] not in again.text


def made_elsewhere(fake: FakeService) -> str:
    """A fresh write token this node's copy of the table lacks (the cluster's has it)."""
    lagging = fake.token_table
    fresh = fake.add_token(Role.WRITE)
    fake.lagging_token_table = lagging
    return fresh


def test_a_token_made_elsewhere_a_moment_ago_is_looked_up_again_before_a_401(
        client: TestClient, fake: FakeService) -> None:
    """This node's copy of the token table lags the cluster's (a token created through
    another node, not applied or pushed here yet): a made-shaped bearer it does not know is
    looked up once more, behind a linearizable read of the table, before the answer."""
    fresh = made_elsewhere(fake)
    assert client.simulate_put("/keys/k", json={"value": 1}, headers=bearer(fresh)).status_code \
        == 200
    assert [c.timeout_s for c in fake.calls_of("caught_up_authorizer")] == [
        CATCH_UP_TIMEOUT_S]
    # Known to the node's copy: no round trip.
    fake.lagging_token_table = None
    assert client.simulate_put("/keys/k", json={"value": 2}, headers=bearer(fresh)).status_code \
        == 200
    assert len(fake.calls_of("caught_up_authorizer")) == 1


class SteppedClock:
    """time.monotonic for raftkv.http.auth: moves only when a test steps it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SteppedClock:
    stepped = SteppedClock()
    monkeypatch.setattr(auth_module, "time", stepped)
    return stepped


def slow_look_up(fake: FakeService, clock: SteppedClock, seconds: float) -> str:
    """made_elsewhere, and looking it up again takes `seconds` of the stepped clock."""
    fake.during_catch_up = lambda: clock.step(seconds)
    return made_elsewhere(fake)


@pytest.mark.parametrize(("query", "budget", "left"), [
    ("?timeout=1.5", 1.5, 0.75),                # a shorter ?timeout bounds the look-up
    ("", 2.0, 1.25),                             # no ?timeout: the app's default, 2 s
    ("?timeout=30", CATCH_UP_TIMEOUT_S, 29.25),  # never longer than the cap
])
def test_the_look_up_counts_against_the_requests_own_timeout(
        fake: FakeService, clock: SteppedClock, query: str, budget: float,
        left: float) -> None:
    """The look-up waits at most 5 s or the request's own timeout (?timeout, else the
    default), and what it waited is taken off the timeout the write then gets: the whole
    request keeps to its timeout."""
    client = TestClient(create_app(fake, metrics=Sink(), default_timeout_s=2.0))
    fresh = slow_look_up(fake, clock, 0.75)
    result = client.simulate_put(f"/keys/k{query}", json={"value": 1}, headers=bearer(fresh))
    assert result.status_code == 200, result.text
    assert [c.timeout_s for c in fake.calls_of("caught_up_authorizer")] == [budget]
    assert [c.timeout_s for c in fake.calls_of("put")] == [pytest.approx(left)]


def test_a_watch_keeps_its_own_default_less_the_look_up(
        fake: FakeService, clock: SteppedClock) -> None:
    """A watch's default is 30 s, not the app's 2 s: its look-up may take the 5 s cap, and
    one of 3 s leaves it 27 s."""
    client = TestClient(create_app(fake, metrics=Sink(), default_timeout_s=2.0))
    fresh = slow_look_up(fake, clock, 3.0)
    result = client.simulate_get("/keys/k", params={"wait": "true"}, headers=bearer(fresh))
    assert result.status_code == 200, result.text
    assert [c.timeout_s for c in fake.calls_of("caught_up_authorizer")] == [CATCH_UP_TIMEOUT_S]
    assert [c.timeout_s for c in fake.calls_of("watch")] == [pytest.approx(27.0)]


def test_a_look_up_that_used_the_whole_timeout_does_nothing(
        client: TestClient, fake: FakeService, clock: SteppedClock) -> None:
    """The table came back just as the request's timeout ran out: 504, nothing proposed; an
    unknown token is still 401 (the table says so, however long it took)."""
    fresh = slow_look_up(fake, clock, 1.0)
    error(client.simulate_put("/keys/k?timeout=1", json={"value": 1}, headers=bearer(fresh)),
          504, "read_timeout")
    assert fake.calls_of("put") == []
    error(client.simulate_put("/keys/k?timeout=1", json={"value": 1},
                              headers=bearer(new_secret())), 401, "unauthenticated")
    # A known token costs no look-up and keeps its whole timeout.
    fake.lagging_token_table = None
    assert client.simulate_put("/keys/k?timeout=1", json={"value": 1},
                               headers=bearer(fresh)).status_code == 200
    assert [c.timeout_s for c in fake.calls_of("put")] == [1.0]


def test_a_slow_look_up_neither_times_out_a_route_without_a_timeout_nor_hides_a_400(
        fake: FakeService, clock: SteppedClock) -> None:
    """/status has no operation timeout: it answers after a slow look-up. A malformed
    ?timeout gets the resource's 400 (the look-up took the default or the cap meanwhile)."""
    client = TestClient(create_app(fake, metrics=Sink(), default_timeout_s=2.0))
    fresh = slow_look_up(fake, clock, CATCH_UP_TIMEOUT_S)
    assert client.simulate_get("/status", headers=bearer(fresh)).status_code == 200
    for bad in ("nan", "inf", "0", "-1", "soon", "100"):
        error(client.simulate_put(f"/keys/k?timeout={bad}", json={"value": 1},
                                  headers=bearer(fresh)), 400, "invalid_field")
    assert [c.timeout_s for c in fake.calls_of("caught_up_authorizer")] == [2.0] * 6 + [
        CATCH_UP_TIMEOUT_S]  # /status and five malformed: the default; 100: the cap
    assert fake.calls_of("put") == []


def test_an_unknown_token_is_401_after_the_look_up_and_garbage_costs_none(
        client: TestClient, fake: FakeService) -> None:
    unknown = new_secret()  # shaped like a made token, but made nowhere
    error(client.simulate_get("/keys/k", headers=bearer(unknown)), 401, "unauthenticated")
    assert len(fake.calls_of("caught_up_authorizer")) == 1
    for garbage in ("rkv_short", "x" * len(unknown), ROOT[:-1]):
        error(client.simulate_get("/keys/k", headers=bearer(garbage)), 401, "unauthenticated")
    error(client.simulate_get("/keys/k"), 401, "unauthenticated")
    assert len(fake.calls_of("caught_up_authorizer")) == 1


def test_a_look_up_that_cannot_be_had_answers_its_error_not_a_401(
        client: TestClient, fake: FakeService) -> None:
    """No leader to confirm the table with: the token may be valid, so not 401 but the
    read's own error (retry)."""
    fake.fail_next.append(NoLeaderError("no leader is known yet; retry"))
    error(client.simulate_get("/keys/k", headers=bearer(new_secret())), 503, "no_leader")
