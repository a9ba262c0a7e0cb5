"""ServerHandle (raftkv.http.server) in green mode: waitress's requests as greenlets on its
own loop thread, on a bound socket; real sockets on loopback. And its thread-pool mode (test
doubles) where it closes."""

from __future__ import annotations

import array
import fcntl
import http.client
import os
import select
import socket
import termios
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from raftkv.http import server as server_module
from raftkv.http.green import GreenDispatcher
from raftkv.http.server import ServerHandle

WAIT_S = 5.0
BIG = 24 << 20
"""Over waitress's outbuf_high_watermark (16 MiB)."""


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = b"x" * BIG if environ["PATH_INFO"] == "/big" else b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def start_green_server() -> tuple[ServerHandle, threading.Thread]:
    """A green server made and run on a thread of its own (its greenlets belong to the
    thread that made its dispatcher, as in a worker process)."""
    sock = socket.create_server(("127.0.0.1", 0))
    made: list[ServerHandle] = []
    ready = threading.Event()

    def run() -> None:
        made.append(ServerHandle(app, [sock]))
        ready.set()
        made[0].run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(WAIT_S)
    handle = made[0]
    assert handle.dispatcher is not None, "green mode"
    return handle, thread


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    handle, thread = start_green_server()
    yield handle
    handle.close()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the server loop did not stop"


def get(server: ServerHandle, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=WAIT_S)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_requests_are_served(server: ServerHandle) -> None:
    assert get(server, "/") == (200, b"ok")
    status, body = get(server, "/big")
    assert status == 200 and len(body) == BIG


def test_a_client_that_pipelines_and_does_not_read_does_not_stop_the_server(
        server: ServerHandle) -> None:
    """Regression: after a response over waitress's output high watermark, waitress makes the
    next pipelined request wait until the loop flushed the output below it, on a
    threading.Condition. In green mode that wait ran on the loop thread itself: the loop that
    would flush never ran again, and the whole server (an HTTP worker) hung for good, for
    every client. Now the wait suspends only that request's greenlet."""
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((server.host, server.port))
    try:
        slow.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(3):  # other clients are served meanwhile
            assert get(server, "/") == (200, b"ok")
        # The slow client reads at last: both answers arrive, in order.
        slow.settimeout(WAIT_S)
        received = bytearray()
        while not (len(received) > BIG and received.endswith(b"ok")):
            chunk = slow.recv(1 << 20)
            assert chunk, "closed early"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        assert received.count(b"HTTP/1.1 200 OK\r\n") == 2
    finally:
        slow.close()


def test_a_burst_of_silent_connections_is_accepted_without_waiting_a_poll_interval_each(
        server: ServerHandle) -> None:
    """Regression: a worker that just accepted sits out one poll of the listening socket (so
    that the workers take turns). That poll waited up to a second when nothing else woke it:
    connections that send nothing yet (or a burst of 1,000 watches) were accepted about one a
    second, and a request behind them in the backlog timed out (the benchmark's /status)."""
    silent = [socket.create_connection((server.host, server.port), timeout=WAIT_S)
              for _ in range(40)]
    try:
        assert get(server, "/") == (200, b"ok")  # accepted after the 40 ahead of it
    finally:
        for s in silent:
            s.close()


def test_a_post_from_another_thread_runs_on_the_loop_which_drains_its_wake_up(
        server: ServerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop drains the wake-up pipe when its poll finds it readable (not every turn): by
    the time a posted callback runs, the pipe is empty again, so the loop goes back to
    waiting instead of spinning on a readable pipe.

    Each post is made while the loop waits in its poll (not while it still runs the round of
    the previous callback, which would run the new one at once, its wake-up not yet polled):
    the test waits for the loop to ask the wake-up pipe's dispatcher whether it is readable
    (poll2 does, for each poll) after the previous callback ran. And no poll ends by its
    timeout meanwhile (one ending between a post's queueing and its write to the pipe would
    run the callback with that write undrained): each round is one the wake-up began."""
    dispatcher = server.dispatcher
    assert dispatcher is not None
    monkeypatch.setattr(server_module, "_POLL_S", 3600.0)
    wakeup = next(o for o in server.socket_map.values()
                  if isinstance(o, server_module._Wakeup))
    polls = [0]
    """Polls the loop began (counted on the loop thread)."""
    polled = threading.Condition()
    is_readable = wakeup.readable

    def counting_readable() -> bool:
        with polled:
            polls[0] += 1
            polled.notify_all()
        return bool(is_readable())

    def wait_for_a_poll_after(count: int) -> None:
        with polled:
            assert polled.wait_for(lambda: polls[0] > count, WAIT_S), "the loop never polled"

    monkeypatch.setattr(wakeup, "readable", counting_readable)
    seen: list[tuple[str, bool, int]] = []
    """(thread, wake-up pipe readable, polls begun) at each callback."""
    ran = threading.Event()

    def callback() -> None:
        readable, _, _ = select.select([dispatcher.wake_fd], [], [], 0)
        seen.append((threading.current_thread().name, bool(readable), polls[0]))
        ran.set()

    # A first round only to start the loop's next poll with _POLL_S patched (the poll under
    # way may have begun with the old timeout): its pipe check is not counted.
    for _ in range(4):
        ran.clear()
        dispatcher.post(callback)
        assert ran.wait(WAIT_S), "the posted callback never ran"
        wait_for_a_poll_after(seen[-1][2])
    assert [readable for _name, readable, _polls in seen[1:]] == [False, False, False]
    assert all(name != threading.current_thread().name for name, _, _ in seen)


def test_close_wakes_a_threaded_loop_without_racing_it_to_close_the_trigger() -> None:
    """With waitress's thread pool, close() wakes the loop through waitress's trigger (a
    pipe). Its request threads pull that trigger too when they finish a task; a pull just
    ahead of close() let the loop close the whole map, trigger included, before close()
    wrote to it: EBADF there, or a byte into whatever descriptor reused the number. The
    loop now closes the map only under the lock close() holds while it writes."""
    handle = ServerHandle(app, [socket.create_server(("127.0.0.1", 0))], threads=2)
    thread = threading.Thread(target=handle.run, daemon=True)
    thread.start()
    assert get(handle, "/") == (200, b"ok")  # the loop is running
    trigger = handle._server.trigger
    read_end = trigger._fds[0]
    write_pull, read_wakeup = trigger._physical_pull, trigger.handle_read
    pulled = threading.Event()
    acted = threading.Event()
    """The loop did what it does with the early pull: read it (and ran what was queued with
    it), or it had seen the handle closing already and waits for close()'s lock."""
    trigger_closed_first: list[bool] = []

    def handle_read() -> None:
        read_wakeup()
        if pulled.is_set() and (trigger._closed or _unread_bytes(read_end) == 0):
            acted.set()

    closer = threading.current_thread()

    def pull_after_a_request_thread() -> None:
        if threading.current_thread() is not closer:
            # The GET's request thread ends its task with a pull of its own, after its answer
            # went out: it may come after the patch. Only close()'s pull is under test.
            write_pull()
            return
        pulled.set()
        os.write(trigger.trigger, b"x")  # a request thread's pull, just ahead of close()'s
        assert acted.wait(WAIT_S), "the loop did nothing with the trigger"
        trigger_closed_first.append(trigger._closed)
        write_pull()

    trigger.handle_read = handle_read
    trigger._physical_pull = pull_after_a_request_thread
    handle._lock = cast(Any, _NotingLock(handle._lock, thread, acted))
    handle.close()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the server loop did not stop"
    assert trigger_closed_first == [False]
    assert trigger._closed  # and the loop did close it, after close() had written


class _NotingLock:
    """A lock that sets `event` when `thread` comes to take it."""

    def __init__(self, lock: Any, thread: threading.Thread, event: threading.Event) -> None:
        self._lock, self._thread, self._event = lock, thread, event

    def __enter__(self) -> bool:
        if threading.current_thread() is self._thread:
            self._event.set()
        return bool(self._lock.__enter__())

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)


def _unread_bytes(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def test_a_server_closes_the_wake_up_pipe_of_the_dispatcher_it_made_only() -> None:
    own = ServerHandle(app, [socket.create_server(("127.0.0.1", 0))])
    assert own.dispatcher is not None
    wake_fd = own.dispatcher.wake_fd
    os.fstat(wake_fd)
    own.close()
    assert own.dispatcher.wake_fd == -1
    with pytest.raises(OSError):
        os.fstat(wake_fd)

    running, thread = start_green_server()
    assert running.dispatcher is not None
    assert get(running, "/") == (200, b"ok")
    running.close()  # from another thread, while it runs
    thread.join(WAIT_S)
    assert running.dispatcher.wake_fd == -1

    given = GreenDispatcher()
    borrowed = ServerHandle(app, [socket.create_server(("127.0.0.1", 0))], dispatcher=given)
    borrowed.close()
    os.fstat(given.wake_fd)  # the caller's to close
    given.close()
