"""A lock workload against real processes, and the checker of its history (mutual exclusion
with fencing tokens). Used by tests/cluster/test_leases.py and by the faults suite's `locks`
workload (tests/faults).

Workers are threads, each with its own raftkv Client, contending for ONE lock
(`client.lock(name, ttl)`, raftkv.coordination). A worker loops: acquire the lock (bounded
wait), run a critical section of a few *protected operations*, release. A protected operation
is the fencing pattern on a guarded key (no lease): a linearizable read of the key, whose
value names the fencing token of its writer; if that token is higher than the worker's own,
the worker has been superseded: it stops (`fenced`); otherwise it writes its own token with a
compare-and-swap on the index it read (`prev_index`), so that no write lands between its check
and its write (a failed condition, `conflict`, is read again). The key therefore plays a
resource that refuses tokens lower than the highest it has seen. Before each operation, and
just before releasing, the worker asks its lock whether it still certainly holds it
(`lock.held`: the lease cannot have expired yet by the client's own clock).

Everything is recorded with one clock (monotonic seconds since the load started, the same
for every worker):

- a `LockHold` per attempt to take the lock: when the acquire was invoked and answered, its
  fencing token, and `held_until`, the last moment the worker saw `lock.held` True before it
  released (or gave up) - the end of the interval during which it believed it held the lock;
- a `GuardedOp` per read and write of the guarded key, with its outcome and raft index.

`check_locks` then proves, for the whole history:

1. **unique tokens**: no two acquisitions got the same fencing token;
2. **tokens increase with real time**: a hold acquired before another one was even asked
   for has the lower token;
3. **mutual exclusion**: the intervals [acquired, held_until] of different holds never
   overlap (the lease guarantee, raftkv.kv.leases rule 4: the cluster does not revoke a lease
   before its holder's last confirmed keepalive send time plus the TTL, so the next holder
   cannot win before the last one stopped believing it held the lock);
4. **fencing**: every value the guarded key is seen with (OK reads, acknowledged writes, the
   final read), in raft index order, carries non-decreasing tokens: no holder's write landed
   after a write of a later holder. Where critical sections overlap in time (a write sent in
   time but applied late), this is what must hold: fencing rejected the stale one;
5. **accounting**: every acknowledged write carries the token of a hold of its own worker
   and was sent between that hold's acquisition and its release;
6. the guarded key's history is linearizable (a register: reads, CAS writes that took
   effect, failed or unknown ones), which also catches a lost acknowledged write.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from raftkv.client import (
    Client,
    ClientError,
    ConditionFailed,
    KeyNotFound,
    OutcomeUnknown,
)
from raftkv.coordination import LockTimeout
from tests.support.linearizability import (
    Operation,
    Outcome,
    check_history,
    format_violation,
)

__all__ = [
    "GuardedOp",
    "LockConfig",
    "LockHold",
    "LockRecorder",
    "LockViolation",
    "LockWorker",
    "check_locks",
    "final_guarded_read",
    "lock_stats",
    "token_of",
]


# =========================================================================== configuration
@dataclass(frozen=True, slots=True)
class LockConfig:
    name: str = "x"
    """The lock contended for (its key is raftkv.coordination.LOCK_PREFIX + name)."""
    ttl_s: int = 2
    guarded_key: str = "guarded/x"
    ops_per_hold: tuple[int, int] = (1, 3)
    """Protected operations per critical section (inclusive range)."""
    think_s: tuple[float, float] = (0.0, 0.15)
    """Pause between two protected operations (and after a release)."""
    acquire_timeout_s: float = 8.0
    client_timeout_s: float = 2.0
    """The workers' Client timeout (server wait); keepalives use min(this, ttl/3)."""
    client_retries: int = 4


# =========================================================================== the history
@dataclass(slots=True)
class LockHold:
    """One attempt to take the lock, and the hold that followed if it was won."""

    process: int
    node: str
    """The node the worker's client tried first."""
    outcome: str
    """acquired | timeout (not won in time) | failed (an error: no hold) """
    acquire_invoke: float
    acquired_at: float | None = None
    token: int | None = None
    held_until: float | None = None
    """The last moment the worker saw lock.held True (acquired_at at least)."""
    release_invoke: float | None = None
    release_complete: float | None = None
    lost: bool = False
    """The client noticed the loss (lock.lost) before releasing."""
    ops: int = 0
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return {"type": "lock_hold", **dataclasses.asdict(self)}


@dataclass(slots=True)
class GuardedOp:
    """A read or a write of the guarded key."""

    process: int
    token: int | None
    """The fencing token of the hold it was done under (None: the final read)."""
    kind: str
    """read | write"""
    value: str | None
    """A write's value; a read's value (None: the key was absent)."""
    invoke: float
    complete: float | None
    outcome: str
    """ok | failed | unknown (linearizability outcomes)"""
    index: int | None = None
    """A read's: the index of the write it saw (0: absent); an OK write's: its index."""
    note: str = ""
    """write: accepted | conflict (condition failed) | unknown | failed;
    read: fenced (it saw a higher token: the critical section stopped) or empty."""
    prev_index: int | None = None
    """A write's condition."""

    def to_json(self) -> dict[str, object]:
        return {"type": "guarded_op", **dataclasses.asdict(self)}

    def operation(self, key: str) -> Operation:
        return Operation(self.process, self.kind, key, self.value, self.invoke,
                         self.complete, Outcome(self.outcome))


def value_for(token: int, process: int, seq: int) -> str:
    return f"t{token}-p{process}-{seq}"


def token_of(value: object) -> int | None:
    """The fencing token a guarded value names (`t<token>-p<process>-<seq>`)."""
    if not isinstance(value, str) or not value.startswith("t"):
        return None
    head = value[1:].split("-", 1)[0]
    return int(head) if head.isdigit() else None


class LockRecorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holds: list[LockHold] = []
        self.ops: list[GuardedOp] = []
        self.anomalies: list[str] = []
        self.internal_errors: list[str] = []
        self.auth_refusals: list[str] = []
        """401/403 answers: the workers' token was dropped or wrong (a problem)."""

    def hold(self, hold: LockHold) -> None:
        with self._lock:
            self.holds.append(hold)

    def op(self, op: GuardedOp) -> None:
        with self._lock:
            self.ops.append(op)

    def anomaly(self, text: str) -> None:
        with self._lock:
            self.anomalies.append(text)

    def error(self, process: int, what: str, e: ClientError) -> None:
        """An answer no fault explains (a 5xx other than 503, 504 and 507) is a problem, and
        so is a refused token (401, 403)."""
        if e.status >= 500 and e.status not in (503, 504, 507):
            with self._lock:
                self.internal_errors.append(f"p{process} {what}: {e}")
        elif e.status in (401, 403):
            with self._lock:
                self.auth_refusals.append(f"p{process} {what}: {e}")


# =========================================================================== the worker
class LockLike(Protocol):
    """What a worker needs of a lock (raftkv.coordination.Lock; tests inject broken ones)."""

    @property
    def held(self) -> bool: ...

    @property
    def lost(self) -> bool: ...

    def acquire(self, timeout_s: float | None = None) -> int: ...

    def release(self) -> None: ...


LockFactory = Callable[[Client, str, int], LockLike]


def _real_lock(client: Client, name: str, ttl: int) -> LockLike:
    return client.lock(name, ttl)


class LockWorker(threading.Thread):
    """Takes the lock, does protected operations, releases; until `stop` is set."""

    def __init__(self, process: int, urls: Sequence[str], cfg: LockConfig,
                 rng: random.Random, clock: Callable[[], float], recorder: LockRecorder,
                 stop: threading.Event, *, lock_factory: LockFactory = _real_lock,
                 token: str | None = None) -> None:
        super().__init__(name=f"lock-worker-{process}", daemon=True)
        self.process = process
        self.urls = list(urls)
        self.cfg = cfg
        self.rng = rng
        self.clock = clock
        self.recorder = recorder
        self.stop_event = stop
        self.lock_factory = lock_factory
        self.token = token
        """Sent by the worker's Client (`Authorization: Bearer`); None: no header."""
        self._seq = 0

    def run(self) -> None:
        cfg = self.cfg
        try:
            with Client(self.urls, timeout_s=cfg.client_timeout_s,
                        retries=cfg.client_retries, token=self.token) as client:
                while not self.stop_event.is_set():
                    self.hold_once(client)
                    self.stop_event.wait(self.rng.uniform(*cfg.think_s))
        except Exception as e:  # a bug of the worker (or the client): fail the run
            self.recorder.anomaly(f"p{self.process} died: {type(e).__name__}: {e}\n"
                                  + traceback.format_exc())

    def hold_once(self, client: Client) -> LockHold:
        cfg = self.cfg
        hold = LockHold(self.process, self.urls[0], "failed", self.clock())
        try:
            lock = self.lock_factory(client, cfg.name, cfg.ttl_s)
            token = lock.acquire(timeout_s=cfg.acquire_timeout_s)
        except LockTimeout as e:
            hold.outcome, hold.detail = "timeout", str(e)
            self.recorder.hold(hold)
            return hold
        except ClientError as e:  # no leader, unreachable, outcome unknown: no hold
            self.recorder.error(self.process, "acquire", e)
            hold.detail = f"{type(e).__name__}: {e}"
            self.recorder.hold(hold)
            self.stop_event.wait(self.rng.uniform(0.05, 0.2))
            return hold
        hold.acquired_at = hold.held_until = self.clock()
        hold.outcome, hold.token = "acquired", token
        try:
            self._critical_section(client, lock, hold, token)
            now = self.clock()
            if lock.held:
                hold.held_until = now
            hold.lost = lock.lost
        finally:
            hold.release_invoke = self.clock()
            try:
                lock.release()
            except ClientError as e:  # the lease then expires by itself
                self.recorder.error(self.process, "release", e)
                hold.detail = f"release: {type(e).__name__}: {e}"
            hold.release_complete = self.clock()
            self.recorder.hold(hold)
        return hold

    def _critical_section(self, client: Client, lock: LockLike, hold: LockHold,
                          token: int) -> None:
        planned = self.rng.randint(*self.cfg.ops_per_hold)
        while hold.ops < planned and not self.stop_event.is_set():
            now = self.clock()
            if not lock.held:
                return
            hold.held_until = now
            hold.ops += 1
            if self._protected_write(client, token) in ("fenced", "failed", "unknown"):
                return
            self.stop_event.wait(self.rng.uniform(*self.cfg.think_s))

    def _protected_write(self, client: Client, token: int) -> str:
        """Read the guarded key; refuse if a higher token wrote it; else CAS our token in.
        accepted | fenced | conflict | failed | unknown."""
        key = self.cfg.guarded_key
        read = GuardedOp(self.process, token, "read", None, self.clock(), None, "failed")
        try:
            current = client.get(key)
            read.value = current.value if isinstance(current.value, str) else repr(
                current.value)
            read.index = current.index
        except KeyNotFound:
            read.index = 0
        except ClientError as e:
            self.recorder.error(self.process, f"read of {key}", e)
            read.complete, read.note = self.clock(), f"{type(e).__name__}"
            self.recorder.op(read)
            return "failed"
        read.complete, read.outcome = self.clock(), "ok"
        seen = token_of(read.value)
        if read.value is not None and seen is None:
            self.recorder.anomaly(f"p{self.process}: {key} holds {read.value!r}, not a "
                                  "fenced value")
        if seen is not None and seen > token:
            read.note = "fenced"
            self.recorder.op(read)
            return "fenced"
        self.recorder.op(read)
        self._seq += 1
        value = value_for(token, self.process, self._seq)
        assert read.index is not None
        write = GuardedOp(self.process, token, "write", value, self.clock(), None, "unknown",
                          prev_index=read.index)
        try:
            answer = client.put(key, value, prev_index=read.index)
        except ConditionFailed:
            write.complete, write.outcome, write.note = self.clock(), "failed", "conflict"
        except OutcomeUnknown as e:
            self.recorder.error(self.process, f"write of {key}", e)
            write.note = "unknown"
        except ClientError as e:  # surely not applied (the client says OutcomeUnknown else)
            self.recorder.error(self.process, f"write of {key}", e)
            write.complete, write.outcome = self.clock(), "failed"
            write.note = f"failed: {type(e).__name__}"
        else:
            write.complete, write.outcome, write.note = self.clock(), "ok", "accepted"
            write.index = answer.index
            if answer.value != value:
                self.recorder.anomaly(f"p{self.process}: the write of {value!r} answered "
                                      f"{answer.value!r}")
        self.recorder.op(write)
        return "accepted" if write.outcome == "ok" else (
            "conflict" if write.note == "conflict" else
            "unknown" if write.outcome == "unknown" else "failed")


def final_guarded_read(urls: Sequence[str], key: str, clock: Callable[[], float],
                       timeout_s: float = 5.0, *, token: str | None = None) -> GuardedOp:
    """A linearizable read of the guarded key once the load is over (process -1)."""
    op = GuardedOp(-1, None, "read", None, clock(), None, "failed")
    with Client(list(urls), timeout_s=timeout_s, token=token) as client:
        try:
            found = client.get(key)
            op.value, op.index = str(found.value), found.index
        except KeyNotFound:
            op.index = 0
        except ClientError as e:
            op.complete, op.note = clock(), f"{type(e).__name__}: {e}"
            return op
    op.complete, op.outcome = clock(), "ok"
    return op


# =========================================================================== the checker
@dataclass(frozen=True, slots=True)
class LockViolation:
    message: str
    start: float
    """The time window it concerns (for showing the faults around it)."""
    end: float

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class _Seen:
    index: int
    token: int
    value: str
    what: str
    at: float


def check_locks(holds: Iterable[LockHold], ops: Iterable[GuardedOp], guarded_key: str,
                ) -> list[LockViolation]:
    """Every problem of a lock history (see the module doc); empty: mutual exclusion held."""
    holds = list(holds)
    ops = list(ops)
    won = sorted((h for h in holds if h.outcome == "acquired"),
                 key=lambda h: (h.acquired_at or 0.0, h.token or 0))
    out: list[LockViolation] = []

    # 1. unique tokens
    by_token: dict[int, LockHold] = {}
    for h in won:
        assert h.token is not None and h.acquired_at is not None
        other = by_token.setdefault(h.token, h)
        if other is not h:
            out.append(LockViolation(
                f"fencing token {h.token} was given twice: p{other.process} acquired at "
                f"{other.acquired_at:.3f}s and p{h.process} at {h.acquired_at:.3f}s",
                min(other.acquire_invoke, h.acquire_invoke), h.acquired_at))

    # 2. tokens increase with real time
    for a in won:
        for b in won:
            assert a.acquired_at is not None and a.token is not None and b.token is not None
            if a is not b and a.acquired_at < b.acquire_invoke and a.token >= b.token:
                out.append(LockViolation(
                    f"fencing tokens went back: p{a.process} acquired token {a.token} at "
                    f"{a.acquired_at:.3f}s, before p{b.process} even asked (at "
                    f"{b.acquire_invoke:.3f}s), yet p{b.process} got token {b.token}",
                    a.acquire_invoke, b.acquired_at or b.acquire_invoke))

    # 3. mutual exclusion of the believed-held intervals
    for i, a in enumerate(won):
        for b in won[i + 1:]:
            assert a.acquired_at is not None and a.held_until is not None
            assert b.acquired_at is not None and b.held_until is not None
            if max(a.acquired_at, b.acquired_at) < min(a.held_until, b.held_until):
                out.append(LockViolation(
                    f"mutual exclusion violated: p{a.process} (token {a.token}) held the lock "
                    f"from {a.acquired_at:.3f}s to {a.held_until:.3f}s and p{b.process} "
                    f"(token {b.token}) from {b.acquired_at:.3f}s to {b.held_until:.3f}s",
                    min(a.acquired_at, b.acquired_at), max(a.held_until, b.held_until)))

    # 4. fencing: tokens never go back along the guarded key's indices
    seen: dict[int, _Seen] = {}
    for op in ops:
        if op.outcome != "ok" or op.index is None or op.index == 0:
            continue
        if op.kind == "read" and op.value is None:
            continue
        token = token_of(op.value)
        if token is None:
            out.append(LockViolation(f"p{op.process} saw {guarded_key} = {op.value!r} at "
                                     f"index {op.index}: not a fenced value",
                                     op.invoke, op.complete or op.invoke))
            continue
        what = (f"p{op.process} {op.kind} {op.value!r}" if op.process >= 0
                else f"the final read {op.value!r}")
        assert op.value is not None
        earlier = seen.setdefault(op.index, _Seen(op.index, token, op.value, what, op.invoke))
        if earlier.value != op.value:
            out.append(LockViolation(
                f"{guarded_key} had two values at index {op.index}: {earlier.what} and {what}",
                min(earlier.at, op.invoke), op.complete or op.invoke))
    top: _Seen | None = None
    for s in sorted(seen.values(), key=lambda s: s.index):
        if top is not None and s.token < top.token:
            out.append(LockViolation(
                f"fencing did not hold: {guarded_key} was written with token {s.token} at "
                f"index {s.index} ({s.what}) after token {top.token} at index {top.index} "
                f"({top.what}): a superseded holder's write was accepted",
                min(top.at, s.at), max(top.at, s.at)))
        if top is None or s.token >= top.token:
            top = s

    # 5. accounting: acknowledged writes belong to a hold of their own worker
    for op in ops:
        if op.kind != "write" or op.outcome != "ok" or op.process < 0:
            continue
        hold = by_token.get(op.token) if op.token is not None else None
        if hold is None or hold.process != op.process or hold.acquired_at is None or not (
                hold.acquired_at <= op.invoke <= (hold.release_invoke or op.invoke)):
            out.append(LockViolation(
                f"p{op.process} wrote {op.value!r} (token {op.token}) at {op.invoke:.3f}s "
                "outside a hold of that token of its own", op.invoke,
                op.complete or op.invoke))

    # 6. the guarded key is a linearizable register
    result = check_history(op.operation(guarded_key) for op in ops)
    for v in result.violations:
        times = [o.invoke for o in v.operations]
        out.append(LockViolation(format_violation(v), min(times, default=0.0),
                                 max(times, default=0.0)))
    return out


def lock_stats(holds: Iterable[LockHold], ops: Iterable[GuardedOp]) -> dict[str, int]:
    holds = list(holds)
    ops = list(ops)
    return {
        "acquired": sum(h.outcome == "acquired" for h in holds),
        "acquire_timeouts": sum(h.outcome == "timeout" for h in holds),
        "acquire_failures": sum(h.outcome == "failed" for h in holds),
        "lost": sum(h.lost for h in holds),
        "reads": sum(o.kind == "read" and o.outcome == "ok" for o in ops if o.process >= 0),
        "fenced": sum(o.note == "fenced" for o in ops),
        "writes_accepted": sum(o.note == "accepted" for o in ops),
        "writes_conflict": sum(o.note == "conflict" for o in ops),
        "writes_unknown": sum(o.kind == "write" and o.outcome == "unknown" for o in ops),
        "writes_failed": sum(o.kind == "write" and o.note.startswith("failed") for o in ops),
    }
