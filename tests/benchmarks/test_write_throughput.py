"""The write-throughput benchmark runs end to end against fresh local clusters.

Smoke runs only: they check that the benchmark starts its clusters, measures every point,
accounts for every server process, reads every acknowledged write back, sees every watched
change and writes its JSON report. No assertion on speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench_runs import RUN_TIMEOUT_S, run_benchmark

pytestmark = [pytest.mark.integration, pytest.mark.timeout(RUN_TIMEOUT_S + 30)]


def test_quick_benchmark_measures_every_point_and_loses_no_acknowledged_write(
        tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "--concurrency", "1,4", "--spread-concurrency", "4",
                           "--http-workers", "0", "--watchers", "40", "--watch-keys", "8",
                           "--watch-rate", "40")
    points = {(p["label"], p["point"]) for p in report["points"]}
    assert points == {("raftkv", label) for label in (
        "put/leader/c1", "put/leader/c4", "put/spread/c4", "get/leader/c16",
        "batch/leader/c16", "watch/c40")}
    assert report["ok"] is True
    assert report["lost_writes"] == 0 and report["missed_watch_changes"] == 0
    writes = [r for r in report["runs"] if r["kind"] in ("put", "batch", "watch")]
    assert writes and all(r["acknowledged_keys"] > 0 for r in writes)
    assert all(r["lost_writes"] == [] for r in report["runs"])
    assert all(p["ops_per_s"] > 0 for p in report["points"])

    # Every process of every node is accounted for: three Raft processes, their workers.
    for run in report["runs"]:
        rows = run["cpu"]["processes"]
        assert sorted(r["process"] for r in rows if r["process"] == "raft") == ["raft"] * 3
        assert any(r["process"] == "worker" for r in rows)
        assert {r["node_role"] for r in rows} == {"leader", "follower"}
        assert run["cpu"]["server_ms_per_op"] > 0
    c4 = next(r for r in report["runs"] if r["point"] == "put/leader/c4")
    assert c4["cpu"]["leader_main_us_per_op"] > 0
    assert c4["cpu"]["leader_worker_us_per_request"], "no leader worker served 100 requests"
    watch = next(r for r in report["runs"] if r["point"] == "watch/c40")["watch"]
    assert watch["deliveries"] > 0 and watch["missed"] == 0
    assert {b["what"] for b in report["budgets"]} == set()  # no put/leader/c16 point here


def test_http_worker_variants_run_on_clusters_of_their_own(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "--concurrency", "16", "--modes", "leader",
                           "--workloads", "put", "--http-workers", "0,1")
    assert {p["label"] for p in report["points"]} == {"raftkv", "raftkv-w1"}
    assert [s["settings"]["RAFTKV_HTTP_WORKERS"] for s in report["systems"]] == ["0", "1"]
    by_label = {r["label"]: r for r in report["runs"]}
    workers = {label: sum(1 for p in r["cpu"]["processes"] if p["process"] == "worker")
               for label, r in by_label.items()}
    assert workers["raftkv-w1"] == 3
    assert {b["label"] for b in report["budgets"]} == {"raftkv", "raftkv-w1"}
    assert report["ok"] is True


def test_the_auth_tls_variant_runs_secured_and_is_reported_against_plain_raftkv(
        tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="peer TLS certificates need cryptography")
    report = run_benchmark(tmp_path, "--concurrency", "16", "--modes", "leader",
                           "--workloads", "put,get,batch", "--http-workers", "0",
                           "--auth-tls")
    points = ("put/leader/c16", "get/leader/c16", "batch/leader/c16")
    assert {(p["label"], p["point"]) for p in report["points"]} == {
        (label, point) for label in ("raftkv", "raftkv-auth-tls") for point in points}
    systems = {s["label"]: s for s in report["systems"]}
    assert systems["raftkv-auth-tls"]["security"] == {
        "auth": True, "peer_tls": "on", "load_token_role": "write"}
    assert "security" not in systems["raftkv"]
    # The load carried its token: with a dropped one every request would be a 401.
    secured = [r for r in report["runs"] if r["label"] == "raftkv-auth-tls"]
    assert len(secured) == 3 and all(r["errors"] == {} and r["ops_per_s"] > 0
                                     for r in secured)
    assert all(r["acknowledged_keys"] > 0 for r in secured if r["kind"] != "get")
    rows = {r["point"]: r for r in report["auth_tls_ratios"]}
    assert set(rows) == set(points)
    for row in rows.values():
        assert row["base"] == "raftkv" and isinstance(row["ratio"], float)
        assert row["wanted"] == 0.9 and row["met"] is (row["ratio"] >= 0.9)
    assert report["ok"] is True
    assert "rkv_" not in json.dumps(report), "a token secret in the report"


@pytest.mark.parametrize(("args", "message"), [
    (["--auth-tls", "--urls", "127.0.0.1:4001"], "--auth-tls starts a cluster"),
    (["--auth-tls", "--http-workers", "1"], "--auth-tls .* keep 0 in --http-workers"),
    (["--flush-bounds", "--urls", "127.0.0.1:4001"], "--flush-bounds starts clusters"),
    (["--flush-bounds", "--http-workers", "1"], "--flush-bounds .* keep 0 in --http-workers"),
])
def test_variants_against_plain_raftkv_need_clusters_of_their_own_beside_it(
        args: list[str], message: str) -> None:
    from benchmarks.write_throughput import build_parser, plan_from

    with pytest.raises(ValueError, match=message):
        plan_from(build_parser().parse_args(args))
