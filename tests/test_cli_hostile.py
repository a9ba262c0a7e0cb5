"""The CLI against hostile input and hostile servers: a message and an exit status, never a
traceback, and never past its own deadline (found by fuzzing the CLI)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from raftkv import cli
from raftkv.cli import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, main

Answer = Callable[[BaseHTTPRequestHandler, bytes], None]


class FakeNode:
    """An HTTP server on loopback that answers every request with `answer`, and keeps the
    bodies it was sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.answer: Answer = json_answer(200, {"value": 1, "index": 1})
        node = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                node.bodies.append(body)
                node.answer(self, body)

            do_GET = do_PUT = do_POST = do_DELETE = _any  # noqa: N815 (http.server names)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def json_answer(status: int, body: object, raw: bytes | None = None) -> Answer:
    data = raw if raw is not None else json.dumps(body).encode()

    def answer(handler: BaseHTTPRequestHandler, _body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return answer


@pytest.fixture
def node() -> Iterator[FakeNode]:
    made = FakeNode()
    yield made
    made.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out + err


@pytest.mark.parametrize("flags", [
    ["--urls", "http://"], ["--urls", ","], ["--urls", "ftp://127.0.0.1:4001"],
    ["--urls", "127.0.0.1:0"], ["--urls", "127.0.0.1:"], ["--urls", " 127.0.0.1:4001"],
    ["--urls", "127.0.0.1:99999"], ["--urls", "http://[::1"], ["--timeout", "0"],
    ["--timeout", "nan"], ["--timeout", "61"], ["--token", "a\nb"], ["--token", "日本"],
    ["--token", "two words"],
], ids=repr)
def test_bad_client_flags_are_usage_errors(capsys: pytest.CaptureFixture[str],
                                           flags: list[str]) -> None:
    status, text = run(capsys, "get", "k", *flags)
    assert status == EXIT_USAGE, text
    assert text.startswith("raftkv get: ")


@pytest.mark.parametrize("argv", [
    ["get", "fz/\udcff"], ["put", "k", "\udcff"], ["members", "remove", "n\udcff"],
    ["token", "revoke", "\udcff"],
], ids=repr)
def test_arguments_that_are_not_utf8_are_usage_errors(
        capsys: pytest.CaptureFixture[str], node: FakeNode, argv: list[str]) -> None:
    """Undecodable bytes of a command line arrive as lone surrogates: they used to end in a
    UnicodeEncodeError deep in the client."""
    status, text = run(capsys, *argv, "--urls", node.url)
    assert status == EXIT_USAGE and "not UTF-8" in text, text
    assert node.bodies == []


@pytest.mark.parametrize(("raw", "stored"), [
    ("NaN", "NaN"), ("Infinity", "Infinity"), ("1e999", "1e999"), ("[" * 60_000, "[" * 60_000),
    ("1.5", 1.5), ('{"a": [1]}', {"a": [1]}), ("word", "word"),
])
def test_put_sends_json_or_else_the_text_as_a_string(
        capsys: pytest.CaptureFixture[str], node: FakeNode, raw: str, stored: object) -> None:
    """What JSON cannot carry (NaN, 1e999, nesting past the parser) is a string, as a bare
    word is; it used to be a ValueError or RecursionError with a traceback."""
    status, text = run(capsys, "put", "k", raw, "--urls", node.url)
    assert status == 0, text
    assert json.loads(node.bodies[-1])["value"] == stored


@pytest.mark.parametrize("raw", [
    b"[" * 100_000, b'{"value": 1, "index": Infinity}', b"\x1b[31mnot json",
], ids=["deep", "infinity", "escape"])
def test_a_hostile_answer_is_an_error_with_a_clean_message(
        capsys: pytest.CaptureFixture[str], node: FakeNode, raw: bytes) -> None:
    node.answer = json_answer(200, None, raw=raw)
    status, text = run(capsys, "get", "k", "--urls", node.url)
    assert status == EXIT_FAILED, text
    assert "\x1b" not in text


@pytest.mark.parametrize("argv", [
    ["get", ""], ["put", "", "1"], ["delete", "dir/"], ["lease", "get", "0"],
    ["lease", "revoke", "-3"],
], ids=repr)
def test_what_the_client_refuses_before_sending_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], node: FakeNode, argv: list[str]) -> None:
    """An empty key or lease 0 never reaches a server: the command line is wrong (exit 2, as
    for argparse's refusals), not a failed request (it used to exit 1)."""
    status, text = run(capsys, *argv, "--urls", node.url)
    assert status == EXIT_USAGE, text
    assert node.bodies == []


def test_a_server_refusal_stays_a_failed_request(
        capsys: pytest.CaptureFixture[str], node: FakeNode) -> None:
    node.answer = json_answer(400, {"error": "invalid_value", "message": "no"})
    status, text = run(capsys, "put", "k", "1", "--urls", node.url)
    assert status == EXIT_FAILED and "invalid_value" in text, text


def test_an_unknown_role_in_an_answer_is_a_bad_response(
        capsys: pytest.CaptureFixture[str], node: FakeNode) -> None:
    node.answer = json_answer(200, {"id": "t1", "token": "s", "role": "god", "prefixes": [],
                                    "index": 3})
    status, text = run(capsys, "token", "create", "--role", "read", "--urls", node.url)
    assert status == EXIT_FAILED and "role" in text, text


def test_a_server_that_trickles_its_answer_does_not_hold_the_command_past_its_deadline(
        capsys: pytest.CaptureFixture[str], node: FakeNode,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a body sent a byte every 0.2 s kept `raftkv get --timeout 2` for 100 s
    (the socket timeout bounds each read, not the exchange)."""
    stop = threading.Event()

    def trickle(handler: BaseHTTPRequestHandler, _body: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        while not stop.wait(0.2):
            try:
                handler.wfile.write(b" ")
                handler.wfile.flush()
            except OSError:
                return

    node.answer = trickle
    monkeypatch.setattr(cli, "_DEADLINE_SLACK_S", 0.5)
    started = time.monotonic()
    try:
        status, text = run(capsys, "get", "k", "--urls", node.url, "--timeout", "0.5")
    finally:
        stop.set()
    assert status == EXIT_UNAVAILABLE and "no complete answer" in text, text
    assert time.monotonic() - started < 30  # 0.5 s x 3 (budget) + 0.5 + 0.5: ~2.5 s


@pytest.mark.parametrize("flags", [["--ttl", "1"], ["--ttl", "9" * 400], ["--wait", "nan"],
                                   ["--wait", "-1"], ["--wait", "inf"]], ids=repr)
def test_lock_bounds_are_usage_errors(capsys: pytest.CaptureFixture[str], node: FakeNode,
                                      flags: list[str]) -> None:
    status, text = run(capsys, "lock", "L", *flags, "--urls", node.url, "--", "true")
    assert status == EXIT_USAGE, text
    assert node.bodies == []


def test_certs_refuse_a_host_name_a_certificate_cannot_carry(
        capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    status, text = run(capsys, "certs", "init", str(tmp_path / "c"), "--nodes", "n1",
                       "--hosts", "héllo.example")
    assert status == EXIT_USAGE, text


def test_certs_refuse_an_empty_directory(capsys: pytest.CaptureFixture[str], tmp_path: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: `raftkv certs init ""` wrote its six files into the current directory."""
    monkeypatch.chdir(tmp_path)
    status, text = run(capsys, "certs", "init", "", "--nodes", "n1")
    assert status == EXIT_USAGE, text
    assert list(tmp_path.iterdir()) == []


def test_empty_items_of_urls_are_skipped(capsys: pytest.CaptureFixture[str],
                                         node: FakeNode) -> None:
    status, text = run(capsys, "get", "k", "--urls", f",{node.url},,")
    assert status == 0, text
