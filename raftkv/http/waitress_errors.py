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

`create_server` is waitress.create_server with `JsonErrorChannel` on every listening socket.
"""

from __future__ import annotations

import json
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
    "DRAIN_LIMIT_BYTES",
    "ERROR_CODES",
    "HEADER_DRAIN_LIMIT_BYTES",
    "DrainingRequestParser",
    "JsonErrorChannel",
    "JsonErrorTask",
    "create_server",
    "error_body",
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


class JsonErrorChannel(HTTPChannel):  # type: ignore[misc]
    """waitress's HTTP channel with JSON errors and refused bodies drained; served by
    greenlets (raftkv.http.green), its output lock suspends a greenlet instead of blocking
    the loop thread (GreenCondition)."""

    error_task_class = JsonErrorTask
    parser_class = DrainingRequestParser

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any,
                 map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        dispatcher = server.task_dispatcher
        if isinstance(dispatcher, GreenDispatcher):
            self.outbuf_lock = GreenCondition(dispatcher)


def create_server(app: Any, **kwargs: Any) -> Any:
    """waitress.create_server(app, **kwargs), its connections served by JsonErrorChannel."""
    server = waitress.create_server(app, **kwargs)
    socket_map = kwargs.get("map")
    servers = [s for s in (socket_map or {}).values() if isinstance(s, BaseWSGIServer)]
    if isinstance(server, BaseWSGIServer):
        servers.append(server)
    for s in servers:
        s.channel_class = JsonErrorChannel
    return server
