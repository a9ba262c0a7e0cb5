"""RemoteService (raftkv.worker.service): a node's KVService as its HTTP workers see it, against
a fake Raft process. Commands are built here and proposed as bytes; answers come back typed;
errors come back as their classes with the leader hint; losing the Raft process makes a write
in flight's outcome unknown and anything else unavailable."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from raftkv import codec
from raftkv.auth import (
    REQUEST_TOKEN_ID,
    ROOT_TOKEN_ID,
    Role,
    TokenRecord,
    TokenTable,
    new_secret,
    token_digest,
)
from raftkv.codec import RequestOp
from raftkv.kv.commands import Put, decode_command
from raftkv.kv.state_machine import ConditionFailed, DeleteResult, PutResult
from raftkv.service import (
    ConditionFailedError,
    Consistency,
    KeyNotFoundError,
    NoLeaderError,
    OutcomeUnknownError,
    ReadResult,
    ReadTimeoutError,
    UnauthenticatedError,
    UnavailableError,
    WriteResult,
)
from raftkv.service import (
    DeleteResult as ServiceDeleteResult,
)
from tests.worker.fake_raft import Call, Worker


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    w.raft.push({"role": "follower", "leader": "n1", "leader_http": "10.0.0.1:4001"})
    w.turn_until(lambda: w.view.leader == "n1", "the first push")
    yield w
    w.close()


def test_put_proposes_the_encoded_command_and_answers_with_the_value_and_index(
        worker: Worker) -> None:
    call = worker.start(lambda: worker.service.put("k", {"v": [1, 2]}, request_id="idem-1",
                                                   timeout_s=5.0))
    [request] = worker.requests_of(1)
    assert request.op is RequestOp.PROPOSE and request.timeout_s == 5.0
    command, request_id = decode_command(request.args[0])
    assert command == Put("k", {"v": [1, 2]})
    assert request_id == "idem-1"

    worker.raft.reply((request.rid, True, codec.encode_apply_result(PutResult(9, None), 0)))
    worker.finish(call)

    assert call.outcome() == WriteResult({"v": [1, 2]}, 9, None)


def test_a_failed_condition_comes_back_as_condition_failed_with_its_fields(
        worker: Worker) -> None:
    call = worker.start(lambda: worker.service.put("k", 1, prev_index=3, timeout_s=5.0))
    [request] = worker.requests_of(1)
    worker.raft.reply((request.rid, True,
                       codec.encode_apply_result(ConditionFailed(10, "k", 7), 0)))
    worker.finish(call)
    with pytest.raises(ConditionFailedError) as caught:
        call.outcome()
    assert (caught.value.key, caught.value.current_index) == ("k", 7)
    assert caught.value.leader == "10.0.0.1:4001"


def test_delete_answers_whether_it_deleted(worker: Worker) -> None:
    call = worker.start(lambda: worker.service.delete("k", timeout_s=5.0))
    [request] = worker.requests_of(1)
    worker.raft.reply((request.rid, True, codec.encode_apply_result(DeleteResult(11, True),
                                                                    0)))
    worker.finish(call)
    assert call.outcome() == ServiceDeleteResult(True, 11)


def test_get_asks_with_its_consistency_and_answers_value_index_and_lease(
        worker: Worker) -> None:
    call = worker.start(lambda: worker.service.get("k", Consistency.LEADER, 2.0))
    [request] = worker.requests_of(1)
    assert request.op is RequestOp.GET and request.args == ("k", "leader")
    worker.raft.reply((request.rid, True, ["the value", 5, 4]))
    worker.finish(call)
    assert call.outcome() == ReadResult("the value", 5, 4)


def test_an_error_reply_is_raised_as_its_class_with_the_leader_hint(worker: Worker) -> None:
    missing = worker.start(lambda: worker.service.get("nope", Consistency.STALE, 2.0))
    no_leader = worker.start(lambda: worker.service.put("k", 1, timeout_s=2.0))
    first, second = worker.requests_of(2)
    worker.raft.error(first.rid, "key_not_found", "key 'nope' not found")
    worker.raft.error(second.rid, "no_leader", "no leader is known yet")
    worker.finish(missing, no_leader)

    with pytest.raises(KeyNotFoundError, match="nope") as caught:
        missing.outcome()
    assert caught.value.leader == "10.0.0.1:4001"
    with pytest.raises(NoLeaderError):
        no_leader.outcome()


def test_a_write_not_answered_in_time_has_an_unknown_outcome(worker: Worker) -> None:
    call = worker.start(lambda: worker.service.put("k", 1, timeout_s=0.05))
    worker.requests_of(1)
    worker.finish(call)
    with pytest.raises(OutcomeUnknownError, match="Idempotency-Key"):
        call.outcome()


def test_a_read_not_answered_in_time_is_a_read_timeout(worker: Worker) -> None:
    call = worker.start(lambda: worker.service.get("k", Consistency.LINEARIZABLE, 0.05))
    worker.requests_of(1)
    worker.finish(call)
    with pytest.raises(ReadTimeoutError):
        call.outcome()


def test_a_watch_waits_for_the_raft_process_beyond_its_own_timeout(worker: Worker) -> None:
    """The Raft process answers a watch when its time runs out; the worker gives it slack."""
    call = worker.start(lambda: worker.service.watch("k", 4, 0.05))
    [request] = worker.requests_of(1)
    assert request.op is RequestOp.WATCH and request.args == ("k", 4)
    worker.turn_for(0.2)  # well past the watch's own timeout: still waiting
    assert not call.done
    worker.raft.reply((request.rid, True, ["k", "v", 4, False, False]))
    worker.finish(call)
    result = call.outcome()
    assert (result.key, result.value, result.index, result.deleted, result.changed) == (
        "k", "v", 4, False, False)


def test_losing_the_raft_process_makes_writes_in_flight_unknown_and_the_rest_unavailable(
        worker: Worker) -> None:
    write = worker.start(lambda: worker.service.put("k", 1, timeout_s=30.0))
    read = worker.start(lambda: worker.service.get("k", Consistency.LINEARIZABLE, 30.0))
    watch = worker.start(lambda: worker.service.watch("k", None, 30.0))
    worker.requests_of(3)

    worker.raft.sock.close()
    worker.finish(write, read, watch)

    with pytest.raises(OutcomeUnknownError, match="may or may not"):
        write.outcome()
    with pytest.raises(UnavailableError):
        read.outcome()
    with pytest.raises(UnavailableError):
        watch.outcome()
    after = worker.start(lambda: worker.service.put("k", 2, timeout_s=30.0))
    worker.finish(after)
    with pytest.raises(OutcomeUnknownError):
        after.outcome()


def test_backup_hands_over_the_file_that_came_with_the_reply(worker: Worker) -> None:
    call = worker.start(lambda: worker.service.backup(Consistency.STALE, 5.0))
    [request] = worker.requests_of(1)
    assert request.op is RequestOp.BACKUP
    with tempfile.TemporaryFile() as f:
        f.write(b"0123456789" * 100_000)
        f.flush()
        worker.raft.reply_with_fd(request.rid, [42, "abc", 1_000_000, "blake2b-256"],
                                  f.fileno())
    worker.finish(call)
    backup = call.outcome()
    try:
        assert (backup.index, backup.checksum, backup.length_bytes) == (42, "abc", 1_000_000)
        assert b"".join(backup.chunks) == b"0123456789" * 100_000
    finally:
        backup.chunks.close()


def test_a_backup_reply_without_its_file_is_unavailable(worker: Worker) -> None:
    call = worker.start(lambda: worker.service.backup(Consistency.STALE, 5.0))
    [request] = worker.requests_of(1)
    worker.raft.reply((request.rid, True, [42, "abc", 0, "blake2b-256"]))
    worker.finish(call)
    with pytest.raises(UnavailableError, match="did not arrive"):
        call.outcome()


def test_readiness_of_a_stopping_node_is_answered_without_asking(worker: Worker) -> None:
    worker.raft.push({"role": "follower", "leader": "n1", "stopping": True})
    worker.turn_until(lambda: worker.view.stopping, "the push")
    call = worker.start(worker.service.readiness)
    worker.finish(call)
    assert call.outcome().ready is False
    worker.raft.poll()
    assert worker.raft.requests == []


ROOT = TokenRecord(ROOT_TOKEN_ID, Role.ADMIN, (), token_digest("r" * 40), 1)


def push_table(worker: Worker, version: int) -> None:
    """The Raft process pushes a table of the root token alone at `version`."""
    worker.raft.push({"auth": TokenTable(True, (ROOT,), version).to_wire()})
    worker.turn_until(lambda: worker.view.authorizer.table.version == version, "the push")


def made_token(index: int) -> tuple[str, TokenRecord]:
    """A read token's secret and its record, as a create applied at `index` makes them."""
    secret = new_secret()
    return secret, TokenRecord("a1b2c3d4e5f60708", Role.READ, (), token_digest(secret), index)


def test_a_caught_up_authorizer_asks_past_its_table_version_and_keeps_a_newer_table(
        worker: Worker) -> None:
    """For a bearer its copy does not know, a worker asks for the table behind a
    linearizable barrier, naming the version it holds: nil keeps its copy (it was current),
    a newer table replaces it (for later requests too), a malformed one is unavailable."""
    push_table(worker, 3)

    current = worker.start(lambda: worker.service.caught_up_authorizer(5.0))
    [request] = worker.requests_of(1)
    assert request.op is RequestOp.TOKENS_SINCE and request.args == ("linearizable", 3)
    assert 4.0 < request.timeout_s <= 5.0  # what is left of the caller's 5 s
    worker.raft.reply((request.rid, True, None))
    worker.finish(current)
    assert current.outcome().table.version == 3

    secret, made = made_token(9)
    newer = worker.start(lambda: worker.service.caught_up_authorizer(5.0))
    request = worker.requests_of(2)[1]
    worker.raft.reply((request.rid, True, TokenTable(True, (ROOT, made), 9).to_wire()))
    worker.finish(newer)
    assert newer.outcome().authenticate(secret) is not None
    assert worker.service.authorizer().authenticate(secret) is not None

    bad = worker.start(lambda: worker.service.caught_up_authorizer(5.0))
    request = worker.requests_of(3)[2]
    assert request.args == ("linearizable", 9)
    worker.raft.reply((request.rid, True, {"enabled": True}))
    worker.finish(bad)
    with pytest.raises(UnavailableError, match="malformed token table"):
        bad.outcome()
    assert worker.service.authorizer().table.version == 9


def test_a_catch_up_answered_with_an_older_table_than_a_push_since_keeps_the_newer(
        worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer was made before a newer table reached the worker by a push: the older one
    is not taken, nor decoded (a table of up to MAX_TOKENS records)."""
    push_table(worker, 3)
    call = worker.start(lambda: worker.service.caught_up_authorizer(5.0))
    [request] = worker.requests_of(1)
    push_table(worker, 12)
    decoded: list[object] = []
    from_wire = TokenTable.from_wire

    def noting(wire: object) -> TokenTable:
        decoded.append(wire)
        return from_wire(wire)

    monkeypatch.setattr(TokenTable, "from_wire", staticmethod(noting))
    worker.raft.reply((request.rid, True, TokenTable(True, (ROOT,), 7).to_wire()))
    worker.finish(call)
    assert call.outcome().table.version == 12
    assert decoded == []


def test_a_catch_up_not_answered_in_time_is_a_read_timeout_and_without_raft_unavailable(
        worker: Worker) -> None:
    late = worker.start(lambda: worker.service.caught_up_authorizer(0.05))
    worker.requests_of(1)
    worker.finish(late)
    with pytest.raises(ReadTimeoutError):
        late.outcome()
    lost = worker.start(lambda: worker.service.caught_up_authorizer(30.0))
    worker.requests_of(2)
    worker.raft.sock.close()
    worker.finish(lost)
    with pytest.raises(UnavailableError):
        lost.outcome()


def test_catch_ups_fly_one_at_a_time_and_a_caller_takes_one_that_began_after_it_came(
        worker: Worker) -> None:
    """Unknown bearers arriving together cost the Raft process one TOKENS_SINCE at a time
    per worker; those that came while one flew take the next one, not its answer (it may have
    read the table before their tokens were made)."""
    push_table(worker, 3)
    first = worker.start(lambda: worker.service.caught_up_authorizer(5.0))
    [asked] = worker.requests_of(1)
    later = [worker.start(lambda: worker.service.caught_up_authorizer(5.0)) for _ in range(3)]
    waiting = worker.service._catch_up_done._waiting
    worker.turn_until(lambda: len(waiting) == 3, "the later callers to wait")
    worker.turn()  # the loop's next round flushes whatever they queued: nothing
    assert len(worker.raft.requests) == 1

    worker.raft.reply((asked.rid, True, None))
    asked_next = worker.requests_of(2)[1]
    assert first.done and first.outcome().table.version == 3
    assert not any(c.done for c in later)
    secret, made = made_token(9)
    worker.raft.reply((asked_next.rid, True, TokenTable(True, (ROOT, made), 9).to_wire()))
    worker.finish(*later)
    assert all(c.outcome().authenticate(secret) is not None for c in later)
    assert len(worker.raft.requests) == 2


def test_a_catch_up_cut_short_by_its_callers_timeout_is_not_the_answer_for_a_caller_with_time(
        worker: Worker) -> None:
    """A catch-up asks with the deadline of whoever began it: one begun by a caller with a
    tiny timeout (any bearer sets ?timeout) times out for that caller only; a caller with
    time left takes the next catch-up instead of that 504."""
    first = worker.start(lambda: worker.service.caught_up_authorizer(5.0))
    [asked] = worker.requests_of(1)
    # `short` must still have time when the first answer comes (it begins the next catch-up
    # with what it has left), and runs out while that catch-up flies: 2 s, never answered.
    short = worker.start(lambda: worker.service.caught_up_authorizer(2.0))
    patient = worker.start(lambda: worker.service.caught_up_authorizer(30.0))
    waiting = worker.service._catch_up_done._waiting
    worker.turn_until(lambda: len(waiting) == 2, "both later callers to wait")

    worker.raft.reply((asked.rid, True, None))
    cut_short = worker.requests_of(2)[1]  # begun by `short`, with what is left of its 2 s
    assert cut_short.timeout_s <= 2.0
    worker.finish(first, short)
    with pytest.raises(ReadTimeoutError):
        short.outcome()
    assert not patient.done
    retried = worker.requests_of(3)[2]  # `patient` asks again, with its own deadline
    assert retried.timeout_s > 20.0
    secret, made = made_token(9)
    worker.raft.reply((cut_short.rid, True, None))  # late: nobody waits for it any more
    worker.raft.reply((retried.rid, True, TokenTable(True, (ROOT, made), 9).to_wire()))
    worker.finish(patient)
    assert patient.outcome().authenticate(secret) is not None


def watch_as(worker: Worker, token_id: str | None, key: str) -> Call:
    """A watch of `key` from a request the HTTP auth check let in with `token_id`."""
    def run() -> object:
        REQUEST_TOKEN_ID.set(token_id)  # what the auth middleware does in the request's greenlet
        return worker.service.watch(key, None, 30.0)
    return worker.start(run)


def test_a_watch_that_ends_after_its_token_was_revoked_tells_nothing(worker: Worker) -> None:
    """A watch waits up to a minute, and its token may be revoked meanwhile: an answer that
    comes after the push of a table without the token (the Raft process pushes it before the
    answers of the turn that applied the revoke) is 401, whether the key changed or the
    watch's time ran out; a token that still exists, or no token (auth off), gets its answer.
    (Found on the left-alone list: the change was delivered to the revoked token.)"""
    _, made = made_token(9)
    worker.raft.push({"auth": TokenTable(True, (ROOT, made), 9).to_wire()})
    worker.turn_until(lambda: worker.view.authorizer.table.version == 9, "the push")
    changed, quiet, kept, open_ = (watch_as(worker, made.token_id, "a"),
                                   watch_as(worker, made.token_id, "b"),
                                   watch_as(worker, ROOT_TOKEN_ID, "c"),
                                   watch_as(worker, None, "d"))
    requests = worker.requests_of(4)
    by_key = {r.args[0]: r.rid for r in requests}

    worker.raft.push({"auth": TokenTable(True, (ROOT,), 12).to_wire()})  # the revoke
    worker.raft.reply((by_key["a"], True, ["a", "new", 13, False, True]),
                      (by_key["b"], True, ["b", None, 12, True, False]),
                      (by_key["c"], True, ["c", "v", 13, False, True]),
                      (by_key["d"], True, ["d", "w", 13, False, True]))
    worker.finish(changed, quiet, kept, open_)

    for call in (changed, quiet):
        with pytest.raises(UnauthenticatedError, match="revoked while it waited"):
            call.outcome()
    assert (kept.outcome().value, open_.outcome().value) == ("v", "w")
