"""The write-throughput benchmark's tables, its checks against the issue's targets and budgets,
and its plot."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks.labels import is_flush_bound, variant_label
from benchmarks.loadgen import Kind, System
from benchmarks.records import LEADER, SPREAD, PointSummary

BUDGET_POINT: Final = "put/leader/c16"
BASE_LABEL: Final = "raftkv"
"""Plain raftkv: its defaults, auth off, plaintext between the nodes."""
AUTH_TLS_LABEL: Final = variant_label(None, auth_tls=True)
AUTH_TLS_MIN_RATIO: Final = 0.9
"""The target: auth and peer TLS cost at most 10% of plain raftkv's throughput."""


# --------------------------------------------------------------------------- formatting
def align(rows: Sequence[Sequence[str]], left: int) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".2f") -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, spec)


def _workload(s: PointSummary, batch_ops: int) -> str:
    if s.kind == Kind.BATCH.value:
        return f"batch x{batch_ops} (keys/s)"
    if s.kind == Kind.WATCH.value:
        return "watch (writes/s)"
    return s.kind


def format_table(summaries: Sequence[PointSummary], batch_ops: int) -> str:
    header = ("system", "workload", "mode", "conc", "ops/s", "p50 ms", "p99 ms", "errors",
              "gen CPU", "server CPU", "leader CPU", "lost")
    rows = [header] + [(
        s.label, _workload(s, batch_ops), s.mode, str(s.concurrency),
        f"{s.ops_per_s:,.0f}", f"{s.p50_ms:.1f}", f"{s.p99_ms:.1f}", str(s.errors),
        fmt(s.generator_cpu_cores), fmt(s.server_cpu_cores), fmt(s.leader_cpu_cores),
        str(s.lost_writes + s.missed_changes)) for s in summaries]
    return align(rows, left=3)


def format_cpu_table(summaries: Sequence[PointSummary]) -> str:
    """Where the servers' CPU went, per operation (benchmarks.accounting)."""
    header = ("system", "point", "server ms/op", "leader us/op", "main us/op",
              "main cs/op (vol)",
              "leader workers us/req", "follower main us/op", "follower all us/op", "changed")
    rows = [header]
    for s in summaries:
        if s.server_ms_per_op is None:
            continue
        workers = " ".join(f"w{w}:{v:.0f}" for w, v in sorted(
            s.worker_us_per_request.items(), key=lambda kv: int(kv[0]))) or "-"
        rows.append((s.label, s.point, fmt(s.server_ms_per_op, ".3f"),
                     fmt(s.leader_us_per_op, ".0f"), fmt(s.leader_main_us_per_op, ".0f"),
                     f"{fmt(s.leader_main_cs_per_op, '.2f')} "
                     f"({fmt(s.leader_main_voluntary_cs_per_op, '.2f')})", workers,
                     fmt(s.follower_main_us_per_op_max, ".0f"),
                     fmt(s.follower_us_per_op_max, ".0f"), str(s.processes_changed)))
    return align(rows, left=2) if len(rows) > 1 else ""


# --------------------------------------------------------------------------- against etcd
def _by_key(summaries: Sequence[PointSummary]) -> dict[tuple[str, str], PointSummary]:
    return {(s.label, s.point): s for s in summaries}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def ratios(summaries: Sequence[PointSummary]) -> list[dict[str, object]]:
    by_key = _by_key(summaries)
    out: list[dict[str, object]] = []
    for s in summaries:
        if s.system != System.RAFTKV.value or s.kind == Kind.WATCH.value:
            continue
        other = by_key.get((System.ETCD.value, s.point))
        if other is None:
            continue
        out.append({"label": s.label, "point": s.point, "raftkv_ops_per_s": s.ops_per_s,
                    "etcd_ops_per_s": other.ops_per_s,
                    "ratio": _ratio(s.ops_per_s, other.ops_per_s),
                    "raftkv_p99_ms": s.p99_ms, "etcd_p99_ms": other.p99_ms,
                    "p99_ratio": _ratio(s.p99_ms, other.p99_ms),
                    "raftkv_ms_per_op": s.server_ms_per_op,
                    "etcd_ms_per_op": other.server_ms_per_op,
                    "cpu_ratio": _ratio(s.server_ms_per_op, other.server_ms_per_op)})
    return out


def format_ratios(rows: Sequence[dict[str, object]]) -> str:
    table = [("system", "point", "ops/s", "etcd ops/s", "x etcd", "p99 ms", "etcd p99",
              "p99 x etcd", "CPU ms/op", "etcd ms/op", "CPU x etcd")]

    def x(value: object) -> str:
        return f"{value:.2f}x" if isinstance(value, float) else "-"

    def num(value: object, spec: str) -> str:
        return format(value, spec) if isinstance(value, float | int) else "-"

    for r in rows:
        table.append((str(r["label"]), str(r["point"]), num(r["raftkv_ops_per_s"], ",.0f"),
                      num(r["etcd_ops_per_s"], ",.0f"), x(r["ratio"]),
                      num(r["raftkv_p99_ms"], ".1f"), num(r["etcd_p99_ms"], ".1f"),
                      x(r["p99_ratio"]), num(r["raftkv_ms_per_op"], ".3f"),
                      num(r["etcd_ms_per_op"], ".3f"), x(r["cpu_ratio"])))
    return align(table, left=2)


# --------------------------------------------------------------------------- variants
def variant_ratios(summaries: Sequence[PointSummary], label: str, base: str = BASE_LABEL,
                   wanted: float = AUTH_TLS_MIN_RATIO) -> list[dict[str, object]]:
    """The variant `label` against `base` at every point both measured: throughput ratio
    (`met`: >= wanted; None for the watch point, whose write rate is paced, not pushed),
    p99 and server CPU per op."""
    by_key = _by_key(summaries)
    out: list[dict[str, object]] = []
    for s in summaries:
        if s.label != label:
            continue
        other = by_key.get((base, s.point))
        if other is None:
            continue
        ratio = _ratio(s.ops_per_s, other.ops_per_s)
        paced = s.kind == Kind.WATCH.value
        out.append({"label": label, "base": base, "point": s.point,
                    "ops_per_s": s.ops_per_s, "base_ops_per_s": other.ops_per_s,
                    "ratio": ratio, "p99_ms": s.p99_ms, "base_p99_ms": other.p99_ms,
                    "ms_per_op": s.server_ms_per_op, "base_ms_per_op": other.server_ms_per_op,
                    "cpu_ratio": _ratio(s.server_ms_per_op, other.server_ms_per_op),
                    "wanted": None if paced else wanted,
                    "met": None if paced or ratio is None else ratio >= wanted})
    return out


def format_variant_ratios(rows: Sequence[dict[str, object]]) -> str:
    if not rows:
        return ""
    base = str(rows[0]["base"])
    table = [("system", "point", "ops/s", f"{base} ops/s", f"x {base}", "p99 ms",
              f"{base} p99", "CPU ms/op", f"{base} ms/op", "CPU x", "")]

    def x(value: object) -> str:
        return f"{value:.2f}x" if isinstance(value, float) else "-"

    def num(value: object, spec: str) -> str:
        return format(value, spec) if isinstance(value, float | int) else "-"

    for r in rows:
        verdict = ("paced: not a target" if r["wanted"] is None else
                   "not measured" if r["met"] is None else
                   "met" if r["met"] else "NOT met")
        table.append((str(r["label"]), str(r["point"]), num(r["ops_per_s"], ",.0f"),
                      num(r["base_ops_per_s"], ",.0f"), x(r["ratio"]),
                      num(r["p99_ms"], ".1f"), num(r["base_p99_ms"], ".1f"),
                      num(r["ms_per_op"], ".3f"), num(r["base_ms_per_op"], ".3f"),
                      x(r["cpu_ratio"]), verdict))
    return align(table, left=2)


# --------------------------------------------------------------------------- checks
@dataclass(frozen=True, slots=True)
class Check:
    label: str
    """The raftkv variant checked."""
    what: str
    figure: str
    wanted: str
    met: bool | None
    """None: not measured in this run."""

    def as_dict(self) -> dict[str, object]:
        return {"label": self.label, "what": self.what, "figure": self.figure,
                "wanted": self.wanted, "met": self.met}


def _check(label: str, what: str, value: float | None, limit: float, *, at_most: bool,
           unit: str, spec: str) -> Check:
    wanted = f"{'<=' if at_most else '>='} {format(limit, spec)}{unit}"
    if value is None or math.isnan(value):
        return Check(label, what, "-", wanted, None)
    met = value <= limit if at_most else value >= limit
    return Check(label, what, f"{format(value, spec)}{unit}", wanted, met)


def budgets(summaries: Sequence[PointSummary]) -> list[Check]:
    """The issue's per-process budgets, at put/leader/c16, for every durable raftkv variant."""
    out: list[Check] = []
    for s in summaries:
        if s.system != System.RAFTKV.value or s.point != BUDGET_POINT or is_flush_bound(s.label):
            continue
        out += [
            _check(s.label, "Raft process CPU per write", s.leader_main_us_per_op, 50,
                   at_most=True, unit=" us", spec=".0f"),
            _check(s.label, "Raft process context switches per write",
                   s.leader_main_cs_per_op, 1.0, at_most=True, unit="", spec=".2f"),
            _check(s.label, "  of which voluntary (preemptions left out)",
                   s.leader_main_voluntary_cs_per_op, 1.0, at_most=True, unit="", spec=".2f"),
            _check(s.label, "each leader worker, CPU per request",
                   s.worker_us_per_request_max, 180, at_most=True, unit=" us", spec=".0f"),
            _check(s.label, "each follower (all its processes), CPU per write",
                   s.follower_us_per_op_max, 40, at_most=True, unit=" us", spec=".0f"),
        ]
    return out


def targets(summaries: Sequence[PointSummary]) -> list[Check]:
    """The issue's targets against etcd in the same run, for every durable raftkv variant."""
    by_key = _by_key(summaries)
    etcd: dict[str, PointSummary] = {s.point: s for s in summaries
                                     if s.system == System.ETCD.value}
    labels = sorted({s.label for s in summaries
                     if s.system == System.RAFTKV.value and not is_flush_bound(s.label)})
    out: list[Check] = []
    for label in labels:
        def ratio_of(point: str, pick: Callable[[PointSummary], float | None],
                     label: str = label) -> float | None:
            ours, theirs = by_key.get((label, point)), etcd.get(point)
            if ours is None or theirs is None:
                return None
            return _ratio(pick(ours), pick(theirs))

        if etcd:
            for c in (1, 16, 64):
                out.append(_check(label, f"writes to the leader, c{c}, x etcd",
                                  ratio_of(f"put/leader/c{c}", lambda s: s.ops_per_s), 1.0,
                                  at_most=False, unit="x", spec=".2f"))
        c16, c64 = by_key.get((label, "put/leader/c16")), by_key.get((label, "put/leader/c64"))
        out.append(_check(label, "writes to the leader, c64 / c16",
                          _ratio(c64.ops_per_s if c64 else None,
                                 c16.ops_per_s if c16 else None),
                          1.0, at_most=False, unit="x", spec=".2f"))
        if etcd:
            out.append(_check(label, "writes spread, c64, x etcd",
                              ratio_of("put/spread/c64", lambda s: s.ops_per_s), 1.0,
                              at_most=False, unit="x", spec=".2f"))
            out.append(_check(label, "linearizable reads, c16, x etcd",
                              ratio_of("get/leader/c16", lambda s: s.ops_per_s), 1.0,
                              at_most=False, unit="x", spec=".2f"))
            out.append(_check(label, "p99 of writes to the leader, c64, x etcd",
                              ratio_of("put/leader/c64", lambda s: s.p99_ms), 1.5,
                              at_most=True, unit="x", spec=".2f"))
            cpu = [r for r in (ratio_of(s.point, lambda s: s.server_ms_per_op)
                               for s in summaries if s.label == label
                               and s.kind != Kind.WATCH.value) if r is not None]
            out.append(_check(label, "server CPU per op, x etcd (the worst point)",
                              max(cpu) if cpu else None, 1.0, at_most=True, unit="x",
                              spec=".2f"))
        lost = sum(s.lost_writes + s.missed_changes for s in summaries if s.label == label)
        out.append(Check(label, "acknowledged writes lost, watch changes missed", str(lost),
                         "0", lost == 0))
    return out


def format_checks(checks: Sequence[Check]) -> str:
    rows = [("system", "target", "figure", "wanted", "")]
    for c in checks:
        verdict = "not measured" if c.met is None else ("met" if c.met else "NOT met")
        rows.append((c.label, c.what, c.figure, c.wanted, verdict))
    return align(rows, left=2)


def format_watch(summaries: Sequence[PointSummary]) -> str:
    rows = [("system", "point", "watches", "keys", "writes/s (target)", "delay p50 ms",
             "p99 ms", "after ack p50", "p99", "deliveries", "coalesced", "re-armed",
             "missed")]
    for s in summaries:
        w = s.watch
        if w is None:
            continue
        rows.append((s.label, s.point, str(w.watchers), str(w.keys),
                     f"{w.write_rate:,.0f} ({w.target_rate:,.0f})", fmt(w.delay_p50_ms, ".1f"),
                     fmt(w.delay_p99_ms, ".1f"), fmt(w.after_ack_p50_ms, ".1f"),
                     fmt(w.after_ack_p99_ms, ".1f"), f"{w.deliveries:,}", f"{w.coalesced:,}",
                     f"{w.rearmed_after_timeout:,}", str(w.missed)))
    return align(rows, left=2) if len(rows) > 1 else ""


def batch_target(summaries: Sequence[PointSummary], batch_concurrency: int,
                 factor: float = 10.0) -> dict[str, object] | None:
    """raftkv batched keys/s against etcd's single-key rate at the same concurrency (leader)."""
    by_key = {(s.label, s.kind, s.mode, s.concurrency): s for s in summaries}
    ours = by_key.get((System.RAFTKV.value, Kind.BATCH.value, LEADER, batch_concurrency))
    theirs = by_key.get((System.ETCD.value, Kind.PUT.value, LEADER, batch_concurrency))
    if ours is None or theirs is None or not theirs.ops_per_s:
        return None
    multiple = ours.ops_per_s / theirs.ops_per_s
    return {"raftkv_batch_keys_per_s": ours.ops_per_s,
            "etcd_single_key_ops_per_s": theirs.ops_per_s, "concurrency": batch_concurrency,
            "multiple": multiple, "wanted": factor, "met": multiple >= factor}


# --------------------------------------------------------------------------- the plot
_PALETTE: Final = ("tab:blue", "tab:green", "tab:purple", "tab:red", "tab:brown")


def _colors(summaries: Sequence[PointSummary]) -> dict[str, str]:
    labels = sorted({s.label for s in summaries if s.system != System.ETCD.value})
    colors = {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(labels)}
    colors[System.ETCD.value] = "tab:orange"
    return colors


def plot(summaries: Sequence[PointSummary], path: Path, title: str) -> bool:
    """Throughput and latency against concurrency, and the servers' CPU per operation by
    process. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return False
    fig, (ax_tp, ax_lat, ax_cpu) = plt.subplots(1, 3, figsize=(19, 5.5))
    colors = _colors(summaries)
    styles = {LEADER: "-", SPREAD: "--"}
    lines: dict[tuple[str, str], list[PointSummary]] = {}
    for s in summaries:
        if s.kind == Kind.PUT.value:
            lines.setdefault((s.label, s.mode), []).append(s)
    for (label, mode), points in sorted(lines.items()):
        points.sort(key=lambda p: p.concurrency)
        xs = [p.concurrency for p in points]
        color, style = colors.get(label, "gray"), styles.get(mode, ":")
        name = label
        if is_flush_bound(label):  # never to be taken for a durable variant
            style, name = ":", f"{label} (NOT durable)"
        ax_tp.plot(xs, [p.ops_per_s for p in points], style, marker="o", color=color,
                   label=f"{name} put, {mode}")
        ax_lat.plot(xs, [p.p50_ms for p in points], style, marker="o", color=color,
                    label=f"{name} put, {mode}: p50")
        ax_lat.plot(xs, [p.p99_ms for p in points], style, marker="^", color=color,
                    alpha=0.5, label=f"{name} put, {mode}: p99")
    markers = {Kind.GET.value: ("s", "linearizable get"), Kind.BATCH.value: ("*", "batch keys/s")}
    for s in summaries:
        if s.kind in markers:
            marker, name = markers[s.kind]
            ax_tp.plot([s.concurrency], [s.ops_per_s], marker, markersize=11, linestyle="none",
                       color=colors.get(s.label, "gray"), label=f"{s.label} {name}")
    levels = sorted({s.concurrency for s in summaries if s.kind != Kind.WATCH.value})
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if levels:
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
    _plot_cpu(ax_cpu, summaries, colors)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_cpu(ax: Any, summaries: Sequence[PointSummary], colors: dict[str, str]) -> None:
    """Stacked bars: us of server CPU per op, split into the leader's main process, the
    leader's workers and the followers; one bar per point and system variant."""
    bars = [s for s in summaries if s.server_ms_per_op is not None]
    points = list(dict.fromkeys(s.point for s in bars))
    labels = list(dict.fromkeys(s.label for s in bars))
    width = 0.8 / max(1, len(labels))
    parts = (("leader main process", 1.0), ("leader workers", 0.6), ("followers", 0.25))
    shown: set[str] = set()
    for j, label in enumerate(labels):
        for i, point in enumerate(points):
            s = next((b for b in bars if b.label == label and b.point == point), None)
            if s is None or s.server_ms_per_op is None:
                continue
            total = s.server_ms_per_op * 1000
            main = s.leader_main_us_per_op or 0.0
            leader = s.leader_us_per_op or main
            values = (main, max(0.0, leader - main), max(0.0, total - leader))
            bottom = 0.0
            for (part, alpha), value in zip(parts, values, strict=True):
                name = f"{label}: {part}"
                if value <= 0:
                    continue
                ax.bar(i + (j - (len(labels) - 1) / 2) * width, value,
                       width, bottom=bottom, color=colors.get(label, "gray"), alpha=alpha,
                       label=None if name in shown else name, edgecolor="black", linewidth=0.3)
                shown.add(name)
                bottom += value
    ax.set_xticks(range(len(points)), points, rotation=30, ha="right",
                  fontsize=7)
    ax.set_ylabel("server CPU us per op (median)")
    ax.set_title("where the servers' CPU goes")
    ax.grid(True, axis="y", alpha=0.3)
    if shown:
        ax.legend(fontsize=6)
