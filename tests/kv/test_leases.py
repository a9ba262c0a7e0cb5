"""The leader's lease timers (raftkv.kv.leases.LeaseExpiry): sans-IO, time passed in."""

from __future__ import annotations

import random

import pytest

from raftkv.kv.commands import MIN_LEASE_TTL_S
from raftkv.kv.leases import LeaseExpiry, NotLeaseLeader, min_lease_ttl_s
from raftkv.kv.state_machine import (
    ConditionFailed,
    LeaseGrantResult,
    LeaseNotFound,
    LeaseRevokeResult,
    PutResult,
)


def leader(leases: dict[int, int] | None = None, now: float = 100.0) -> LeaseExpiry:
    expiry = LeaseExpiry()
    expiry.became_leader(leases or {}, now)
    return expiry


def test_new_leader_gives_every_lease_a_full_ttl_from_its_start() -> None:
    expiry = leader({1: 10, 2: 5}, now=100.0)
    assert expiry.remaining(1, 100.0) == 10.0
    assert expiry.due(104.999) == []
    assert expiry.due(105.0) == [2]
    assert expiry.due(109.9) == []
    assert expiry.due(110.0) == [1]


def test_due_returns_each_lease_once() -> None:
    expiry = leader({1: 10})
    assert expiry.due(200.0) == [1]
    assert expiry.due(300.0) == []
    assert expiry.remaining(1, 300.0) == 0.0


def test_due_returns_leases_in_deadline_order() -> None:
    expiry = leader()
    for lease_id, ttl in ((1, 30), (2, 10), (3, 20)):
        expiry.granted(lease_id, ttl, 100.0)
    assert expiry.due(1000.0) == [2, 3, 1]


def test_keepalive_restarts_the_ttl_and_returns_it() -> None:
    expiry = leader({1: 10}, now=100.0)
    assert expiry.keepalive(1, 108.0) == 10
    assert expiry.due(110.0) == []
    assert expiry.remaining(1, 110.0) == 8.0
    assert expiry.due(118.0) == [1]


def test_keepalive_of_an_unknown_expired_or_expiring_lease_is_none() -> None:
    expiry = leader({1: 10, 2: 10}, now=100.0)
    assert expiry.keepalive(99, 101.0) is None
    assert expiry.keepalive(1, 110.0) is None  # the deadline passed: it is expiring
    assert expiry.due(110.0) == [1, 2]
    assert expiry.keepalive(2, 110.0) is None
    assert expiry.due(200.0) == []  # a refused keepalive does not bring it back


def test_only_a_leader_that_became_leader_answers_keepalives() -> None:
    expiry = LeaseExpiry()
    with pytest.raises(NotLeaseLeader):
        expiry.keepalive(1, 0.0)
    with pytest.raises(NotLeaseLeader):
        expiry.remaining(1, 0.0)
    expiry.became_leader({1: 10}, 0.0)
    assert expiry.keepalive(1, 1.0) == 10
    expiry.stepped_down()
    with pytest.raises(NotLeaseLeader):
        expiry.keepalive(1, 2.0)


def test_a_follower_times_nothing_and_revokes_nothing() -> None:
    expiry = LeaseExpiry()
    expiry.granted(1, 10, 0.0)
    assert not expiry.leading and len(expiry) == 0
    assert expiry.due(1e9) == []
    assert expiry.next_deadline() is None


def test_stepping_down_forgets_every_deadline_and_a_new_term_starts_afresh() -> None:
    expiry = leader({1: 10}, now=100.0)
    assert expiry.due(110.0) == [1]  # proposed; then leadership is lost before it commits
    expiry.stepped_down()
    assert expiry.due(1000.0) == []
    expiry.became_leader({1: 10}, 1000.0)  # leader again, the lease still there
    assert expiry.due(1009.0) == []
    assert expiry.due(1010.0) == [1]


def test_forget_drops_the_lease_even_while_its_revoke_is_under_way() -> None:
    expiry = leader({1: 10})
    assert expiry.due(110.0) == [1]
    expiry.forget(1)
    assert expiry.remaining(1, 110.0) is None
    assert len(expiry) == 0


def test_a_revoke_that_could_not_be_proposed_is_due_again() -> None:
    expiry = leader({1: 10}, now=100.0)
    assert expiry.due(110.0) == [1]
    expiry.revoke_failed(1)
    assert expiry.next_deadline() == 110.0
    assert expiry.due(110.5) == [1]
    expiry.revoke_failed(2)  # unknown: nothing to do


def test_next_deadline_is_the_earliest_pending_one() -> None:
    expiry = leader({1: 10, 2: 20}, now=0.0)
    assert expiry.next_deadline() == 10.0
    assert expiry.keepalive(1, 5.0) == 10  # leaves a stale (10.0, 1) behind
    assert expiry.next_deadline() == 15.0
    assert expiry.due(15.0) == [1]
    assert expiry.next_deadline() == 20.0


def test_applied_results_start_and_stop_deadlines() -> None:
    expiry = leader(now=0.0)
    expiry.applied(LeaseGrantResult(5, 5, 10), 5, 1.0)
    expiry.applied(PutResult(6, "v", 6, 20), 6, 2.0)  # a put that granted its own lease
    expiry.applied(PutResult(7, "v", 5), 7, 3.0)  # attached to an existing lease: nothing
    expiry.applied(ConditionFailed(8, "k", 1), 8, 3.0)
    assert expiry.remaining(5, 1.0) == 10.0
    assert expiry.remaining(6, 2.0) == 20.0
    expiry.applied(LeaseRevokeResult(9, 5, ("k",), True), 9, 4.0)
    expiry.applied(LeaseNotFound(10, 6), 10, 4.0)
    assert len(expiry) == 0


def test_applied_ignores_replayed_answers() -> None:
    expiry = leader(now=0.0)
    expiry.applied(LeaseGrantResult(5, 5, 10), 5, 1.0)
    expiry.applied(LeaseGrantResult(5, 5, 10), 9, 8.0)  # a retry answered at index 9
    assert expiry.remaining(5, 8.0) == 3.0
    expiry.applied(LeaseRevokeResult(5, 5, (), False), 12, 8.0)
    assert expiry.remaining(5, 8.0) == 3.0


def test_many_keepalives_do_not_grow_the_heap_without_bound() -> None:
    expiry = leader({1: 10, 2: 10}, now=0.0)
    for i in range(10_000):
        assert expiry.keepalive(1, i * 1e-4) == 10
    assert len(expiry._heap) <= 2 * len(expiry) + 64
    assert expiry.due(10.0) == [2]
    assert expiry.due(11.0) == [1]


def test_random_schedules_never_revoke_before_ttl_since_the_last_renewal() -> None:
    rng = random.Random(7)
    for _ in range(200):
        expiry = leader(now=0.0)
        renewed: dict[int, float] = {}
        ttls: dict[int, int] = {}
        now = 0.0
        for step in range(60):
            now += rng.uniform(0, 3)
            lease_id = rng.randint(1, 6)
            action = rng.random()
            if action < 0.3 and lease_id not in ttls:
                ttls[lease_id] = rng.randint(2, 8)
                expiry.granted(lease_id, ttls[lease_id], now)
                renewed[lease_id] = now
            elif action < 0.8 and expiry.keepalive(lease_id, now) is not None:
                renewed[lease_id] = now
            for due in expiry.due(now):
                assert now >= renewed[due] + ttls[due], (step, due)
                expiry.forget(due)
                del ttls[due], renewed[due]


def test_minimum_ttl_follows_the_election_timeout() -> None:
    assert min_lease_ttl_s(1.0) == MIN_LEASE_TTL_S == 2
    assert min_lease_ttl_s(0.1) == 2
    assert min_lease_ttl_s(3.0) == 5
