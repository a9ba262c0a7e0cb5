"""The Raft process's one thread: an epoll loop over sockets, timers and end-of-turn hooks.

Each turn: wait for readiness (epoll) or the next timer, call the handler of every ready file
descriptor, run the timers that are due, run thread-posted callbacks, then run the end-of-turn
hooks in the order they were added (the Raft driver handles its Ready there, so everything the
turn's events brought is persisted with ONE fsync: group commit; then replies and frames are
flushed). A hook that still has work returns True and the next wait does not block.

Nothing here is thread-safe except `call_soon_threadsafe`, the only way in for other threads
(the snapshot writer, a join or a probe running off the loop), and `wake`.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = ["EPOLLIN", "EPOLLOUT", "EventLoop", "Timer"]

log = logging.getLogger(__name__)

EPOLLIN: Final = select.EPOLLIN
EPOLLOUT: Final = select.EPOLLOUT
_ERRORS: Final = select.EPOLLERR | select.EPOLLHUP
_MAX_EVENTS: Final = 1024

FdHandler = Callable[[int], None]
"""Called with the epoll event mask of a ready file descriptor."""


class Timer:
    """A callback at a monotonic time; cancel() before it runs and it never does."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, FdHandler] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = 0
        self._hooks: list[Callable[[], bool]] = []
        self._posted: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.register(self._wake_r, EPOLLIN, self._drain_wakeups)
        self._stopping = False
        self._thread: int | None = None

    # ------------------------------------------------------------------ file descriptors
    def register(self, fd: int, mask: int, handler: FdHandler) -> None:
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self._epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    # ------------------------------------------------------------------ time
    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, timer))
        return timer

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(time.monotonic() + delay_s, callback)

    def add_turn_hook(self, hook: Callable[[], bool]) -> None:
        """Run `hook` at the end of every turn; it returns True while it has work left."""
        self._hooks.append(hook)

    # ------------------------------------------------------------------ other threads
    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """From any thread: run `callback` on the loop thread, soon."""
        self._posted.append(callback)
        self.wake()

    def wake(self) -> None:
        """From any thread or a signal handler: end the current wait."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _drain_wakeups(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass

    @property
    def wake_fd(self) -> int:
        """The write end of the wake-up pipe (signal.set_wakeup_fd)."""
        return self._wake_w

    # ------------------------------------------------------------------ running
    def stop(self) -> None:
        self._stopping = True
        self.wake()

    def in_loop_thread(self) -> bool:
        return self._thread == threading.get_ident()

    def run(self) -> None:
        """Turn until stop(); an exception from a handler ends the run (the caller decides)."""
        self._thread = threading.get_ident()
        clock = time.monotonic
        poll = self._epoll.poll
        handlers = self._handlers
        timers = self._timers
        posted = self._posted
        hooks = self._hooks
        busy = False
        while not self._stopping:
            if busy or posted:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - clock())
            else:
                timeout = -1.0
            for fd, mask in poll(timeout, _MAX_EVENTS):
                handler = handlers.get(fd)
                if handler is not None:
                    handler(mask | (EPOLLIN if mask & _ERRORS else 0))
            if timers:
                now = clock()
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if not timer.cancelled:
                        timer.cancelled = True
                        timer.callback()
            while posted:
                posted.popleft()()
            busy = False
            for hook in hooks:
                if hook():
                    busy = True

    def close(self) -> None:
        for fd in list(self._handlers):
            self.unregister(fd)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._epoll.close()
