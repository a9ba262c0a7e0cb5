"""The write-throughput benchmark's records: one per run, and their medians per point."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from benchmarks.accounting import CpuRecord
from benchmarks.loadgen import Kind

LEADER: Final = "leader"
SPREAD: Final = "spread"


@dataclass(frozen=True, slots=True)
class Point:
    kind: Kind
    mode: str
    concurrency: int
    """Connections; for the watch point, watches."""

    @property
    def label(self) -> str:
        if self.kind is Kind.WATCH:
            return f"watch/c{self.concurrency}"
        return f"{self.kind.value}/{self.mode}/c{self.concurrency}"


@dataclass(frozen=True, slots=True)
class LostWrite:
    key: str
    acknowledged: str
    found: str | None


@dataclass(frozen=True, slots=True)
class WatchRecord:
    """The watch point's own figures (benchmarks.watchload)."""

    watchers: int
    keys: int
    """Watched keys (as many unwatched ones are written too)."""
    target_rate: float
    write_rate: float
    """Acknowledged writes per second in the window (watched and unwatched keys)."""
    deliveries: int
    """(acknowledged write of a watched key, watcher of that key) pairs, the whole run."""
    coalesced: int
    missed: int
    delay_p50_ms: float
    """From the write's send to the watch's answer (writes sent in the window)."""
    delay_p99_ms: float
    after_ack_p50_ms: float
    """From the write's acknowledgement to the watch's answer (may be < 0)."""
    after_ack_p99_ms: float
    rearmed_after_timeout: int
    missed_examples: list[tuple[int, str, int]] = field(default_factory=list)
    """(watcher, key, index) of a few missed changes."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    system: str
    label: str
    """The system and its variant (`raftkv`, `raftkv-w1`, `etcd`)."""
    point: str
    kind: str
    mode: str
    concurrency: int
    repeat: int
    ops_per_s: float
    """Keys written or read per second (for batches: keys, not requests)."""
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    generator_cpu_cores: float
    server_cpu_cores: float | None
    """All server processes together (None when they were not started here)."""
    leader_cpu_cores: float | None
    """All processes of the leader."""
    server_cpu_cores_by_node: dict[str, float]
    load_average: float
    """The machine's 1-minute load average at the end of the run (other tenants show here)."""
    window_s: float
    leader: str
    leader_changed: bool
    acknowledged_keys: int
    cpu: CpuRecord | None = None
    """Where the servers' CPU went (benchmarks.accounting); None when not started here."""
    watch: WatchRecord | None = None
    lost_writes: list[LostWrite] = field(default_factory=list)
    readback_anomalies: int = 0
    """Keys the bulk read-back showed wrong but a single-key linearizable read showed right."""

    @property
    def missed_changes(self) -> int:
        return 0 if self.watch is None else self.watch.missed


@dataclass(frozen=True, slots=True)
class WatchSummary:
    watchers: int
    keys: int
    target_rate: float
    write_rate: float
    delay_p50_ms: float
    delay_p99_ms: float
    after_ack_p50_ms: float
    after_ack_p99_ms: float
    coalesced: int
    deliveries: int
    rearmed_after_timeout: int
    missed: int


@dataclass(frozen=True, slots=True)
class PointSummary:
    """Medians over the runs of one point of one system variant (sums for the counts)."""

    system: str
    label: str
    point: str
    kind: str
    mode: str
    concurrency: int
    runs: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    generator_cpu_cores: float
    server_cpu_cores: float | None
    leader_cpu_cores: float | None
    lost_writes: int
    missed_changes: int = 0
    server_ms_per_op: float | None = None
    leader_us_per_op: float | None = None
    leader_main_us_per_op: float | None = None
    leader_main_cs_per_op: float | None = None
    leader_main_voluntary_cs_per_op: float | None = None
    worker_us_per_request: dict[str, float] = field(default_factory=dict)
    """Each leader worker's (by index), median over runs."""
    worker_us_per_request_max: float | None = None
    """The busiest leader worker's, median over runs of each run's highest."""
    follower_main_us_per_op_max: float | None = None
    follower_us_per_op_max: float | None = None
    """Every process of a follower; median over runs of each run's higher follower."""
    processes_changed: int = 0
    watch: WatchSummary | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def median_of(values: Iterable[float | None]) -> float | None:
    """The median of the values that are there (not None, not NaN); None if none is."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def _max_or_none(values: Iterable[float]) -> float | None:
    present = [v for v in values if not math.isnan(v)]
    return max(present) if present else None


def _cpu_median(runs: Sequence[RunRecord],
                pick: Callable[[CpuRecord], float | None]) -> float | None:
    return median_of(pick(r.cpu) for r in runs if r.cpu is not None)


def _watch_summary(runs: Sequence[RunRecord]) -> WatchSummary | None:
    watches = [r.watch for r in runs if r.watch is not None]
    if not watches:
        return None

    def med(pick: Callable[[WatchRecord], float]) -> float:
        value = median_of(pick(w) for w in watches)
        return float("nan") if value is None else value

    first = watches[0]
    return WatchSummary(
        watchers=first.watchers, keys=first.keys, target_rate=first.target_rate,
        write_rate=med(lambda w: w.write_rate), delay_p50_ms=med(lambda w: w.delay_p50_ms),
        delay_p99_ms=med(lambda w: w.delay_p99_ms),
        after_ack_p50_ms=med(lambda w: w.after_ack_p50_ms),
        after_ack_p99_ms=med(lambda w: w.after_ack_p99_ms),
        coalesced=sum(w.coalesced for w in watches),
        deliveries=sum(w.deliveries for w in watches),
        rearmed_after_timeout=sum(w.rearmed_after_timeout for w in watches),
        missed=sum(w.missed for w in watches))


def summarize(records: Sequence[RunRecord]) -> list[PointSummary]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.label, r.point), []).append(r)
    summaries = []
    for (label, point), runs in groups.items():
        first = runs[0]
        workers = sorted({w for r in runs if r.cpu is not None
                          for w in r.cpu.leader_worker_us_per_request}, key=int)
        per_worker = {w: median_of(r.cpu.leader_worker_us_per_request.get(w)
                                   for r in runs if r.cpu is not None) for w in workers}
        summaries.append(PointSummary(
            system=first.system, label=label, point=point, kind=first.kind, mode=first.mode,
            concurrency=first.concurrency, runs=len(runs),
            ops_per_s=statistics.median(r.ops_per_s for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            errors=sum(sum(r.errors.values()) for r in runs),
            generator_cpu_cores=statistics.median(r.generator_cpu_cores for r in runs),
            server_cpu_cores=median_of(r.server_cpu_cores for r in runs),
            leader_cpu_cores=median_of(r.leader_cpu_cores for r in runs),
            lost_writes=sum(len(r.lost_writes) for r in runs),
            missed_changes=sum(r.missed_changes for r in runs),
            server_ms_per_op=_cpu_median(runs, lambda c: c.server_ms_per_op),
            leader_us_per_op=_cpu_median(runs, lambda c: c.leader_us_per_op),
            leader_main_us_per_op=_cpu_median(runs, lambda c: c.leader_main_us_per_op),
            leader_main_cs_per_op=_cpu_median(runs, lambda c: c.leader_main_cs_per_op),
            leader_main_voluntary_cs_per_op=_cpu_median(
                runs, lambda c: c.leader_main_voluntary_cs_per_op),
            worker_us_per_request={w: v for w, v in per_worker.items() if v is not None},
            worker_us_per_request_max=_cpu_median(
                runs, lambda c: _max_or_none(c.leader_worker_us_per_request.values())),
            follower_main_us_per_op_max=_cpu_median(
                runs, lambda c: _max_or_none(c.follower_main_us_per_op.values())),
            follower_us_per_op_max=_cpu_median(
                runs, lambda c: _max_or_none(c.follower_us_per_op.values())),
            processes_changed=sum(r.cpu.processes_changed for r in runs if r.cpu is not None),
            watch=_watch_summary(runs)))
    return summaries
