"""benchmarks.watchload: the pairing of writes with watch answers (delays, misses), the etcd
stream parsing, and the whole watch load against a small fake long-poll server, faithful or
one that never tells the watchers of one key about its changes (every one a miss)."""

from __future__ import annotations

import json
import threading
from array import array
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from benchmarks.loadgen import Endpoint, System, key_name
from benchmarks.watchload import (
    ChunkedLines,
    WatchSpec,
    WriteLog,
    WriterSpec,
    etcd_message,
    match_deliveries,
    run_watch_load,
    writer_keys,
)


def write_log(rows: list[tuple[int, float, float, int]], window: tuple[float, float]) -> WriteLog:
    """rows: (key id, sent, acked at (0: not acknowledged), index)."""
    log = WriteLog(window_start=window[0], window_end=window[1])
    for key, sent, acked, index in rows:
        log.key_id.append(key)
        log.sent.append(sent)
        log.acked_at.append(acked)
        log.index.append(index)
    return log


def obs(*pairs: tuple[int, float]) -> tuple[array[int], array[float]]:
    return array("q", [i for i, _ in pairs]), array("d", [t for _, t in pairs])


# --------------------------------------------------------------------------- pairing
def test_every_change_seen_gives_delays_from_send_and_from_ack() -> None:
    writes = write_log([(0, 1.0, 1.010, 5), (1, 1.1, 1.120, 6), (0, 2.0, 2.005, 7)], (0.5, 3))
    stats = match_deliveries(writes, {10: 0, 11: 1, 12: 0},
                             {10: obs((5, 1.012), (7, 2.020)), 11: obs((6, 1.115)),
                              12: obs((5, 1.030), (7, 2.006))})
    assert (stats.expected, stats.delivered, stats.coalesced, stats.missed) == (5, 5, 0, ())
    assert stats.from_send_s == pytest.approx(sorted([0.012, 0.020, 0.015, 0.030, 0.006]))
    assert min(stats.from_ack_s) == pytest.approx(-0.005)  # answered before the ack came


def test_a_later_index_delivers_a_change_coalesced() -> None:
    writes = write_log([(0, 1.0, 1.01, 5), (0, 1.02, 1.03, 6)], (0, 3))
    stats = match_deliveries(writes, {1: 0}, {1: obs((6, 1.04))})
    assert (stats.delivered, stats.coalesced, stats.missed) == (2, 1, ())
    assert stats.from_send_s == pytest.approx([0.02, 0.04])


def test_a_watcher_that_never_saw_a_change_is_a_miss() -> None:
    writes = write_log([(0, 1.0, 1.01, 5), (0, 2.0, 2.01, 9), (0, 2.5, 0.0, 0)], (0, 3))
    stats = match_deliveries(writes, {1: 0, 2: 0, 3: 0},
                             {1: obs((5, 1.02), (9, 2.02)), 2: obs((5, 1.05))})
    assert stats.expected == 6  # the unacknowledged write is not expected
    assert stats.missed == ((2, 0, 9), (3, 0, 5), (3, 0, 9))


def test_only_writes_sent_in_the_window_give_delays() -> None:
    writes = write_log([(0, 0.2, 0.21, 3), (0, 1.0, 1.01, 4)], (0.5, 3))
    stats = match_deliveries(writes, {1: 0}, {1: obs((3, 0.22), (4, 1.02))})
    assert stats.delivered == 2
    assert stats.from_send_s == pytest.approx([0.02])


def test_writer_keys_alternate_watched_and_unwatched_and_are_owned_by_one_conn() -> None:
    spec = WriterSpec(System.RAFTKV, Endpoint("h", 1), 3, 10.0, (0, 1, 2, 3, 4),
                      (5, 6, 7, 8, 9), "t", 64, 0.0, 1.0, 1.0)
    keys = [writer_keys(spec, j) for j in range(3)]
    assert keys[0] == [0, 6, 3, 9]
    assert sorted(k for ks in keys for k in ks) == list(range(10))


# --------------------------------------------------------------------------- etcd streams
def test_chunked_lines_across_reads() -> None:
    stream = ChunkedLines()
    msg1 = b'{"result":{"created":true}}\n'
    msg2 = (b'{"result":{"events":[{"kv":{"key":"a","mod_revision":"7"}},'
            b'{"kv":{"key":"a","mod_revision":"8"}}]}}\n')
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n" % len(msg1) + msg1 + b"\r\n" + b"%x\r\n" % len(msg2) + msg2 + b"\r\n")
    lines = []
    for i in range(0, len(raw), 7):
        lines += stream.feed(raw[i:i + 7])
    assert stream.status == 200
    messages = [etcd_message(line) for line in lines]
    assert [(m.revisions, m.created, m.error) for m in messages] == [
        ([], True, None), ([7, 8], False, None)]
    assert etcd_message(b'{"error":{"grpc_code":14}}').error is not None


# --------------------------------------------------------------------------- end to end
class FakeLongPoll(ThreadingHTTPServer):
    """PUT /keys/<k> and GET /keys/<k>?wait=true&index=n&timeout=s as raftkv answers them;
    `deaf` keys never wake their watches (they time out with "changed": false); with a
    `token`, a request without `Authorization: Bearer <token>` is answered 401."""

    daemon_threads = True

    def __init__(self, deaf: set[str], token: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.deaf = deaf
        self.token = token
        self.refused = 0
        self.authorized = 0
        self.cond = threading.Condition()
        self.index = 0
        self.keys: dict[str, tuple[str, int]] = {}
        self.waiting = 0
        """Long polls held now (what raftkv's /status calls `watches`)."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a watcher that finished closes its long polls: broken pipes are expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeLongPoll

    def log_message(self, *_args: object) -> None:
        pass

    def _answer(self, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refused(self) -> bool:
        s = self.server
        if s.token is None:
            return False
        with s.cond:
            if self.headers.get("Authorization") == f"Bearer {s.token}":
                s.authorized += 1
                return False
            s.refused += 1
        data = b'{"error":"unauthenticated"}'
        self.send_response(401)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return True

    def do_PUT(self) -> None:
        if self._refused():
            return
        key = urlsplit(self.path).path.removeprefix("/keys/")
        value = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["value"]
        s = self.server
        with s.cond:
            s.index += 1
            s.keys[key] = (value, s.index)
            s.cond.notify_all()
            index = s.index
        self._answer({"value": value, "index": index})

    def do_GET(self) -> None:
        if self._refused():
            return
        url = urlsplit(self.path)
        key = url.path.removeprefix("/keys/")
        query = parse_qs(url.query)
        after, timeout_s = int(query["index"][0]), float(query["timeout"][0])
        s = self.server

        def changed() -> bool:
            return key not in s.deaf and s.keys.get(key, ("", 0))[1] > after

        with s.cond:
            s.waiting += 1
            seen = s.cond.wait_for(changed, timeout_s)
            s.waiting -= 1
            value, index = s.keys.get(key, ("", 0))
        if seen:
            self._answer({"value": value, "index": index, "changed": True})
        else:
            self._answer({"value": value, "index": min(index, after), "changed": False})


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeLongPoll]:
    deaf, token = getattr(request, "param", ((), None))
    server = FakeLongPoll(set(deaf), token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _run(server: FakeLongPoll, token: str | None = None,
         ) -> tuple[int, int, int, set[int], int]:
    endpoint = Endpoint("127.0.0.1", server.server_address[1])
    watchers = [(w, w % 4) for w in range(16)]
    specs = [WatchSpec(System.RAFTKV, endpoint, tuple(watchers[p::2]), 0, 0.3, token)
             for p in range(2)]
    writer = WriterSpec(System.RAFTKV, endpoint, 4, 40.0, (0, 1, 2, 3), (4, 5, 6, 7), "t",
                        64, 0.2, 1.0, 5.0, token)
    result = run_watch_load(specs, writer, grace_s=1.0, settle_s=0.1,
                            registered=lambda: server.waiting)
    d = result.deliveries
    return (d.expected, d.delivered, len(d.missed), {k for _, k, _ in d.missed},
            sum(w.rearmed_after_timeout for w in result.watchers))


def test_a_faithful_server_misses_nothing(fake_server: FakeLongPoll) -> None:
    expected, delivered, missed, _, _ = _run(fake_server)
    assert expected > 0
    assert (delivered, missed) == (expected, 0)


@pytest.mark.parametrize("fake_server", [((), "s3cret")], indirect=True)
def test_watches_and_writes_carry_the_token(fake_server: FakeLongPoll) -> None:
    expected, delivered, missed, _, _ = _run(fake_server, token="s3cret")
    assert expected > 0 and (delivered, missed) == (expected, 0)
    assert fake_server.refused == 0 and fake_server.authorized >= 16 + expected


@pytest.mark.parametrize("fake_server", [({key_name(0)}, None)], indirect=True)
def test_a_server_that_never_wakes_one_keys_watches_fails_on_every_change_of_it(
        fake_server: FakeLongPoll) -> None:
    expected, delivered, missed, keys, rearmed = _run(fake_server)
    assert missed > 0 and keys == {0}
    assert delivered + missed == expected
    assert rearmed > 0  # the deaf key's watches timed out and were armed again


def test_request_formats_carry_the_token_only_when_given() -> None:
    from benchmarks.loadgen import RaftkvCodec, auth_header, codec_for
    from benchmarks.watchload import raftkv_watch_request

    bearer = b"\r\nAuthorization: Bearer tok\r\n"
    codec = RaftkvCodec("h:1", "tok")
    for request in (codec.put("k", "v"), codec.batch([("k", "v")]), codec.get("k"),
                    raftkv_watch_request("h:1", "k", 3, 1.0, "tok")):
        head = request.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        assert bearer in head, request
    plain = RaftkvCodec("h:1")
    for request in (plain.put("k", "v"), plain.get("k"),
                    raftkv_watch_request("h:1", "k", 3, 1.0)):
        assert b"Authorization" not in request
    with pytest.raises(ValueError):
        codec_for(System.ETCD, Endpoint("h", 1), "tok")
    with pytest.raises(ValueError):
        auth_header("two\r\nlines")
