"""py-spy profiles of every process of a raftkv leader, and of one follower, under load.

    python -m benchmarks.profile_node                          # put/leader/c16, 20 s
    python -m benchmarks.profile_node --point put/spread/c64 --seconds 30 --http-workers 1
    make profile ARGS='--point get/leader/c16'
    python -m benchmarks.profile_node --auth-tls              # auth on and peer mutual TLS

Starts a local durable 3-node cluster (benchmarks.clusters), drives one point of the
write-throughput benchmark at it (put/get/batch as `<kind>/<leader|spread>/c<n>`, or
`watch/c<n>`), and when the load's warmup is over records, for --seconds, every process of the
leader (its Raft process and each HTTP worker) and of one follower with
`py-spy record --gil --function`: only samples taken while the process holds the GIL, so each
profile says where that process's Python time goes, by function. py-spy runs --nonblocking by
default (it does not pause the processes to sample them: less perturbation, stacks now and
then torn); --blocking pauses them. The profilers take CPU of their own: the load's ops/s
during the profile is printed, to be read against an unprofiled run.

It writes to benchmarks/results/profile-<time>/ (or --out):

    <node>-<leader|follower>-<raft|w<i>>-<pid>.txt   the collapsed stacks (py-spy raw; for
                                                     flamegraph.pl, inferno or speedscope)
    <same>.svg                                       a flame graph of them
    summary.txt, summary.json                        per process: samples, the share of the
                                                     time it held the GIL, its top functions
                                                     by self and by cumulative samples

Needs py-spy (`pip install py-spy`, in the dev and bench extras) and the right to ptrace the nodes
(root, or kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from benchmarks.clusters import ClusterError, RaftkvCluster
from benchmarks.loadgen import Endpoint, Kind, LoadError, run_load
from benchmarks.procstat import child_pids
from benchmarks.records import LEADER, SPREAD, Point
from benchmarks.watchload import run_watch_load
from benchmarks.write_throughput import (
    RESULTS_DIR,
    Plan,
    WatchPlan,
    watch_specs,
    worker_specs,
)

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
TOP: Final = 15
PYSPY_HINT: Final = "py-spy is not installed: pip install py-spy (or .venv/bin/pip install " \
                    "-e '.[bench]')"


# --------------------------------------------------------------------------- the point
def parse_point(label: str) -> Point:
    """`put/leader/c16`, `get/leader/c16`, `batch/leader/c16`, `put/spread/c64`,
    `watch/c1000`."""
    parts = label.strip().split("/")
    try:
        kind = Kind(parts[0])
        if kind is Kind.WATCH:
            (level,) = parts[1:]
            mode = LEADER
        else:
            mode, level = parts[1:]
        if mode not in (LEADER, SPREAD) or not level.startswith("c"):
            raise ValueError(label)
        concurrency = int(level[1:])
    except ValueError:
        raise ValueError(f"{label!r} is not a point like put/leader/c16 or watch/c1000") \
            from None
    if concurrency < 1 or (kind is Kind.GET and mode != LEADER):
        raise ValueError(f"{label!r}: not a point the benchmark runs")
    return Point(kind, mode, concurrency)


# --------------------------------------------------------------------------- the profiles
@dataclass(frozen=True, slots=True)
class Profiled:
    name: str
    """`n1-leader-raft-1234`, `n1-leader-w0-1240`, ..."""
    node: str
    role: str
    process: str
    pid: int


def processes_to_profile(cluster: RaftkvCluster, leader: Endpoint) -> list[Profiled]:
    """Every process of the leader and of one follower (the first by node id)."""
    nodes = cluster.local_nodes()
    follower = next((n for n in nodes if n[1] != leader), None)
    out: list[Profiled] = []
    for node_id, endpoint, pid in nodes:
        if endpoint != leader and (follower is None or node_id != follower[0]):
            continue
        role = "leader" if endpoint == leader else "follower"
        out.append(Profiled(f"{node_id}-{role}-raft-{pid}", node_id, role, "raft", pid))
        index = _worker_indices(cluster.status(endpoint))
        for child in child_pids(pid):
            tag = f"w{index[child]}" if child in index else "worker"
            out.append(Profiled(f"{node_id}-{role}-{tag}-{child}", node_id, role, tag, child))
    return out


def _worker_indices(st: dict[str, Any] | None) -> dict[int, int]:
    if st is None:
        return {}
    return {int(w["pid"]): int(w["index"]) for w in st.get("extra", {}).get("workers", [])
            if w.get("pid")}


def pyspy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """Starts one `py-spy record` per process when the load's window opens."""

    def __init__(self, pyspy: str, targets: Sequence[Profiled], out: Path, seconds: float,
                 rate: int, blocking: bool) -> None:
        self.pyspy = pyspy
        self.targets = targets
        self.out = out
        self.seconds = seconds
        self.rate = rate
        self.blocking = blocking
        self.procs: list[tuple[Profiled, subprocess.Popen[bytes]]] = []
        self.started = threading.Event()

    def window_opened(self) -> None:
        for t in self.targets:
            argv = [self.pyspy, "record", "--pid", str(t.pid), "--gil", "--function",
                    "--duration", str(int(self.seconds)), "--rate", str(self.rate),
                    "--format", "raw", "--output", str(self.out / f"{t.name}.txt")]
            if not self.blocking:
                argv.append("--nonblocking")
            with open(self.out / f"{t.name}.py-spy.log", "wb") as log:
                self.procs.append((t, subprocess.Popen(argv, stdout=log,
                                                       stderr=subprocess.STDOUT)))
        self.started.set()

    def window_closed(self) -> None:
        pass

    def wait(self, timeout_s: float) -> dict[str, int]:
        codes: dict[str, int] = {}
        for t, proc in self.procs:
            try:
                codes[t.name] = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()  # a profiler of ours, by its pid
                codes[t.name] = proc.wait(10)
        return codes


# --------------------------------------------------------------------------- summaries
def read_collapsed(path: Path) -> Counter[tuple[str, ...]]:
    """Collapsed stacks: `frame;frame;frame count` per line, root first (py-spy names a
    frame `function (file:line)`, with paths short already)."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


@dataclass(frozen=True, slots=True)
class ProcessSummary:
    name: str
    samples: int
    gil_share: float
    """Samples / (seconds x rate): the share of the time the process held the GIL."""
    self_top: list[tuple[str, int]] = field(default_factory=list)
    cumulative_top: list[tuple[str, int]] = field(default_factory=list)


def summarize_stacks(name: str, stacks: Counter[tuple[str, ...]], seconds: float,
                     rate: int, top: int = TOP) -> ProcessSummary:
    total = sum(stacks.values())
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    for stack, n in stacks.items():
        if stack:
            own[stack[-1]] += n
        for frame in set(stack):
            cumulative[frame] += n
    expected = max(1.0, seconds * rate)
    return ProcessSummary(name, total, total / expected, own.most_common(top),
                          cumulative.most_common(top))


def format_summary(s: ProcessSummary) -> str:
    lines = [f"== {s.name}: {s.samples} samples holding the GIL "
             f"({100 * s.gil_share:.0f}% of the time)"]
    for title, rows in (("self", s.self_top), ("cumulative", s.cumulative_top)):
        lines.append(f"  top by {title}:")
        for frame, n in rows:
            lines.append(f"    {100 * n / max(1, s.samples):5.1f}%  {n:6d}  {frame}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- flame graphs
def flamegraph_svg(stacks: Counter[tuple[str, ...]], title: str, width: int = 1200) -> str:
    """A static flame graph (root at the bottom; hover a frame for its samples)."""
    counts: Counter[tuple[str, ...]] = Counter()
    depth = 0
    for stack, n in stacks.items():
        depth = max(depth, len(stack))
        for i in range(1, len(stack) + 1):
            counts[stack[:i]] += n
    total = sum(stacks.values()) or 1
    row_h, top_pad = 16, 30
    height = top_pad + (depth + 1) * row_h + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="monospace" font-size="11">',
             f'<text x="10" y="18" font-size="14">{html.escape(title)} '
             f'({total} samples)</text>']
    # Lay out children in name order under their parent, left to right.
    children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for path in counts:
        children.setdefault(path[:-1], []).append(path)
    scale = (width - 20) / total

    def draw(path: tuple[str, ...], x: float) -> None:
        n = counts[path] if path else total
        w = n * scale
        if path:
            y = height - 10 - len(path) * row_h
            name = path[-1]
            hue = zlib.crc32(name.encode()) % 60
            label = html.escape(name)
            parts.append(f'<g><title>{label} ({n} samples, {100 * n / total:.1f}%)</title>'
                         f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.1):.1f}" '
                         f'height="{row_h - 1}" fill="hsl({hue},80%,60%)"/>')
            if w > 40:
                chars = int(w / 7)
                text = name if len(name) <= chars else name[:max(0, chars - 2)] + ".."
                parts.append(f'<text x="{x + 3:.1f}" y="{y + 12}">{html.escape(text)}</text>')
            parts.append("</g>")
        at = x
        for child in sorted(children.get(path, [])):
            draw(child, at)
            at += counts[child] * scale

    draw((), 10.0)
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_node",
                                description=__doc__.splitlines()[0])
    p.add_argument("--point", default="put/leader/c16",
                   help="the load: put|get|batch/leader|spread/c<n>, or watch/c<n>")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds profiled")
    p.add_argument("--warmup", type=float, default=3.0, help="load before the profiles start")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--blocking", action="store_true",
                   help="let py-spy pause each process to sample it (more exact, slower)")
    p.add_argument("--http-workers", type=int, default=0,
                   help="RAFTKV_HTTP_WORKERS of the cluster (0: one per CPU)")
    p.add_argument("--auth-tls", action="store_true",
                   help="profile a cluster with auth on and peer mutual TLS (the load sends a "
                        "write-role token), as the benchmark's raftkv-auth-tls variant")
    p.add_argument("--workers", type=int, default=2, help="load generator processes")
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--value-bytes", type=int, default=100)
    p.add_argument("--batch-ops", type=int, default=100)
    p.add_argument("--out", type=Path, default=None,
                   help="where the profiles go (default: benchmarks/results/profile-<time>)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="parent of the cluster's temporary data dir (a real disk)")
    return p


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        point = parse_point(args.point)
    except ValueError as e:
        parser.error(str(e))
    if args.seconds < 1 or args.rate < 1 or args.warmup < 0:
        parser.error("--seconds must be >= 1, --rate >= 1, --warmup >= 0")
    pyspy = pyspy_binary()
    if pyspy is None:
        print(f"profile_node: {PYSPY_HINT}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or RESULTS_DIR / f"profile-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(points=(point,), seconds=args.seconds + 1.0, warmup_s=args.warmup, repeats=1,
                keys=args.keys, value_bytes=args.value_bytes, batch_ops=args.batch_ops,
                workers=args.workers, request_timeout_s=15.0,
                watch=WatchPlan(keys=100, rate=200.0, writer_conns=32, timeout_s=10.0,
                                grace_s=10.0))
    base_dir = Path(tempfile.mkdtemp(prefix="raftkv-profile-", dir=args.data_dir))
    try:
        cluster = RaftkvCluster.start_local(base_dir, http_workers=args.http_workers,
                                            auth_tls=args.auth_tls)
    except ClusterError as e:
        print(f"profile_node: {e}\n(data and logs kept in {base_dir})", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        leader = cluster.leader()
        if point.kind is Kind.GET:
            cluster.preload(plan.keys, plan.value_bytes)
        targets = processes_to_profile(cluster, leader.endpoint)
        profiler = Profiler(pyspy, targets, out, args.seconds, args.rate, args.blocking)
        print(f"profiling {len(targets)} processes for {args.seconds:g} s under "
              f"{point.label} (after {args.warmup:g} s of warmup): "
              f"{', '.join(t.name for t in targets)}", file=sys.stderr, flush=True)
        if point.kind is Kind.WATCH:
            specs, writer = watch_specs(plan, point, cluster.system, leader.endpoint,
                                        cluster.current_index(), "profile", cluster.token)
            result = run_watch_load(specs, writer, profiler, grace_s=plan.watch.grace_s,
                                    registered=lambda: cluster.watches_held(leader.endpoint))
            ops_per_s = (result.writes.completed_in_window() / result.writes.window_s
                         if result.writes.window_s > 0 else 0.0)
        else:
            endpoints = [leader.endpoint] if point.mode == LEADER else (
                [ep for ep in cluster.endpoints if ep != leader.endpoint] + [leader.endpoint])
            load = run_load(worker_specs(plan, point, cluster.system, endpoints, "profile",
                                         cluster.token), profiler)
            per = plan.batch_ops if point.kind is Kind.BATCH else 1
            ops_per_s = load.completed * per / load.window_s if load.window_s > 0 else 0.0
        codes = profiler.wait(args.seconds + 60)
    except (ClusterError, LoadError) as e:
        print(f"profile_node: {e}\n(data and logs kept in {base_dir})", file=sys.stderr)
        cluster.close()
        return EXIT_UNAVAILABLE
    cluster.close()
    shutil.rmtree(base_dir, ignore_errors=True)

    summaries: list[ProcessSummary] = []
    for t in targets:
        raw = out / f"{t.name}.txt"
        if not raw.exists():
            print(f"profile_node: no profile of {t.name} (py-spy exit status "
                  f"{codes.get(t.name)}; see {out / (t.name + '.py-spy.log')})",
                  file=sys.stderr)
            continue
        stacks = read_collapsed(raw)
        (out / f"{t.name}.svg").write_text(flamegraph_svg(stacks, f"{t.name} {point.label}"))
        summaries.append(summarize_stacks(t.name, stacks, args.seconds, args.rate))
    header = (f"py-spy --gil --function{'' if args.blocking else ' --nonblocking'} at "
              f"{args.rate} Hz for {args.seconds:g} s, {point.label}, "
              f"{args.http_workers or 'default'} HTTP workers"
              f"{', auth and peer TLS on' if args.auth_tls else ''}; the load did {ops_per_s:,.0f} "
              "ops/s while profiled")
    text = header + "\n\n" + "\n\n".join(format_summary(s) for s in summaries) + "\n"
    (out / "summary.txt").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {"point": point.label, "seconds": args.seconds, "rate": args.rate,
         "blocking": args.blocking, "http_workers": args.http_workers,
         "auth_tls": args.auth_tls,
         "ops_per_s": ops_per_s, "processes": [asdict(t) for t in targets],
         "summaries": [asdict(s) for s in summaries]}, indent=2) + "\n")
    print(text)
    print(f"profiles: {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
