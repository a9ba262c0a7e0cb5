"""The CPU of one commit, in one process, with the node's own code and LMDB on a real disk.

Three RaftDrivers (raftkv.runtime.driver) over LmdbRaftStorage, joined by an in-memory frame
router instead of sockets, run commit cycles of `writes` client writes each:

    leader     propose the writes, send the appends, save (one synced LMDB commit)
    followers  decode the append, step it, save, send the ack, apply what the leader
               committed in the previous cycle
    leader     step the acks, commit, apply, answer the writes

Each phase is timed with the thread's CPU clock, split into user and kernel time as
getrusage(RUSAGE_THREAD) splits it (the kernel's estimate from its ticks), once with the
stores synced as a node runs them and once with `unsafe_no_fsync` (a node's
RAFTKV_UNSAFE_NO_FSYNC): the difference is what the two ordered flushes of an LMDB commit
cost in CPU (the kernel's work, and the caches a process finds cold after sleeping in them),
apart from Python. What a node spends beyond these figures in a cluster is its event loop,
sockets and HTTP workers (`make bench` measures the whole).

Every node must have saved each cycle's entries by the cycle's end, and every write must be
answered and applied on all three nodes with the same value, or the run fails: a figure is
of replication that happened.
"""

from __future__ import annotations

import math
import random
import resource
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from raftkv import codec
from raftkv.core import Config, RaftNode
from raftkv.core.types import Role
from raftkv.kv.commands import Put, encode_command
from raftkv.kv.state_machine import KVStateMachine
from raftkv.metrics import NodeMetrics
from raftkv.runtime.boot import load_boot_state, save_bootstrap
from raftkv.runtime.driver import BASE_MEMBERSHIP, RaftDriver
from raftkv.service import ServiceError
from snapshots.lmdb_store import LmdbSnapshotStore
from snapshots.policy import SnapshotPolicy
from storage.lmdb_store import LmdbRaftStorage

__all__ = ["HEADER", "CycleResult", "measure", "table_rows"]

MEMBERS: Final = {"n1": "127.0.0.1:1", "n2": "127.0.0.1:2", "n3": "127.0.0.1:3"}
LEADER: Final = "n1"
FOLLOWERS: Final = ("n2", "n3")
VALUE_BYTES: Final = 100
KEYS: Final = 10_000
WARMUP_COMMITS: Final = 20


class CycleError(Exception):
    """The cluster did not replicate what it was given."""


class _Router:
    """The driver's FrameSender: frames queued by destination, delivered by the cycle."""

    def __init__(self) -> None:
        self.out: dict[str, list[tuple[int, bytes]]] = defaultdict(list)

    def send(self, to: str, kind: int, payload: bytes) -> bool:
        self.out[to].append((kind, payload))
        return True

    def flush(self) -> None:
        pass

    def has_output(self, to: str) -> bool:
        return bool(self.out.get(to))

    def has_link(self, to: str) -> bool:
        return to in MEMBERS

    def set_peers(self, peers: Mapping[str, str]) -> None:
        pass


class _Answers:
    """The Completion of every write of a run: counts the answers, keeps the first error."""

    def __init__(self) -> None:
        self.answered = 0
        self.error: ServiceError | None = None

    def ok(self, _value: object) -> None:
        self.answered += 1

    def fail(self, error: ServiceError) -> None:
        if self.error is None:
            self.error = error


@dataclass(frozen=True, slots=True)
class CycleResult:
    """CPU per commit of `writes` writes, microseconds (a follower's: the mean of the two).
    The totals are exact; their user/kernel split is the kernel's tick estimate, NaN when no
    tick fell in the run (too short a run to say)."""

    writes: int
    synced: bool
    commits: int
    leader_us: float
    leader_user_us: float
    leader_sys_us: float
    follower_us: float
    follower_user_us: float
    follower_sys_us: float


def _usage() -> tuple[float, float, float]:
    """(CPU, user, kernel) seconds of this thread: the first exact (CLOCK_THREAD_CPUTIME_ID),
    the split from getrusage, which the kernel estimates from its ticks."""
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return time.thread_time(), r.ru_utime, r.ru_stime


class _Spent:
    """One role's CPU over the timed phases."""

    def __init__(self) -> None:
        self.cpu = self.user = self.sys = 0.0

    def add(self, before: tuple[float, float, float], after: tuple[float, float, float]) -> None:
        self.cpu += after[0] - before[0]
        self.user += after[1] - before[1]
        self.sys += after[2] - before[2]

    def split(self) -> tuple[float, float]:
        """(user, kernel) seconds: the exact CPU, split as the ticks say (NaN: no tick)."""
        ticks = self.user + self.sys
        if ticks <= 0:
            return math.nan, math.nan
        return self.cpu * self.user / ticks, self.cpu * self.sys / ticks


class _Cluster:
    def __init__(self, root: Path, *, synced: bool) -> None:
        self.drivers: dict[str, RaftDriver] = {}
        self._routers: dict[str, _Router] = {}
        self._stores: list[LmdbRaftStorage | LmdbSnapshotStore] = []
        try:
            self._start(root, synced)
        except BaseException:
            self.close()
            raise

    def _start(self, root: Path, synced: bool) -> None:
        for nid in MEMBERS:
            raft_dir, snap_dir = root / nid / "raft", root / nid / "snapshots"
            raft_dir.mkdir(parents=True)
            snap_dir.mkdir(parents=True)
            storage = LmdbRaftStorage(raft_dir, unsafe_no_fsync=not synced)
            snapshots = LmdbSnapshotStore(snap_dir)
            self._stores += [storage, snapshots]
            save_bootstrap(storage, MEMBERS)
            boot, _ = load_boot_state(storage, snapshots, BASE_MEMBERSHIP)
            core = RaftNode(Config(nid, election_timeout_ticks=1_000_000), boot,
                            random.Random(1))
            router = self._routers[nid] = _Router()
            self.drivers[nid] = RaftDriver(
                core=core, storage=storage, snapshots=snapshots, state_machine=KVStateMachine(),
                frames=router, addresses=MEMBERS,
                snapshot_policy=SnapshotPolicy(entries=1 << 40, trailing=0),
                rng=random.Random(1), metrics=NodeMetrics(), post=lambda callback: callback())
        leader = self.drivers[LEADER]
        leader.core.campaign()
        leader.process()
        for _ in range(5):
            for nid in MEMBERS:
                self.deliver(nid)
        if leader.core.role is not Role.LEADER:
            raise CycleError(f"{LEADER} did not become the leader")

    def deliver(self, nid: str) -> None:
        """Every frame the others queued for `nid`, decoded and stepped; then its turn's end."""
        driver = self.drivers[nid]
        for sender, router in self._routers.items():
            for _kind, payload in router.out.pop(nid, ()):
                problem = driver.step(sender, codec.decode_message(payload))
                if problem is not None:
                    raise CycleError(f"{nid} refused a message from {sender}: {problem}")
        driver.process()

    def close(self) -> None:
        for store in self._stores:
            store.close()


def _run(cluster: _Cluster, writes: int, commits: int, answers: _Answers,
         first_key: int) -> tuple[_Spent, _Spent]:
    """`commits` cycles: what the leader spent, and the followers (summed)."""
    leader = cluster.drivers[LEADER]
    spent_leader, spent_followers = _Spent(), _Spent()
    value = "v" * VALUE_BYTES
    key = first_key
    for _ in range(commits):
        commands = []
        for _ in range(writes):
            commands.append(encode_command(Put(f"key{key % KEYS}", value)))
            key += 1
        t0 = _usage()
        for data in commands:
            leader.propose(data, answers)
        leader.process()
        t1 = _usage()
        for nid in FOLLOWERS:
            cluster.deliver(nid)
        t2 = _usage()
        cluster.deliver(LEADER)
        t3 = _usage()
        spent_leader.add(t0, t1)
        spent_leader.add(t2, t3)
        spent_followers.add(t1, t2)
        _check_saved(cluster)
    return spent_leader, spent_followers


def _check_saved(cluster: _Cluster) -> None:
    """Every node saved the cycle's entries (untimed): a follower that fell behind would make
    the followers' figure one of less work, and the leader would still commit with the other."""
    last = cluster.drivers[LEADER].core.log.last_index()
    for nid, driver in cluster.drivers.items():
        if driver.core.log.stable_index != last:
            raise CycleError(f"{nid} saved up to {driver.core.log.stable_index}, the leader's "
                             f"log ends at {last}: it did not keep up")


def _check(cluster: _Cluster, answers: _Answers, expected: int) -> None:
    if answers.error is not None:
        raise CycleError(f"a write failed: {answers.error}")
    if answers.answered != expected:
        raise CycleError(f"{answers.answered} of {expected} writes were answered")
    leader = cluster.drivers[LEADER]
    for _ in range(100):  # a heartbeat carries the last cycle's commit index to the followers
        if all(cluster.drivers[nid].sm.applied_index == leader.core.log.commit
               for nid in FOLLOWERS):
            break
        leader.tick()
        leader.process()
        for nid in FOLLOWERS:
            cluster.deliver(nid)
        cluster.deliver(LEADER)
    applied = {nid: d.sm.applied_index for nid, d in cluster.drivers.items()}
    if len(set(applied.values())) != 1 or applied[LEADER] != leader.core.log.commit:
        raise CycleError(f"applied indexes differ: {applied}, commit {leader.core.log.commit}")
    sample = [f"key{i}" for i in range(0, KEYS, max(1, KEYS // 97))]
    for nid, d in cluster.drivers.items():
        for k in sample:
            if d.sm.get(k) != leader.sm.get(k):
                raise CycleError(f"{nid} holds another value of {k} than the leader")


def measure(root: Path, writes: int, commits: int, *, synced: bool) -> CycleResult:
    """CPU per commit of `commits` cycles of `writes` writes, after WARMUP_COMMITS untimed."""
    if writes < 1 or commits < 1:
        raise ValueError("writes and commits must be at least 1")
    with tempfile.TemporaryDirectory(prefix="raftkv-cycle-", dir=root) as tmp:
        cluster = _Cluster(Path(tmp), synced=synced)
        try:
            answers = _Answers()
            _run(cluster, writes, WARMUP_COMMITS, answers, 0)
            spent_leader, spent_followers = _run(cluster, writes, commits, answers,
                                                 WARMUP_COMMITS * writes)
            _check(cluster, answers, (WARMUP_COMMITS + commits) * writes)
        finally:
            cluster.close()
    per = 1e6 / commits
    followers = len(FOLLOWERS)
    lu, ls = spent_leader.split()
    fu, fs = spent_followers.split()
    return CycleResult(writes, synced, commits, spent_leader.cpu * per, lu * per, ls * per,
                       spent_followers.cpu * per / followers, fu * per / followers,
                       fs * per / followers)


HEADER: Final = ("writes/commit", "disk", "leader us/commit (user+sys)", "per write",
                  "follower us/commit (user+sys)", "per write")


def table_rows(results: Sequence[CycleResult]) -> list[list[str]]:
    """Rows under HEADER: per commit (with its user/kernel split) and per write."""
    return [[str(r.writes), "synced" if r.synced else "no fsync",
             _with_split(r.leader_us, r.leader_user_us, r.leader_sys_us),
             f"{r.leader_us / r.writes:,.1f}",
             _with_split(r.follower_us, r.follower_user_us, r.follower_sys_us),
             f"{r.follower_us / r.writes:,.1f}"] for r in results]


def _with_split(total: float, user: float, kernel: float) -> str:
    if math.isnan(user) or math.isnan(kernel):
        return f"{total:,.0f} (split unknown)"
    return f"{total:,.0f} ({user:,.0f}+{kernel:,.0f})"
