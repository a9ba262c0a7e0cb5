"""The nemesis: faults injected into a LocalCluster of real processes, on a seeded schedule.

Faults (FaultKind): kill -9 and restart (a random node, the leader); kill -9 of HTTP worker
processes (one or all of a node's: its Raft process restarts them); SIGSTOP/SIGCONT (a random
node, the leader, a majority); SIGTERM of the leader and restart; partitions of the peer (Raft)
traffic only (the leader isolated from the majority, a majority/minority split, a one-way cut);
a whole-cluster crash and cold restart; a member (maybe the leader) removed and re-added with
an empty data dir (through join); a leadership transfer. One fault at a time; every fault is
healed before the next one starts and before the nemesis returns.

Partitions use firewall rules in a table (nftables) or chain (iptables) of our own, named
after this process's pid (raftkv_faults_<pid>_<n>, RAFTKV_FAULTS_<pid>_<n>), that only ever
match the source IP, destination IP and raft port of the cluster's nodes (each node has its
own loopback address, see raftkv.localcluster). The table is removed by close(), by an
atexit hook, and, if this process was killed, by the next run (stale tables whose pid is
gone). No other rule is touched. When neither nft nor iptables works here, `open_firewall`
says why and the partition faults are skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import http.client
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from raftkv.localcluster import LocalCluster, NodeProc, http_json

__all__ = [
    "MIXES",
    "PARTITION_FAULTS",
    "FaultKind",
    "Firewall",
    "Nemesis",
    "NemesisEvent",
    "PeerEndpoint",
    "open_firewall",
]

FIREWALL_ENV = "RAFTKV_FAULTS_FIREWALL"
"""auto (default: nftables, else iptables), nftables, iptables or none."""
NFT_TABLE_PREFIX = "raftkv_faults_"
IPTABLES_CHAIN_PREFIX = "RAFTKV_FAULTS_"
FIREWALL_COMMAND_TIMEOUT_S = 10.0
RECOVERY_TIMEOUT_S = 30.0
REJOIN_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 1.0


class FaultKind(enum.Enum):
    KILL = "kill"
    KILL_LEADER = "kill_leader"
    PAUSE = "pause"
    PAUSE_LEADER = "pause_leader"
    PAUSE_MAJORITY = "pause_majority"
    TERMINATE_LEADER = "terminate_leader"
    PARTITION_LEADER = "partition_leader"
    PARTITION_SPLIT = "partition_split"
    PARTITION_ONE_WAY = "partition_one_way"
    CRASH_ALL = "crash_all"
    MEMBER_REPLACE = "member_replace"
    TRANSFER_LEADER = "transfer_leader"
    KILL_WORKERS = "kill_workers"


PARTITION_FAULTS = frozenset(
    {FaultKind.PARTITION_LEADER, FaultKind.PARTITION_SPLIT, FaultKind.PARTITION_ONE_WAY})

MIXES: dict[str, tuple[FaultKind, ...]] = {
    "kills": (FaultKind.KILL, FaultKind.KILL_LEADER, FaultKind.TERMINATE_LEADER,
              FaultKind.KILL_WORKERS),
    "pauses": (FaultKind.PAUSE, FaultKind.PAUSE_LEADER, FaultKind.PAUSE_MAJORITY,
               FaultKind.TRANSFER_LEADER),
    "partitions": (FaultKind.PARTITION_LEADER, FaultKind.PARTITION_SPLIT,
                   FaultKind.PARTITION_ONE_WAY),
    "restarts": (FaultKind.CRASH_ALL, FaultKind.MEMBER_REPLACE, FaultKind.TRANSFER_LEADER,
                 FaultKind.KILL_LEADER, FaultKind.KILL_WORKERS),
    "all": tuple(FaultKind),
}


# =========================================================================== firewall
@dataclass(frozen=True, slots=True)
class PeerEndpoint:
    node_id: str
    ip: str
    raft_port: int


class Firewall(Protocol):
    backend: str

    def block(self, src: PeerEndpoint, dst: PeerEndpoint) -> None:
        """Drop the peer traffic src sends to dst (src's connections to dst's raft port)."""
        ...

    def heal(self) -> None:
        """Remove every rule added by block()."""
        ...

    def close(self) -> None:
        """Remove the table/chain itself; idempotent."""
        ...


class FirewallError(Exception):
    pass


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                              timeout=FIREWALL_COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FirewallError(f"{argv[0]}: {e}") from None
    if done.returncode != 0:
        raise FirewallError(f"{' '.join(argv)} failed ({done.returncode}): "
                            f"{(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout


_instances = itertools.count(1)
"""Tells apart the tables/chains of firewalls opened by one process."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NftFirewall:
    """Rules in `table inet raftkv_faults_<pid>`, chain `output` (loopback packets are all
    locally generated, so the output hook sees each of them once)."""

    backend = "nftables"

    def __init__(self) -> None:
        self.table = f"{NFT_TABLE_PREFIX}{os.getpid()}_{next(_instances)}"
        self._lock = threading.Lock()
        self._closed = False
        remove_stale_nft_tables()
        _run(["nft", "-f", "-"], stdin=(
            f"add table inet {self.table}\n"
            f"add chain inet {self.table} output "
            "{ type filter hook output priority 0 ; policy accept ; }\n"))
        atexit.register(self.close)

    def block(self, src: PeerEndpoint, dst: PeerEndpoint) -> None:
        with self._lock:
            _run(["nft", "add", "rule", "inet", self.table, "output", "ip", "saddr", src.ip,
                  "ip", "daddr", dst.ip, "tcp", "dport", str(dst.raft_port), "drop"])

    def heal(self) -> None:
        with self._lock:
            if not self._closed:
                _run(["nft", "flush", "chain", "inet", self.table, "output"])

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                _run(["nft", "delete", "table", "inet", self.table])
            except FirewallError:
                if self.table in _run(["nft", "list", "tables"]):
                    raise


def remove_stale_nft_tables() -> list[str]:
    """Delete raftkv_faults_<pid> tables whose process is gone (a run that was killed)."""
    removed = []
    for m in re.finditer(rf"^table inet ({NFT_TABLE_PREFIX}(\d+)_\d+)$",
                         _run(["nft", "list", "tables"]), re.MULTILINE):
        if not _pid_alive(int(m.group(2))):
            _run(["nft", "delete", "table", "inet", m.group(1)])
            removed.append(m.group(1))
    return removed


class IptablesFirewall:
    """Rules in chain RAFTKV_FAULTS_<pid> of the filter table, jumped to from OUTPUT."""

    backend = "iptables"

    def __init__(self) -> None:
        self.chain = f"{IPTABLES_CHAIN_PREFIX}{os.getpid()}_{next(_instances)}"
        self._lock = threading.Lock()
        self._closed = False
        remove_stale_iptables_chains()
        _run(["iptables", "-w", "-N", self.chain])
        try:
            _run(["iptables", "-w", "-I", "OUTPUT", "-j", self.chain])
        except FirewallError:
            _run(["iptables", "-w", "-X", self.chain])
            raise
        atexit.register(self.close)

    def block(self, src: PeerEndpoint, dst: PeerEndpoint) -> None:
        with self._lock:
            _run(["iptables", "-w", "-A", self.chain, "-s", f"{src.ip}/32", "-d",
                  f"{dst.ip}/32", "-p", "tcp", "--dport", str(dst.raft_port), "-j", "DROP"])

    def heal(self) -> None:
        with self._lock:
            if not self._closed:
                _run(["iptables", "-w", "-F", self.chain])

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _remove_iptables_chain(self.chain)


def _remove_iptables_chain(chain: str) -> None:
    while True:
        try:
            _run(["iptables", "-w", "-D", "OUTPUT", "-j", chain])
        except FirewallError:
            break  # no (more) jump to it
    _run(["iptables", "-w", "-F", chain])
    _run(["iptables", "-w", "-X", chain])


def remove_stale_iptables_chains() -> list[str]:
    removed = []
    for m in re.finditer(rf"^-N ({IPTABLES_CHAIN_PREFIX}(\d+)_\d+)$",
                         _run(["iptables", "-w", "-S"]), re.MULTILINE):
        if not _pid_alive(int(m.group(2))):
            _remove_iptables_chain(m.group(1))
            removed.append(m.group(1))
    return removed


def open_firewall(preference: str | None = None) -> tuple[Firewall | None, str]:
    """(a working firewall, "") or (None, why partitions cannot run here)."""
    choice = (preference or os.environ.get(FIREWALL_ENV) or "auto").lower()
    if choice == "none":
        return None, f"partitions disabled by {FIREWALL_ENV}=none"
    if choice not in ("auto", "nftables", "iptables"):
        return None, f"{FIREWALL_ENV}={choice!r}: expected auto, nftables, iptables or none"
    reasons = []
    makers: list[tuple[str, str, Callable[[], Firewall]]] = [
        ("nftables", "nft", NftFirewall), ("iptables", "iptables", IptablesFirewall)]
    for name, tool, make in makers:
        if choice not in ("auto", name):
            continue
        if shutil.which(tool) is None:
            reasons.append(f"{tool} is not installed")
            continue
        try:
            return make(), ""
        except FirewallError as e:
            reasons.append(f"{tool} does not work here: {e}")
    return None, ("partition faults skipped: " + "; ".join(reasons)
                  + " (install with: apt-get install -y --no-install-recommends nftables "
                  "iptables; needs root)")


# =========================================================================== the nemesis
@dataclass(frozen=True, slots=True)
class NemesisEvent:
    time_s: float
    fault: str
    phase: str
    """start, removed, heal, rejoined, skip, recovered, recovery_timeout, node_exited, error"""
    detail: str


class Nemesis:
    """Runs faults from `mix` until `until_s` (on `clock`), drawing every choice from `rng`."""

    def __init__(self, cluster: LocalCluster, rng: random.Random, mix: Sequence[FaultKind],
                 firewall: Firewall | None, clock: Callable[[], float],
                 stop: threading.Event, *, min_fault_s: float = 1.0,
                 max_fault_s: float = 4.0, min_quiet_s: float = 0.5,
                 max_quiet_s: float = 2.0) -> None:
        self.cluster = cluster
        self.rng = rng
        self.firewall = firewall
        self.mix = tuple(k for k in mix if firewall is not None or k not in PARTITION_FAULTS)
        self.skipped = tuple(k for k in mix if k not in self.mix)
        self.clock = clock
        self.stop = stop
        self.min_fault_s, self.max_fault_s = min_fault_s, max_fault_s
        self.min_quiet_s, self.max_quiet_s = min_quiet_s, max_quiet_s
        self.events: list[NemesisEvent] = []
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self._paused: set[str] = set()
        self._joined: set[str] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ bookkeeping
    def note(self, fault: str, phase: str, detail: str = "") -> None:
        with self._lock:
            self.events.append(NemesisEvent(round(self.clock(), 4), fault, phase, detail))

    def _wait(self, seconds: float) -> None:
        """Let a fault (or a quiet spell) last; returns early when the run is stopped."""
        self.stop.wait(seconds)

    def _http(self, method: str, url: str, body: object | None = None,
              timeout_s: float = 2.0) -> tuple[int, Any]:
        """An operator's request (with the cluster's auth_headers); a 401 or 403 answer is an
        error of the run: the token was dropped or wrong."""
        code, answer, _ = http_json(method, url, body, timeout_s=timeout_s,
                                    headers=self.cluster.auth_headers)
        if code in (401, 403):
            self.errors.append(f"{method} {url} answered {code}: {answer}")
        return code, answer

    def _endpoint(self, node: NodeProc) -> PeerEndpoint:
        return PeerEndpoint(node.node_id, node.raft_host, node.raft_port)

    def leader(self) -> NodeProc | None:
        """The running, unpaused node that says it leads, with the highest term."""
        best: tuple[int, NodeProc] | None = None
        for n in self.cluster.nodes:
            if not n.running or n.node_id in self._paused:
                continue
            try:
                st = self.cluster.status(n, STATUS_TIMEOUT_S)
            except (OSError, ValueError, http.client.HTTPException):
                continue
            if st["role"] == "leader" and (best is None or st["term"] > best[0]):
                best = (int(st["term"]), n)
        return best[1] if best else None

    def _wait_for_leader(self, timeout_s: float) -> NodeProc | None:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.leader()
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    # ------------------------------------------------------------------ the schedule
    def run(self, until_s: float) -> None:
        """Faults until `until_s`; everything healed on return (also on an exception)."""
        try:
            while not self.stop.is_set() and self.mix:
                self._wait(self.rng.uniform(self.min_quiet_s, self.max_quiet_s))
                if self.stop.is_set() or self.clock() + self.min_fault_s >= until_s:
                    break
                kind = self.rng.choice(self.mix)
                duration = self.rng.uniform(self.min_fault_s, self.max_fault_s)
                duration = max(0.2, min(duration, until_s - self.clock()))
                self.inject(kind, duration)
        finally:
            self.heal_all()

    def inject(self, kind: FaultKind, duration_s: float) -> None:
        """One fault for about duration_s, then healed, then wait for a leader."""
        try:
            done = self._FAULTS[kind](self, duration_s)
        except Exception as e:  # a harness problem: record it, heal, carry on
            self.errors.append(f"{kind.value}: {type(e).__name__}: {e}")
            self.note(kind.value, "error", f"{type(e).__name__}: {e}")
            done = True
        finally:
            self.heal_all()
        if done:
            self.counts[kind.value] = self.counts.get(kind.value, 0) + 1
        self.check_processes()
        leader = self._wait_for_leader(RECOVERY_TIMEOUT_S)
        if leader is None:
            self.note(kind.value, "recovery_timeout", f"no leader after {RECOVERY_TIMEOUT_S}s")
        else:
            self.note(kind.value, "recovered", f"leader={leader.node_id}")

    def heal_all(self) -> None:
        """Resume paused nodes, restart stopped ones, remove every firewall rule."""
        if self.firewall is not None:
            self.firewall.heal()
        for n in self.cluster.nodes:
            if n.node_id in self._paused and n.running:
                self.cluster.resume(n)
            self._paused.discard(n.node_id)
            if not n.running and n.proc is None:
                self._start(n)

    def _start(self, node: NodeProc) -> None:
        """Start a stopped node. One whose disk was wiped joins through the leader, and so
        does, ever after, one that joined once (as an operator's command line for it would:
        a node restarted in the middle of its join must join again, not bootstrap)."""
        if node.data_dir.exists() and node.node_id not in self._joined:
            self.cluster.start(node)
            return
        self._joined.add(node.node_id)
        # The node asks this address (forwarded to the leader, retried for a minute) only if
        # its disk holds no finished join; otherwise it just starts.
        via = self.leader() or next(n for n in self.cluster.nodes if n is not node)
        self.cluster.start(node, join=via.http)

    def check_processes(self) -> None:
        """A node process that exited although no fault stopped it is an error."""
        for n in self.cluster.nodes:
            if n.proc is not None and n.proc.poll() is not None:
                rc = n.proc.returncode
                msg = f"{n.node_id} exited by itself with status {rc}; log tail:\n" \
                      f"{n.log_text()[-2000:]}"
                self.errors.append(msg)
                self.note("-", "node_exited", f"{n.node_id} rc={rc}")
                n.proc = None
                self._start(n)

    # ------------------------------------------------------------------ process faults
    def _stop_node(self, node: NodeProc) -> None:
        self.cluster.kill(node)
        node.proc = None  # stopped on purpose: heal_all restarts it

    def _kill(self, node: NodeProc | None, fault: str, duration_s: float) -> bool:
        if node is None:
            self.note(fault, "skip", "no leader")
            return False
        self.note(fault, "start", node.node_id)
        self._stop_node(node)
        self._wait(duration_s)
        self._start(node)
        self.note(fault, "heal", f"{node.node_id} restarted")
        return True

    def kill(self, duration_s: float) -> bool:
        return self._kill(self.rng.choice(self._live()), "kill", duration_s)

    def kill_leader(self, duration_s: float) -> bool:
        return self._kill(self.leader(), "kill_leader", duration_s)

    def terminate_leader(self, duration_s: float) -> bool:
        node = self.leader()
        if node is None:
            self.note("terminate_leader", "skip", "no leader")
            return False
        self.note("terminate_leader", "start", node.node_id)
        assert node.proc is not None
        try:
            rc = self.cluster.terminate(node)
        except subprocess.TimeoutExpired:
            self.errors.append(f"{node.node_id} did not stop within 15 s of SIGTERM")
            self.cluster.kill(node)
            rc = -9
        if rc != 0:
            self.errors.append(f"{node.node_id} exited with status {rc} on SIGTERM; log "
                               f"tail:\n{node.log_text()[-2000:]}")
        node.proc = None
        self._wait(duration_s)
        self._start(node)
        self.note("terminate_leader", "heal", f"{node.node_id} restarted rc={rc}")
        return True

    def kill_workers(self, duration_s: float) -> bool:
        """SIGKILL HTTP worker processes of a node (the leader half the time): one of them,
        or one time in three all of them. The node's Raft process restarts them by itself
        (the others serve meanwhile; with all dead, connections wait in the listen backlog);
        the clients of a dead worker see their connection closed: outcome unknown."""
        live = self._live()
        leader = self.leader()
        node = leader if leader is not None and self.rng.random() < 0.5 else (
            self.rng.choice(live) if live else None)
        pids = self.cluster.worker_pids(node) if node is not None else []
        if node is None or not pids:
            self.note("kill_workers", "skip", "no live node with workers")
            return False
        victims = pids if self.rng.random() < 1 / 3 else [self.rng.choice(pids)]
        self.note("kill_workers", "start", f"{node.node_id} workers {victims} of {pids}")
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait(duration_s)
        # Nothing to heal by hand: wait until the node has as many workers as before, none of
        # them a victim, and serves again.
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline and node.running:
            now = self.cluster.worker_pids(node)
            if len(now) == len(pids) and not set(now) & set(victims) and self._ready(node):
                self.note("kill_workers", "heal", f"{node.node_id} workers {now}")
                return True
            time.sleep(0.1)
        self.errors.append(f"{node.node_id}'s HTTP workers were not back {RECOVERY_TIMEOUT_S}s "
                           f"after {len(victims)} of them were killed")
        self.note("kill_workers", "recovery_timeout", node.node_id)
        return True

    def _ready(self, node: NodeProc) -> bool:
        try:
            return http_json("GET", f"{node.http}/ready", timeout_s=STATUS_TIMEOUT_S)[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def _pause(self, node: NodeProc | None, fault: str, duration_s: float) -> bool:
        if node is None:
            self.note(fault, "skip", "no leader")
            return False
        self.note(fault, "start", node.node_id)
        self._paused.add(node.node_id)
        self.cluster.pause(node)
        self._wait(duration_s)
        self.cluster.resume(node)
        self._paused.discard(node.node_id)
        self.note(fault, "heal", f"{node.node_id} resumed")
        return True

    def pause(self, duration_s: float) -> bool:
        return self._pause(self.rng.choice(self._live()), "pause", duration_s)

    def pause_leader(self, duration_s: float) -> bool:
        return self._pause(self.leader(), "pause_leader", duration_s)

    def pause_majority(self, duration_s: float) -> bool:
        """SIGSTOP a majority: nothing commits, writes in flight time out (504) and may still
        take effect once the nodes resume."""
        nodes = list(self.cluster.nodes)
        self.rng.shuffle(nodes)
        chosen = nodes[: len(nodes) // 2 + 1]
        self.note("pause_majority", "start", ",".join(n.node_id for n in chosen))
        for n in chosen:
            self._paused.add(n.node_id)
            self.cluster.pause(n)
        self._wait(duration_s)
        for n in chosen:
            self.cluster.resume(n)
            self._paused.discard(n.node_id)
        self.note("pause_majority", "heal", "resumed")
        return True

    def crash_all(self, duration_s: float) -> bool:
        nodes = list(self.cluster.nodes)
        self.rng.shuffle(nodes)
        self.note("crash_all", "start", ",".join(n.node_id for n in nodes))
        for n in nodes:
            self._stop_node(n)
        self._wait(min(duration_s, 1.0))
        for n in nodes:
            self._start(n)
        self.note("crash_all", "heal", "all restarted")
        return True

    def _live(self) -> list[NodeProc]:
        return [n for n in self.cluster.nodes if n.running and n.node_id not in self._paused]

    # ------------------------------------------------------------------ partitions
    def _cut(self, a: Sequence[NodeProc], b: Sequence[NodeProc], *, both: bool = True) -> None:
        assert self.firewall is not None
        for x in a:
            for y in b:
                self.firewall.block(self._endpoint(x), self._endpoint(y))
                if both:
                    self.firewall.block(self._endpoint(y), self._endpoint(x))

    def partition_leader(self, duration_s: float) -> bool:
        leader = self.leader()
        if leader is None:
            self.note("partition_leader", "skip", "no leader")
            return False
        others = [n for n in self.cluster.nodes if n is not leader]
        self._cut([leader], others)
        self.note("partition_leader", "start", f"{leader.node_id} | "
                  + ",".join(n.node_id for n in others))
        self._wait(duration_s)
        self.heal_all()
        self.note("partition_leader", "heal")
        return True

    def partition_split(self, duration_s: float) -> bool:
        nodes = list(self.cluster.nodes)
        self.rng.shuffle(nodes)
        size = self.rng.randint(1, (len(nodes) - 1) // 2)
        minority, majority = nodes[:size], nodes[size:]
        self._cut(minority, majority)
        self.note("partition_split", "start", ",".join(n.node_id for n in minority) + " | "
                  + ",".join(n.node_id for n in majority))
        self._wait(duration_s)
        self.heal_all()
        self.note("partition_split", "heal")
        return True

    def partition_one_way(self, duration_s: float) -> bool:
        leader = self.leader()
        if leader is None:
            self.note("partition_one_way", "skip", "no leader")
            return False
        others = [n for n in self.cluster.nodes if n is not leader]
        if self.rng.random() < 0.5:
            self._cut([leader], others, both=False)
            what = f"{leader.node_id} -/-> " + ",".join(n.node_id for n in others)
        else:
            self._cut(others, [leader], both=False)
            what = ",".join(n.node_id for n in others) + f" -/-> {leader.node_id}"
        self.note("partition_one_way", "start", what)
        self._wait(duration_s)
        self.heal_all()
        self.note("partition_one_way", "heal")
        return True

    # ------------------------------------------------------------------ cluster operations
    def transfer_leader(self, duration_s: float) -> bool:
        leader = self.leader()
        if leader is None:
            self.note("transfer_leader", "skip", "no leader")
            return False
        others = [n for n in self.cluster.nodes if n is not leader]
        target = self.rng.choice([None, *others])
        body = None if target is None else {"id": target.node_id}
        self.note("transfer_leader", "start",
                  f"{leader.node_id} -> {target.node_id if target else 'auto'}")
        try:
            code, answer = self._http("POST", f"{leader.http}/cluster/leader?timeout=3", body,
                                      timeout_s=6)
            detail = f"{code} {answer}"
        except (OSError, http.client.HTTPException) as e:
            detail = f"error {e}"
        self.note("transfer_leader", "heal", detail)
        del duration_s
        return True

    def member_replace(self, duration_s: float) -> bool:
        """Remove a member (a follower, or the leader itself one time in three), kill it,
        wipe its disk, and let it join again, empty, under the same name."""
        leader = self.leader()
        if leader is None:
            self.note("member_replace", "skip", "no leader")
            return False
        followers = [n for n in self._live() if n is not leader]
        if not followers:
            self.note("member_replace", "skip", "no live follower")
            return False
        victim = leader if self.rng.random() < 1 / 3 else self.rng.choice(followers)
        self.note("member_replace", "start", f"remove {victim.node_id} via {leader.node_id}")
        try:
            code, answer = self._http(
                "DELETE", f"{leader.http}/cluster/members/{victim.node_id}?timeout=5",
                timeout_s=10)
        except (OSError, http.client.HTTPException) as e:
            code, answer = 0, str(e)
        if code != 200:
            # 504: the removal may or may not have committed. Ask the (maybe new) leader.
            deadline = time.monotonic() + RECOVERY_TIMEOUT_S
            member = self._is_member(victim.node_id)
            while member is None and time.monotonic() < deadline:
                time.sleep(0.1)
                member = self._is_member(victim.node_id)
            if member is None:
                self.errors.append(f"removal of {victim.node_id} answered {code} {answer} and "
                                   "no leader said whether it is still a member")
                return True
            if member:
                self.note("member_replace", "skip",
                          f"removal answered {code} {answer}; still a member")
                return False
        # The removed node keeps running (and its clients keep asking it) for a while: it may
        # not even know it was removed.
        self.note("member_replace", "removed", f"{victim.node_id}: {code}")
        self._wait(self.rng.uniform(0, duration_s))
        self._stop_node(victim)
        self.cluster.wipe(victim)
        self._wait(min(duration_s, 1.0))
        self._start(victim)
        self.note("member_replace", "heal", f"{victim.node_id} joining with an empty disk")
        if self.rng.random() < 1 / 3:  # a crash in the middle of the join
            self._wait(self.rng.uniform(0, 1.5))
            self._stop_node(victim)
            self.note("member_replace", "kill", f"{victim.node_id} killed while joining")
            self._start(victim)
        deadline = time.monotonic() + REJOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._is_voter(victim.node_id):
                self.note("member_replace", "rejoined", f"{victim.node_id} is a voter again")
                return True
            time.sleep(0.2)
        self.errors.append(f"{victim.node_id} was not a voter again {REJOIN_TIMEOUT_S}s after "
                           "it joined")
        self.note("member_replace", "recovery_timeout", f"{victim.node_id} not a voter")
        return True

    def _members(self) -> list[dict[str, object]] | None:
        leader = self.leader()
        if leader is None:
            return None
        try:
            code, body = self._http("GET", f"{leader.http}/cluster", timeout_s=2)
        except (OSError, http.client.HTTPException):
            return None
        if code != 200 or not isinstance(body, dict):
            return None
        members = body.get("members")
        return members if isinstance(members, list) else None

    def _is_member(self, node_id: str) -> bool | None:
        members = self._members()
        if members is None:
            return None
        return any(m.get("id") == node_id for m in members)

    def _is_voter(self, node_id: str) -> bool:
        members = self._members() or []
        return any(m.get("id") == node_id and m.get("voter") is True for m in members)

    _FAULTS: dict[FaultKind, Callable[[Nemesis, float], bool]] = {
        FaultKind.KILL: kill,
        FaultKind.KILL_LEADER: kill_leader,
        FaultKind.PAUSE: pause,
        FaultKind.PAUSE_LEADER: pause_leader,
        FaultKind.PAUSE_MAJORITY: pause_majority,
        FaultKind.TERMINATE_LEADER: terminate_leader,
        FaultKind.PARTITION_LEADER: partition_leader,
        FaultKind.PARTITION_SPLIT: partition_split,
        FaultKind.PARTITION_ONE_WAY: partition_one_way,
        FaultKind.CRASH_ALL: crash_all,
        FaultKind.MEMBER_REPLACE: member_replace,
        FaultKind.TRANSFER_LEADER: transfer_leader,
        FaultKind.KILL_WORKERS: kill_workers,
    }
