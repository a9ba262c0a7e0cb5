"""The Python client against the app served by waitress (raftkv.http.server) on loopback."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest

from raftkv.client import (
    BadRequest,
    Client,
    ClientError,
    ConditionFailed,
    KeyNotFound,
    OutcomeUnknown,
    StorageFull,
    Unavailable,
)
from raftkv.http import create_app, serve
from raftkv.service import (
    BatchOp,
    Consistency,
    DeleteResult,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    ReadTimeoutError,
    StorageFullError,
    WriteResult,
)
from tests.http.fake_service import FakeService

Serve = Callable[[FakeService], str]


@contextmanager
def running(service: FakeService, port: int = 0, *,
            max_body_bytes: int | None = None) -> Iterator[str]:
    app = (create_app(service) if max_body_bytes is None
           else create_app(service, max_body_bytes=max_body_bytes))
    handle = serve(app, "127.0.0.1", port, threads=4)
    thread = threading.Thread(target=handle.run, name=f"waitress-{handle.port}", daemon=True)
    thread.start()
    try:
        yield handle.url
    finally:
        handle.close()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture
def serve_fake() -> Iterator[Serve]:
    """Serve a fake on an ephemeral port until the test ends; returns its URL."""
    stack: list[AbstractContextManager[str]] = []

    def start(service: FakeService) -> str:
        server = running(service)
        stack.append(server)
        return server.__enter__()

    yield start
    for server in reversed(stack):
        server.__exit__(None, None, None)


@pytest.fixture
def fake() -> FakeService:
    return FakeService()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def kv(fake: FakeService, serve_fake: Serve, sleeps: list[float]) -> Iterator[Client]:
    with Client([serve_fake(fake)], timeout_s=2.0, retries=4, sleep=sleeps.append) as client:
        yield client


class RawServer:
    """A loopback TCP server that reads one request per connection, then writes the next of
    `answers` (the last repeats; None: write nothing) and closes the connection."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # the accept loop's chance to notice stop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                self.requests.append(self._read_request(connection))
                answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
                if answer is not None:
                    connection.sendall(answer)

    @staticmethod
    def _read_request(connection: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                while len(body) < int(value):
                    body += connection.recv(65536)
        return head


def http_answer(status: str, body: bytes, content_type: str = "application/json",
                close: bool = False) -> bytes:
    headers = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n")
    if close:
        headers += "Connection: close\r\n"
    return headers.encode() + b"\r\n" + body


NO_LEADER = http_answer("503 Service Unavailable",
                        b'{"error":"no_leader","message":"election","leader":null}')


def dead_url() -> str:
    """A loopback URL nothing listens on (bound, then closed: the port stays unused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def is_uuid4(text: str | None) -> bool:
    return text is not None and uuid.UUID(text).version == 4


# --------------------------------------------------------------------------- happy paths
def test_put_get_delete_round_trip(kv: Client) -> None:
    written = kv.put("k", {"n": [1, 2.5, None, "é"]})
    read = kv.get("k")
    deleted = kv.delete("k")

    assert written == WriteResult({"n": [1, 2.5, None, "é"]}, 1)
    assert read.value == {"n": [1, 2.5, None, "é"]}
    assert read.index == 1
    assert deleted == DeleteResult(True, 2)
    with pytest.raises(KeyNotFound):
        kv.get("k")


def test_keys_with_slashes_and_reserved_characters_round_trip(kv: Client,
                                                              fake: FakeService) -> None:
    key = "users/42/ça va?&x=1#frag%20"

    kv.put(key, "v")

    assert kv.get(key).value == "v"
    assert fake.calls_of("put")[0].key == key
    assert [item.key for item in kv.list(prefix="users/")] == [key]


def test_consistency_and_timeout_reach_the_service(kv: Client, fake: FakeService) -> None:
    kv.put("k", 1)

    kv.get("k", consistency="stale")

    assert fake.calls_of("get")[0].consistency == Consistency.STALE
    assert fake.calls_of("get")[0].timeout_s == 2.0
    assert fake.calls_of("put")[0].timeout_s == 2.0


def test_compare_and_swap_raises_condition_failed_with_the_current_index(kv: Client) -> None:
    kv.put("k", 1, prev_index=0)

    with pytest.raises(ConditionFailed) as caught:
        kv.put("k", 2, prev_index=0)

    assert caught.value.current_index == 1
    assert caught.value.status == 409
    assert kv.delete("k", prev_index=1).deleted


def test_batch_returns_one_result_per_op(kv: Client) -> None:
    kv.put("old", 0)

    result = kv.batch([BatchOp("put", "a", [1]), BatchOp("delete", "old"),
                       BatchOp("put", "b/", None, prev_index=0)])

    assert result.index == 2
    assert result.results == (WriteResult([1], 2), DeleteResult(True, 2), WriteResult(None, 2))
    assert [k.key for k in kv.list()] == ["a", "b/"]


def test_list_honours_prefix_and_limit(kv: Client) -> None:
    for key in ("a1", "a2", "a3", "b1"):
        kv.put(key, key)

    assert [k.key for k in kv.list("a", limit=2)] == ["a1", "a2"]


def test_status_members_join_and_remove(kv: Client) -> None:
    index = kv.join("n2", "10.0.0.2:7000", voter=False)
    status = kv.status()
    members = kv.members()
    removed = kv.remove("n2")

    assert index == 1
    assert status.id == "n1"
    assert status.role == "leader"
    assert status.extra == {"pending": 0}
    assert [m.id for m in members] == ["n1", "n2"]
    assert members[1].voter is False
    assert removed == 2


def test_status_of_a_named_node(kv: Client, serve_fake: Serve) -> None:
    other = FakeService(node_id="n9", leader=False)
    url = serve_fake(other)

    assert kv.status(url).id == "n9"
    assert kv.status().id == "n1"


# --------------------------------------------------------------------------- typed errors
def test_key_too_long_raises_bad_request(kv: Client) -> None:
    with pytest.raises(BadRequest) as caught:
        kv.put("k" * 1025, 1)

    assert caught.value.status == 400
    assert caught.value.code == "invalid_field"


def test_key_ending_with_a_slash_is_refused_before_sending(kv: Client,
                                                           fake: FakeService) -> None:
    with pytest.raises(BadRequest) as caught:
        kv.get("dir/")

    assert caught.value.code == "invalid_key"
    assert fake.calls == []


def test_storage_full_raises_storage_full_without_retrying(kv: Client,
                                                           fake: FakeService) -> None:
    fake.fail_with = StorageFullError("map full")

    with pytest.raises(StorageFull) as caught:
        kv.put("k", 1)

    assert caught.value.status == 507
    assert len(fake.calls_of("put")) == 1


def test_membership_conflict_raises_a_client_error_with_the_code(kv: Client) -> None:
    with pytest.raises(ClientError) as caught:
        kv.join("n1", "10.0.0.1:7000")

    assert caught.value.status == 409
    assert caught.value.code == "membership_change_rejected"


# --------------------------------------------------------------------------- retries
def test_write_after_a_503_is_retried_with_the_same_idempotency_key(
        kv: Client, fake: FakeService, sleeps: list[float]) -> None:
    fake.fail_next.append(NoLeaderError("election in progress"))

    result = kv.put("k", "v")

    attempts = fake.calls_of("put")
    assert result == WriteResult("v", 1)
    assert len(attempts) == 2
    assert attempts[0].request_id == attempts[1].request_id
    assert is_uuid4(attempts[0].request_id)
    assert len(sleeps) == 1


def test_each_call_gets_its_own_idempotency_key(kv: Client, fake: FakeService) -> None:
    kv.put("a", 1)
    kv.put("a", 1)
    kv.delete("a")
    kv.batch([BatchOp("put", "b", 2)])

    ids = [c.request_id for c in fake.calls]
    assert len(set(ids)) == 4
    assert all(is_uuid4(i) for i in ids)


def test_write_with_unknown_outcome_is_retried_and_applied_once(
        kv: Client, fake: FakeService) -> None:
    fake.fail_next.append(OutcomeUnknownError("commit not seen in time"))

    result = kv.batch([BatchOp("put", "a", 1)])

    attempts = fake.calls_of("batch")
    assert result.index == 1
    assert len(attempts) == 2
    assert attempts[0].request_id == attempts[1].request_id


def test_persistent_unknown_outcome_gives_up_with_outcome_unknown(
        kv: Client, fake: FakeService, sleeps: list[float]) -> None:
    fake.fail_with = OutcomeUnknownError("commit not seen in time")

    with pytest.raises(OutcomeUnknown) as caught:
        kv.put("k", 1)

    attempts = fake.calls_of("put")
    assert caught.value.status == 504
    assert len(attempts) == kv.retries + 1
    assert len({a.request_id for a in attempts}) == 1
    assert len(sleeps) == kv.retries
    assert all(0 < s <= kv.backoff_max_s for s in sleeps)


def test_persistent_503_gives_up_with_unavailable(kv: Client, fake: FakeService) -> None:
    fake.fail_with = NoLeaderError("no quorum")

    with pytest.raises(Unavailable) as caught:
        kv.get("k")

    assert caught.value.status == 503
    assert caught.value.code == "no_leader"
    assert len(fake.calls_of("get")) == kv.retries + 1


def test_read_timeout_is_retried(kv: Client, fake: FakeService) -> None:
    kv.put("k", 1)
    fake.fail_next.append(ReadTimeoutError("no quorum in time"))

    assert kv.get("k").value == 1
    assert len(fake.calls_of("get")) == 2


def test_join_is_not_resent_after_an_unknown_outcome(kv: Client, fake: FakeService) -> None:
    fake.fail_next.append(OutcomeUnknownError("change not committed in time"))

    with pytest.raises(OutcomeUnknown):
        kv.join("n5", "10.0.0.5:7000")

    assert len(fake.calls_of("join")) == 1


def test_retry_budget_bounds_the_total_time(fake: FakeService, serve_fake: Serve) -> None:
    fake.fail_with = NoLeaderError("no quorum")
    sleeps: list[float] = []
    client = Client([serve_fake(fake)], retries=100, retry_budget_s=0.0, sleep=sleeps.append)

    with pytest.raises(Unavailable):
        client.get("k")

    assert len(fake.calls_of("get")) == 1
    assert sleeps == []
    client.close()


# --------------------------------------------------------------------------- nodes
def test_connection_refused_moves_on_to_the_next_node(fake: FakeService,
                                                      serve_fake: Serve) -> None:
    live = serve_fake(fake)

    with Client([dead_url(), live], sleep=lambda s: None) as client:
        assert client.put("k", 1).index == 1
        assert client.preferred_url == live


def test_no_reachable_node_raises_unavailable_after_bounded_attempts() -> None:
    sleeps: list[float] = []

    with Client([dead_url()], retries=3, sleep=sleeps.append) as client, \
            pytest.raises(Unavailable) as caught:
        client.get("k")

    assert caught.value.code == "connection_failed"
    assert caught.value.status == 0
    assert len(sleeps) == 3


def test_follows_the_leader_hint_to_a_node_it_was_not_given(serve_fake: Serve) -> None:
    leader = FakeService(node_id="n2")
    leader_url = serve_fake(leader)
    follower = FakeService(node_id="n1", leader=False)
    follower.fail_with = NotLeaderError("not the leader",
                                        leader=leader_url.removeprefix("http://"))
    sleeps: list[float] = []

    with Client([serve_fake(follower)], sleep=sleeps.append) as client:
        written = client.put("k", "v")
        read = client.get("k")

        assert written.index == 1
        assert read.value == "v"
        assert client.preferred_url == leader_url
        assert leader_url in client.urls
    [refused] = follower.calls_of("put")
    [applied] = leader.calls_of("put")
    assert refused.request_id == applied.request_id
    assert follower.calls_of("get") == []  # the client went straight to the leader
    assert sleeps == []  # a fresh hint is followed at once


def test_503_with_a_leader_hint_on_a_known_node_prefers_it(serve_fake: Serve) -> None:
    first = FakeService(node_id="n1", leader=False)
    second = FakeService(node_id="n2")
    first_url, second_url = serve_fake(first), serve_fake(second)
    first.fail_with = NoLeaderError("forwarding failed",
                                    leader=second_url.removeprefix("http://"))

    with Client([first_url, second_url]) as client:
        client.put("k", 1)
        client.put("k", 2)

    assert len(first.calls_of("put")) == 1
    assert len(second.calls_of("put")) == 2


def test_reconnects_after_the_server_restarts_on_the_same_port(fake: FakeService) -> None:
    with running(fake) as url:
        client = Client([url], sleep=lambda s: None)
        client.put("k", 1)
    port = int(url.rsplit(":", 1)[1])

    with running(fake, port) as again:
        assert again == url
        assert client.get("k").value == 1  # the old keep-alive connection is dead
    client.close()


def test_clone_shares_settings_not_connections(kv: Client, fake: FakeService) -> None:
    clone = kv.clone()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(20):
                clone.put(f"t{i}", i)
        except Exception as ex:  # reported to the main thread below
            errors.append(ex)

    thread = threading.Thread(target=write)
    thread.start()
    for i in range(20):
        kv.put(f"m{i}", i)
    thread.join(timeout=30)
    clone.close()

    assert errors == []
    assert clone.urls == kv.urls
    assert clone.timeout_s == kv.timeout_s
    assert len(fake.calls_of("put")) == 40


def test_client_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        Client([])
    with pytest.raises(ValueError):
        Client(["ftp://x:1"])
    with pytest.raises(ValueError):
        Client(["127.0.0.1:1"], timeout_s=0)


# --------------------------------------------------------------------------- no answer
def test_write_without_any_answer_gives_up_with_outcome_unknown() -> None:
    with RawServer([None]) as server, Client([server.url], retries=2,
                                             sleep=lambda s: None) as client, \
            pytest.raises(OutcomeUnknown) as caught:
        client.put("k", 1)

    assert caught.value.code == "no_answer"
    assert len(server.requests) == 3
    keys = {line for r in server.requests for line in r.split(b"\r\n")
            if line.lower().startswith(b"idempotency-key:")}
    assert len(keys) == 1


def test_read_without_any_answer_gives_up_with_unavailable() -> None:
    with RawServer([None]) as server, Client([server.url], retries=1,
                                             sleep=lambda s: None) as client, \
            pytest.raises(Unavailable) as caught:
        client.get("k")

    assert caught.value.code == "no_answer"
    assert len(server.requests) == 2


def test_write_that_may_have_applied_and_then_saw_503s_is_outcome_unknown() -> None:
    with RawServer([None, NO_LEADER]) as server, Client(
            [server.url], retries=2, sleep=lambda s: None) as client, \
            pytest.raises(OutcomeUnknown) as caught:
        client.delete("k")

    assert caught.value.code == "outcome_unknown"
    assert len(server.requests) == 3


def test_membership_change_without_an_answer_is_not_resent() -> None:
    with RawServer([None]) as server, Client([server.url], sleep=lambda s: None) as client, \
            pytest.raises(OutcomeUnknown):
        client.remove("n3")

    assert len(server.requests) == 1


def test_non_json_error_page_raises_a_client_error_with_the_status() -> None:
    page = http_answer("502 Bad Gateway", b"<html>bad gateway</html>", "text/html")

    with RawServer([page]) as server, Client([server.url]) as client, \
            pytest.raises(ClientError) as caught:
        client.get("k")

    assert caught.value.status == 502
    assert caught.value.code == "http_502"
    assert len(server.requests) == 1


def test_non_json_success_is_a_bad_response() -> None:
    with RawServer([http_answer("200 OK", b"ok", "text/plain")]) as server, \
            Client([server.url]) as client, pytest.raises(ClientError) as caught:
        client.get("k")

    assert caught.value.code == "bad_response"


def test_connection_close_answers_are_followed_by_a_fresh_connection() -> None:
    answer = http_answer("200 OK", b'{"value":1,"index":4}', close=True)

    with RawServer([answer]) as server, Client([server.url]) as client:
        first = client.get("k")
        second = client.get("k")

    assert first.index == second.index == 4
    assert len(server.requests) == 2


# --------------------------------------------------------------------------- the server
def test_oversized_chunked_body_is_refused_with_json(fake: FakeService) -> None:
    with running(fake, max_body_bytes=1000) as url:
        port = int(url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        chunks = iter([b'{"value": "', b"v" * 5000, b'"}'])
        connection.request("PUT", "/keys/k", body=chunks, encode_chunked=True,
                           headers={"Content-Type": "application/json",
                                    "Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        body = json.loads(response.read())
        connection.close()

    assert response.status == 413
    assert body["error"] == "body_too_large"
    assert fake.calls_of("put") == []


def test_serve_keeps_waitress_queue_warnings_out_of_the_logs(fake: FakeService) -> None:
    handle = serve(create_app(fake), "127.0.0.1", 0)
    handle.close()

    assert logging.getLogger("waitress.queue").level == logging.ERROR


def test_close_before_run_and_twice_is_safe(fake: FakeService) -> None:
    handle = serve(create_app(fake), "127.0.0.1", 0)

    handle.close()
    handle.close()
    handle.run()  # returns at once: already closed

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", handle.port), timeout=1).close()
