"""Durable write throughput of raftkv: single-key writes, linearizable reads, batched writes,
and watches; against etcd 3.4 in the same run, with the CPU every server process spent.

    python -m benchmarks.write_throughput                     # fresh local 3-node clusters
    python -m benchmarks.write_throughput --compare etcd      # the same load against etcd too
    python -m benchmarks.write_throughput --urls 127.0.0.1:4001,4002,4003
    python -m benchmarks.write_throughput --quick             # a smoke run: 2 s per point

Points (each runs --seconds after --warmup, --repeats times; the tables show medians):
writes of 100-byte values over 10,000 keys to the leader at 1, 16 and 64 keep-alive
connections (one request in flight each) and spread over every node at 64; linearizable reads
from the leader at 16; POST /batch of 100 puts at 16 (in keys/s); and `watch/c1000`: 1,000
watches on the leader while a paced writer writes the watched keys and as many unwatched ones
(benchmarks.watchload says what is measured). With --compare, the systems alternate run by
run; --http-workers 0,1 runs raftkv once per worker count (0: the default, one per CPU), each
on a cluster of its own, labelled `raftkv` and `raftkv-w1`. --auth-tls adds `raftkv-auth-tls`:
raftkv's defaults on a cluster of its own with auth on (bootstrapped with a root token) and
mutual TLS between the nodes, the load sending `Authorization: Bearer` with a token of role
`write` made through the API; the report gives its ratio to plain `raftkv` at every point
(the target: >= 0.9x). --flush-bounds adds two variants that are NOT durable, to measure what
the nodes' flushes cost: `raftkv-leader-no-fsync` (the leader alone skips its fsyncs and is kept
the leader: a commit waits for a follower's flush, never for the leader's own: what committing
on the followers' acks while the leader flushes off its loop could give) and `raftkv-no-fsync`
(no node fsyncs); an unsynced node defers no save (Settings.persist_defer_s).
They are shown against etcd but never held to the targets or budgets.

After every write run, every acknowledged key is read back linearizably from the leader: a run
that lost an acknowledged write is a FAILURE whatever its speed (exit status 1); so is a
change that a watch never saw.

Where the time goes: for servers started here, every process of every node (a raftkv node's
Raft process and its HTTP workers; an etcd member) is sampled from /proc when the measurement
window opens and closes (utime + stime, voluntary + involuntary context switches:
benchmarks.procstat), and the CPU per operation is given for all of them, the leader, its main
process, each leader worker (per request it answered: benchmarks.accounting) and each
follower. At put/leader/c16 the issue's per-process budgets are checked, and with --compare
its targets against etcd. The load generator's own CPU is shown next to every figure. Results
go to benchmarks/results/ as JSON and a PNG plot (matplotlib: `pip install -e '.[bench]'`).

Exit status: 0 ok, 1 an acknowledged write was lost or a watch missed a change, 2 bad usage,
3 a system could not be started or reached (or a flush bound's pinned node lost the
leadership during a run: its figures would not be of the bound).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Final

from benchmarks.accounting import CpuRecord, WorkerCounts, account
from benchmarks.clusters import (
    ETCD_INSTALL_HINT,
    ETCD_MAX_TXN_OPS,
    ClusterError,
    EtcdCluster,
    Leadership,
    RaftkvCluster,
    Target,
    install_etcd,
    parse_endpoints,
)
from benchmarks.labels import NO_FSYNC_ALL, NO_FSYNC_LEADER, is_flush_bound, variant_label
from benchmarks.loadgen import (
    ConnSpec,
    Endpoint,
    Kind,
    LoadError,
    System,
    WorkerSpec,
    key_name,
    run_load,
)
from benchmarks.procstat import NodeSample, usage_by_node
from benchmarks.records import (
    LEADER,
    SPREAD,
    LostWrite,
    Point,
    RunRecord,
    WatchRecord,
    percentile,
    summarize,
)
from benchmarks.report import (
    AUTH_TLS_LABEL,
    AUTH_TLS_MIN_RATIO,
    batch_target,
    budgets,
    fmt,
    format_checks,
    format_cpu_table,
    format_ratios,
    format_table,
    format_variant_ratios,
    format_watch,
    plot,
    ratios,
    targets,
    variant_ratios,
)
from benchmarks.watchload import WatchSpec, WriterSpec, run_watch_load

EXIT_OK: Final = 0
EXIT_LOST_WRITES: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
MAX_KEYS: Final = 100_000
"""Key ids are written with five digits."""
MIN_VALUE_BYTES: Final = 32
QUICK_SECONDS: Final = 2.0
QUICK_WARMUP_S: Final = 0.5
LOST_SHOWN: Final = 5
MISSED_SHOWN: Final = 5


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True, slots=True)
class WatchPlan:
    keys: int
    """Watched keys (as many unwatched ones are written too)."""
    rate: float
    """Writes per second, watched and unwatched keys together."""
    writer_conns: int
    timeout_s: float
    """raftkv's long-poll timeout."""
    grace_s: float
    """How long the watches may take, after the last write, to see it."""


@dataclass(frozen=True, slots=True)
class Plan:
    points: tuple[Point, ...]
    seconds: float
    warmup_s: float
    repeats: int
    keys: int
    value_bytes: int
    batch_ops: int
    workers: int
    request_timeout_s: float
    watch: WatchPlan


def make_points(concurrency: Sequence[int], modes: Sequence[str], workloads: Sequence[str],
                read_concurrency: int, batch_concurrency: int,
                spread_concurrency: Sequence[int] | None = None,
                watchers: int = 0) -> tuple[Point, ...]:
    """Writes to the leader at each `concurrency`, spread at each `spread_concurrency` (by
    default the same levels), reads, batches, and the watch point (if `watchers`)."""
    points: list[Point] = []
    if "put" in workloads:
        for mode in modes:
            levels = concurrency if mode == LEADER or spread_concurrency is None \
                else spread_concurrency
            points += [Point(Kind.PUT, mode, c) for c in levels]
    if "get" in workloads:
        points.append(Point(Kind.GET, LEADER, read_concurrency))
    if "batch" in workloads:
        points.append(Point(Kind.BATCH, LEADER, batch_concurrency))
    if "watch" in workloads and watchers > 0:
        points.append(Point(Kind.WATCH, LEADER, watchers))
    return tuple(points)


def worker_specs(plan: Plan, point: Point, system: System, endpoints: Sequence[Endpoint],
                 run_tag: str, token: str | None = None) -> list[WorkerSpec]:
    """Connection j goes to endpoints[j % n] and owns the keys i with i % concurrency == j;
    the connections are dealt round-robin to min(workers, concurrency) processes. `token`:
    sent with every request."""
    c = point.concurrency
    conns = [ConnSpec(j, endpoints[j % len(endpoints)], tuple(range(j, plan.keys, c)))
             for j in range(c)]
    processes = max(1, min(plan.workers, c))
    return [WorkerSpec(system, point.kind, tuple(conns[w::processes]), run_tag,
                       plan.value_bytes, plan.batch_ops, plan.warmup_s, plan.seconds,
                       plan.request_timeout_s, token)
            for w in range(processes)]


def watch_specs(plan: Plan, point: Point, system: System, endpoint: Endpoint,
                start_index: int, run_tag: str,
                token: str | None = None) -> tuple[list[WatchSpec], WriterSpec]:
    """Watcher w watches key w % keys (key ids 0..keys-1); the writer writes those and the
    unwatched keys keys..2*keys-1. The watchers are dealt to `workers` processes."""
    wp = plan.watch
    watchers = [(w, w % wp.keys) for w in range(point.concurrency)]
    processes = max(1, min(plan.workers, point.concurrency))
    specs = [WatchSpec(system, endpoint, tuple(watchers[p::processes]), start_index,
                       wp.timeout_s, token) for p in range(processes)]
    writer = WriterSpec(system, endpoint, wp.writer_conns, wp.rate,
                        tuple(range(wp.keys)), tuple(range(wp.keys, 2 * wp.keys)), run_tag,
                        plan.value_bytes, plan.warmup_s, plan.seconds, plan.request_timeout_s,
                        token)
    return specs, writer


# --------------------------------------------------------------------------- one run
class ServerSampler:
    """Samples every server process (benchmarks.procstat) when the window opens and closes."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._opened_at = 0.0
        self._closed_at = 0.0
        self._open: dict[Endpoint, NodeSample] | None = None
        self._closed: dict[Endpoint, NodeSample] | None = None

    def window_opened(self) -> None:
        self._opened_at = time.monotonic()
        self._open = self._target.server_processes()

    def window_closed(self) -> None:
        self._closed_at = time.monotonic()
        self._closed = self._target.server_processes()

    @property
    def seconds(self) -> float:
        return max(1e-9, self._closed_at - self._opened_at)

    def cpu(self, leader: Endpoint, ops: int, before: Mapping[Endpoint, WorkerCounts] | None,
            after: Mapping[Endpoint, WorkerCounts] | None) -> CpuRecord | None:
        """Where the servers' CPU went in the window (None: not started here)."""
        if self._open is None or self._closed is None:
            return None
        usage = usage_by_node({str(ep): s for ep, s in self._open.items()},
                              {str(ep): s for ep, s in self._closed.items()})

        def by_name(counts: Mapping[Endpoint, WorkerCounts] | None
                    ) -> dict[str, WorkerCounts] | None:
            return None if counts is None else {str(ep): c for ep, c in counts.items()}

        main = "raft" if self._target.system is System.RAFTKV else self._target.system.value
        return account(usage, str(leader), ops, self.seconds, main, by_name(before),
                       by_name(after))


def find_lost_writes(target: Target, acked: Mapping[int, str],
                     unknown: Mapping[int, Sequence[str]],
                     keys: int) -> tuple[list[LostWrite], int]:
    """Every acknowledged write must be what a linearizable read finds, unless a later write of
    unknown outcome replaced it. Keys the bulk read gets wrong are read again one by one."""
    if not acked:
        return [], 0
    found = target.read_back(keys)
    suspects = [k for k, value in acked.items()
                if found.get(k) != value and found.get(k) not in unknown.get(k, ())]
    lost = []
    for k in suspects:
        again = target.read_one(k)
        if again != acked[k] and again not in unknown.get(k, ()):
            lost.append(LostWrite(key_name(k), acked[k], again))
    return lost, len(suspects) - len(lost)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one kind of run measured, before the common bookkeeping."""

    ops: int
    """Operations completed in the window (keys for batches, acknowledged writes for watch)."""
    requests: int
    window_s: float
    latencies_s: Sequence[float]
    errors: dict[str, int]
    generator_cpu_cores: float
    acked: Mapping[int, str]
    unknown: Mapping[int, Sequence[str]]
    watch: WatchRecord | None = None


def _load_run(target: Target, plan: Plan, point: Point, leader: Endpoint, run_tag: str,
              sampler: ServerSampler) -> _Outcome:
    if point.mode == LEADER:
        endpoints = [leader]
    else:  # followers first, so that a single connection goes through a follower
        endpoints = [ep for ep in target.endpoints if ep != leader] + [leader]
    load = run_load(worker_specs(plan, point, target.system, endpoints, run_tag,
                                 target.token), sampler)
    keys_per_request = plan.batch_ops if point.kind is Kind.BATCH else 1
    return _Outcome(load.completed * keys_per_request, load.completed, load.window_s,
                    load.latencies_s(), load.errors(), load.generator_cpu_cores,
                    load.acked() if point.kind is not Kind.GET else {}, load.unknown())


def _watch_run(target: Target, plan: Plan, point: Point, leader: Endpoint, run_tag: str,
               sampler: ServerSampler) -> _Outcome:
    specs, writer = watch_specs(plan, point, target.system, leader, target.current_index(),
                                run_tag, target.token)
    result = run_watch_load(specs, writer, sampler, grace_s=plan.watch.grace_s,
                            registered=lambda: target.watches_held(leader))
    writes, d = result.writes, result.deliveries
    completed = writes.completed_in_window()
    window_s = writes.window_s
    record = WatchRecord(
        watchers=point.concurrency, keys=plan.watch.keys, target_rate=plan.watch.rate,
        write_rate=completed / window_s if window_s > 0 else 0.0, deliveries=d.expected,
        coalesced=d.coalesced, missed=len(d.missed),
        delay_p50_ms=percentile(d.from_send_s, 0.50) * 1000,
        delay_p99_ms=percentile(d.from_send_s, 0.99) * 1000,
        after_ack_p50_ms=percentile(d.from_ack_s, 0.50) * 1000,
        after_ack_p99_ms=percentile(d.from_ack_s, 0.99) * 1000,
        rearmed_after_timeout=sum(w.rearmed_after_timeout for w in result.watchers),
        missed_examples=[(w, key_name(k), i) for w, k, i in d.missed[:MISSED_SHOWN]])
    return _Outcome(completed, completed, window_s, writes.latencies_s(), result.errors(),
                    result.generator_cpu_cores, writes.acked, writes.unknown, record)


def run_point(target: Target, plan: Plan, point: Point, repeat: int,
              run_tag: str) -> RunRecord:
    if point.kind is Kind.GET:
        target.preload(plan.keys, plan.value_bytes)
    target.keep_leader()
    leader = target.leader()
    before = target.worker_counts()  # waits for the node to be quiet (raftkv, local)
    sampler = ServerSampler(target)
    run = _watch_run if point.kind is Kind.WATCH else _load_run
    outcome = run(target, plan, point, leader.endpoint, run_tag, sampler)
    target.mark_busy()
    after = target.worker_counts()
    cpu = sampler.cpu(leader.endpoint, outcome.ops, before, after)
    changed_leader = target.leader()
    leader_changed = (changed_leader.node, changed_leader.term) != (leader.node, leader.term)
    lost: list[LostWrite] = []
    anomalies = 0
    if outcome.acked:
        lost, anomalies = find_lost_writes(target, outcome.acked, outcome.unknown, plan.keys)
    if not lost:  # a lost write fails the benchmark (exit 1) whatever led the run
        check_pinned_leader(target.label, target.pinned_leader, leader, changed_leader)
    latencies = sorted(outcome.latencies_s)
    window_s = outcome.window_s
    by_node = {} if cpu is None else {n: s / sampler.seconds for n, s in cpu.node_cpu_s.items()}
    return RunRecord(
        system=target.system.value, label=target.label, point=point.label,
        kind=point.kind.value, mode=point.mode, concurrency=point.concurrency, repeat=repeat,
        ops_per_s=outcome.ops / window_s if window_s > 0 else 0.0,
        requests_per_s=outcome.requests / window_s if window_s > 0 else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000, p99_ms=percentile(latencies, 0.99) * 1000,
        errors=outcome.errors, generator_cpu_cores=outcome.generator_cpu_cores,
        server_cpu_cores=None if cpu is None else cpu.server_cores,
        leader_cpu_cores=None if cpu is None else cpu.leader_cores,
        server_cpu_cores_by_node=by_node,
        load_average=os.getloadavg()[0], window_s=window_s, leader=leader.node,
        leader_changed=leader_changed,
        acknowledged_keys=len(outcome.acked), cpu=cpu, watch=outcome.watch, lost_writes=lost,
        readback_anomalies=anomalies)


def check_pinned_leader(label: str, pinned: str | None, start: Leadership,
                        end: Leadership) -> None:
    """A flush bound's run measures its unsynced leader only if that node led it from start
    to end in one term; ClusterError otherwise (the figures would be of another cluster)."""
    if pinned is None or (start.node == end.node == pinned and start.term == end.term):
        return
    raise ClusterError(f"{label}: {pinned} must lead the whole run, but {start.node} led it "
                       f"at the start (term {start.term}) and {end.node} at the end (term "
                       f"{end.term}); run again")


# --------------------------------------------------------------------------- environment
def filesystem_of(path: Path) -> str:
    """The type of the file system holding `path` (tmpfs makes fsync free: say so)."""
    best, fs_type = "", "unknown"
    real = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(
                        parts[1].rstrip("/") + "/")) and len(parts[1]) > len(best):
                    best, fs_type = parts[1], parts[2]
    except OSError:
        pass
    return fs_type


def git_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{'-dirty' if dirty else ''}"


# --------------------------------------------------------------------------- the command
def _int_list(text: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,16,64") from None
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"the values must be >= {minimum}")
    return sorted(set(values))


def _worker_counts(text: str) -> list[int]:
    """--http-workers: 0 (the default, one per CPU) first, then the others as given."""
    values = _int_list(text, minimum=0)
    if any(v > 64 for v in values):
        raise argparse.ArgumentTypeError("raftkv takes 0..64 HTTP workers")
    return values


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.write_throughput",
                                description=__doc__.splitlines()[0])
    p.add_argument("--urls", help="benchmark the raftkv nodes at these HTTP addresses "
                   "(e.g. 127.0.0.1:4001,4002,4003) instead of starting a local cluster")
    p.add_argument("--compare", choices=["etcd"], help="run the same load against etcd too")
    p.add_argument("--etcd-urls", help="with --compare etcd: use these etcd client addresses "
                   "instead of starting a local 3-member cluster")
    p.add_argument("--http-workers", type=_worker_counts, default=None,
                   help="raftkv variants: one local cluster per HTTP worker count, e.g. 0,1 "
                   "(the default; 0: one per CPU, raftkv's own default)")
    p.add_argument("--auth-tls", action="store_true",
                   help="add the variant raftkv-auth-tls: raftkv's defaults with auth on and "
                   "peer mutual TLS, the load sending a write-role token; reported against "
                   "plain raftkv at every point")
    p.add_argument("--flush-bounds", action="store_true",
                   help="add the variants raftkv-leader-no-fsync and raftkv-no-fsync (NOT "
                   "durable: what the flushes cost; never held to the targets)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    p.add_argument("--repeats", type=int, default=3, help="runs per point (medians shown)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_SECONDS:g} s per point, 1 repeat, short warmup")
    p.add_argument("--concurrency", type=_int_list, default=[1, 16, 64],
                   help="connections for single-key writes to the leader, e.g. 1,16,64")
    p.add_argument("--spread-concurrency", type=_int_list, default=[64],
                   help="connections for single-key writes spread over every node")
    p.add_argument("--modes", type=_choices([LEADER, SPREAD]), default=[LEADER, SPREAD],
                   help="where single-key writes go: leader, spread (over every node)")
    p.add_argument("--workloads", type=_choices(["put", "get", "batch", "watch"]),
                   default=["put", "get", "batch", "watch"])
    p.add_argument("--read-concurrency", type=int, default=16)
    p.add_argument("--batch-concurrency", type=int, default=16)
    p.add_argument("--batch-ops", type=int, default=100, help="puts per batch request")
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--value-bytes", type=int, default=100)
    p.add_argument("--watchers", type=int, default=1000,
                   help="watches of the watch point, all on the leader (0: no watch point)")
    p.add_argument("--watch-keys", type=int, default=100,
                   help="keys the watches are spread over (as many unwatched keys are written)")
    p.add_argument("--watch-rate", type=float, default=200.0,
                   help="writes per second during the watch point (half to watched keys)")
    p.add_argument("--watch-writer-conns", type=int, default=32,
                   help="the watch point's writer connections (each paced, one in flight)")
    p.add_argument("--watch-timeout", type=float, default=10.0,
                   help="raftkv's long-poll timeout, s (a watch that times out is re-armed)")
    p.add_argument("--watch-grace", type=float, default=10.0,
                   help="seconds the watches may take, after the last write, to see it")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="load generator processes (at most one per connection)")
    p.add_argument("--request-timeout", type=float, default=15.0,
                   help="seconds before a request counts as timed out")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="parent of the clusters' temporary data dirs (default: the system "
                   "temp dir; it must be a real disk, not tmpfs, for fsync to mean anything)")
    p.add_argument("--keep-data", action="store_true", help="keep data dirs and server logs")
    return p


def plan_from(args: argparse.Namespace) -> Plan:
    if args.quick:
        args.seconds, args.repeats, args.warmup = QUICK_SECONDS, 1, QUICK_WARMUP_S
    if args.http_workers is None:
        args.http_workers = [0] if args.urls else [0, 1]
    watching = "watch" in args.workloads and args.watchers > 0
    checks = [
        (args.seconds > 0, "--seconds must be > 0"),
        (args.warmup >= 0, "--warmup must be >= 0"),
        (args.repeats >= 1, "--repeats must be >= 1"),
        (1 <= args.keys <= MAX_KEYS, f"--keys must be 1..{MAX_KEYS}"),
        (args.value_bytes >= MIN_VALUE_BYTES, f"--value-bytes must be >= {MIN_VALUE_BYTES}"),
        (args.workers >= 1, "--workers must be >= 1"),
        (args.read_concurrency >= 1 and args.batch_concurrency >= 1,
         "--read-concurrency and --batch-concurrency must be >= 1"),
        (1 <= args.batch_ops <= args.keys // max(args.batch_concurrency, 1),
         "--batch-ops times --batch-concurrency must not exceed --keys"),
        (max(args.concurrency + args.spread_concurrency) <= args.keys,
         "there must be at least one key per connection"),
        (args.request_timeout > 0, "--request-timeout must be > 0"),
        (args.etcd_urls is None or args.compare == "etcd", "--etcd-urls needs --compare etcd"),
        (not args.urls or args.http_workers == [0],
         "--http-workers starts clusters of its own: not with --urls"),
        (not args.urls or not args.auth_tls,
         "--auth-tls starts a cluster of its own: not with --urls"),
        (not args.auth_tls or 0 in args.http_workers,
         "--auth-tls is measured against plain raftkv: keep 0 in --http-workers"),
        (not args.urls or not args.flush_bounds,
         "--flush-bounds starts clusters of its own: not with --urls"),
        (not args.flush_bounds or 0 in args.http_workers,
         "--flush-bounds is measured against plain raftkv: keep 0 in --http-workers"),
        (args.compare != "etcd" or args.batch_ops <= ETCD_MAX_TXN_OPS,
         f"etcd takes at most {ETCD_MAX_TXN_OPS} operations per transaction (--max-txn-ops): "
         "lower --batch-ops"),
        (args.watchers >= 0, "--watchers must be >= 0"),
        (not watching or 1 <= args.watch_keys <= min(args.watchers, args.keys // 2),
         "--watch-keys must be 1..min(--watchers, --keys / 2)"),
        (not watching or args.watch_rate > 0, "--watch-rate must be > 0"),
        (not watching or args.watch_writer_conns >= 1, "--watch-writer-conns must be >= 1"),
        (not watching or 0 < args.watch_timeout <= 60, "--watch-timeout must be in (0, 60]"),
        (not watching or args.watch_grace > 0, "--watch-grace must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return Plan(
        points=make_points(args.concurrency, args.modes, args.workloads,
                           args.read_concurrency, args.batch_concurrency,
                           args.spread_concurrency, args.watchers),
        seconds=args.seconds, warmup_s=args.warmup, repeats=args.repeats, keys=args.keys,
        value_bytes=args.value_bytes, batch_ops=args.batch_ops, workers=args.workers,
        request_timeout_s=args.request_timeout,
        watch=WatchPlan(args.watch_keys, args.watch_rate, args.watch_writer_conns,
                        args.watch_timeout, args.watch_grace))


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _describe_run(r: RunRecord) -> str:
    errors = ",".join(f"{k}={v}" for k, v in sorted(r.errors.items())) or "0"
    note = " LEADER CHANGED" if r.leader_changed else ""
    if r.ops_per_s == 0:
        note += " NO REQUEST SUCCEEDED"
    lost = f" LOST {len(r.lost_writes)}" if r.lost_writes else ""
    missed = f" MISSED {r.missed_changes}" if r.missed_changes else ""
    cpu = ""
    if r.cpu is not None:
        c = r.cpu
        workers = "/".join(f"{v:.0f}" for _, v in sorted(
            c.leader_worker_us_per_request.items(), key=lambda kv: int(kv[0]))) or "-"
        followers = "/".join(f"{v:.0f}" for v in c.follower_us_per_op.values()) or "-"
        cpu = (f"  cpu {c.server_ms_per_op:.3f} ms/op: main {fmt(c.leader_main_us_per_op, '.0f')}"
               f" us/op {fmt(c.leader_main_cs_per_op, '.2f')} cs/op, workers {workers} us/req,"
               f" followers {followers} us/op")
    watch = ""
    if r.watch is not None:
        w = r.watch
        watch = (f"  watch delay p50 {w.delay_p50_ms:.1f} p99 {w.delay_p99_ms:.1f} ms, "
                 f"{w.deliveries} deliveries ({w.coalesced} coalesced)")
    return (f"  {r.label:9} {r.point:18} #{r.repeat + 1}: {r.ops_per_s:9,.0f} ops/s  "
            f"p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  errors {errors}  "
            f"gen {r.generator_cpu_cores:.2f}  server {fmt(r.server_cpu_cores, '.2f')} "
            f"(leader {fmt(r.leader_cpu_cores, '.2f')}){cpu}{watch}  "
            f"load {r.load_average:.1f}{note}{lost}{missed}")


def start_targets(args: argparse.Namespace, base_dir: Path) -> list[Target]:
    targets: list[Target] = []
    try:
        if args.urls:
            targets.append(RaftkvCluster(parse_endpoints(args.urls)))
        else:
            for workers in args.http_workers:
                cluster_dir = base_dir / f"raftkv-w{workers}"
                cluster_dir.mkdir()
                targets.append(RaftkvCluster.start_local(cluster_dir, http_workers=workers))
            if args.auth_tls:
                cluster_dir = base_dir / "raftkv-auth-tls"
                cluster_dir.mkdir()
                targets.append(RaftkvCluster.start_local(cluster_dir, auth_tls=True))
            if args.flush_bounds:
                for no_fsync in (NO_FSYNC_LEADER, NO_FSYNC_ALL):
                    cluster_dir = base_dir / variant_label(0, no_fsync=no_fsync)
                    cluster_dir.mkdir()
                    targets.append(RaftkvCluster.start_local(cluster_dir, no_fsync=no_fsync))
        if args.compare == "etcd":
            if args.etcd_urls:
                targets.append(EtcdCluster(parse_endpoints(args.etcd_urls)))
            else:
                (base_dir / "etcd").mkdir()
                targets.append(EtcdCluster.start_local(base_dir / "etcd"))
    except BaseException:
        for t in targets:
            t.close()
        raise
    return targets


def _print_report(records: Sequence[RunRecord], plan: Plan,
                  args: argparse.Namespace) -> dict[str, object]:
    """Print the tables; what the JSON report adds to the runs."""
    points = summarize(records)
    ratio_rows = ratios(points)
    budget_checks = budgets(points)
    target_checks = targets(points)
    batch_check = batch_target(points, args.batch_concurrency)
    auth_rows = variant_ratios(points, AUTH_TLS_LABEL)
    print(format_table(points, plan.batch_ops))
    cpu_table = format_cpu_table(points)
    if cpu_table:
        print("\nserver CPU per operation (medians; us/req: per request the worker answered)")
        print(cpu_table)
    watch_table = format_watch(points)
    if watch_table:
        print("\nwatches (delay: from the write's send to the watch's answer; after ack: from "
              "its acknowledgement)")
        print(watch_table)
    if ratio_rows:
        print("\nagainst etcd, same run")
        print(format_ratios(ratio_rows))
    if any(is_flush_bound(s.label) for s in points):
        print("\n*-no-fsync: flush bounds, NOT durable (--flush-bounds): raftkv-leader-no-fsync "
              "skips the leader's fsyncs only (a commit still waits for a follower's), "
              "raftkv-no-fsync every node's; never held to the targets or budgets")
    if auth_rows:
        print(f"\n{AUTH_TLS_LABEL} (auth on: a write-role token with every request; peer "
              f"mutual TLS) against plain raftkv, same run; wanted >= "
              f"{AUTH_TLS_MIN_RATIO:g}x")
        print(format_variant_ratios(auth_rows))
    if budget_checks:
        print("\nper-process budgets at put/leader/c16")
        print(format_checks(budget_checks))
    if any(s.system == System.ETCD.value and s.kind != Kind.WATCH.value for s in points):
        print("\ntargets")
        print(format_checks(target_checks))
    if batch_check is not None:
        verdict = "met" if batch_check["met"] else "NOT met"
        print(f"\nbatch: raftkv {batch_check['raftkv_batch_keys_per_s']:,.0f} keys/s = "
              f"{batch_check['multiple']:.1f}x etcd single-key at concurrency "
              f"{args.batch_concurrency} ({batch_check['etcd_single_key_ops_per_s']:,.0f} "
              f"ops/s); wanted >= {batch_check['wanted']:g}x: {verdict}")
    loads = [r.load_average for r in records]
    print("\nops/s and latencies: medians over runs. gen CPU: the load generator's CPU use; "
          "server CPU: all server processes' (a raftkv node: its Raft process and workers); "
          "leader CPU: the leader's processes; in cores (this machine has "
          f"{os.cpu_count()}; its 1-minute load average during the runs: "
          f"{min(loads):.1f}..{max(loads):.1f}). main: a raftkv node's Raft process, an etcd "
          "member. cs: context switches, voluntary + involuntary (vol: voluntary only; the "
          "involuntary ones are preemptions, where other tenants of the machine show). "
          "lost: acknowledged writes lost + watch changes missed")
    return {"points": [asdict(s) for s in points], "ratios": ratio_rows,
            "budgets": [c.as_dict() for c in budget_checks],
            "targets": [c.as_dict() for c in target_checks], "batch_target": batch_check,
            "auth_tls_ratios": auth_rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from(args)
        if args.urls:
            parse_endpoints(args.urls)
        if args.etcd_urls:
            parse_endpoints(args.etcd_urls)
    except ValueError as e:
        parser.error(str(e))
    if args.compare == "etcd" and not args.etcd_urls and install_etcd() is None:
        print(f"write_throughput: {ETCD_INSTALL_HINT}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    args.out.mkdir(parents=True, exist_ok=True)
    base_dir = Path(tempfile.mkdtemp(prefix="raftkv-bench-", dir=args.data_dir))
    fs_type = filesystem_of(base_dir)
    if fs_type in ("tmpfs", "ramfs"):
        _progress(f"WARNING: {base_dir} is on {fs_type}: fsync costs nothing there, the "
                  "figures will flatter every system; use --data-dir on a real disk")
    started_at = dt.datetime.now(dt.UTC)
    records: list[RunRecord] = []
    keep = args.keep_data
    try:
        systems = start_targets(args, base_dir)
    except ClusterError as e:
        print(f"write_throughput: {e}\n(data and logs kept in {base_dir})", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        total = plan.repeats * len(plan.points) * len(systems)
        _progress(f"{total} runs of {plan.warmup_s:g}+{plan.seconds:g} s against "
                  f"{', '.join(t.label for t in systems)}; data in {base_dir} ({fs_type})")
        for repeat in range(plan.repeats):
            for point in plan.points:
                for target in systems:  # alternate the systems run by run
                    run_tag = f"r{len(records)}"
                    record = run_point(target, plan, point, repeat, run_tag)
                    records.append(record)
                    _progress(_describe_run(record))
    except (ClusterError, LoadError) as e:
        print(f"write_throughput: {e}\n(data and logs kept in {base_dir})", file=sys.stderr)
        keep = True
        return EXIT_UNAVAILABLE
    finally:
        described = [t.describe() for t in systems]
        for t in systems:
            t.close()
        if not keep:
            shutil.rmtree(base_dir, ignore_errors=True)

    extra = _print_report(records, plan, args)
    lost_total = sum(len(r.lost_writes) for r in records)
    missed_total = sum(r.missed_changes for r in records)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"write_throughput-{stamp}.json"
    png_path = args.out / f"write_throughput-{stamp}.png"
    report = {
        "benchmark": "write_throughput",
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "ok": lost_total == 0 and missed_total == 0,
        "lost_writes": lost_total,
        "missed_watch_changes": missed_total,
        "plan": {**asdict(plan), "points": [p.label for p in plan.points]},
        "environment": {
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "raftkv_revision": git_revision(),
            "data_fs": fs_type, "argv": list(argv if argv is not None else sys.argv[1:]),
        },
        "systems": described,
        **extra,
        "runs": [asdict(r) for r in records],
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    title = (f"write_throughput {stamp}: {plan.value_bytes}-byte values over {plan.keys} keys, "
             f"medians of {plan.repeats} x {plan.seconds:g} s, rev {git_revision()}")
    plotted = plot(summarize(records), png_path, title)
    print(f"\nresults: {json_path}" + (f"\nplot:    {png_path}" if plotted else
          "\nplot:    skipped (matplotlib missing: pip install -e '.[bench]')"))

    if lost_total or missed_total:
        if lost_total:
            print(f"\nFAILURE: {lost_total} acknowledged write(s) lost")
        if missed_total:
            print(f"\nFAILURE: {missed_total} change(s) never seen by a watch of the key")
        for r in records:
            for lw in r.lost_writes[:LOST_SHOWN]:
                print(f"  {r.label} {r.point} #{r.repeat + 1}: {lw.key} acknowledged "
                      f"{lw.acknowledged[:40]!r}..., found {lw.found and lw.found[:40]!r}")
            if r.watch is not None:
                for watcher, key, index in r.watch.missed_examples:
                    print(f"  {r.label} {r.point} #{r.repeat + 1}: watch {watcher} of {key} "
                          f"never saw the change at index {index}")
        return EXIT_LOST_WRITES
    anomalies = sum(r.readback_anomalies for r in records)
    if anomalies:
        print(f"\nWARNING: the bulk read-back disagreed with single-key reads on {anomalies} "
              "key(s) (no acknowledged write was lost)", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
