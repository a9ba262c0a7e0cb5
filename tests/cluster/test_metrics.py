"""GET /metrics: the Prometheus text format, with values that move as the cluster works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raftkv.localcluster import FAST_TIMING, LocalCluster, http_json, wait_until

pytestmark = pytest.mark.integration


def scrape(addr: str) -> dict[str, float]:
    import http.client

    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/plain")
        text = resp.read().decode()
    finally:
        conn.close()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"^(\S+)\s+(\S+)$", line)
            if m:
                values[m.group(1)] = float(m.group(2))
    return values


def test_metrics_move_with_writes_and_leader_changes(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, 3, env=FAST_TIMING)
    c.start_all()
    try:
        leader = c.wait_for_leader()
        for n in c.nodes:
            c.wait_for_ready(n)
        before = scrape(leader.http)
        assert before['raftkv_role{role="leader"}'] == 1.0
        for i in range(20):
            code, _, _ = http_json("PUT", f"{leader.http}/keys/m{i}", {"value": i})
            assert code == 200
        after = scrape(leader.http)
        assert after["raftkv_commit_index"] >= before["raftkv_commit_index"] + 20
        assert after['raftkv_proposals_total{outcome="committed"}'] >= 20
        assert after["raftkv_fsync_seconds_count"] > before.get("raftkv_fsync_seconds_count", 0)
        assert after["raftkv_persist_batch_entries_sum"] >= 20
        assert after["raftkv_apply_seconds_count"] > 0
        put_route = ('raftkv_http_request_seconds_count{method="PUT",route="/keys/{key:path}",'
                     'status="200"}')
        assert after[put_route] >= 20
        assert any(k.startswith("raftkv_peer_reachable") and v == 1.0 for k, v in after.items())
        follower = next(n for n in c.nodes if n is not leader)
        changes = scrape(follower.http)["raftkv_leader_changes_total"]
        c.kill(leader)
        c.wait_for_leader(timeout_s=15)
        wait_until(lambda: scrape(follower.http)["raftkv_leader_changes_total"] > changes, 10,
                   "the follower to count the leader change")
        assert scrape(follower.http)["raftkv_term"] >= before["raftkv_term"] + 1
    finally:
        c.close()
