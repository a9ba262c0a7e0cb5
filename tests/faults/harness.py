"""One fault-injection run: a cluster of real processes, concurrent clients, a nemesis, checks.

    result = run_faults(RunConfig(seed=7, nodes=3, seconds=30, mix="all"), work_dir)

Clients are threads, each bound to one node, on a small key space: linearizable reads,
writes of unique values and deletes, each write with an Idempotency-Key and some retried
with the same key. Every logical operation is recorded with its invocation and completion
times (monotonic seconds since the load started) and an outcome:

  OK       the answer says it happened (200; a read's 404 key_not_found means "absent");
  FAILED   it surely had no effect: 503 (no leader), a 4xx refusal, or the connection was
           refused before anything was sent;
  UNKNOWN  it may have happened: a timeout, a connection lost after sending, 504.

Some writes are atomic /batch puts to 2-3 keys: one request, recorded per key as a write
with the batch's interval and outcome (per key, a linearizable multi-key history is a
linearizable register history). A write retried with the same Idempotency-Key (half of the
retries go to another node) is ONE logical operation from the first invocation to the last
answer (the store promises to apply it at most once): OK if any attempt was OK, else UNKNOWN
if any attempt was unknown, else FAILED.

At the end of a register run, with every fault healed: convergence (every node is a voter,
applies the same index and holds the same data, read with stale reads), final linearizable
reads of every key, the linearizability checker over the whole history (keys independently),
durability (every acknowledged write is still there or was overwritten by a write that may
follow it), index consistency (a value is reported at one raft index only), no 5xx other
than 503/504, and enough progress that the checks mean something.

With `workload="locks"` (RunConfig.workload) the clients are lock workers instead
(tests/support/lock_workload.py): each contends for one lock through raftkv.coordination
(`client.lock(name, ttl)`), and while it holds it writes its fencing token to a guarded key
with a compare-and-swap, refusing to write over a higher token. The history (lock holds with
their fencing tokens and wall times, every read and write of the guarded key) is checked for
mutual exclusion: unique tokens increasing with real time, no overlap of the intervals in
which two holders believed they held the lock, and fencing along the key's raft indices
(no lower token accepted after a higher one); plus convergence, a linearizable guarded key,
every lease gone after its holder stopped, and enough holds to mean something.

With `secure=True` (RunConfig.secure, `--secure`) the cluster runs the way a secured
deployment does: peer mutual TLS (certificates made by raftkv.certs, as `raftkv certs init`
does) and auth on (bootstrapped with a root token). Every client and every request of the
harness and the nemesis carries the root token; the run first proves that the security is
really on (a request without a token answers 401 on every node, a plaintext peer connection
is refused), and any 401 or 403 answered during the run is a problem: a dropped or wrong
token fails the run loudly instead of passing as "the node refused".
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raftkv.client import Client as KVClient
from raftkv.client import ClientError
from raftkv.coordination import LOCK_PREFIX
from raftkv.localcluster import (
    FAST_TIMING,
    ClusterError,
    LocalCluster,
    NodeProc,
    http_json,
    wait_until,
)
from raftkv.runtime.transport.probe import ProbeFailed, probe
from tests.faults.nemesis import (
    MIXES,
    PARTITION_FAULTS,
    Firewall,
    Nemesis,
    NemesisEvent,
    open_firewall,
)
from tests.support.linearizability import (
    CheckResult,
    Operation,
    Outcome,
    check_history,
    format_violation,
)
from tests.support.lock_workload import (
    GuardedOp,
    LockConfig,
    LockHold,
    LockRecorder,
    LockViolation,
    LockWorker,
    check_locks,
    final_guarded_read,
    lock_stats,
)

AUTH_STATUSES = (401, 403)
"""Answers that mean the token was dropped, wrong or too weak: never expected in a run."""

__all__ = [
    "NemesisEvent",
    "Record",
    "RunConfig",
    "RunResult",
    "check_convergence",
    "check_durability",
    "check_indexes",
    "format_report",
    "format_violation",
    "run_faults",
    "write_results",
]

NODE_ENV = {
    "RAFTKV_TICK_MS": "20",
    "RAFTKV_ELECTION_TICKS": "15",
    "RAFTKV_HEARTBEAT_TICKS": "2",
    # Small snapshots: restarted and re-added nodes catch up by InstallSnapshot too.
    "RAFTKV_SNAPSHOT_ENTRIES": "400",
    "RAFTKV_SNAPSHOT_TRAILING": "100",
    "RAFTKV_LOG_LEVEL": "INFO",
}
WORKLOADS = ("register", "locks")
"""register: reads, writes, deletes and batches on a few keys, checked for linearizability;
locks: workers contending for one lock (raftkv.coordination), checked for mutual exclusion
with fencing tokens (tests/support/lock_workload.py)."""
STARTUP_TIMEOUT_S = 60.0
CONVERGENCE_TIMEOUT_S = 90.0
CLIENT_JOIN_TIMEOUT_S = 30.0
MIN_OK_WRITES = 20
MIN_OK_READS = 20
LIST_LIMIT = 10_000
FAILED_BACKOFF_S = (0.02, 0.15)
MIN_LOCK_HOLDS = 5
MIN_FENCED_WRITES = 5


# =========================================================================== configuration
@dataclass(frozen=True, slots=True)
class RunConfig:
    seed: int
    nodes: int = 3
    seconds: float = 30.0
    mix: str = "all"
    clients_per_node: int = 2
    keys: int = 5
    read_fraction: float = 0.45
    delete_fraction: float = 0.08
    batch_fraction: float = 0.05
    """Atomic /batch puts to 2-3 keys (each key's part checked as a write)."""
    retry_probability: float = 0.5
    max_retries: int = 2
    server_timeout_s: float = 2.0
    """?timeout= of every request: how long a node waits for a commit or a read barrier."""
    client_timeout_s: float = 5.0
    """Socket timeout of the clients (longer than server_timeout_s)."""
    tail_s: float = 2.0
    """Load keeps running this long after the last fault was healed."""
    min_fault_s: float = 1.0
    max_fault_s: float = 4.0
    workload: str = "register"
    """One of WORKLOADS."""
    lock_ttl_s: int = 2
    """The locks workload: the lock's lease TTL (a fault longer than about 2/3 of it makes
    the holder lose the lock)."""
    secure: bool = False
    """Peer mutual TLS and auth on (a root token every request carries); see the module
    doc."""

    def __post_init__(self) -> None:
        if self.nodes not in (3, 5):
            raise ValueError("nodes must be 3 or 5")
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}")
        if self.seconds <= 0 or self.keys < 1 or self.clients_per_node < 1:
            raise ValueError("seconds, keys and clients_per_node must be positive")


# =========================================================================== the history
@dataclass(slots=True)
class Record:
    """One logical client operation, as written to history.jsonl."""

    process: int
    node: str
    kind: str
    key: str
    value: object | None
    invoke: float
    complete: float | None
    outcome: str
    attempts: list[str] = field(default_factory=list)
    request_id: str | None = None
    index: int | None = None
    """The raft index the answer named (OK answers)."""

    def operation(self) -> Operation:
        return Operation(self.process, self.kind, self.key, self.value, self.invoke,
                         self.complete, Outcome(self.outcome))

    def to_json(self) -> dict[str, object]:
        return {"type": "op", **dataclasses.asdict(self)}


@dataclass(frozen=True, slots=True)
class _Attempt:
    outcome: Outcome
    status: int | None
    body: Any
    detail: str


def _attempt(node: NodeProc, method: str, path: str, body: object | None,
             headers: Mapping[str, str], timeout_s: float) -> _Attempt:
    """One HTTP request on a fresh connection, classified by what is surely known."""
    conn = http.client.HTTPConnection(node.http_host, node.http_port, timeout=timeout_s)
    try:
        try:
            conn.connect()
        except OSError as e:  # refused or no answer to the SYN: nothing was sent
            return _Attempt(Outcome.FAILED, None, None, f"connect:{type(e).__name__}")
        data = json.dumps(body).encode() if body is not None else None
        hdrs = dict(headers)
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as e:
            return _Attempt(Outcome.UNKNOWN, None, None, f"after_send:{type(e).__name__}")
    finally:
        conn.close()
    try:
        decoded = json.loads(payload) if payload else None
    except ValueError:
        decoded = None
    code = decoded.get("error", "") if isinstance(decoded, dict) else ""
    detail = f"{resp.status}{' ' + code if code else ''}"
    return _Attempt(Outcome.OK, resp.status, decoded, detail)


class AuthRefused(Exception):
    """A request of the harness was answered 401 or 403: its token was dropped or wrong.
    Never retried (wait_until stops at once on it)."""


def _refuse_auth(node: NodeProc, what: str, code: int, body: object) -> None:
    if code in AUTH_STATUSES:
        raise AuthRefused(f"{node.node_id} {what} answered {code}: {body}")


class Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[Record] = []
        self.internal_errors: list[str] = []
        self.anomalies: list[str] = []
        self.auth_refusals: list[str] = []

    def add(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def internal_error(self, text: str) -> None:
        with self._lock:
            self.internal_errors.append(text)

    def anomaly(self, text: str) -> None:
        with self._lock:
            self.anomalies.append(text)

    def auth_refusal(self, text: str) -> None:
        with self._lock:
            self.auth_refusals.append(text)


class Client(threading.Thread):
    """A closed-loop client bound to one node. `headers` go with every request (the
    `Authorization` of a secure run)."""

    def __init__(self, process: int, node: NodeProc, nodes: list[NodeProc], cfg: RunConfig,
                 rng: random.Random, keys: list[str], clock: Callable[[], float],
                 recorder: Recorder, stop: threading.Event, run_tag: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(name=f"client-{process}", daemon=True)
        self.process = process
        self.node = node
        self.nodes = nodes
        self.cfg = cfg
        self.rng = rng
        self.keys = keys
        self.clock = clock
        self.recorder = recorder
        self.stop_event = stop
        self.run_tag = run_tag
        self.headers = dict(headers or {})
        self._seq = 0

    def run(self) -> None:
        cfg = self.cfg
        while not self.stop_event.is_set():
            key = self.rng.choice(self.keys)
            r = self.rng.random()
            if r < cfg.read_fraction:
                outcome = self.read(key)
            elif r < cfg.read_fraction + cfg.delete_fraction:
                outcome = self.write(key, None)
            elif r < cfg.read_fraction + cfg.delete_fraction + cfg.batch_fraction:
                size = min(len(self.keys), self.rng.randint(2, 3))
                outcome = self.batch(self.rng.sample(self.keys, size))
            else:
                self._seq += 1
                outcome = self.write(key, f"p{self.process}-{self._seq}")
            if outcome == "failed":  # the node is down or has no leader: do not spin
                self.stop_event.wait(self.rng.uniform(*FAILED_BACKOFF_S))

    def read(self, key: str) -> str:
        path = f"/keys/{key}?timeout={self.cfg.server_timeout_s:g}"
        invoke = self.clock()
        a = _attempt(self.node, "GET", path, None, self.headers, self.cfg.client_timeout_s)
        complete = self.clock()
        rec = Record(self.process, self.node.node_id, "read", key, None, invoke, None,
                     Outcome.FAILED.value, [a.detail])
        if a.outcome is Outcome.OK and a.status == 200 and isinstance(a.body, dict):
            rec.value, rec.complete, rec.outcome = a.body.get("value"), complete, "ok"
            rec.index = a.body.get("index")
        elif (a.outcome is Outcome.OK and a.status == 404 and isinstance(a.body, dict)
              and a.body.get("error") == "key_not_found"):
            rec.complete, rec.outcome = complete, "ok"
        else:
            rec.complete = complete  # a failed read carries no information
            self._check_status(a, f"read {key}")
        self.recorder.add(rec)
        return rec.outcome

    def write(self, key: str, value: str | None) -> str:
        """A put of `value`, or a delete when value is None; maybe retried (same id)."""
        kind = "write" if value is not None else "delete"
        body = {"value": value} if value is not None else None

        def ok_body(answer: dict[str, Any]) -> bool:
            return isinstance(answer.get("index"), int) and (
                value is None or answer.get("value") == value)

        invoke, outcome, complete, attempts, rid, answer = self._submit(
            "PUT" if value is not None else "DELETE", f"/keys/{key}", body, ok_body,
            f"{kind} {key}={value!r}")
        self.recorder.add(Record(self.process, self.node.node_id, kind, key, value, invoke,
                                 complete, outcome, attempts, rid,
                                 answer.get("index") if answer else None))
        return outcome

    def batch(self, keys: list[str]) -> str:
        """One atomic /batch of puts to several keys: per key, a write at the same moment."""
        values = {}
        for key in keys:
            self._seq += 1
            values[key] = f"p{self.process}-{self._seq}"
        ops = [{"op": "put", "key": k, "value": v} for k, v in values.items()]

        def ok_body(answer: dict[str, Any]) -> bool:
            results = answer.get("results")
            return (isinstance(answer.get("index"), int) and isinstance(results, list)
                    and [(r.get("key"), r.get("value")) for r in results]
                    == list(values.items()))

        invoke, outcome, complete, attempts, rid, answer = self._submit(
            "POST", "/batch", {"ops": ops}, ok_body, f"batch {values}")
        for i, (key, value) in enumerate(values.items()):
            index = answer["results"][i].get("index") if answer else None
            self.recorder.add(Record(self.process, self.node.node_id, "write", key, value,
                                     invoke, complete, outcome, attempts, rid, index))
        return outcome

    def _submit(self, method: str, path: str, body: object | None,
                ok_body: Callable[[dict[str, Any]], bool], what: str,
                ) -> tuple[float, str, float | None, list[str], str, dict[str, Any] | None]:
        """Send a write, retrying some failed or unknown attempts with the same
        Idempotency-Key, to this client's node or (half the time) another one.
        (invoke, outcome, complete, attempts, request id, the OK answer)."""
        cfg = self.cfg
        self._seq += 1
        request_id = f"{self.run_tag}-p{self.process}-{self._seq}"
        full_path = f"{path}?timeout={cfg.server_timeout_s:g}"
        invoke = self.clock()
        attempts: list[str] = []
        unknown = False
        node = self.node
        while True:
            a = _attempt(node, method, full_path, body,
                         {**self.headers, "Idempotency-Key": request_id},
                         cfg.client_timeout_s)
            now = self.clock()
            attempts.append(f"{node.node_id}:{a.detail}")
            outcome = self._classify_write(a, ok_body, what)
            if outcome is Outcome.OK:
                assert isinstance(a.body, dict)
                return invoke, "ok", now, attempts, request_id, a.body
            unknown = unknown or outcome is Outcome.UNKNOWN
            retryable = outcome is Outcome.UNKNOWN or a.status == 503
            if (not retryable or len(attempts) > cfg.max_retries
                    or self.stop_event.is_set() or self.rng.random() >= cfg.retry_probability):
                if unknown:
                    return invoke, "unknown", None, attempts, request_id, None
                return invoke, "failed", now, attempts, request_id, None
            self.stop_event.wait(self.rng.uniform(*FAILED_BACKOFF_S))
            if self.rng.random() < 0.5:
                node = self.rng.choice(self.nodes)

    def _classify_write(self, a: _Attempt, ok_body: Callable[[dict[str, Any]], bool],
                        what: str) -> Outcome:
        if a.outcome is not Outcome.OK:
            return a.outcome
        status = a.status
        if status == 200:
            if not isinstance(a.body, dict) or not ok_body(a.body):
                self.recorder.anomaly(f"p{self.process} {what}: odd 200 body {a.body!r}")
                return Outcome.UNKNOWN
            return Outcome.OK
        self._check_status(a, what)
        if status == 503 or status in (400, 404, 409, 413, 415, *AUTH_STATUSES):
            return Outcome.FAILED
        return Outcome.UNKNOWN  # 504 commit_timeout, 507, and anything unexpected

    def _check_status(self, a: _Attempt, what: str) -> None:
        if a.status in AUTH_STATUSES:
            self.recorder.auth_refusal(f"p{self.process} on {self.node.node_id} {what}: "
                                       f"{a.status} {a.body!r}")
        if a.status is not None and a.status >= 500 and a.status not in (503, 504):
            self.recorder.internal_error(f"p{self.process} on {self.node.node_id} {what}: "
                                         f"{a.status} {a.body!r}")


# =========================================================================== checks
@dataclass(slots=True)
class Convergence:
    ok: bool
    applied_index: int | None
    states: dict[str, dict[str, tuple[object, int]]]
    problems: list[str]


def _node_state(node: NodeProc, keys: list[str], headers: Mapping[str, str],
                ) -> tuple[int, dict[str, tuple[object, int]]]:
    """(applied index, key -> (value, index)) read with stale reads on this node (a listing
    of every key, then one GET per test key, which must agree), retried until the applied
    index did not move across the reads."""
    for _ in range(20):
        before = _status(node, headers)["applied_index"]
        code, body, _ = http_json("GET", f"{node.http}/keys?consistency=stale&limit="
                                  f"{LIST_LIMIT}", timeout_s=10, headers=headers)
        _refuse_auth(node, "list", code, body)
        if code != 200 or not isinstance(body, dict):
            raise ValueError(f"{node.node_id} list answered {code}: {body}")
        listed = {kv["key"]: (kv["value"], kv["index"]) for kv in body["keys"]}
        single: dict[str, tuple[object, int]] = {}
        for key in keys:
            code, got, _ = http_json("GET", f"{node.http}/keys/{key}?consistency=stale",
                                     timeout_s=10, headers=headers)
            _refuse_auth(node, f"stale read of {key}", code, got)
            if code == 200 and isinstance(got, dict):
                single[key] = (got["value"], got["index"])
            elif code != 404:
                raise ValueError(f"{node.node_id} stale read of {key} answered {code}: {got}")
        after = _status(node, headers)["applied_index"]
        if before == after:
            for key in keys:
                if listed.get(key) != single.get(key):
                    raise AssertionError(
                        f"{node.node_id} at index {after}: the listing has {key!r} = "
                        f"{listed.get(key)!r} but a stale GET gives {single.get(key)!r}")
            return int(after), listed
    raise ValueError(f"{node.node_id} kept applying while being read")


def _status(node: NodeProc, headers: Mapping[str, str]) -> dict[str, Any]:
    code, body, _ = http_json("GET", f"{node.http}/status", timeout_s=3, headers=headers)
    _refuse_auth(node, "/status", code, body)
    if code != 200 or not isinstance(body, dict):
        raise ValueError(f"{node.node_id} /status answered {code}")
    return body


def check_convergence(cluster: LocalCluster, keys: list[str], timeout_s: float,
                      ) -> Convergence:
    """Wait until every node is a voter and applied the leader's commit index, then compare
    every node's data (stale reads) and applied index. Requests carry the cluster's
    auth_headers; a 401 or 403 ends the check at once, failed."""
    deadline = time.monotonic() + timeout_s
    last_problem = "no attempt"
    headers = cluster.auth_headers
    while time.monotonic() < deadline:
        try:
            statuses = {n.node_id: _status(n, headers) for n in cluster.nodes}
        except AuthRefused as e:
            return Convergence(False, None, {}, [f"auth refused: {e}"])
        except (OSError, ValueError, http.client.HTTPException) as e:
            last_problem = f"status: {e}"
            time.sleep(0.2)
            continue
        leaders = [s for s in statuses.values() if s["role"] == "leader"]
        if len(leaders) != 1:
            last_problem = f"{len(leaders)} nodes say they lead"
            time.sleep(0.2)
            continue
        leader = leaders[0]
        voters = {m["id"] for m in leader["members"] if m["voter"]}
        missing = {n.node_id for n in cluster.nodes} - voters
        applied = {nid: s["applied_index"] for nid, s in statuses.items()}
        if missing:
            last_problem = f"not voters: {sorted(missing)}"
        elif len(set(applied.values())) != 1 or leader["commit_index"] not in applied.values():
            last_problem = f"applied {applied}, leader commit {leader['commit_index']}"
        else:
            try:
                states = {n.node_id: _node_state(n, keys, headers) for n in cluster.nodes}
            except AssertionError as e:
                return Convergence(False, None, {}, [str(e)])
            except AuthRefused as e:
                return Convergence(False, None, {}, [f"auth refused: {e}"])
            except (OSError, ValueError, http.client.HTTPException) as e:
                last_problem = f"reading state: {e}"
                time.sleep(0.2)
                continue
            indexes = {nid: st[0] for nid, st in states.items()}
            if len(set(indexes.values())) != 1:
                last_problem = f"applied indexes moved: {indexes}"
                time.sleep(0.2)
                continue
            data = {nid: st[1] for nid, st in states.items()}
            first_id, first = next(iter(data.items()))
            problems = []
            for nid, d in data.items():
                for key in sorted(set(d) | set(first)):
                    if d.get(key) != first.get(key):
                        problems.append(f"nodes disagree on {key!r} at index "
                                        f"{indexes[nid]}: {first_id} has {first.get(key)!r}, "
                                        f"{nid} has {d.get(key)!r}")
            return Convergence(not problems, next(iter(indexes.values())), data, problems)
        time.sleep(0.2)
    return Convergence(False, None, {}, [f"no convergence in {timeout_s}s: {last_problem}"])


def check_durability(records: Iterable[Record], final: Mapping[str, object | None],
                     ) -> list[str]:
    """Every acknowledged write or delete is in the final state, or some write/delete that
    may have taken effect after it (not FAILED, not completed before it was invoked)
    explains the final value of its key."""
    by_key: dict[str, list[Record]] = {}
    for r in records:
        if r.kind != "read" and r.outcome != "failed" and r.process >= 0:
            by_key.setdefault(r.key, []).append(r)
    problems = []
    for key, ops in sorted(by_key.items()):
        value = final.get(key)
        for acked in (r for r in ops if r.outcome == "ok"):
            if acked.value == value:
                continue
            later = [r for r in ops if r is not acked and r.value == value
                     and (r.complete is None or r.complete > acked.invoke)]
            if not later:
                what = "absent" if value is None else repr(value)
                problems.append(
                    f"lost write: {key!r} is {what} at the end, but p{acked.process} "
                    f"{acked.kind} {acked.value!r} was acknowledged at "
                    f"{acked.complete:.3f}s (index {acked.index}) and no write of that final "
                    "value may have followed it")
    return problems


def check_indexes(records: Iterable[Record],
                  states: Mapping[str, Mapping[str, tuple[object, int]]]) -> list[str]:
    """Every answer that names a value also names the raft index of the one write that
    produced it: an acknowledged write, every read of its value and every node's final
    state must agree on that index. (A retried write applied twice would show its value at
    two indexes, which the register model alone cannot see inside the retry's interval.)"""
    seen: dict[tuple[str, str], dict[int, str]] = {}

    def note(key: str, value: object, index: object, who: str) -> None:
        if isinstance(value, str) and isinstance(index, int):
            seen.setdefault((key, value), {}).setdefault(index, who)

    for r in records:
        if r.outcome == "ok" and r.kind in ("write", "read"):
            note(r.key, r.value, r.index, f"p{r.process} {r.kind} on {r.node}")
    for nid, data in states.items():
        for key, (value, index) in data.items():
            note(key, value, index, f"final state of {nid}")
    return [f"value {value!r} of {key!r} is reported at several indexes: "
            + ", ".join(f"{i} ({who})" for i, who in sorted(found.items()))
            for (key, value), found in sorted(seen.items()) if len(found) > 1]


# =========================================================================== the run
@dataclass(slots=True)
class RunResult:
    config: RunConfig
    ok: bool
    problems: list[str]
    records: list[Record]
    events: list[NemesisEvent]
    check: CheckResult | None
    summary: dict[str, object]
    node_logs: dict[str, str]
    lock_holds: list[LockHold] = field(default_factory=list)
    """The locks workload's history (empty for the register workload)."""
    lock_ops: list[GuardedOp] = field(default_factory=list)
    lock_violations: list[LockViolation] = field(default_factory=list)


def run_faults(cfg: RunConfig, work_dir: Path,
               progress: Callable[[str], None] | None = None) -> RunResult:
    """One run; never raises for a failed check (see RunResult.ok and .problems)."""
    say = progress or (lambda _text: None)
    wall_start = time.monotonic()
    rng = random.Random(cfg.seed)
    needs_firewall = any(k in PARTITION_FAULTS for k in MIXES[cfg.mix])
    firewall: Firewall | None = None
    firewall_note = "not needed by this mix"
    if needs_firewall:
        firewall, firewall_note = open_firewall()
        if firewall is not None:
            firewall_note = firewall.backend
    (work_dir / "cluster").mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(work_dir / "cluster", cfg.nodes, env={**FAST_TIMING, **NODE_ENV},
                           token=hashlib.sha256(f"faults-{cfg.seed}".encode()).hexdigest(),
                           root_token=root_token_for(cfg) if cfg.secure else None)
    if cfg.secure:  # certificates for every node (and the nodes a run may add)
        cluster.use_peer_tls(work_dir / "certs")
    token = cluster.root_token
    recorder = Recorder()
    problems: list[str] = []
    check: CheckResult | None = None
    events: list[NemesisEvent] = []
    nemesis: Nemesis | None = None
    convergence: Convergence | None = None
    timings: dict[str, float] = {}
    final_state: dict[str, object | None] = {}
    locks = LockRecorder()
    lock_violations: list[LockViolation] = []
    lock_cfg = LockConfig(ttl_s=cfg.lock_ttl_s, client_timeout_s=cfg.server_timeout_s)
    try:
        cluster.start_all()
        cluster.wait_for_leader(timeout_s=STARTUP_TIMEOUT_S)
        for n in cluster.nodes:
            cluster.wait_for_ready(n, timeout_s=STARTUP_TIMEOUT_S)
        timings["startup_s"] = time.monotonic() - wall_start
        say(f"seed={cfg.seed} nodes={cfg.nodes} mix={cfg.mix}: cluster up "
            f"({timings['startup_s']:.1f}s), firewall: {firewall_note}"
            + (", peer TLS and auth on" if cfg.secure else ""))
        if cfg.secure:
            insecure = check_secured(cluster)
            problems.extend(f"security: {p}" for p in insecure)
            if insecure:
                raise ClusterError("the secure run's cluster is not secured")

        t0 = time.monotonic()

        def clock() -> float:
            return time.monotonic() - t0

        clients_stop = threading.Event()
        nemesis_stop = threading.Event()
        keys = [f"k{i}" for i in range(cfg.keys)]
        homes = [n for n in cluster.nodes for _ in range(cfg.clients_per_node)]
        clients: list[Client] | list[LockWorker]
        if cfg.workload == "locks":
            keys = [lock_cfg.guarded_key]
            clients = [
                LockWorker(i, _urls_from(cluster, node), lock_cfg,
                           random.Random(rng.getrandbits(64)), clock, locks, clients_stop,
                           token=token)
                for i, node in enumerate(homes)]
        else:
            clients = [
                Client(i, node, cluster.nodes, cfg, random.Random(rng.getrandbits(64)), keys,
                       clock, recorder, clients_stop, run_tag=f"s{cfg.seed}",
                       headers=cluster.auth_headers)
                for i, node in enumerate(homes)]
        nemesis = Nemesis(cluster, random.Random(rng.getrandbits(64)), MIXES[cfg.mix],
                          firewall, clock, nemesis_stop, min_fault_s=cfg.min_fault_s,
                          max_fault_s=cfg.max_fault_s)
        if nemesis.skipped:
            say(f"skipped faults: {[k.value for k in nemesis.skipped]}: {firewall_note}")
        for c in clients:
            c.start()
        nemesis_thread = threading.Thread(target=nemesis.run, args=(cfg.seconds,),
                                          name="nemesis", daemon=True)
        nemesis_thread.start()
        nemesis_thread.join(cfg.seconds + 120)
        if nemesis_thread.is_alive():
            nemesis_stop.set()
            nemesis_thread.join(60)
            problems.append("the nemesis did not finish in time")
        timings["nemesis_done_s"] = clock()
        clients_stop.wait(cfg.tail_s)  # load goes on over the healed cluster
        clients_stop.set()
        for c in clients:
            c.join(CLIENT_JOIN_TIMEOUT_S)
            if c.is_alive():
                problems.append(f"client {c.process} did not stop")
        timings["load_s"] = clock()
        problems.extend(f"nemesis: {e}" for e in nemesis.errors)
        done = (f"{len(locks.holds)} lock attempts, {len(locks.ops)} guarded operations"
                if cfg.workload == "locks" else f"{len(recorder.records)} operations")
        say(f"load done after {timings['load_s']:.1f}s: {done}, faults {nemesis.counts}")

        check_start = time.monotonic()
        convergence = check_convergence(cluster, keys, CONVERGENCE_TIMEOUT_S)
        problems.extend(f"convergence: {p}" for p in convergence.problems)
        if cfg.workload == "locks":
            lock_violations = _check_lock_run(cluster, lock_cfg, locks, clock, convergence,
                                              problems)
        else:
            check = _check_register_run(cluster, keys, clock, recorder, convergence,
                                        final_state, problems)
        if not nemesis.counts:
            problems.append("the nemesis injected no fault")
        timings["check_s"] = time.monotonic() - check_start
    except Exception as e:  # the harness itself failed: report it as a failed run
        problems.append(f"harness error: {type(e).__name__}: {e}")
        for n in cluster.nodes:
            if n.proc is not None and n.proc.poll() is not None:
                problems.append(f"{n.node_id} had exited with status {n.proc.returncode}: "
                                f"{n.log_text()[-1500:]}")
    finally:
        if nemesis is not None:
            events = list(nemesis.events)
        try:
            if firewall is not None:
                firewall.close()
        finally:
            cluster.close()
    timings["wall_s"] = time.monotonic() - wall_start
    node_logs = {n.node_id: n.log_text() for n in cluster.nodes}
    summary = _summary(cfg, recorder, nemesis, check, convergence, problems, timings,
                       firewall_note)
    if cfg.workload == "locks":
        summary["locks"] = lock_stats(locks.holds, locks.ops)
    return RunResult(cfg, not problems, problems, recorder.records, events, check, summary,
                     node_logs, list(locks.holds), list(locks.ops), lock_violations)


def root_token_for(cfg: RunConfig) -> str:
    """The root token of a secure run (from the seed: a replay uses the same one)."""
    return hashlib.sha256(f"faults-root-{cfg.seed}".encode()).hexdigest()


def check_secured(cluster: LocalCluster) -> list[str]:
    """What shows a secure run's cluster is NOT secured: a node that answers a request
    without a token with anything but 401, or a leader that accepts a plaintext peer
    connection (presenting the right cluster token and a member's name)."""
    problems = []
    for n in cluster.nodes:
        code, body, _ = http_json("GET", f"{n.http}/keys/k0", timeout_s=5)
        if code != 401:
            problems.append(f"{n.node_id} answered a request without a token {code}: {body}")
    leader = cluster.wait_for_leader(timeout_s=STARTUP_TIMEOUT_S)
    member = next(n for n in cluster.nodes if n is not leader)
    try:
        probe(leader.raft, token=cluster.token, node_id=member.node_id, cluster_id="",
              timeout_s=5)
    except ProbeFailed:
        pass
    else:
        problems.append(f"{leader.node_id} accepted a plaintext peer connection")
    return problems


def _auth_problems(refusals: list[str], shown: int = 5) -> list[str]:
    """One problem per refusal (at most `shown`), and the count of the rest."""
    out = [f"auth refused (the token was dropped or wrong): {r}" for r in refusals[:shown]]
    if len(refusals) > shown:
        out.append(f"auth refused: {len(refusals) - shown} more answers 401/403")
    return out


def _urls_from(cluster: LocalCluster, home: NodeProc) -> list[str]:
    """Every node's URL, the worker's home node first (its client tries it first)."""
    i = cluster.nodes.index(home)
    return [n.http for n in cluster.nodes[i:] + cluster.nodes[:i]]


def _check_register_run(cluster: LocalCluster, keys: list[str], clock: Callable[[], float],
                        recorder: Recorder, convergence: Convergence,
                        final_state: dict[str, object | None],
                        problems: list[str]) -> CheckResult:
    """The register workload's checks (see the module doc); the linearizability result."""
    final_records = _final_reads(cluster, keys, clock)
    for r in final_records:
        if any(a.split()[0] in map(str, AUTH_STATUSES) for a in r.attempts):
            recorder.auth_refusal(f"final read of {r.key!r}: {r.attempts}")
    for r in final_records:
        recorder.add(r)
        if r.outcome == "ok":
            final_state[r.key] = r.value
        else:
            problems.append(f"final read of {r.key!r} failed: {r.attempts}")
    if convergence.states:
        node_data = next(iter(convergence.states.values()))
        for key in keys:
            got = node_data.get(key)
            if final_state.get(key, "<unread>") != (got[0] if got else None):
                problems.append(f"final linearizable read of {key!r} gave "
                                f"{final_state.get(key)!r}, converged state has {got!r}")
    check = check_history(r.operation() for r in recorder.records)
    problems.extend(format_violation(v) for v in check.violations)
    if len(final_records) == len(keys) and all(r.outcome == "ok" for r in final_records):
        problems.extend(f"durability: {p}" for p in check_durability(recorder.records,
                                                                     final_state))
    problems.extend(check_indexes(recorder.records,
                                  convergence.states if convergence else {}))
    problems.extend(f"internal error answered: {e}" for e in recorder.internal_errors)
    problems.extend(f"client anomaly: {e}" for e in recorder.anomalies)
    problems.extend(_auth_problems(recorder.auth_refusals))
    ok_writes = sum(1 for r in recorder.records if r.kind == "write" and r.outcome == "ok")
    ok_reads = sum(1 for r in recorder.records
                   if r.kind == "read" and r.outcome == "ok" and r.process >= 0)
    if ok_writes < MIN_OK_WRITES or ok_reads < MIN_OK_READS:
        problems.append(f"too little progress to check anything: {ok_writes} acknowledged "
                        f"writes, {ok_reads} successful reads")
    return check


def _check_lock_run(cluster: LocalCluster, lock_cfg: LockConfig, locks: LockRecorder,
                    clock: Callable[[], float], convergence: Convergence,
                    problems: list[str]) -> list[LockViolation]:
    """The locks workload's checks: mutual exclusion and fencing over the whole history
    (tests/support/lock_workload.check_locks, with a final linearizable read of the guarded
    key), every lease gone once its holder stopped (released, or expired within its TTL),
    the lock free, internal errors, enough progress."""
    urls = [n.http for n in cluster.nodes]
    token = cluster.root_token
    final = final_guarded_read(urls, lock_cfg.guarded_key, clock, token=token)
    if final.outcome != "ok":
        problems.append(f"final read of {lock_cfg.guarded_key!r} failed: {final.note}")
    else:
        locks.op(final)
        if convergence.states:
            got = next(iter(convergence.states.values())).get(lock_cfg.guarded_key)
            if (final.value, final.index) != ((got[0], got[1]) if got else (None, 0)):
                problems.append(f"final linearizable read of {lock_cfg.guarded_key!r} gave "
                                f"{final.value!r} at {final.index}, converged state has "
                                f"{got!r}")
    violations = check_locks(locks.holds, locks.ops, lock_cfg.guarded_key)
    problems.extend(f"locks: {v.message}" for v in violations)

    def leases_ended() -> bool:
        with KVClient(urls, timeout_s=2.0, token=token) as kv:
            try:
                if kv.leases():
                    return False
                kv.get(LOCK_PREFIX + lock_cfg.name)
            except ClientError as e:
                if e.status in AUTH_STATUSES:
                    raise AuthRefused(f"the lease check: {e}") from None
                return e.code == "key_not_found"
            return False

    try:
        wait_until(leases_ended, 3 * lock_cfg.ttl_s + 20, "every lease to end")
    except ClusterError as e:
        problems.append(f"locks: a lease outlived its holder, or the lock is still taken: {e}")
    except AuthRefused as e:
        locks.auth_refusals.append(str(e))
    problems.extend(f"internal error answered: {e}" for e in locks.internal_errors)
    problems.extend(f"client anomaly: {e}" for e in locks.anomalies)
    problems.extend(_auth_problems(locks.auth_refusals))
    stats = lock_stats(locks.holds, locks.ops)
    if stats["acquired"] < MIN_LOCK_HOLDS or stats["writes_accepted"] < MIN_FENCED_WRITES:
        problems.append(f"too little progress to check anything: {stats['acquired']} holds, "
                        f"{stats['writes_accepted']} accepted fenced writes")
    return violations


def _final_reads(cluster: LocalCluster, keys: list[str], clock: Callable[[], float],
                 ) -> list[Record]:
    leader = cluster.wait_for_leader(timeout_s=30)
    out = []
    for key in keys:
        invoke = clock()
        a = _attempt(leader, "GET", f"/keys/{key}?timeout=5", None, cluster.auth_headers, 10)
        complete = clock()
        rec = Record(-1, leader.node_id, "read", key, None, invoke, complete, "failed",
                     [a.detail])
        if a.outcome is Outcome.OK and a.status == 200 and isinstance(a.body, dict):
            rec.value, rec.outcome, rec.index = a.body.get("value"), "ok", a.body.get("index")
        elif a.outcome is Outcome.OK and a.status == 404:
            rec.outcome = "ok"
        out.append(rec)
    return out


def _summary(cfg: RunConfig, recorder: Recorder, nemesis: Nemesis | None,
             check: CheckResult | None, convergence: Convergence | None,
             problems: list[str], timings: dict[str, float],
             firewall_note: str) -> dict[str, object]:
    ops: dict[str, dict[str, int]] = {}
    for r in recorder.records:
        if r.process < 0:
            continue
        ops.setdefault(r.kind, {"ok": 0, "failed": 0, "unknown": 0})[r.outcome] += 1
    retried = sum(1 for r in recorder.records if len(r.attempts) > 1)
    return {
        "ok": not problems,
        "seed": cfg.seed,
        "nodes": cfg.nodes,
        "seconds": cfg.seconds,
        "mix": cfg.mix,
        "secure": cfg.secure,
        "config": dataclasses.asdict(cfg),
        "firewall": firewall_note,
        "faults": dict(nemesis.counts) if nemesis else {},
        "faults_skipped": [k.value for k in nemesis.skipped] if nemesis else [],
        "operations": ops,
        "operations_total": sum(1 for r in recorder.records if r.process >= 0),
        "retried_operations": retried,
        "unknown_operations": sum(1 for r in recorder.records if r.outcome == "unknown"),
        "checked_operations": check.checked_operations if check else 0,
        "linearizable": check.ok if check else None,
        "converged_applied_index": convergence.applied_index if convergence else None,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "problems": problems,
    }


# =========================================================================== reporting
def format_report(result: RunResult, around_s: float = 3.0) -> str:
    """The seed, every problem, and the nemesis events near each violation."""
    cfg = result.config
    workload = "" if cfg.workload == "register" else f" --workload {cfg.workload}"
    secure = " --secure" if cfg.secure else ""
    lines = [f"fault run seed={cfg.seed} nodes={cfg.nodes} mix={cfg.mix} "
             f"workload={cfg.workload}{' secure' if cfg.secure else ''} "
             f"seconds={cfg.seconds:g}: {'OK' if result.ok else 'FAILED'}",
             f"  replay: python -m tests.faults.run --seed {cfg.seed} --nodes {cfg.nodes} "
             f"--mix {cfg.mix}{workload}{secure} --seconds {cfg.seconds:g} --results DIR"]
    shown = ("faults", "locks", "timings_s") if cfg.workload == "locks" else (
        "faults", "operations", "unknown_operations", "timings_s")
    lines += [f"  summary: {json.dumps({k: result.summary.get(k) for k in shown})}"]
    for p in result.problems:
        lines.append("  PROBLEM: " + p.replace("\n", "\n    "))
    if result.check is not None:
        for v in result.check.violations:
            lo = min((op.invoke for op in v.operations), default=0.0) - around_s
            hi = max((op.complete for op in v.operations
                      if op.complete is not None and math.isfinite(op.complete)),
                     default=lo) + around_s
            near = [e for e in result.events if lo <= e.time_s <= hi]
            lines.append(f"  nemesis events between {lo:.2f}s and {hi:.2f}s (key {v.key!r}):")
            lines += [f"    {e.time_s:9.3f}s {e.fault} {e.phase} {e.detail}" for e in near]
    for lv in result.lock_violations:
        lo, hi = lv.start - around_s, lv.end + around_s
        near = [e for e in result.events if lo <= e.time_s <= hi]
        lines.append(f"  nemesis events between {lo:.2f}s and {hi:.2f}s "
                     f"({lv.message[:60]}...):")
        lines += [f"    {e.time_s:9.3f}s {e.fault} {e.phase} {e.detail}" for e in near]
    return "\n".join(lines)


def write_results(result: RunResult, directory: Path) -> None:
    """history.jsonl (operations and nemesis events), summary.json, report.txt, node logs."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "history.jsonl", "w") as f:
        for r in sorted(result.records, key=lambda r: r.invoke):
            f.write(json.dumps(r.to_json(), default=repr) + "\n")
        lock_items: list[LockHold | GuardedOp] = [*result.lock_holds, *result.lock_ops]
        for item in sorted(lock_items, key=lambda x: x.acquire_invoke if isinstance(x, LockHold)
                           else x.invoke):
            f.write(json.dumps(item.to_json(), default=repr) + "\n")
        for e in result.events:
            f.write(json.dumps({"type": "nemesis", **dataclasses.asdict(e)}) + "\n")
    (directory / "summary.json").write_text(json.dumps(result.summary, indent=2,
                                                       default=repr) + "\n")
    (directory / "report.txt").write_text(format_report(result) + "\n")
    for nid, text in result.node_logs.items():
        (directory / f"{nid}.log").write_text(text)
