"""The HTTP face of a node: waitress serving the Falcon app, its requests as greenlets.

`ServerHandle` is one waitress server on listening sockets that are already bound (an HTTP
worker gets the node's socket from the Raft process; `serve` binds one for tests and tools).
`run()` turns waitress's loop in the calling thread: poll the sockets, run the request
greenlets that are ready (raftkv.http.green), run the `loop_hooks` (a worker sends the
requests its greenlets queued), until `close()`, which is safe from any thread.

Waitress's own error answers are in the API's JSON shape (raftkv.http.waitress_errors).
`threads=N` instead serves with waitress's thread pool: only for test doubles whose service
blocks a thread (tests/support/single_node.py); the node itself never does.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

import waitress.task
from waitress import utilities as waitress_utilities
from waitress import wasyncore
from waitress.server import BaseWSGIServer

from raftkv.http.green import GreenDispatcher
from raftkv.http.waitress_errors import (
    DEFAULT_HEAD_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    create_server,
)

__all__ = ["DEFAULT_MAX_REQUEST_BODY_BYTES", "ServerHandle", "serve"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES: Final = 8 << 20
"""Waitress's own bound. Keep it above the app's max_body_bytes so that the app, not waitress,
answers an oversized body; waitress still never buffers more."""
_POLL_S: Final = 1.0
_SIT_OUT_S: Final = 0.001
"""How long a worker that just accepted leaves the listening socket to the others."""
GREEN_SEND_BYTES: Final = 65536
"""Output a green server buffers before it writes at once (see ServerHandle)."""
_CLOSE_WAIT_S: Final = 5.0


class _Wakeup(wasyncore.file_dispatcher):  # type: ignore[misc]
    """The dispatcher's wake-up pipe in waitress's socket map (its loop polls it)."""

    def __init__(self, dispatcher: GreenDispatcher, socket_map: dict[Any, Any]) -> None:
        super().__init__(dispatcher.wake_fd, map=socket_map)
        self._drain = dispatcher.drain_wakeups

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        self._drain()  # what was posted runs in the dispatcher's run_ready, right after

    # close(): wasyncore's, which closes this object's own dup of the descriptor (the
    # dispatcher keeps and closes the original)


class ServerHandle:
    """A waitress server on bound sockets. Not serving until `run()`; `close()` is safe from
    any thread, before, during or after `run()`, and more than once."""

    def __init__(self, app: Any, sockets: list[socket.socket], *, threads: int = 0,
                 connection_limit: int = 10_000, channel_timeout_s: int = 120,
                 backlog: int = 2048,
                 max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
                 head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
                 max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                 dispatcher: GreenDispatcher | None = None,
                 socket_map: dict[Any, Any] | None = None) -> None:
        """`head_timeout_s`: a deadline for each request head (0: none);
        `max_connections_per_client`: open connections one client address may hold here (0:
        no limit); both in raftkv.http.waitress_errors. `dispatcher`, `socket_map`: made
        beforehand by a caller that registers its own sockets in the loop (an HTTP worker's
        channel to its Raft process)."""
        # Waitress warns "Task queue depth is N" once per queued request under load.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self._map: dict[Any, Any] = {} if socket_map is None else socket_map
        self._own_dispatcher: GreenDispatcher | None = None
        if threads:
            self.dispatcher: GreenDispatcher | None = None
        else:
            if dispatcher is None:
                dispatcher = self._own_dispatcher = GreenDispatcher()
            self.dispatcher = dispatcher
        kwargs: dict[str, Any] = {}
        if self.dispatcher is not None:
            kwargs["_dispatcher"] = self.dispatcher
            _Wakeup(self.dispatcher, self._map)
        else:
            kwargs["threads"] = threads
        self._server = create_server(
            app, map=self._map, sockets=sockets, connection_limit=connection_limit,
            channel_timeout=channel_timeout_s, backlog=backlog,
            max_request_body_size=max_request_body_bytes, recv_bytes=65536,
            asyncore_use_poll=True,  # select() fails past 1024 descriptors
            clear_untrusted_proxy_headers=False, expose_tracebacks=False, ident="raftkv",
            head_timeout_s=head_timeout_s, max_connections_per_client=max_connections_per_client,
            **kwargs)
        self._sitting_out: list[Callable[[], bool]] = []
        if self.dispatcher is not None:
            # Every task runs on this thread: the loop re-polls after each round anyway.
            self._server.pull_trigger = _nothing
            # A response's head and body (two writes of waitress's task) leave in one send()
            # when the loop next polls, not in one send() each at once: waitress flushes at
            # every write once `send_bytes` are buffered, and its default is 1 byte.
            self._server.adj.send_bytes = GREEN_SEND_BYTES
            self._sitting_out = [
                _take_turns_accepting(listener)
                for listener in [o for o in self._map.values() if isinstance(o, BaseWSGIServer)]]
        listen = getattr(self._server, "effective_listen", None)
        if listen is None:  # one listening socket: waitress returns that server itself
            listen = [(self._server.effective_host, self._server.effective_port)]
        self.addresses: list[tuple[str, int]] = [(str(h), int(p)) for h, p in listen]
        self.loop_hooks: list[Callable[[], None]] = []
        """Run after every turn of the loop (green mode)."""
        self._lock = threading.Lock()
        self._closing = False
        self._running = False
        self._run_thread: int | None = None
        self._stopped = threading.Event()

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

    @property
    def socket_map(self) -> dict[Any, Any]:
        return self._map

    def run(self) -> None:
        """Serve until close(). Blocks the calling thread."""
        with self._lock:
            if self._closing or self._running:
                return
            self._running = True
            self._run_thread = threading.get_ident()
        try:
            self._run_loop()
        finally:
            self._server.task_dispatcher.shutdown(timeout=_CLOSE_WAIT_S)
            self._stopped.set()

    def _run_loop(self) -> None:
        poll = wasyncore.poll2
        socket_map = self._map
        dispatcher = self.dispatcher
        if dispatcher is None:  # waitress's thread pool: its threads wake the loop themselves
            while not self._closing:
                poll(_POLL_S, socket_map)
        else:
            hooks = self.loop_hooks
            sitting_out = self._sitting_out
            while not self._closing:
                wait_s = dispatcher.timeout(_POLL_S)
                if any(sits() for sits in sitting_out):  # short turn: accept again right after
                    wait_s = min(wait_s, _SIT_OUT_S)
                poll(wait_s, socket_map)
                dispatcher.run_ready()
                for hook in hooks:
                    hook()
        with self._lock:  # close() wakes the loop under it: never after the trigger closed
            self._close_all()

    def close(self) -> None:
        """Stop accepting, drop open connections, and wait for run() to return (bounded)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            running = self._running
            if running:  # wake the loop: it sees _closing, and closes the map under the lock
                if self.dispatcher is not None:
                    self.dispatcher.post(_nothing)
                else:
                    self._server.trigger.pull_trigger()
        if not running:
            self._close_all()
            return
        if self._run_thread == threading.get_ident():
            return  # called on the loop itself: it ends after this turn
        if not self._stopped.wait(_CLOSE_WAIT_S):
            log.warning("event=http_close_timeout wait_s=%s", _CLOSE_WAIT_S)

    def stop_accepting(self) -> None:
        """Loop thread: close the listening sockets only (a worker that drains)."""
        for obj in list(self._map.values()):
            if getattr(obj, "accepting", False):
                with contextlib.suppress(OSError):
                    obj.close()

    def open_connections(self) -> int:
        return sum(1 for obj in self._map.values() if hasattr(obj, "requests"))

    def unsent_output(self) -> bool:
        """Whether some connection still holds response bytes the loop has not sent (green
        mode buffers a response until the next poll)."""
        return any(getattr(obj, "total_outbufs_len", 0) > 0 for obj in self._map.values())

    def _close_all(self) -> None:
        wasyncore.close_all(self._map, ignore_all=True)
        if self._own_dispatcher is not None:  # a caller's dispatcher is the caller's to close
            self._own_dispatcher.close()


def _nothing(*_args: Any) -> None:
    pass


def _take_turns_accepting(listener: Any) -> Callable[[], bool]:
    """After accepting a connection, leave the listening socket out of the next poll.

    The workers share one listening socket and each polls it: at a burst of connections
    (a client pool opening), they all wake and whoever calls accept() first takes the
    connection, so one worker could take most of a pool and the others idle. Sitting out one
    turn after each accept hands the next connection to another worker. That turn must be
    short (the returned function says whether the worker sits out: the loop then polls for at
    most _SIT_OUT_S): with nothing else to wake it, a worker would otherwise leave a burst of
    connections (1,000 watches) in the backlog for a whole poll interval per accept."""
    accept, readable = listener.handle_accept, listener.readable
    just_accepted = [False]

    def handle_accept() -> None:
        before = len(listener._map)
        accept()
        just_accepted[0] = len(listener._map) > before  # not when another worker won it

    def take_turns_readable() -> bool:
        result = bool(readable())  # waitress's: also runs its maintenance
        if just_accepted[0]:
            just_accepted[0] = False
            return False
        return result

    listener.handle_accept = handle_accept
    listener.readable = take_turns_readable
    return lambda: just_accepted[0]


_date_cache: list[Any] = [-1, ""]


def _http_date(when: float) -> str:
    """waitress's Date header, formatted once a second instead of once a request."""
    second = int(when)
    if second != _date_cache[0]:
        _date_cache[1] = waitress_utilities.build_http_date(second)
        _date_cache[0] = second
    return str(_date_cache[1])


waitress.task.build_http_date = _http_date  # the name waitress.task looks up per response


def serve(app: Any, host: str, port: int, *, threads: int = 0, connection_limit: int = 10_000,
          channel_timeout_s: int = 120, backlog: int = 2048,
          max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
          head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
          max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
          ) -> ServerHandle:
    """Bind host:port (0 = any free port) and return a handle; call .run() to serve."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    try:
        return ServerHandle(app, [sock], threads=threads, connection_limit=connection_limit,
                            channel_timeout_s=channel_timeout_s, backlog=backlog,
                            max_request_body_bytes=max_request_body_bytes,
                            head_timeout_s=head_timeout_s,
                            max_connections_per_client=max_connections_per_client)
    except BaseException:
        sock.close()
        raise
