"""The errors waitress answers itself, before the app runs, in the API's JSON error shape.

Waitress refuses some requests while parsing them: a malformed request line or header (400),
a Content-Length at or over its `max_request_body_size` or a chunked body that grows past it
(413), a request line plus headers over `max_request_header_size` (431), a transfer coding it
does not know (501), and its fallback 500 when the app itself fails. By default it answers
those in text/plain. Here they become the app's shape,
`{"error": "<stable_code>", "message": "...", "leader": null}` with the same status:

    400 malformed_request   413 body_too_large   431 headers_too_large
    501 not_implemented     500 internal_error

The app's own body limit (raftkv.http.app, far below waitress's) still answers every body
that waitress accepts; waitress's limit only bounds what it buffers before the app runs.

A refused body is read and dropped, not buffered: the answer goes out once the declared
Content-Length has been read (up to DRAIN_LIMIT_BYTES), or a chunked body's last chunk (past
the up to `max_request_body_size` bytes waitress held before it knew), and the connection is
closed. A server that closed while the client was still sending would make the kernel reset
the connection, and the client could lose the answer; likewise oversized headers are read to
their end (up to HEADER_DRAIN_LIMIT_BYTES more) before the 431. A client that sent
`Expect: 100-continue` gets the 413 at once, without `100 Continue`, and sends no body.

Slow clients (issue 14: 1,010 connections sending their request heads slowly made /health
time out until they closed) meet two limits here:

- A deadline for the request head (`head_timeout_s`): a new connection must deliver a whole
  request line and headers within it, and so must every later request once its first byte
  arrived. Past the deadline a connection that sent part of a head is answered 408
  `request_timeout` (JSON) and closed; one that sent nothing at all is closed without an
  answer (like nginx: a client that never spoke expects none). Checked once a second by the
  server's maintenance pass; an idle keep-alive connection between requests is waitress's
  `channel_timeout`, as before.
- A limit of open connections per client address (`max_connections_per_client`): past it a
  new connection is answered 503 `too_many_connections` (JSON, Retry-After: 1) and closed at
  once, so one address can never hold the server's `connection_limit` from the others.

`create_server` is waitress.create_server with `JsonErrorChannel` on every listening socket
and these limits set on every server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Final

import waitress
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask
from waitress.utilities import (
    BadRequest,
    Error,
    RequestEntityTooLarge,
    RequestHeaderFieldsTooLarge,
    ServerNotImplemented,
)

from raftkv.http.green import GreenCondition, GreenDispatcher

__all__ = [
    "DEFAULT_HEAD_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS_PER_CLIENT",
    "DRAIN_LIMIT_BYTES",
    "ERROR_CODES",
    "HEADER_DRAIN_LIMIT_BYTES",
    "DrainingRequestParser",
    "JsonErrorChannel",
    "JsonErrorTask",
    "create_server",
    "error_body",
    "raw_json_response",
]

DRAIN_LIMIT_BYTES: Final = 1 << 30
"""A refused body declared larger than this is not read: the 413 goes out at once."""
HEADER_DRAIN_LIMIT_BYTES: Final = 1 << 20
"""How much more of oversized headers is read, looking for their end, before the 431."""

ERROR_CODES: Final[dict[int, str]] = {
    400: "malformed_request",
    413: "body_too_large",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}
"""Status -> the stable code of the errors waitress answers itself."""


def error_body(error: Error, request: HTTPRequestParser) -> bytes:
    """The JSON body for one of waitress's own errors."""
    code = ERROR_CODES.get(error.code, "malformed_request" if error.code < 500
                           else "internal_error")
    if isinstance(error, RequestEntityTooLarge) and request.content_length > 0:
        message = f"the body is {request.content_length} bytes: over the server's limit"
    elif isinstance(error, RequestEntityTooLarge):
        message = "the chunked body grew over the server's limit"
    elif isinstance(error, RequestHeaderFieldsTooLarge):
        message = (f"the request line and headers are over the server's limit of "
                   f"{request.adj.max_request_header_size} bytes")
    elif isinstance(error, ServerNotImplemented):
        message = f"not implemented: {error.body}"
    elif isinstance(error, BadRequest):
        message = f"malformed request: {error.body}"
    else:
        message = "the server failed to answer this request"
    return json.dumps({"error": code, "message": message, "leader": None}).encode()


class JsonErrorTask(ErrorTask):  # type: ignore[misc]
    """waitress's ErrorTask with a JSON body; the connection closes after it, as there."""

    def execute(self) -> None:
        error = self.request.error
        body = error_body(error, self.request)
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class DrainingRequestParser(HTTPRequestParser):  # type: ignore[misc]
    """waitress's request parser that reads a refused body, or the rest of oversized
    headers, to its end (dropping it, holding none of it) before the request completes
    with its error (see the module doc)."""

    expect_continue: bool  # waitress's: the client sent "Expect: 100-continue"
    _drain_left = 0
    """Bytes of a refused body still to read and drop."""
    _header_tail: bytes | None = None
    """While reading oversized headers to their end: the last 3 bytes seen."""
    _header_drained = 0
    _chunks_drained = -1
    """While reading a refused chunked body to its last chunk: the bytes read (else -1)."""

    def received(self, data: bytes) -> int:
        if self._drain_left:
            n = min(len(data), self._drain_left)
            self._drain_left -= n
            if not self._drain_left:
                self.completed = True
            return n
        if self._header_tail is not None:
            return self._drain_headers(data)
        if self._chunks_drained >= 0:
            return self._drain_chunks(data)
        previous = self.header_plus
        consumed = int(super().received(data))
        error = self.error
        if isinstance(error, RequestEntityTooLarge) and self.content_length > 0:
            if self.expect_continue:
                self.expect_continue = False  # no 100 Continue: the client sends no body
            elif self.content_length <= DRAIN_LIMIT_BYTES:
                self.completed = False
                self._drain_left = self.content_length
        elif isinstance(error, RequestEntityTooLarge) and self.chunked and self.body_rcv:
            receiver = self.body_rcv
            if not (receiver.completed or receiver.error):
                receiver.buf.close()  # what waitress held of it: dropped now
                receiver.buf = _Discard()
                self.completed = False
                self._chunks_drained = 0
        elif isinstance(error, RequestHeaderFieldsTooLarge):
            seen = previous + data[:consumed]
            if b"\r\n\r\n" not in seen:
                self.completed = False
                self._header_tail = seen[-3:]
        return consumed

    def _drain_headers(self, data: bytes) -> int:
        assert self._header_tail is not None
        window = self._header_tail + data
        end = window.find(b"\r\n\r\n")
        if end >= 0:
            self._header_tail = None
            self.completed = True
            return max(0, end + 4 - (len(window) - len(data)))
        self._header_drained += len(data)
        self._header_tail = window[-3:]
        if self._header_drained > HEADER_DRAIN_LIMIT_BYTES:
            self._header_tail = None
            self.completed = True
        return len(data)


    def _drain_chunks(self, data: bytes) -> int:
        receiver = self.body_rcv
        consumed = int(receiver.received(data))
        self._chunks_drained += consumed
        if (receiver.completed or receiver.error
                or self._chunks_drained > DRAIN_LIMIT_BYTES):
            self._chunks_drained = -1
            self.completed = True
        return consumed


class _Discard:
    """A body buffer that keeps nothing (for waitress's ChunkedReceiver)."""

    def __init__(self) -> None:
        self._length = 0

    def append(self, data: bytes) -> None:
        self._length += len(data)

    def __len__(self) -> int:
        return self._length

    def close(self) -> None:
        pass


DEFAULT_HEAD_TIMEOUT_S: Final = 10.0
DEFAULT_MAX_CONNECTIONS_PER_CLIENT: Final = 128


def raw_json_response(status: int, reason: str, code: str, message: str,
                      extra_headers: str = "") -> bytes:
    """A whole HTTP/1.1 response with the API's JSON error body, closing the connection."""
    body = json.dumps({"error": code, "message": message, "leader": None}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra_headers}"
            "Server: raftkv\r\n\r\n")
    return head.encode("ascii") + body


class JsonErrorChannel(HTTPChannel):  # type: ignore[misc]
    """waitress's HTTP channel with JSON errors and refused bodies drained, a deadline for
    request heads and a limit of connections per client address (see the module doc). Served
    by greenlets (raftkv.http.green), its output lock suspends a greenlet instead of blocking
    the loop thread (GreenCondition)."""

    error_task_class = JsonErrorTask
    parser_class = DrainingRequestParser

    request: Any  # waitress's: the request being received (a DrainingRequestParser) or None
    head_started: float | None
    """When the request head being waited for began (the connection's opening for the
    first one, its first byte for later ones); None: no head is pending."""
    _client: str = ""
    _counted = False
    _spoke = False

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        dispatcher = server.task_dispatcher
        if isinstance(dispatcher, GreenDispatcher):
            self.outbuf_lock = GreenCondition(dispatcher)
        self.head_started = self.creation_time
        self._client = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
        counts: dict[str, int] | None = getattr(server, "raftkv_connections", None)
        limit = getattr(server, "raftkv_max_connections_per_client", 0)
        if counts is None:
            return
        if limit and counts.get(self._client, 0) >= limit:
            self.head_started = None
            self.answer_and_close(raw_json_response(
                503, "Service Unavailable", "too_many_connections",
                f"this client address has {limit} connections open already, the most a "
                "client may have: reuse them (keep-alive) or close some",
                "Retry-After: 1\r\n"))
            return
        counts[self._client] = counts.get(self._client, 0) + 1
        self._counted = True

    def received(self, data: bytes) -> bool:
        if data:
            self._spoke = True
            if self.request is None and self.head_started is None:
                self.head_started = time.time()  # the first byte of a new request
        result = bool(super().received(data))
        request = self.request
        if request is None or request.headers_finished:
            self.head_started = None
        elif self.head_started is None:
            self.head_started = time.time()
        return result

    def head_timed_out(self, head_timeout_s: float) -> None:
        """Maintenance: the head did not arrive in time (no request is being served)."""
        self.head_started = None
        self.request = None  # the partial head is dropped
        if not self._spoke:
            self.will_close = True  # it never said a word: nothing to answer
            return
        self.answer_and_close(raw_json_response(
            408, "Request Timeout", "request_timeout",
            f"the request line and headers did not arrive within {head_timeout_s:g} s"))

    def answer_and_close(self, response: bytes) -> None:
        """Queue `response` (the connection's last bytes) and close once it is sent."""
        with self.outbuf_lock:
            self.outbufs[-1].append(response)
            self.current_outbuf_count += len(response)
            self.total_outbufs_len += len(response)
        self.close_when_flushed = True

    def del_channel(self, map: Any = None) -> None:
        if self._counted:
            self._counted = False
            counts = self.server.raftkv_connections
            left = counts.get(self._client, 1) - 1
            if left > 0:
                counts[self._client] = left
            else:
                counts.pop(self._client, None)
        super().del_channel(map)


def _with_head_deadline(server: BaseWSGIServer, head_timeout_s: float
                        ) -> Callable[[float], None]:
    original = server.maintenance

    def maintenance(now: float) -> None:
        original(now)  # waitress's: idle connections past channel_timeout
        if head_timeout_s <= 0:
            return
        cutoff = now - head_timeout_s
        for channel in list(server.active_channels.values()):
            started = getattr(channel, "head_started", None)
            if (started is not None and started < cutoff and not channel.requests
                    and not channel.will_close and not channel.close_when_flushed):
                channel.head_timed_out(head_timeout_s)

    return maintenance


def create_server(app: Any, *, head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
                  max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                  **kwargs: Any) -> Any:
    """waitress.create_server(app, **kwargs), its connections served by JsonErrorChannel,
    with a deadline for request heads (0: none) and a limit of open connections per client
    address (0: none). The server's maintenance runs every second (cleanup_interval)."""
    if head_timeout_s < 0 or max_connections_per_client < 0:
        raise ValueError("head_timeout_s and max_connections_per_client must be >= 0")
    kwargs.setdefault("cleanup_interval", 1)
    server = waitress.create_server(app, **kwargs)
    socket_map = kwargs.get("map")
    servers = [s for s in (socket_map or {}).values() if isinstance(s, BaseWSGIServer)]
    if isinstance(server, BaseWSGIServer):
        servers.append(server)
    counts: dict[str, int] = {}  # shared by every listening socket of this server
    for s in servers:
        s.channel_class = JsonErrorChannel
        s.raftkv_connections = counts
        s.raftkv_max_connections_per_client = max_connections_per_client
        s.maintenance = _with_head_deadline(s, head_timeout_s)
    return server
