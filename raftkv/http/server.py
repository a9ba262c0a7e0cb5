"""Serve a WSGI app with waitress, tuned for many small keep-alive requests.

`serve(app, host, port)` binds and listens at once (port 0 picks a free port, see `.port`);
`.run()` blocks in the calling thread until `.close()` is called from any thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

from waitress import trigger, wasyncore

from raftkv.http.waitress_errors import (
    DEFAULT_HEAD_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    create_server,
)

__all__ = ["ServerHandle", "serve"]

_log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES: Final = 8 << 20
"""Waitress's own bound. Keep it above the app's max_body_bytes so that the app, not waitress,
answers an oversized body (with the JSON error shape); waitress still never buffers more."""
_CLOSE_WAIT_S: Final = 5.0


class ServerHandle:
    """A bound waitress server. Not started until `run()`; `close()` is safe from any thread,
    before, during or after `run()`, and more than once."""

    def __init__(self, server: Any, socket_map: dict[Any, Any]) -> None:
        self._server = server
        self._map = socket_map
        # Our own wake-up pipe in the loop's map: close() runs its work inside the loop thread.
        self._trigger = trigger.trigger(socket_map)
        listen = getattr(server, "effective_listen", None)
        if listen is None:  # one listening socket: waitress returns that server itself
            listen = [(server.effective_host, server.effective_port)]
        self.addresses: list[tuple[str, int]] = [(str(h), int(p)) for h, p in listen]
        """Every (host, port) listened on; more than one when the host name resolves to
        several addresses."""
        self._lock = threading.Lock()
        self._running = False
        self._closed = False
        self._stopped = threading.Event()
        self._run_thread: int | None = None

    @property
    def host(self) -> str:
        return self.addresses[0][0]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until close(). Blocks the calling thread."""
        with self._lock:
            if self._closed or self._running:
                return
            self._running = True
            self._run_thread = threading.get_ident()
        _log.info("event=http_listening address=%s:%d", self.host, self.port)
        try:
            self._server.run()
        finally:
            self._server.task_dispatcher.shutdown(timeout=_CLOSE_WAIT_S)
            self._stopped.set()

    def close(self) -> None:
        """Stop accepting, drop open connections, stop the worker threads, and wait for run()
        to return (bounded)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = self._running
        if running:
            # The socket map belongs to the loop thread: close everything from inside it.
            self._trigger.pull_trigger(self._close_all)
            if self._run_thread == threading.get_ident():
                return  # called from inside run() (a signal handler): the loop ends next
            if not self._stopped.wait(_CLOSE_WAIT_S):
                _log.warning("event=http_close_timeout wait_s=%s", _CLOSE_WAIT_S)
        else:
            self._close_all()
            self._server.task_dispatcher.shutdown(timeout=_CLOSE_WAIT_S)

    def _close_all(self) -> None:
        wasyncore.close_all(self._map, ignore_all=True)


def serve(app: Any, host: str, port: int, *, threads: int = 32, connection_limit: int = 1000,
          channel_timeout_s: int = 120, backlog: int = 2048,
          max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
          head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
          max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
          ) -> ServerHandle:
    """Bind `app` on host:port (0 = any free port) and return a handle; call .run() to serve.

    `threads` bounds concurrent requests (each may wait up to the request timeout on Raft),
    `connection_limit` bounds open connections, `channel_timeout_s` closes idle keep-alive
    connections (a connection with a request in progress is never idle).
    """
    # Waitress warns "Task queue depth is N" once per queued request under load: not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    socket_map: dict[Any, Any] = {}
    # Waitress's own errors (400, 413, 431, ...) in the JSON shape: raftkv.http.waitress_errors.
    server = create_server(
        app,
        map=socket_map,
        host=host,
        port=port,
        threads=threads,
        connection_limit=connection_limit,
        channel_timeout=channel_timeout_s,
        backlog=backlog,
        max_request_body_size=max_request_body_bytes,
        recv_bytes=65536,
        asyncore_use_poll=True,  # select() fails past 1024 descriptors
        clear_untrusted_proxy_headers=True,
        expose_tracebacks=False,
        ident="raftkv",
        head_timeout_s=head_timeout_s,
        max_connections_per_client=max_connections_per_client,
    )
    return ServerHandle(server, socket_map)
