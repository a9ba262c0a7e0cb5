"""RequestHandler (raftkv.runtime.requests) with fakes around it: the backup slots, which a
failed backup must give back whatever went wrong (a leaked slot refuses every later backup
with 503 until the node restarts)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from raftkv.auth import ROOT_TOKEN_ID, Role, TokenRecord, TokenTable, token_digest
from raftkv.codec import Request, RequestOp
from raftkv.core import ConfChange, ConfChangeOp
from raftkv.localcluster import wait_until
from raftkv.runtime.requests import MAX_BACKUPS, NodeInfo, RequestHandler
from raftkv.service import ServiceError, UnavailableError

WAIT_S = 5.0


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
    driver = SimpleNamespace(state_listeners=[], fatal=None,
                             sm=SimpleNamespace(snapshot_view=lambda: view), **driver_attrs)
    info = NodeInfo("n1", "127.0.0.1:1", tmp_path, "token")
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
