"""Fault injection against real processes: the CI set of seeded runs, and the harness's own
tests (the firewall cuts what it says, the checks flag what they must).

RAFTKV_FAULTS_SECONDS changes the length of each CI run (default 30 s).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from raftkv.client import Client
from raftkv.localcluster import (
    LocalCluster,
    NodeProc,
    free_port,
    http_json,
    wait_until,
)
from raftkv.runtime.eventloop import EventLoop
from raftkv.runtime.process import peer_source_host
from raftkv.runtime.transport import PeerTransport
from tests.faults import harness
from tests.faults.harness import (
    Record,
    RunConfig,
    _attempt,
    check_durability,
    format_report,
    run_faults,
    write_results,
)
from tests.faults.nemesis import (
    NFT_TABLE_PREFIX,
    FaultKind,
    Firewall,
    Nemesis,
    PeerEndpoint,
    open_firewall,
    remove_stale_nft_tables,
)
from tests.support.clusters import running_cluster
from tests.support.linearizability import Outcome, check_history
from tests.support.lock_workload import LockConfig, LockRecorder, LockWorker, final_guarded_read
from tests.support.single_node import SingleNodeService, serving

pytestmark = pytest.mark.faults

RUN_SECONDS = float(os.environ.get("RAFTKV_FAULTS_SECONDS", "30"))

# seed, nodes, fault mix, server-side wait (a short one makes more 504 "unknown" outcomes),
# secure (peer mutual TLS and auth on: RunConfig.secure)
CI_RUNS = [
    pytest.param(101, 3, "kills", 2.0, False, id="seed101-3nodes-kills"),
    pytest.param(102, 3, "partitions", 1.0, False, id="seed102-3nodes-partitions"),
    pytest.param(103, 3, "pauses", 0.5, False, id="seed103-3nodes-pauses"),
    pytest.param(104, 3, "restarts", 2.0, False, id="seed104-3nodes-restarts"),
    pytest.param(105, 5, "all", 1.0, False, id="seed105-5nodes-all"),
    pytest.param(107, 3, "all", 1.0, True, id="seed107-3nodes-all-tls-auth"),
]


@pytest.fixture
def firewall() -> Iterator[Firewall]:
    fw, why = open_firewall()
    if fw is None:
        pytest.skip(why)
    try:
        yield fw
    finally:
        fw.close()


# --------------------------------------------------------------------------- the CI set
@pytest.mark.timeout(RUN_SECONDS + 400)
@pytest.mark.parametrize(("seed", "nodes", "mix", "server_timeout_s", "secure"), CI_RUNS)
def test_history_is_linearizable_durable_and_converges_under_faults(
        seed: int, nodes: int, mix: str, server_timeout_s: float, secure: bool,
        tmp_path: Path) -> None:
    if mix == "partitions":
        fw, why = open_firewall()
        if fw is None:
            pytest.skip(why)
        fw.close()
    if secure:
        pytest.importorskip("cryptography", reason="peer TLS certificates need cryptography")
    cfg = RunConfig(seed=seed, nodes=nodes, seconds=RUN_SECONDS, mix=mix,
                    server_timeout_s=server_timeout_s, secure=secure)
    result = run_faults(cfg, tmp_path, progress=print)
    write_results(result, tmp_path / "results")
    report = format_report(result)
    print(report)
    assert result.ok, f"{report}\n(history and node logs in {tmp_path / 'results'})"
    assert result.check is not None and result.check.checked_operations > 0
    if secure:
        assert result.summary["secure"] is True and "auth refused" not in report


@pytest.mark.timeout(RUN_SECONDS + 400)
def test_lock_holders_are_mutually_exclusive_and_fenced_under_faults(tmp_path: Path) -> None:
    """The locks workload (tests/support/lock_workload.py) under every fault the machine
    allows: kills, pauses, restarts, and partitions where nftables works."""
    fw, _why = open_firewall()
    mix = "all" if fw is not None else "kills"
    if fw is not None:
        fw.close()
    cfg = RunConfig(seed=106, nodes=3, seconds=RUN_SECONDS, mix=mix, server_timeout_s=1.0,
                    workload="locks")
    result = run_faults(cfg, tmp_path, progress=print)
    write_results(result, tmp_path / "results")
    report = format_report(result)
    print(report)
    assert result.ok, f"{report}\n(history and node logs in {tmp_path / 'results'})"
    assert result.lock_violations == []
    assert any(h.outcome == "acquired" for h in result.lock_holds)


# --------------------------------------------------------------------------- the firewall
def _connects(src: str, dst: tuple[str, int], timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(dst, timeout=timeout_s, source_address=(src, 0)):
            return True
    except OSError:
        return False


def test_firewall_drops_only_the_named_direction_and_leaves_no_rule_behind(
        firewall: Firewall) -> None:
    a_ip, b_ip, c_ip = "127.0.0.31", "127.0.0.32", "127.0.0.33"
    listeners = []
    for ip in (a_ip, b_ip):
        s = socket.create_server((ip, 0))
        listeners.append(s)
    a_port, b_port = (s.getsockname()[1] for s in listeners)
    try:
        firewall.block(PeerEndpoint("a", a_ip, a_port), PeerEndpoint("b", b_ip, b_port))
        assert not _connects(a_ip, (b_ip, b_port)), "a -> b should be dropped"
        assert _connects(c_ip, (b_ip, b_port)), "c -> b must be untouched"
        assert _connects(b_ip, (a_ip, a_port)), "b -> a (the other way) must be untouched"
        firewall.heal()
        assert _connects(a_ip, (b_ip, b_port)), "healed: a -> b works again"
    finally:
        for s in listeners:
            s.close()
    firewall.close()
    if firewall.backend == "nftables":
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                check=True).stdout
        assert f"{NFT_TABLE_PREFIX}{os.getpid()}_" not in tables


def test_tables_left_by_a_killed_run_are_removed_and_others_untouched() -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{NFT_TABLE_PREFIX}{dead.pid}_1"
    foreign = "raftkv_faults_test_foreign"
    try:
        subprocess.run(["nft", "add", "table", "inet", stale], check=True)
        subprocess.run(["nft", "add", "table", "inet", foreign], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"nft does not work here: {e}")
    try:
        assert stale in remove_stale_nft_tables()
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                check=True).stdout
        assert stale not in tables and foreign in tables
    finally:
        subprocess.run(["nft", "delete", "table", "inet", foreign], check=False)
        subprocess.run(["nft", "delete", "table", "inet", stale], check=False,
                       capture_output=True)


def test_peer_connections_leave_from_the_raft_bind_host() -> None:
    assert peer_source_host("127.0.0.41") == "127.0.0.41"
    assert peer_source_host("::1") == "::1"
    assert peer_source_host("0.0.0.0") is None
    assert peer_source_host("::") is None
    assert peer_source_host("node1.example") is None  # a name: the kernel picks
    listener = socket.create_server(("127.0.0.42", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    loop = EventLoop()
    t = PeerTransport(loop, node_id="a", cluster_id="c", token="t",
                      listen_sock=socket.create_server(("127.0.0.41", 0)),
                      http_address="127.0.0.1:1", deliver=lambda *_: None,
                      source_host=peer_source_host("127.0.0.41"))
    t.set_peers({"b": f"127.0.0.42:{port}"})  # dials at once (non-blocking connect)
    try:
        conn, (remote_ip, _) = listener.accept()
        conn.close()
        assert remote_ip == "127.0.0.41"
    finally:
        t.close()
        loop.close()
        listener.close()


# --------------------------------------------------------------------------- worker kills
def test_kill_workers_kills_a_nodes_http_workers_and_returns_once_they_serve_again(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with running_cluster(tmp_path, request=request, env={"RAFTKV_HTTP_WORKERS": "2"}) as c:
        nemesis = Nemesis(c, random.Random(7), [FaultKind.KILL_WORKERS], None,
                          time.monotonic, threading.Event())
        killed = 0
        for _ in range(3):
            workers = {n.node_id: set(c.worker_pids(n)) for n in c.nodes}
            nemesis.inject(FaultKind.KILL_WORKERS, 0.2)
            start = [e for e in nemesis.events if e.phase == "start"][-1]
            node = c.node(start.detail.split()[0])
            victims = {int(p) for p in start.detail.split("[", 1)[1].split("]")[0].split(",")}
            assert victims and victims <= workers[node.node_id]
            now = set(c.worker_pids(node))
            assert len(now) == 2 and not victims & now, "each victim was replaced"
            killed += len(victims)

        assert nemesis.errors == []
        assert nemesis.counts == {"kill_workers": 3}
        assert [e.phase for e in nemesis.events].count("heal") == 3
        assert sum(s["extra"]["workers"][i]["restarts"] for s in map(c.status, c.nodes)
                   for i in range(2)) == killed
        c.put("after", "the worker kills")


# --------------------------------------------------------------------------- real partitions
@pytest.fixture
def own_ip_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path, request=request, ready=False, timeout_s=30) as c:
        yield c


def _put(node: NodeProc, key: str, value: str) -> int:
    def attempt() -> int | None:
        code, body, _ = http_json("PUT", f"{node.http}/keys/{key}?timeout=2", {"value": value},
                                  timeout_s=5, headers={"Idempotency-Key": f"{key}-{value}"})
        return int(body["index"]) if code == 200 else None

    return wait_until(attempt, 20, f"write {key}={value} on {node.node_id}")


def test_partitioned_leader_loses_leadership_and_a_stale_read_there_is_flagged(
        own_ip_cluster: LocalCluster, firewall: Firewall) -> None:
    """The rules cut real peer traffic (the majority elects a new leader, the old one steps
    down and cannot serve a linearizable read), and the history checker flags the stale read
    that an isolated old leader serves from its local state."""
    c = own_ip_cluster
    old = c.wait_for_leader()
    others = [n for n in c.nodes if n is not old]
    _put(old, "x", "v1")
    ops = []
    for o in others:
        firewall.block(PeerEndpoint(old.node_id, old.raft_host, old.raft_port),
                       PeerEndpoint(o.node_id, o.raft_host, o.raft_port))
        firewall.block(PeerEndpoint(o.node_id, o.raft_host, o.raft_port),
                       PeerEndpoint(old.node_id, old.raft_host, old.raft_port))
    try:
        new = c.wait_for_leader(among=others, timeout_s=15)
        _put(new, "x", "v2")
        after_v2 = 1.0
        code, body, _ = http_json("GET", f"{old.http}/keys/x?consistency=stale", timeout_s=5)
        assert (code, body["value"]) == (200, "v1"), "the isolated node still has v1 locally"
        ops = [
            Record(0, old.node_id, "write", "x", "v1", 0.0, 0.5, "ok").operation(),
            Record(1, new.node_id, "write", "x", "v2", 0.6, after_v2, "ok").operation(),
            Record(2, old.node_id, "read", "x", "v1", after_v2 + 0.1, after_v2 + 0.2,
                   "ok").operation(),
        ]
        code, body, _ = http_json("GET", f"{old.http}/keys/x?timeout=1", timeout_s=5)
        assert code in (503, 504), f"a linearizable read on the isolated node: {code} {body}"
        wait_until(lambda: c.status(old)["role"] != "leader", 15, "the old leader to step down")
    finally:
        firewall.heal()
    result = check_history(ops)
    assert not result.ok and "stale read" in result.violations[0].message
    c.wait_for_leader(timeout_s=15)
    c.wait_applied(old, c.status(c.wait_for_leader())["commit_index"], timeout_s=20)
    code, body, _ = http_json("GET", f"{old.http}/keys/x?consistency=stale", timeout_s=5)
    assert (code, body["value"]) == (200, "v2"), "healed: the old leader caught up"


# --------------------------------------------------------------------------- the checks
def test_durability_check_flags_a_lost_acknowledged_write_only() -> None:
    acked = Record(0, "n1", "write", "k", "a", 1.0, 2.0, "ok", index=10)
    later_unknown = Record(1, "n2", "write", "k", "b", 1.5, None, "unknown")
    earlier = Record(2, "n3", "write", "k", "old", 0.0, 0.5, "ok", index=5)
    failed = Record(3, "n1", "write", "k", "f", 3.0, 3.5, "failed")
    records = [acked, later_unknown, earlier, failed]
    assert check_durability(records, {"k": "a"}) == []
    assert check_durability(records, {"k": "b"}) == []  # an unknown write may follow it
    lost = check_durability(records, {"k": "old"})
    assert len(lost) == 1 and "lost write" in lost[0] and "'a'" in lost[0]
    assert check_durability(records, {"k": "f"}) != []  # a failed write never explains
    assert check_durability(records, {}) != []  # absent although acknowledged, no delete
    deleted = Record(4, "n1", "delete", "k", None, 2.5, 3.0, "ok")
    assert check_durability([*records, deleted], {}) == []


def test_client_outcome_is_failed_when_refused_and_unknown_when_no_answer() -> None:
    node = NodeProc("n9", free_port(), free_port(), Path("/nonexistent"), Path("/nonexistent"))
    refused = _attempt(node, "PUT", "/keys/a", {"value": 1}, {}, 1.0)
    assert refused.outcome is Outcome.FAILED
    silent = socket.create_server(("127.0.0.1", 0))
    node.http_port = silent.getsockname()[1]
    accepted: list[socket.socket] = []
    t = threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True)
    t.start()
    try:
        hung = _attempt(node, "PUT", "/keys/a", {"value": 1}, {}, 0.5)
        assert hung.outcome is Outcome.UNKNOWN
    finally:
        t.join(5)
        for s in accepted:
            s.close()
        silent.close()


class _FakeNodes:
    """Two nodes' /status and stale reads, for testing the convergence check itself; with
    `auth`, every request without exactly those headers is answered 401."""

    def __init__(self, data: dict[str, dict[str, tuple[object, int]]],
                 auth: dict[str, str] | None = None) -> None:
        self.data = data
        self.auth = auth or {}
        self.nodes = [NodeProc(nid, 1000 + i, 2000 + i, Path("/nonexistent"),
                               Path("/nonexistent")) for i, nid in enumerate(sorted(data))]

    def _allowed(self, headers: Mapping[str, str] | None) -> bool:
        return all((headers or {}).get(k) == v for k, v in self.auth.items())

    def status(self, node: NodeProc, headers: Mapping[str, str]) -> dict[str, object]:
        if not self._allowed(headers):
            harness._refuse_auth(node, "/status", 401, {"error": "unauthenticated"})
        members = [{"id": n.node_id, "voter": True} for n in self.nodes]
        return {"role": "leader" if node is self.nodes[0] else "follower",
                "applied_index": 10, "commit_index": 10, "members": members}

    def http_json(self, method: str, url: str, *_: object,
                  headers: Mapping[str, str] | None = None,
                  **__: object) -> tuple[int, object, dict[str, str]]:
        if not self._allowed(headers):
            return 401, {"error": "unauthenticated"}, {}
        port = int(url.split("/", 1)[0].rsplit(":", 1)[1])
        node = next(n for n in self.nodes if n.http_port == port)
        data = self.data[node.node_id]
        path = url.split("/", 1)[1].split("?", 1)[0]
        if path == "keys":
            return 200, {"keys": [{"key": k, "value": v, "index": i}
                                  for k, (v, i) in data.items()]}, {}
        key = path.removeprefix("keys/")
        if key in data:
            return 200, {"value": data[key][0], "index": data[key][1]}, {}
        return 404, {"error": "key_not_found"}, {}


@pytest.mark.parametrize(("n2_data", "agree"), [
    ({"k0": ("a", 5)}, True),
    ({"k0": ("b", 6)}, False),
    ({}, False),
    ({"k0": ("a", 5), "extra": (1, 7)}, False),
])
def test_convergence_check_flags_nodes_that_disagree(
        monkeypatch: pytest.MonkeyPatch, n2_data: dict[str, tuple[object, int]],
        agree: bool) -> None:
    fake = _FakeNodes({"n1": {"k0": ("a", 5)}, "n2": n2_data})
    monkeypatch.setattr(harness, "_status", fake.status)
    monkeypatch.setattr(harness, "http_json", fake.http_json)
    cluster = LocalCluster.__new__(LocalCluster)
    cluster.nodes = fake.nodes
    cluster.auth_headers = {}
    result = harness.check_convergence(cluster, ["k0"], timeout_s=5)
    assert result.ok is agree, result.problems
    if not agree:
        assert "disagree" in result.problems[0]


@pytest.mark.parametrize("sent", [{}, {"Authorization": "Bearer wrong"}])
def test_convergence_check_sends_the_token_and_fails_at_once_on_401(
        monkeypatch: pytest.MonkeyPatch, sent: dict[str, str]) -> None:
    data: dict[str, dict[str, tuple[object, int]]] = {"n1": {"k0": ("a", 5)},
                                                      "n2": {"k0": ("a", 5)}}
    fake = _FakeNodes(data, auth={"Authorization": f"Bearer {ROOT}"})
    monkeypatch.setattr(harness, "_status", fake.status)
    monkeypatch.setattr(harness, "http_json", fake.http_json)
    cluster = LocalCluster.__new__(LocalCluster)
    cluster.nodes = fake.nodes
    cluster.auth_headers = {"Authorization": f"Bearer {ROOT}"}
    assert harness.check_convergence(cluster, ["k0"], timeout_s=5).ok
    cluster.auth_headers = sent
    started = time.monotonic()
    result = harness.check_convergence(cluster, ["k0"], timeout_s=30)
    assert not result.ok and "auth refused" in result.problems[0]
    assert time.monotonic() - started < 5, "a 401 is not waited out"


# --------------------------------------------------------------------------- secure runs
ROOT = "faults-test-root-token-" + "x" * 20


@pytest.fixture
def auth_node() -> Iterator[NodeProc]:
    """One node with auth on (root token ROOT), over real HTTP, as a NodeProc."""
    with serving(SingleNodeService(root_token=ROOT)) as url:
        host, _, port = url.removeprefix("http://").rpartition(":")
        yield NodeProc("n1", int(port), 0, Path("/nonexistent"), None, http_host=host)


def _register_client(node: NodeProc, recorder: harness.Recorder,
                     headers: dict[str, str]) -> harness.Client:
    cfg = RunConfig(seed=1, secure=True, retry_probability=0.0)
    return harness.Client(0, node, [node], cfg, random.Random(1), ["k0", "k1"],
                          time.monotonic, recorder, threading.Event(), run_tag="t",
                          headers=headers)


def test_the_register_clients_send_the_token_and_a_refused_token_is_a_problem(
        auth_node: NodeProc) -> None:
    recorder = harness.Recorder()
    good = _register_client(auth_node, recorder, {"Authorization": f"Bearer {ROOT}"})
    assert good.write("k0", "v1") == "ok"
    assert good.batch(["k0", "k1"]) == "ok"
    assert good.read("k0") == "ok"
    assert good.write("k1", None) == "ok"
    assert recorder.auth_refusals == []
    assert harness._auth_problems(recorder.auth_refusals) == []

    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        bad = harness.Recorder()
        client = _register_client(auth_node, bad, headers)
        assert client.write("k0", "v2") == "failed"  # surely not applied: refused
        assert client.read("k0") == "failed"
        assert len(bad.auth_refusals) == 2 and "401" in bad.auth_refusals[0]
        assert all(r.outcome == "failed" for r in bad.records)
        problems = harness._auth_problems(bad.auth_refusals)
        assert len(problems) == 2 and "auth refused" in problems[0]


def test_the_lock_workers_send_the_token_and_a_refused_token_is_a_problem(
        auth_node: NodeProc) -> None:
    lock_cfg = LockConfig(ttl_s=2, acquire_timeout_s=2.0)
    for token, refused in ((ROOT, False), (None, True), ("not-the-token", True)):
        recorder = LockRecorder()
        worker = LockWorker(0, [auth_node.http], lock_cfg, random.Random(1), time.monotonic,
                            recorder, threading.Event(), token=token)
        with Client([auth_node.http], timeout_s=2.0, token=token) as client:
            hold = worker.hold_once(client)
        assert (hold.outcome == "acquired") is not refused, hold
        assert bool(recorder.auth_refusals) is refused, recorder.auth_refusals
        final = final_guarded_read([auth_node.http], lock_cfg.guarded_key, time.monotonic,
                                   token=token)
        assert (final.outcome == "ok") is not refused, final


def test_the_nemesis_sends_the_token_and_a_refused_token_is_an_error(
        auth_node: NodeProc) -> None:
    cluster = LocalCluster.__new__(LocalCluster)
    cluster.nodes = [auth_node]
    cluster.auth_headers = {"Authorization": f"Bearer {ROOT}"}
    nemesis = Nemesis(cluster, random.Random(1), [], None, time.monotonic, threading.Event())
    code, body = nemesis._http("GET", f"{auth_node.http}/cluster")
    assert code == 200 and body["members"] and nemesis.errors == []
    cluster.auth_headers = {"Authorization": "Bearer not-the-token"}
    code, _ = nemesis._http("GET", f"{auth_node.http}/cluster")
    assert code == 401 and len(nemesis.errors) == 1 and "401" in nemesis.errors[0]


def test_a_secure_run_config_is_reported_and_replayed_with_secure() -> None:
    cfg = RunConfig(seed=107, secure=True)
    result = harness.RunResult(cfg, True, [], [], [], None,
                               {"faults": {}, "operations": {}, "unknown_operations": 0,
                                "timings_s": {}}, {})
    report = format_report(result)
    assert " secure " in report.splitlines()[0] and "--secure" in report
    assert harness.root_token_for(cfg) == harness.root_token_for(RunConfig(seed=107))
    assert "--secure" not in format_report(dataclasses.replace(result, config=RunConfig(1)))


def test_index_check_flags_a_value_seen_at_two_indexes() -> None:
    write = Record(0, "n1", "write", "k", "v", 1.0, 2.0, "ok", index=7)
    read_same = Record(1, "n2", "read", "k", "v", 2.5, 3.0, "ok", index=7)
    assert harness.check_indexes([write, read_same], {"n1": {"k": ("v", 7)}}) == []
    read_other = Record(2, "n3", "read", "k", "v", 4.0, 4.5, "ok", index=9)
    problems = harness.check_indexes([write, read_same, read_other], {})
    assert len(problems) == 1 and "7" in problems[0] and "9" in problems[0]
    assert harness.check_indexes([write], {"n2": {"k": ("v", 8)}}) != []


def test_report_names_the_seed_replay_command_and_the_operations_around_a_violation(
        tmp_path: Path) -> None:
    records = [
        Record(0, "n1", "write", "k", "a", 1.0, 2.0, "ok", index=5),
        Record(1, "n2", "write", "k", "b", 3.0, 4.0, "ok", index=6),
        Record(2, "n3", "read", "k", "a", 5.0, 5.5, "ok", index=5),
    ]
    check = check_history(r.operation() for r in records)
    assert not check.ok
    events = [harness.NemesisEvent(4.5, "partition_leader", "start", "n1 | n2,n3"),
              harness.NemesisEvent(60.0, "kill", "start", "n2")]
    cfg = RunConfig(seed=4242, nodes=3, seconds=30, mix="partitions")
    result = harness.RunResult(cfg, False, [harness.format_violation(check.violations[0])],
                               records, events, check, {"faults": {}, "operations": {},
                                                        "unknown_operations": 0,
                                                        "timings_s": {}}, {"n1": "log"})
    report = format_report(result)
    assert "seed=4242" in report and "--seed 4242" in report
    assert "stale read" in report and "'a'" in report and "'b'" in report
    assert "partition_leader start n1 | n2,n3" in report
    assert "kill" not in report.split("nemesis events", 1)[1]
    write_results(result, tmp_path)
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 5 and '"type": "nemesis"' in lines[-1]
    assert (tmp_path / "summary.json").exists() and (tmp_path / "n1.log").read_text() == "log"
