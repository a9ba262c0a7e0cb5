"""The deterministic simulator: many seeds, determinism, targeted scenarios, and the boot
path the simulator restarts crashed nodes with (raftkv.runtime.boot).

`make sim SEEDS=N` runs seeds 0..N-1 spread over the fault profiles and 3/5-node clusters;
`RAFTKV_SIM_SEED=s make sim` replays seed s exactly. Every seed checks the safety invariants
after every event, the cluster's convergence after the heal, and the linearizability of the
client history.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from raftkv.core import (
    AppendRequest,
    AppendResponse,
    BootState,
    ConfChange,
    ConfChangeOp,
    Config,
    Entry,
    HardState,
    Membership,
    Message,
    RaftNode,
    Role,
    Snapshot,
    SnapshotMeta,
)
from raftkv.core.types import NodeId
from raftkv.ports import StorageError
from raftkv.runtime.boot import load_boot_state
from snapshots.memory import MemorySnapshotStore
from storage.memory import MemoryRaftStorage
from tests.sim.cluster import (
    ClientOp,
    Cluster,
    SimOptions,
    SimResult,
    SimSummary,
    run_seed,
)
from tests.sim.conftest import sim_seeds
from tests.sim.profiles import MEMBERSHIP, SCRIPTED, profile_for_seed
from tests.support.linearizability import Outcome

ROOT = Path(__file__).resolve().parents[2]


def _seed_id(seed: int) -> str:
    profile, nodes = profile_for_seed(seed)
    return f"{seed}-{profile.name}-{nodes}"


@pytest.mark.sim
@pytest.mark.parametrize("seed", sim_seeds(), ids=_seed_id)
def test_seed(seed: int, sim_summary: SimSummary) -> None:
    started = time.perf_counter()
    result = run_seed(seed)
    sim_summary.add(result, time.perf_counter() - started)


# =========================================================================================
# Determinism
# =========================================================================================
def _digest(seed: int) -> SimResult:
    return run_seed(seed, options=SimOptions(trace=True))


@pytest.mark.sim
def test_same_seed_replays_the_same_events() -> None:
    for seed in (7, 13):  # chaos/3 and membership/5: every kind of event
        first, second = _digest(seed), _digest(seed)
        assert first.digest == second.digest
        assert first.stats == second.stats
    assert _digest(7).digest != _digest(15).digest


@pytest.mark.sim
def test_same_seed_replays_in_another_process_with_another_hash_seed() -> None:
    """Set iteration order depends on PYTHONHASHSEED: a replay must not."""
    code = (
        "from tests.sim.cluster import run_seed, SimOptions;"
        "print(run_seed(13, options=SimOptions(trace=True)).digest)"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == _digest(13).digest


@pytest.mark.sim
def test_profiles_are_spread_over_seeds() -> None:
    seen = {(p.name, n) for p, n in map(profile_for_seed, range(32))}
    assert len(seen) == 16
    assert MEMBERSHIP in {p for p, _ in map(profile_for_seed, range(8))}


@pytest.mark.sim
def test_membership_seeds_still_find_changes_the_strict_check_allows() -> None:
    """The core refuses unsafe membership changes (strict reconfiguration): the operator's
    random changes must still get learners added, promoted once caught up, and voters
    removed, across the membership seeds."""
    proposed: dict[str, int] = {}
    rejected = 0
    for seed in (5, 13, 21, 29):  # MEMBERSHIP is every 8th profile: 3 and 5 nodes
        profile, nodes = profile_for_seed(seed)
        assert profile is MEMBERSHIP
        result = Cluster(seed, profile, nodes).run()
        for op, n in result.stats.conf_changes_proposed.items():
            proposed[op] = proposed.get(op, 0) + n
        rejected += result.stats.conf_changes_rejected
    assert proposed.get("ADD_LEARNER", 0) > 0
    assert proposed.get("ADD_VOTER", 0) > 0
    assert proposed.get("REMOVE", 0) > 0
    assert rejected > 0  # and some were refused (e.g. a promotion before catching up)


# =========================================================================================
# Targeted scenarios (each names the paper section it checks)
# =========================================================================================
def _settled(c: Cluster) -> bool:
    """A leader whose no-op committed and every node's log caught up with it."""
    leader = c.leader()
    if leader is None or leader.raft is None:
        return False
    lr = leader.raft
    if lr.log.term(lr.log.commit) != lr.term:
        return False
    return all(
        sn.raft is not None and sn.raft.log.commit == lr.log.commit
        and sn.raft.log.last_index() == lr.log.last_index()
        for sn in c.nodes.values()
    )


def _leader_id(c: Cluster) -> NodeId:
    leader = c.leader()
    assert leader is not None
    return leader.id


def _leader_in(c: Cluster, candidates: list[NodeId]) -> bool:
    leader = c.leader()
    return leader is not None and leader.id in candidates


def _holds(c: Cluster, nid: NodeId, index: int, term: int) -> bool:
    raft = c.nodes[nid].raft
    return raft is not None and raft.log.term(index) == term


def _wait_outcome(c: Cluster, op: ClientOp, within_ms: float = 1000) -> Outcome:
    c.run_until(lambda: op.outcome is not None, within_ms, f"an outcome for {op}")
    assert op.outcome is not None
    return op.outcome


def _scripted(seed: int, nodes: int, options: SimOptions | None = None,
              **profile_changes: object) -> Cluster:
    profile = replace(SCRIPTED, **profile_changes)  # type: ignore[arg-type]
    test = os.environ.get("PYTEST_CURRENT_TEST", "tests/sim/test_sim.py").split(" ")[0]
    c = Cluster(seed, profile, nodes, options, replay_hint=f".venv/bin/python -m pytest '{test}'")
    with c.reporting():
        c.start()
    c.run_until(lambda: _settled(c), 3000, "a settled leader")
    return c


@dataclass(frozen=True, slots=True)
class Figure8Outcome:
    x_committed_by_counting: bool
    x_outcome: Outcome | None
    entry_at_k: Entry | None
    """The entry finally committed at X's index."""
    result: SimResult


def figure8(seed: int, options: SimOptions | None = None) -> Figure8Outcome:
    """Raft §5.4.2, Figure 8, with the no-op a new leader appends (5 servers, S1..S5).

    (a)-(b) S1 replicates X at index k to S2 only and crashes; S5 is elected by S3, S4 and
    itself, appends its no-op at k (a higher term than X) and is cut off before anyone gets it.
    (c) S1 (or S2: call it A) is elected again and sends X to the others, one entry per
    message, while its own no-op at k + 1 never leaves it: X is on a majority, yet A must NOT
    count it as committed. A crashes, and so does one more server. (d) S5 comes back, is
    elected by the two servers left (its last term beats X's) and overwrites X everywhere:
    correct only because X was never committed.
    """
    options = options or SimOptions(max_append_entries=1)
    c = _scripted(seed, 5, options)
    s1 = _leader_id(c)
    s2, *rest = [x for x in c.ids if x != s1]
    k = c.node(s1).log.last_index() + 1
    t1 = c.node(s1).term
    # (a)-(b)
    cut1 = c.cut({(s1, x) for x in rest} | {(x, s1) for x in rest}, f"{s1} reaches {s2} only")
    x_op = c.submit(s1, "write", "x", "X")
    assert x_op.index == k
    c.run_until(lambda: _holds(c, s2, k, t1) and c.nodes[s1].storage.term(k) == t1, 500,
                f"X on {s1}'s disk and at {s2}")
    c.crash(s1)
    iso2 = c.isolate(s2)
    c.run_until(lambda: _leader_in(c, rest), 3000, f"a leader among {rest}")
    s5 = _leader_id(c)
    t2 = c.node(s5).term
    iso5 = c.isolate(s5)
    c.run_for(30)  # its no-op reaches its own disk, nobody else's
    assert c.nodes[s5].storage.term(k) == t2
    c.crash(s5)
    # (c)
    c.restart(s1)
    c.mend(cut1)
    c.mend(iso2)

    def hold_back_noop(m: Message) -> Message:
        if isinstance(m, AppendRequest) and m.entries and m.entries[-1].index > k:
            return replace(m, entries=tuple(e for e in m.entries if e.index <= k))
        return m

    hold = c.intercept(hold_back_noop, f"no entry after {k} leaves")
    c.run_until(lambda: _leader_in(c, [s1, s2]), 3000, f"a leader among {[s1, s2]}")
    a = _leader_id(c)

    def x_on_majority() -> bool:
        peers = c.node(a).status().peers
        return sum(1 for p in peers.values() if p.match >= k) >= 3

    c.run_until(x_on_majority, 1000, "X on a majority")
    c.run_for(50)  # plenty of time to (wrongly) commit it
    x_committed = c.node(a).log.commit >= k
    c.isolate(a)
    c.crash(a)
    c.crash(next(x for x in c.ids if x not in (a, s5)))
    c.mend(hold)
    # (d)
    c.restart(s5)
    c.mend(iso5)
    c.run_until(lambda: _leader_in(c, [s5]), 3000, f"{s5} elected")
    result = c.heal_and_converge()
    return Figure8Outcome(x_committed, x_op.outcome, c.inv.committed_entry(k), result)


@pytest.mark.sim
def test_figure8_leader_does_not_commit_a_previous_term_entry_by_counting() -> None:
    for seed in (1, 2, 3):
        out = figure8(seed)
        assert not out.x_committed_by_counting
        assert out.x_outcome is Outcome.UNKNOWN  # its leader crashed
        assert out.entry_at_k is not None and out.entry_at_k.data == b""  # S5's no-op


@pytest.mark.sim
def test_isolated_leader_steps_down_and_never_serves_a_read() -> None:
    """§6.4 (ReadIndex needs a heartbeat quorum) and §9.6 (check-quorum)."""
    c = _scripted(4, 3)
    old = _leader_id(c)
    isolated_at = c.now / 1000
    c.isolate(old)
    reads: list[ClientOp] = []
    stepped_down_at: float | None = None
    for _ in range(40):  # 400 ms of reads at the isolated leader
        reads.append(c.submit(old, "read", "k0"))
        c.run_for(10)
        if stepped_down_at is None and c.node(old).role is not Role.LEADER:
            stepped_down_at = c.now / 1000
    assert stepped_down_at is not None
    # check-quorum: within two election timeouts (+ a tick, + this loop's 10 ms step)
    election_timeout_ms = c.opt.election_timeout_ticks * c.opt.tick_ms
    assert stepped_down_at - isolated_at <= 2 * election_timeout_ms + c.opt.tick_ms + 10
    assert all(op.outcome is not Outcome.OK for op in reads)
    new = c.leader()
    assert new is not None and new.id != old
    write = c.submit(new.id, "write", "k0", "after")
    assert _wait_outcome(c, write) is Outcome.OK
    c.heal_and_converge()
    assert all(op.outcome is Outcome.FAILED for op in reads)


@pytest.mark.sim
def test_lagging_follower_catches_up_by_install_snapshot() -> None:
    """§7: a follower behind the leader's compacted log gets the snapshot, in chunks."""
    c = _scripted(5, 3, snapshot_every=(10, 10), trailing=2)
    leader = _leader_id(c)
    lagging = next(x for x in c.ids if x != leader)
    fid = c.isolate(lagging)
    for i in range(60):
        assert _wait_outcome(c, c.submit(leader, "write", f"k{i % 3}", f"v{i}")) is Outcome.OK
    assert c.node(leader).log.first_index() > c.node(lagging).log.last_index() + 1
    installed = c.stats.snapshots_installed
    c.mend(fid)
    target = c.node(leader).log.commit
    c.run_until(lambda: c.nodes[lagging].sm.applied_index >= target, 2000, "the follower caught up")
    assert c.stats.snapshots_installed > installed
    assert c.nodes[lagging].snapshots.list()[0].index >= c.node(leader).snapshot_meta.index - 10
    c.heal_and_converge()


@pytest.mark.sim
def test_follower_catches_up_while_the_leader_snapshots_faster_than_a_transfer() -> None:
    """A follower that needs the snapshot catches up even when the leader takes a new one
    several times during one transfer and keeps almost no log behind it (found by a fault run:
    a replaced member never caught up, its transfer restarted with every newer snapshot and
    each installed one already compacted past). The transfer in flight is finished, and the
    log after it is kept until the follower has it."""
    c = _scripted(11, 3, snapshot_every=(12, 12), trailing=0, clients=4, think_ms=(0.2, 0.5),
                  read_ratio=0.0, delete_ratio=0.0, keys=60, follow_leader=1.0)
    leader = _leader_id(c)
    lagging = next(x for x in c.ids if x != leader)
    fid = c.isolate(lagging)
    c.run_until(lambda: c.node(leader).log.first_index() > c.node(lagging).log.last_index() + 1
                and c.nodes[leader].sm.applied_index > 400, 5000,
                "the leader compacted past the isolated follower")
    c.mend(fid)
    target = c.node(leader).log.commit
    taken = c.stats.snapshots_taken
    c.run_until(lambda: c.nodes[lagging].sm.applied_index >= target, 3000,
                f"{lagging} caught up to {target}")
    assert c.stats.snapshots_taken > taken + 2  # snapshots kept coming during the catch-up
    c.heal_and_converge()


@pytest.mark.sim
def test_install_snapshot_keeps_the_follower_suffix_that_matches_it() -> None:
    """§7 / Figure 13 step 6: if the follower holds the snapshot's last entry (same term), it
    keeps the entries after it. Random seeds rarely get here: the leader must send a snapshot
    to a follower that holds entries past it but has not learned they are committed. Here F's
    acks are lost (the leader's view of F stays behind), F receives, in order, a burst of
    one-entry appends ahead of the leader's commit index, the leader compacts in the middle of
    that burst (past F's old match: it holds compaction for a live follower only up to
    snapshot_every entries, so the bursts go on until it does), a few appends to F are lost,
    and the next one is rejected: the leader falls back to F's old match, which it compacted
    away, and sends its snapshot."""
    options = SimOptions(max_append_entries=1, max_inflight_appends=16)
    c = _scripted(9, 3, options, snapshot_every=(10, 10), trailing=0, delay_ms=(1.0, 1.0))
    leader = _leader_id(c)
    f = sorted(x for x in c.ids if x != leader)[0]
    c.run_until(lambda: c.node(leader).status().peers[f].state == "replicate", 500,
                f"the leader pipelining appends to {f}")

    def lose_f_acks_and_commits(m: Message) -> Message | None:
        if isinstance(m, AppendResponse) and m.frm == f and m.success:
            return None
        if isinstance(m, AppendRequest) and m.to == f and not m.entries:
            return None  # an empty append only tells F the commit index
        return m

    acks = c.intercept(lose_f_acks_and_commits, f"{f}'s acks and commit updates are lost")
    writes = 0

    def write(burst: int = 1) -> None:
        nonlocal writes
        ops = [c.submit(leader, "write", f"k{j}", f"v{writes}.{j}") for j in range(burst)]
        writes += 1
        assert all(_wait_outcome(c, op) is Outcome.OK for op in ops)

    def f_holds_entries_past_the_snapshot() -> bool:
        s_index = c.node(leader).snapshot_meta.index
        fl = c.node(f).log
        # ...and the leader compacted past what it believes F holds: it holds compaction for
        # a live follower only up to snapshot_every entries (SnapshotPolicy.compact_before).
        known = c.node(leader).status().peers[f].match
        return (fl.commit < s_index < fl.last_index()
                and c.node(leader).log.first_index() > known + 1)

    while not f_holds_entries_past_the_snapshot():
        write(burst=5)
        assert writes < 30, "no burst straddled a compaction"
    snap = c.node(leader).snapshot_meta
    gap = c.intercept(lambda m: None if isinstance(m, AppendRequest) and m.to == f else m,
                      f"appends to {f} are lost")
    write()
    write()
    c.mend(gap)
    c.mend(acks)
    installed = c.stats.snapshots_installed
    write()
    assert c.node(leader).snapshot_meta == snap
    c.run_until(lambda: c.node(f).snapshot_meta.index >= snap.index, 1000,
                f"{f} installing the snapshot at {snap.index}")
    assert c.node(f).snapshot_meta == snap
    assert c.node(f).log.last_index() > snap.index  # the matching suffix was kept
    c.run_until(lambda: c.stats.snapshots_installed > installed, 100, "the install persisted")
    c.heal_and_converge()


@pytest.mark.sim
def test_leadership_transfer_to_a_caught_up_follower_is_faster_than_an_election() -> None:
    """Dissertation §3.10: TimeoutNow makes the target campaign at once."""
    c = _scripted(6, 5)
    old = _leader_id(c)
    term = c.node(old).term
    target = sorted(x for x in c.ids if x != old)[1]
    started = c.now
    c.act(old, lambda raft: raft.transfer_leader(target))
    min_election_ms = c.opt.election_timeout_ticks * c.opt.tick_ms
    c.run_until(lambda: _leader_in(c, [target]), min_election_ms / 2, f"{target} leading")
    assert c.node(target).term == term + 1
    assert (c.now - started) / 1000 < min_election_ms / 2
    c.heal_and_converge()


@pytest.mark.sim
def test_removed_voter_that_never_learns_it_was_removed_cannot_disrupt() -> None:
    """Dissertation §4.2.3: pre-vote and the leader lease keep a removed server from
    deposing the leader, even when it never receives its own removal."""
    c = _scripted(8, 3)
    leader = _leader_id(c)
    term = c.node(leader).term
    removed = sorted(x for x in c.ids if x != leader)[0]
    c.cut({(x, removed) for x in c.ids if x != removed}, f"{removed} hears nobody")
    index = c.act(leader, lambda r: r.propose_conf_change(ConfChange(ConfChangeOp.REMOVE,
                                                                      removed)))
    c.run_until(lambda: c.node(leader).log.commit >= index, 1000, "the removal committed")
    c.run_for(3000)  # the removed node times out and campaigns again and again
    assert c.node(removed).role is not Role.LEADER
    assert removed in c.node(removed).membership.voters  # it still believes it is a voter
    assert c.node(leader).role is Role.LEADER
    assert c.node(leader).term == term
    assert all(c.node(x).term == term for x in c.ids if x != removed)
    write = c.submit(leader, "write", "k1", "still-here")
    assert _wait_outcome(c, write) is Outcome.OK
    c.heal_and_converge()


# =========================================================================================
# Boot: what a restarted node starts from (raftkv/runtime/boot.py)
# =========================================================================================
MEMBERS = Membership(frozenset({"n1", "n2", "n3"}))


def _entries(lo: int, hi: int, term: int) -> list[Entry]:
    return [Entry(i, term, data=b"e%d" % i) for i in range(lo, hi)]


def _publish(store: MemorySnapshotStore, index: int, term: int, data: bytes = b"{}") -> None:
    sink = store.create(SnapshotMeta(index, term, MEMBERS))
    sink.write(data)
    sink.close()


def _node_from(boot: BootState) -> RaftNode:
    return RaftNode(Config("n1"), boot, random.Random(1))


def test_boot_of_a_brand_new_node_starts_from_the_initial_membership() -> None:
    boot, stored = load_boot_state(MemoryRaftStorage(), MemorySnapshotStore(), MEMBERS)
    assert stored is None
    assert boot == BootState(HardState(), Snapshot(SnapshotMeta(0, 0, MEMBERS)), (), applied=0)
    assert _node_from(boot).log.last_index() == 0


def test_boot_without_a_snapshot_needs_the_initial_membership() -> None:
    with pytest.raises(ValueError, match="initial membership"):
        load_boot_state(MemoryRaftStorage(), MemorySnapshotStore(), None)


def test_boot_with_a_snapshot_takes_the_membership_from_it() -> None:
    snaps = MemorySnapshotStore()
    _publish(snaps, 4, 1)
    boot, _ = load_boot_state(MemoryRaftStorage(), snaps, None)
    assert boot.snapshot.meta.membership == MEMBERS


def test_boot_after_a_snapshot_keeps_the_trailing_entries_and_the_log_after_it() -> None:
    storage, snaps = MemoryRaftStorage(), MemorySnapshotStore()
    storage.save(HardState(2, "n2", 18), _entries(1, 10, 1) + _entries(10, 21, 2))
    _publish(snaps, 15, 2, b"state@15")
    storage.compact(12)  # three trailing entries stay behind the snapshot
    boot, stored = load_boot_state(storage, snaps, MEMBERS)
    assert stored is not None and b"".join(snaps.chunks(stored)) == b"state@15"
    assert boot.snapshot == stored and boot.snapshot.meta.index == 15
    assert [e.index for e in boot.entries] == list(range(12, 21))
    assert boot.hard_state == HardState(2, "n2", 18)
    assert boot.applied == 15
    node = _node_from(boot)
    assert (node.log.first_index(), node.log.last_index(), node.log.commit) == (12, 20, 18)


def test_boot_after_a_crash_sees_only_what_was_synced() -> None:
    storage, snaps = MemoryRaftStorage(), MemorySnapshotStore()
    storage.save(HardState(1, "n1", 3), _entries(1, 6, 1))
    storage.save(HardState(2, "n3", 5), _entries(6, 9, 2), sync=False)
    sink = snaps.create(SnapshotMeta(5, 1, MEMBERS))  # never closed: invisible
    sink.write(b"partial")
    storage.crash()
    snaps.crash()
    boot, stored = load_boot_state(storage, snaps, MEMBERS)
    assert stored is None
    assert boot.hard_state == HardState(1, "n1", 3)
    assert [e.index for e in boot.entries] == [1, 2, 3, 4, 5]
    assert boot.applied == 0


def test_boot_drops_a_log_that_a_published_snapshot_replaced() -> None:
    """Raft Figure 13 step 6: a crash between publishing a leader's snapshot and resetting the
    log leaves an old log whose entry at the snapshot index has another term."""
    storage, snaps = MemoryRaftStorage(), MemorySnapshotStore()
    storage.save(HardState(3, None, 4), _entries(1, 11, 1))
    _publish(snaps, 8, 3)
    boot, _ = load_boot_state(storage, snaps, MEMBERS)
    assert boot.entries == ()
    assert _node_from(boot).log.last_index() == 8
    # ... and the stale log is gone from storage, so the next save (from index 9) lines up.
    storage.crash()
    assert storage.last_index() < storage.first_index()
    storage.save(None, _entries(9, 10, 3))
    assert (storage.first_index(), storage.last_index()) == (9, 9)


def test_boot_drops_a_log_that_ends_before_a_published_snapshot() -> None:
    storage, snaps = MemoryRaftStorage(), MemorySnapshotStore()
    storage.save(HardState(1, None, 4), _entries(1, 6, 1))
    _publish(snaps, 20, 2)
    boot, _ = load_boot_state(storage, snaps, MEMBERS)
    assert boot.entries == ()
    storage.save(None, _entries(21, 23, 2))
    assert (storage.first_index(), storage.last_index()) == (21, 22)


def test_boot_keeps_the_suffix_written_after_an_installed_snapshot() -> None:
    storage, snaps = MemoryRaftStorage(), MemorySnapshotStore()
    _publish(snaps, 8, 3)
    storage.save(HardState(3, None, 8), _entries(9, 12, 3), reset_log=True)
    boot, _ = load_boot_state(storage, snaps, MEMBERS)
    assert [e.index for e in boot.entries] == [9, 10, 11]


def test_boot_refuses_a_log_with_missing_entries() -> None:
    storage, snaps = MemoryRaftStorage(), MemorySnapshotStore()
    storage.save(HardState(1, None, 0), _entries(1, 11, 1))
    storage.compact(6)  # compacted, but the snapshot behind it is gone
    with pytest.raises(StorageError, match="entries are missing"):
        load_boot_state(storage, snaps, MEMBERS)


def test_boot_refuses_a_commit_index_beyond_the_stored_log() -> None:
    storage = MemoryRaftStorage()
    storage.save(HardState(1, None, 9), _entries(1, 4, 1))
    with pytest.raises(StorageError, match="commit index 9"):
        load_boot_state(storage, MemorySnapshotStore(), MEMBERS)
