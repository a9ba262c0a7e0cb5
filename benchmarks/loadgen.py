"""A multi-process HTTP/1.1 load generator for the throughput benchmarks.

Each worker process drives its keep-alive connections from ONE selector loop over plain
non-blocking sockets: requests are pre-formatted bytes, responses are parsed only as far as the
status line, Content-Length (or chunked framing) and, for reads, a search for the expected value.
That costs far less CPU per request than `http.client` connections in threads (the GIL hand-offs
and the header parsing dominate there), so the generator stays out of the way of the servers.

Every connection has exactly one request in flight (closed loop) and owns its keys, so the
writes to one key are sequential and the last acknowledged value of every key is known exactly:
`WorkerResult.acked` is what a read-back must find, `WorkerResult.unknown` the values sent after
it whose outcome is unknown (an error or a timeout: they may or may not have been applied).

The window: after `go`, a worker runs `warmup_s` unmeasured, then measures `seconds` (requests
completed inside the window, their latencies, its own process CPU time), then stops issuing and
waits (bounded) for the requests still in flight, so that every write's outcome is settled.
"""

from __future__ import annotations

import base64
import enum
import json
import multiprocessing
import selectors
import signal
import socket
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Final, Protocol

__all__ = [
    "KEY_PREFIX",
    "ConnSpec",
    "Endpoint",
    "Kind",
    "LoadResult",
    "System",
    "WorkerResult",
    "WorkerSpec",
    "auth_header",
    "expect",
    "key_name",
    "preload_value",
    "receive",
    "run_load",
    "value_for",
]

KEY_PREFIX: Final = "bench/"
_READY: Final = "ready"
_GO: Final = "go"
_WINDOW_OPEN: Final = "window-open"
_WINDOW_CLOSED: Final = "window-closed"
_RECV_BYTES: Final = 65536
_CONNECT_TIMEOUT_S: Final = 5.0
_RECONNECT_BACKOFF_S: Final = 0.1
_LOOP_TICK_S: Final = 0.05
_MAX_HEADER_BYTES: Final = 64 * 1024
_SPAWN_TIMEOUT_S: Final = 60.0


class System(enum.Enum):
    RAFTKV = "raftkv"
    ETCD = "etcd"


class Kind(enum.Enum):
    PUT = "put"
    """One durable single-key write per request."""
    GET = "get"
    """One linearizable single-key read per request."""
    BATCH = "batch"
    """`batch_ops` durable writes in one request (raftkv POST /batch, etcd a txn of puts)."""
    WATCH = "watch"
    """Many watches while a paced writer writes (benchmarks.watchload runs it, not this)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ConnSpec:
    conn_id: int
    endpoint: Endpoint
    key_ids: tuple[int, ...]
    """The keys this connection owns, used in this order, round and round."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    system: System
    kind: Kind
    conns: tuple[ConnSpec, ...]
    run_tag: str
    value_bytes: int
    batch_ops: int
    warmup_s: float
    seconds: float
    request_timeout_s: float
    token: str | None = None
    """raftkv: sent as `Authorization: Bearer <token>` with every request (None: no header)."""


@dataclass(slots=True)
class WorkerResult:
    completed: int = 0
    """Requests answered 200 (and, for reads, with the expected value) inside the window."""
    latencies_s: array[float] = field(default_factory=lambda: array("d"))
    """Latency of every request completed inside the window, failed ones included."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failures inside the window by kind (`http_503`, `timeout`, `wrong_value`, ...)."""
    errors_outside_window: int = 0
    cpu_s: float = 0.0
    """This process's CPU time (user + system) during the window."""
    window_s: float = 0.0
    acked: dict[int, str] = field(default_factory=dict)
    """key id -> the value of the last acknowledged write (the whole run, warmup included)."""
    unknown: dict[int, list[str]] = field(default_factory=dict)
    """key id -> values written after `acked[key]` whose outcome is unknown."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    workers: tuple[WorkerResult, ...]

    @property
    def completed(self) -> int:
        return sum(w.completed for w in self.workers)

    @property
    def window_s(self) -> float:
        return max(w.window_s for w in self.workers)

    @property
    def generator_cpu_cores(self) -> float:
        return sum(w.cpu_s / w.window_s for w in self.workers if w.window_s > 0)

    def latencies_s(self) -> list[float]:
        merged: list[float] = []
        for w in self.workers:
            merged.extend(w.latencies_s)
        merged.sort()
        return merged

    def errors(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for w in self.workers:
            for kind, n in w.errors.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def acked(self) -> dict[int, str]:
        merged: dict[int, str] = {}
        for w in self.workers:
            merged.update(w.acked)
        return merged

    def unknown(self) -> dict[int, list[str]]:
        merged: dict[int, list[str]] = {}
        for w in self.workers:
            merged.update(w.unknown)
        return merged


# --------------------------------------------------------------------------- keys and values
def key_name(key_id: int) -> str:
    return f"{KEY_PREFIX}{key_id:05d}"


def value_for(run_tag: str, conn_id: int, seq: int, size: int) -> str:
    """A value of exactly `size` ASCII characters that names the run, connection and write."""
    head = f"{run_tag}.{conn_id}.{seq}."
    if len(head) > size:
        raise ValueError(f"values of {size} bytes are too small to be told apart")
    return head + "x" * (size - len(head))


def preload_value(key_id: int, size: int) -> str:
    return value_for("preload", 0, key_id, size)


# --------------------------------------------------------------------------- request formats
class Codec(Protocol):
    def put(self, key: str, value: str) -> bytes: ...

    def batch(self, items: Sequence[tuple[str, str]]) -> bytes: ...

    def get(self, key: str) -> bytes: ...

    def value_fragment(self, value: str) -> bytes:
        """How `value` appears, verbatim, in the body of a successful read."""
        ...


def _post(host: str, path: str, body: bytes, method: str = "POST", extra: str = "") -> bytes:
    """`extra`: more header lines, each ending in CRLF."""
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body



def connect_nonblocking(endpoint: Endpoint) -> socket.socket | None:
    """A TCP connection to `endpoint` with Nagle off, non-blocking once connected (for a
    selector); None when it cannot connect within _CONNECT_TIMEOUT_S."""
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port),
                                        timeout=_CONNECT_TIMEOUT_S)
    except OSError:
        return None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock

def auth_header(token: str | None) -> str:
    """The header line (CRLF included) that carries a raftkv token; empty for None."""
    if token is None:
        return ""
    if not token or any(c in token for c in "\r\n"):
        raise ValueError("a token is a non-empty single line")
    return f"Authorization: Bearer {token}\r\n"


class RaftkvCodec:
    """PUT /keys/<k> {"value": v}; POST /batch; GET /keys/<k>?consistency=linearizable.
    With a `token`, every request carries `Authorization: Bearer <token>`."""

    def __init__(self, host: str, token: str | None = None) -> None:
        self._host = host
        self._auth = auth_header(token)

    def put(self, key: str, value: str) -> bytes:
        return _post(self._host, f"/keys/{key}", b'{"value":"%s"}' % value.encode(), "PUT",
                     self._auth)

    def batch(self, items: Sequence[tuple[str, str]]) -> bytes:
        ops = [{"op": "put", "key": k, "value": v} for k, v in items]
        return _post(self._host, "/batch", json.dumps({"ops": ops}).encode(), "POST",
                     self._auth)

    def get(self, key: str) -> bytes:
        return (f"GET /keys/{key}?consistency=linearizable HTTP/1.1\r\n"
                f"Host: {self._host}\r\n{self._auth}\r\n").encode()

    def value_fragment(self, value: str) -> bytes:
        return b'"%s"' % value.encode()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdCodec:
    """etcd's v3 JSON gateway: /v3/kv/put, /v3/kv/txn (puts only), /v3/kv/range (linearizable
    by default). Keys and values are base64."""

    def __init__(self, host: str) -> None:
        self._host = host

    def put(self, key: str, value: str) -> bytes:
        body = f'{{"key":"{_b64(key)}","value":"{_b64(value)}"}}'
        return _post(self._host, "/v3/kv/put", body.encode())

    def batch(self, items: Sequence[tuple[str, str]]) -> bytes:
        puts = [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in items]
        return _post(self._host, "/v3/kv/txn", json.dumps({"success": puts}).encode())

    def get(self, key: str) -> bytes:
        return _post(self._host, "/v3/kv/range", b'{"key":"%s"}' % _b64(key).encode())

    def value_fragment(self, value: str) -> bytes:
        return b'"%s"' % _b64(value).encode()


def codec_for(system: System, endpoint: Endpoint, token: str | None = None) -> Codec:
    """`token`: raftkv's bearer token (etcd's auth is not benchmarked: ValueError)."""
    if system is System.RAFTKV:
        return RaftkvCodec(str(endpoint), token)
    if token is not None:
        raise ValueError("the etcd codec sends no token")
    return EtcdCodec(str(endpoint))


# --------------------------------------------------------------------------- HTTP framing
class ProtocolError(Exception):
    pass


def parse_response(buf: bytearray) -> tuple[int, int, bytes, bool] | None:
    """(status, bytes consumed, body, keep_alive) of the first complete response in buf."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buf) > _MAX_HEADER_BYTES:
            raise ProtocolError("response header too large")
        return None
    head = bytes(buf[:head_end]).lower()
    if not head.startswith(b"http/1."):
        raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
    status = int(head[9:12])
    keep_alive = b"\r\nconnection: close" not in head
    body_start = head_end + 4
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:line_end if line_end >= 0 else len(head)])
        end = body_start + length
        if len(buf) < end:
            return None
        return status, end, bytes(buf[body_start:end]), keep_alive
    if b"\r\ntransfer-encoding: chunked" in head:
        return _parse_chunked(buf, body_start, status, keep_alive)
    if status in (204, 304) or 100 <= status < 200:
        return status, body_start, b"", keep_alive
    raise ProtocolError("a response without Content-Length or chunked framing")


def _parse_chunked(buf: bytearray, pos: int, status: int,
                   keep_alive: bool) -> tuple[int, int, bytes, bool] | None:
    body = bytearray()
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            if trailer_end < 0:
                return None
            return status, trailer_end + 4, bytes(body), keep_alive
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos:pos + size]
        pos += size + 2


# --------------------------------------------------------------------------- one connection
class _Conn:
    """One keep-alive connection with at most one request in flight."""

    __slots__ = ("codec", "expected", "inbuf", "key_ids", "next_key", "outbuf", "pending",
                 "retry_at", "seq", "sock", "spec", "started")

    def __init__(self, spec: ConnSpec, codec: Codec) -> None:
        self.spec = spec
        self.codec = codec
        self.key_ids = spec.key_ids
        self.next_key = 0
        self.seq = 0
        self.sock: socket.socket | None = None
        self.inbuf = bytearray()
        self.outbuf = memoryview(b"")
        self.pending: list[tuple[int, str]] = []
        self.expected = b""
        self.started = 0.0
        self.retry_at = 0.0

    def take_keys(self, n: int) -> list[int]:
        ids = self.key_ids
        picked = []
        for _ in range(n):
            picked.append(ids[self.next_key])
            self.next_key = (self.next_key + 1) % len(ids)
        return picked


class _Worker:
    def __init__(self, spec: WorkerSpec, pipe: Connection | None) -> None:
        self.spec = spec
        self.pipe = pipe
        self.reports_window = False
        """Tell the parent when the window opens and closes (it samples the servers' CPU)."""
        self.sel = selectors.DefaultSelector()
        self.conns = [_Conn(c, codec_for(spec.system, c.endpoint, spec.token))
                      for c in spec.conns]
        self.result = WorkerResult()
        self.window_start = 0.0
        self.window_end = 0.0
        self.issuing = True
        self.in_flight = 0

    # ------------------------------------------------------------------ connections
    def connect(self, conn: _Conn) -> bool:
        sock = connect_nonblocking(conn.spec.endpoint)
        if sock is None:
            return False
        conn.sock = sock
        conn.inbuf = bytearray()
        conn.outbuf = memoryview(b"")
        self.sel.register(sock, selectors.EVENT_READ, conn)
        return True

    def drop(self, conn: _Conn) -> None:
        if conn.sock is not None:
            self.sel.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None

    # ------------------------------------------------------------------ requests
    def issue(self, conn: _Conn, now: float) -> None:
        spec = self.spec
        if conn.sock is None and not self.connect(conn):
            self.count_error("connect_failed", now)
            conn.retry_at = now + _RECONNECT_BACKOFF_S
            return
        conn.seq += 1
        if spec.kind is Kind.GET:
            (key_id,) = conn.take_keys(1)
            request = conn.codec.get(key_name(key_id))
            conn.expected = conn.codec.value_fragment(preload_value(key_id, spec.value_bytes))
            conn.pending = []
        else:
            n = 1 if spec.kind is Kind.PUT else spec.batch_ops
            items = [(key_id, value_for(spec.run_tag, conn.spec.conn_id, conn.seq * n + i,
                                        spec.value_bytes))
                     for i, key_id in enumerate(conn.take_keys(n))]
            conn.pending = items
            if spec.kind is Kind.PUT:
                request = conn.codec.put(key_name(items[0][0]), items[0][1])
            else:
                request = conn.codec.batch([(key_name(k), v) for k, v in items])
        conn.started = time.perf_counter()
        self.in_flight += 1
        self.send(conn, memoryview(request))

    def send(self, conn: _Conn, data: memoryview) -> bool:
        """Send what the socket takes now, wait for writability for the rest. False if the
        connection broke (the request failed)."""
        assert conn.sock is not None
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.fail(conn, "send_failed", time.perf_counter())
            return False
        rest = data[sent:]
        if bool(rest) != bool(conn.outbuf):  # start or stop waiting for writability
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if rest else 0)
            self.sel.modify(conn.sock, events, conn)
        conn.outbuf = rest
        return True

    def on_event(self, conn: _Conn, mask: int) -> None:
        if conn.sock is None:
            return
        if mask & selectors.EVENT_WRITE and conn.outbuf and not self.send(conn, conn.outbuf):
            return
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = conn.sock.recv(_RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            self.fail(conn, "recv_failed", time.perf_counter())
            return
        now = time.perf_counter()
        if not data:
            if conn.started:
                self.fail(conn, "closed_by_server", now)
            else:  # an idle keep-alive connection closed: reconnect at the next request
                self.drop(conn)
            return
        conn.inbuf += data
        try:
            parsed = parse_response(conn.inbuf)
        except (ProtocolError, ValueError):
            self.fail(conn, "bad_response", now)
            return
        if parsed is None:
            return
        status, consumed, body, keep_alive = parsed
        del conn.inbuf[:consumed]
        self.complete(conn, status, body, now)
        if not keep_alive:
            self.drop(conn)
        if self.issuing:
            self.issue(conn, now)

    def complete(self, conn: _Conn, status: int, body: bytes, now: float) -> None:
        in_window = self.window_start <= now < self.window_end
        ok = status == 200
        if ok and self.spec.kind is Kind.GET and conn.expected not in body:
            ok = False
            self.count_error("wrong_value", now)
        elif not ok:
            self.count_error(f"http_{status}", now)
        if in_window:
            self.result.latencies_s.append(now - conn.started)
            if ok:
                self.result.completed += 1
        self.settle(conn, acked=ok)

    def fail(self, conn: _Conn, kind: str, now: float) -> None:
        """The connection broke or timed out with a request in flight: outcome unknown."""
        self.count_error(kind, now)
        self.settle(conn, acked=False)
        self.drop(conn)
        conn.retry_at = now + _RECONNECT_BACKOFF_S

    def settle(self, conn: _Conn, *, acked: bool) -> None:
        res = self.result
        for key_id, value in conn.pending:
            if acked:
                res.acked[key_id] = value
                res.unknown.pop(key_id, None)
            else:
                res.unknown.setdefault(key_id, []).append(value)
        conn.pending = []
        if conn.started:
            conn.started = 0.0
            self.in_flight -= 1

    def count_error(self, kind: str, now: float) -> None:
        if self.window_start <= now < self.window_end:
            self.result.errors[kind] = self.result.errors.get(kind, 0) + 1
        else:
            self.result.errors_outside_window += 1

    # ------------------------------------------------------------------ the loop
    def run(self, go_at: float) -> WorkerResult:
        spec = self.spec
        self.window_start = go_at + spec.warmup_s
        self.window_end = self.window_start + spec.seconds
        cpu_start = 0.0
        window_open = False
        for conn in self.conns:
            self.issue(conn, go_at)
        next_housekeeping = go_at + _LOOP_TICK_S
        while True:
            now = time.perf_counter()
            if not window_open and now >= self.window_start:
                window_open = True
                cpu_start = time.process_time()
                self.window_start = now
                self.notify(_WINDOW_OPEN)
            if self.issuing and now >= self.window_end:
                self.issuing = False
                self.result.cpu_s = time.process_time() - cpu_start
                self.result.window_s = now - self.window_start
                self.notify(_WINDOW_CLOSED)
            if not self.issuing and self.in_flight == 0:
                break
            if now >= next_housekeeping:
                next_housekeeping = now + _LOOP_TICK_S
                self.housekeeping(now)
            wake_at = next_housekeeping
            if not window_open:
                wake_at = min(wake_at, self.window_start)
            elif self.issuing:
                wake_at = min(wake_at, self.window_end)
            for key, mask in self.sel.select(max(0.0, wake_at - now)):
                self.on_event(key.data, mask)
        for conn in self.conns:
            self.drop(conn)
        self.sel.close()
        return self.result

    def housekeeping(self, now: float) -> None:
        """Time out requests that waited too long; reconnect idle broken connections."""
        for conn in self.conns:
            if conn.started:
                if now - conn.started > self.spec.request_timeout_s:
                    self.fail(conn, "timeout", now)
            elif self.issuing and conn.retry_at <= now:
                self.issue(conn, now)

    def notify(self, message: str) -> None:
        if self.pipe is not None and self.reports_window:
            self.pipe.send(message)


def _worker_main(spec: WorkerSpec, pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    worker = _Worker(spec, pipe)
    for conn in worker.conns:
        worker.connect(conn)  # a failure is retried (and counted) once the run starts
    pipe.send(_READY)
    command, reports_window = pipe.recv()
    if command != _GO:
        return
    worker.reports_window = reports_window
    pipe.send(worker.run(time.perf_counter()))


# --------------------------------------------------------------------------- the parent side
class LoadError(Exception):
    pass


class WindowObserver(Protocol):
    def window_opened(self) -> None: ...

    def window_closed(self) -> None: ...


def run_load(specs: Sequence[WorkerSpec], observer: WindowObserver | None = None) -> LoadResult:
    """Start one process per spec, let them connect, start them together, collect results.

    The observer, if any, is called when the first worker's measurement window opens and
    closes (the workers' windows start within a millisecond of each other).
    """
    ctx = multiprocessing.get_context("spawn")
    procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for spec in specs:
            parent_end, child_end = ctx.Pipe()
            worker = ctx.Process(target=_worker_main, args=(spec, child_end), daemon=True,
                                 name="loadgen")
            worker.start()
            child_end.close()
            procs.append((worker, parent_end))
        for _, pipe in procs:
            expect(pipe, _READY, _SPAWN_TIMEOUT_S)
        for i, (_, pipe) in enumerate(procs):
            pipe.send((_GO, observer is not None and i == 0))
        longest = max(s.warmup_s + s.seconds + 2 * s.request_timeout_s for s in specs) + 30
        first = procs[0][1]
        if observer is not None:
            expect(first, _WINDOW_OPEN, longest)
            observer.window_opened()
            expect(first, _WINDOW_CLOSED, longest)
            observer.window_closed()
        results = []
        for _, pipe in procs:
            result = receive(pipe, longest)
            if not isinstance(result, WorkerResult):
                raise LoadError(f"a load worker answered {result!r}")
            results.append(result)
        return LoadResult(tuple(results))
    finally:
        for proc, pipe in procs:
            pipe.close()
            if proc.is_alive():
                proc.terminate()
            proc.join(5)


def receive(pipe: Connection, timeout_s: float) -> object:
    """The next message from a load process (LoadError if none comes, or it died)."""
    if not pipe.poll(timeout_s):
        raise LoadError(f"a load worker said nothing for {timeout_s:.0f}s")
    try:
        return pipe.recv()
    except EOFError:
        raise LoadError("a load worker died (see its traceback above)") from None


def expect(pipe: Connection, message: str, timeout_s: float) -> None:
    got = receive(pipe, timeout_s)
    if got != message:
        raise LoadError(f"a load worker said {got!r}, expected {message!r}")
