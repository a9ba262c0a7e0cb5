"""Backup and restore with real processes: 100,000 keys written to a 3-node cluster, `raftkv
backup` of it, `raftkv restore` into a new data dir, the restored node started as a new
one-node cluster with every key, then grown by a join that receives all the data."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.client import Client
from raftkv.localcluster import FAST_TIMING, LocalCluster, NodeProc, http_json, wait_until
from raftkv.service import BatchOp

pytestmark = pytest.mark.integration

KEYS = 100_000
BATCH_OPS = 1_000
PAGE_KEYS = 10_000  # one prefix "k0D" holds exactly 10,000 keys, the server's page limit


def key(i: int) -> str:
    return f"k{i:06d}"


def value(i: int) -> object:
    return {"n": i, "tag": f"v{i % 97}"}


def raftkv(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raftkv", *args], capture_output=True,
                          text=True, timeout=timeout_s, check=False)


@pytest.fixture
def clusters(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[LocalCluster]]:
    made: list[LocalCluster] = []
    yield made
    rep = getattr(request.node, "rep_call", None)
    for c in made:
        if rep is not None and rep.failed:
            print(c.dump_logs())
        c.close()


def check_every_key(node: NodeProc, consistency: str) -> None:
    """All 100,000 keys with their values, in ten pages of one prefix each."""
    for page in range(KEYS // PAGE_KEYS):
        prefix = f"k{page:02d}"
        code, body, _ = http_json(
            "GET", f"{node.http}/keys?prefix={prefix}&limit={PAGE_KEYS}"
                   f"&consistency={consistency}&timeout=10", timeout_s=30)
        assert code == 200, body
        rows = body["keys"]
        first = page * PAGE_KEYS
        assert [r["key"] for r in rows] == [key(i) for i in range(first, first + PAGE_KEYS)]
        assert [r["value"] for r in rows] == [value(i) for i in range(first, first + PAGE_KEYS)]
    code, body, _ = http_json("GET", f"{node.http}/keys?prefix=k1&consistency={consistency}")
    assert code == 200 and body["keys"] == []  # and nothing beyond them


def test_backup_restores_into_a_new_cluster_with_every_key_that_grows_by_a_join(
        tmp_path: Path, clusters: list[LocalCluster]) -> None:
    # A 3-node cluster with 100,000 keys, written 1,000 per batch.
    source = LocalCluster(tmp_path / "source", 3, env=FAST_TIMING)
    clusters.append(source)
    (tmp_path / "source").mkdir()
    source.start_all()
    source.wait_for_leader()
    for n in source.nodes:
        source.wait_for_ready(n)
    with Client([n.http for n in source.nodes], timeout_s=20) as kv:
        batch_index = [kv.batch([BatchOp("put", key(i), value(i))
                                 for i in range(first, first + BATCH_OPS)]).index
                       for first in range(0, KEYS, BATCH_OPS)]
        rewritten = kv.put(key(7), value(7)).index  # a key whose index is not its batch's

    backup = tmp_path / "cluster.backup"
    made = raftkv("backup", str(backup), "--urls", ",".join(n.http for n in source.nodes),
                  "--timeout", "20")
    assert made.returncode == 0, made.stderr
    assert f"index {rewritten}" in made.stdout
    source.close()  # the restore needs nothing from the old cluster

    # Restore refuses what is not a fresh data dir, or not an intact backup.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something").write_text("x")
    busy = raftkv("restore", str(backup), "--data-dir", str(tmp_path / "busy"), "--id", "n1")
    assert busy.returncode == 2 and "not empty" in busy.stderr
    damaged = tmp_path / "damaged.backup"
    raw = bytearray(backup.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    damaged.write_bytes(bytes(raw))
    refused = raftkv("restore", str(damaged), "--data-dir", str(tmp_path / "unused"),
                     "--id", "n1")
    assert refused.returncode == 1 and "damaged" in refused.stderr
    assert not (tmp_path / "unused").exists()

    # Restore into a new data dir and start it: a new one-node cluster with every key.
    (tmp_path / "restored").mkdir()
    restored = LocalCluster(tmp_path / "restored", 0, env=FAST_TIMING)
    clusters.append(restored)
    n1 = restored.add_node()
    done = raftkv("restore", str(backup), "--data-dir", str(n1.data_dir), "--id", "n1",
                  "--raft-addr", n1.raft)
    assert done.returncode == 0, done.stderr
    # The hint it prints is enough to start the node: a node refuses to start without a token.
    assert "RAFTKV_CLUSTER_TOKEN_FILE" in done.stdout and "raftkv token generate" in done.stdout
    restored.start(n1)
    restored.wait_for_leader()
    restored.wait_for_ready(n1)
    status = restored.status(n1)
    assert [m["id"] for m in status["members"]] == ["n1"]
    assert status["applied_index"] > rewritten
    code, body, _ = http_json("GET", f"{n1.http}/keys/{key(7)}")
    assert (code, body) == (200, {"value": value(7), "index": rewritten})
    code, body, _ = http_json("GET", f"{n1.http}/keys/{key(8)}")
    assert (code, body) == (200, {"value": value(8), "index": batch_index[0]})
    check_every_key(n1, "linearizable")
    code, body, _ = http_json("PUT", f"{n1.http}/keys/after-restore", {"value": 1})
    assert code == 200 and body["index"] > rewritten  # new writes come after the old ones

    # It grows by joins: a second node gets all the data.
    n2 = restored.add_node()
    restored.start(n2, join=n1.http)
    wait_until(lambda: any(m["id"] == "n2" and m["voter"]
                           for m in http_json("GET", f"{n1.http}/cluster")[1]["members"]),
               30, "n2 to join and be promoted to voter")
    code, body, _ = http_json("PUT", f"{n1.http}/keys/after-join", {"value": 2})
    assert code == 200
    restored.wait_applied(n2, body["index"], timeout_s=30)
    check_every_key(n2, "stale")
    code, body, _ = http_json("GET", f"{n2.http}/keys/after-restore?consistency=stale")
    assert code == 200 and body["value"] == 1


def test_backups_give_their_slot_back_when_finished_or_abandoned(
        tmp_path: Path, clusters: list[LocalCluster]) -> None:
    # Two backups may stream at once; a leaked slot would make the later ones fail with 503.
    c = LocalCluster(tmp_path, 1, env=FAST_TIMING)
    clusters.append(c)
    c.start_all()
    c.wait_for_leader()
    c.wait_for_ready(c.nodes[0])
    with Client([c.nodes[0].http], timeout_s=10) as kv:
        for first in range(0, 20_000, BATCH_OPS):
            kv.batch([BatchOp("put", key(i), i) for i in range(first, first + BATCH_OPS)])
        for _ in range(3):
            with kv.download_snapshot(chunk_bytes=1024) as download:
                next(download.chunks)  # abandoned after the first KiB
        for _ in range(3):
            with kv.download_snapshot("stale") as download:
                assert sum(map(len, download.chunks)) == download.length_bytes
