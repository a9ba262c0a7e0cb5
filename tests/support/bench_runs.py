"""Running `benchmarks.write_throughput` end to end from a test: a quick run in a process of
its own, its exit status and its one JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S: Final = 120


def run_benchmark(tmp_path: Path, *args: str) -> dict[str, Any]:
    """`--quick` with `args`; asserts exit 0, one JSON report and the data dir cleaned up."""
    out, data = tmp_path / "results", tmp_path / "data"
    data.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.write_throughput", "--quick", "--out", str(out),
         "--data-dir", str(data), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    reports = list(out.glob("write_throughput-*.json"))
    assert len(reports) == 1, f"expected one JSON report in {out}: {reports}"
    assert list(data.iterdir()) == [], "the clusters' data dir was not cleaned up"
    report: dict[str, Any] = json.loads(reports[0].read_text())
    return report
