"""How a joining node reads a member's error answer (raftkv.runtime.process._refused): the
JSON message in full, bounded, on one line (it logs it with event=join_retrying or
event=join_refused), and the fields it decides on (`"probe": "mismatch"` is final)."""

from __future__ import annotations

import json

from raftkv.runtime.process import MAX_ANSWER_MESSAGE_CHARS, _refused

URL = "http://127.0.0.1:4001/cluster/join"


def _answer(message: str, **fields: object) -> bytes:
    return json.dumps({"error": "membership_change_rejected", "message": message,
                       "leader": "127.0.0.1:4001", **fields}).encode()


def test_the_message_is_kept_whole_past_the_200_bytes_it_was_cut_at() -> None:
    """Found by a review: the answer's body was cut at 200 bytes, JSON and all, so a long
    reason (a certificate mismatch's, say) lost what it said to fix."""
    message = ("the peer certificate presented at 127.0.0.5:5005 does not prove it is n5 "
               "(...): a member presents its own certificate, naming its id, from the "
               "cluster's CA. " * 3)
    assert len(message) > 200
    refused = _refused(URL, 409, _answer(message, probe="mismatch"))
    assert refused.status == 409
    assert refused.message == message
    assert str(refused) == f"{URL} answered 409 membership_change_rejected: {message}"
    assert refused.body["probe"] == "mismatch"


def test_a_message_past_the_bound_is_cut_there_and_says_so() -> None:
    refused = _refused(URL, 503, _answer("x" * (3 * MAX_ANSWER_MESSAGE_CHARS)))
    assert refused.message == "x" * MAX_ANSWER_MESSAGE_CHARS + "..."


def test_a_message_is_logged_on_one_line() -> None:
    refused = _refused(URL, 409, _answer("one\nevent=forged line\r\x1b[2J"))
    assert "\n" not in str(refused) and "\r" not in str(refused) and "\x1b" not in str(refused)
    assert "event=forged line" in refused.message


def test_an_answer_that_is_not_json_is_shown_by_its_first_bytes() -> None:
    refused = _refused(URL, 502, b"<html>" + b"a" * 500)
    assert refused.body == {} and refused.message == ""
    assert str(refused).startswith(f"{URL} answered 502: b'<html>aaa")
    assert len(str(refused)) < 300
