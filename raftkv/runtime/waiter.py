"""A one-shot result slot that a request thread waits on and the loop thread fills."""

from __future__ import annotations

import threading


class Waiter:
    """Cheaper than concurrent.futures.Future: one Event, a result or an error, no callbacks."""

    __slots__ = ("_done", "error", "result")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None

    def set_result(self, result: object) -> None:
        if not self._done.is_set():
            self.result = result
            self._done.set()

    def set_error(self, error: BaseException) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float) -> bool:
        """True when a result or an error arrived within the timeout."""
        return self._done.wait(timeout_s)
