"""The docker-compose cluster, for real: `docker stop` / `docker start` of the leader and a
whole-cluster `down` / `up`, with no acknowledged write lost.

Runs in its own compose project with its own free host ports and container names, so it never
touches a cluster started with `make run`, and removes everything it created. It needs the
image (`make test-docker` builds it; RAFTKV_IMAGE names another). Where no Docker engine can
be had it skips, saying why; with RAFTKV_DOCKER_TESTS=1 (CI) that is a failure instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from raftkv.localcluster import free_port, http_json, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SETUP_SCRIPT = ROOT / "scripts" / "docker-host-setup.sh"
NODES = ("n1", "n2", "n3")
KEYS = 1000
KEYS_AFTER_FAILOVER = 200
REQUIRED = os.environ.get("RAFTKV_DOCKER_TESTS") == "1"


def _run(cmd: list[str], *, timeout_s: float = 120.0, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}"
                             f"\n{proc.stderr}")
    return proc


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return _run(["docker", "info"], timeout_s=30, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"RAFTKV_DOCKER_TESTS=1 but {reason}")
    pytest.skip(reason)


def _ensure_engine() -> None:
    """An engine that answers, started by the setup script if need be; else skip (or fail)."""
    if _engine_answers():
        return
    if not SETUP_SCRIPT.is_file():
        _unavailable(f"no Docker engine answers (docker info failed) and {SETUP_SCRIPT} "
                     "is not there to start one")
    try:
        setup = _run(["bash", str(SETUP_SCRIPT)], timeout_s=600, check=False)
    except subprocess.TimeoutExpired:
        _unavailable(f"no Docker engine answers and {SETUP_SCRIPT} timed out")
    if setup.returncode != 0 or not _engine_answers():
        _unavailable(f"no Docker engine answers and {SETUP_SCRIPT} could not start one "
                     f"(exit {setup.returncode}): {setup.stderr.strip()[-300:]}")


def _compose_command() -> list[str]:
    if _run(["docker", "compose", "version"], check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    _unavailable("neither `docker compose` nor `docker-compose` is installed")
    raise AssertionError("unreachable")


@dataclass
class ComposeCluster:
    """One compose project of the repo's docker-compose.yml, on its own ports and names."""

    compose: list[str]
    project: str
    image: str
    ports: dict[str, int]
    created: bool = False
    acked: dict[str, Any] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "RAFTKV_IMAGE": self.image,
            "RAFTKV_CONTAINER_PREFIX": self.project,
            "RAFTKV_CLUSTER_TOKEN": self.token,
            "COMPOSE_PROJECT_NAME": self.project,
        })
        for i, nid in enumerate(NODES, start=1):
            env[f"RAFTKV_HTTP_PORT_{i}"] = str(self.ports[nid])
        return env

    def compose_run(self, *args: str, timeout_s: float = 180.0,
                    check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([*self.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args],
                    timeout_s=timeout_s, env=self.env, check=check)

    def container(self, nid: str) -> str:
        return f"{self.project}-{nid}"

    def http(self, nid: str) -> str:
        return f"127.0.0.1:{self.ports[nid]}"

    # ------------------------------------------------------------------ lifecycle
    def up(self) -> None:
        self.created = True
        self.compose_run("up", "--detach", "--no-build")

    def down(self, *, volumes: bool = False) -> None:
        self.compose_run("down", *(["--volumes", "--remove-orphans"] if volumes else []))

    def destroy(self) -> None:
        """Remove the containers, the network and the volumes, whatever state they are in."""
        if not self.created:
            return
        self.compose_run("down", "--volumes", "--remove-orphans", "--timeout", "30",
                         check=False)
        leftovers = [self.container(n) for n in NODES]
        _run(["docker", "rm", "--force", "--volumes", *leftovers], check=False)
        volumes = [f"{self.project}_{n}-data" for n in NODES]
        _run(["docker", "volume", "rm", "--force", *volumes], check=False)
        _run(["docker", "network", "rm", f"{self.project}_raftkv"], check=False)

    def logs(self) -> str:
        try:
            out = self.compose_run("logs", "--no-color", "--tail", "200", check=False)
        except subprocess.TimeoutExpired:
            return "(compose logs timed out)"
        return out.stdout + out.stderr

    # ------------------------------------------------------------------ state
    def status(self, nid: str) -> dict[str, Any]:
        code, body, _ = http_json("GET", f"{self.http(nid)}/status", timeout_s=2.0)
        if code != 200 or not isinstance(body, dict):
            raise ValueError(f"{nid} /status answered {code}: {body}")  # retried by waits
        return body

    def wait_for_leader(self, among: tuple[str, ...] = NODES, *, not_: str | None = None,
                        timeout_s: float = 60.0) -> str:
        """The leader that every node in `among` agrees on (and that is not `not_`)."""
        def agreed() -> str | None:
            seen = {nid: self.status(nid) for nid in among}
            leaders = {st["leader"] for st in seen.values()}
            if len(leaders) != 1:
                return None
            leader = leaders.pop()
            if leader is None or leader == not_ or leader not in seen:
                return None
            return str(leader) if seen[leader]["role"] == "leader" else None

        return wait_until(agreed, timeout_s, f"a leader agreed on by {','.join(among)}",
                          interval_s=0.1)

    # ------------------------------------------------------------------ data
    def put(self, key: str, value: Any, nodes: tuple[str, ...], timeout_s: float = 60.0) -> int:
        """Write through the nodes in turn until one acknowledges; retries while a leader is
        being elected (the Idempotency-Key makes a retry apply once)."""
        first = sum(map(ord, key)) % len(nodes)
        order = nodes[first:] + nodes[:first]
        attempt = 0

        def once() -> int | None:
            nonlocal attempt
            nid = order[attempt % len(order)]
            attempt += 1
            try:
                code, body, _ = http_json("PUT", f"{self.http(nid)}/keys/{key}",
                                          {"value": value}, timeout_s=10.0,
                                          headers={"Idempotency-Key": f"put-{key}"})
            except OSError:
                return None
            if code == 200:
                assert body["value"] == value, body
                return int(body["index"])
            assert code in (503, 504), (nid, code, body)
            return None

        index = wait_until(once, timeout_s, f"the write of {key}", interval_s=0.05)
        self.acked[key] = value
        return index

    def put_many(self, items: dict[str, Any], nodes: tuple[str, ...]) -> int:
        with ThreadPoolExecutor(max_workers=16) as pool:
            indexes = list(pool.map(lambda kv: self.put(kv[0], kv[1], nodes), items.items()))
        return max(indexes)

    def missing_or_wrong(self, nid: str, consistency: str) -> list[str]:
        def check(key: str) -> str | None:
            code, body, _ = http_json(
                "GET", f"{self.http(nid)}/keys/{key}?consistency={consistency}",
                timeout_s=10.0)
            if code == 200 and body["value"] == self.acked[key]:
                return None
            return f"{key}: {code} {body}"

        with ThreadPoolExecutor(max_workers=16) as pool:
            return [r for r in pool.map(check, list(self.acked)) if r is not None]


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[ComposeCluster]:
    _ensure_engine()
    compose = _compose_command()
    image = os.environ.get("RAFTKV_IMAGE", "raftkv:latest")
    if _run(["docker", "image", "inspect", image], check=False).returncode != 0:
        pytest.fail(f"the image {image} is not there: build it with `make image` "
                    "(`make test-docker` does)")
    ports = {nid: free_port() for nid in NODES}
    assert len(set(ports.values())) == len(NODES)
    c = ComposeCluster(compose, f"raftkv-test-{uuid.uuid4().hex[:8]}", image, ports)
    try:
        c.up()
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(c.logs())
        c.destroy()


def test_leader_stopped_and_restarted_then_whole_cluster_down_and_up_keeps_every_write(
        cluster: ComposeCluster) -> None:
    c = cluster
    t0 = time.monotonic()
    c.wait_for_leader()
    print(f"leader after {time.monotonic() - t0:.1f}s")
    t0 = time.monotonic()
    last = c.put_many({f"k{i:04d}": {"i": i, "s": f"value-{i}"} for i in range(KEYS)}, NODES)
    assert len(c.acked) == KEYS
    print(f"{KEYS} writes in {time.monotonic() - t0:.1f}s, last index {last}")

    # docker stop: SIGTERM through the init; the leader hands over and exits at once, cleanly.
    old = c.wait_for_leader()
    started = time.monotonic()
    _run(["docker", "stop", c.container(old)], timeout_s=60)
    stop_s = time.monotonic() - started
    state = _run(["docker", "inspect", "--format", "{{.State.ExitCode}}",
                  c.container(old)]).stdout.strip()
    assert state == "0", f"{old} exited with {state} on docker stop"
    assert stop_s < 10, f"docker stop of the leader took {stop_s:.1f}s"
    logs = _run(["docker", "logs", c.container(old)])
    old_log = logs.stdout + logs.stderr
    assert f"event=leadership_handed_over node={old}" in old_log, old_log[-2000:]
    assert f"event=node_stopped node={old}" in old_log, old_log[-2000:]

    others = tuple(n for n in NODES if n != old)
    new = c.wait_for_leader(others, not_=old, timeout_s=30)
    assert new != old
    print(f"docker stop {old} (the leader) took {stop_s:.2f}s; new leader {new} after "
          f"{time.monotonic() - started:.2f}s")
    last = max(last, c.put_many(
        {f"f{i:04d}": f"after-failover-{i}" for i in range(KEYS_AFTER_FAILOVER)}, others))

    # docker start: the old leader rejoins as a follower, catches up, serves every write.
    _run(["docker", "start", c.container(old)])

    def caught_up() -> bool:
        st = c.status(old)
        return bool(st["role"] == "follower" and st["applied_index"] >= last)

    wait_until(caught_up, 60, f"{old} to rejoin as a follower and apply up to {last}",
               interval_s=0.1)
    print(f"{old} back as a follower with every write after {time.monotonic() - started:.1f}s")
    assert c.missing_or_wrong(old, "stale") == []

    # The whole cluster down (containers and network gone, volumes kept) and up again.
    t0 = time.monotonic()
    c.down()
    print(f"compose down took {time.monotonic() - t0:.1f}s")
    c.up()
    leader = c.wait_for_leader()
    print(f"up again, leader {leader} after {time.monotonic() - t0:.1f}s")
    assert c.missing_or_wrong(leader, "linearizable") == []
