"""An EventLoop (raftkv.runtime.eventloop) turning in a background thread, for tests of what
runs on it: the test thread does everything on the loop through `call` (and waits for the
answer), as the Raft process's other threads do through call_soon_threadsafe."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from raftkv.runtime.eventloop import EventLoop

T = TypeVar("T")

CALL_TIMEOUT_S = 10.0


class LoopThread:
    def __init__(self) -> None:
        self.loop = EventLoop()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-event-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as e:  # a bug in what ran on the loop: the test sees it
            self.error = e

    def call(self, fn: Callable[[], T], timeout_s: float = CALL_TIMEOUT_S) -> T:
        """Run fn() on the loop thread; its result, or its exception raised here."""
        done = threading.Event()
        outcome: list[tuple[bool, object]] = []

        def run() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as e:
                outcome.append((False, e))
            done.set()

        self.loop.call_soon_threadsafe(run)
        if not done.wait(timeout_s):
            raise TimeoutError(f"the loop did not run the call within {timeout_s}s "
                               f"(loop error: {self.error!r})")
        ok, value = outcome[0]
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]

    def stop(self) -> None:
        self.loop.stop()
        self._thread.join(CALL_TIMEOUT_S)
        assert not self._thread.is_alive(), "the event loop did not stop"
        self.loop.close()


@contextmanager
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.stop()
    if lt.error is not None:
        raise AssertionError(f"the event loop failed: {lt.error!r}") from lt.error
