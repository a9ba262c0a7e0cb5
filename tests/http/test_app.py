"""The HTTP layer against an in-memory fake service, through falcon's TestClient (no sockets)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from falcon.testing import Result, TestClient

from raftkv.http import create_app
from raftkv.http.app import DEFAULT_MAX_BODY_BYTES, ERROR_TABLE
from raftkv.service import (
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    Consistency,
    InvalidRequestError,
    MembershipChangeError,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    Readiness,
    ReadTimeoutError,
    ServiceError,
    StorageFullError,
    UnavailableError,
)
from tests.http.fake_service import FakeService

LEADER = "127.0.0.1:8001"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def fake() -> FakeService:
    return FakeService(leader_address=LEADER)


@pytest.fixture
def client(fake: FakeService) -> TestClient:
    return TestClient(create_app(fake))


def assert_error(result: Result, status: int, code: str) -> dict[str, Any]:
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    assert "Traceback" not in result.text
    body = result.json
    assert isinstance(body, dict)
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert "leader" in body
    return body


# --------------------------------------------------------------------------- the error table
@dataclass(frozen=True)
class ErrorCase:
    name: str
    method: str
    path: str
    status: int
    code: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[FakeService], None] = lambda fake: None
    headers: dict[str, str] = field(default_factory=dict)
    """Response headers that must be present (value, or "" for any value)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Extra body fields that must be present with these values."""


def _fail_with(error: Exception) -> Callable[[FakeService], None]:
    def setup(fake: FakeService) -> None:
        fake.fail_with = error
    return setup


def _not_ready(fake: FakeService) -> None:
    fake.ready = Readiness(False, "applied index 3 is behind the leader's commit 9")


def _put(value: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"json": {"value": value, **extra}}


ERROR_CASES = [
    # 400
    ErrorCase("truncated json", "POST", "/keys/k", 400, "invalid_json",
              {"body": b'{"value": ', "headers": JSON}),
    ErrorCase("nan in json", "POST", "/keys/k", 400, "invalid_json",
              {"body": b'{"value": NaN}', "headers": JSON}),
    ErrorCase("infinity in json", "POST", "/keys/k", 400, "invalid_json",
              {"body": b'{"value": -Infinity}', "headers": JSON}),
    ErrorCase("overflowing float", "POST", "/keys/k", 400, "invalid_json",
              {"body": b'{"value": 1e999}', "headers": JSON}),
    ErrorCase("int beyond 64 bits", "POST", "/keys/k", 400, "invalid_json",
              {"body": b'{"value": 36893488147419103232}', "headers": JSON}),
    ErrorCase("deeply nested json", "POST", "/keys/k", 400, "invalid_json",
              {"body": b'{"value": ' + b"[" * 100_000, "headers": JSON}),
    ErrorCase("body not utf8", "POST", "/keys/k", 400, "invalid_json",
              {"body": b'{"value": "\xff"}', "headers": JSON}),
    ErrorCase("body not an object", "POST", "/keys/k", 400, "invalid_json", {"json": [1]}),
    ErrorCase("empty body", "POST", "/keys/k", 400, "invalid_json", {"headers": JSON}),
    ErrorCase("missing value", "PUT", "/keys/k", 400, "missing_field", {"json": {}}),
    ErrorCase("unknown body field", "PUT", "/keys/k", 400, "invalid_field",
              _put(prev_idx=3)),
    ErrorCase("lone surrogate in value", "PUT", "/keys/k", 400, "invalid_field",
              {"body": b'{"value": "\\ud800"}', "headers": JSON}),
    ErrorCase("bad consistency", "GET", "/keys/k?consistency=eventual", 400, "invalid_field"),
    ErrorCase("repeated consistency", "GET", "/keys/k?consistency=stale&consistency=leader",
              400, "invalid_field"),
    ErrorCase("negative prev_index", "PUT", "/keys/k", 400, "invalid_field",
              _put(prev_index=-1)),
    ErrorCase("boolean prev_index", "PUT", "/keys/k", 400, "invalid_field",
              _put(prev_index=True)),
    ErrorCase("string prev_index", "PUT", "/keys/k", 400, "invalid_field",
              _put(prev_index="3")),
    ErrorCase("non-numeric prev_index query", "DELETE", "/keys/k?prev_index=abc", 400,
              "invalid_field"),
    ErrorCase("zero timeout", "GET", "/keys/k?timeout=0", 400, "invalid_field"),
    ErrorCase("timeout over 60s", "GET", "/keys/k?timeout=61", 400, "invalid_field"),
    ErrorCase("nan timeout", "PUT", "/keys/k?timeout=nan", 400, "invalid_field", _put()),
    ErrorCase("non-numeric timeout", "GET", "/keys?timeout=soon", 400, "invalid_field"),
    ErrorCase("key too long", "PUT", "/keys/" + "k" * (MAX_KEY_BYTES + 1), 400,
              "invalid_field", _put()),
    ErrorCase("multibyte key too long", "GET", "/keys/" + "é" * (MAX_KEY_BYTES // 2 + 1),
              400, "invalid_field"),
    ErrorCase("empty key", "GET", "/keys//", 400, "invalid_field"),
    ErrorCase("idempotency key too long", "PUT", "/keys/k", 400, "invalid_field",
              {"json": {"value": 1}, "headers": {"Idempotency-Key": "x" * 129}}),
    ErrorCase("bad redirect flag", "PUT", "/keys/k?redirect=perhaps", 400, "invalid_field",
              _put()),
    ErrorCase("list limit zero", "GET", "/keys?limit=0", 400, "invalid_field"),
    # More than int()'s 4,300 digits raised ValueError: a 500 (regression).
    ErrorCase("list limit of 5,000 digits", "GET", "/keys?limit=" + "9" * 5000, 400,
              "invalid_field"),
    ErrorCase("prev_index of 5,000 digits", "DELETE", "/keys/k?prev_index=" + "9" * 5000, 400,
              "invalid_field"),
    ErrorCase("watch index of 5,000 digits", "GET", "/keys/k?wait=true&index=" + "9" * 5000,
              400, "invalid_field"),
    ErrorCase("lease id of 4,301 digits", "GET", "/leases/" + "1" * 4301, 400, "invalid_field"),
    ErrorCase("lease keepalive of 4,301 digits", "POST", "/leases/" + "1" * 4301 + "/keepalive",
              400, "invalid_field"),
    ErrorCase("lease id in superscript digits", "DELETE", "/leases/%C2%B2", 400,
              "invalid_field"),
    ErrorCase("list limit too big", "GET", "/keys?limit=10001", 400, "invalid_field"),
    ErrorCase("batch without ops", "POST", "/batch", 400, "missing_field", {"json": {}}),
    ErrorCase("batch with no op", "POST", "/batch", 400, "invalid_field", {"json": {"ops": []}}),
    ErrorCase("batch with too many ops", "POST", "/batch", 400, "invalid_field",
              {"json": {"ops": [{"op": "delete", "key": "k"}] * 10_001}}),
    ErrorCase("batch op unknown", "POST", "/batch", 400, "invalid_field",
              {"json": {"ops": [{"op": "incr", "key": "k"}]}}),
    ErrorCase("batch put without value", "POST", "/batch", 400, "missing_field",
              {"json": {"ops": [{"op": "put", "key": "k"}]}}),
    ErrorCase("batch op not an object", "POST", "/batch", 400, "invalid_field",
              {"json": {"ops": ["put k 1"]}}),
    ErrorCase("batch key with a lone surrogate", "POST", "/batch", 400, "invalid_field",
              {"body": b'{"ops": [{"op": "delete", "key": "\\udc80"}]}', "headers": JSON}),
    ErrorCase("member id with a space", "DELETE", "/cluster/members/n%202", 400,
              "invalid_field"),
    ErrorCase("batch op key not a string", "POST", "/batch", 400, "invalid_field",
              {"json": {"ops": [{"op": "delete", "key": 7}]}}),
    ErrorCase("join without address", "POST", "/cluster/join", 400, "missing_field",
              {"json": {"id": "n4"}}),
    ErrorCase("join with bad address", "POST", "/cluster/join", 400, "invalid_field",
              {"json": {"id": "n4", "address": "nowhere"}}),
    # str.isdigit() is true of '\u00b2' (int() refused it: a 500) and of '\u09ed' (a
    # Bengali 7, which went on to the reachability probe); ports are ASCII digits.
    ErrorCase("join with a superscript port", "POST", "/cluster/join", 400, "invalid_field",
              {"json": {"id": "n4", "address": "h:\u00b2"}}),
    ErrorCase("join with a non-ASCII digit port", "POST", "/cluster/join", 400,
              "invalid_field", {"json": {"id": "n4", "address": "h:\u09ed"}}),
    ErrorCase("join with a space in the host", "POST", "/cluster/join", 400, "invalid_field",
              {"json": {"id": "n4", "address": "h h:7004"}}),
    ErrorCase("join with a control character in the host", "POST", "/cluster/join", 400,
              "invalid_field", {"json": {"id": "n4", "address": "h\u001b[31m:7004"}}),
    ErrorCase("join with port 0", "POST", "/cluster/join", 400, "invalid_field",
              {"json": {"id": "n4", "address": "h:0"}}),
    # A wildcard was recorded as the member's address: the others dialled themselves.
    ErrorCase("join with a wildcard IPv4 host", "POST", "/cluster/join", 400, "invalid_field",
              {"json": {"id": "n4", "address": "0.0.0.0:7004"}}),
    ErrorCase("join with a wildcard IPv6 host", "POST", "/cluster/join", 400, "invalid_field",
              {"json": {"id": "n4", "address": "[::]:7004"}}),
    ErrorCase("join with a port over 65535", "POST", "/cluster/join", 400, "invalid_field",
              {"json": {"id": "n4", "address": "h:65536"}}),
    ErrorCase("join with non-boolean voter", "POST", "/cluster/join", 400, "invalid_field",
              {"json": {"address": "h:7004", "voter": "yes"}}),
    ErrorCase("service rejects the request", "GET", "/keys/k", 400, "invalid_request",
              setup=_fail_with(InvalidRequestError("prefix scan disabled"))),
    # 404
    ErrorCase("missing key", "GET", "/keys/absent", 404, "key_not_found"),
    ErrorCase("unknown route", "GET", "/nowhere", 404, "not_found"),
    ErrorCase("unknown nested route", "GET", "/cluster/members", 404, "not_found"),
    # 405
    ErrorCase("patch a key", "PATCH", "/keys/k", 405, "method_not_allowed",
              headers={"allow": ""}),
    ErrorCase("post to status", "POST", "/status", 405, "method_not_allowed",
              headers={"allow": ""}),
    ErrorCase("delete the key list", "DELETE", "/keys/", 405, "method_not_allowed",
              headers={"allow": ""}),
    # 409
    ErrorCase("cas on a missing key", "PUT", "/keys/k", 409, "condition_failed",
              _put(prev_index=5), fields={"current_index": 0, "key": "k"}),
    ErrorCase("membership change refused", "POST", "/cluster/join", 409,
              "membership_change_rejected", {"json": {"id": "n1", "address": "h:7001"}}),
    ErrorCase("membership change refused by service", "DELETE", "/cluster/members/n2", 409,
              "membership_change_rejected",
              setup=_fail_with(MembershipChangeError("a change is in progress"))),
    # 413
    ErrorCase("big content-length", "PUT", "/keys/k", 413, "body_too_large",
              {"body": b'{"value": 1}',
               "headers": {**JSON, "Content-Length": str(DEFAULT_MAX_BODY_BYTES + 1)}}),
    ErrorCase("big body", "PUT", "/keys/k", 413, "body_too_large",
              {"body": b" " * (DEFAULT_MAX_BODY_BYTES + 1), "headers": JSON}),
    ErrorCase("value over the limit", "PUT", "/keys/k", 413, "value_too_large",
              _put("v" * MAX_VALUE_BYTES)),
    # 415
    ErrorCase("text body", "PUT", "/keys/k", 415, "unsupported_media_type",
              {"body": b'{"value": 1}', "headers": {"Content-Type": "text/plain"}}),
    ErrorCase("form-labelled body that is not JSON", "POST", "/batch", 400, "invalid_json",
              {"body": b"ops=1",
               "headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
    # 503
    ErrorCase("no leader", "PUT", "/keys/k", 503, "no_leader", _put(),
              setup=_fail_with(NoLeaderError("election in progress")),
              headers={"retry-after": "1"}),
    ErrorCase("not leader", "DELETE", "/keys/k", 503, "not_leader",
              setup=_fail_with(NotLeaderError("not the leader", leader="10.0.0.2:8000")),
              headers={"retry-after": "1"}, fields={"leader": "10.0.0.2:8000"}),
    ErrorCase("stopping", "GET", "/keys/k", 503, "unavailable",
              setup=_fail_with(UnavailableError("stopping")), headers={"retry-after": "1"}),
    ErrorCase("not ready", "GET", "/ready", 503, "not_ready", setup=_not_ready,
              headers={"retry-after": "1"}),
    # 504
    ErrorCase("commit timeout", "PUT", "/keys/k", 504, "commit_timeout", _put(),
              setup=_fail_with(OutcomeUnknownError("not committed in 5s")),
              fields={"outcome": "unknown"}),
    ErrorCase("batch commit timeout", "POST", "/batch", 504, "commit_timeout",
              {"json": {"ops": [{"op": "put", "key": "k", "value": 1}]}},
              setup=_fail_with(OutcomeUnknownError("not committed in 5s")),
              fields={"outcome": "unknown"}),
    ErrorCase("read timeout", "GET", "/keys/k", 504, "read_timeout",
              setup=_fail_with(ReadTimeoutError("no quorum in 5s"))),
    # 507
    ErrorCase("disk full", "PUT", "/keys/k", 507, "storage_full", _put(),
              setup=_fail_with(StorageFullError("map is full"))),
    # 500
    ErrorCase("unexpected exception", "GET", "/keys/k", 500, "internal_error",
              setup=_fail_with(RuntimeError("secret detail /etc/passwd")),
              fields={"message": "internal error"}),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.name for c in ERROR_CASES])
def test_every_error_renders_as_json_with_its_stable_code(
        case: ErrorCase, fake: FakeService, client: TestClient) -> None:
    case.setup(fake)

    result = client.simulate_request(case.method, case.path, **case.kwargs)

    body = assert_error(result, case.status, case.code)
    for name, value in case.headers.items():
        assert name in result.headers
        if value:
            assert result.headers[name] == value
    for name, value in case.fields.items():
        assert body[name] == value
    if "leader" not in case.fields:
        assert body["leader"] == LEADER


def test_every_service_error_has_a_row_in_the_error_table() -> None:
    for cls in ServiceError.__subclasses__():
        assert cls in ERROR_TABLE, cls
        assert ERROR_TABLE[cls].code == cls.code


def test_method_not_allowed_lists_the_allowed_methods(client: TestClient) -> None:
    result = client.simulate_patch("/keys/k")

    assert_error(result, 405, "method_not_allowed")
    allowed = {m.strip() for m in result.headers["allow"].split(",")}
    assert {"GET", "PUT", "POST", "DELETE"} <= allowed


def test_chunked_body_over_the_limit_is_refused_without_reading_it_all(
        fake: FakeService) -> None:
    client = TestClient(create_app(fake, max_body_bytes=100))
    stream = _CountingStream(b'{"value": "' + b"v" * 10_000 + b'"}')

    result = client.simulate_put("/keys/k", headers=JSON,
                                 extras={"wsgi.input": stream, "wsgi.input_terminated": True})

    assert_error(result, 413, "body_too_large")
    assert stream.read_bytes <= 101
    assert fake.calls_of("put") == []


def test_chunked_body_under_the_limit_is_accepted(fake: FakeService) -> None:
    client = TestClient(create_app(fake, max_body_bytes=100))
    stream = _CountingStream(b'{"value": "small"}')

    result = client.simulate_put("/keys/k", headers=JSON,
                                 extras={"wsgi.input": stream, "wsgi.input_terminated": True})

    assert result.status_code == 200
    assert result.json == {"value": "small", "index": 1}


class _CountingStream(io.BytesIO):
    """A wsgi.input that counts how much the app read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.read_bytes += len(chunk)
        return chunk


def test_unexpected_exception_is_logged_with_traceback_but_not_shown(
        fake: FakeService, client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    fake.fail_with = RuntimeError("secret detail")

    with caplog.at_level(logging.ERROR, logger="raftkv.http"):
        result = client.simulate_get("/keys/k")

    body = assert_error(result, 500, "internal_error")
    assert body["message"] == "internal error"
    assert "secret detail" not in result.text
    [record] = [r for r in caplog.records if r.name.startswith("raftkv.http")]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert "RuntimeError" in record.getMessage()


def test_successful_requests_log_nothing_at_info(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        client.simulate_put("/keys/k", json={"value": 1})
        client.simulate_get("/keys/k")
        client.simulate_get("/keys/absent")

    assert caplog.records == []


def test_error_renders_even_when_the_leader_hint_fails(fake: FakeService,
                                                      client: TestClient) -> None:
    def broken() -> str | None:
        raise RuntimeError("leader lookup failed")
    fake.leader_http_address = broken  # type: ignore[method-assign]

    body = assert_error(client.simulate_get("/keys/absent"), 404, "key_not_found")

    assert body["leader"] is None


def test_error_without_leader_known_has_null_leader(fake: FakeService,
                                                     client: TestClient) -> None:
    fake.leader_address = None

    body = assert_error(client.simulate_get("/keys/absent"), 404, "key_not_found")

    assert body["leader"] is None


# --------------------------------------------------------------------------- keys
JSON_VALUES = [None, True, False, 0, -7, (1 << 64) - 1, -(1 << 63), 1.5, -0.25, "",
               "héllo ☃ \"quoted\" \n", [], [1, "a", None, [True]], {},
               {"nested": {"list": [1.25, {"x": None}], "": "empty key"}}]


@pytest.mark.parametrize("value", JSON_VALUES, ids=[repr(v)[:30] for v in JSON_VALUES])
def test_values_of_every_json_type_round_trip(client: TestClient, value: Any) -> None:
    put = client.simulate_put("/keys/k", json={"value": value})
    got = client.simulate_get("/keys/k")

    assert put.status_code == 200
    assert put.json == {"value": value, "index": 1}
    assert got.status_code == 200
    assert got.json == {"value": value, "index": 1}
    assert type(got.json["value"]) is type(value)


def test_value_of_exactly_the_limit_is_accepted(client: TestClient) -> None:
    value = "v" * (MAX_VALUE_BYTES - 2)  # plus the two quotes

    result = client.simulate_put("/keys/k", json={"value": value})

    assert result.status_code == 200


def test_post_and_put_both_write(client: TestClient) -> None:
    assert client.simulate_post("/keys/a", json={"value": 1}).json == {"value": 1, "index": 1}
    assert client.simulate_put("/keys/b", json={"value": 2}).json == {"value": 2, "index": 2}


def test_json_media_types_with_parameters_are_accepted(client: TestClient) -> None:
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json",
                         "APPLICATION/JSON"):
        result = client.simulate_put("/keys/k", body=b'{"value": 1}',
                                     headers={"Content-Type": content_type})
        assert result.status_code == 200, content_type


def test_curl_default_form_content_type_is_read_as_json(client: TestClient) -> None:
    """`curl -XPOST .../keys/k -d '{"value": 1}'` (the demo's session) labels JSON as a form."""
    result = client.simulate_post(
        "/keys/curl", body=b'{"value": 1}',
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert result.status_code == 200
    assert result.json["value"] == 1


def test_body_without_content_type_is_read_as_json(client: TestClient) -> None:
    result = client.simulate_put("/keys/k", body=b'{"value": "x"}')

    assert result.status_code == 200


def test_keys_may_contain_slashes_and_escaped_characters(client: TestClient,
                                                         fake: FakeService) -> None:
    client.simulate_put("/keys/users/42/name", json={"value": "ada"})
    client.simulate_put("/keys/sp%20ace%3F%26", json={"value": 2})
    client.simulate_put("/keys/caf%C3%A9", json={"value": 3})

    assert client.simulate_get("/keys/users/42/name").json["value"] == "ada"
    assert [c.key for c in fake.calls_of("put")] == ["users/42/name", "sp ace?&", "café"]


def test_a_number_with_leading_zeros_is_that_number(client: TestClient,
                                                   fake: FakeService) -> None:
    for i in range(3):
        client.simulate_put(f"/keys/k{i}", json={"value": i})
    listed = client.simulate_get("/keys", query_string="limit=" + "0" * 5000 + "2")
    assert listed.status_code == 200, listed.text
    assert len(listed.json["keys"]) == 2


@pytest.mark.parametrize("path", ["/keys/k", "/keys/k/"])
def test_key_routes_accept_an_optional_trailing_slash(client: TestClient, path: str) -> None:
    assert client.simulate_post(path, json={"value": 1}).status_code == 200
    assert client.simulate_get(path).json == {"value": 1, "index": 1}
    assert client.simulate_delete(path).json == {"deleted": True, "index": 2}


@pytest.mark.parametrize("path", ["/keys", "/keys/", "/status", "/status/", "/health",
                                  "/health/", "/ready", "/ready/", "/cluster", "/cluster/"])
def test_collection_and_node_routes_accept_an_optional_trailing_slash(
        client: TestClient, path: str) -> None:
    assert client.simulate_get(path).status_code == 200


@pytest.mark.parametrize("path", ["/cluster/join", "/cluster/join/"])
def test_join_accepts_an_optional_trailing_slash(client: TestClient, path: str) -> None:
    result = client.simulate_post(path, json={"id": "n4", "address": "10.0.0.4:7000"})

    assert result.status_code == 200
    assert result.json == {"index": 1}


def test_get_passes_consistency_and_timeout_to_the_service(client: TestClient,
                                                           fake: FakeService) -> None:
    client.simulate_put("/keys/k", json={"value": 1})

    client.simulate_get("/keys/k")
    client.simulate_get("/keys/k", params={"consistency": "stale", "timeout": "0.5"})
    client.simulate_get("/keys/k", params={"consistency": "leader"})

    gets = fake.calls_of("get")
    assert [c.consistency for c in gets] == [Consistency.LINEARIZABLE, Consistency.STALE,
                                             Consistency.LEADER]
    assert [c.timeout_s for c in gets] == [5.0, 0.5, 5.0]


def test_default_timeout_comes_from_the_factory(fake: FakeService) -> None:
    client = TestClient(create_app(fake, default_timeout_s=2.5))

    client.simulate_put("/keys/k", json={"value": 1})

    assert fake.calls_of("put")[0].timeout_s == 2.5


def test_idempotency_key_is_passed_to_the_service_as_request_id(client: TestClient,
                                                                fake: FakeService) -> None:
    key = "6f1c0e2a-9d1b-4c3e-8a55-0e0f5b7d9a11"

    client.simulate_put("/keys/k", json={"value": 1}, headers={"Idempotency-Key": key})
    client.simulate_delete("/keys/k", headers={"Idempotency-Key": key + "-d"})
    client.simulate_post("/batch", json={"ops": [{"op": "put", "key": "b", "value": 2}]},
                         headers={"Idempotency-Key": key + "-b"})
    client.simulate_put("/keys/k", json={"value": 2})

    assert [c.request_id for c in fake.calls if c.op in ("put", "delete", "batch")] == [
        key, key + "-d", key + "-b", None]


def test_compare_and_swap_passes_prev_index(client: TestClient, fake: FakeService) -> None:
    first = client.simulate_put("/keys/k", json={"value": 1, "prev_index": 0})
    second = client.simulate_put("/keys/k", json={"value": 2, "prev_index": 1})
    stale = client.simulate_put("/keys/k", json={"value": 3, "prev_index": 1})

    assert first.json == {"value": 1, "index": 1}
    assert second.json == {"value": 2, "index": 2}
    assert assert_error(stale, 409, "condition_failed")["current_index"] == 2
    assert [c.prev_index for c in fake.calls_of("put")] == [0, 1, 1]


def test_delete_reports_whether_the_key_existed(client: TestClient) -> None:
    client.simulate_put("/keys/k", json={"value": 1})

    assert client.simulate_delete("/keys/k").json == {"deleted": True, "index": 2}
    assert client.simulate_delete("/keys/k").json == {"deleted": False, "index": 3}


def test_delete_with_prev_index_is_conditional(client: TestClient, fake: FakeService) -> None:
    client.simulate_put("/keys/k", json={"value": 1})

    refused = client.simulate_delete("/keys/k", params={"prev_index": "7"})
    done = client.simulate_delete("/keys/k", params={"prev_index": "1"})

    assert assert_error(refused, 409, "condition_failed")["current_index"] == 1
    assert done.json == {"deleted": True, "index": 2}


def test_list_filters_by_prefix_and_limit(client: TestClient, fake: FakeService) -> None:
    for key in ("a/1", "a/2", "a/3", "b/1"):
        client.simulate_put(f"/keys/{key}", json={"value": key})

    result = client.simulate_get("/keys", params={"prefix": "a/", "limit": "2",
                                                  "consistency": "stale"})

    assert result.json == {"keys": [{"key": "a/1", "value": "a/1", "index": 1},
                                    {"key": "a/2", "value": "a/2", "index": 2}]}
    assert fake.calls_of("list")[-1].consistency == Consistency.STALE


def test_list_defaults_to_all_keys_up_to_1000(client: TestClient) -> None:
    client.simulate_put("/keys/x", json={"value": 1})

    assert client.simulate_get("/keys/").json == {"keys": [{"key": "x", "value": 1,
                                                            "index": 1}]}


@pytest.mark.parametrize("path", ["/keys", "/keys/"])
def test_a_watch_on_the_list_is_refused_not_answered_at_once(
        client: TestClient, fake: FakeService, path: str) -> None:
    """`GET /keys/?wait=true` used to list the keys at once, which a client waiting for a
    change reads as one; `wait=false` stays a plain list."""
    assert_error(client.simulate_get(path, params={"wait": "true"}), 400, "invalid_field")
    assert fake.calls_of("list") == []
    assert client.simulate_get(path, params={"wait": "false"}).json == {"keys": []}


# --------------------------------------------------------------------------- batch
def test_batch_applies_puts_and_deletes_at_one_index(client: TestClient) -> None:
    client.simulate_put("/keys/gone", json={"value": 0})

    result = client.simulate_post("/batch", json={"ops": [
        {"op": "put", "key": "a", "value": {"n": 1}},
        {"op": "delete", "key": "gone"},
        {"op": "put", "key": "b", "value": None, "prev_index": 0},
    ]})

    assert result.status_code == 200
    assert result.json == {"index": 2, "results": [
        {"key": "a", "value": {"n": 1}, "index": 2},
        {"key": "gone", "deleted": True, "index": 2},
        {"key": "b", "value": None, "index": 2},
    ]}


def test_batch_with_a_failed_condition_applies_nothing(client: TestClient) -> None:
    result = client.simulate_post("/batch", json={"ops": [
        {"op": "put", "key": "a", "value": 1},
        {"op": "put", "key": "b", "value": 2, "prev_index": 9},
    ]})

    assert_error(result, 409, "condition_failed")
    assert_error(client.simulate_get("/keys/a"), 404, "key_not_found")


def test_batch_delete_may_not_carry_a_value(client: TestClient) -> None:
    result = client.simulate_post("/batch", json={"ops": [
        {"op": "delete", "key": "a", "value": 1}]})

    body = assert_error(result, 400, "invalid_field")
    assert "ops[0].value" in body["message"]


# --------------------------------------------------------------------------- redirect
def test_write_with_redirect_on_a_follower_answers_307_to_the_leader(
        client: TestClient, fake: FakeService) -> None:
    fake.leader = False

    result = client.simulate_put("/keys/users/caf%C3%A9",
                                 query_string="timeout=2&redirect=true&x=a%26b",
                                 json={"value": 1})

    assert result.status_code == 307
    assert result.headers["location"] == (
        f"http://{LEADER}/keys/users/caf%C3%A9?timeout=2&x=a%26b")
    assert fake.calls_of("put") == []


@pytest.mark.parametrize(("method", "path", "kwargs"), [
    ("DELETE", "/keys/k", {}),
    ("POST", "/batch", {"json": {"ops": [{"op": "delete", "key": "k"}]}}),
    ("POST", "/cluster/join/", {"json": {"address": "h:1"}}),
    ("DELETE", "/cluster/members/n2", {}),
])
def test_every_write_route_honours_redirect(client: TestClient, fake: FakeService,
                                            method: str, path: str,
                                            kwargs: dict[str, Any]) -> None:
    fake.leader = False

    result = client.simulate_request(method, path, params={"redirect": "true"}, **kwargs)

    assert result.status_code == 307
    assert result.headers["location"] == f"http://{LEADER}{path.rstrip('/')}"


def test_redirect_keeps_a_leader_address_that_is_already_a_url(
        client: TestClient, fake: FakeService) -> None:
    fake.leader, fake.leader_address = False, "https://leader.example:8443"

    result = client.simulate_delete("/keys/k", params={"redirect": "1"})

    assert result.headers["location"] == "https://leader.example:8443/keys/k"


def test_write_with_redirect_false_on_a_follower_is_applied(client: TestClient,
                                                            fake: FakeService) -> None:
    fake.leader = False

    result = client.simulate_put("/keys/k", params={"redirect": "false"}, json={"value": 1})

    assert result.status_code == 200


def test_write_with_redirect_on_the_leader_is_applied(client: TestClient,
                                                      fake: FakeService) -> None:
    result = client.simulate_put("/keys/k", params={"redirect": "true"}, json={"value": 1})

    assert result.status_code == 200
    assert len(fake.calls_of("put")) == 1


def test_write_with_redirect_and_no_known_leader_is_503(client: TestClient,
                                                        fake: FakeService) -> None:
    fake.leader, fake.leader_address = False, None

    result = client.simulate_put("/keys/k", params={"redirect": "true"}, json={"value": 1})

    assert_error(result, 503, "no_leader")
    assert result.headers["retry-after"] == "1"


def test_write_without_redirect_on_a_follower_goes_to_the_service(
        client: TestClient, fake: FakeService) -> None:
    fake.leader = False

    result = client.simulate_put("/keys/k", json={"value": 1})

    assert result.status_code == 200  # the service forwards it


# --------------------------------------------------------------------------- node and cluster
def test_health_is_ok(client: TestClient) -> None:
    assert client.simulate_get("/health").json == {"status": "ok"}


def test_ready_is_200_when_the_service_is_ready(client: TestClient) -> None:
    assert client.simulate_get("/ready").json == {"status": "ready"}


def test_not_ready_carries_the_reason(client: TestClient, fake: FakeService) -> None:
    fake.ready = Readiness(False, "no leader")

    assert assert_error(client.simulate_get("/ready"), 503, "not_ready")["message"] == (
        "no leader")


def test_status_is_the_node_status_as_json(client: TestClient) -> None:
    body = client.simulate_get("/status").json

    assert body["id"] == "n1"
    assert body["role"] == "leader"
    assert body["members"] == [{"id": "n1", "raft_address": "127.0.0.1:7001",
                                "http_address": LEADER, "voter": True, "leader": True}]
    assert body["extra"] == {"pending": 0}
    assert {"term", "commit_index", "applied_index", "last_index", "snapshot_index",
            "cluster_id", "leader"} <= set(body)


def test_cluster_lists_members_and_the_leader_id(client: TestClient) -> None:
    client.simulate_post("/cluster/join", json={"id": "n2", "address": "10.0.0.2:7000",
                                                "voter": False})

    body = client.simulate_get("/cluster").json

    assert body["leader"] == "n1"
    assert [(m["id"], m["voter"]) for m in body["members"]] == [("n1", True), ("n2", False)]


def test_join_with_an_address_alone_passes_no_id(client: TestClient,
                                                 fake: FakeService) -> None:
    result = client.simulate_post("/cluster/join/", json={"address": "10.0.0.9:7000"})

    assert result.json == {"index": 1}
    assert fake.calls_of("join")[0].key is None


def test_remove_member_returns_the_change_index(client: TestClient) -> None:
    client.simulate_post("/cluster/join", json={"id": "n2", "address": "10.0.0.2:7000"})

    result = client.simulate_delete("/cluster/members/n2", params={"timeout": "3"})

    assert result.json == {"index": 2}


def test_create_app_refuses_nonsense_limits(fake: FakeService) -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(fake, max_body_bytes=0)
    with pytest.raises(ValueError, match="default_timeout_s"):
        create_app(fake, default_timeout_s=0)


def test_json_out_is_compact(client: TestClient) -> None:
    result = client.simulate_put("/keys/k", json={"value": {"a": [1, 2]}})

    assert result.text == json.dumps({"value": {"a": [1, 2]}, "index": 1},
                                     separators=(",", ":"))


def test_leader_transfer_names_the_new_leader(client: TestClient, fake: FakeService) -> None:
    assert client.simulate_post("/cluster/join", json={"id": "n2", "address": "h:1"}).status_code \
        == 200
    before = client.simulate_get("/cluster").json["leader"]
    result = client.simulate_post("/cluster/leader")
    assert result.status_code == 200
    after = client.simulate_get("/cluster").json["leader"]
    assert result.json == {"leader": after} and after != before


def test_leader_transfer_to_a_named_node_that_cannot_lead_is_409(client: TestClient) -> None:
    result = client.simulate_post("/cluster/leader", json={"id": "nobody"})
    assert result.status_code == 409
    assert result.json["error"] == "membership_change_rejected"


@pytest.mark.parametrize("query", ["prefix=\xc3%a9", "prefix=\xc3%aa", "prefix=\xff%41"])
def test_a_raw_query_byte_that_is_not_ascii_is_refused(client: TestClient, fake: FakeService,
                                                       query: str) -> None:
    """Falcon decodes raw bytes and percent-escapes of one query differently: `\xc3%a9` and
    `\xc3%aa` both became the prefix 'Ã\ufffd'. A query is ASCII (RFC 3986)."""
    result = client.simulate_get("/keys", extras={"QUERY_STRING": query})
    assert_error(result, 400, "invalid_field")
    assert fake.calls == []
