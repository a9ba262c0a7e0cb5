"""Durable write throughput of raftkv: single-key writes, linearizable reads, batched writes.

    python -m benchmarks.write_throughput                     # a fresh local 3-node cluster
    python -m benchmarks.write_throughput --urls 127.0.0.1:4001,4002,4003
    python -m benchmarks.write_throughput --compare etcd      # the same load against etcd too
    python -m benchmarks.write_throughput --quick             # a smoke run: 2 s per point

Writes are 100-byte values over 10,000 keys at concurrency 1, 16 and 64 (keep-alive
connections, one request in flight each), all sent to the leader or spread over every node;
reads are linearizable GETs to the leader at concurrency 16; batched writes are POST /batch of
100 puts at concurrency 16, counted in keys/s. Each point runs --seconds (after --warmup) and
--repeats times; the table shows medians. With --compare, the systems alternate run by run.

After every write run, every acknowledged key is read back linearizably from the leader: a run
that lost an acknowledged write is a FAILURE whatever its speed (exit status 1).

The generator's own CPU use (worker process CPU time / wall time, in cores) is shown next to
every figure, and, for servers started here, theirs. Results go to benchmarks/results/ as JSON
and a PNG plot (the plot needs matplotlib: `pip install -e '.[bench]'`).

Exit status: 0 ok, 1 an acknowledged write was lost, 2 bad usage, 3 a system could not be
started or reached.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

from benchmarks.clusters import (
    ETCD_INSTALL_HINT,
    ETCD_MAX_TXN_OPS,
    ClusterError,
    EtcdCluster,
    RaftkvCluster,
    Target,
    etcd_binary,
    parse_endpoints,
)
from benchmarks.loadgen import (
    ConnSpec,
    Endpoint,
    Kind,
    LoadError,
    LoadResult,
    System,
    WorkerSpec,
    key_name,
    run_load,
)

EXIT_OK: Final = 0
EXIT_LOST_WRITES: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3

LEADER: Final = "leader"
SPREAD: Final = "spread"
RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
MAX_KEYS: Final = 100_000
"""Key ids are written with five digits."""
MIN_VALUE_BYTES: Final = 32
QUICK_SECONDS: Final = 2.0
QUICK_WARMUP_S: Final = 0.5
LOST_SHOWN: Final = 5


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True, slots=True)
class Point:
    kind: Kind
    mode: str
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.kind.value}/{self.mode}/c{self.concurrency}"


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


def make_points(concurrency: Sequence[int], modes: Sequence[str], workloads: Sequence[str],
                read_concurrency: int, batch_concurrency: int) -> tuple[Point, ...]:
    points: list[Point] = []
    if "put" in workloads:
        points += [Point(Kind.PUT, mode, c) for mode in modes for c in concurrency]
    if "get" in workloads:
        points.append(Point(Kind.GET, LEADER, read_concurrency))
    if "batch" in workloads:
        points.append(Point(Kind.BATCH, LEADER, batch_concurrency))
    return tuple(points)


def worker_specs(plan: Plan, point: Point, system: System, endpoints: Sequence[Endpoint],
                 run_tag: str) -> list[WorkerSpec]:
    """Connection j goes to endpoints[j % n] and owns the keys i with i % concurrency == j;
    the connections are dealt round-robin to min(workers, concurrency) processes."""
    c = point.concurrency
    conns = [ConnSpec(j, endpoints[j % len(endpoints)], tuple(range(j, plan.keys, c)))
             for j in range(c)]
    processes = max(1, min(plan.workers, c))
    return [WorkerSpec(system, point.kind, tuple(conns[w::processes]), run_tag,
                       plan.value_bytes, plan.batch_ops, plan.warmup_s, plan.seconds,
                       plan.request_timeout_s)
            for w in range(processes)]


# --------------------------------------------------------------------------- results
@dataclass(frozen=True, slots=True)
class LostWrite:
    key: str
    acknowledged: str
    found: str | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    system: str
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
    server_cpu_cores_by_node: dict[str, float]
    load_average: float
    """The machine's 1-minute load average at the end of the run (other tenants show here)."""
    window_s: float
    leader: str
    leader_changed: bool
    acknowledged_keys: int
    lost_writes: list[LostWrite] = field(default_factory=list)
    readback_anomalies: int = 0
    """Keys the bulk read-back showed wrong but a single-key linearizable read showed right."""


@dataclass(frozen=True, slots=True)
class PointSummary:
    system: str
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


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(records: Sequence[RunRecord]) -> list[PointSummary]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.system, r.point), []).append(r)
    summaries = []
    for (system, label), runs in groups.items():
        first = runs[0]
        server = [r.server_cpu_cores for r in runs if r.server_cpu_cores is not None]
        leader = [r.leader_cpu_cores for r in runs if r.leader_cpu_cores is not None]
        summaries.append(PointSummary(
            system=system, point=label, kind=first.kind, mode=first.mode,
            concurrency=first.concurrency, runs=len(runs),
            ops_per_s=statistics.median(r.ops_per_s for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            errors=sum(sum(r.errors.values()) for r in runs),
            generator_cpu_cores=statistics.median(r.generator_cpu_cores for r in runs),
            server_cpu_cores=statistics.median(server) if server else None,
            leader_cpu_cores=statistics.median(leader) if leader else None,
            lost_writes=sum(len(r.lost_writes) for r in runs)))
    return summaries


# --------------------------------------------------------------------------- one run
class ServerCpuSampler:
    """Samples the servers' CPU time when the measurement window opens and closes."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._opened_at = 0.0
        self._closed_at = 0.0
        self._cpu_open: dict[Endpoint, float] | None = None
        self._cpu_closed: dict[Endpoint, float] | None = None

    def window_opened(self) -> None:
        self._opened_at = time.monotonic()
        self._cpu_open = self._target.server_cpu_s()

    def window_closed(self) -> None:
        self._closed_at = time.monotonic()
        self._cpu_closed = self._target.server_cpu_s()

    def cores(self) -> dict[Endpoint, float] | None:
        """Cores used by each server during the window (None: not started here)."""
        if self._cpu_open is None or self._cpu_closed is None:
            return None
        seconds = max(1e-9, self._closed_at - self._opened_at)
        return {ep: (cpu - self._cpu_open.get(ep, 0.0)) / seconds
                for ep, cpu in self._cpu_closed.items()}


def find_lost_writes(target: Target, load: LoadResult, keys: int) -> tuple[list[LostWrite], int]:
    """Every acknowledged write must be what a linearizable read finds, unless a later write of
    unknown outcome replaced it. Keys the bulk read gets wrong are read again one by one."""
    acked, unknown = load.acked(), load.unknown()
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


def run_point(target: Target, plan: Plan, point: Point, repeat: int,
              run_tag: str) -> RunRecord:
    leader = target.leader()
    if point.kind is Kind.GET:
        target.preload(plan.keys, plan.value_bytes)
    if point.mode == LEADER:
        endpoints = [leader.endpoint]
    else:  # followers first, so that a single connection goes through a follower
        endpoints = [ep for ep in target.endpoints if ep != leader.endpoint] + [leader.endpoint]
    sampler = ServerCpuSampler(target)
    load = run_load(worker_specs(plan, point, target.system, endpoints, run_tag), sampler)
    after = target.leader()
    lost: list[LostWrite] = []
    anomalies = 0
    if point.kind is not Kind.GET:
        lost, anomalies = find_lost_writes(target, load, plan.keys)
    latencies = load.latencies_s()
    window_s = load.window_s
    requests_per_s = load.completed / window_s if window_s > 0 else 0.0
    keys_per_request = plan.batch_ops if point.kind is Kind.BATCH else 1
    cores = sampler.cores()
    return RunRecord(
        system=target.system.value, point=point.label, kind=point.kind.value, mode=point.mode,
        concurrency=point.concurrency, repeat=repeat,
        ops_per_s=requests_per_s * keys_per_request, requests_per_s=requests_per_s,
        p50_ms=percentile(latencies, 0.50) * 1000, p99_ms=percentile(latencies, 0.99) * 1000,
        errors=load.errors(), generator_cpu_cores=load.generator_cpu_cores,
        server_cpu_cores=None if cores is None else sum(cores.values()),
        leader_cpu_cores=None if cores is None else cores.get(leader.endpoint),
        server_cpu_cores_by_node={str(ep): c for ep, c in (cores or {}).items()},
        load_average=os.getloadavg()[0], window_s=window_s, leader=leader.node,
        leader_changed=(after.node, after.term) != (leader.node, leader.term),
        acknowledged_keys=len(load.acked()), lost_writes=lost, readback_anomalies=anomalies)


# --------------------------------------------------------------------------- output
def _fmt_cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _workload(kind: str, batch_ops: int) -> str:
    return f"batch x{batch_ops} (keys/s)" if kind == Kind.BATCH.value else kind


def format_table(summaries: Sequence[PointSummary], batch_ops: int) -> str:
    header = ("system", "workload", "mode", "conc", "ops/s", "p50 ms", "p99 ms", "errors",
              "gen CPU", "server CPU", "leader CPU", "lost")
    rows = [header] + [(
        s.system, _workload(s.kind, batch_ops), s.mode, str(s.concurrency),
        f"{s.ops_per_s:,.0f}", f"{s.p50_ms:.1f}", f"{s.p99_ms:.1f}", str(s.errors),
        _fmt_cores(s.generator_cpu_cores), _fmt_cores(s.server_cpu_cores),
        _fmt_cores(s.leader_cpu_cores), str(s.lost_writes)) for s in summaries]
    return _align(rows, left=3)


def _align(rows: Sequence[Sequence[str]], left: int) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def ratios(summaries: Sequence[PointSummary]) -> list[dict[str, object]]:
    by_key = {(s.system, s.point): s for s in summaries}
    out: list[dict[str, object]] = []
    for s in summaries:
        if s.system != System.RAFTKV.value:
            continue
        other = by_key.get((System.ETCD.value, s.point))
        if other is None:
            continue
        out.append({"point": s.point, "raftkv_ops_per_s": s.ops_per_s,
                    "etcd_ops_per_s": other.ops_per_s,
                    "ratio": s.ops_per_s / other.ops_per_s if other.ops_per_s else None,
                    "raftkv_p99_ms": s.p99_ms, "etcd_p99_ms": other.p99_ms})
    return out


def format_ratios(rows: Sequence[dict[str, object]]) -> str:
    table = [("point", "raftkv ops/s", "etcd ops/s", "raftkv/etcd", "p99 raftkv", "p99 etcd")]
    for r in rows:
        ratio = r["ratio"]
        table.append((str(r["point"]), f"{r['raftkv_ops_per_s']:,.0f}",
                      f"{r['etcd_ops_per_s']:,.0f}",
                      f"{ratio:.2f}x" if isinstance(ratio, float) else "-",
                      f"{r['raftkv_p99_ms']:.1f} ms", f"{r['etcd_p99_ms']:.1f} ms"))
    return _align(table, left=1)


def batch_target(summaries: Sequence[PointSummary], batch_concurrency: int,
                 factor: float = 10.0) -> dict[str, object] | None:
    """raftkv batched keys/s against etcd's single-key rate at the same concurrency (leader)."""
    by_key = {(s.system, s.kind, s.mode, s.concurrency): s for s in summaries}
    ours = by_key.get((System.RAFTKV.value, Kind.BATCH.value, LEADER, batch_concurrency))
    theirs = by_key.get((System.ETCD.value, Kind.PUT.value, LEADER, batch_concurrency))
    if ours is None or theirs is None or not theirs.ops_per_s:
        return None
    multiple = ours.ops_per_s / theirs.ops_per_s
    return {"raftkv_batch_keys_per_s": ours.ops_per_s,
            "etcd_single_key_ops_per_s": theirs.ops_per_s, "concurrency": batch_concurrency,
            "multiple": multiple, "wanted": factor, "met": multiple >= factor}


def plot(summaries: Sequence[PointSummary], path: Path, title: str) -> bool:
    """Throughput and latency against concurrency. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {System.RAFTKV.value: "tab:blue", System.ETCD.value: "tab:orange"}
    styles = {LEADER: "-", SPREAD: "--"}
    lines: dict[tuple[str, str], list[PointSummary]] = {}
    for s in summaries:
        if s.kind == Kind.PUT.value:
            lines.setdefault((s.system, s.mode), []).append(s)
    for (system, mode), points in sorted(lines.items()):
        points.sort(key=lambda p: p.concurrency)
        xs = [p.concurrency for p in points]
        color, style = colors.get(system, "gray"), styles.get(mode, ":")
        ax_tp.plot(xs, [p.ops_per_s for p in points], style, marker="o", color=color,
                   label=f"{system} put, {mode}")
        ax_lat.plot(xs, [p.p50_ms for p in points], style, marker="o", color=color,
                    label=f"{system} put, {mode}: p50")
        ax_lat.plot(xs, [p.p99_ms for p in points], style, marker="^", color=color,
                    alpha=0.5, label=f"{system} put, {mode}: p99")
    markers = {Kind.GET.value: ("s", "linearizable get"), Kind.BATCH.value: ("*", "batch keys/s")}
    for s in summaries:
        if s.kind in markers:
            marker, name = markers[s.kind]
            ax_tp.plot([s.concurrency], [s.ops_per_s], marker, markersize=11, linestyle="none",
                       color=colors.get(s.system, "gray"), label=f"{s.system} {name}")
    from matplotlib.ticker import ScalarFormatter

    levels = sorted({s.concurrency for s in summaries})
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("concurrency (connections)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_tp.set_ylabel("ops/s (median)")
    ax_tp.set_title("throughput")
    ax_lat.set_ylabel("latency ms (median of runs)")
    ax_lat.set_title("write latency")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,16,64") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return sorted(set(values))


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
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    p.add_argument("--repeats", type=int, default=3, help="runs per point (medians shown)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_SECONDS:g} s per point, 1 repeat, short warmup")
    p.add_argument("--concurrency", type=_int_list, default=[1, 16, 64],
                   help="connections for single-key writes, e.g. 1,16,64")
    p.add_argument("--modes", type=_choices([LEADER, SPREAD]), default=[LEADER, SPREAD],
                   help="where single-key writes go: leader, spread (over every node)")
    p.add_argument("--workloads", type=_choices(["put", "get", "batch"]),
                   default=["put", "get", "batch"])
    p.add_argument("--read-concurrency", type=int, default=16)
    p.add_argument("--batch-concurrency", type=int, default=16)
    p.add_argument("--batch-ops", type=int, default=100, help="puts per batch request")
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--value-bytes", type=int, default=100)
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
        (max(args.concurrency) <= args.keys, "there must be at least one key per connection"),
        (args.request_timeout > 0, "--request-timeout must be > 0"),
        (args.etcd_urls is None or args.compare == "etcd", "--etcd-urls needs --compare etcd"),
        (args.compare != "etcd" or args.batch_ops <= ETCD_MAX_TXN_OPS,
         f"etcd takes at most {ETCD_MAX_TXN_OPS} operations per transaction (--max-txn-ops): "
         "lower --batch-ops"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return Plan(
        points=make_points(args.concurrency, args.modes, args.workloads,
                           args.read_concurrency, args.batch_concurrency),
        seconds=args.seconds, warmup_s=args.warmup, repeats=args.repeats, keys=args.keys,
        value_bytes=args.value_bytes, batch_ops=args.batch_ops, workers=args.workers,
        request_timeout_s=args.request_timeout)


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
    return (f"  {r.system:6} {r.point:18} #{r.repeat + 1}: {r.ops_per_s:9,.0f} ops/s  "
            f"p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  errors {errors}  "
            f"gen {r.generator_cpu_cores:.2f}  server {_fmt_cores(r.server_cpu_cores)} "
            f"(leader {_fmt_cores(r.leader_cpu_cores)})  load {r.load_average:.1f}"
            f"{note}{lost}")


def start_targets(args: argparse.Namespace, base_dir: Path) -> list[Target]:
    targets: list[Target] = []
    try:
        if args.urls:
            targets.append(RaftkvCluster(parse_endpoints(args.urls)))
        else:
            (base_dir / "raftkv").mkdir()
            targets.append(RaftkvCluster.start_local(base_dir / "raftkv"))
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
    if args.compare == "etcd" and not args.etcd_urls and etcd_binary() is None:
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
        targets = start_targets(args, base_dir)
    except ClusterError as e:
        print(f"write_throughput: {e}\n(data and logs kept in {base_dir})", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        total = plan.repeats * len(plan.points) * len(targets)
        _progress(f"{total} runs of {plan.warmup_s:g}+{plan.seconds:g} s against "
                  f"{', '.join(t.system.value for t in targets)}; data in {base_dir} "
                  f"({fs_type})")
        for repeat in range(plan.repeats):
            for point in plan.points:
                for target in targets:  # alternate the systems run by run
                    run_tag = f"r{len(records)}"
                    record = run_point(target, plan, point, repeat, run_tag)
                    records.append(record)
                    _progress(_describe_run(record))
    except (ClusterError, LoadError) as e:
        print(f"write_throughput: {e}\n(data and logs kept in {base_dir})", file=sys.stderr)
        keep = True
        return EXIT_UNAVAILABLE
    finally:
        described = [t.describe() for t in targets]
        for t in targets:
            t.close()
        if not keep:
            shutil.rmtree(base_dir, ignore_errors=True)

    summaries = summarize(records)
    ratio_rows = ratios(summaries)
    target_check = batch_target(summaries, args.batch_concurrency)
    print(format_table(summaries, plan.batch_ops))
    if ratio_rows:
        print()
        print(format_ratios(ratio_rows))
    if target_check is not None:
        verdict = "met" if target_check["met"] else "NOT met"
        print(f"\ntarget: raftkv batched writes {target_check['raftkv_batch_keys_per_s']:,.0f} "
              f"keys/s = {target_check['multiple']:.1f}x etcd single-key at concurrency "
              f"{args.batch_concurrency} ({target_check['etcd_single_key_ops_per_s']:,.0f} "
              f"ops/s); wanted >= {target_check['wanted']:g}x: {verdict}")
    loads = [r.load_average for r in records]
    print("\nops/s and latencies: medians over runs. gen CPU: the load generator's CPU use; "
          "server CPU: all server processes'; leader CPU: the leader's alone; in cores "
          f"(this machine has {os.cpu_count()}; its 1-minute load average during the runs: "
          f"{min(loads):.1f}..{max(loads):.1f})")

    lost_total = sum(len(r.lost_writes) for r in records)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"write_throughput-{stamp}.json"
    png_path = args.out / f"write_throughput-{stamp}.png"
    report = {
        "benchmark": "write_throughput",
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "ok": lost_total == 0,
        "lost_writes": lost_total,
        "plan": {**asdict(plan), "points": [p.label for p in plan.points]},
        "environment": {
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "raftkv_revision": git_revision(),
            "data_fs": fs_type, "argv": list(argv if argv is not None else sys.argv[1:]),
        },
        "systems": described,
        "points": [asdict(s) for s in summaries],
        "ratios": ratio_rows,
        "batch_target": target_check,
        "runs": [asdict(r) for r in records],
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    title = (f"write_throughput {stamp}: {plan.value_bytes}-byte values over {plan.keys} keys, "
             f"medians of {plan.repeats} x {plan.seconds:g} s, rev {git_revision()}")
    plotted = plot(summaries, png_path, title)
    print(f"\nresults: {json_path}" + (f"\nplot:    {png_path}" if plotted else
          "\nplot:    skipped (matplotlib missing: pip install -e '.[bench]')"))

    if lost_total:
        print(f"\nFAILURE: {lost_total} acknowledged write(s) lost")
        for r in records:
            for lw in r.lost_writes[:LOST_SHOWN]:
                print(f"  {r.system} {r.point} #{r.repeat + 1}: {lw.key} acknowledged "
                      f"{lw.acknowledged[:40]!r}..., found {lw.found and lw.found[:40]!r}")
        return EXIT_LOST_WRITES
    anomalies = sum(r.readback_anomalies for r in records)
    if anomalies:
        print(f"\nWARNING: the bulk read-back disagreed with single-key reads on {anomalies} "
              "key(s) (no acknowledged write was lost)", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
