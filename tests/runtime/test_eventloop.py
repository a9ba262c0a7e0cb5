"""The Raft process's event loop (raftkv.runtime.eventloop): timers, thread-posted callbacks,
file descriptors and end-of-turn hooks, on one thread."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from raftkv.runtime.eventloop import EPOLLIN, EventLoop

WAIT_S = 5.0


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    yield lp
    lp.close()


def run_in_thread(loop: EventLoop) -> threading.Thread:
    t = threading.Thread(target=loop.run, name="test-loop", daemon=True)
    t.start()
    return t


def test_timers_run_in_time_order_and_ties_in_the_order_they_were_set(
        loop: EventLoop) -> None:
    ran: list[str] = []
    now = time.monotonic()
    loop.call_at(now + 0.03, lambda: ran.append("c"))
    loop.call_at(now + 0.01, lambda: ran.append("a"))
    loop.call_at(now + 0.02, lambda: ran.append("b1"))
    loop.call_at(now + 0.02, lambda: ran.append("b2"))
    loop.call_at(now + 0.04, loop.stop)

    loop.run()

    assert ran == ["a", "b1", "b2", "c"]


def test_a_timer_does_not_run_before_its_time(loop: EventLoop) -> None:
    fired: list[float] = []
    start = time.monotonic()
    loop.call_later(0.05, lambda: fired.append(time.monotonic()))
    loop.call_later(0.06, loop.stop)

    loop.run()

    assert fired and fired[0] - start >= 0.05


def test_a_cancelled_timer_never_runs(loop: EventLoop) -> None:
    ran: list[str] = []
    # Every deadline from one `now` (call_later would read the clock at each call: a stall
    # between two calls could put the cancelling timer after the one it cancels).
    now = time.monotonic()
    timer = loop.call_at(now + 0.01, lambda: ran.append("cancelled"))
    loop.call_at(now + 0.005, timer.cancel)
    loop.call_at(now + 0.03, loop.stop)

    loop.run()

    assert ran == []


def test_call_soon_threadsafe_runs_callbacks_on_the_loop_thread_in_order(
        loop: EventLoop) -> None:
    seen: list[tuple[int, bool]] = []
    done = threading.Event()
    thread = run_in_thread(loop)

    def record(i: int) -> None:
        seen.append((i, loop.in_loop_thread()))

    def poster() -> None:
        for i in range(100):
            loop.call_soon_threadsafe(functools.partial(record, i))
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=poster).start()
    assert done.wait(WAIT_S)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT_S)

    assert not thread.is_alive()
    assert seen == [(i, True) for i in range(100)]


def test_stop_from_another_thread_ends_a_loop_blocked_with_nothing_to_do(
        loop: EventLoop) -> None:
    thread = run_in_thread(loop)
    loop.call_soon_threadsafe(lambda: None)  # the loop is running and now blocks
    started = time.monotonic()
    loop.stop()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0


def test_a_readable_fd_calls_its_handler_with_the_event_mask(loop: EventLoop) -> None:
    r, w = os.pipe()
    masks: list[int] = []

    def on_readable(mask: int) -> None:
        masks.append(mask)
        os.read(r, 100)
        loop.stop()

    try:
        loop.register(r, EPOLLIN, on_readable)
        os.write(w, b"x")
        loop.run()
    finally:
        loop.unregister(r)
        os.close(r)
        os.close(w)

    assert len(masks) == 1 and masks[0] & EPOLLIN


def test_a_hung_up_fd_is_reported_readable_so_its_handler_sees_the_end(
        loop: EventLoop) -> None:
    r, w = os.pipe()
    reads: list[bytes] = []

    def on_readable(mask: int) -> None:
        assert mask & EPOLLIN
        reads.append(os.read(r, 100))
        loop.stop()

    try:
        loop.register(r, EPOLLIN, on_readable)
        os.close(w)  # EPOLLHUP only
        loop.run()
    finally:
        loop.unregister(r)
        os.close(r)

    assert reads == [b""]


def test_end_of_turn_hooks_run_after_the_turns_events_in_the_order_added(
        loop: EventLoop) -> None:
    order: list[str] = []

    def idle_hook(name: str) -> Callable[[], bool]:
        def hook() -> bool:
            order.append(name)
            return False  # no work left: the loop may block

        return hook

    loop.add_turn_hook(idle_hook("hook1"))
    loop.add_turn_hook(idle_hook("hook2"))
    loop.call_later(0, lambda: order.append("timer"))
    loop.call_later(0.01, loop.stop)

    loop.run()

    first = order.index("timer")
    assert order[first : first + 3] == ["timer", "hook1", "hook2"]


def test_a_busy_hook_keeps_the_loop_turning_without_blocking(loop: EventLoop) -> None:
    """A hook that returns True has work left: the next wait does not block, so the hook runs
    again at once although nothing else happens (no fd, no timer for a long time)."""
    calls = [0]

    def busy_for_five_turns() -> bool:
        calls[0] += 1
        if calls[0] == 5:
            loop.stop()
        return calls[0] < 5

    loop.add_turn_hook(busy_for_five_turns)
    far = loop.call_later(60, lambda: None)
    loop.call_soon_threadsafe(lambda: None)  # the first turn does not block either
    started = time.monotonic()

    loop.run()

    far.cancel()
    assert calls[0] == 5
    assert time.monotonic() - started < 1.0


def test_an_idle_hook_lets_the_loop_block_until_the_next_event(loop: EventLoop) -> None:
    calls = [0]

    def idle() -> bool:
        calls[0] += 1
        return False

    loop.add_turn_hook(idle)
    loop.call_later(0.2, loop.stop)
    loop.run()

    # A turn at start (maybe) and one per event (the timer; stop's wake-up): never a spin.
    assert calls[0] <= 4


def test_an_exception_from_a_handler_ends_the_run(loop: EventLoop) -> None:
    def boom() -> None:
        raise RuntimeError("a bug")

    loop.call_later(0, boom)
    with pytest.raises(RuntimeError, match="a bug"):
        loop.run()


def test_in_loop_thread_is_true_only_on_the_thread_that_runs_it(loop: EventLoop) -> None:
    inside: list[bool] = []
    loop.call_later(0, lambda: inside.append(loop.in_loop_thread()))
    loop.call_later(0.005, loop.stop)
    thread = run_in_thread(loop)
    thread.join(WAIT_S)
    assert inside == [True]
    assert not loop.in_loop_thread()


def test_unregister_of_an_unknown_fd_is_harmless(loop: EventLoop) -> None:
    loop.unregister(12345)
