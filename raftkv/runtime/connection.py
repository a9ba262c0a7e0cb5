"""A framed, non-blocking stream socket on the event loop: the one kind of connection of the
Raft process (to peers, from peers, to its HTTP workers).

Reading: whenever the socket is readable, read what is there (a bounded number of recv calls
per turn, so one busy connection cannot starve the others), cut it into frames
(raftkv.framing) and hand them to `on_frames` in one call. Writing: `send_frame` only queues;
`flush` writes as much as the socket takes without blocking and asks the loop for
writability while anything is left. A file descriptor can travel with a frame
(`send_frame_with_fd`, SCM_RIGHTS on a Unix socket). `start_tls` puts the connection in TLS
(ssl.SSLObject over memory BIOs: the same non-blocking socket, encrypted): frames queued
before the TLS handshake finishes are sent once it has.

Any error on the socket, or a FrameError, closes the connection and calls `on_closed` once
with the reason; nothing raised here reaches the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from raftkv.framing import FrameDecoder, FrameError, frame_header
from raftkv.runtime.eventloop import EPOLLIN, EPOLLOUT, EventLoop

__all__ = ["Connection"]

log = logging.getLogger(__name__)

READ_BYTES: Final = 256 << 10
READS_PER_TURN: Final = 16
MAX_IOV: Final = 512
"""Buffers per sendmsg() (Linux takes up to 1024)."""
HEAD_BYTES: Final = 2


@dataclass(slots=True)
class _FdChunk:
    data: bytes
    fd: int


OnFrames = Callable[[list[tuple[int, bytes]]], None]
OnClosed = Callable[[str], None]


class Connection:
    __slots__ = ("_closed", "_decoder", "_incoming", "_loop", "_on_closed", "_on_frames",
                 "_on_tls_ready", "_out", "_outgoing", "_plain", "_tls", "_tls_ready",
                 "_want_write", "fd", "head", "name", "out_bytes", "sock")

    def __init__(self, loop: EventLoop, sock: socket.socket, *, max_frame_bytes: int,
                 on_frames: OnFrames, on_closed: OnClosed, name: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self._loop = loop
        self._decoder = FrameDecoder(max_frame_bytes)
        self._on_frames = on_frames
        self._on_closed = on_closed
        self._out: list[bytes | memoryview | _FdChunk] = []
        self.out_bytes = 0
        """Bytes queued and not yet written."""
        self._want_write = False
        self._closed = False
        self._tls: ssl.SSLObject | None = None
        self._tls_ready = False
        self._incoming = self._outgoing = None  # type: ssl.MemoryBIO | None
        self._plain: list[bytes] = []
        """TLS: plaintext waiting to be encrypted (until the TLS handshake is done)."""
        self._on_tls_ready: Callable[[], None] | None = None
        self.head = b""
        """The first bytes read off the socket (up to HEAD_BYTES, before any TLS): enough to
        tell a TLS record from a frame when a handshake fails."""
        loop.register(self.fd, EPOLLIN, self._on_events)

    @property
    def closed(self) -> bool:
        return self._closed

    def set_handlers(self, on_frames: OnFrames, on_closed: OnClosed) -> None:
        self._on_frames = on_frames
        self._on_closed = on_closed

    def set_max_frame_bytes(self, max_frame_bytes: int) -> None:
        self._decoder.max_frame_bytes = max_frame_bytes

    # ------------------------------------------------------------------ TLS
    def start_tls(self, context: ssl.SSLContext, *, server_side: bool,
                  on_ready: Callable[[], None] | None = None) -> None:
        """Speak TLS from now on (before anything else was sent or read)."""
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._on_tls_ready = on_ready
        if not server_side:
            self._handshake()  # the ClientHello
            self._move_tls_output()
            self.flush()

    @property
    def tls(self) -> bool:
        return self._tls is not None

    def peer_certificate(self) -> dict[str, object] | None:
        """The verified certificate of the other end (TLS only, after its handshake)."""
        if self._tls is None or not self._tls_ready:
            return None
        cert = self._tls.getpeercert()
        return dict(cert) if cert else None

    def _handshake(self) -> None:
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return
        self._tls_ready = True
        if self._on_tls_ready is not None:
            self._on_tls_ready()

    def _move_tls_output(self) -> None:
        """Encrypt what waits (once the TLS handshake is done) and queue the TLS records."""
        tls, outgoing = self._tls, self._outgoing
        assert tls is not None and outgoing is not None
        if self._tls_ready and self._plain:
            plain, self._plain = self._plain, []
            tls.write(b"".join(plain))
        records = outgoing.read()
        if records:
            self._out.append(records)

    # ------------------------------------------------------------------ writing
    def send_frame(self, kind: int, payload: bytes) -> None:
        """Queue a frame (flush() writes it)."""
        if self._closed:
            return
        queue = self._out if self._tls is None else self._plain
        queue.append(frame_header(kind, len(payload)))
        queue.append(payload)
        self.out_bytes += len(payload) + 5

    def send_frame_with_fd(self, kind: int, payload: bytes, fd: int) -> None:
        """Queue a frame that carries `fd` (a dup is sent; the caller keeps `fd`)."""
        if self._closed:
            return
        self._out.append(_FdChunk(frame_header(kind, len(payload)) + payload, os.dup(fd)))
        self.out_bytes += len(payload) + 5

    def flush(self) -> None:
        """Write what the socket takes now; the rest when it becomes writable."""
        if self._closed:
            return
        if self._tls is not None:
            try:
                self._move_tls_output()
            except ssl.SSLError as e:
                self.close(f"TLS failed: {e.reason or e}")
                return
        if not self._out:
            return
        out = self._out
        sock = self.sock
        try:
            while out:
                first = out[0]
                if isinstance(first, _FdChunk):
                    sent = socket.send_fds(sock, [first.data], [first.fd])
                    os.close(first.fd)
                    if sent < len(first.data):
                        out[0] = memoryview(first.data)[sent:]
                    else:
                        out.pop(0)
                    self.out_bytes -= sent
                    continue
                # The plain buffers up to the next fd chunk in one sendmsg(), as they are:
                # nothing queued is joined or copied (a large backlog would be, at every write).
                batch: list[bytes | memoryview] = [first]
                for item in out[1:MAX_IOV]:
                    if isinstance(item, _FdChunk):
                        break
                    batch.append(item)
                sent = sock.send(first) if len(batch) == 1 else sock.sendmsg(batch)
                if self._tls is None:
                    self.out_bytes -= sent
                done = 0
                while done < len(batch) and sent >= len(batch[done]):
                    sent -= len(batch[done])
                    done += 1
                del out[:done]
                if done < len(batch):  # the socket is full: keep a view of the rest, no copy
                    out[0] = memoryview(batch[done])[sent:]
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self.close(f"write failed: {e.strerror or e}")
            return
        if self._tls is not None:
            self.out_bytes = sum(map(len, self._plain)) + sum(
                len(x) for x in out if not isinstance(x, _FdChunk))
        want = bool(out)
        if want != self._want_write:
            self._want_write = want
            with contextlib.suppress(OSError, ValueError):
                self._loop.modify(self.fd, EPOLLIN | EPOLLOUT if want else EPOLLIN)

    # ------------------------------------------------------------------ reading
    def _on_events(self, mask: int) -> None:
        if mask & EPOLLOUT:
            self.flush()
        if mask & EPOLLIN and not self._closed:
            self._read()

    def _read(self) -> None:
        sock = self.sock
        decoder = self._decoder
        frames: list[tuple[int, bytes]] = []
        reason = ""
        for _ in range(READS_PER_TURN):
            try:
                data = sock.recv(READ_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                reason = f"read failed: {e.strerror or e}"
                break
            if not data:
                reason = "closed by the other side"
                break
            more = len(data) == READ_BYTES
            if len(self.head) < HEAD_BYTES:
                self.head += data[:HEAD_BYTES - len(self.head)]
            if self._tls is not None:
                try:
                    data = self._tls_read(data)
                except ssl.SSLError as e:
                    reason = f"TLS failed: {e.reason or e}"
                    break
            try:
                frames.extend(decoder.feed(data))
            except FrameError as e:
                reason = str(e)
                break
            if not more:
                break
        if frames:
            self._on_frames(frames)
        if reason:
            self.close(reason)

    def _tls_read(self, data: bytes) -> bytes:
        """Raw TLS records in, the plaintext they carry out (b"" during the handshake)."""
        tls, incoming = self._tls, self._incoming
        assert tls is not None and incoming is not None
        incoming.write(data)
        if not self._tls_ready:
            self._handshake()
            self._move_tls_output()
            self.flush()
            if not self._tls_ready:
                return b""
        chunks = []
        while True:
            try:
                chunk = tls.read(READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if self._plain:  # frames queued during the handshake
            self.flush()
        return b"".join(chunks)

    # ------------------------------------------------------------------ closing
    def close(self, reason: str = "closed") -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.unregister(self.fd)
        for item in self._out:
            if isinstance(item, _FdChunk):
                with contextlib.suppress(OSError):
                    os.close(item.fd)
        self._out.clear()
        self.out_bytes = 0
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self._on_closed(reason)
        except Exception:  # a handler's bug must not take the loop down
            log.exception("event=connection_close_handler_failed connection=%s", self.name)
