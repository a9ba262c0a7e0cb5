"""One-shot result slots and a wake-up signal, built on bare locks (cheaper than Event)."""

from __future__ import annotations

import contextlib
import threading


class Waiter:
    """A result or an error, set once by the loop thread, waited for by a request thread.

    A held lock is the "not yet" state: set_*() releases it and wait() acquires it. This costs
    one lock, where threading.Event costs a Condition and a fresh lock per wait.
    """

    __slots__ = ("_done", "_lock", "error", "result")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._done = False
        self.result: object = None
        self.error: BaseException | None = None

    def set_result(self, result: object) -> None:
        if not self._done:
            self.result = result
            self._finish()

    def set_error(self, error: BaseException) -> None:
        if not self._done:
            self.error = error
            self._finish()

    def _finish(self) -> None:
        self._done = True
        # Two threads racing to finish it (only on shutdown): the first one won.
        with contextlib.suppress(RuntimeError):
            self._lock.release()

    @property
    def done(self) -> bool:
        return self._done

    def wait(self, timeout_s: float) -> bool:
        """True when a result or an error arrived within the timeout."""
        if self._done:
            return True
        if self._lock.acquire(timeout=max(0.0, timeout_s)):
            self._lock.release()  # let other waiters (if any) through too
            return True
        return self._done


class WakeSignal:
    """A binary semaphore: set() from any thread, wait(timeout) on the loop thread consumes it."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # already signalled
            self._lock.release()

    def wait(self, timeout_s: float) -> bool:
        """True if signalled (and consumes the signal); False on timeout."""
        return self._lock.acquire(timeout=max(0.0, timeout_s))
