"""Waitress tasks as greenlets on waitress's own loop thread: no thread hand-offs per request.

Waitress parses requests on its main loop and normally hands each one to a pool thread, which
runs the WSGI app and hands the response back through a trigger pipe; a request that waits
(for the Raft process) holds its thread. Here the task dispatcher (`GreenDispatcher`, given
to waitress as its dispatcher) runs each request in a greenlet on the loop thread instead: the
app runs until it must wait, then `suspend()` switches back to the loop, which resumes it when
its answer arrives (`resume`) or its time runs out. Thousands of requests (long-poll watches)
can wait at once at the cost of a greenlet each, and no request costs a thread switch.

The `greenlet` package (a well-kept C extension, the core of gevent and used by SQLAlchemy) is
what makes this possible without rewriting the app as async code: the Falcon app stays
synchronous and unchanged.

Rules for code that runs in a request greenlet: never block the thread. Waiting is `suspend`
(through raftkv.worker.channel), and blocking work goes through `run_in_thread`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from greenlet import getcurrent, greenlet

__all__ = ["TIMED_OUT", "GreenCondition", "GreenDispatcher", "Suspended"]

log = logging.getLogger(__name__)

TIMED_OUT: Final = object()
"""What `suspend` returns when its deadline passed first."""

IDLE_RUNNERS: Final = 256
"""Greenlets kept for the next requests once theirs is served. A new greenlet costs ~9 us
more than a reused one (in CPython 3.11 each allocates, maps and faults in a 16 KiB frame
stack of its own and unmaps it when it ends); a burst of waits (1,000 watches) leaves at most
this many behind."""


class Suspended:
    """One wait of one greenlet: resumed once, by `resume` or by its deadline."""

    __slots__ = ("done", "glet")

    def __init__(self, glet: greenlet) -> None:
        self.glet = glet
        self.done = False


class GreenDispatcher:
    """Waitress's task dispatcher (add_task/set_thread_count/shutdown), and the scheduler of
    the greenlets that run the tasks. Every method but `post` belongs to the loop thread."""

    def __init__(self) -> None:
        self._main = getcurrent()
        self._ready: deque[tuple[greenlet, Any]] = deque()
        self._timers: list[tuple[float, int, Suspended]] = []
        self._seq = itertools.count()
        self._posted: deque[Callable[[], None]] = deque()
        self._idle: list[greenlet] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.RLock()
        """Orders post()'s write (any thread) against close(): a late post never writes into
        a descriptor number the process has since reused. Reentrant: a signal handler on the
        loop thread (a worker's SIGTERM) may post while that thread is inside post()."""
        self.tasks = 0
        """Requests being served (greenlets started and not finished)."""
        self.after_run: list[Callable[[], None]] = []
        """Called after each round of greenlets (e.g. to send the requests they queued)."""

    # ------------------------------------------------------------------ waitress's API
    def set_thread_count(self, count: int) -> None:
        """Waitress asks for threads; greenlets need none."""

    def add_task(self, task: Any) -> None:
        # Called by waitress while it holds the channel's requests_lock: run it later, from
        # the loop (run_ready), never from inside that call. Also called from a request's
        # greenlet (waitress queues a channel's next pipelined request at the end of
        # service()): a new runner's parent is the loop all the same, so a runner that ends
        # returns there, and not into the (parked, reusable) runner that created it.
        self.tasks += 1
        runner = self._idle.pop() if self._idle else greenlet(self._serve, self._main)
        self._ready.append((runner, [task]))

    def shutdown(self, cancel_pending: bool = True, timeout: int = 5) -> bool:
        return True

    def _serve(self, box: list[Any]) -> None:
        """A runner: serves `task`, then parks in the idle list until add_task hands it the
        next one (or ends, when enough runners are idle already). A parked runner holds no
        Suspended handle (each of its waits was resumed before its task could end) and no
        reference to its last task (a request and its body would live on with it): tasks come
        in a box that it empties (a new greenlet's first arguments stay referenced for as long
        as it lives)."""
        idle, main = self._idle, self._main
        while True:
            task = box.pop()
            try:
                task.service()
            except BaseException:  # waitress's own handler logs app errors; this is a bug
                log.exception("event=http_task_failed")
            finally:
                self.tasks -= 1
            task = None
            if len(idle) >= IDLE_RUNNERS:
                return
            idle.append(getcurrent())
            box = main.switch()

    # ------------------------------------------------------------------ for request code
    @property
    def in_request(self) -> bool:
        return getcurrent() is not self._main

    def suspend(self, deadline: float | None) -> tuple[Suspended, Callable[[], Any]]:
        """(the handle to resume it with, a function that switches to the loop and returns
        the value it was resumed with, or TIMED_OUT). Split in two so the caller can file the
        handle before it switches."""
        handle = Suspended(getcurrent())
        if deadline is not None:
            heapq.heappush(self._timers, (deadline, next(self._seq), handle))
        return handle, self._main.switch

    def resume(self, handle: Suspended, value: Any) -> bool:
        """Resume a suspended greenlet with `value` (once; False if it already was)."""
        if handle.done:
            return False
        handle.done = True
        self._ready.append((handle.glet, value))
        return True

    def run_in_thread(self, fn: Callable[[], Any]) -> Any:
        """Run blocking `fn` on a short-lived thread; this greenlet waits without blocking
        the loop. Its exception is raised here."""
        handle, wait = self.suspend(None)
        outcome: list[Any] = []

        def work() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as e:
                outcome.append((False, e))
            self.post(lambda: _ignore(self.resume(handle, None)))

        threading.Thread(target=work, name="http-blocking", daemon=True).start()
        wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def post(self, callback: Callable[[], None]) -> None:
        """From any thread: run `callback` on the loop thread (never, once closed)."""
        self._posted.append(callback)
        with self._wake_lock, contextlib.suppress(BlockingIOError, OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"\0")

    def close(self) -> None:
        """Close the wake-up pipe, once the loop has stopped for good (its owner's call: a
        server that made its own dispatcher closes it with its sockets)."""
        with self._wake_lock:
            r, w = self._wake_r, self._wake_w
            if w < 0:
                return
            self._wake_r = self._wake_w = -1  # first: a post() re-entering here skips
            os.close(r)
            os.close(w)

    @property
    def wake_fd(self) -> int:
        """Readable when something was posted (the loop polls it)."""
        return self._wake_r

    # ------------------------------------------------------------------ for the loop
    def has_ready(self) -> bool:
        return bool(self._ready) or bool(self._posted)

    def timeout(self, default_s: float) -> float:
        """How long the loop may wait for I/O."""
        if self._ready or self._posted:
            return 0.0
        if self._timers:
            return max(0.0, min(default_s, self._timers[0][0] - time.monotonic()))
        return default_s

    def drain_wakeups(self) -> None:
        """Empty the wake-up pipe: for the loop, when its poll found `wake_fd` readable (not
        on every turn: a read that finds it empty costs an exception)."""
        if self._wake_r < 0:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass

    def run_ready(self) -> None:
        """Run what was posted, the due timers, and every ready greenlet until all wait.
        (The loop drains `wake_fd` itself when it finds it readable: drain_wakeups.)"""
        posted = self._posted
        while posted:
            posted.popleft()()
        timers = self._timers
        if timers:
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                handle = heapq.heappop(timers)[2]
                self.resume(handle, TIMED_OUT)
        ready = self._ready
        while ready:
            for _ in range(len(ready)):
                glet, value = ready.popleft()
                glet.switch(value)
            for hook in self.after_run:
                hook()
        if len(timers) > 64 and len(timers) > 4 * self.tasks:
            self._timers = [t for t in timers if not t[2].done]  # resumed long ago
            heapq.heapify(self._timers)


class GreenCondition:
    """threading.Condition's interface, for the `outbuf_lock` of waitress's channels when
    their tasks are greenlets on the loop thread (raftkv.http.waitress_errors installs it).

    Waitress's task code waits on that condition for the loop to flush a connection's output
    below its high watermark (a request pipelined behind a large answer the client has not
    read yet). A thread's Condition.wait there would block the loop thread itself, the only
    one that flushes: the whole server would hang for good. Here `wait` suspends the request's
    greenlet until the loop's `notify`. The lock part is nothing: one thread, and greenlets
    switch only where they wait."""

    __slots__ = ("_dispatcher", "_waiting")

    def __init__(self, dispatcher: GreenDispatcher) -> None:
        self._dispatcher = dispatcher
        self._waiting: deque[Suspended] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *_exc: object) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        """Suspend this request's greenlet until notify() (False: `timeout` passed first).
        The loop itself never waits: it is what notifies."""
        dispatcher = self._dispatcher
        if not dispatcher.in_request:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        handle, wait = dispatcher.suspend(deadline)
        self._waiting.append(handle)
        return wait() is not TIMED_OUT

    def notify(self, n: int = 1) -> None:
        waiting = self._waiting
        while n > 0 and waiting:
            if self._dispatcher.resume(waiting.popleft(), None):
                n -= 1

    def notify_all(self) -> None:
        self.notify(len(self._waiting))


def _ignore(_value: object) -> None:
    pass
