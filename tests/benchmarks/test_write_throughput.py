"""The write-throughput benchmark runs end to end against a fresh local cluster.

A smoke run only: it checks that the benchmark starts its cluster, measures every point, reads
every acknowledged write back and writes its JSON report. No assertion on speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 90

pytestmark = [pytest.mark.integration, pytest.mark.timeout(RUN_TIMEOUT_S + 30)]


def test_quick_benchmark_measures_every_point_and_loses_no_acknowledged_write(
        tmp_path: Path) -> None:
    out, data = tmp_path / "results", tmp_path / "data"
    data.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.write_throughput", "--quick",
         "--concurrency", "1,4", "--out", str(out), "--data-dir", str(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    reports = list(out.glob("write_throughput-*.json"))
    assert len(reports) == 1, f"expected one JSON report in {out}: {reports}"
    report = json.loads(reports[0].read_text())
    points = {(p["system"], p["point"]) for p in report["points"]}
    assert points == {("raftkv", label) for label in (
        "put/leader/c1", "put/leader/c4", "put/spread/c1", "put/spread/c4",
        "get/leader/c16", "batch/leader/c16")}
    assert report["ok"] is True
    assert report["lost_writes"] == 0
    writes = [r for r in report["runs"] if r["kind"] in ("put", "batch")]
    assert writes and all(r["acknowledged_keys"] > 0 for r in writes)
    assert all(r["lost_writes"] == [] for r in report["runs"])
    assert all(p["ops_per_s"] > 0 for p in report["points"])
    assert list(data.iterdir()) == [], "the cluster's data dir was not cleaned up"
