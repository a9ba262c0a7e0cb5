"""A Completion for runtime tests: it records its outcomes (raftkv.runtime.driver.Completion)."""

from __future__ import annotations

from raftkv.service import ServiceError

__all__ = ["Done"]


class Done:
    """A Completion that records its one outcome."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[bool, object]] = []

    def ok(self, value: object) -> None:
        self.outcomes.append((True, value))

    def fail(self, error: ServiceError) -> None:
        self.outcomes.append((False, error))

    @property
    def done(self) -> bool:
        assert len(self.outcomes) <= 1, f"completed more than once: {self.outcomes}"
        return bool(self.outcomes)

    @property
    def value(self) -> object:
        assert self.done, "not completed"
        ok, value = self.outcomes[0]
        assert ok, f"failed: {value!r}"
        return value

    @property
    def error(self) -> ServiceError:
        assert self.done, "not completed"
        ok, value = self.outcomes[0]
        assert not ok, f"succeeded: {value!r}"
        assert isinstance(value, ServiceError)
        return value
