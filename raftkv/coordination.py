"""Locks and leader elections on leases, for clients: `Client.lock()`, `Client.election()`.

    with client.lock("nightly-report", ttl=10) as lock:
        storage.write(report, fencing_token=lock.fencing_token)

How it works (as etcd's `concurrency` package, simplified to one key per lock):

- A holder first takes a *session*: a lease of `ttl` seconds that a background thread keeps
  alive every ttl/3 (with its own Client: a Client is not thread-safe).
- It acquires by creating the key `LOCK_PREFIX + name` (elections: `ELECTION_PREFIX + name`)
  on its lease, only if absent (`prev_index=0`). If someone else holds it, it waits with a
  watch (`GET /keys/<key>/?wait=true&index=n`, a long poll: no polling) until the key
  changes, and tries again. Waiters are not queued: whoever tries first after a release wins.
- The holder releases by revoking its lease, which deletes the key. If the holder dies or is
  cut off, its keepalives stop, the lease expires and the key is deleted: the lock is free.
- The **fencing token** is the index of the put that acquired the key. Successive holders of
  one lock get strictly increasing tokens. A holder can be paused (GC, swap, SIGSTOP) past its
  lease and wake up believing it still holds the lock, so pass the token with every action
  taken under the lock, and have the protected resource refuse tokens lower than the highest
  it has seen.
- The holder's own view: the lock is **held** from the acquiring answer until the send time of
  the last keepalive answered OK plus the TTL (raftkv.kv.leases, rule 4: the cluster does not
  revoke the lease before then). If keepalives fail until then, or the cluster says the lease
  is gone, the lock is **lost**: `lost` turns True and `on_lost` is called once (from the
  keepalive thread). Exiting the `with` block still releases (revokes) it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Final

from raftkv.client import (
    Client,
    ClientError,
    ConditionFailed,
    KeyNotFound,
    LeaseNotFound,
    OutcomeUnknown,
)
from raftkv.service import MIN_LEASE_TTL_S, ReadResult

__all__ = ["ELECTION_PREFIX", "LOCK_PREFIX", "Election", "Lock", "LockTimeout", "Session"]

log = logging.getLogger(__name__)

LOCK_PREFIX: Final = "_lock/"
"""Lock `name` lives in the key `_lock/name`: its value says who holds it."""
ELECTION_PREFIX: Final = "_election/"
"""Election `name` lives in the key `_election/name`: its value is the leader's."""
_RETRY_FRACTION: Final = 10
"""After a failed keepalive, try again after ttl/10 (the Client itself retries in between)."""


class LockTimeout(ClientError):
    """The lock (or the election) was not won within the time asked for."""


Clock = Callable[[], float]


class Session:
    """A lease kept alive in the background until closed, and whether it still certainly
    lives (`held`) by this process's monotonic clock."""

    def __init__(self, client: Client, ttl: int, *, on_lost: Callable[[], None] | None = None,
                 clock: Clock = time.monotonic) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < MIN_LEASE_TTL_S:
            raise ValueError(f"ttl must be a whole number of seconds >= {MIN_LEASE_TTL_S}")
        self.ttl = ttl
        self._client = client
        self._keepalive_client = client.clone(timeout_s=min(client.timeout_s, ttl / 3),
                                              retry_budget_s=ttl / 3)
        self._on_lost = on_lost
        self._clock = clock
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._lock = threading.Lock()
        sent = clock()
        self.lease_id = client.lease_grant(ttl).lease_id
        self._valid_until = sent + ttl
        self._thread = threading.Thread(target=self._keep_alive, daemon=True,
                                        name=f"lease-{self.lease_id}-keepalive")
        self._thread.start()

    @property
    def valid_until(self) -> float:
        """The lease certainly lives until then (this process's monotonic clock)."""
        with self._lock:
            return self._valid_until

    @property
    def held(self) -> bool:
        return not self._lost.is_set() and self._clock() < self.valid_until

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def wait_lost(self, timeout_s: float | None = None) -> bool:
        """Wait until the lease is lost (True) or `timeout_s` passes (False)."""
        return self._lost.wait(timeout_s)

    def close(self, *, revoke: bool = True) -> None:
        """Stop the keepalives and (by default) revoke the lease, deleting its keys. A failed
        revoke is logged: the lease then expires by itself within its TTL. A lost session's
        revoke gets a short budget (ttl/3): the cluster was not answering."""
        self._stop.set()
        self._thread.join(timeout=self.ttl)
        try:
            if revoke:
                client = self._keepalive_client if self._lost.is_set() else self._client
                client.lease_revoke(self.lease_id)
        except LeaseNotFound:
            pass  # expired or revoked already
        except ClientError as e:
            log.warning("event=lease_revoke_failed lease=%d error=%s", self.lease_id, e)
        finally:
            self._keepalive_client.close()

    def _keep_alive(self) -> None:
        period_s = self.ttl / 3
        next_at = self._clock() + period_s
        while True:
            valid_until = self.valid_until
            if self._stop.wait(max(0.0, min(next_at, valid_until) - self._clock())):
                return
            now = self._clock()
            if now >= valid_until:
                self._lose("no keepalive was answered within the lease's TTL")
                return
            try:
                self._keepalive_client.lease_keepalive(self.lease_id)
            except LeaseNotFound:
                self._lose("the cluster says the lease is gone")
                return
            except ClientError as e:
                log.debug("event=lease_keepalive_failed lease=%d error=%s", self.lease_id, e)
                next_at = self._clock() + self.ttl / _RETRY_FRACTION
                continue
            with self._lock:
                self._valid_until = max(self._valid_until, now + self.ttl)
            next_at = now + period_s

    def _lose(self, why: str) -> None:
        log.warning("event=lease_lost lease=%d reason=%r", self.lease_id, why)
        self._lost.set()
        if self._on_lost is not None:
            try:
                self._on_lost()
            except Exception:  # the callback's failure must not hide the loss
                log.exception("event=lease_lost_callback_failed lease=%d", self.lease_id)


class _Holder:
    """Holding one key on a session: what Lock and Election share."""

    def __init__(self, client: Client, key: str, ttl: int,
                 on_lost: Callable[[], None] | None) -> None:
        self._client = client
        self.key = key
        self.ttl = ttl
        self._on_lost = on_lost
        self._session: Session | None = None
        self.fencing_token: int | None = None
        """The index of the put that acquired the key (None until acquired)."""

    @property
    def lease_id(self) -> int | None:
        return None if self._session is None else self._session.lease_id

    @property
    def held(self) -> bool:
        """Acquired, not released, and certainly not expired by now."""
        return self.fencing_token is not None and self._session is not None \
            and self._session.held

    @property
    def lost(self) -> bool:
        """Acquired, then lost before release (keepalives failed, or the lease is gone)."""
        return self.fencing_token is not None and self._session is not None \
            and self._session.lost

    def wait_lost(self, timeout_s: float | None = None) -> bool:
        session = self._session
        return session is not None and session.wait_lost(timeout_s)

    def _acquire(self, value: object, timeout_s: float | None) -> int:
        """Create the key on a lease if absent, waiting with watches; the acquiring index.
        On any failure the session is closed (its lease revoked)."""
        if self.fencing_token is not None:
            raise RuntimeError(f"{self.key!r} is held already")
        try:
            return self._try_acquire(value, timeout_s)
        except BaseException:
            self._close_session()
            raise

    def _try_acquire(self, value: object, timeout_s: float | None) -> int:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        client = self._client
        maybe_ours = False
        while True:
            session = self._session
            if session is None or session.lost:
                session = self._session = Session(client, self.ttl, on_lost=self._on_lost)
            current: int | None = None
            try:
                won = client.put(self.key, value, prev_index=0, lease=session.lease_id)
            except ConditionFailed as e:
                current = e.current_index
            except LeaseNotFound:
                session.close(revoke=False)
                self._session = None
                continue
            except OutcomeUnknown:
                maybe_ours = True  # a put of ours may yet have applied: look at the key
            else:
                self.fencing_token = won.index
                return won.index
            if maybe_ours or current is None:
                try:
                    found = client.get(self.key)
                except KeyNotFound:
                    continue
                if found.lease == session.lease_id:
                    self.fencing_token = found.index
                    return found.index
                current = found.index
            wait_s = client.timeout_s
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    raise LockTimeout(f"{self.key!r} is held by someone else",
                                      code="lock_timeout")
            client.watch(self.key, current, timeout_s=wait_s)  # changed or not: try again

    def _release(self) -> None:
        self.fencing_token = None
        self._close_session()

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()


class Lock(_Holder):
    """A mutual-exclusion lock named `name` (the key LOCK_PREFIX + name) on a lease of `ttl`
    seconds; see the module doc. Use it from one thread (with its Client)."""

    def __init__(self, client: Client, name: str, ttl: int = 10, *,
                 on_lost: Callable[[], None] | None = None) -> None:
        super().__init__(client, LOCK_PREFIX + name, ttl, on_lost)
        self.name = name
        self.holder = str(uuid.uuid4())
        """Who this lock object is, in the key's value while it holds it."""

    def acquire(self, timeout_s: float | None = None) -> int:
        """Block until held (LockTimeout after `timeout_s`); returns the fencing token."""
        return self._acquire({"holder": self.holder}, timeout_s)

    def release(self) -> None:
        """Give the lock up (revoke the lease: the key is deleted). Safe to call twice."""
        self._release()

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class Election(_Holder):
    """A leader election named `name` (the key ELECTION_PREFIX + name): `campaign(value)`
    blocks until this candidate leads, `leader()` says who leads, `observe()` follows the
    changes, `resign()` steps down. The leader's value is the key's value; its fencing token
    (the index it was elected at) orders the terms of successive leaders."""

    def __init__(self, client: Client, name: str, ttl: int = 10, *,
                 on_lost: Callable[[], None] | None = None) -> None:
        super().__init__(client, ELECTION_PREFIX + name, ttl, on_lost)
        self.name = name

    def campaign(self, value: object, timeout_s: float | None = None) -> int:
        """Block until elected (LockTimeout after `timeout_s`); returns the fencing token."""
        return self._acquire(value, timeout_s)

    def proclaim(self, value: object) -> int:
        """Change the leader's value without losing leadership; returns its index.
        ConditionFailed if this candidate no longer leads."""
        if self.fencing_token is None or self._session is None:
            raise RuntimeError("proclaim needs a won campaign")
        current = self._client.get(self.key)
        if current.lease != self._session.lease_id:
            raise ConditionFailed(f"{self.key!r} is no longer ours", status=409,
                                  current_index=current.index)
        return self._client.put(self.key, value, prev_index=current.index,
                                lease=self._session.lease_id).index

    def resign(self) -> None:
        """Step down (revoke the lease: the key is deleted, the next candidate wins)."""
        self._release()

    def leader(self) -> ReadResult | None:
        """The current leader's value and the index it was written at, or None."""
        try:
            return self._client.get(self.key)
        except KeyNotFound:
            return None

    def observe(self, timeout_s: float | None = None) -> Iterator[ReadResult | None]:
        """The current leader (or None), then each change of leader or of its value, as it
        happens (watches). Ends after `timeout_s` without a change (None: never)."""
        last = self.leader()
        yield last
        # Watching from index 0 when there is no leader misses nothing: a key created since
        # (or a delete the node remembers) answers at once.
        index = 0 if last is None else last.index
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_s = self._client.timeout_s
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    return
            change = self._client.watch(self.key, index, timeout_s=wait_s)
            if not change.changed:
                continue
            index = change.index
            now = None if change.deleted else ReadResult(change.value, change.index)
            if (now is None) != (last is None) or (
                    now is not None and last is not None and now.index != last.index):
                last = now
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                yield now
