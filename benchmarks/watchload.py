"""The watch benchmark's load: many concurrent watches on one node while a paced writer writes.

Watchers: `WatchSpec.watchers` (watcher id, key id) pairs per process, every one on a socket of
its own, all driven by ONE selector loop per process (as benchmarks.loadgen's workers are).

- raftkv: a long poll, `GET /keys/<key>?wait=true&index=<n>&timeout=<s>`. An answer with
  "changed": true is an observation (the key's index then); the watch is armed again from the
  highest index it has seen. An answer with "changed": false (its time ran out) is re-armed the
  same way. raftkv keeps no history: a key written twice before its watch is armed again shows
  its latest state only (the earlier change is *coalesced* into the later one).
- etcd: one `POST /v3/watch` stream per watcher (the v3 gRPC gateway streams one JSON object
  per event, chunked), created with start_revision = the first revision of the run, so it
  replays what it has not seen; never re-armed (etcd's watches do not time out).

Writer: `WriterSpec.conns` keep-alive connections, paced: connection j sends its m-th write at
go + (j + m * conns) / rate, or as soon as its previous write is answered if that is later
(one request in flight per connection). Writes alternate between the watched keys and as many
unwatched ones; each connection owns its keys (key id % conns == j), so the writes to one key
are sequential and the last acknowledged value of every key is known exactly (the read-back
checks them as for every write run). Each write's send time, acknowledgement time and index
(raftkv's "index", etcd's header revision) are kept.

The check (`match_deliveries`): every watcher of a key must observe, for every acknowledged
write of that key, an index >= that write's index (that change or a later one). One that does
not by the end of the grace period is a MISSED change, which fails the run like a lost write.
The delivery delay of a change at a watcher is the time the watcher received the first answer
with an index >= the write's index, less the time the writer SENT that write (both
time.perf_counter(), CLOCK_MONOTONIC, one clock for every process of the machine); it includes
the write's own commit. The delay after the acknowledgement is given too (negative when the
watch answered before the writer had its acknowledgement). Delays are those of the writes sent
inside the measurement window.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import re
import selectors
import signal
import socket
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

from benchmarks.loadgen import (
    Endpoint,
    LoadError,
    ProtocolError,
    System,
    WindowObserver,
    auth_header,
    codec_for,
    connect_nonblocking,
    expect,
    key_name,
    parse_response,
    receive,
    value_for,
)

__all__ = [
    "DeliveryStats",
    "WatchLoadResult",
    "WatchSpec",
    "WatcherLog",
    "WriteLog",
    "WriterSpec",
    "etcd_message",
    "match_deliveries",
    "run_watch_load",
]

_READY: Final = "ready"
_ARMED: Final = "armed"
_GO: Final = "go"
_FINISH: Final = "finish"
_WINDOW_OPEN: Final = "window-open"
_WINDOW_CLOSED: Final = "window-closed"
_RECV_BYTES: Final = 65536
_RETRY_S: Final = 0.2
_LOOP_TICK_S: Final = 0.05
_SPAWN_TIMEOUT_S: Final = 120.0
_ARM_TIMEOUT_S: Final = 60.0
"""etcd: how long the streams may take to say they are registered."""
_WATCH_SLACK_S: Final = 10.0
"""A long poll not answered this long past its own timeout is dropped and armed again."""
_RAFTKV_INDEX: Final = re.compile(rb'"index":\s*(\d+)')
_ETCD_REVISION: Final = re.compile(rb'"revision":\s*"?(\d+)')


# --------------------------------------------------------------------------- specs, results
@dataclass(frozen=True, slots=True)
class WatchSpec:
    system: System
    endpoint: Endpoint
    watchers: tuple[tuple[int, int], ...]
    """(watcher id, key id) of each watch of this process."""
    start_index: int
    """Changes after this index count (etcd: start_revision = start_index + 1)."""
    timeout_s: float
    """raftkv's long-poll timeout."""
    token: str | None = None
    """raftkv: sent as `Authorization: Bearer <token>` with every watch (None: no header)."""


@dataclass(frozen=True, slots=True)
class WriterSpec:
    system: System
    endpoint: Endpoint
    conns: int
    rate: float
    """Writes per second, all connections together."""
    watched: tuple[int, ...]
    unwatched: tuple[int, ...]
    run_tag: str
    value_bytes: int
    warmup_s: float
    seconds: float
    request_timeout_s: float
    token: str | None = None
    """raftkv: sent as `Authorization: Bearer <token>` with every write (None: no header)."""


@dataclass(slots=True)
class WriteLog:
    """The writer's record: every write it sent, and what became of it."""

    key_id: array[int] = field(default_factory=lambda: array("q"))
    sent: array[float] = field(default_factory=lambda: array("d"))
    acked_at: array[float] = field(default_factory=lambda: array("d"))
    """0.0: not acknowledged (an error, a timeout: outcome unknown)."""
    index: array[int] = field(default_factory=lambda: array("q"))
    """The acknowledged write's index (raftkv) or revision (etcd); 0 if not acknowledged."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failures inside the window by kind."""
    acked: dict[int, str] = field(default_factory=dict)
    unknown: dict[int, list[str]] = field(default_factory=dict)
    window_start: float = 0.0
    window_end: float = 0.0
    cpu_s: float = 0.0

    @property
    def window_s(self) -> float:
        return self.window_end - self.window_start

    def completed_in_window(self) -> int:
        return sum(1 for s, a in zip(self.sent, self.acked_at, strict=True)
                   if a and self.window_start <= a < self.window_end)

    def latencies_s(self) -> list[float]:
        """Of the writes acknowledged inside the window."""
        return sorted(a - s for s, a in zip(self.sent, self.acked_at, strict=True)
                      if a and self.window_start <= a < self.window_end)


@dataclass(slots=True)
class WatcherLog:
    """One watch process's record: every answer with a change, by watcher."""

    observed: dict[int, tuple[array[int], array[float]]] = field(default_factory=dict)
    """watcher id -> (indices seen, times received), in the order received."""
    rearmed_after_timeout: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0
    active_s: float = 0.0


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    expected: int
    """(acknowledged write of a watched key, watcher of that key) pairs."""
    delivered: int
    coalesced: int
    """Pairs delivered by an answer with a later index (the key changed again first)."""
    missed: tuple[tuple[int, int, int], ...]
    """(watcher id, key id, index) of each change a watcher never saw."""
    from_send_s: tuple[float, ...]
    """Sorted delays from the write's send, for the writes sent inside the window."""
    from_ack_s: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class WatchLoadResult:
    writes: WriteLog
    watchers: tuple[WatcherLog, ...]
    deliveries: DeliveryStats
    watcher_keys: dict[int, int]

    @property
    def generator_cpu_cores(self) -> float:
        cores = self.writes.cpu_s / self.writes.window_s if self.writes.window_s > 0 else 0.0
        return cores + sum(w.cpu_s / w.active_s for w in self.watchers if w.active_s > 0)

    def errors(self) -> dict[str, int]:
        total = dict(self.writes.errors)
        for w in self.watchers:
            for kind, n in w.errors.items():
                total[f"watch_{kind}"] = total.get(f"watch_{kind}", 0) + n
        return total


# --------------------------------------------------------------------------- the check
def match_deliveries(writes: WriteLog, watcher_keys: Mapping[int, int],
                     observed: Mapping[int, tuple[Sequence[int], Sequence[float]]]
                     ) -> DeliveryStats:
    """Pair every acknowledged write of a watched key with each watcher of that key (module
    doc): the first observation with an index >= the write's. Observations are in the order a
    watcher received them; their indices never go down (each watch starts from the highest
    index seen), so the first such observation is found by a scan from the last match."""
    writes_by_key: dict[int, list[tuple[int, float, float]]] = {}
    for k, s, a, i in zip(writes.key_id, writes.sent, writes.acked_at, writes.index,
                          strict=True):
        if a:
            writes_by_key.setdefault(k, []).append((i, s, a))
    for rows in writes_by_key.values():
        rows.sort()
    lo, hi = writes.window_start, writes.window_end
    expected = delivered = coalesced = 0
    missed: list[tuple[int, int, int]] = []
    from_send: list[float] = []
    from_ack: list[float] = []
    for watcher, key in sorted(watcher_keys.items()):
        indices, times = observed.get(watcher, ((), ()))
        # Running maximum: an answer can only confirm the changes up to its index.
        at = 0
        for index, sent, acked in writes_by_key.get(key, ()):
            expected += 1
            while at < len(indices) and indices[at] < index:
                at += 1
            if at == len(indices):
                missed.append((watcher, key, index))
                continue
            delivered += 1
            if indices[at] > index:
                coalesced += 1
            if lo <= sent < hi:
                from_send.append(times[at] - sent)
                from_ack.append(times[at] - acked)
    return DeliveryStats(expected, delivered, coalesced, tuple(missed), tuple(sorted(from_send)),
                         tuple(sorted(from_ack)))


# --------------------------------------------------------------------------- watch requests
def raftkv_watch_request(host: str, key: str, after_index: int, timeout_s: float,
                         token: str | None = None) -> bytes:
    return (f"GET /keys/{key}?wait=true&index={after_index}&timeout={timeout_s:g} HTTP/1.1\r\n"
            f"Host: {host}\r\n{auth_header(token)}\r\n").encode()


def etcd_watch_request(host: str, key: str, start_revision: int) -> bytes:
    body = json.dumps({"create_request": {"key": base64.b64encode(key.encode()).decode(),
                                          "start_revision": start_revision}}).encode()
    return (f"POST /v3/watch HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class ChunkedLines:
    """The JSON lines of one streamed (chunked) HTTP response, as they arrive."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.head_done = False
        self.ended = False
        self._lines = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return []
            head = bytes(self.buf[:end]).lower()
            if not head.startswith(b"http/1."):
                raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
            self.status = int(head[9:12])
            if b"transfer-encoding: chunked" not in head:
                raise ProtocolError(f"the watch stream is not chunked (status {self.status})")
            del self.buf[:end + 4]
            self.head_done = True
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                break
            size = int(bytes(self.buf[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                self.ended = True
                break
            if len(self.buf) < line_end + 2 + size + 2:
                break
            self._lines += self.buf[line_end + 2:line_end + 2 + size]
            del self.buf[:line_end + 2 + size + 2]
        out = []
        while True:
            nl = self._lines.find(b"\n")
            if nl < 0:
                break
            line = bytes(self._lines[:nl]).strip()
            del self._lines[:nl + 1]
            if line:
                out.append(line)
        return out


@dataclass(frozen=True, slots=True)
class EtcdMessage:
    revisions: list[int]
    """mod_revision of each event."""
    created: bool = False
    """The watch is registered (its first message)."""
    error: str | None = None


def etcd_message(line: bytes) -> EtcdMessage:
    """One message of an etcd watch stream."""
    msg = json.loads(line)
    if "error" in msg:
        return EtcdMessage([], error=str(msg["error"])[:200])
    result = msg.get("result", {})
    if result.get("canceled"):
        return EtcdMessage([], error=f"canceled: {result.get('cancel_reason', '')}"[:200])
    return EtcdMessage([int(ev["kv"]["mod_revision"]) for ev in result.get("events", ())],
                       created=bool(result.get("created")))


# --------------------------------------------------------------------------- watch process
class _Watch:
    __slots__ = ("armed_at", "inbuf", "key", "last_index", "sock", "stream", "wid")

    def __init__(self, wid: int, key: int, start_index: int) -> None:
        self.wid = wid
        self.key = key
        self.last_index = start_index
        self.sock: socket.socket | None = None
        self.inbuf = bytearray()
        self.stream: ChunkedLines | None = None
        self.armed_at = 0.0


class _Watcher:
    def __init__(self, spec: WatchSpec, pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.host = str(spec.endpoint)
        self.sel = selectors.DefaultSelector()
        self.watches = [_Watch(wid, key, spec.start_index) for wid, key in spec.watchers]
        self.log = WatcherLog(observed={w.wid: (array("q"), array("d")) for w in self.watches})
        self.retry: list[_Watch] = []
        self.targets: dict[int, int] | None = None
        self.finish_by = 0.0
        self.created: set[int] = set()
        """etcd: the watches whose stream said it is registered."""
        self.armed_by = 0.0
        self.armed_sent = False

    def report_armed(self, now: float) -> None:
        """Tell the parent once every watch is armed: raftkv, once every request is sent (the
        parent asks the node how many it holds); etcd, once every stream said `created`."""
        if self.armed_sent:
            return
        if (self.spec.system is System.RAFTKV or len(self.created) == len(self.watches)
                or now >= self.armed_by):
            self.armed_sent = True
            self.pipe.send(_ARMED)

    def count(self, kind: str) -> None:
        self.log.errors[kind] = self.log.errors.get(kind, 0) + 1

    def arm(self, w: _Watch, now: float) -> None:
        if w.sock is None:
            sock = connect_nonblocking(self.spec.endpoint)
            if sock is None:
                self.count("connect_failed")
                self.retry.append(w)
                return
            w.sock = sock
            w.inbuf = bytearray()
            self.sel.register(sock, selectors.EVENT_READ, w)
        if self.spec.system is System.RAFTKV:
            request = raftkv_watch_request(self.host, key_name(w.key), w.last_index,
                                           self.spec.timeout_s, self.spec.token)
        else:
            w.stream = ChunkedLines()  # a stream broken off resumes after what it saw
            request = etcd_watch_request(self.host, key_name(w.key), w.last_index + 1)
        w.armed_at = now
        try:
            w.sock.sendall(request)  # small: the socket buffer takes it at once
        except OSError:
            self.broken(w, "send_failed")

    def broken(self, w: _Watch, kind: str) -> None:
        self.count(kind)
        if w.sock is not None:
            self.sel.unregister(w.sock)
            w.sock.close()
            w.sock = None
        self.retry.append(w)

    def observe(self, w: _Watch, index: int, now: float) -> None:
        if index <= w.last_index:
            return  # seen already (observations stay in increasing index order)
        indices, times = self.log.observed[w.wid]
        indices.append(index)
        times.append(now)
        w.last_index = index

    def on_readable(self, w: _Watch) -> None:
        assert w.sock is not None
        try:
            data = w.sock.recv(_RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            self.broken(w, "recv_failed")
            return
        now = time.perf_counter()
        if not data:
            self.broken(w, "closed_by_server")
            return
        if self.spec.system is System.ETCD:
            self.on_stream(w, data, now)
        else:
            self.on_long_poll(w, data, now)

    def on_long_poll(self, w: _Watch, data: bytes, now: float) -> None:
        w.inbuf += data
        try:
            parsed = parse_response(w.inbuf)
        except (ProtocolError, ValueError):
            self.broken(w, "bad_response")
            return
        if parsed is None:
            return
        status, consumed, body, keep_alive = parsed
        del w.inbuf[:consumed]
        if status != 200:
            self.count(f"http_{status}")
            self.retry.append(w)
        else:
            answer = json.loads(body)
            if answer.get("changed"):
                self.observe(w, int(answer["index"]), now)
            else:
                self.log.rearmed_after_timeout += 1
            if not keep_alive:
                self.broken(w, "closed_by_server")
                return
            self.arm(w, now)

    def on_stream(self, w: _Watch, data: bytes, now: float) -> None:
        assert w.stream is not None
        try:
            lines = w.stream.feed(data)
            for line in lines:
                msg = etcd_message(line)
                if msg.error is not None:
                    self.broken(w, "stream_error")
                    return
                if msg.created:
                    self.created.add(w.wid)
                for rev in msg.revisions:
                    self.observe(w, rev, now)
        except (ProtocolError, ValueError, KeyError):
            self.broken(w, "bad_response")
            return
        if w.stream.head_done and w.stream.status != 200:
            self.broken(w, f"http_{w.stream.status}")
        elif w.stream.ended:
            self.broken(w, "stream_ended")

    def done(self) -> bool:
        targets = self.targets
        if targets is None:
            return False
        if time.perf_counter() >= self.finish_by:
            return True
        return all(w.last_index >= targets.get(w.key, 0) for w in self.watches)

    def housekeeping(self, now: float) -> None:
        retry, self.retry = self.retry, []
        for w in retry:
            self.arm(w, now)
        if self.spec.system is System.RAFTKV:
            limit = self.spec.timeout_s + _WATCH_SLACK_S
            for w in self.watches:
                if w.sock is not None and now - w.armed_at > limit:
                    self.broken(w, "no_answer")

    def run(self) -> WatcherLog:
        now = time.perf_counter()
        self.armed_by = now + _ARM_TIMEOUT_S
        for w in self.watches:
            self.arm(w, now)
        self.report_armed(now)
        cpu0, t0 = time.process_time(), time.perf_counter()
        self.sel.register(self.pipe.fileno(), selectors.EVENT_READ, None)
        next_tick = t0 + _LOOP_TICK_S
        while not self.done():
            now = time.perf_counter()
            if now >= next_tick:
                next_tick = now + _LOOP_TICK_S
                self.housekeeping(now)
                self.report_armed(now)
            for key, _mask in self.sel.select(max(0.0, next_tick - now)):
                if key.data is None:
                    message = self.pipe.recv()
                    if isinstance(message, tuple) and message[0] == _FINISH:
                        _, targets, grace_s = message
                        self.targets = dict(targets)
                        self.finish_by = time.perf_counter() + float(grace_s)
                    continue
                self.on_readable(key.data)
        self.log.cpu_s = time.process_time() - cpu0
        self.log.active_s = time.perf_counter() - t0
        for w in self.watches:
            if w.sock is not None:
                w.sock.close()
        return self.log


def _watcher_main(spec: WatchSpec, pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe.send(_READY)
    if pipe.recv() != _GO:
        return
    pipe.send(_Watcher(spec, pipe).run())


# --------------------------------------------------------------------------- writer process
class _WConn:
    __slots__ = ("due", "inbuf", "j", "keys", "n", "pending", "seq", "sock", "started")

    def __init__(self, j: int, keys: list[int]) -> None:
        self.j = j
        self.keys = keys
        self.n = 0
        self.seq = 0
        self.due = 0.0
        self.sock: socket.socket | None = None
        self.inbuf = bytearray()
        self.pending: tuple[int, str, int] | None = None
        """(key id, value, position in the log) of the write in flight."""
        self.started = 0.0


def writer_keys(spec: WriterSpec, j: int) -> list[int]:
    """Connection j's keys, in the order it writes them: its watched and unwatched keys
    alternately (key id % conns == j)."""
    mine_w = [k for k in spec.watched if k % spec.conns == j]
    mine_u = [k for k in spec.unwatched if k % spec.conns == j]
    order: list[int] = []
    for i in range(max(len(mine_w), len(mine_u))):
        if i < len(mine_w):
            order.append(mine_w[i])
        if i < len(mine_u):
            order.append(mine_u[i])
    return order


class _Writer:
    def __init__(self, spec: WriterSpec, pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.codec = codec_for(spec.system, spec.endpoint, spec.token)
        self.sel = selectors.DefaultSelector()
        self.conns = [_WConn(j, writer_keys(spec, j)) for j in range(spec.conns)]
        self.conns = [c for c in self.conns if c.keys]
        self.log = WriteLog()
        self.index_re = _RAFTKV_INDEX if spec.system is System.RAFTKV else _ETCD_REVISION

    def in_window(self, now: float) -> bool:
        return self.log.window_start <= now < self.log.window_end

    def count(self, kind: str, now: float) -> None:
        if self.in_window(now):
            self.log.errors[kind] = self.log.errors.get(kind, 0) + 1

    def connect(self, c: _WConn) -> bool:
        sock = connect_nonblocking(self.spec.endpoint)
        if sock is None:
            return False
        c.sock = sock
        c.inbuf = bytearray()
        self.sel.register(sock, selectors.EVENT_READ, c)
        return True

    def drop(self, c: _WConn) -> None:
        if c.sock is not None:
            self.sel.unregister(c.sock)
            c.sock.close()
            c.sock = None

    def send(self, c: _WConn, now: float) -> None:
        spec = self.spec
        if c.sock is None and not self.connect(c):
            self.count("connect_failed", now)
            c.due = now + _RETRY_S
            return
        assert c.sock is not None
        key = c.keys[c.n % len(c.keys)]
        c.n += 1
        c.seq += 1
        value = value_for(spec.run_tag, 1000 + c.j, c.seq, spec.value_bytes)
        log = self.log
        c.pending = (key, value, len(log.key_id))
        log.key_id.append(key)
        log.sent.append(now)
        log.acked_at.append(0.0)
        log.index.append(0)
        c.started = now
        try:
            c.sock.sendall(self.codec.put(key_name(key), value))
        except OSError:
            self.fail(c, "send_failed", now)

    def settle(self, c: _WConn, acked: bool, index: int, now: float) -> None:
        assert c.pending is not None
        key, value, at = c.pending
        c.pending = None
        c.started = 0.0
        log = self.log
        if acked:
            log.acked_at[at] = now
            log.index[at] = index
            log.acked[key] = value
            log.unknown.pop(key, None)
        else:
            log.unknown.setdefault(key, []).append(value)

    def fail(self, c: _WConn, kind: str, now: float) -> None:
        self.count(kind, now)
        if c.pending is not None:
            self.settle(c, False, 0, now)
        self.drop(c)

    def on_readable(self, c: _WConn) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(_RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            self.fail(c, "recv_failed", time.perf_counter())
            return
        now = time.perf_counter()
        if not data:
            self.fail(c, "closed_by_server", now)
            return
        c.inbuf += data
        try:
            parsed = parse_response(c.inbuf)
        except (ProtocolError, ValueError):
            self.fail(c, "bad_response", now)
            return
        if parsed is None:
            return
        status, consumed, body, keep_alive = parsed
        del c.inbuf[:consumed]
        match = self.index_re.search(body) if status == 200 else None
        if match is None:
            self.count(f"http_{status}" if status != 200 else "no_index", now)
        if c.pending is not None:
            self.settle(c, match is not None, int(match.group(1)) if match else 0, now)
        if not keep_alive:
            self.drop(c)

    def run(self, go: float, report_window: bool) -> WriteLog:
        spec, log = self.spec, self.log
        log.window_start = go + spec.warmup_s
        log.window_end = log.window_start + spec.seconds
        for c in self.conns:
            c.due = go + c.j / spec.rate
        period = len(self.conns) / spec.rate
        window_open, issuing = False, True
        cpu0 = 0.0
        while True:
            now = time.perf_counter()
            if not window_open and now >= log.window_start:
                window_open = True
                cpu0 = time.process_time()
                if report_window:
                    self.pipe.send(_WINDOW_OPEN)
            if issuing and now >= log.window_end:
                issuing = False
                log.cpu_s = time.process_time() - cpu0
                if report_window:
                    self.pipe.send(_WINDOW_CLOSED)
            in_flight = 0
            wake = now + _LOOP_TICK_S
            for c in self.conns:
                if c.pending is not None:
                    in_flight += 1
                    if now - c.started > spec.request_timeout_s:
                        self.fail(c, "timeout", now)
                elif issuing:
                    if now >= c.due:
                        c.due = max(c.due + period, now)  # late: no burst to catch up
                        self.send(c, now)
                        in_flight += 1
                    else:
                        wake = min(wake, c.due)
            if not issuing and in_flight == 0:
                break
            if not window_open:
                wake = min(wake, log.window_start)
            elif issuing:
                wake = min(wake, log.window_end)
            for key, _mask in self.sel.select(max(0.0, wake - now)):
                self.on_readable(key.data)
        for c in self.conns:
            self.drop(c)
        return log


def _writer_main(spec: WriterSpec, pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    writer = _Writer(spec, pipe)
    for c in writer.conns:
        writer.connect(c)
    pipe.send(_READY)
    command, report_window = pipe.recv()
    if command != _GO:
        return
    pipe.send(writer.run(time.perf_counter(), report_window))


# --------------------------------------------------------------------------- the parent
def run_watch_load(watch_specs: Sequence[WatchSpec], writer_spec: WriterSpec,
                   observer: WindowObserver | None = None, grace_s: float = 10.0,
                   settle_s: float = 0.2,
                   registered: Callable[[], int | None] | None = None) -> WatchLoadResult:
    """Arm every watch, run the writer (the observer sees its window), then let the watchers
    catch up with the last acknowledged write of each key (at most `grace_s`).

    The writer starts once every watch is armed: an etcd stream says so; for raftkv long
    polls, `registered` (the watches the node holds, e.g. its /status; None: it does not
    say) is polled until it counts them all; then `settle_s` more."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []

    def start(target: Callable[[Any, Connection], None], spec: object) -> Connection:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=target, args=(spec, child_end), daemon=True, name="watchload")
        proc.start()
        child_end.close()
        procs.append((proc, parent_end))
        return parent_end

    try:
        watch_pipes = [start(_watcher_main, s) for s in watch_specs]
        writer_pipe = start(_writer_main, writer_spec)
        for pipe in [*watch_pipes, writer_pipe]:
            expect(pipe, _READY, _SPAWN_TIMEOUT_S)
        for pipe in watch_pipes:
            pipe.send(_GO)
        for pipe in watch_pipes:
            expect(pipe, _ARMED, _SPAWN_TIMEOUT_S + _ARM_TIMEOUT_S)
        if registered is not None:
            total = sum(len(s.watchers) for s in watch_specs)
            deadline = time.monotonic() + _ARM_TIMEOUT_S
            held = registered()
            while held is not None and held < total:  # None: the node does not say
                if time.monotonic() > deadline:
                    raise LoadError(f"the node holds {held} of the {total} watches "
                                    f"after {_ARM_TIMEOUT_S:g} s")
                time.sleep(_LOOP_TICK_S)
                held = registered()
        time.sleep(settle_s)
        writer_pipe.send((_GO, observer is not None))
        longest = (writer_spec.warmup_s + writer_spec.seconds
                   + 2 * writer_spec.request_timeout_s + 30)
        if observer is not None:
            expect(writer_pipe, _WINDOW_OPEN, longest)
            observer.window_opened()
            expect(writer_pipe, _WINDOW_CLOSED, longest)
            observer.window_closed()
        writes = receive(writer_pipe, longest)
        if not isinstance(writes, WriteLog):
            raise LoadError(f"the watch writer answered {writes!r}")
        targets: dict[int, int] = {}
        for k, i in zip(writes.key_id, writes.index, strict=True):
            if i:
                targets[k] = max(targets.get(k, 0), i)
        for pipe in watch_pipes:
            pipe.send((_FINISH, targets, grace_s))
        logs: list[WatcherLog] = []
        for pipe in watch_pipes:
            got = receive(pipe, grace_s + 30)
            if not isinstance(got, WatcherLog):
                raise LoadError(f"a watch process answered {got!r}")
            logs.append(got)
    finally:
        for proc, pipe in procs:
            pipe.close()
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
    watcher_keys = {wid: key for s in watch_specs for wid, key in s.watchers}
    observed: dict[int, tuple[array[int], array[float]]] = {}
    for log in logs:
        observed.update(log.observed)
    return WatchLoadResult(writes, tuple(logs), match_deliveries(writes, watcher_keys, observed),
                           watcher_keys)
