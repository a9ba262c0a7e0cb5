"""A framed non-blocking socket on the event loop (raftkv.runtime.connection), over Unix
socket pairs: the test holds the other end as a plain blocking socket."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from raftkv.framing import FrameDecoder, encode_frame
from raftkv.localcluster import wait_until
from raftkv.runtime.connection import Connection
from tests.support.event_loop import LoopThread, loop_thread

WAIT_S = 5.0


class Received:
    """What a Connection handed to its callbacks (called on the loop thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.frames: list[tuple[int, bytes]] = []
        self.batches = 0
        self.closed: list[str] = []

    def on_frames(self, frames: list[tuple[int, bytes]]) -> None:
        with self.lock:
            self.frames.extend(frames)
            self.batches += 1

    def on_closed(self, reason: str) -> None:
        with self.lock:
            self.closed.append(reason)


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    with loop_thread() as running:
        yield running


def connect(lt: LoopThread, *, max_frame_bytes: int = 1 << 20,
            received: Received | None = None) -> tuple[Connection, socket.socket, Received]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    rec = received or Received()
    conn = lt.call(lambda: Connection(lt.loop, ours, max_frame_bytes=max_frame_bytes,
                                      on_frames=rec.on_frames, on_closed=rec.on_closed,
                                      name="test"))
    theirs.settimeout(WAIT_S)
    return conn, theirs, rec


def read_frames(sock: socket.socket, count: int, max_frame_bytes: int = 64 << 20
                ) -> list[tuple[int, bytes]]:
    decoder = FrameDecoder(max_frame_bytes)
    frames: list[tuple[int, bytes]] = []
    while len(frames) < count:
        data = sock.recv(1 << 16)
        assert data, f"closed after {len(frames)} of {count} frames"
        frames.extend(decoder.feed(data))
    return frames


def test_frames_are_read_and_handed_on_in_order(lt: LoopThread) -> None:
    conn, theirs, rec = connect(lt)
    sent = [(i % 250, os.urandom(i % 300)) for i in range(500)]
    with theirs:
        theirs.sendall(b"".join(encode_frame(k, p) for k, p in sent))
        wait_until(lambda: len(rec.frames) >= len(sent), WAIT_S, "every frame")
    assert rec.frames == sent
    lt.call(conn.close)


def test_queued_frames_are_written_only_by_flush(lt: LoopThread) -> None:
    conn, theirs, _ = connect(lt)
    with theirs:
        lt.call(lambda: conn.send_frame(5, b"one"))
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(100)
        theirs.setblocking(True)
        theirs.settimeout(WAIT_S)
        lt.call(conn.flush)
        assert read_frames(theirs, 1) == [(5, b"one")]
    lt.call(conn.close)


def test_a_partial_write_queues_the_rest_and_flushes_it_when_the_socket_is_writable(
        lt: LoopThread) -> None:
    conn, theirs, _ = connect(lt)
    big = os.urandom(4 << 20)  # far more than a Unix socket buffer holds
    with theirs:

        def send_and_flush() -> None:
            conn.send_frame(1, b"first")
            conn.send_frame(2, big)
            conn.send_frame(3, b"last")
            conn.flush()

        lt.call(send_and_flush)
        left = lt.call(lambda: conn.out_bytes)
        assert 0 < left < len(big) + 20, "the socket took part of it, the rest is queued"

        # Nothing calls flush again: the loop writes the rest as the reader makes room.
        frames = read_frames(theirs, 3)

        assert frames == [(1, b"first"), (2, big), (3, b"last")]
        wait_until(lambda: lt.call(lambda: conn.out_bytes) == 0, WAIT_S, "an empty queue")
    lt.call(conn.close)


def test_a_file_descriptor_travels_with_its_frame_and_the_sender_keeps_its_own(
        lt: LoopThread) -> None:
    conn, theirs, _ = connect(lt)
    with tempfile.TemporaryFile() as f, theirs:
        f.write(b"the backup")
        f.flush()

        def send_and_flush() -> None:
            conn.send_frame(1, b"before")
            conn.send_frame_with_fd(2, b"with fd", f.fileno())
            conn.send_frame(3, b"after")
            conn.flush()

        lt.call(send_and_flush)

        data = bytearray()
        fds: list[int] = []
        expected = (len(encode_frame(1, b"before")) + len(encode_frame(2, b"with fd"))
                    + len(encode_frame(3, b"after")))
        while len(data) < expected:
            chunk, got_fds, _, _ = socket.recv_fds(theirs, 1 << 16, 4)
            assert chunk
            data += chunk
            fds.extend(got_fds)

        assert FrameDecoder(1024).feed(bytes(data)) == [(1, b"before"), (2, b"with fd"),
                                                        (3, b"after")]
        assert len(fds) == 1
        with os.fdopen(fds[0], "rb") as passed:
            passed.seek(0)
            assert passed.read() == b"the backup"
        f.seek(0)
        assert f.read() == b"the backup", "the sender's own descriptor stays open"
    lt.call(conn.close)


def test_a_frame_error_closes_the_connection_and_calls_on_closed_once(
        lt: LoopThread) -> None:
    conn, theirs, rec = connect(lt, max_frame_bytes=64)
    with theirs:
        theirs.sendall(encode_frame(1, b"fine"))
        wait_until(lambda: rec.frames, WAIT_S, "the good frame")
        theirs.sendall(encode_frame(1, bytes(100)))  # over the limit

        wait_until(lambda: rec.closed, WAIT_S, "on_closed")
        assert theirs.recv(10) == b"", "our end was closed"
        lt.call(lambda: conn.close("again"))
        lt.call(lambda: conn.close("and again"))

    assert rec.frames == [(1, b"fine")]
    assert len(rec.closed) == 1 and "frame_too_large" in rec.closed[0]
    assert lt.call(lambda: conn.closed)


def test_a_zero_length_frame_closes_the_connection_as_malformed(lt: LoopThread) -> None:
    _, theirs, rec = connect(lt)
    with theirs:
        theirs.sendall(b"\x00\x00\x00\x00")
        wait_until(lambda: rec.closed, WAIT_S, "on_closed")
    assert "malformed" in rec.closed[0]


def test_the_other_side_closing_mid_frame_delivers_only_whole_frames(lt: LoopThread) -> None:
    _, theirs, rec = connect(lt)
    theirs.sendall(encode_frame(1, b"whole") + encode_frame(1, b"cut short")[:7])
    theirs.close()
    wait_until(lambda: rec.closed, WAIT_S, "on_closed")
    assert rec.frames == [(1, b"whole")]
    assert rec.closed == ["closed by the other side"]


def test_sending_on_a_closed_connection_is_a_no_op(lt: LoopThread) -> None:
    conn, theirs, rec = connect(lt)
    theirs.close()
    wait_until(lambda: rec.closed, WAIT_S, "on_closed")

    def send_and_flush() -> None:
        conn.send_frame(1, b"x")
        conn.flush()

    lt.call(send_and_flush)
    assert lt.call(lambda: conn.out_bytes) == 0


def test_descriptors_queued_on_a_connection_that_closes_are_not_leaked(
        lt: LoopThread) -> None:
    conn, theirs, _ = connect(lt)
    with tempfile.TemporaryFile() as f:
        before = len(os.listdir("/proc/self/fd"))
        lt.call(lambda: conn.send_frame_with_fd(2, b"x", f.fileno()))  # a dup is queued
        assert len(os.listdir("/proc/self/fd")) == before + 1
        lt.call(lambda: conn.close("going away"))
        assert len(os.listdir("/proc/self/fd")) <= before - 1  # the dup and our socket
    theirs.close()


def test_a_failing_on_closed_handler_is_logged_and_does_not_reach_the_loop(
        lt: LoopThread, caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def broken(_reason: str) -> None:
        raise RuntimeError("handler bug")

    conn = lt.call(lambda: Connection(lt.loop, ours, max_frame_bytes=1024,
                                      on_frames=lambda _f: None, on_closed=broken,
                                      name="broken"))
    with caplog.at_level(logging.ERROR, logger="raftkv.runtime.connection"):
        theirs.close()
        wait_until(lambda: lt.call(lambda: conn.closed), WAIT_S, "the close")
    assert "event=connection_close_handler_failed connection=broken" in caplog.text
    assert lt.call(lambda: 42) == 42, "the loop is still running"


def test_one_busy_connection_does_not_starve_another(lt: LoopThread) -> None:
    """A read turn takes a bounded number of recv calls: a connection that never runs dry
    still lets the other connections' frames through."""
    _, busy, busy_rec = connect(lt, max_frame_bytes=1 << 20)
    _, quiet, quiet_rec = connect(lt)
    stop = threading.Event()
    chunk = encode_frame(1, bytes(60_000)) * 20

    def flood() -> None:
        try:
            while not stop.is_set():
                busy.sendall(chunk)
        except OSError:
            pass

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        wait_until(lambda: busy_rec.batches > 5, WAIT_S, "the flood to be read")
        quiet.sendall(encode_frame(9, b"me too"))
        wait_until(lambda: quiet_rec.frames, WAIT_S, "the quiet connection's frame")
    finally:
        stop.set()
        busy.close()
        quiet.close()
        flooder.join(WAIT_S)
    assert quiet_rec.frames == [(9, b"me too")]


class WriteRecorder(socket.socket):
    """A socket that notes what each send() and sendmsg() was handed: for each buffer, whether
    it is `payload` or a view of it, and its length. Notes only: the buffers themselves (copies
    of a large payload, at the bug below) would stay alive, each as large as what it copied."""

    def __init__(self, sock: socket.socket, payload: bytes) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.payload = payload
        self.writes: list[list[tuple[bool, int]]] = []

    def _note(self, buffers: list[Any]) -> None:
        self.writes.append([
            ((b.obj if isinstance(b, memoryview) else b) is self.payload, len(b))
            for b in buffers])

    def send(self, data: Any, flags: int = 0, /) -> int:
        self._note([data])
        return super().send(data, flags)

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        buffers = list(buffers)
        self._note(buffers)
        return super().sendmsg(buffers, *args)


def test_a_large_frame_to_a_reader_is_written_without_copying_it(lt: LoopThread) -> None:
    """Regression: after a partial write, flush() kept the unsent rest as a new bytes object
    (a copy), and joined the queue into one bytes at every write: the bytes copied grew with
    the square of what was queued. A 64 MiB frame took 4.6 s of the loop thread to go through
    a Unix socket (16 MiB: 0.07 s); a 250 MB key listing on a leader stalled its Raft loop
    long enough for the followers to elect another leader.

    What the socket is handed is noted: the frame goes out in many writes, each of them the
    payload itself or a view into it (only the 5-byte header is a buffer of its own), so
    nothing is copied and the work is linear in the size. How fast is the benchmarks' part;
    here 96 MiB, read as fast as it comes, must all arrive (a generous deadline: not stalled).
    """
    size = 96 << 20
    payload = bytes(size)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    recorder = WriteRecorder(ours, payload)
    rec = Received()
    conn = lt.call(lambda: Connection(lt.loop, recorder, max_frame_bytes=1 << 20,
                                      on_frames=rec.on_frames, on_closed=rec.on_closed,
                                      name="test"))
    theirs.settimeout(WAIT_S)
    received = [0]

    def reader() -> None:
        while received[0] < size + 5:
            data = theirs.recv(1 << 20)
            if not data:
                return
            received[0] += len(data)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()

    def send_and_flush() -> None:
        conn.send_frame(1, payload)
        conn.flush()

    lt.call(send_and_flush)
    thread.join(60)

    assert not thread.is_alive(), f"{received[0]} of {size + 5} bytes after 60 s"
    assert received[0] == size + 5
    writes = lt.call(lambda: list(recorder.writes))
    copies = [n for w in writes for of_payload, n in w if not of_payload and n > 5]
    assert copies == [], f"buffers of their own handed to the socket: {copies[:5]}"
    assert len([w for w in writes if any(of_payload for of_payload, _ in w)]) > 1, \
        "the payload went out in parts (the socket took some of it at each write)"
    theirs.close()
    lt.call(conn.close)
