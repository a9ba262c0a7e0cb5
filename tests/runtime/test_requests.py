"""RequestHandler (raftkv.runtime.requests) with fakes around it: the backup slots, which a
failed backup must give back whatever went wrong (a leaked slot refuses every later backup
with 503 until the node restarts), and the probe that must find a joining node at its
address, as the id its join names, before it is added."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from raftkv.auth import ROOT_TOKEN_ID, Role, TokenRecord, TokenTable, token_digest
from raftkv.codec import Request, RequestOp
from raftkv.core import MAX_MEMBERS, ConfChange, ConfChangeOp, Config, Membership
from raftkv.localcluster import wait_until
from raftkv.runtime.requests import (
    MAX_BACKUPS,
    MAX_PROBES,
    PROBE_TIMEOUT_S,
    NodeInfo,
    RequestHandler,
)
from raftkv.runtime.transport.handshake import PeerInfo
from raftkv.runtime.transport.probe import ProbeFailed
from raftkv.service import MembershipChangeError, ServiceError, UnavailableError

WAIT_S = 5.0
SOURCE_HOST = "127.0.0.9"
"""The raft host this node's links leave from (NodeInfo.source_host)."""


class _Loop:
    """Runs what other threads post when the test says so (the loop thread's place)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.posted: list[Callable[[], None]] = []

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self.posted.append(fn)

    def run_posted(self) -> int:
        with self._lock:
            posted, self.posted = self.posted, []
        for fn in posted:
            fn()
        return len(posted)


class _Replier:
    def __init__(self) -> None:
        self.errors: dict[int, ServiceError] = {}
        self.oks: dict[int, object] = {}

    def reply_ok(self, rid: int, payload: object, fd: int | None = None) -> None:
        self.oks[rid] = payload

    def reply_error(self, rid: int, error: ServiceError) -> None:
        self.errors[rid] = error


class _BrokenView:
    """A snapshot view whose serialization fails with a bug's exception, not an OSError."""

    applied_index = 7

    @property
    def data(self) -> dict[str, Any]:
        raise KeyError("a bug in the snapshot code")


def _handler(tmp_path: Path, loop: _Loop, view: object = None,
             **driver_attrs: object) -> RequestHandler:
    driver_attrs.setdefault("sm", SimpleNamespace(snapshot_view=lambda: view))
    driver = SimpleNamespace(state_listeners=[], fatal=None, **driver_attrs)
    info = NodeInfo("n1", "127.0.0.1:1", tmp_path, "token", source_host=SOURCE_HOST)
    return RequestHandler(driver=cast(Any, driver), loop=cast(Any, loop), info=info,
                          cluster_id=lambda: "c", peer_http=lambda _n: None,
                          extra_status=dict, render_metrics=bytes)


def _backup(handler: RequestHandler, replier: _Replier, rid: int) -> None:
    handler.handle(replier, [Request(rid, RequestOp.BACKUP, 5.0, ("stale",))])


def test_a_backup_that_fails_with_a_bug_answers_503_and_gives_its_slot_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop, replier = _Loop(), _Replier()
    handler = _handler(tmp_path, loop, _BrokenView())
    for rid in range(1, 2 * MAX_BACKUPS + 2):  # more failed backups than there are slots
        _backup(handler, replier, rid)
        wait_until(lambda: loop.run_posted() > 0, WAIT_S, "the backup writer to report")
        error = replier.errors.get(rid)
        assert isinstance(error, UnavailableError), (rid, replier.errors, replier.oks)
        assert "KeyError" in str(error) and "log" in str(error)
    assert "event=backup_failed" in caplog.text
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_backups_beyond_the_slots_are_refused_while_the_slots_are_taken(
        tmp_path: Path) -> None:
    loop, replier = _Loop(), _Replier()
    handler = _handler(tmp_path, loop, _BrokenView())
    for rid in range(1, MAX_BACKUPS + 1):
        _backup(handler, replier, rid)
    wait_until(lambda: len(loop.posted) == MAX_BACKUPS, WAIT_S, "both writers to report")
    _backup(handler, replier, 99)  # both slots still taken: their answers not handled yet
    assert "backups are being taken" in str(replier.errors[99])
    loop.run_posted()
    _backup(handler, replier, 100)  # a slot is free again
    wait_until(lambda: loop.run_posted() > 0, WAIT_S, "the backup writer to report")
    assert "backups are being taken" not in str(replier.errors[100])


def test_a_backup_whose_writer_thread_cannot_start_answers_503_and_gives_its_slot_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop, replier = _Loop(), _Replier()
    handler = _handler(tmp_path, loop, _BrokenView())

    def no_thread(_self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    for rid in range(1, 2 * MAX_BACKUPS + 2):
        _backup(handler, replier, rid)
        assert "could not be started" in str(replier.errors[rid]), replier.errors


def test_tokens_since_answers_after_the_barrier_and_the_table_only_when_newer(
        tmp_path: Path) -> None:
    """What a worker asks for a bearer its copy of the table does not know: the node's table
    after a linearizable barrier, or nil when the worker's copy (its version) is current."""
    root = TokenRecord(ROOT_TOKEN_ID, Role.ADMIN, (), token_digest("r" * 40), 1)
    table = TokenTable(True, (root,), 5)
    barriers: list[Any] = []
    driver = SimpleNamespace(state_listeners=[], fatal=None,
                             sm=SimpleNamespace(token_table=table),
                             read=lambda _deadline, then: barriers.append(then))
    handler = RequestHandler(driver=cast(Any, driver), loop=cast(Any, _Loop()),
                             info=NodeInfo("n1", "127.0.0.1:1", tmp_path, "token"),
                             cluster_id=lambda: "c", peer_http=lambda _n: None,
                             extra_status=dict, render_metrics=bytes)
    replier = _Replier()
    handler.handle(replier, [Request(1, RequestOp.TOKENS_SINCE, 5.0, ("linearizable", 5)),
                             Request(2, RequestOp.TOKENS_SINCE, 5.0, ("linearizable", 4))])
    assert len(barriers) == 2 and replier.oks == {}  # nothing before the barrier
    for then in barriers:
        then.ok(None)
    assert replier.oks == {1: None, 2: table.to_wire()}


def test_a_removal_waits_at_most_half_its_request_timeout(tmp_path: Path) -> None:
    """A removal refused only for now waits at the leader (raftkv.runtime.driver), but the
    refusal must come before the client's own timeout turns it into a 504."""
    calls: list[tuple[object, float | None]] = []
    handler = _handler(
        tmp_path, _Loop(),
        propose_conf_change=lambda change, done, wait_s=None: calls.append((change, wait_s)))
    handler.handle(_Replier(), [Request(1, RequestOp.REMOVE, 3.0, ("n2",))])
    [(change, wait_s)] = calls
    assert change == ConfChange(ConfChangeOp.REMOVE, "n2")
    assert wait_s == 1.5


# --------------------------------------------------------------------------- joins
N4 = "127.0.0.1:5004"


class _Cluster:
    """The driver as a join sees it: the membership, the addresses, and what is proposed."""

    def __init__(self, voters: dict[str, str], learners: dict[str, str] | None = None,
                 max_members: int = MAX_MEMBERS) -> None:
        self.addresses = {**voters, **(learners or {})}
        self.membership = Membership(frozenset(voters), frozenset(learners or {}))
        self.config = Config("n1", max_members=max_members)
        self.sm = SimpleNamespace(addresses=dict(self.addresses), applied_index=7)
        self.proposed: list[ConfChange] = []

    def handler(self, tmp_path: Path, loop: _Loop) -> RequestHandler:
        handler = _handler(tmp_path, loop,
                           core=SimpleNamespace(membership=self.membership, config=self.config),
                           sm=self.sm, address_of=self.addresses.get,
                           propose_conf_change=lambda change, _done, wait_s=None:
                           self.proposed.append(change))
        self.driver = cast(SimpleNamespace, handler._driver)
        return handler


class _Probe:
    """raftkv.runtime.requests.probe: records what it was asked, waits until `release` is set
    (the loop must not wait meanwhile), then answers `answer` (a PeerInfo) or raises it."""

    def __init__(self, answer: PeerInfo | Exception) -> None:
        self.answer = answer
        self.asked: list[tuple[str, float]] = []
        self.sources: list[object] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, address: str, *, timeout_s: float, **kwargs: object) -> PeerInfo:
        self.sources.append(kwargs.get("source_host"))
        self.asked.append((address, timeout_s))
        assert self.release.wait(WAIT_S)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
def fake_probe(monkeypatch: pytest.MonkeyPatch) -> Callable[[PeerInfo | Exception], _Probe]:
    def install(answer: PeerInfo | Exception) -> _Probe:
        fake = _Probe(answer)
        monkeypatch.setattr("raftkv.runtime.requests.probe", fake)
        return fake

    return install


def _join(handler: RequestHandler, replier: _Replier, rid: int, node_id: str | None,
          address: str, voter: bool = True, timeout_s: float = 5.0) -> None:
    handler.handle(replier, [Request(rid, RequestOp.JOIN, timeout_s, (node_id, address, voter))])


def _probe_answered(loop: _Loop) -> None:
    wait_until(lambda: loop.run_posted() > 0, WAIT_S, "the probe to answer on the loop")


def test_a_join_naming_its_id_adds_the_node_only_once_a_probe_found_it_there(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe]) -> None:
    """The known gap, closed: a join with an id (what RAFTKV_JOIN sends) was added unprobed,
    so a node that listened nowhere, or was another node, stayed a learner that never caught
    up. The probe runs off the loop (handle returns while it waits) and bounded by half the
    request's timeout, so its answer comes before the worker's 504."""
    loop, replier, cluster = _Loop(), _Replier(), _Cluster({"n1": "127.0.0.1:5001"})
    probe = fake_probe(PeerInfo("n4", "127.0.0.1:4004", "c"))
    probe.release.clear()
    _join(cluster.handler(tmp_path, loop), replier, 1, "n4", N4, timeout_s=3.0)
    wait_until(lambda: probe.asked, WAIT_S, "the probe to be asked")
    assert cluster.proposed == [] and replier.oks == {} and replier.errors == {}
    probe.release.set()
    _probe_answered(loop)
    assert probe.asked == [(N4, 1.5)]
    assert probe.sources == [SOURCE_HOST]  # it leaves from where the links leave from
    assert cluster.proposed == [ConfChange(ConfChangeOp.ADD_LEARNER, "n4", N4)]
    assert replier.errors == {}


@pytest.mark.parametrize(("answer", "error", "message"), [
    (ProbeFailed(f"cannot reach {N4}: Connection refused"), UnavailableError,
     f"no raftkv node answered at {N4} (cannot reach {N4}: Connection refused): retry once "
     "it listens there, or check that this is its raft address"),
    (ProbeFailed(f"{N4} did not finish the handshake in time"), UnavailableError,
     "a server that never speaks first, an HTTP port say, is not"),
    (ProbeFailed(f"{N4} refused the handshake: wrong_token", mismatch="cluster"),
     MembershipChangeError, f"the node at {N4} belongs to another cluster, or holds another "
     f"cluster token ({N4} refused the handshake: wrong_token)"),
    (ProbeFailed(f"{N4} refused the handshake: version", mismatch="version"),
     MembershipChangeError, f"the node at {N4} speaks another protocol version"),
    (ProbeFailed(f"{N4}'s certificate does not name n5, the id it answers with",
                 mismatch="certificate"),
     MembershipChangeError, f"the peer certificate presented at {N4} does not prove it is n4 "
     f"({N4}'s certificate does not name n5"),
    (ProbeFailed(f"{N4} does not speak the raftkv protocol", mismatch="protocol"),
     MembershipChangeError, f"what answers at {N4} is not a raftkv node"),
    (PeerInfo("n5", "127.0.0.1:4005", "c"), MembershipChangeError,
     f"the node at {N4} answers as n5, not n4"),
], ids=["nothing-listens", "never-speaks", "another-token", "another-version",
        "certificate-of-another", "not-raftkv", "another-node"])
def test_a_join_naming_its_id_is_refused_when_another_node_or_none_answers(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe],
        answer: PeerInfo | Exception, error: type[ServiceError], message: str) -> None:
    """Nothing answering is a 503 (a node started with RAFTKV_JOIN may not listen yet: its
    join is asked again); something that answers, and not as that node, a 409 marked
    probe="mismatch" (a joining node stops: asking again would not change it), whose message
    says what answered (it said "no raftkv node of this cluster answered" for a node of this
    cluster with another certificate)."""
    loop, replier, cluster = _Loop(), _Replier(), _Cluster({"n1": "127.0.0.1:5001"})
    fake_probe(answer)
    _join(cluster.handler(tmp_path, loop), replier, 1, "n4", N4)
    _probe_answered(loop)
    refusal = replier.errors.get(1)
    assert type(refusal) is error, replier.errors
    assert message in str(refusal)
    assert refusal.details() == ({"probe": "mismatch"} if error is MembershipChangeError
                                 else {})
    assert cluster.proposed == [] and replier.oks == {}


def _thread_recorder(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """raftkv.runtime.requests.threading, replaced: the names of the threads the handler
    starts (none runs), seen as the handler starts them, not once they ran."""
    started: list[str] = []

    def thread(*, target: Callable[[], None], name: str, daemon: bool) -> SimpleNamespace:
        return SimpleNamespace(start=lambda: started.append(name))

    monkeypatch.setattr("raftkv.runtime.requests.threading", SimpleNamespace(Thread=thread))
    return started


def test_a_members_rejoin_a_promotion_and_a_refusal_need_no_probe(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the membership answers alone is answered at once, as before the probe: a member
    asking again (a joining node's retry), a learner's promotion (the core promotes only a
    caught-up learner), a member that moved, an address that is a member's. (A probe's
    thread is seen as it is started: a stray probe still running would not be.)"""
    loop, replier = _Loop(), _Replier()
    cluster = _Cluster({"n1": "127.0.0.1:5001"}, {"n4": N4})
    probe = fake_probe(AssertionError("no probe"))
    threads = _thread_recorder(monkeypatch)
    handler = cluster.handler(tmp_path, loop)
    _join(handler, replier, 1, "n1", "127.0.0.1:5001")
    _join(handler, replier, 2, "n4", N4, voter=False)
    _join(handler, replier, 3, "n4", N4, voter=True)
    _join(handler, replier, 4, "n4", "127.0.0.1:9", voter=False)
    _join(handler, replier, 5, "n5", "127.0.0.1:5001")
    assert replier.oks == {1: 7, 2: 7}
    assert cluster.proposed == [ConfChange(ConfChangeOp.ADD_VOTER, "n4", N4)]
    assert "another address; remove it first" in str(replier.errors[4])
    assert "is the address of member n1" in str(replier.errors[5])
    assert threads == [] and probe.asked == [] and loop.posted == []


def test_a_join_to_a_full_cluster_is_refused_before_any_probe(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At Config.max_members a new member is a 409 at once: no probe (nothing listening
    would have been a 503, and a retrying joiner would take a probe slot every time) and
    nothing proposed; a member asking again and a learner's promotion still go through."""
    loop, replier = _Loop(), _Replier()
    cluster = _Cluster({"n1": "127.0.0.1:5001"}, {"n4": N4}, max_members=2)
    probe = fake_probe(AssertionError("no probe"))
    threads = _thread_recorder(monkeypatch)
    handler = cluster.handler(tmp_path, loop)
    _join(handler, replier, 1, "n5", "127.0.0.1:4005")
    _join(handler, replier, 2, "n1", "127.0.0.1:5001")
    _join(handler, replier, 3, "n4", N4, voter=True)
    refusal = replier.errors.get(1)
    assert type(refusal) is MembershipChangeError, replier.errors
    assert "the cluster has 2 members, its limit of 2: remove one before n5 can join" in str(
        refusal)
    assert refusal.details() == {}  # not a probe mismatch: a joiner asks again
    assert replier.oks == {2: 7}
    assert cluster.proposed == [ConfChange(ConfChangeOp.ADD_VOTER, "n4", N4)]
    assert threads == [] and probe.asked == [] and loop.posted == []


def test_a_join_checks_the_membership_again_once_the_probe_answered(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe]) -> None:
    """The membership may change while the probe runs (the same join asked twice, say): the
    second addition is not proposed, the checks made anew answer it."""
    loop, replier, cluster = _Loop(), _Replier(), _Cluster({"n1": "127.0.0.1:5001"})
    probe = fake_probe(PeerInfo("n4", "127.0.0.1:4004", "c"))
    probe.release.clear()
    _join(cluster.handler(tmp_path, loop), replier, 1, "n4", N4, voter=False)
    wait_until(lambda: probe.asked, WAIT_S, "the probe to be asked")
    # appended meanwhile, not applied here
    cluster.driver.core.membership = Membership(cluster.membership.voters, frozenset({"n4"}))
    cluster.addresses["n4"] = N4
    probe.release.set()
    _probe_answered(loop)
    assert cluster.proposed == []
    assert isinstance(replier.errors.get(1), UnavailableError), replier.errors
    assert "not committed yet" in str(replier.errors[1])


def test_a_join_without_an_id_adds_whom_the_probe_found_with_one_probe(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe]) -> None:
    loop, replier, cluster = _Loop(), _Replier(), _Cluster({"n1": "127.0.0.1:5001"})
    probe = fake_probe(PeerInfo("n4", "127.0.0.1:4004", "c"))
    _join(cluster.handler(tmp_path, loop), replier, 1, None, N4, timeout_s=60.0)
    _probe_answered(loop)
    assert probe.asked == [(N4, PROBE_TIMEOUT_S)]
    assert cluster.proposed == [ConfChange(ConfChangeOp.ADD_LEARNER, "n4", N4)]


def test_a_join_without_an_id_where_nothing_answers_is_a_503_to_retry(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe]) -> None:
    """It was a 409 like a definite mismatch, though the node may only not listen yet."""
    loop, replier, cluster = _Loop(), _Replier(), _Cluster({"n1": "127.0.0.1:5001"})
    fake_probe(ProbeFailed(f"{N4} did not finish the handshake in time"))
    _join(cluster.handler(tmp_path, loop), replier, 1, None, N4)
    _probe_answered(loop)
    assert isinstance(replier.errors.get(1), UnavailableError), replier.errors
    assert cluster.proposed == []


def test_a_join_whose_node_stopped_while_the_probe_ran_is_a_503(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe]) -> None:
    """Found by a review: handle() answers 503 "node stopped" to what arrives after a fatal
    error, but the join's second half, on the probe's answer, proposed all the same."""
    loop, replier, cluster = _Loop(), _Replier(), _Cluster({"n1": "127.0.0.1:5001"})
    probe = fake_probe(PeerInfo("n4", "127.0.0.1:4004", "c"))
    probe.release.clear()
    _join(cluster.handler(tmp_path, loop), replier, 1, "n4", N4)
    wait_until(lambda: probe.asked, WAIT_S, "the probe to be asked")
    cluster.driver.fatal = "storage failure: disk gone"
    probe.release.set()
    _probe_answered(loop)
    assert isinstance(replier.errors.get(1), UnavailableError), replier.errors
    assert "node stopped: storage failure: disk gone" in str(replier.errors[1])
    assert cluster.proposed == [] and replier.oks == {}


def test_a_probe_that_fails_with_a_bug_answers_503_and_logs_it(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe],
        caplog: pytest.LogCaptureFixture) -> None:
    """Found by a review: the probe's thread caught ProbeFailed and ValueError only; anything
    else ended it without an answer (the join waited for its 504) and kept its slot."""
    loop, replier, cluster = _Loop(), _Replier(), _Cluster({"n1": "127.0.0.1:5001"})
    fake_probe(KeyError("a bug in the probe"))
    handler = cluster.handler(tmp_path, loop)
    with caplog.at_level(logging.ERROR, logger="raftkv.runtime.requests"):
        _join(handler, replier, 1, "n4", N4)
        _probe_answered(loop)
    assert isinstance(replier.errors.get(1), UnavailableError), replier.errors
    assert "probe of 127.0.0.1:5004 failed (KeyError); see the node's log" in str(
        replier.errors[1])
    [record] = [r for r in caplog.records if "event=join_probe_failed" in r.getMessage()]
    assert record.exc_info is not None and "a bug in the probe" in str(record.exc_info[1])
    assert cluster.proposed == []


def test_joins_beyond_max_probes_are_refused_while_their_probes_run(
        tmp_path: Path, fake_probe: Callable[[PeerInfo | Exception], _Probe]) -> None:
    """Each probe is a thread and a connection for up to PROBE_TIMEOUT_S: joins to addresses
    that never answer must not pile them up without bound. Beyond MAX_PROBES a join is a
    503 to retry, answered at once; a probe's answer frees its place."""
    loop, replier, cluster = _Loop(), _Replier(), _Cluster({"n1": "127.0.0.1:5001"})
    probe = fake_probe(ProbeFailed("timed out"))
    probe.release.clear()
    handler = cluster.handler(tmp_path, loop)
    for rid in range(MAX_PROBES):
        _join(handler, replier, rid, f"n{10 + rid}", f"127.0.0.1:{6000 + rid}")
    wait_until(lambda: len(probe.asked) == MAX_PROBES, WAIT_S, "the probes to be asked")
    _join(handler, replier, 100, "n99", "127.0.0.1:6099")
    assert isinstance(replier.errors.get(100), UnavailableError), replier.errors
    assert "too many joins being checked" in str(replier.errors[100])
    assert len(probe.asked) == MAX_PROBES and len(replier.errors) == 1
    probe.release.set()
    answered = [0]

    def all_answered() -> bool:
        answered[0] += loop.run_posted()
        return answered[0] == MAX_PROBES

    wait_until(all_answered, WAIT_S, "the probes to answer")
    assert len(replier.errors) == MAX_PROBES + 1
    _join(handler, replier, 101, "n99", "127.0.0.1:6099")
    _probe_answered(loop)
    assert len(probe.asked) == MAX_PROBES + 1
    assert "no raftkv node answered" in str(replier.errors[101])
