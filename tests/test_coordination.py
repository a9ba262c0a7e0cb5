"""The client's leases, watches, locks and elections over real HTTP (waitress on loopback),
against one node without Raft but with the real state machine, lease timers and watch
registry (tests/support/single_node.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from raftkv.client import Client, LeaseNotFound
from raftkv.coordination import ELECTION_PREFIX, LOCK_PREFIX, Election, Lock, LockTimeout
from raftkv.localcluster import wait_until
from raftkv.service import LeaseInfo, ReadResult
from tests.support.single_node import FakeClock, SingleNodeService, serving


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node(clock: FakeClock) -> SingleNodeService:
    return SingleNodeService(clock)


@pytest.fixture
def url(node: SingleNodeService) -> Iterator[str]:
    with serving(node) as address:
        yield address


@pytest.fixture
def kv(url: str) -> Iterator[Client]:
    with Client([url], timeout_s=2.0, retries=2) as client:
        yield client


# --------------------------------------------------------------------------- leases
def test_lease_round_trip(kv: Client, node: SingleNodeService, clock: FakeClock) -> None:
    lease = kv.lease_grant(10)
    assert (lease.ttl_s, lease.index) == (10, lease.lease_id)
    put = kv.put("a", 1, lease=lease.lease_id)
    assert put.lease == lease.lease_id
    assert kv.get("a").lease == lease.lease_id
    kv.put("b", 2, lease=lease.lease_id)
    clock.advance(4)
    assert kv.lease(lease.lease_id) == LeaseInfo(lease.lease_id, 10, 6.0, ("a", "b"), 2)
    assert kv.lease_keepalive(lease.lease_id).ttl_s == 10
    assert kv.leases() == [LeaseInfo(lease.lease_id, 10, 10.0, (), 2)]
    revoked = kv.lease_revoke(lease.lease_id)
    assert revoked.index == node.sm.applied_index
    assert kv.list() == []
    with pytest.raises(LeaseNotFound) as caught:
        kv.lease_keepalive(lease.lease_id)
    assert caught.value.lease_id == lease.lease_id


def test_put_with_ttl_makes_a_lease_of_its_own(kv: Client) -> None:
    put = kv.put("k", "v", ttl=5)
    assert put.lease == put.index
    assert kv.lease(put.index).keys == ("k",)
    assert kv.put("k", "w").lease is None  # detached
    assert kv.get("k").lease is None


def test_put_on_an_unknown_lease_raises_lease_not_found(kv: Client) -> None:
    with pytest.raises(LeaseNotFound):
        kv.put("k", 1, lease=999)


def test_expiry_deletes_the_keys_and_wakes_a_watch(kv: Client, node: SingleNodeService,
                                                   clock: FakeClock, url: str) -> None:
    lease = kv.lease_grant(2).lease_id
    put = kv.put("k", 1, lease=lease)
    answers = []

    def watch() -> None:
        with Client([url], timeout_s=10) as watcher:
            answers.append(watcher.watch("k", put.index))

    thread = threading.Thread(target=watch)
    thread.start()
    wait_until(lambda: len(node.watches) == 1, 10.0,
               "the watch to be filed")
    clock.advance(1.9)
    assert node.expire_due() == []
    clock.advance(0.1)
    assert node.expire_due() == [lease]
    thread.join(10)
    [answer] = answers
    assert answer.deleted and answer.changed and answer.index == node.sm.applied_index


def test_watch_that_times_out_reports_the_current_state(kv: Client) -> None:
    put = kv.put("k", 1)
    answer = kv.watch("k", put.index, timeout_s=0.05)
    assert not answer.changed and (answer.value, answer.index) == (1, put.index)


def test_watch_longer_than_the_client_timeout_waits_that_long(node: SingleNodeService,
                                                              url: str) -> None:
    with Client([url], timeout_s=0.2, retries=0) as short:
        put = short.put("k", 1)
        done = []

        def write_later() -> None:
            wait_until(lambda: len(node.watches) == 1, 10.0,
               "the watch")
            with Client([url]) as other:
                other.put("k", 2)
            done.append(True)

        thread = threading.Thread(target=write_later)
        thread.start()
        answer = short.watch("k", put.index, timeout_s=5)
        thread.join(10)
    assert answer.changed and answer.value == 2 and done


# --------------------------------------------------------------------------- locks
def test_lock_holds_the_key_on_its_lease_and_release_deletes_it(kv: Client) -> None:
    with kv.lock("job", ttl=5) as lock:
        assert lock.held and not lock.lost
        held = kv.get(LOCK_PREFIX + "job")
        assert held.value == {"holder": lock.holder}
        assert held.lease == lock.lease_id
        assert lock.fencing_token == held.index
        lease = lock.lease_id
    still_held: bool = lock.held  # read anew: leaving the block released the lock
    assert not still_held
    assert kv.list(LOCK_PREFIX) == []
    assert lease is not None
    with pytest.raises(LeaseNotFound):
        kv.lease(lease)


def test_second_locker_waits_on_a_watch_and_gets_a_higher_fencing_token(
        kv: Client, node: SingleNodeService, url: str) -> None:
    first = kv.lock("job", ttl=5)
    first_token = first.acquire()
    tokens: list[int] = []

    def second() -> None:
        with Client([url], timeout_s=2.0) as other, other.lock("job", ttl=5) as lock:
            assert lock.fencing_token is not None
            tokens.append(lock.fencing_token)

    thread = threading.Thread(target=second)
    thread.start()
    wait_until(lambda: len(node.watches) == 1, 10.0,
               "the second locker to watch")
    assert tokens == []  # still waiting
    first.release()
    thread.join(10)
    assert not thread.is_alive()
    assert len(tokens) == 1 and tokens[0] > first_token


def test_a_dead_holder_s_lock_is_freed_when_its_lease_expires(
        kv: Client, node: SingleNodeService, clock: FakeClock, url: str) -> None:
    dead = kv.lease_grant(2).lease_id  # a holder that died: nobody keeps its lease alive
    kv.put(LOCK_PREFIX + "job", {"holder": "dead"}, prev_index=0, lease=dead)
    won: list[int] = []

    def waiter() -> None:
        with Client([url], timeout_s=2.0) as other:
            lock = other.lock("job", ttl=10)
            won.append(lock.acquire())
            lock.release()

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until(lambda: len(node.watches) == 1, 10.0,
               "the locker to watch")
    clock.advance(2)
    assert node.expire_due() == [dead]
    thread.join(10)
    assert len(won) == 1


def test_lock_acquire_times_out_and_leaves_no_lease_behind(kv: Client, url: str) -> None:
    with kv.lock("job", ttl=5), Client([url], timeout_s=2.0) as other:
        lock = other.lock("job", ttl=5)
        with pytest.raises(LockTimeout):
            lock.acquire(timeout_s=0.2)
        assert not lock.held
        assert len(kv.leases()) == 1  # the holder's only


def test_a_lock_whose_lease_is_revoked_is_reported_lost(kv: Client, url: str) -> None:
    lost = threading.Event()
    with Client([url], timeout_s=2.0) as other:
        lock = Lock(other, "job", ttl=2, on_lost=lost.set)
        lock.acquire()
        assert lock.lease_id is not None
        kv.lease_revoke(lock.lease_id)  # e.g. an operator, or an expiry after a long pause
        assert lock.wait_lost(10)
        assert lost.is_set() and lock.lost and not lock.held
        lock.release()  # still safe


def test_lock_acquired_despite_an_unknown_outcome_is_recognised_as_ours(
        kv: Client, node: SingleNodeService) -> None:
    node.outcome_unknown_puts = 10  # every attempt applies, no answer says so
    lock = kv.lock("job", ttl=5)
    token = lock.acquire(timeout_s=5)
    assert kv.get(LOCK_PREFIX + "job").index == token
    lock.release()


def test_lock_ttl_below_the_minimum_is_refused(kv: Client) -> None:
    with pytest.raises(ValueError, match="ttl"):
        kv.lock("job", ttl=1).acquire()


# --------------------------------------------------------------------------- elections
def test_election_campaign_leader_observe_resign(kv: Client, node: SingleNodeService,
                                                 url: str) -> None:
    first = kv.election("svc", ttl=5)
    token = first.campaign("n1:8080")
    current = first.leader()
    assert current is not None and (current.value, current.index) == ("n1:8080", token)
    assert kv.get(ELECTION_PREFIX + "svc").lease == first.lease_id

    seen: list[ReadResult | None] = []
    second_won: list[int] = []

    def observe() -> None:
        with Client([url], timeout_s=2.0) as watcher:
            for leader in watcher.election("svc").observe(timeout_s=10):
                seen.append(leader)
                if leader is not None and leader.value == "n2:8080":
                    return

    def campaign() -> None:
        with Client([url], timeout_s=2.0) as other:
            second = Election(other, "svc", ttl=5)
            second_won.append(second.campaign("n2:8080"))
            # Resign only once the observer saw this leader: a watch answers with the
            # latest state, so a resignation right away could hide n2 from it.
            observer.join(10)
            second.resign()

    observer = threading.Thread(target=observe)
    observer.start()
    wait_until(lambda: len(seen) == 1, 10.0,
               "the observer's first answer")
    candidate = threading.Thread(target=campaign)
    candidate.start()
    wait_until(lambda: len(node.watches) == 2, 10.0,
               "the observer and the candidate to watch")
    assert first.proclaim("n1:9090") > token
    wait_until(lambda: len(seen) == 2, 10.0,
               "the proclaimed value")
    first.resign()
    candidate.join(10)
    observer.join(10)
    values = [None if leader is None else leader.value for leader in seen]
    assert values[:2] == ["n1:8080", "n1:9090"]
    assert values[-1] == "n2:8080"
    assert set(values[2:-1]) <= {None}
    assert second_won and second_won[0] > token


def test_observe_with_no_leader_yet_sees_the_first_one(kv: Client, url: str) -> None:
    seen: list[object] = []

    def observe() -> None:
        with Client([url], timeout_s=2.0) as watcher:
            for leader in watcher.election("svc").observe(timeout_s=10):
                seen.append(None if leader is None else leader.value)
                if len(seen) == 2:
                    return

    thread = threading.Thread(target=observe)
    thread.start()
    wait_until(lambda: seen == [None], 10.0,
               "the observer's first answer")
    election = kv.election("svc", ttl=5)
    election.campaign("me")
    thread.join(10)
    assert seen == [None, "me"]
    election.resign()


def test_proclaim_after_losing_leadership_fails(kv: Client) -> None:
    election = kv.election("svc", ttl=5)
    election.campaign("a")
    assert election.lease_id is not None
    kv.lease_revoke(election.lease_id)
    kv.put(ELECTION_PREFIX + "svc", "someone else")
    with pytest.raises(Exception, match="no longer ours"):
        election.proclaim("b")
    election.resign()


def test_a_bad_lease_id_is_refused_before_sending(kv: Client) -> None:
    from raftkv.client import BadRequest

    for bad in (0, -1, True):
        with pytest.raises(BadRequest):
            kv.lease_keepalive(bad)
