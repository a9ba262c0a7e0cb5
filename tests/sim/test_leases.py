"""The lease simulator (tests/sim/leases.py): many seeds, determinism, a scripted failover, and
injected lease bugs it must catch.

Each seed checks Raft's invariants after every event, that no expiry is proposed before the
TTLs promised for its lease (a full TTL after the proposing leader's start, after the grant,
after every keepalive answered OK), lock safety (no two clients believing they hold one lock
at once, fencing tokens increasing), and that every lease expires once its client stops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest

from raftkv.kv.commands import LeaseGrant, Put
from raftkv.kv.leases import LeaseExpiry
from tests.sim.cluster import SimFailure, SimOptions, SimSummary
from tests.sim.conftest import lease_sim_seeds
from tests.sim.leases import (
    FAILOVERS,
    LEASES_CALM,
    STALE_LEADERS,
    LeaseCluster,
    LeaseMachine,
    LeaseWorkload,
    lease_profile_for_seed,
    run_lease_seed,
)
from tests.sim.profiles import SCRIPTED, Profile
from tests.sim.test_injected_bugs import _violation_of

pytestmark = pytest.mark.sim

US = 1_000_000


def _seed_id(seed: int) -> str:
    profile, nodes = lease_profile_for_seed(seed)
    return f"{seed}-{profile.name}-{nodes}"


@pytest.mark.parametrize("seed", lease_sim_seeds(), ids=_seed_id)
def test_lease_seed(seed: int, sim_summary: SimSummary) -> None:
    started = time.perf_counter()
    result = run_lease_seed(seed)
    sim_summary.add(result, time.perf_counter() - started)


def test_same_lease_seed_replays_the_same_events() -> None:
    first = run_lease_seed(3, options=SimOptions(trace=True))
    second = run_lease_seed(3, options=SimOptions(trace=True))
    assert first.digest == second.digest and first.stats == second.stats


# =========================================================================================
# A scripted failover
# =========================================================================================
def _scripted(nodes: int = 3) -> LeaseCluster:
    test = os.environ.get("PYTEST_CURRENT_TEST", "tests/sim/test_leases.py").split(" ")[0]
    c = LeaseCluster(1, SCRIPTED, nodes, replay_hint=f".venv/bin/python -m pytest '{test}'",
                     workload=LeaseWorkload(lock_clients=0, key_clients=0))
    with c.reporting():
        c.start()
    c.run_until(lambda: _leading(c), 3000, "a leader keeping lease time")
    return c


def _leading(c: LeaseCluster) -> bool:
    leader = c.leader()
    return leader is not None and c.leases[leader.id].expiry.leading


def _lease_exists(c: LeaseCluster, nid: str, lease: int) -> bool:
    sm = c.nodes[nid].sm
    assert isinstance(sm, LeaseMachine)
    return lease in sm.kv.lease_ttls


def test_new_leader_gives_a_lease_a_full_ttl_before_expiring_it() -> None:
    """Raft leader A grants a 2 s lease with a key; A dies 1.5 s later. The new leader B must
    not expire the lease before 2 s after it became leader (it cannot know when A last
    renewed it), and must expire it then."""
    c = _scripted()
    a = c.leader()
    assert a is not None
    lease = c.propose(a.id, LeaseGrant(2))
    c.propose(a.id, Put("k", "v", lease=lease))
    c.run_until(lambda: all(_lease_exists(c, nid, lease) for nid in c.ids), 1000,
                "the lease everywhere")
    c.run_for(1500)
    c.crash(a.id)
    c.run_until(lambda: _leading(c), 3000, "a new leader keeping lease time")
    b = c.leader()
    assert b is not None and b.raft is not None and b.id != a.id
    started = c.leader_started(b.id, b.raft.term)
    assert started is not None
    c.run_until(lambda: c.expired(lease) is not None, 3000, "the lease to expire")
    expiry = c.expired(lease)
    assert expiry is not None and expiry.leader == b.id
    assert started + 2 * US <= expiry.proposed_us < started + 2 * US + 50_000
    c.run_until(lambda: not _lease_exists(c, b.id, lease), 1000, "the revoke applied")
    sm = b.sm
    assert isinstance(sm, LeaseMachine) and sm.kv.get("k") is None


# =========================================================================================
# Injected bugs
# =========================================================================================
MAX_SEEDS = 100
"""A lease bug must be caught within this many seeds."""


def short_ttl_after_failover(mp: pytest.MonkeyPatch) -> None:
    """A new leader gives every lease 0.2 s (two election timeouts here), not a full TTL."""
    original = LeaseExpiry.became_leader

    def became_leader(self: LeaseExpiry, leases: dict[int, int], now: float) -> None:
        original(self, dict.fromkeys(leases, 0.2), now)  # type: ignore[arg-type]
        self._ttls.update(leases)  # keepalives restart the right TTL; only the start is short

    mp.setattr(LeaseExpiry, "became_leader", became_leader)


def keepalive_without_quorum(mp: pytest.MonkeyPatch) -> None:
    """A leader answers keepalives without confirming it still leads (a deposed leader
    renews a lease the new leader will expire)."""
    mp.setattr(LeaseCluster, "_keepalive_needs_quorum", lambda self: False)


def keepalive_does_not_restart_the_timer(mp: pytest.MonkeyPatch) -> None:
    """A keepalive is answered with the TTL, but the leader's deadline stays where it was."""
    def keepalive(self: LeaseExpiry, lease_id: int, now: float) -> int | None:
        deadline = self._deadlines.get(lease_id)
        if not self._leading or deadline is None or deadline <= now:
            return None
        return self._ttls[lease_id]

    mp.setattr(LeaseExpiry, "keepalive", keepalive)


@dataclass(frozen=True, slots=True)
class LeaseBug:
    key: str
    description: str
    inject: Callable[[pytest.MonkeyPatch], None]
    profile: Profile
    nodes: int
    workload: LeaseWorkload | None = None
    options: SimOptions = field(default_factory=SimOptions)


EAGER = LeaseWorkload(keepalives_per_ttl=20, retry_ms=(5, 40), die=0.0, hold_ms=(2500, 5000))
"""Clients that keep alive often, hold the lock for longer than a TTL and retry a taken lock
fast: one of them reaches an old leader in the moment it still believes it leads, and another
pounces on the lock the new leader expires. A longer election timeout (300 to 600 ms) widens
that moment."""

LEASE_BUGS = (
    LeaseBug("lease-a", "a new leader gives leases less than a full TTL",
             short_ttl_after_failover, FAILOVERS, 3),
    LeaseBug("lease-b", "keepalives answered without a quorum check (stale leader)",
             keepalive_without_quorum, STALE_LEADERS, 3, EAGER,
             SimOptions(election_timeout_ticks=30)),
    LeaseBug("lease-c", "a keepalive does not restart the leader's timer",
             keepalive_does_not_restart_the_timer, LEASES_CALM, 3),
)


def _first_failing_seed(bug: LeaseBug, options: SimOptions) -> tuple[int, str] | None:
    for seed in range(MAX_SEEDS):
        try:
            run_lease_seed(seed, bug.profile, bug.nodes, options,
                           replay_hint=f"pytest tests/sim/test_leases.py -k '{bug.key}'",
                           workload=bug.workload)
        except SimFailure as failure:
            return seed, str(failure)
    return None


@pytest.mark.parametrize("bug", LEASE_BUGS, ids=lambda b: b.key)
def test_injected_lease_bug_is_caught(bug: LeaseBug, sim_summary: SimSummary) -> None:
    with pytest.MonkeyPatch.context() as mp:
        bug.inject(mp)
        found = _first_failing_seed(bug, bug.options)
        assert found is not None, (
            f"injected bug ({bug.key}) {bug.description} was not caught in {MAX_SEEDS} seeds")
        seed, report = found
        # The lock-safety check alone (end to end) must catch it too.
        e2e = _first_failing_seed(bug, replace(bug.options, direct_checks=False))
        assert e2e is not None, f"bug ({bug.key}) is caught only by the direct lease checks"
        assert "lock safety" in e2e[1] or "linearizab" in e2e[1], e2e[1]
    for s in range(max(seed, e2e[0]) + 1):  # without the bug, every seed searched passes
        run_lease_seed(s, bug.profile, bug.nodes, bug.options, workload=bug.workload)
    violation = _violation_of(report)
    sim_summary.injected_bugs[bug.key] = {
        "description": bug.description, "seed": seed, "seeds_needed": seed + 1,
        "profile": f"{bug.profile.name}/{bug.nodes}", "violation": violation,
        "end_to_end": f"seed {e2e[0]} without the direct checks: {_violation_of(e2e[1])}",
    }
    print(f"\ninjected bug ({bug.key}) {bug.description}: caught at seed {seed}: {violation}"
          f"; end to end at seed {e2e[0]}")


def test_lease_profiles_cover_crashes_partitions_and_both_sizes() -> None:
    seen = {(p.name, n) for p, n in map(lease_profile_for_seed, range(8))}
    assert len(seen) == 8
