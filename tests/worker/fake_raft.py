"""A worker's channel (raftkv.worker.channel) and RemoteService on one end of a Unix socket
pair, and a fake Raft process on the other: the test reads the worker's requests there and
answers them as it likes (in any order, with file descriptors, or by closing the channel).

The test thread plays the worker's loop (`Worker.turn`: poll the channel as waitress's loop
does, run the ready greenlets, flush); request code runs in greenlets started with `start`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from waitress import wasyncore

from raftkv import codec
from raftkv.codec import ErrorReply, FrameKind, Request
from raftkv.framing import FrameDecoder, encode_frame
from raftkv.http.green import GreenDispatcher
from raftkv.metrics import WorkerStats
from raftkv.worker.channel import ChannelClient
from raftkv.worker.service import NodeView, RemoteService

WAIT_S = 5.0


class Call:
    """One request greenlet: `fn()` run as a waitress task; its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def service(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as e:
            self.error = e
        self.done = True

    def outcome(self) -> Any:
        assert self.done, "the call has not finished"
        if self.error is not None:
            raise self.error
        return self.result


class FakeRaft:
    """The Raft process's end of the channel, as a plain blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._decoder = FrameDecoder(256 << 20)
        self.frames: list[tuple[int, bytes]] = []
        self.requests: list[Request] = []
        self.request_frames = 0

    def poll(self) -> None:
        """Read what the worker sent, without blocking."""
        if self.sock.fileno() == -1:
            return  # the test closed it
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    return
                for kind, payload in self._decoder.feed(data):
                    self.frames.append((kind, payload))
                    if kind == FrameKind.WORKER_REQUESTS:
                        self.request_frames += 1
                        self.requests.extend(codec.decode_requests(payload))
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self.sock.setblocking(True)

    def reply(self, *items: tuple[int, bool, object]) -> None:
        """One WORKER_REPLIES frame: (rid, ok, payload or ErrorReply) each."""
        wire = [codec.encode_reply(codec.Reply(rid, ok, payload)) for rid, ok, payload in items]
        self.sock.sendall(encode_frame(FrameKind.WORKER_REPLIES, codec.pack_batch(wire)))

    def reply_with_fd(self, rid: int, payload: object, fd: int) -> None:
        frame = encode_frame(FrameKind.WORKER_REPLIES,
                             codec.pack_batch([codec.encode_reply(codec.Reply(rid, True,
                                                                              payload))]))
        sent = socket.send_fds(self.sock, [frame], [fd])
        self.sock.sendall(frame[sent:])

    def error(self, rid: int, code: str, message: str,
              details: dict[str, object] | None = None) -> None:
        self.reply((rid, False, ErrorReply(code, message, details or {})))

    def push(self, view: dict[str, object]) -> None:
        self.sock.sendall(encode_frame(FrameKind.WORKER_PUSH, codec.pack_value(view)))


class Worker:
    """The worker's side: the channel, the service and the green dispatcher."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.dispatcher = GreenDispatcher()
        self.socket_map: dict[Any, Any] = {}
        self.view = NodeView()
        self.lost = 0
        self.channel = ChannelClient(ours, self.dispatcher, self.socket_map, WorkerStats(),
                                     self.view.update, self._on_lost)
        self.dispatcher.after_run.append(self.channel.flush)
        self.service = RemoteService(self.channel, self.view)
        theirs.settimeout(WAIT_S)
        self.raft = FakeRaft(theirs)

    def _on_lost(self) -> None:
        self.lost += 1

    def start(self, fn: Callable[[], Any]) -> Call:
        call = Call(fn)
        self.dispatcher.add_task(call)
        return call

    def turn(self) -> None:
        wasyncore.poll2(self.dispatcher.timeout(0.01), self.socket_map)
        self.dispatcher.drain_wakeups()  # the worker's loop does it when the pipe is readable
        self.dispatcher.run_ready()
        self.raft.poll()

    def turn_until(self, cond: Callable[[], object], what: str,
                   timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.turn()

    def turn_for(self, seconds: float) -> None:
        """Turn the loop for this long (to show that something does NOT happen meanwhile)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.turn()

    def requests_of(self, count: int) -> list[Request]:
        """Turn until the Raft side has `count` requests; those."""
        self.turn_until(lambda: len(self.raft.requests) >= count, f"{count} requests")
        return self.raft.requests[:count]

    def finish(self, *calls: Call) -> None:
        self.turn_until(lambda: all(c.done for c in calls), "the calls to finish")

    def close(self) -> None:
        wasyncore.close_all(self.socket_map, ignore_all=True)
        self.raft.sock.close()
