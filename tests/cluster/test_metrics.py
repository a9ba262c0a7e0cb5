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


def puts_counted(values: dict[str, float]) -> float:
    """PUTs answered 200, summed over the HTTP workers."""
    total = 0.0
    for key, value in values.items():
        name, _, labels = key.partition("{")
        if name == "raftkv_http_request_seconds_count" and all(
                part in labels for part in ('method="PUT"', 'route="/keys/{key:path}"',
                                            'status="200"', 'worker="')):
            total += value
    return total


def test_metrics_move_with_writes_and_leader_changes(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, 3, env=FAST_TIMING)
    c.start_all()
    try:
        for n in c.nodes:
            c.wait_for_ready(n)
        # The leader once every node is ready (one that led before may have lost an election
        # meanwhile).
        leader = c.wait_for_leader()
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
        # Each HTTP worker counts its own requests (label `worker`) and reports them to the
        # Raft process about once a second: the count over the workers reaches 20 soon.
        def scraped_puts() -> dict[str, float] | None:
            values = scrape(leader.http)
            return values if puts_counted(values) >= 20 else None

        counted = wait_until(scraped_puts, 5, "the workers' PUT counts to reach /metrics")
        served = sum(v for k, v in counted.items()
                     if k.startswith("raftkv_worker_requests_total{worker="))
        assert served >= 20
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
