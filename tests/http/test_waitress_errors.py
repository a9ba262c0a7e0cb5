"""raftkv.http.waitress_errors, over real sockets: the errors waitress answers itself come in
the API's JSON shape, a refused body is read and dropped (never buffered), the app's own
body limit still answers every body that waitress lets through, and slow or greedy clients
meet the request-head deadline and the per-address connection limit."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from waitress.buffers import OverflowableBuffer

from raftkv.http import create_app, serve
from raftkv.http.app import DEFAULT_MAX_BODY_BYTES
from raftkv.http.server import DEFAULT_MAX_REQUEST_BODY_BYTES, ServerHandle
from raftkv.http.waitress_errors import ERROR_CODES
from raftkv.localcluster import wait_until
from tests.http.fake_service import FakeService

MIB = 1 << 20
CHUNK = b"x" * MIB
TIMEOUT_S = 30.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after the answer

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture
def fake() -> FakeService:
    return FakeService()


@pytest.fixture
def server(fake: FakeService) -> Iterator[ServerHandle]:
    handle = serve(create_app(fake), "127.0.0.1", 0, threads=2)
    t = threading.Thread(target=handle.run, daemon=True)
    t.start()
    try:
        yield handle
    finally:
        handle.close()
        t.join(10)


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP response: by its Content-Length, then whether the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"the connection closed before an answer: {data!r}"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        more = sock.recv(65536)
        assert more, "the connection closed inside the body"
        rest += more
    sock.settimeout(0.5)  # an answer that closes is followed by EOF at once
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    return Answer(status, headers, rest[:length], closed)


def exchange(server: ServerHandle, head: bytes, body_bytes: int = 0,
             body: bytes | None = None) -> Answer:
    """Send the head and then the WHOLE body (body, or body_bytes of filler in 1 MiB
    pieces, never held at once), then read the answer: as a client that does not look at
    the answer before it has sent its request."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(head)
        if body is not None:
            sock.sendall(body)
        left = body_bytes
        while left:
            piece = CHUNK[:min(left, MIB)]
            sock.sendall(piece)
            left -= len(piece)
        return read_answer(sock)


def put_head(length: int, *extra: str) -> bytes:
    lines = ["PUT /keys/k HTTP/1.1", "Host: test", "Content-Type: application/json",
             f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_json_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body = answer.json()
    assert set(body) == {"error", "message", "leader"}, body
    assert body["error"] == code and body["leader"] is None and body["message"], body
    return dict(body)


# --------------------------------------------------------------------------- bodies


def test_a_body_of_exactly_the_apps_limit_is_accepted(
        server: ServerHandle, fake: FakeService) -> None:
    doc = json.dumps({"value": "v" * 1000}).encode()
    body = doc[:-1] + b" " * (DEFAULT_MAX_BODY_BYTES - len(doc)) + b"}"
    assert len(body) == DEFAULT_MAX_BODY_BYTES
    answer = exchange(server, put_head(len(body)), body=body)
    assert answer.status == 200, answer
    assert answer.json()["value"] == "v" * 1000
    assert len(fake.calls_of("put")) == 1


def test_one_byte_over_the_apps_limit_is_the_apps_json_413(
        server: ServerHandle, fake: FakeService) -> None:
    answer = exchange(server, put_head(DEFAULT_MAX_BODY_BYTES + 1),
                      body_bytes=DEFAULT_MAX_BODY_BYTES + 1)
    body = assert_json_error(answer, 413, "body_too_large")
    assert str(DEFAULT_MAX_BODY_BYTES) in body["message"]  # the app's limit answered
    assert fake.calls_of("put") == []


@pytest.mark.parametrize("size", [DEFAULT_MAX_REQUEST_BODY_BYTES,
                                  DEFAULT_MAX_REQUEST_BODY_BYTES + 1, 64 * MIB],
                         ids=["8MiB", "8MiB+1", "64MiB"])
def test_a_body_over_waitress_limit_sent_whole_gets_the_json_413_and_is_not_buffered(
        server: ServerHandle, fake: FakeService, monkeypatch: pytest.MonkeyPatch,
        size: int) -> None:
    buffered = [0]
    append = OverflowableBuffer.append

    def counting_append(self: OverflowableBuffer, s: bytes) -> None:
        buffered[0] += len(s)
        append(self, s)

    monkeypatch.setattr(OverflowableBuffer, "append", counting_append)
    answer = exchange(server, put_head(size), body_bytes=size)
    body = assert_json_error(answer, 413, "body_too_large")
    assert str(size) in body["message"]
    assert answer.closed
    assert buffered[0] < MIB, f"the server buffered {buffered[0]} bytes of a refused body"
    assert fake.calls_of("put") == []


def test_a_client_that_expects_100_continue_gets_the_413_at_once_and_sends_nothing(
        server: ServerHandle) -> None:
    answer = exchange(server, put_head(64 * MIB, "Expect: 100-continue"))
    assert_json_error(answer, 413, "body_too_large")  # not "100 Continue" first


def test_a_chunked_body_over_waitress_limit_sent_whole_gets_the_json_413(
        server: ServerHandle, fake: FakeService) -> None:
    head = (b"PUT /keys/k HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n" % MIB + CHUNK + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(head)
        for _ in range(2 * DEFAULT_MAX_REQUEST_BODY_BYTES // MIB):
            sock.sendall(piece)
        sock.sendall(b"0\r\n\r\n")
        answer = read_answer(sock)
    assert_json_error(answer, 413, "body_too_large")
    assert answer.closed
    assert fake.calls_of("put") == []


# --------------------------------------------------------------------------- malformed requests


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET /status HTTP/1.1 extra words\r\nHost: test\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: test\r\nNo colon in this header\r\n\r\n",
    b"PUT /keys/k HTTP/1.1\r\nHost: test\r\nContent-Length: twelve\r\n\r\n",
    b"PUT /keys/k HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n",
], ids=["request-line", "request-line-words", "header", "content-length", "chunk-size"])
def test_a_malformed_request_is_a_json_400(server: ServerHandle, request_bytes: bytes) -> None:
    answer = exchange(server, request_bytes)
    assert_json_error(answer, 400, "malformed_request")
    assert answer.closed


def test_oversized_headers_are_a_json_431(server: ServerHandle) -> None:
    head = (b"GET /status HTTP/1.1\r\nHost: test\r\n"
            + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(300))
            + b"\r\n")
    assert len(head) > 300_000  # waitress's max_request_header_size is 256 KiB
    answer = exchange(server, head)
    assert_json_error(answer, 431, "headers_too_large")
    assert answer.closed


def test_an_unknown_transfer_coding_is_a_json_501(server: ServerHandle) -> None:
    answer = exchange(server, b"PUT /keys/k HTTP/1.1\r\nHost: test\r\n"
                              b"Transfer-Encoding: gzip\r\n\r\n")
    assert_json_error(answer, 501, "not_implemented")


def test_the_connection_still_serves_after_an_apps_error(server: ServerHandle) -> None:
    """Errors that the app answers keep the connection open (only waitress's close it)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: test\r\n\r\n")
        first = read_answer(sock)
        assert first.status == 404 and not first.closed
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_answer(sock).status == 200


def test_every_code_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for status, code in ERROR_CODES.items():
        assert f"{status} `{code}`" in readme, (status, code)


# --------------------------------------------------------------------------- slow clients
SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: "  # never finished


@contextmanager
def limited_server(fake: FakeService, **limits: Any) -> Iterator[ServerHandle]:
    handle = serve(create_app(fake), "127.0.0.1", 0, threads=4, **limits)
    t = threading.Thread(target=handle.run, daemon=True)
    t.start()
    try:
        yield handle
    finally:
        handle.close()
        t.join(10)


def health_from(address: str, server: ServerHandle, timeout_s: float) -> float:
    """GET /health from a client bound to `address`; the seconds it took (asserting 200)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s,
                                  source_address=(address, 0)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer = read_answer(sock)
    assert answer.status == 200 and answer.json() == {"status": "ok"}, answer
    return time.monotonic() - started


def test_a_request_head_that_does_not_arrive_in_time_is_a_json_408_and_closed(
        fake: FakeService) -> None:
    with limited_server(fake, head_timeout_s=1) as server:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(SLOW_HEAD)
            answer = read_answer(sock)
        waited = time.monotonic() - started
    body = assert_json_error(answer, 408, "request_timeout")
    assert "within 1 s" in body["message"]
    assert answer.closed
    assert 1 <= waited < 4  # the deadline, checked once a second
    assert fake.calls == []


def test_a_connection_that_never_sends_anything_is_closed_without_an_answer(
        fake: FakeService) -> None:
    with limited_server(fake, head_timeout_s=1) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert sock.recv(100) == b""  # closed, nothing said (within the 10 s timeout)


def test_an_idle_keep_alive_connection_is_not_cut_by_the_head_deadline(
        fake: FakeService) -> None:
    """Between requests a connection is idle, not slow: channel_timeout governs it."""
    with limited_server(fake, head_timeout_s=1) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_answer(sock).status == 200
        sock.settimeout(2.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # still open after more than two head deadlines
        sock.settimeout(10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_answer(sock).status == 200


def test_connections_past_the_per_client_limit_are_a_json_503_and_closed(
        fake: FakeService) -> None:
    with limited_server(fake, max_connections_per_client=5) as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
                for _ in range(5)]
        try:
            for sock in held:
                sock.sendall(SLOW_HEAD)
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
                answer = read_answer(extra)
            body = assert_json_error(answer, 503, "too_many_connections")
            assert "5 connections" in body["message"] and answer.headers["retry-after"] == "1"
            assert answer.closed
            assert health_from("127.0.0.2", server, 10) < 5  # another address is served
        finally:
            for sock in held:
                sock.close()
        # The count goes down as they close: the address is served again.
        wait_until(lambda: _health_ok(server), 10, "a new connection to be served")


def _health_ok(server: ServerHandle) -> bool:
    try:
        return health_from("127.0.0.1", server, 5) < 5
    except AssertionError:
        return False


def test_a_thousand_slow_heads_from_one_address_do_not_hold_the_port_from_others(
        fake: FakeService) -> None:
    """The probe: 1,010 connections sending their request heads slowly made /health time
    out until they closed. With the default limits (128 connections per client address, a
    10 s head deadline) /health from another address answers at once all along."""
    with limited_server(fake) as server:
        slow: list[socket.socket] = []
        try:
            for _ in range(1010):
                sock = socket.socket()
                sock.settimeout(10)
                sock.connect(("127.0.0.1", server.port))
                sock.sendall(SLOW_HEAD)
                slow.append(sock)
            took = [health_from("127.0.0.2", server, 10) for _ in range(20)]
            assert max(took) < 2.0, took
            open_ones = 0
            for sock in slow:
                sock.settimeout(0.01)
                try:
                    if sock.recv(4096):
                        continue  # the 503 too_many_connections
                except TimeoutError:
                    open_ones += 1
                except OSError:
                    pass
            assert open_ones <= 128
        finally:
            for sock in slow:
                sock.close()


# --------------------------------------------------------------------------- bytes of a path


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/keys/fz/%ff"), ("PUT", "/keys/fz/%fe"), ("PUT", "/keys/fz/%c0%80"),
    ("PUT", "/keys/fz/%ed%a0%80"), ("GET", "/keys?prefix=fz/%ff"),
    ("GET", "/keys/k?consistency=%ff")])
def test_percent_encoded_bytes_that_are_not_utf8_are_a_json_400_and_touch_nothing(
        server: ServerHandle, fake: FakeService, method: str, path: str) -> None:
    """Regression: Falcon decoded them with errors='replace', so /keys/fz/%ff and
    /keys/fz/%fe both named the key 'fz/\\ufffd' and one write overwrote the other."""
    body = b'{"value": 1}' if method == "PUT" else b""
    answer = exchange(server, (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: "
                               f"application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                               ).encode(), body=body)
    assert_json_error(answer, 400, "invalid_field")
    assert fake.calls == []


def test_a_percent_encoded_utf8_key_is_still_that_key(server: ServerHandle,
                                                     fake: FakeService) -> None:
    body = b'{"value": 1}'
    answer = exchange(server, (f"PUT /keys/caf%C3%A9/%E2%82%AC HTTP/1.1\r\nHost: test\r\n"
                               f"Content-Type: application/json\r\nContent-Length: {len(body)}"
                               "\r\n\r\n").encode(), body=body)
    assert answer.status == 200, answer
    assert [c.key for c in fake.calls_of("put")] == ["café/€"]



def test_a_query_with_raw_bytes_that_are_not_ascii_is_a_json_400(
        server: ServerHandle, fake: FakeService) -> None:
    """Waitress refuses the request line itself; the app refuses such a query too, from any
    server (test_app: a raw non-ASCII query)."""
    answer = exchange(server, b"GET /keys?prefix=\xc3%a9 HTTP/1.1\r\nHost: test\r\n\r\n")
    assert_json_error(answer, 400, "malformed_request")
    assert fake.calls == []
