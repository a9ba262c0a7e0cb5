"""Waitress tasks as greenlets (raftkv.http.green): a task runs until it waits, the loop
resumes it with its answer or at its deadline, blocking work runs on a thread while the loop
goes on. The test thread plays waitress's loop: it adds tasks and calls run_ready()."""

from __future__ import annotations

import functools
import gc
import logging
import os
import random
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from greenlet import getcurrent

from raftkv.http import green
from raftkv.http.green import (
    IDLE_RUNNERS,
    TIMED_OUT,
    GreenCondition,
    GreenDispatcher,
    Suspended,
)

WAIT_S = 5.0


class Task:
    """A waitress task whose service() runs `body` (in its greenlet)."""

    def __init__(self, body: Callable[[], Any]) -> None:
        self._body = body
        self.result: Any = None
        self.finished = False

    def service(self) -> None:
        self.result = self._body()
        self.finished = True


def turn_until(d: GreenDispatcher, cond: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Turn the loop as waitress's does (poll the wake-up fd, run_ready) until cond()."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "the condition never came true"
        readable, _, _ = select.select([d.wake_fd], [], [], d.timeout(0.05))
        if readable:
            d.drain_wakeups()
        d.run_ready()


def waits_once(d: GreenDispatcher, handles: list[Suspended],
               deadline: float | None = None) -> Callable[[], object]:
    """A task body that waits once: its handle goes to `handles`, and it returns what it was
    resumed with."""

    def body() -> object:
        handle, wait = d.suspend(deadline)
        handles.append(handle)
        return wait()

    return body


def test_a_task_runs_until_it_suspends_and_resumes_with_the_value_given() -> None:
    d = GreenDispatcher()
    handles: list[Suspended] = []
    steps: list[str] = []

    def body() -> object:
        steps.append("before")
        handle, wait = d.suspend(None)
        handles.append(handle)
        value = wait()
        steps.append("after")
        return value

    task = Task(body)
    d.add_task(task)
    assert steps == [] and d.tasks == 1, "add_task only queues it"

    d.run_ready()
    assert steps == ["before"] and not task.finished
    assert not d.has_ready()

    assert d.resume(handles[0], "the answer")
    d.run_ready()
    finished: bool = task.finished  # read anew: run_ready() ran the task to its end
    assert finished and task.result == "the answer"
    assert steps == ["before", "after"]
    assert d.tasks == 0


def test_a_handle_is_resumed_once() -> None:
    d = GreenDispatcher()
    handles: list[Suspended] = []

    def body() -> object:
        handle, wait = d.suspend(None)
        handles.append(handle)
        return wait()

    task = Task(body)
    d.add_task(task)
    d.run_ready()
    assert d.resume(handles[0], 1)
    assert not d.resume(handles[0], 2)
    d.run_ready()
    assert task.result == 1


def test_a_wait_past_its_deadline_returns_timed_out_and_a_late_answer_is_refused() -> None:
    d = GreenDispatcher()
    handles: list[Suspended] = []
    task = Task(waits_once(d, handles, time.monotonic() + 0.05))
    d.add_task(task)
    d.run_ready()
    assert 0 < d.timeout(10.0) <= 0.05, "the loop wakes up for the deadline"

    started = time.monotonic()
    turn_until(d, lambda: task.finished)

    assert task.result is TIMED_OUT
    assert time.monotonic() - started >= 0.04
    assert not d.resume(handles[0], "too late")


def test_an_answer_before_the_deadline_wins_over_the_timeout() -> None:
    d = GreenDispatcher()
    handles: list[Suspended] = []

    def body() -> object:
        handle, wait = d.suspend(time.monotonic() + 0.05)
        handles.append(handle)
        first = wait()
        handle2, wait2 = d.suspend(time.monotonic() + 0.05)
        handles.append(handle2)
        return first, wait2()

    task = Task(body)
    d.add_task(task)
    d.run_ready()
    d.resume(handles[0], "in time")
    turn_until(d, lambda: task.finished)
    assert task.result == ("in time", TIMED_OUT), "the first deadline did not fire later"


def test_the_loop_may_block_only_when_no_greenlet_is_ready() -> None:
    d = GreenDispatcher()
    assert d.timeout(1.5) == 1.5
    d.add_task(Task(lambda: None))
    assert d.timeout(1.5) == 0.0
    d.run_ready()
    assert d.timeout(1.5) == 1.5


def test_thousands_of_suspended_greenlets_each_get_their_own_answer() -> None:
    d = GreenDispatcher()
    count = 5000
    handles: dict[int, Suspended] = {}

    def make(i: int) -> Callable[[], object]:
        def body() -> object:
            handle, wait = d.suspend(time.monotonic() + 60)
            handles[i] = handle
            return wait()
        return body

    tasks = [Task(make(i)) for i in range(count)]
    for t in tasks:
        d.add_task(t)
    d.run_ready()
    assert len(handles) == count and d.tasks == count

    order = list(range(count))
    random.Random(5).shuffle(order)
    for i in order:
        d.resume(handles[i], f"answer {i}")
    d.run_ready()

    assert [t.result for t in tasks] == [f"answer {i}" for i in range(count)]
    assert d.tasks == 0


def test_after_run_hooks_run_after_each_round_of_greenlets() -> None:
    """A worker flushes the requests its greenlets queued after each round: every greenlet of
    the round has run (and queued) before the hook."""
    d = GreenDispatcher()
    events: list[str] = []
    d.after_run.append(lambda: events.append("flush"))
    for name in ("a", "b"):
        d.add_task(Task(functools.partial(events.append, name)))
    d.run_ready()
    assert events == ["a", "b", "flush"]


def test_run_in_thread_returns_the_result_while_other_greenlets_keep_running() -> None:
    d = GreenDispatcher()
    release = threading.Event()
    ran_meanwhile: list[str] = []

    def blocking() -> str:
        assert release.wait(WAIT_S)
        return f"done on {threading.current_thread().name}"

    slow = Task(lambda: d.run_in_thread(blocking))
    quick = Task(lambda: ran_meanwhile.append("quick"))
    d.add_task(slow)
    d.run_ready()
    d.add_task(quick)
    turn_until(d, lambda: quick.finished)
    assert ran_meanwhile == ["quick"] and not slow.finished

    release.set()
    turn_until(d, lambda: slow.finished)
    assert slow.result == "done on http-blocking"


def test_run_in_thread_raises_the_functions_exception_in_the_greenlet() -> None:
    d = GreenDispatcher()

    def failing() -> None:
        raise ValueError("from the thread")

    def body() -> object:
        try:
            d.run_in_thread(failing)
        except ValueError as e:
            return str(e)
        return "no exception"

    task = Task(body)
    d.add_task(task)
    turn_until(d, lambda: task.finished)
    assert task.result == "from the thread"


def test_post_from_another_thread_wakes_the_loop_and_runs_there() -> None:
    d = GreenDispatcher()
    ran_on: list[str] = []
    threading.Thread(target=lambda: d.post(
        lambda: ran_on.append(threading.current_thread().name))).start()
    readable, _, _ = select.select([d.wake_fd], [], [], WAIT_S)
    assert readable, "the wake-up fd became readable"
    d.run_ready()
    assert ran_on == [threading.current_thread().name]


def test_a_task_that_raises_is_logged_and_counted_finished(
        caplog: pytest.LogCaptureFixture) -> None:
    d = GreenDispatcher()

    def broken() -> None:
        raise RuntimeError("bug in a task")

    d.add_task(Task(broken))
    ok = Task(lambda: "fine")
    d.add_task(ok)
    with caplog.at_level(logging.ERROR, logger="raftkv.http.green"):
        d.run_ready()
    assert "event=http_task_failed" in caplog.text
    assert ok.finished and d.tasks == 0


def test_a_finished_task_leaves_its_greenlet_to_the_next_one_even_after_an_error() -> None:
    d = GreenDispatcher()
    ran_in: list[object] = []

    def broken() -> None:
        ran_in.append(getcurrent())
        raise RuntimeError("bug in a task")

    d.add_task(Task(broken))
    d.run_ready()
    nxt = Task(lambda: ran_in.append(getcurrent()))
    d.add_task(nxt)
    d.run_ready()
    assert nxt.finished and d.tasks == 0
    assert ran_in[0] is ran_in[1], "the second task ran in the first one's greenlet"


def test_a_reused_greenlet_is_not_resumed_by_its_previous_tasks_handles() -> None:
    """A handle of an earlier task (resumed by its answer, its deadline still queued) must
    not wake the task that now runs in the same greenlet."""
    d = GreenDispatcher()
    first_handle: list[Suspended] = []
    t1 = Task(waits_once(d, first_handle, time.monotonic() + 0.05))
    d.add_task(t1)
    d.run_ready()
    assert d.resume(first_handle[0], "answer")
    d.run_ready()
    assert t1.result == "answer"

    second_handle: list[Suspended] = []
    t2 = Task(waits_once(d, second_handle))
    d.add_task(t2)
    d.run_ready()
    assert not d.resume(first_handle[0], "stale"), "the old handle was resumed already"
    turn_until(d, lambda: not d._timers)  # the first wait's deadline came due and was dropped
    assert not t2.finished, "neither the stale answer nor the old deadline woke the new task"
    d.resume(second_handle[0], "mine")
    d.run_ready()
    assert t2.result == "mine"


def test_a_runner_made_inside_a_request_ends_into_the_loop_not_into_its_maker(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Waitress adds a channel's next pipelined request from inside the current request's
    greenlet. When that new runner later ends (enough runners idle), control must go back to
    the loop, not resume the runner that made it (parked in the idle list, it would take
    the return value for a task)."""
    monkeypatch.setattr(green, "IDLE_RUNNERS", 1)
    d = GreenDispatcher()
    handles: list[Suspended] = []
    b = Task(waits_once(d, handles))
    d.add_task(Task(lambda: d.add_task(b)))  # a: queues b from inside its greenlet
    d.run_ready()  # a ends and parks; b runs in a runner made inside a, and waits
    d.add_task(Task(lambda: None))  # takes a's parked runner, which parks again: 1 idle
    d.run_ready()
    with caplog.at_level(logging.ERROR, logger="raftkv.http.green"):
        d.resume(handles[0], "done")
        d.run_ready()  # b's runner ends (one is idle already)
    assert b.finished and d.tasks == 0
    assert "event=http_task_failed" not in caplog.text
    assert len(d._idle) == 1


def test_a_parked_runner_keeps_nothing_of_its_last_task_alive() -> None:
    d = GreenDispatcher()
    task = Task(lambda: b"x" * 1024)
    ref = weakref.ref(task)
    d.add_task(task)
    d.run_ready()
    assert task.finished and len(d._idle) == 1
    del task
    gc.collect()
    assert ref() is None, "the parked runner still holds its last task (and its request)"


def test_at_most_idle_runners_greenlets_are_kept() -> None:
    d = GreenDispatcher()
    handles: list[Suspended] = []
    tasks = [Task(waits_once(d, handles)) for _ in range(IDLE_RUNNERS + 50)]
    for task in tasks:
        d.add_task(task)
    d.run_ready()
    for handle in handles:
        d.resume(handle, None)
    d.run_ready()
    assert all(t.finished for t in tasks) and d.tasks == 0
    assert len(d._idle) == IDLE_RUNNERS
    assert len({id(g) for g in d._idle}) == IDLE_RUNNERS
    assert all(not g.dead for g in d._idle)


def test_in_request_tells_a_request_greenlet_from_the_loop() -> None:
    d = GreenDispatcher()
    seen: list[bool] = []
    d.add_task(Task(lambda: seen.append(d.in_request)))
    d.run_ready()
    assert seen == [True]
    assert not d.in_request


# -- GreenCondition: waitress's output lock on a channel served by greenlets -----------------


def test_a_condition_wait_suspends_the_greenlet_until_notified() -> None:
    d = GreenDispatcher()
    cond = GreenCondition(d)
    steps: list[str] = []

    def body() -> object:
        with cond:
            steps.append("waiting")
            notified = cond.wait()
            steps.append("woken")
            return notified

    task = Task(body)
    d.add_task(task)
    d.run_ready()
    assert steps == ["waiting"] and not task.finished, "the loop goes on meanwhile"
    with cond:  # the loop's side: acquire never blocks
        cond.notify()
    d.run_ready()
    finished: bool = task.finished  # read anew: run_ready() ran the task to its end
    assert finished and task.result is True


def test_notify_wakes_one_waiter_and_notify_all_the_rest() -> None:
    d = GreenDispatcher()
    cond = GreenCondition(d)
    tasks = [Task(cond.wait) for _ in range(3)]
    for t in tasks:
        d.add_task(t)
    d.run_ready()

    cond.notify()
    d.run_ready()
    assert [t.finished for t in tasks] == [True, False, False]
    cond.notify_all()
    d.run_ready()
    assert all(t.finished for t in tasks)


def test_a_timed_out_waiter_does_not_swallow_a_notify() -> None:
    d = GreenDispatcher()
    cond = GreenCondition(d)
    impatient = Task(lambda: cond.wait(0.01))
    patient = Task(cond.wait)
    d.add_task(impatient)
    d.add_task(patient)
    d.run_ready()
    turn_until(d, lambda: impatient.finished)
    assert impatient.result is False

    cond.notify()
    d.run_ready()
    assert patient.finished and patient.result is True


def test_a_condition_wait_outside_a_request_returns_at_once() -> None:
    """The loop itself must never wait: it is what notifies."""
    cond = GreenCondition(GreenDispatcher())
    assert cond.acquire(False) is True
    assert cond.wait() is False
    cond.release()


def test_a_post_after_close_writes_nothing_anywhere() -> None:
    """The wake-up pipe used to stay open for ever (two descriptors per server made in a
    process), and a post() arriving after its owner was done wrote into it; were it closed
    without care, into whatever reused the number. close() closes it, and a later post()
    (a blocking task's thread finishing late) writes nothing."""
    d = GreenDispatcher()
    fds = (d._wake_r, d._wake_w)
    d.close()
    d.close()  # once is enough; twice is harmless
    reused = os.pipe()  # the lowest free numbers: the ones the wake-up pipe had
    try:
        if reused != fds:
            pytest.skip("another thread took the descriptor numbers first")
        d.post(lambda: None)
        assert select.select([reused[0]], [], [], 0)[0] == []  # nothing was written
        d.drain_wakeups()  # reads nothing either
    finally:
        os.close(reused[0])
        os.close(reused[1])


def test_a_post_from_a_signal_handler_inside_a_post_does_not_deadlock() -> None:
    """Found by review: a worker's SIGTERM handler posts on the loop thread, which may be
    inside post() already; with a plain lock there, the handler waited for ever."""
    d = GreenDispatcher()
    try:
        inner: list[bool] = []
        real_write = os.write

        def write_with_a_signal(fd: int, data: bytes) -> int:
            if not inner:  # the "signal" arrives while the outer post() holds the lock
                inner.append(True)
                d.post(lambda: None)
            return real_write(fd, data)

        green.os.write = write_with_a_signal  # type: ignore[attr-defined]
        done = threading.Event()

        def outer() -> None:
            d.post(lambda: None)
            done.set()

        threading.Thread(target=outer, daemon=True).start()
        assert done.wait(WAIT_S), "post() deadlocked on its own lock"
        assert inner == [True]
    finally:
        green.os.write = real_write  # type: ignore[attr-defined]
    d.close()  # not when stuck: it would wait for the same lock
