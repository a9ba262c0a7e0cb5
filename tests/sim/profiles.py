"""Fault profiles: plain data describing what the simulator does to a cluster.

A seed picks a profile and a cluster size (`profile_for_seed`); the profile's ranges are then
drawn from the seed's random source, so the same seed always makes the same schedule.
Times are virtual milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

Range = tuple[float, float]

PARTITION_KINDS = ("symmetric", "one_way", "isolate_leader", "isolate_node")


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    heal_ms: Range = (3000, 4000)
    """When every fault heals and clients stop; the cluster must converge after it."""
    delay_ms: Range = (0.5, 6.0)
    """One-way network delay of each message (random per message: reordering)."""
    loss: float = 0.0
    dup: float = 0.0
    fsync_ms: Range = (0.2, 8.0)
    clock_drift: float = 0.05
    """Each node's tick interval is off by up to this fraction (drawn per node)."""

    partitions: tuple[str, ...] = ()
    """Kinds drawn from PARTITION_KINDS."""
    partition_gap_ms: Range = (200, 900)
    partition_length_ms: Range = (100, 900)

    crash_gap_ms: Range | None = None
    """Time between crashes of a random node (None: no crashes)."""
    crash_leader: float = 0.3
    """Probability that a crash picks the current leader."""
    downtime_ms: Range = (30, 600)
    crash_during_persist: float = 0.0
    """Probability, per synced Ready, of a crash before its persist completes."""
    whole_cluster_restart: float = 0.0
    """Probability per crash that every node goes down instead."""
    crash_mid_snapshot: float = 0.0
    """Probability, per snapshot received from the leader, of a power cut after it is
    published and before the log it replaces is reset."""
    crash_new_leader: float = 0.0
    """Probability that a node which just became leader crashes soon after (Figure 8)."""
    new_leader_crash_ms: Range = (0, 30)

    snapshot_every: tuple[int, int] | None = None
    """Applied entries between two snapshots of a node (drawn per node)."""
    trailing: int = 5
    """Log entries kept behind a snapshot."""

    conf_changes: bool = False
    spares: int = 0
    """Extra nodes, not members at the start, that the operator may add (they boot as
    joining nodes: no initial membership)."""
    transfers: bool = False
    operator_gap_ms: Range = (150, 600)

    clients: int = 4
    think_ms: Range = (2, 30)
    backoff_ms: Range = (10, 60)
    """A client's pause after an operation that failed."""
    op_timeout_ms: float = 800
    read_ratio: float = 0.4
    delete_ratio: float = 0.05
    keys: int = 3
    follow_leader: float = 0.8
    """Probability that a client sends to the node it believes is the leader."""


CALM = Profile("calm")
LOSSY = Profile("lossy", loss=0.08, dup=0.08, delay_ms=(0.5, 25.0))
PARTITIONS = Profile(
    "partitions",
    partitions=PARTITION_KINDS,
    loss=0.01,
    delay_ms=(0.5, 10.0),
)
CRASHES = Profile(
    "crashes",
    crash_gap_ms=(150, 700),
    crash_during_persist=0.003,
    whole_cluster_restart=0.1,
)
SNAPSHOTS = Profile(
    "snapshots",
    snapshot_every=(10, 40),
    trailing=3,
    partitions=("isolate_node",),
    partition_gap_ms=(100, 500),
    partition_length_ms=(400, 1500),
    crash_gap_ms=(500, 1500),
    crash_during_persist=0.002,
    crash_mid_snapshot=0.3,
    loss=0.03,
    think_ms=(1, 15),
)
MEMBERSHIP = Profile(
    "membership",
    conf_changes=True,
    spares=1,
    crash_gap_ms=(600, 2000),
    loss=0.02,
    operator_gap_ms=(100, 400),
)
TRANSFERS = Profile("transfers", transfers=True, loss=0.02, operator_gap_ms=(100, 500))
CHAOS = Profile(
    "chaos",
    loss=0.05,
    dup=0.05,
    delay_ms=(0.5, 15.0),
    fsync_ms=(0.2, 25.0),  # a slow disk: long windows with a Ready outstanding
    partitions=PARTITION_KINDS,
    crash_gap_ms=(400, 1500),
    crash_during_persist=0.002,
    crash_mid_snapshot=0.2,
    whole_cluster_restart=0.05,
    snapshot_every=(15, 40),
    trailing=4,
    conf_changes=True,
    spares=1,
    transfers=True,
)

PROFILES: tuple[Profile, ...] = (
    CALM, LOSSY, PARTITIONS, CRASHES, SNAPSHOTS, MEMBERSHIP, TRANSFERS, CHAOS,
)
PROFILES_BY_NAME = {p.name: p for p in PROFILES}

SCRIPTED = Profile("scripted", heal_ms=(1e9, 1e9), clients=0)
"""No clients, no faults, no heal: a scenario test drives everything."""


def profile_for_seed(seed: int) -> tuple[Profile, int]:
    """The profile and cluster size a seed runs with (seeds cycle through both)."""
    profile = PROFILES[seed % len(PROFILES)]
    nodes = 3 if (seed // len(PROFILES)) % 2 == 0 else 5
    return profile, nodes


# Profiles that make one injected bug reachable quickly (tests/sim/test_injected_bugs.py).
# (a) Figure 8: leaders crash right after appending, logs diverge, old-term entries linger.
FIGURE8 = replace(
    CRASHES,
    name="figure8",
    crash_gap_ms=(60, 300),
    crash_leader=0.8,
    downtime_ms=(20, 300),
    crash_during_persist=0.02,
    crash_new_leader=0.3,
    partitions=("isolate_leader", "symmetric"),
    partition_gap_ms=(100, 400),
    partition_length_ms=(50, 400),
    whole_cluster_restart=0.0,
    think_ms=(1, 10),
)
# (b), (f): crashes while a persist is in flight.
PERSIST_CRASHES = replace(
    CRASHES,
    name="persist_crashes",
    crash_gap_ms=(80, 400),
    crash_leader=0.6,
    downtime_ms=(10, 200),
    crash_during_persist=0.15,
    fsync_ms=(2.0, 15.0),
    delay_ms=(0.3, 2.0),
    whole_cluster_restart=0.0,
    think_ms=(1, 8),
)
# (c): a leader isolated while many fast clients read from it and write to its successor.
STALE_READS = replace(
    PARTITIONS,
    name="stale_reads",
    partitions=("isolate_leader",),
    partition_gap_ms=(50, 200),
    partition_length_ms=(250, 600),
    delay_ms=(0.3, 3.0),
    loss=0.0,
    clients=8,
    keys=1,
    think_ms=(0.5, 4),
    read_ratio=0.5,
    follow_leader=0.6,
)
# (d), (e): divergent logs from partitions and crashes.
DIVERGENCE = replace(
    FIGURE8,
    name="divergence",
    partitions=PARTITION_KINDS,
    loss=0.02,
)
