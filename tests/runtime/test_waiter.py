"""Waiter and WakeSignal: the lock-based hand-offs between request threads and the loop."""

from __future__ import annotations

import threading

from raftkv.runtime.waiter import Waiter, WakeSignal


def test_waiter_times_out_when_nothing_arrives() -> None:
    w = Waiter()
    assert w.wait(0.01) is False
    assert not w.done


def test_waiter_returns_a_result_set_by_another_thread() -> None:
    w = Waiter()
    threading.Thread(target=w.set_result, args=(42,)).start()
    assert w.wait(5.0) is True
    assert w.result == 42 and w.error is None


def test_waiter_keeps_the_first_outcome() -> None:
    w = Waiter()
    w.set_error(ValueError("first"))
    w.set_result("second")
    assert w.wait(0) and isinstance(w.error, ValueError) and w.result is None
    assert w.wait(0)  # waiting again still answers at once


def test_wake_signal_is_consumed_by_one_wait() -> None:
    s = WakeSignal()
    assert s.wait(0.0) is False
    s.set()
    s.set()  # a second signal while one is pending is the same signal
    assert s.wait(0.0) is True
    assert s.wait(0.01) is False


def test_wake_signal_wakes_a_waiting_thread() -> None:
    s = WakeSignal()
    woke = threading.Event()

    def waiter() -> None:
        if s.wait(5.0):
            woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    s.set()
    t.join(5.0)
    assert woke.is_set()
