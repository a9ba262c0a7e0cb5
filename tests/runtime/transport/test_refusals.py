"""Rate-limited warnings (raftkv.runtime.transport.refusals): one line per source and reason
per interval, then the count of the ones kept quiet; bounded memory."""

from __future__ import annotations

import pytest

from raftkv.runtime.transport.refusals import RateLimitedLog
from tests.support.single_node import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_the_first_refusal_is_logged_then_quiet_until_the_interval_passes(
        clock: FakeClock) -> None:
    log = RateLimitedLog(interval_s=10.0, clock=clock)
    assert log.admit("10.0.0.1", "wrong_token") == 0
    assert [log.admit("10.0.0.1", "wrong_token") for _ in range(5)] == [None] * 5
    clock.advance(9.9)
    assert log.admit("10.0.0.1", "wrong_token") is None
    clock.advance(0.2)
    assert log.admit("10.0.0.1", "wrong_token") == 6, "the six kept quiet"
    assert log.admit("10.0.0.1", "wrong_token") is None


def test_sources_and_reasons_are_limited_apart(clock: FakeClock) -> None:
    log = RateLimitedLog(interval_s=10.0, clock=clock)
    assert log.admit("10.0.0.1", "wrong_token") == 0
    assert log.admit("10.0.0.2", "wrong_token") == 0
    assert log.admit("10.0.0.1", "malformed") == 0
    assert log.admit("10.0.0.1", "wrong_token") is None


def test_many_sources_do_not_grow_it_without_bound(clock: FakeClock) -> None:
    log = RateLimitedLog(interval_s=10.0, max_keys=100, clock=clock)
    for i in range(1000):
        assert log.admit(f"10.0.{i // 256}.{i % 256}", "bad_handshake") == 0
    assert len(log._seen) <= 100  # the bound is the behaviour under test
    clock.advance(11)
    assert log.admit("10.9.9.9", "bad_handshake") == 0
