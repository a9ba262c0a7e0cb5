"""Leases, TTL keys and locks on real `raftkv serve` processes: a kept-alive lease across a
leader kill, a contended lock across a leader kill (checked for mutual exclusion with fencing
tokens, tests/support/lock_workload.py), lease state across kill -9 of every node and across
backup/restore, and an expiry of a lease with keys seen by watches on every node."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.client import Client, ClientError, KeyNotFound, LeaseNotFound, Unavailable
from raftkv.coordination import Session
from raftkv.localcluster import FAST_TIMING, LocalCluster, NodeProc, wait_until
from raftkv.service import ReadResult, WatchResult
from tests.support.clusters import running_cluster, watches
from tests.support.lock_workload import (
    LockConfig,
    LockHold,
    LockLike,
    LockRecorder,
    LockWorker,
    check_locks,
    final_guarded_read,
    lock_stats,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path / "cluster", request=request) as c:
        yield c


def urls(c: LocalCluster, nodes: list[NodeProc] | None = None) -> list[str]:
    return [n.http for n in (nodes or c.nodes)]


def gone(kv: Client, key: str) -> bool:
    """The key is absent (a linearizable read); False while no node can answer."""
    try:
        kv.get(key)
    except KeyNotFound:
        return True
    except Unavailable:
        return False
    return False


def lease_gone(kv: Client, lease_id: int) -> bool:
    try:
        kv.lease(lease_id)
    except LeaseNotFound:
        return True
    except Unavailable:
        return False
    return False


class KeepAlive(threading.Thread):
    """Keeps a lease alive every `period_s` whatever happens (a client that does not give up
    while the whole cluster is down, unlike a Session); records every answer."""

    def __init__(self, node_urls: list[str], lease_id: int, period_s: float) -> None:
        super().__init__(name=f"keepalive-{lease_id}", daemon=True)
        self.urls, self.lease_id, self.period_s = node_urls, lease_id, period_s
        self.stop = threading.Event()
        self.ok: list[float] = []
        """Send times of the keepalives answered OK."""
        self.not_found: list[float] = []

    def run(self) -> None:
        with Client(self.urls, timeout_s=1.0, retries=0) as kv:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    kv.lease_keepalive(self.lease_id)
                except LeaseNotFound:
                    self.not_found.append(sent)
                except ClientError:
                    self.stop.wait(0.1)
                    continue
                else:
                    self.ok.append(sent)
                self.stop.wait(max(0.0, sent + self.period_s - time.monotonic()))

    def __enter__(self) -> KeepAlive:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.join(10)


# --------------------------------------------------------------------------- a: keepalive
def test_a_kept_alive_lease_and_its_keys_survive_a_leader_kill(cluster: LocalCluster) -> None:
    c = cluster
    ttl = 3
    with Client(urls(c), timeout_s=2) as kv:
        session = Session(kv, ttl)  # keeps its lease alive every ttl/3, in the background
        try:
            kept = session.lease_id
            written = {k: kv.put(k, f"v-{k}", lease=kept).index for k in ("app/a", "app/b")}
            control = kv.lease_grant(ttl).lease_id  # nobody keeps this one alive
            kv.put("ctl/x", 1, lease=control)

            old = c.wait_for_leader()
            c.kill(old)
            others = [n for n in c.nodes if n is not old]
            c.wait_for_leader(among=others, timeout_s=10)
            # The new leader runs the timers: it gives both leases a full TTL from its start
            # and expires the one not kept alive. At that moment the kept one would go too,
            # had its keepalives not reached the new leader.
            wait_until(lambda: gone(kv, "ctl/x"), ttl + 10, "the control lease's key to expire")
            assert lease_gone(kv, control)

            info = kv.lease(kept)
            assert (info.lease_id, info.ttl_s, info.keys) == (kept, ttl, ("app/a", "app/b"))
            assert info.remaining_s > 0
            for key, index in written.items():
                assert kv.get(key) == ReadResult(f"v-{key}", index, kept)
            # The client's own view: no keepalive gap ever reached the TTL, none was refused.
            assert session.held and not session.lost
        finally:
            session.close()
        wait_until(lambda: gone(kv, "app/a") and gone(kv, "app/b"), 10,
                   "the keys to go with the revoked lease")


# --------------------------------------------------------------------------- b: lock
class LeaderKillingWorker(LockWorker):
    """Its first hold: a protected write, SIGKILL of the leader, then protected writes under
    the new leader for longer than the TTL, checking before each that it still holds the
    lock. Its later holds are ordinary."""

    def __init__(self, c: LocalCluster, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.cluster = c
        self.killed_at: float | None = None
        self.new_leader_at: float | None = None
        self.kill_hold: LockHold | None = None
        self.results: list[str] = []

    def _critical_section(self, client: Client, lock: LockLike, hold: LockHold,
                          token: int) -> None:
        if self.killed_at is not None:
            super()._critical_section(client, lock, hold, token)
            return
        self.kill_hold = hold
        hold.ops += 1
        self.results.append(self._protected_write(client, token))
        old = self.cluster.wait_for_leader()
        self.killed_at = self.clock()
        self.cluster.kill(old)
        self.cluster.wait_for_leader(among=[n for n in self.cluster.nodes if n is not old],
                                     timeout_s=10)
        self.new_leader_at = self.clock()
        while self.clock() < self.new_leader_at + self.cfg.ttl_s + 0.5:
            now = self.clock()
            if not lock.held:
                self.results.append("not held")
                return
            hold.held_until = now
            hold.ops += 1
            self.results.append(self._protected_write(client, token))
            self.stop_event.wait(0.2)


def test_a_lock_held_across_a_leader_kill_is_held_by_one_client_at_a_time(
        cluster: LocalCluster) -> None:
    c = cluster
    cfg = LockConfig(ttl_s=3, ops_per_hold=(1, 3), think_s=(0.0, 0.1), client_timeout_s=2.0)
    recorder = LockRecorder()
    stop = threading.Event()
    t0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t0

    # Workers start on different nodes (each knows them all).
    def rotated(i: int) -> list[str]:
        u = urls(c)
        return u[i % len(u):] + u[:i % len(u)]

    killer = LeaderKillingWorker(c, 0, rotated(0), cfg, random.Random(0), clock, recorder,
                                 stop)
    killer.start()
    wait_until(lambda: killer.kill_hold is not None, 20, "the first hold")
    others = [LockWorker(i, rotated(i), cfg, random.Random(i), clock, recorder, stop)
              for i in (1, 2)]
    for w in others:
        w.start()  # they contend while the lock is held across the kill
    try:
        wait_until(lambda: killer.new_leader_at is not None, 20, "the leader to be killed")
        assert killer.killed_at is not None

        def later_holds() -> int:
            return sum(1 for h in recorder.holds if h.outcome == "acquired"
                       and h.acquired_at is not None and killer.killed_at is not None
                       and h.acquired_at > killer.killed_at)

        wait_until(lambda: later_holds() >= 4, 25, "4 holds after the kill")
    finally:
        stop.set()
        for w in [killer, *others]:
            w.join(15)
    assert recorder.anomalies == [] and recorder.internal_errors == []
    assert not any(w.is_alive() for w in [killer, *others])

    # The holder at the kill kept the lock past the new leader's start plus a TTL.
    hold = killer.kill_hold
    assert hold is not None and hold.acquired_at is not None and hold.held_until is not None
    assert killer.new_leader_at is not None
    assert hold.acquired_at < killer.killed_at < killer.new_leader_at + cfg.ttl_s \
        < hold.held_until, (hold, killer.results)
    assert not hold.lost and "not held" not in killer.results, killer.results
    assert killer.results.count("accepted") >= 3, killer.results
    print(lock_stats(recorder.holds, recorder.ops), killer.results)
    recorder.op(final_guarded_read(urls(c, [n for n in c.nodes if n.running]),
                                   cfg.guarded_key, clock))
    violations = check_locks(recorder.holds, recorder.ops, cfg.guarded_key)
    assert [v.message for v in violations] == []
    won = sorted((h for h in recorder.holds if h.outcome == "acquired"),
                 key=lambda h: h.acquired_at or 0.0)
    tokens: list[int] = []
    for h in won:
        assert h.token is not None, h  # an acquired hold has its fencing token
        tokens.append(h.token)
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens
    assert len({h.process for h in won}) >= 2


# --------------------------------------------------------------------------- c: kill -9 all
def test_leases_survive_kill_9_of_every_node_and_still_expire_unless_kept(
        cluster: LocalCluster) -> None:
    c = cluster
    ttl = 4
    with Client(urls(c), timeout_s=2) as kv:
        kept = kv.lease_grant(ttl).lease_id
        dropped = kv.lease_grant(ttl).lease_id
        keys = {"kept/1": kept, "kept/2": kept, "dropped/1": dropped, "dropped/2": dropped}
        written = {k: kv.put(k, k.upper(), lease=lease).index for k, lease in keys.items()}
        own = kv.put("own-ttl", "mine", ttl=ttl)  # a key with a lease of its own
        assert own.lease == own.index
        before = {i: kv.lease(i) for i in (kept, dropped, own.index)}

    for n in c.nodes:
        c.kill(n)  # SIGKILL: nothing flushed, no hand-over
    for n in c.nodes:
        c.start(n)
    # Keepalives of one lease from the restart on (they fail until a leader is there).
    with KeepAlive(urls(c), kept, ttl / 4) as keeper:
        c.wait_for_leader(timeout_s=20)
        for n in c.nodes:
            c.wait_for_ready(n, timeout_s=20)
        with Client(urls(c), timeout_s=2) as kv:
            after = {i: kv.lease(i) for i in before}
            for i, info in before.items():
                assert (after[i].lease_id, after[i].ttl_s, after[i].keys) == (
                    info.lease_id, info.ttl_s, info.keys)
            assert sorted(info.lease_id for info in kv.leases()) == sorted(before)
            for key, lease in keys.items():
                assert kv.get(key) == ReadResult(key.upper(), written[key], lease)
            assert kv.get("own-ttl") == ReadResult("mine", own.index, own.index)

            # The leases not kept alive expire (a full TTL after the new leader took office),
            # their keys with them; the kept one stays.
            wait_until(lambda: gone(kv, "dropped/1") and gone(kv, "own-ttl"), ttl + 15,
                       "the leases not kept alive to expire")
            assert gone(kv, "dropped/2")
            assert lease_gone(kv, dropped) and lease_gone(kv, own.index)
            assert kv.lease(kept).keys == ("kept/1", "kept/2")
            for key in ("kept/1", "kept/2"):
                assert kv.get(key) == ReadResult(key.upper(), written[key], kept)
            assert [info.lease_id for info in kv.leases()] == [kept]
    assert keeper.ok and keeper.not_found == []


# --------------------------------------------------------------------------- d: backup
def raftkv(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raftkv", *args], capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def test_backup_and_restore_keep_leases_and_their_keys(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with running_cluster(tmp_path / "source", request=request) as source:
        with Client(urls(source), timeout_s=5) as kv:
            long = kv.lease_grant(60).lease_id
            short = kv.lease_grant(2).lease_id
            written = {"long/1": kv.put("long/1", 1, lease=long),
                       "long/2": kv.put("long/2", 2, lease=long),
                       "short/1": kv.put("short/1", 3, lease=short),
                       "plain": kv.put("plain", 4)}
        backup = tmp_path / "leases.backup"
        made = raftkv("backup", str(backup), "--urls", ",".join(urls(source)))
        assert made.returncode == 0, made.stderr

    restored = LocalCluster(tmp_path / "restored", 0, env=FAST_TIMING)
    try:
        n1 = restored.add_node()
        done = raftkv("restore", str(backup), "--data-dir", str(n1.data_dir), "--id", "n1",
                      "--raft-addr", n1.raft)
        assert done.returncode == 0, done.stderr
        restored.start(n1)
        restored.wait_for_leader()
        restored.wait_for_ready(n1)
        with Client([n1.http], timeout_s=5) as kv:
            assert sorted((i.lease_id, i.ttl_s) for i in kv.leases()) == [(long, 60),
                                                                           (short, 2)]
            assert kv.lease(long).keys == ("long/1", "long/2")
            assert kv.lease(short).keys == ("short/1",)
            for key, w in written.items():
                assert kv.get(key) == ReadResult(w.value, w.index, w.lease)
            # The restored leases are live: the short one expires with its key, the
            # long one stays, and keepalives reach it.
            wait_until(lambda: gone(kv, "short/1"), 15, "the short lease to expire")
            assert lease_gone(kv, short)
            assert kv.lease_keepalive(long).ttl_s == 60
            assert kv.get("long/1") == ReadResult(1, written["long/1"].index, long)
    except BaseException:
        print(restored.dump_logs())
        raise
    finally:
        restored.close()


# --------------------------------------------------------------------------- e: watch
class Watcher(threading.Thread):
    def __init__(self, url: str, key: str, index: int) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.index = url, key, index
        self.answer: WatchResult | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client([self.url], timeout_s=30) as kv:
                self.answer = kv.watch(self.key, self.index, timeout_s=30)
        except BaseException as e:  # handed to the test
            self.error = e


def test_an_expiring_lease_deletes_its_keys_at_one_index_seen_by_watches_on_every_node(
        cluster: LocalCluster) -> None:
    c = cluster
    ttl = 2
    with Client(urls(c), timeout_s=5) as kv:
        lease = kv.lease_grant(ttl).lease_id
        keys = ["exp/a", "exp/b", "exp/c"]
        puts = {k: kv.put(k, k, lease=lease).index for k in keys}
        other = kv.put("exp/other", "stays").index
    last = max(puts.values())
    for n in c.nodes:  # every node applied the puts, so each watch waits from the last one
        c.wait_applied(n, last)
    watchers = [Watcher(n.http, k, last) for n in c.nodes for k in keys]
    # The lease is kept alive until every watch waits: they see the expiry as it happens.
    with KeepAlive(urls(c), lease, ttl / 4) as keeper:
        for w in watchers:
            w.start()
        wait_until(lambda: all(watches(c, n) >= len(keys) for n in c.nodes), 10,
                   "every watch to be filed")
    assert keeper.ok and keeper.not_found == []
    assert not any(w.answer for w in watchers)
    for w in watchers:
        w.join(ttl + 25)
    answers = []
    for w in watchers:
        assert not w.is_alive() and w.error is None, (w.key, w.url, w.error)
        assert w.answer is not None
        answers.append(w.answer)
    assert all(a.changed and a.deleted and a.value is None for a in answers), answers
    indices = {a.index for a in answers}
    assert len(indices) == 1, answers  # one entry deleted all three keys, on every node
    (revoke_index,) = indices
    assert revoke_index > last
    with Client(urls(c), timeout_s=5) as kv:
        assert lease_gone(kv, lease)
        assert all(gone(kv, k) for k in keys)
        assert kv.get("exp/other") == ReadResult("stays", other)


def test_a_node_with_a_long_election_timeout_refuses_ttls_a_failover_would_outlast(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """20 ticks of 100 ms: a 2 s election timeout, so the floor is 3 s (1.5 timeouts), not
    the fixed 2 s; the Raft process hands the floor to its workers."""
    env = {"RAFTKV_TICK_MS": "100", "RAFTKV_ELECTION_TICKS": "20",
           "RAFTKV_HEARTBEAT_TICKS": "2"}
    with running_cluster(tmp_path / "slow", 1, request, env=env) as c, \
            Client(urls(c), timeout_s=5) as kv:
        with pytest.raises(ClientError) as refused:
            kv.lease_grant(2)
        assert refused.value.status == 400 and refused.value.code == "invalid_field"
        assert "3.." in refused.value.message
        with pytest.raises(ClientError):
            kv.put("k", 1, ttl=2)
        assert kv.lease_grant(3).ttl_s == 3
        assert kv.put("k", 1, ttl=3).index > 0
