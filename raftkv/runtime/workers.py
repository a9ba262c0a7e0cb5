"""The HTTP worker processes of a node: started, watched, restarted and stopped by the Raft
process, and the Raft side of the channel each one talks on.

Each worker is `python -m raftkv.worker CONFIG` with two inherited file descriptors: the HTTP
listening socket (bound by the Raft process, shared by all workers: a worker that dies loses
no queued connection) and its end of a Unix socket pair, the channel. A worker that exits is
restarted with back-off while the others keep serving; the channel's frames are
raftkv.codec's WORKER_* (versioned msgpack), one batch of requests per frame one way and one
batch of replies per loop turn the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from raftkv import codec
from raftkv.codec import FrameKind
from raftkv.metrics import NodeMetrics
from raftkv.runtime.connection import Connection
from raftkv.runtime.eventloop import EPOLLIN, EventLoop, Timer
from raftkv.runtime.requests import RequestHandler
from raftkv.service import InvalidRequestError, ServiceError

__all__ = ["WorkerChannel", "WorkerSupervisor"]

log = logging.getLogger(__name__)

CHANNEL_MAX_FRAME_BYTES: Final = 256 << 20
"""The largest frame either end of a channel reads (raftkv.worker.channel.MAX_FRAME_BYTES)."""
RESTART_BACKOFF_MIN_S: Final = 0.1
RESTART_BACKOFF_MAX_S: Final = 5.0
HEALTHY_AFTER_S: Final = 30.0
"""A worker that lived this long starts over from the shortest back-off when it dies."""


class WorkerChannel:
    """The Raft process's end of one worker's channel (the handler's Replier)."""

    def __init__(self, loop: EventLoop, sock: socket.socket, index: int,
                 handler: RequestHandler, metrics: NodeMetrics,
                 on_closed: Callable[[WorkerChannel, str], None]) -> None:
        self.index = index
        self._handler = handler
        self._metrics = metrics
        self._on_closed = on_closed
        self._replies: list[list[object]] = []
        self.stats: dict[str, Any] = {}
        self.pid = 0
        self.ready = False
        self.conn = Connection(loop, sock, max_frame_bytes=CHANNEL_MAX_FRAME_BYTES,
                               on_frames=self._on_frames,
                               on_closed=lambda reason: on_closed(self, reason),
                               name=f"worker {index}")

    # ------------------------------------------------------------------ Replier
    def reply_ok(self, rid: int, payload: object, fd: int | None = None) -> None:
        if fd is None:
            self._replies.append([rid, 0, payload])
            return
        self.flush()  # the frame that carries the fd goes on its own
        self.conn.send_frame_with_fd(FrameKind.WORKER_REPLIES,
                                     codec.pack_batch([[rid, 0, payload]]), fd)
        self.conn.flush()

    def reply_error(self, rid: int, error: ServiceError) -> None:
        self._replies.append([rid, 1, [error.code, error.message, error.details()]])

    # ------------------------------------------------------------------ the rest
    @property
    def has_output(self) -> bool:
        return bool(self._replies) or self.conn.out_bytes > 0

    def push(self, view: dict[str, object]) -> None:
        self.conn.send_frame(FrameKind.WORKER_PUSH, codec.pack_value(view))
        self.conn.flush()

    def flush(self) -> None:
        """End of the turn: this turn's replies in one frame."""
        if self._replies:
            replies, self._replies = self._replies, []
            payload = codec.pack_batch(replies)
            if len(payload) < CHANNEL_MAX_FRAME_BYTES:
                self.conn.send_frame(FrameKind.WORKER_REPLIES, payload)
            else:
                self._send_one_by_one(replies)
        self.conn.flush()

    def _send_one_by_one(self, replies: list[list[object]]) -> None:
        """Replies too large for one frame together: a frame each, and a reply too large for
        any frame (the worker would drop the channel as broken) becomes an error."""
        for reply in replies:
            payload = codec.pack_batch([reply])
            if len(payload) >= CHANNEL_MAX_FRAME_BYTES:
                error = InvalidRequestError(
                    f"the answer is {len(payload)} bytes, over the {CHANNEL_MAX_FRAME_BYTES} "
                    "bytes an HTTP worker takes: ask for less (a smaller ?limit=)")
                log.warning("event=reply_too_large worker=%d bytes=%d", self.index,
                            len(payload))
                payload = codec.pack_batch([[reply[0], 1, [error.code, error.message,
                                                           error.details()]]])
            self.conn.send_frame(FrameKind.WORKER_REPLIES, payload)

    def close(self, reason: str) -> None:
        self.conn.close(reason)

    def _on_frames(self, frames: list[tuple[int, bytes]]) -> None:
        for kind, payload in frames:
            try:
                if kind == FrameKind.WORKER_REQUESTS:
                    requests = codec.decode_requests(payload)
                    self._metrics.channel_batch.observe(len(requests))
                    self._handler.handle(self, requests)
                elif kind == FrameKind.WORKER_STATS:
                    stats = codec.unpack_value(payload, "stats")
                    if isinstance(stats, dict):
                        self.stats = stats
                elif kind == FrameKind.WORKER_HELLO:
                    hello = codec.unpack_value(payload, "hello")
                    if isinstance(hello, list) and hello and type(hello[-1]) is int:
                        self.pid = hello[-1]
                    self.ready = True
                else:
                    raise codec.DecodeError(f"unexpected frame kind {kind}")
            except codec.DecodeError as e:
                log.error("event=worker_protocol_error worker=%d error=%s", self.index, e)
                self.conn.close(f"protocol error: {e}")
                return


class _Worker:
    __slots__ = ("backoff_s", "channel", "index", "pidfd", "proc", "restart_timer",
                 "restarts", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.channel: WorkerChannel | None = None
        self.started = 0.0
        self.restarts = 0
        self.backoff_s = RESTART_BACKOFF_MIN_S
        self.restart_timer: Timer | None = None


class WorkerSupervisor:
    def __init__(self, loop: EventLoop, *, count: int, listen_sock: socket.socket,
                 config: dict[str, object], handler: RequestHandler, metrics: NodeMetrics,
                 view: Callable[[], dict[str, object]]) -> None:
        self._loop = loop
        self._listen = listen_sock
        self._config = config
        self._handler = handler
        self._metrics = metrics
        self._view = view
        self._workers = [_Worker(i) for i in range(count)]
        self._stopping = False
        self.on_all_exited: Callable[[], None] | None = None

    @property
    def channels(self) -> list[WorkerChannel]:
        return [w.channel for w in self._workers if w.channel is not None]

    def start(self) -> None:
        for worker in self._workers:
            self._spawn(worker)

    def flush(self) -> bool:
        """End-of-turn hook: every channel's replies."""
        for worker in self._workers:
            channel = worker.channel
            if channel is not None and channel.has_output:
                channel.flush()
        return False

    def push(self) -> None:
        view = self._view()
        for channel in self.channels:
            channel.push(view)

    def stats(self) -> dict[int, dict[str, Any]]:
        return {w.index: w.channel.stats for w in self._workers
                if w.channel is not None and w.channel.stats}

    def describe(self) -> list[dict[str, object]]:
        """Per worker: pid, up, restarts, requests answered, and the frames it sent the Raft
        process with the mean requests per frame (its channel batch size), as of its last
        stats report (about once a second)."""
        rows: list[dict[str, object]] = []
        for w in self._workers:
            stats = w.channel.stats if w.channel is not None else {}
            frames, batched = (stats.get("batches") or (0, 0))[:2]
            rows.append({"index": w.index, "pid": w.proc.pid if w.proc else None,
                         "up": w.proc is not None and w.proc.poll() is None,
                         "restarts": w.restarts,
                         "requests": sum(row[3] for row in stats.get("requests", ())),
                         "frames": frames,
                         "requests_per_frame": round(batched / frames, 2) if frames else 0.0})
        return rows

    # ------------------------------------------------------------------ processes
    def _spawn(self, worker: _Worker) -> None:
        worker.restart_timer = None
        if self._stopping:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen_fd = self._listen.fileno()
        config = dict(self._config, index=worker.index, listen_fd=listen_fd,
                      channel_fd=child.fileno())
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "raftkv.worker", json.dumps(config)],
                pass_fds=(listen_fd, child.fileno()), close_fds=True)
        except OSError as e:
            parent.close()
            child.close()
            log.error("event=worker_start_failed worker=%d error=%s", worker.index, e)
            self._schedule_restart(worker)
            return
        child.close()
        worker.proc = proc
        worker.started = time.monotonic()
        worker.pidfd = os.pidfd_open(proc.pid)
        self._loop.register(worker.pidfd, EPOLLIN, lambda _mask: self._exited(worker))
        worker.channel = WorkerChannel(self._loop, parent, worker.index, self._handler,
                                       self._metrics, self._channel_closed)
        worker.channel.push(self._view())
        log.debug("event=worker_started worker=%d pid=%d", worker.index, proc.pid)

    def _channel_closed(self, channel: WorkerChannel, reason: str) -> None:
        log.debug("event=worker_channel_closed worker=%d reason=%s", channel.index, reason)

    def _exited(self, worker: _Worker) -> None:
        proc = worker.proc
        if worker.pidfd is not None:
            self._loop.unregister(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None
        if worker.channel is not None:
            worker.channel.close("the worker exited")
            worker.channel = None
        status = proc.wait() if proc is not None else 0
        if self._stopping:
            worker.proc = None
            log.debug("event=worker_stopped worker=%d status=%s", worker.index, status)
            if self.on_all_exited is not None and self.all_exited:
                self.on_all_exited()
            return
        lived = time.monotonic() - worker.started
        log.warning("event=worker_exited worker=%d pid=%s status=%s lived_s=%.1f "
                    "action=restart", worker.index, proc.pid if proc else "-", status, lived)
        if lived >= HEALTHY_AFTER_S:
            worker.backoff_s = RESTART_BACKOFF_MIN_S
        worker.restarts += 1
        self._metrics.worker_restarts.inc()
        self._schedule_restart(worker)

    def _schedule_restart(self, worker: _Worker) -> None:
        delay = worker.backoff_s
        worker.backoff_s = min(worker.backoff_s * 2, RESTART_BACKOFF_MAX_S)
        worker.restart_timer = self._loop.call_later(delay, lambda: self._spawn(worker))

    # ------------------------------------------------------------------ stopping
    @property
    def all_exited(self) -> bool:
        return all(w.proc is None or w.proc.poll() is not None for w in self._workers)

    def stop(self) -> None:
        """Ask every worker to finish what it serves and exit (SIGTERM); no restarts."""
        self._stopping = True
        for worker in self._workers:
            if worker.restart_timer is not None:
                worker.restart_timer.cancel()
            if worker.proc is not None and worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)
        if self.on_all_exited is not None and self.all_exited:
            self.on_all_exited()

    def kill(self) -> None:
        """The workers that did not stop in time."""
        for worker in self._workers:
            if worker.proc is not None and worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(1.0)
