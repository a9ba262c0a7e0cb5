"""raftkv.codec, the sections between processes: frame kinds, the worker channel's requests
and replies, apply results and the follower-to-leader forwarding frames. Every value
round-trips; bad input is DecodeError. (Errors as their classes again: tests/test_service.py.)"""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftkv import codec
from raftkv.codec import (
    PEER_FRAME_KINDS,
    DecodeError,
    ErrorReply,
    Forward,
    ForwardOp,
    ForwardResult,
    ForwardStatus,
    FrameKind,
    Reply,
    Request,
    RequestOp,
)
from raftkv.core.types import ConfChange, ConfChangeOp
from raftkv.kv.state_machine import (
    AlarmRecord,
    AlarmResult,
    AuthEnabled,
    AuthRefused,
    BatchResult,
    ConditionFailed,
    DeleteResult,
    InvalidCommand,
    LeaseGrantResult,
    LeaseNotFound,
    LeaseRevokeResult,
    NoSpace,
    PutResult,
    TokenCreated,
    TokenNotFound,
    TokenRevoked,
)

# --------------------------------------------------------------------------- frame kinds


def test_peers_may_send_only_raft_and_forwarding_frames() -> None:
    assert {FrameKind.RAFT, FrameKind.FORWARD, FrameKind.FORWARD_RESULT} == PEER_FRAME_KINDS
    assert FrameKind.HANDSHAKE not in PEER_FRAME_KINDS
    assert not {k for k in FrameKind if k.name.startswith("WORKER_")} & PEER_FRAME_KINDS


def test_frame_kinds_fit_in_the_kind_byte_and_are_distinct() -> None:
    values = [k.value for k in FrameKind]
    assert len(set(values)) == len(values)
    assert all(0 <= v <= 255 for v in values)


# --------------------------------------------------------------------------- requests

SAMPLE_ARGS: dict[RequestOp, tuple[Any, ...]] = {
    RequestOp.PROPOSE: (b"\x01command bytes",),
    RequestOp.GET: ("some/key", "linearizable"),
    RequestOp.LIST: ("prefix/", 100, "stale"),
    RequestOp.WATCH: ("watched", 42),
    RequestOp.STATUS: (),
    RequestOp.READINESS: (),
    RequestOp.MEMBERS: (),
    RequestOp.JOIN: ("n4", "127.0.0.1:5004", True),
    RequestOp.REMOVE: ("n2",),
    RequestOp.TRANSFER: ("n3",),
    RequestOp.BACKUP: ("leader",),
    RequestOp.LEASE_KEEPALIVE: (7,),
    RequestOp.LEASE_INFO: (8,),
    RequestOp.LEASE_LIST: (1000,),
    RequestOp.METRICS: (),
    RequestOp.TOKENS: ("linearizable",),
    RequestOp.ALARMS: (),
    RequestOp.TOKENS_SINCE: ("linearizable", 12),
}
"""One well-formed set of arguments per op."""

OPTIONAL_ARGS: list[tuple[RequestOp, tuple[Any, ...]]] = [
    (RequestOp.WATCH, ("watched", None)),
    (RequestOp.JOIN, (None, "127.0.0.1:5004", False)),
    (RequestOp.TRANSFER, (None,)),
]


def test_every_request_op_has_sample_arguments() -> None:
    assert set(SAMPLE_ARGS) == set(RequestOp)


def roundtrip_requests(items: list[list[object]]) -> list[Request]:
    return codec.decode_requests(codec.pack_batch(items))


@pytest.mark.parametrize(("op", "args"), [*SAMPLE_ARGS.items(), *OPTIONAL_ARGS],
                         ids=lambda v: getattr(v, "name", None) or "args")
def test_every_request_op_round_trips(op: RequestOp, args: tuple[Any, ...]) -> None:
    [request] = roundtrip_requests([codec.encode_request(17, op, 2.5, *args)])
    assert request == Request(17, op, 2.5, args)


def test_a_batch_of_requests_keeps_its_order() -> None:
    items = [codec.encode_request(rid, op, 1.0, *args)
             for rid, (op, args) in enumerate(SAMPLE_ARGS.items(), start=1)]
    decoded = roundtrip_requests(items)
    assert [(r.rid, r.op) for r in decoded] == [(i, op) for i, op in
                                                 enumerate(SAMPLE_ARGS, start=1)]


def test_request_timeout_travels_in_whole_milliseconds() -> None:
    [request] = roundtrip_requests([codec.encode_request(1, RequestOp.STATUS, 0.0125)])
    assert request.timeout_s == 0.012


@pytest.mark.parametrize("op", [op for op, args in SAMPLE_ARGS.items() if args],
                         ids=lambda op: op.name)
def test_each_request_argument_of_the_wrong_type_raises_decode_error(op: RequestOp) -> None:
    args = SAMPLE_ARGS[op]
    for position in range(len(args)):
        wrong: object = 3.5 if not isinstance(args[position], float) else "x"
        bad = list(args)
        bad[position] = wrong
        with pytest.raises(DecodeError):
            roundtrip_requests([codec.encode_request(1, op, 1.0, *bad)])


@pytest.mark.parametrize("op", list(RequestOp), ids=lambda op: op.name)
def test_a_request_with_an_argument_missing_or_extra_raises_decode_error(op: RequestOp) -> None:
    args = SAMPLE_ARGS[op]
    with pytest.raises(DecodeError, match="arguments"):
        roundtrip_requests([codec.encode_request(1, op, 1.0, *args, "extra")])
    if args:
        with pytest.raises(DecodeError, match="arguments"):
            roundtrip_requests([codec.encode_request(1, op, 1.0, *args[:-1])])


@pytest.mark.parametrize("item", [
    "not a list",
    [1, 2],
    [1, 999, 1000],
    [1, "get", 1000, "k", "stale"],
    [-1, RequestOp.STATUS.value, 1000],
    [1, RequestOp.STATUS.value, -5],
    [1, RequestOp.STATUS.value, "soon"],
    [1, RequestOp.LEASE_INFO.value, 1000, -3],
    [1, RequestOp.LIST.value, 1000, "p", -1, "stale"],
], ids=repr)
def test_a_malformed_request_item_raises_decode_error(item: object) -> None:
    with pytest.raises(DecodeError):
        roundtrip_requests([item])  # type: ignore[list-item]


@pytest.mark.parametrize("payload", [
    b"",
    b"\xc1",
    msgpack.packb([codec.CHANNEL_VERSION]),
    msgpack.packb([codec.CHANNEL_VERSION + 1, []]),
    msgpack.packb([codec.CHANNEL_VERSION, "items"]),
    msgpack.packb({"v": 1}),
], ids=repr)
def test_a_malformed_request_batch_raises_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode_requests(payload)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_as_requests_or_raise_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        codec.decode_requests(data)


# --------------------------------------------------------------------------- replies


def test_ok_and_error_replies_round_trip() -> None:
    replies = [Reply(1, True, {"role": "leader", "members": [["n1", 1]]}),
               Reply(2, False, ErrorReply("key_not_found", "key 'a' not found")),
               Reply(3, False, ErrorReply("condition_failed", "no",
                                          {"key": "a", "current_index": 4})),
               Reply(4, True, None)]
    decoded = codec.decode_replies(codec.pack_batch([codec.encode_reply(r) for r in replies]))
    assert decoded == replies


@pytest.mark.parametrize("item", [
    [1, 0],
    [1, 7, None],
    [-1, 0, None],
    [1, 1, ["code", "message"]],
    [1, 1, ["code", "message", "not a map"]],
    [1, 1, [3, "message", {}]],
    "x",
], ids=repr)
def test_a_malformed_reply_raises_decode_error(item: object) -> None:
    with pytest.raises(DecodeError):
        codec.decode_replies(codec.pack_batch([item]))


def test_pushed_values_round_trip_and_a_wrong_version_raises_decode_error() -> None:
    view = {"role": "follower", "leader": None, "term": 3, "auth": [1, [["a", 2]]]}
    assert codec.unpack_value(codec.pack_value(view), "push") == view
    with pytest.raises(DecodeError, match="push"):
        codec.unpack_value(msgpack.packb([codec.CHANNEL_VERSION + 1, view]), "push")
    with pytest.raises(DecodeError):
        codec.unpack_value(b"\xc1", "push")


# --------------------------------------------------------------------------- apply results

APPLY_RESULTS: list[tuple[object, object]] = [
    # (what the state machine returned, what the worker decodes: fields not sent are blank)
    (PutResult(5, "a value", None, None), PutResult(5, None, None, None)),
    (PutResult(6, {"x": 1}, 3, 30), PutResult(6, None, 3, 30)),
    (DeleteResult(7, True), DeleteResult(7, True)),
    (DeleteResult(8, False), DeleteResult(8, False)),
    (BatchResult(9, (PutResult(9, 1, None, None), DeleteResult(9, True))),
     BatchResult(9, (PutResult(9, None, None, None), DeleteResult(9, True)))),
    (ConditionFailed(10, "k", 4), ConditionFailed(10, "k", 4)),
    (LeaseGrantResult(11, 11, 60), LeaseGrantResult(11, 11, 60)),
    (LeaseRevokeResult(12, 11, ("a", "b"), True), LeaseRevokeResult(12, 11, (), True)),
    (LeaseNotFound(13, 99), LeaseNotFound(13, 99)),
    (InvalidCommand(14, "bad"), InvalidCommand(14, "bad")),
    (TokenCreated(15, "t1", False), TokenCreated(15, "t1", False)),
    (TokenCreated(16, "t1", True), TokenCreated(16, "t1", True)),
    (TokenRevoked(17, "t1"), TokenRevoked(17, "t1")),
    (TokenNotFound(18, "t9"), TokenNotFound(18, "t9")),
    (AuthRefused(19, "last_admin"), AuthRefused(19, "last_admin")),
    (AuthEnabled(20), AuthEnabled(20)),
    (NoSpace(21, (AlarmRecord("n2", "quota", 5),)), NoSpace(21, (AlarmRecord("n2", "quota", 5),))),
    (AlarmResult(22, (AlarmRecord("n1", "disk_full", 9), AlarmRecord("n3", "map_full", 22))),
     AlarmResult(22, (AlarmRecord("n1", "disk_full", 9), AlarmRecord("n3", "map_full", 22)))),
    (AlarmResult(23, ()), AlarmResult(23, ())),
    (None, None),
]


@pytest.mark.parametrize(("result", "decoded"), APPLY_RESULTS,
                         ids=[type(r).__name__ for r, _ in APPLY_RESULTS])
def test_apply_results_round_trip_through_a_reply(result: object, decoded: object) -> None:
    """As the Raft process sends them (a reply's payload) and the worker reads them."""
    payload = codec.encode_apply_result(result, 21)
    [reply] = codec.decode_replies(codec.pack_batch([codec.encode_reply(Reply(1, True,
                                                                              payload))]))
    assert codec.decode_apply_result(reply.payload) == decoded


@pytest.mark.parametrize("value", [
    [],
    ["put"],
    [0, 1],
    [0, -1, None, None],
    [1, 5, "yes"],
    [99, 1],
    [2, 5, [[3, 5, "k", 1]]],
    [2, 5, "not a list"],
    [3, 5, "k"],
    "text",
], ids=repr)
def test_a_malformed_apply_result_raises_decode_error(value: object) -> None:
    with pytest.raises(DecodeError):
        codec.decode_apply_result(value)


# --------------------------------------------------------------------------- forwarding

FORWARDS = [
    Forward(2**52 + 1, ForwardOp.PROPOSE, data=b"\x00a command"),
    Forward(2, ForwardOp.CONF_CHANGE,
            change=ConfChange(ConfChangeOp.ADD_LEARNER, "n4", "127.0.0.1:5004")),
    Forward(3, ForwardOp.CONF_CHANGE, change=ConfChange(ConfChangeOp.REMOVE, "n2", "")),
    Forward(4, ForwardOp.LEASE_KEEPALIVE, number=77),
    Forward(5, ForwardOp.LEASE_INFO, number=78),
    Forward(6, ForwardOp.LEASE_LIST, number=1000),
]


def test_every_forward_op_is_covered() -> None:
    assert {f.op for f in FORWARDS} == set(ForwardOp)


def test_forwards_round_trip_in_order() -> None:
    assert codec.decode_forwards(codec.encode_forwards(FORWARDS)) == FORWARDS


FORWARD_RESULTS = [
    ForwardResult(1, ForwardStatus.COMMITTED, index=12, term=3),
    ForwardResult(2, ForwardStatus.VALUE, value=60),
    ForwardResult(3, ForwardStatus.VALUE, value=[5, 60, 59.5, ["a", "b"], 2]),
    ForwardResult(4, ForwardStatus.VALUE, value=[[5, 60, 1.0, [], 0], [6, 30, 2.0, [], 1]]),
    ForwardResult(5, ForwardStatus.VALUE, value=None),
    ForwardResult(6, ForwardStatus.FAILED, error=ErrorReply("no_leader", "not any more")),
]


def test_forward_results_round_trip_with_values_as_plain_lists() -> None:
    decoded = codec.decode_forward_results(codec.encode_forward_results(FORWARD_RESULTS))
    assert decoded == FORWARD_RESULTS
    assert type(decoded[2].value) is list and type(decoded[2].value[3]) is list


@pytest.mark.parametrize("items", [
    [[1, 99, b"x"]],
    [[1, ForwardOp.PROPOSE.value]],
    [[1, ForwardOp.PROPOSE.value, "text, not bytes"]],
    [[1, ForwardOp.PROPOSE.value, b"x", b"extra"]],
    [[-1, ForwardOp.PROPOSE.value, b"x"]],
    [[1, ForwardOp.CONF_CHANGE.value, 99, "n4", "addr"]],
    [[1, ForwardOp.CONF_CHANGE.value, ConfChangeOp.ADD_VOTER.value, "", "addr"]],
    [[1, ForwardOp.CONF_CHANGE.value, ConfChangeOp.ADD_VOTER.value, "n4"]],
    [[1, ForwardOp.LEASE_INFO.value, -5]],
    "not a list",
], ids=repr)
def test_a_malformed_forward_raises_decode_error(items: object) -> None:
    with pytest.raises(DecodeError):
        codec.decode_forwards(msgpack.packb([codec.FORWARD_VERSION, items]))


@pytest.mark.parametrize("items", [
    [[1, 3, None]],
    [[1, 0, [5]]],
    [[1, 0, [5, -1]]],
    [[1, 2, ["code", "message"]]],
    [[-1, 1, 5]],
    [[1, 1]],
], ids=repr)
def test_a_malformed_forward_result_raises_decode_error(items: object) -> None:
    with pytest.raises(DecodeError):
        codec.decode_forward_results(msgpack.packb([codec.FORWARD_VERSION, items]))


def test_a_forward_frame_of_another_version_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="version"):
        codec.decode_forwards(msgpack.packb([codec.FORWARD_VERSION + 1, []]))
    with pytest.raises(DecodeError, match="version"):
        codec.decode_forward_results(msgpack.packb([codec.FORWARD_VERSION + 1, []]))


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_as_forwards_or_raise_decode_error(data: bytes) -> None:
    for decode in (codec.decode_forwards, codec.decode_forward_results):
        with contextlib.suppress(DecodeError):
            decode(data)
