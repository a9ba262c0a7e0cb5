"""A worker's end of its channel (raftkv.worker.channel) against a fake Raft process on a
socket pair: requests leave in one frame per round of greenlets, each reply resumes its own
request, a file descriptor arrives with its reply, and losing the Raft process answers every
waiting request LOST."""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from raftkv.codec import FrameKind, Reply, RequestOp
from raftkv.framing import encode_frame
from raftkv.worker import channel as channel_module
from raftkv.worker.channel import LOST, TIMED_OUT
from tests.worker.fake_raft import Worker


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


def test_requests_of_one_round_leave_in_one_frame(worker: Worker) -> None:
    calls = [worker.start(functools.partial(worker.channel.call, RequestOp.GET, 5.0, f"k{i}",
                                            "stale"))
             for i in range(10)]
    requests = worker.requests_of(10)
    assert worker.raft.request_frames == 1
    assert [r.args[0] for r in requests] == [f"k{i}" for i in range(10)]
    assert len({r.rid for r in requests}) == 10
    assert not any(c.done for c in calls)


def test_a_round_of_large_requests_leaves_in_frames_under_the_bound(
        worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many large writes in one round: several frames, each within MAX_REQUESTS_FRAME_BYTES
    (one over the Raft process's limit would lose the channel and every request on it)."""
    monkeypatch.setattr(channel_module, "MAX_REQUESTS_FRAME_BYTES", 10_000)
    command = b"v" * 3000
    for i in range(10):
        worker.start(functools.partial(worker.channel.call, RequestOp.PROPOSE, 5.0,
                                       command + bytes([i])))
    requests = worker.requests_of(10)
    assert [r.args[0] for r in requests] == [command + bytes([i]) for i in range(10)]
    sizes = [len(p) for k, p in worker.raft.frames if k == FrameKind.WORKER_REQUESTS]
    assert len(sizes) >= 4 and max(sizes) <= 10_000


def test_each_reply_resumes_its_own_request_whatever_the_order(worker: Worker) -> None:
    calls = {key: worker.start(functools.partial(worker.channel.call, RequestOp.GET, 5.0, key,
                                                 "stale"))
             for key in ("a", "b", "c")}
    requests = {r.args[0]: r for r in worker.requests_of(3)}

    worker.raft.reply((requests["c"].rid, True, "for c"), (requests["a"].rid, True, "for a"))
    worker.raft.reply((requests["b"].rid, True, "for b"))
    worker.finish(*calls.values())

    for key, call in calls.items():
        reply = call.outcome()
        assert isinstance(reply, Reply)
        assert (reply.rid, reply.ok, reply.payload) == (requests[key].rid, True, f"for {key}")


def test_a_reply_nobody_waits_for_is_ignored(worker: Worker) -> None:
    call = worker.start(lambda: worker.channel.call(RequestOp.STATUS, 5.0))
    [request] = worker.requests_of(1)
    worker.raft.reply((request.rid + 1000, True, "stray"), (request.rid, True, "mine"))
    worker.finish(call)
    assert call.outcome().payload == "mine"
    assert not worker.channel.lost


def test_a_request_not_answered_in_time_returns_timed_out_and_its_late_reply_is_dropped(
        worker: Worker) -> None:
    call = worker.start(lambda: worker.channel.call(RequestOp.STATUS, 0.05))
    [request] = worker.requests_of(1)
    worker.finish(call)
    assert call.outcome() is TIMED_OUT
    worker.raft.reply((request.rid, True, "late"))
    again = worker.start(lambda: worker.channel.call(RequestOp.STATUS, 5.0))
    [_, second] = worker.requests_of(2)
    worker.raft.reply((second.rid, True, "second"))
    worker.finish(again)
    assert again.outcome().payload == "second"


def test_the_raft_process_closing_the_channel_answers_every_waiting_request_lost(
        worker: Worker) -> None:
    calls = [worker.start(lambda: worker.channel.call(RequestOp.STATUS, 30.0))
             for _ in range(3)]
    worker.requests_of(3)
    worker.raft.sock.close()
    worker.finish(*calls)
    assert [c.outcome() for c in calls] == [LOST, LOST, LOST]
    assert worker.channel.lost and worker.lost == 1
    later = worker.start(lambda: worker.channel.call(RequestOp.STATUS, 30.0))
    worker.finish(later)
    assert later.outcome() is LOST


def test_garbage_from_the_raft_process_loses_the_channel(worker: Worker) -> None:
    call = worker.start(lambda: worker.channel.call(RequestOp.STATUS, 30.0))
    worker.requests_of(1)
    worker.raft.sock.sendall(encode_frame(FrameKind.WORKER_REPLIES, b"\xc1 not msgpack"))
    worker.finish(call)
    assert call.outcome() is LOST and worker.lost == 1


def test_a_push_updates_the_node_view(worker: Worker) -> None:
    worker.raft.push({"role": "leader", "term": 4, "leader": "n1",
                      "leader_http": "127.0.0.1:4001", "fatal": None, "stopping": False})
    worker.turn_until(lambda: worker.view.role == "leader", "the push")
    assert worker.view.leader == "n1" and worker.view.leader_http == "127.0.0.1:4001"
    assert worker.service.is_leader()


def test_a_backup_reply_carries_its_file_descriptor(worker: Worker) -> None:
    call = worker.start(lambda: worker.channel.call(RequestOp.BACKUP, 5.0, "stale"))
    [request] = worker.requests_of(1)
    with tempfile.TemporaryFile() as f:
        f.write(b"snapshot bytes")
        f.flush()
        worker.raft.reply_with_fd(request.rid, [1, "c", 14, "blake2b-256"], f.fileno())
    worker.finish(call)
    reply = call.outcome()
    assert isinstance(reply, Reply) and reply.fd is not None
    with os.fdopen(reply.fd, "rb") as got:
        got.seek(0)
        assert got.read() == b"snapshot bytes"


def test_a_backup_whose_caller_timed_out_has_its_descriptor_closed(worker: Worker) -> None:
    call = worker.start(lambda: worker.channel.call(RequestOp.BACKUP, 0.05, "stale"))
    [request] = worker.requests_of(1)
    worker.finish(call)
    assert call.outcome() is TIMED_OUT

    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        worker.raft.reply_with_fd(request.rid, [1, "c", 0, "blake2b-256"], w)
        os.close(w)  # the worker's copy is now the only write end
        w = -1
        # The worker closes the descriptor nobody waits for: the pipe reaches end of file.
        worker.turn_until(lambda: _at_eof(r), "the worker to close the late backup's fd")
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def test_losing_the_channel_closes_descriptors_that_arrived_unclaimed(worker: Worker) -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        # An fd with bytes that do not complete a frame: held until its reply is read.
        frame = encode_frame(FrameKind.WORKER_REPLIES, b"x" * 10)
        socket.send_fds(worker.raft.sock, [frame[:3]], [w])
        os.close(w)
        w = -1
        worker.raft.sock.close()
        worker.turn_until(lambda: worker.channel.lost, "the channel to be lost")
        assert _at_eof(r)
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def _at_eof(fd: int) -> bool:
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:
        return False
