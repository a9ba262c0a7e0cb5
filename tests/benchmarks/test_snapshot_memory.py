"""benchmarks/snapshot_memory.py: writing, sending and installing a snapshot of N MiB does
not grow a process's memory by anything like N MiB (issue 14, item 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_a_64_mib_snapshot_moves_through_a_few_mib_of_memory(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.snapshot_memory", "--mib", "64",
         "--dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=600, check=True)
    measured = json.loads(result.stdout)
    assert measured["snapshot_bytes"] >= 60 * MIB
    assert measured["restored_bytes"] == measured["snapshot_bytes"]
    # Before: the writer serialised the whole snapshot into one bytes, the leader's core held
    # it, the follower assembled it in a bytearray: each phase grew by at least 64 MiB.
    assert measured["write_growth_bytes"] < 16 * MIB, measured
    assert measured["transfer_growth_bytes"] < 16 * MIB, measured
