"""Prometheus metrics of one node (prometheus-client: the standard text format and its
histogram/counter semantics, which we would otherwise re-implement).

Each node owns a registry (not the process-global one), so tests can run several nodes in
one process. Names follow Prometheus conventions: units last, `_total` for counters.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_FAST_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0)
_SLOW_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _StateCollector(Collector):
    """Gauges read at scrape time from the node (term, role, indices, peers)."""

    def __init__(self, read: Callable[[], dict[str, object]]) -> None:
        self._read = read

    def collect(self) -> list[GaugeMetricFamily]:
        state = self._read()
        out = []
        for name, help_text in (("term", "Current Raft term"),
                                ("commit_index", "Highest log index known committed"),
                                ("applied_index", "Highest log index applied"),
                                ("last_index", "Last log index"),
                                ("snapshot_index", "Index of the latest snapshot")):
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


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.leader_changes = Counter("raftkv_leader_changes_total",
                                      "Times this node saw the leader change", registry=r)
        self.proposals = Counter("raftkv_proposals_total", "Client writes by outcome",
                                 ["outcome"], registry=r)
        self.fsync_seconds = Histogram("raftkv_fsync_seconds",
                                       "Time of one synced save of a Ready",
                                       buckets=_FAST_BUCKETS_S, registry=r)
        self.batch_entries = Histogram("raftkv_persist_batch_entries",
                                       "Log entries saved per synced save (group commit)",
                                       buckets=_BATCH_BUCKETS, registry=r)
        self.apply_seconds = Histogram("raftkv_apply_seconds",
                                       "Time to apply the committed entries of one Ready",
                                       buckets=_FAST_BUCKETS_S, registry=r)
        self.http_seconds = Histogram("raftkv_http_request_seconds",
                                      "HTTP request latency by route, method and status",
                                      ["route", "method", "status"], buckets=_FAST_BUCKETS_S,
                                      registry=r)
        self.snapshot_seconds = Histogram("raftkv_snapshot_seconds",
                                          "Time to serialise and save a snapshot",
                                          buckets=_SLOW_BUCKETS_S, registry=r)
        self.snapshot_bytes = Gauge("raftkv_snapshot_bytes", "Size of the latest snapshot",
                                    registry=r)
        self.snapshots = Counter("raftkv_snapshots_total", "Snapshots taken or installed",
                                 ["kind"], registry=r)

    def watch_state(self, read: Callable[[], dict[str, object]]) -> None:
        self.registry.register(_StateCollector(read))

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_seconds.labels(route, method, str(status)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
