"""The Raft process's end of a worker's channel (raftkv.runtime.workers.WorkerChannel), on a
socket pair with the test as the worker: requests are handed to the handler in batches, the
replies of a turn leave in one frame, a reply with a file descriptor in a frame of its own,
and a worker that breaks the protocol loses its channel."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Iterator

import pytest

from raftkv import codec
from raftkv.codec import FrameKind, Reply, Request, RequestOp
from raftkv.framing import FrameDecoder, encode_frame
from raftkv.localcluster import wait_until
from raftkv.metrics import NodeMetrics
from raftkv.runtime import workers
from raftkv.runtime.workers import WorkerChannel
from raftkv.service import KeyNotFoundError
from tests.support.event_loop import LoopThread, loop_thread

WAIT_S = 5.0


class FakeHandler:
    """Records what the channel hands it (RequestHandler.handle's place)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[list[Request]] = []

    def handle(self, replier: object, requests: list[Request]) -> None:
        with self.lock:
            self.batches.append(requests)


class Side:
    """The worker's end: a plain socket, reading frames and passed descriptors."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(WAIT_S)
        self._decoder = FrameDecoder(1 << 30)
        self.fds: list[int] = []

    def frames(self, count: int) -> list[tuple[int, bytes]]:
        got: list[tuple[int, bytes]] = []
        while len(got) < count:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 4)
            assert data, f"closed after {len(got)} frames"
            self.fds.extend(fds)
            got.extend(self._decoder.feed(data))
        return got

    def replies(self, count: int) -> list[list[Reply]]:
        frames = self.frames(count)
        assert all(kind == FrameKind.WORKER_REPLIES for kind, _ in frames)
        return [codec.decode_replies(payload) for _, payload in frames]


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    with loop_thread() as running:
        yield running


def open_channel(lt: LoopThread) -> tuple[WorkerChannel, Side, FakeHandler, list[str]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handler = FakeHandler()
    closed: list[str] = []
    channel = lt.call(lambda: WorkerChannel(lt.loop, ours, 0, handler,  # type: ignore[arg-type]
                                            NodeMetrics(),
                                            lambda _ch, reason: closed.append(reason)))
    return channel, Side(theirs), handler, closed


def test_a_batch_of_requests_reaches_the_handler_as_sent(lt: LoopThread) -> None:
    _, side, handler, _ = open_channel(lt)
    items = [codec.encode_request(1, RequestOp.GET, 2.0, "a", "stale"),
             codec.encode_request(2, RequestOp.STATUS, 5.0)]
    side.sock.sendall(encode_frame(FrameKind.WORKER_REQUESTS, codec.pack_batch(items)))
    wait_until(lambda: handler.batches, WAIT_S, "the batch")
    assert handler.batches == [[Request(1, RequestOp.GET, 2.0, ("a", "stale")),
                                Request(2, RequestOp.STATUS, 5.0, ())]]


def test_the_replies_of_a_turn_leave_in_one_frame(lt: LoopThread) -> None:
    channel, side, _, _ = open_channel(lt)
    def reply_and_flush() -> None:
        channel.reply_ok(1, ["v", 3, None])
        channel.reply_error(2, KeyNotFoundError("key 'b' not found"))
        channel.flush()

    lt.call(reply_and_flush)
    [replies] = side.replies(1)
    assert replies == [Reply(1, True, ["v", 3, None]),
                       Reply(2, False, codec.ErrorReply("key_not_found",
                                                        "key 'b' not found", {}))]


def test_a_reply_with_a_descriptor_goes_in_a_frame_of_its_own_after_the_others(
        lt: LoopThread) -> None:
    channel, side, _, _ = open_channel(lt)
    with tempfile.TemporaryFile() as f:
        f.write(b"backup")
        f.flush()

        def reply_and_flush() -> None:
            channel.reply_ok(1, "first")
            channel.reply_ok(2, [5, "sum", 6, "blake2b-256"], fd=f.fileno())
            channel.reply_ok(3, "third")
            channel.flush()

        lt.call(reply_and_flush)
    batches = side.replies(3)
    assert [[r.rid for r in batch] for batch in batches] == [[1], [2], [3]]
    assert len(side.fds) == 1
    with os.fdopen(side.fds[0], "rb") as passed:
        passed.seek(0)
        assert passed.read() == b"backup"


def test_a_reply_too_large_for_the_worker_is_an_error_and_the_rest_still_arrive(
        lt: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a listing of a few hundred 1 MB values made a reply frame over the 256 MiB
    a worker reads; the worker dropped its channel as broken ("the node's Raft process is not
    running"), failed every request it held (writes 504 outcome unknown), exited and was
    restarted. Such a reply is now an invalid_request error naming its size, alone in its
    frame, and the channel stays up."""
    monkeypatch.setattr(workers, "CHANNEL_MAX_FRAME_BYTES", 64 << 10)
    channel, side, _, closed = open_channel(lt)
    huge = ["x" * 1000 for _ in range(100)]  # ~100 KB packed: over the (patched) limit

    def reply_and_flush() -> None:
        channel.reply_ok(1, "small")
        channel.reply_ok(2, huge)
        channel.reply_ok(3, "also small")
        channel.flush()

    lt.call(reply_and_flush)

    replies = [r for batch in side.replies(3) for r in batch]

    assert [r.rid for r in replies] == [1, 2, 3]
    assert replies[0] == Reply(1, True, "small") and replies[2] == Reply(3, True, "also small")
    error = replies[1].payload
    assert not replies[1].ok and isinstance(error, codec.ErrorReply)
    assert error.code == "invalid_request" and "bytes" in error.message
    assert closed == [] and not lt.call(lambda: channel.conn.closed)


def test_the_worker_limit_and_the_channel_limit_are_the_same() -> None:
    from raftkv.worker.channel import MAX_FRAME_BYTES

    assert workers.CHANNEL_MAX_FRAME_BYTES == MAX_FRAME_BYTES


def test_hello_and_stats_from_the_worker_are_kept(lt: LoopThread) -> None:
    channel, side, _, _ = open_channel(lt)
    side.sock.sendall(encode_frame(FrameKind.WORKER_HELLO,
                                   codec.pack_value([codec.CHANNEL_VERSION, 0, 4242]))
                      + encode_frame(FrameKind.WORKER_STATS,
                                     codec.pack_value({"requests": [], "batches": [0, 0, []]})))
    wait_until(lambda: lt.call(lambda: channel.ready and channel.stats), WAIT_S, "hello, stats")
    assert lt.call(lambda: channel.pid) == 4242


@pytest.mark.parametrize("frame", [
    encode_frame(FrameKind.WORKER_REQUESTS, b"\xc1 not msgpack"),
    encode_frame(FrameKind.WORKER_REPLIES, codec.pack_batch([])),
    encode_frame(FrameKind.RAFT, b"a peer's frame"),
], ids=["bad-requests", "replies-from-a-worker", "raft-frame"])
def test_a_worker_that_breaks_the_protocol_loses_its_channel(
        lt: LoopThread, frame: bytes) -> None:
    channel, side, handler, closed = open_channel(lt)
    side.sock.sendall(frame)
    wait_until(lambda: closed, WAIT_S, "the channel to close")
    assert "protocol error" in closed[0]
    assert handler.batches == []
    assert side.sock.recv(10) == b""
    del channel
