"""Metrics of one node, in the Prometheus text format (prometheus-client: the standard format
and its histogram/counter semantics, which we would otherwise re-implement).

The Raft process owns the registry (`NodeMetrics`). HTTP workers count their own requests in
plain dicts (`WorkerStats`: no lock, no registry, one thread) and send them to the Raft process
about once a second and with every /metrics request; the Raft process renders them with a
`worker` label. Every label set on a hot path is bound once, up front.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from raftkv.kv.state_machine import LeaseGrantResult, LeaseRevokeResult, PutResult

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

FAST_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                         0.1, 0.25, 0.5, 1.0)
_SLOW_BUCKETS_S: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _StateCollector(Collector):
    """Gauges read at scrape time from the node (term, role, indices, peers, leases)."""

    def __init__(self, read: Callable[[], dict[str, object]]) -> None:
        self._read = read

    def collect(self) -> list[GaugeMetricFamily]:
        state = self._read()
        out = []
        for name, help_text in (("term", "Current Raft term"),
                                ("commit_index", "Highest log index known committed"),
                                ("applied_index", "Highest log index applied"),
                                ("last_index", "Last log index"),
                                ("snapshot_index", "Index of the latest snapshot"),
                                ("leases_live", "Leases that exist"),
                                ("watches", "Watches waiting on this node")):
            g = GaugeMetricFamily(f"raftkv_{name}", help_text)
            g.add_metric([], float(state.get(name, 0)))  # type: ignore[arg-type]
            out.append(g)
        role = GaugeMetricFamily("raftkv_role", "1 for the node's current role",
                                 labels=["role"])
        for r in ("follower", "pre_candidate", "candidate", "leader"):
            role.add_metric([r], 1.0 if state.get("role") == r else 0.0)
        out.append(role)
        peers = GaugeMetricFamily("raftkv_peer_reachable", "1 when the peer link is up",
                                  labels=["peer"])
        reach = state.get("peers", {})
        assert isinstance(reach, dict)
        for peer, up in sorted(reach.items()):
            peers.add_metric([peer], 1.0 if up else 0.0)
        out.append(peers)
        return out


class _WorkerCollector(Collector):
    """The HTTP workers' own counts (WorkerStats.snapshot), by worker."""

    def __init__(self, read: Callable[[], Mapping[int, Mapping[str, Any]]]) -> None:
        self._read = read

    def collect(self) -> list[Any]:
        stats = self._read()
        http = HistogramMetricFamily("raftkv_http_request_seconds",
                                     "HTTP request latency by route, method and status",
                                     labels=["worker", "route", "method", "status"])
        batches = HistogramMetricFamily(
            "raftkv_worker_channel_batch_requests",
            "Requests a worker sent to the Raft process per frame",
            labels=["worker"])
        requests = CounterMetricFamily("raftkv_worker_requests",
                                       "HTTP requests answered, by worker", labels=["worker"])
        for worker, snap in sorted(stats.items()):
            label = str(worker)
            total = 0
            for route, method, status, count, total_s, counts in snap.get("requests", ()):
                http.add_metric([label, route, method, str(status)],
                                _cumulative(FAST_BUCKETS_S, counts), total_s)
                total += count
            requests.add_metric([label], float(total))
            batch = snap.get("batches")
            if batch:
                _count, batch_sum, counts = batch
                batches.add_metric([label], _cumulative(BATCH_BUCKETS, counts), batch_sum)
        return [http, batches, requests]


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*map(str, bounds), "+Inf"), counts, strict=False):
        running += n
        out.append((bound, float(running)))
    return out


class Tally:
    """A histogram for one thread's hot path: plain counts, no lock (prometheus-client's
    take a lock per observation). Rendered by NodeMetrics' collector."""

    __slots__ = ("bounds", "count", "counts", "help", "name", "total")

    def __init__(self, name: str, help_text: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.help = help_text
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def family(self) -> HistogramMetricFamily:
        h = HistogramMetricFamily(self.name, self.help)
        h.add_metric([], _cumulative(self.bounds, self.counts), self.total)
        return h


class Tick:
    """A counter for one thread's hot path (no lock)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _HotCollector(Collector):
    """NodeMetrics' lock-free tallies and ticks, at scrape time."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._m = metrics

    def collect(self) -> list[Any]:
        m = self._m
        out: list[Any] = [t.family() for t in m.tallies]
        for name, help_text, label, ticks in m.tick_families:
            family = CounterMetricFamily(name, help_text, labels=[label] if label else None)
            for value, tick in ticks.items():
                family.add_metric([value] if label else [], float(tick.value))
            out.append(family)
        return out


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.leader_changes = Tick()
        self.proposals_committed = Tick()
        self.proposals_rejected = Tick()
        self.proposals_dropped = Tick()
        self.proposals_unknown = Tick()
        self.leases_granted = Tick()
        self.leases_revoked = Tick()
        self.leases_expired = Tick()
        self.forward_results_dropped = {reason: Tick()
                                        for reason in ("too_old", "too_many", "not_linked")}
        """Answers to followers' forwards the leader dropped unsent (its link to the
        follower refused them: raftkv.runtime.forwarding), by reason."""
        self.fsync_seconds = Tally("raftkv_fsync_seconds",
                                   "Time of one synced save of a Ready", FAST_BUCKETS_S)
        self.batch_entries = Tally("raftkv_persist_batch_entries",
                                   "Log entries saved per synced save (group commit)",
                                   BATCH_BUCKETS)
        self.apply_seconds = Tally("raftkv_apply_seconds",
                                   "Time to apply the committed entries of one Ready",
                                   FAST_BUCKETS_S)
        self.channel_batch = Tally("raftkv_channel_batch_requests",
                                   "Requests per frame read from the HTTP workers",
                                   BATCH_BUCKETS)
        self.tallies = (self.fsync_seconds, self.batch_entries, self.apply_seconds,
                        self.channel_batch)
        self.tick_families: tuple[tuple[str, str, str, dict[str, Tick]], ...] = (
            ("raftkv_leader_changes", "Times this node saw the leader change", "",
             {"": self.leader_changes}),
            ("raftkv_proposals", "Client writes by outcome", "outcome",
             {"committed": self.proposals_committed, "rejected": self.proposals_rejected,
              "dropped": self.proposals_dropped, "unknown": self.proposals_unknown}),
            ("raftkv_leases", "Leases granted, revoked by a client, expired", "event",
             {"granted": self.leases_granted, "revoked": self.leases_revoked,
              "expired": self.leases_expired}),
            ("raftkv_forward_results_dropped",
             "Answers to a follower's forwards the leader dropped unsent, by reason",
             "reason", self.forward_results_dropped),
        )
        r.register(_HotCollector(self))
        # Off the hot path (the snapshot writer thread, worker restarts): prometheus-client.
        self.snapshot_seconds = Histogram("raftkv_snapshot_seconds",
                                          "Time to serialise and save a snapshot",
                                          buckets=_SLOW_BUCKETS_S, registry=r)
        self.snapshot_bytes = Gauge("raftkv_snapshot_bytes", "Size of the latest snapshot",
                                    registry=r)
        self.snapshots = Counter("raftkv_snapshots_total", "Snapshots taken or installed",
                                 ["kind"], registry=r)
        self.worker_restarts = Counter("raftkv_worker_restarts_total",
                                       "HTTP worker processes restarted after they died",
                                       registry=r)
        self.peer_messages_dropped = Counter(
            "raftkv_peer_messages_dropped_total",
            "Peer messages ignored as invalid (wrong sender, impossible content, refused "
            "snapshots)", registry=r)

    def watch_state(self, read: Callable[[], dict[str, object]]) -> None:
        self.registry.register(_StateCollector(read))

    def watch_workers(self, read: Callable[[], Mapping[int, Mapping[str, Any]]]) -> None:
        self.registry.register(_WorkerCollector(read))

    def note_lease_result(self, result: object, index: int) -> None:
        """Count lease grants and revokes among applied results (replayed answers, whose
        index is not the entry's, are not counted again)."""
        if isinstance(result, PutResult):
            if result.ttl_s is not None and result.index == index:
                self.leases_granted.inc()
        elif isinstance(result, LeaseGrantResult):
            if result.index == index:
                self.leases_granted.inc()
        elif isinstance(result, LeaseRevokeResult) and result.index == index:
            (self.leases_expired if result.expired else self.leases_revoked).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerStats:
    """One HTTP worker's counts (its one thread only): requests by route, method and status
    with a latency histogram, and the requests per frame it sent to the Raft process."""

    __slots__ = ("_batch", "_requests")

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, int], list[Any]] = {}
        self._batch: list[Any] = [0, 0, [0] * (len(BATCH_BUCKETS) + 1)]

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        row = self._requests.get(key)
        if row is None:
            row = self._requests[key] = [0, 0.0, [0] * (len(FAST_BUCKETS_S) + 1)]
        row[0] += 1
        row[1] += seconds
        row[2][bisect.bisect_left(FAST_BUCKETS_S, seconds)] += 1

    def observe_batch(self, requests: int) -> None:
        batch = self._batch
        batch[0] += 1
        batch[1] += requests
        batch[2][bisect.bisect_left(BATCH_BUCKETS, requests)] += 1

    @property
    def requests(self) -> int:
        return sum(row[0] for row in self._requests.values())

    def snapshot(self) -> dict[str, Any]:
        """Plain values (msgpack-able): what the Raft process renders."""
        return {
            "requests": [[route, method, status, row[0], row[1], list(row[2])]
                         for (route, method, status), row in self._requests.items()],
            "batches": [self._batch[0], self._batch[1], list(self._batch[2])],
        }
