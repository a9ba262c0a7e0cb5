"""--flush-bounds: two variants that skip fsyncs (the leader's only, or every node's), measured
to bound what the flushes cost. They must skip exactly the fsyncs they say (the leader-only one
on the node that leads every run, or the run fails), and they are never held to the issue's
targets or budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.clusters import UNSYNCED_SETTINGS, ClusterError, Leadership, RaftkvCluster
from benchmarks.labels import NO_FSYNC_ALL, NO_FSYNC_LEADER, is_flush_bound, variant_label
from benchmarks.loadgen import Endpoint
from benchmarks.records import PointSummary
from benchmarks.report import batch_target, budgets, ratios, targets
from benchmarks.write_throughput import check_pinned_leader
from raftkv.localcluster import http_json, wait_until
from tests.support.bench_runs import RUN_TIMEOUT_S, run_benchmark

UNSYNCED_LOG_EVENT = "event=storage_unsafe_no_fsync"


def test_the_bounds_are_labelled_apart_from_every_durable_variant() -> None:
    assert variant_label(0, no_fsync=NO_FSYNC_LEADER) == "raftkv-leader-no-fsync"
    assert variant_label(1, no_fsync=NO_FSYNC_ALL) == "raftkv-w1-no-fsync"
    assert variant_label(None) == "raftkv"
    for label in ("raftkv-leader-no-fsync", "raftkv-w1-no-fsync"):
        assert is_flush_bound(label)
    for label in ("raftkv", "raftkv-w1", "raftkv-auth-tls", variant_label(2, auth_tls=True)):
        assert not is_flush_bound(label)


def _summary(system: str, label: str, point: str, ops_per_s: float) -> PointSummary:
    kind, mode, conc = point.split("/")
    return PointSummary(
        system=system, label=label, point=point, kind=kind, mode=mode,
        concurrency=int(conc.removeprefix("c")), runs=3, ops_per_s=ops_per_s, p50_ms=1.0,
        p99_ms=2.0, errors=0, generator_cpu_cores=0.1, server_cpu_cores=1.0,
        leader_cpu_cores=0.5, lost_writes=0, server_ms_per_op=0.3, leader_main_us_per_op=30.0,
        leader_main_cs_per_op=0.5, leader_main_voluntary_cs_per_op=0.5,
        worker_us_per_request_max=100.0, follower_us_per_op_max=20.0)


def test_a_bound_is_shown_against_etcd_but_never_checked_against_the_targets() -> None:
    summaries = [_summary(system, label, point, ops)
                 for point in ("put/leader/c1", "put/leader/c16", "batch/leader/c16")
                 for system, label, ops in (("raftkv", "raftkv", 900.0),
                                            ("raftkv", "raftkv-no-fsync", 1500.0),
                                            ("raftkv", "raftkv-leader-no-fsync", 1000.0),
                                            ("etcd", "etcd", 1000.0))]
    assert {c.label for c in budgets(summaries)} == {"raftkv"}
    assert {c.label for c in targets(summaries)} == {"raftkv"}
    batch = batch_target(summaries, 16)
    assert batch is not None and batch["raftkv_batch_keys_per_s"] == 900.0  # plain raftkv's
    shown = {(r["label"], r["point"]): r["ratio"] for r in ratios(summaries)}
    assert shown[("raftkv-no-fsync", "put/leader/c1")] == 1.5
    assert shown[("raftkv-leader-no-fsync", "put/leader/c16")] == 1.0
    assert shown[("raftkv", "put/leader/c16")] == 0.9


def test_a_run_the_pinned_node_did_not_lead_in_one_term_fails() -> None:
    ep = Endpoint("127.0.0.1", 1)
    n1, n2 = Leadership(ep, "n1", 3), Leadership(ep, "n2", 4)
    check_pinned_leader("b", "n1", n1, n1)
    check_pinned_leader("durable", None, n1, n2)  # nothing pinned: a change is only noted
    for start, end in ((n1, Leadership(ep, "n1", 5)), (n1, n2), (n2, n1), (n2, n2)):
        with pytest.raises(ClusterError, match="n1 must lead the whole run"):
            check_pinned_leader("b", "n1", start, end)


def _unsynced_logs(base_dir: Path) -> set[str]:
    return {p.stem for p in base_dir.glob("n*.log") if UNSYNCED_LOG_EVENT in p.read_text()}


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_leader_bound_skips_the_leaders_fsyncs_only_and_keeps_it_leading(
        tmp_path: Path) -> None:
    cluster = RaftkvCluster.start_local(tmp_path, http_workers=1, no_fsync=NO_FSYNC_LEADER)
    try:
        assert cluster.leader().node == "n1"
        assert _unsynced_logs(tmp_path) == {"n1"}
        described = cluster.describe()
        assert described["durable"] is False and described["unsynced"] == ["n1"]
        assert described["node_settings"] == {"n1": dict(UNSYNCED_SETTINGS)}
        # Moved away (as an election would), it is handed back before the next run.
        code, body, _ = http_json("POST", f"{cluster.leader().endpoint}/cluster/leader",
                                  {"id": "n2"}, timeout_s=10.0)
        assert code == 200, body
        wait_until(lambda: cluster.leader().node == "n2" or None, 20.0, "n2 to lead")
        cluster.keep_leader()
        assert cluster.leader().node == "n1"
    finally:
        cluster.close()


@pytest.mark.integration
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_a_run_with_the_bounds_measures_both_beside_plain_raftkv(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "--concurrency", "1", "--modes", "leader",
                           "--workloads", "put", "--http-workers", "0", "--flush-bounds")
    labels = {"raftkv", "raftkv-leader-no-fsync", "raftkv-no-fsync"}
    assert {p["label"] for p in report["points"]} == labels
    systems = {s["label"]: s for s in report["systems"]}
    assert (systems["raftkv"]["durable"], systems["raftkv"]["unsynced"]) == (True, [])
    assert systems["raftkv"]["settings"]["RAFTKV_UNSAFE_NO_FSYNC"] == "false"
    everywhere = systems["raftkv-no-fsync"]
    assert (everywhere["durable"], everywhere["unsynced"]) == (False, ["n1", "n2", "n3"])
    assert everywhere["settings"]["RAFTKV_UNSAFE_NO_FSYNC"] == "true"
    assert systems["raftkv-leader-no-fsync"]["unsynced"] == ["n1"]
    runs = report["runs"]
    assert {r["label"] for r in runs} == labels
    assert [r["leader"] for r in runs if r["label"] == "raftkv-leader-no-fsync"] == ["n1"]
    assert all(r["acknowledged_keys"] > 0 and r["lost_writes"] == [] for r in runs)
    assert {c["label"] for c in report["targets"]} == {"raftkv"}
    assert report["ok"] is True
