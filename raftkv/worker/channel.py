"""A worker's end of its channel to the Raft process.

Request greenlets call `call(op, timeout, *args)`: the request is queued and the greenlet
suspends (raftkv.http.green). After each round of greenlets the loop calls `flush`, which sends
everything queued in ONE frame; the Raft process answers in one frame per loop turn, and each
reply resumes its greenlet. Pushes carry the node's state (role, leader) as it changes.

The socket is non-blocking and lives in waitress's socket map, so replies are read by the same
loop that reads HTTP: no reader thread, no hand-off. If the Raft process goes away (end of
stream), every waiting call returns LOST and `on_lost` runs once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from waitress import wasyncore

from raftkv import codec
from raftkv.codec import FrameKind, Reply, RequestOp
from raftkv.framing import FrameDecoder, FrameError, encode_frame, payloads_within
from raftkv.http.green import TIMED_OUT, GreenDispatcher, Suspended
from raftkv.metrics import WorkerStats

__all__ = ["LOST", "TIMED_OUT", "ChannelClient"]

log = logging.getLogger(__name__)

LOST: Final = object()
"""What `call` returns when the Raft process went away before answering."""
MAX_FRAME_BYTES: Final = 256 << 20
MAX_REQUESTS_FRAME_BYTES: Final = 64 << 20
"""The requests of one round leave in frames of at most this many bytes: the Raft process
reads frames of up to 256 MiB and drops the channel on a larger one (many large writes in one
round would have made one)."""
_READ_BYTES: Final = 256 << 10
_MAX_FDS: Final = 8


def _request_bytes(request: list[object]) -> int:
    """About what an encoded request adds to a WORKER_REQUESTS frame: its byte and string
    arguments (a write's command), and room for the rest."""
    return 64 + sum(len(a) for a in request if isinstance(a, (bytes, str)))


class ChannelClient(wasyncore.dispatcher):  # type: ignore[misc]
    def __init__(self, sock: socket.socket, dispatcher: GreenDispatcher,
                 socket_map: dict[Any, Any], stats: WorkerStats,
                 on_push: Callable[[dict[str, Any]], None],
                 on_lost: Callable[[], None]) -> None:
        sock.setblocking(False)
        super().__init__(sock, map=socket_map)
        self._dispatcher = dispatcher
        self._stats = stats
        self._on_push = on_push
        self._on_lost = on_lost
        self._decoder = FrameDecoder(MAX_FRAME_BYTES)
        self._pending: dict[int, tuple[Suspended, RequestOp]] = {}
        self._queued: list[list[object]] = []
        self._out = bytearray()
        self._fds: deque[int] = deque()
        self._fd_rids: set[int] = set()
        """Requests whose ok reply carries a file descriptor (BACKUP), answered or not."""
        self._rids = itertools.count(1)
        self.lost = False

    @property
    def dispatcher(self) -> GreenDispatcher:
        return self._dispatcher

    # ------------------------------------------------------------------ requests
    def call(self, op: RequestOp, timeout_s: float, *args: object,
             wait_s: float | None = None) -> Reply | object:
        """Ask the Raft process; the Reply, or TIMED_OUT after `wait_s` (default: timeout_s),
        or LOST. Only from a request greenlet."""
        if self.lost:
            return LOST
        rid = next(self._rids)
        self._queued.append(codec.encode_request(rid, op, timeout_s, *args))
        if op is RequestOp.BACKUP:
            self._fd_rids.add(rid)
        deadline = time.monotonic() + (timeout_s if wait_s is None else wait_s)
        handle, wait = self._dispatcher.suspend(deadline)
        self._pending[rid] = (handle, op)
        outcome: Reply | object = wait()
        if outcome is TIMED_OUT:
            self._pending.pop(rid, None)
        return outcome

    def send_frame(self, kind: int, payload: bytes) -> None:
        self._out += encode_frame(kind, payload)
        self._write()

    def flush(self) -> None:
        """Send what the greenlets queued, in one frame (after each round of greenlets)."""
        if self._queued and not self.lost:
            queued, self._queued = self._queued, []
            for batch, payload in payloads_within(queued, codec.pack_batch,
                                                  MAX_REQUESTS_FRAME_BYTES, _request_bytes):
                self._stats.observe_batch(len(batch))
                self._out += encode_frame(FrameKind.WORKER_REQUESTS, payload)
            self._write()

    def _write(self) -> None:
        if not self._out or self.lost:
            return
        try:
            sent = self.socket.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lose(f"write failed: {e.strerror or e}")
            return
        del self._out[:sent]

    # ------------------------------------------------------------------ wasyncore
    def readable(self) -> bool:
        return not self.lost

    def writable(self) -> bool:
        return bool(self._out) and not self.lost

    def handle_write(self) -> None:
        self._write()

    def handle_read(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.socket, _READ_BYTES, _MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lose(f"read failed: {e.strerror or e}")
            return
        self._fds.extend(fds)
        if not data:
            self._lose("the Raft process closed the channel")
            return
        try:
            frames = self._decoder.feed(data)
            for kind, payload in frames:
                if kind == FrameKind.WORKER_REPLIES:
                    self._replies(payload)
                elif kind == FrameKind.WORKER_PUSH:
                    view = codec.unpack_value(payload, "push")
                    if isinstance(view, dict):
                        self._on_push(view)
        except (FrameError, codec.DecodeError) as e:
            self._lose(f"protocol error: {e}")

    def handle_close(self) -> None:
        self._lose("the channel closed")

    def handle_error(self) -> None:  # an exception escaped a handler: log it, keep serving
        log.exception("event=channel_handler_failed")

    def _replies(self, payload: bytes) -> None:
        dispatcher = self._dispatcher
        pending = self._pending
        for reply in codec.decode_replies(payload):
            entry = pending.pop(reply.rid, None)
            fd = None
            if reply.rid in self._fd_rids:  # its file came with it (also if nobody waits)
                self._fd_rids.discard(reply.rid)
                if reply.ok and self._fds:
                    fd = self._fds.popleft()
            if entry is None:
                if fd is not None:
                    os.close(fd)
                continue
            answer = reply if fd is None else reply._replace(fd=fd)
            if not dispatcher.resume(entry[0], answer) and fd is not None:
                os.close(fd)

    def _lose(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = True
        log.warning("event=raft_process_lost reason=%s waiting=%d", reason, len(self._pending))
        pending, self._pending = self._pending, {}
        for handle, _op in pending.values():
            self._dispatcher.resume(handle, LOST)
        with contextlib.suppress(OSError):
            self.del_channel()
            self.socket.close()
        while self._fds:
            os.close(self._fds.popleft())
        self._on_lost()
