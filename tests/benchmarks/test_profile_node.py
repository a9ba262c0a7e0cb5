"""benchmarks.profile_node: points, the summaries and flame graphs of collapsed stacks, and
(where py-spy is installed) a short real profile of a leader and a follower."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.dom.minidom
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.loadgen import Kind
from benchmarks.profile_node import (
    flamegraph_svg,
    parse_point,
    pyspy_binary,
    read_collapsed,
    summarize_stacks,
)

ROOT = Path(__file__).resolve().parents[2]


def test_points() -> None:
    assert parse_point("put/spread/c64").label == "put/spread/c64"
    assert parse_point("watch/c1000").kind is Kind.WATCH
    for bad in ("put/leader", "put/everywhere/c4", "get/spread/c4", "put/leader/x4", "nap/c1"):
        with pytest.raises(ValueError):
            parse_point(bad)


def test_self_and_cumulative_samples(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("main (a.py:1);loop (a.py:5);fsync (b.py:9) 30\n"
                   "main (a.py:1);loop (a.py:5) 10\n"
                   "main (a.py:1);handle (c.py:2);loop (a.py:5) 60\n")
    stacks = read_collapsed(raw)
    assert sum(stacks.values()) == 100
    s = summarize_stacks("x", stacks, seconds=2, rate=100)
    assert s.gil_share == pytest.approx(0.5)
    assert dict(s.self_top) == {"loop (a.py:5)": 70, "fsync (b.py:9)": 30}
    assert dict(s.cumulative_top)["loop (a.py:5)"] == 100  # once per stack, not per frame
    assert dict(s.cumulative_top)["handle (c.py:2)"] == 60


def test_flame_graph_is_well_formed_svg_with_every_frame() -> None:
    stacks = Counter({("main (a.py:1)", "f<g> & h (b.py:2)"): 3, ("main (a.py:1)",): 1})
    svg = flamegraph_svg(stacks, "t")
    doc = xml.dom.minidom.parseString(svg)
    titles = [t.firstChild.data for t in doc.getElementsByTagName("title")]  # type: ignore[union-attr]
    assert titles == ["main (a.py:1) (4 samples, 100.0%)", "f<g> & h (b.py:2) (3 samples, 75.0%)"]


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("secured", [[], ["--auth-tls"]], ids=["plain", "auth-tls"])
def test_a_short_profile_of_every_process_of_the_leader_and_a_follower(
        tmp_path: Path, secured: list[str]) -> None:
    """With --auth-tls too: the load sends its token, and the workers are named from /status
    asked with the harness's token."""
    if pyspy_binary() is None:
        pytest.skip("py-spy is not installed (pip install py-spy)")
    out = tmp_path / "profile"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_node", "--seconds", "2", "--warmup", "1",
         "--point", "put/leader/c4", "--http-workers", "2", "--out", str(out),
         "--data-dir", str(tmp_path), *secured],
        cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["auth_tls"] is bool(secured)
    names = [p["name"] for p in summary["processes"]]
    assert sorted(n.split("-")[1:3] for n in names) == [
        ["follower", "raft"], ["follower", "w0"], ["follower", "w1"],
        ["leader", "raft"], ["leader", "w0"], ["leader", "w1"]]
    if "Operation not permitted" in proc.stderr:
        pytest.skip("no right to ptrace the nodes here")
    assert (out / "summary.txt").read_text().count("==") == len(summary["summaries"]) > 0
    for s in summary["summaries"]:
        assert (out / f"{s['name']}.txt").exists() and (out / f"{s['name']}.svg").exists()
