"""The lock workload's checker flags what it must (overlaps, tokens going back, fencing that did
not hold, stray writes, a lost write) and passes what is allowed (a superseded holder's write
refused by fencing); and the workload itself, against one node over real HTTP, passes with
the real lock and is caught with a broken one."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from raftkv.client import Client
from raftkv.coordination import LOCK_PREFIX, Session
from raftkv.localcluster import wait_until
from tests.support.lock_workload import (
    GuardedOp,
    LockConfig,
    LockHold,
    LockLike,
    LockRecorder,
    LockWorker,
    check_locks,
    lock_stats,
    token_of,
)
from tests.support.single_node import SingleNodeService, serving

KEY = "guarded/x"


def hold(process: int, token: int, start: float, end: float) -> LockHold:
    return LockHold(process, "n1", "acquired", start - 0.1, acquired_at=start, token=token,
                    held_until=end, release_invoke=end + 0.01, release_complete=end + 0.05)


def read(process: int, token: int | None, value: str | None, index: int, at: float,
         note: str = "") -> GuardedOp:
    return GuardedOp(process, token, "read", value, at, at + 0.01, "ok", index, note)


def write(process: int, token: int, value: str, index: int | None, at: float,
          outcome: str = "ok", prev_index: int = 0) -> GuardedOp:
    note = {"ok": "accepted", "failed": "conflict", "unknown": "unknown"}[outcome]
    return GuardedOp(process, token, "write", value, at,
                     None if outcome == "unknown" else at + 0.02, outcome,
                     index if outcome == "ok" else None, note, prev_index)


def clean_history() -> tuple[list[LockHold], list[GuardedOp]]:
    """p0 holds token 10 over [1, 2], p1 token 20 over [2.5, 3.5]; each writes once."""
    holds = [hold(0, 10, 1.0, 2.0), hold(1, 20, 2.5, 3.5)]
    ops = [
        read(0, 10, None, 0, 1.1),
        write(0, 10, "t10-p0-1", 11, 1.2),
        read(1, 20, "t10-p0-1", 11, 2.6),
        write(1, 20, "t20-p1-1", 21, 2.7, prev_index=11),
        read(-1, None, "t20-p1-1", 21, 4.0),
    ]
    return holds, ops


def messages(holds: list[LockHold], ops: list[GuardedOp]) -> list[str]:
    return [v.message for v in check_locks(holds, ops, KEY)]


def test_a_clean_history_passes() -> None:
    holds, ops = clean_history()
    assert messages(holds, ops) == []
    stats = lock_stats(holds, ops)
    assert stats["acquired"] == 2 and stats["writes_accepted"] == 2 and stats["reads"] == 2


def test_an_injected_overlap_of_two_holds_is_flagged() -> None:
    holds, ops = clean_history()
    holds[1] = hold(1, 20, 1.9, 3.5)  # p1 believes it holds while p0 still does
    found = messages(holds, ops)
    assert len(found) == 1 and "mutual exclusion violated" in found[0]
    assert "p0 (token 10)" in found[0] and "p1 (token 20)" in found[0]


def test_holds_that_only_touch_do_not_overlap() -> None:
    holds, ops = clean_history()
    holds[1] = hold(1, 20, 2.0, 3.5)
    assert messages(holds, ops) == []


def test_a_token_given_twice_is_flagged() -> None:
    holds, ops = clean_history()
    holds[1] = hold(1, 10, 2.5, 3.5)
    found = messages(holds, ops)
    assert any("fencing token 10 was given twice" in m for m in found)


def test_tokens_going_back_in_real_time_are_flagged() -> None:
    holds, ops = clean_history()
    holds[0] = hold(0, 30, 1.0, 2.0)  # acquired before p1 asked, yet a higher token
    ops = []
    found = messages(holds, ops)
    assert len(found) == 1 and "fencing tokens went back" in found[0]


def test_a_superseded_holder_s_late_write_accepted_after_a_newer_one_is_flagged() -> None:
    holds, ops = clean_history()
    # p0's write, sent while it held the lock, lands after p1's write: fencing failed.
    ops.insert(4, write(0, 10, "t10-p0-2", 22, 1.9, prev_index=21))
    ops[-1] = read(-1, None, "t10-p0-2", 22, 4.0)
    found = messages(holds, ops)
    assert any("fencing did not hold" in m and "token 10 at index 22" in m
               and "token 20 at index 21" in m for m in found), found


def test_a_superseded_holder_s_write_refused_by_fencing_passes() -> None:
    """Critical sections that overlap in time are allowed when fencing rejects the stale
    one: p0's write sent in time fails its condition; p0's next read sees token 20 and
    stops."""
    holds, ops = clean_history()
    ops += [write(0, 10, "t10-p0-2", None, 1.9, outcome="failed", prev_index=11),
            read(0, 10, "t20-p1-1", 21, 2.8, note="fenced")]
    assert messages(holds, ops) == []
    assert lock_stats(holds, ops)["fenced"] == 1


def test_a_write_outside_any_hold_of_its_own_is_flagged() -> None:
    holds, ops = clean_history()
    ops.append(write(2, 20, "t20-p2-1", 30, 3.0, prev_index=21))
    ops[-2] = read(-1, None, "t20-p2-1", 30, 4.0)
    found = messages(holds, ops)
    assert any("outside a hold of that token of its own" in m for m in found), found


def test_a_lost_acknowledged_write_is_flagged() -> None:
    holds, ops = clean_history()
    ops[-1] = read(-1, None, "t10-p0-1", 11, 4.0)  # the final read went back to p0's value
    found = messages(holds, ops)
    assert found and any("guarded/x" in m for m in found)


def test_two_values_at_one_index_are_flagged() -> None:
    holds, ops = clean_history()
    ops[-1] = read(-1, None, "t20-p1-9", 21, 4.0)
    assert any("two values at index 21" in m for m in messages(holds, ops))


def test_token_of_reads_the_fenced_value_format() -> None:
    assert token_of("t123-p4-5") == 123
    assert token_of("x") is None and token_of(None) is None and token_of(7) is None


# --------------------------------------------------------------------------- the workload
@pytest.fixture
def url() -> Iterator[str]:
    with serving(SingleNodeService(), threads=24) as address:
        yield address


class UnconditionalLock:
    """A broken lock: it writes the lock key whether or not someone holds it."""

    def __init__(self, client: Client, name: str, ttl: int) -> None:
        self._client, self._name, self._ttl = client, name, ttl
        self._session: Session | None = None

    @property
    def held(self) -> bool:
        return self._session is not None and self._session.held

    @property
    def lost(self) -> bool:
        return self._session is not None and self._session.lost

    def acquire(self, timeout_s: float | None = None) -> int:
        self._session = Session(self._client, self._ttl)
        return self._client.put(LOCK_PREFIX + self._name, "mine",
                                lease=self._session.lease_id).index

    def release(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


def run_workers(url: str, *, broken: bool, holds_wanted: int) -> LockRecorder:
    cfg = LockConfig(ttl_s=3, ops_per_hold=(2, 3), think_s=(0.0, 0.02))
    recorder = LockRecorder()
    stop = threading.Event()
    t0 = time.monotonic()

    def factory(client: Client, name: str, ttl: int) -> LockLike:
        return UnconditionalLock(client, name, ttl) if broken else client.lock(name, ttl)

    workers = [LockWorker(p, [url], cfg, random.Random(p), lambda: time.monotonic() - t0,
                          recorder, stop, lock_factory=factory) for p in range(3)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: sum(h.outcome == "acquired" for h in recorder.holds)
                   >= holds_wanted, 20, f"{holds_wanted} holds")
    finally:
        stop.set()
        for w in workers:
            w.join(10)
    assert not any(w.is_alive() for w in workers)
    assert recorder.anomalies == [] and recorder.internal_errors == []
    return recorder


def test_the_workload_with_the_real_lock_passes(url: str) -> None:
    recorder = run_workers(url, broken=False, holds_wanted=12)
    assert [v.message for v in check_locks(recorder.holds, recorder.ops, KEY)] == []
    assert lock_stats(recorder.holds, recorder.ops)["writes_accepted"] >= 12


def test_the_workload_with_a_broken_lock_is_caught(url: str) -> None:
    recorder = run_workers(url, broken=True, holds_wanted=12)
    found = [v.message for v in check_locks(recorder.holds, recorder.ops, KEY)]
    assert any("mutual exclusion violated" in m for m in found), found
    # Fencing still refused every stale write: what overlapped was the holds.
    assert not any("fencing did not hold" in m for m in found)
