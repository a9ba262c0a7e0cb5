"""Rate-limited warnings: one line per (source, reason) per interval, with the count of the
ones kept quiet since. For what the network sends that is refused or dropped: a flood of bad
connections or frames must not become a flood of log lines."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["RateLimitedLog"]

DEFAULT_INTERVAL_S: Final = 10.0
DEFAULT_MAX_KEYS: Final = 1024


class RateLimitedLog:
    """Decides when to log; the caller logs. One thread (the event loop)."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 max_keys: int = DEFAULT_MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def admit(self, source: str, reason: str) -> int | None:
        """None: stay quiet; else log now, saying this many were suppressed before."""
        now = self._clock()
        key = (source, reason)
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._seen) >= self._max_keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval_s}
            if len(self._seen) >= self._max_keys:
                self._seen.clear()
        self._seen[key] = (now, 0)
        return 0 if last is None else last[1]
