"""raftkv.codec: every value round-trips; any bad input gives DecodeError and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftkv import codec
from raftkv.codec import DecodeError
from raftkv.core.messages import (
    MESSAGE_TYPES,
    AppendRequest,
    AppendResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from raftkv.core.types import (
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    HardState,
    Membership,
    SnapshotMeta,
)

U64 = 2**64 - 1
nat = st.integers(0, U64)
pos = st.integers(1, U64)
minus_one_or_nat = st.integers(-1, U64)
node_id = st.text(min_size=1, max_size=12)
any_text = st.text(max_size=12)

conf_changes = st.builds(ConfChange, st.sampled_from(ConfChangeOp), node_id, any_text)
entries = st.one_of(
    st.builds(Entry, pos, pos, st.just(EntryKind.NORMAL), st.binary(max_size=64)),
    st.builds(lambda i, t, c: Entry(i, t, EntryKind.CONF_CHANGE, b"", c), pos, pos, conf_changes),
)
hard_states = st.builds(HardState, nat, st.none() | node_id, nat)


@st.composite
def memberships(draw: st.DrawFn) -> Membership:
    ids = draw(st.lists(node_id, max_size=6, unique=True))
    split = draw(st.integers(0, len(ids)))
    return Membership(frozenset(ids[:split]), frozenset(ids[split:]))


snapshot_metas = st.one_of(
    st.builds(SnapshotMeta, st.just(0), st.just(0), memberships()),
    st.builds(SnapshotMeta, pos, pos, memberships()),
)
head = {"term": nat, "frm": any_text, "to": any_text}
int64 = st.integers(-(2**63), U64)

MESSAGE_STRATEGIES: dict[type[Message], st.SearchStrategy[Any]] = {
    VoteRequest: st.builds(VoteRequest, **head, last_log_index=nat, last_log_term=nat,
                           pre_vote=st.booleans(), transfer=st.booleans()),
    VoteResponse: st.builds(VoteResponse, **head, granted=st.booleans(), pre_vote=st.booleans()),
    AppendRequest: st.builds(AppendRequest, **head, prev_index=nat, prev_term=nat,
                             entries=st.lists(entries, max_size=4).map(tuple), commit=nat),
    AppendResponse: st.builds(AppendResponse, **head, success=st.booleans(), index=nat,
                              hint_index=nat, hint_term=nat),
    HeartbeatRequest: st.builds(HeartbeatRequest, **head, commit=nat, read_seq=nat),
    HeartbeatResponse: st.builds(HeartbeatResponse, **head, read_seq=nat),
    SnapshotRequest: st.builds(SnapshotRequest, **head, meta=snapshot_metas, offset=nat,
                               data=st.binary(max_size=64), done=st.booleans(), length=nat,
                               checksum=st.binary(min_size=32, max_size=32).map(bytes.hex)),
    SnapshotResponse: st.builds(SnapshotResponse, **head, snapshot_index=nat,
                                next_offset=minus_one_or_nat, done=st.booleans()),
    TimeoutNow: st.builds(TimeoutNow, **head),
    ReadIndexRequest: st.builds(ReadIndexRequest, **head,
                                request_ids=st.lists(int64, max_size=4).map(tuple)),
    ReadIndexResponse: st.builds(ReadIndexResponse, **head,
                                 request_ids=st.lists(int64, max_size=4).map(tuple),
                                 index=minus_one_or_nat),
}
messages = st.one_of(*MESSAGE_STRATEGIES.values())

Codec = tuple[Callable[[Any], bytes], Callable[[bytes], object], st.SearchStrategy[Any]]
CODECS: dict[str, Codec] = {
    "entry": (codec.encode_entry, codec.decode_entry, entries),
    "hard_state": (codec.encode_hard_state, codec.decode_hard_state, hard_states),
    "snapshot_meta": (codec.encode_snapshot_meta, codec.decode_snapshot_meta, snapshot_metas),
    "message": (codec.encode_message, codec.decode_message, messages),
}
CodecPair = tuple[Callable[[Any], bytes], Callable[[bytes], object]]
PAIRS = [pytest.param((c[0], c[1]), id=name) for name, c in CODECS.items()]
DECODERS = [pytest.param(c[1], id=name) for name, c in CODECS.items()]


def test_every_message_class_has_a_strategy() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES)


# Round trips


@given(entries)
def test_entry_round_trips(e: Entry) -> None:
    assert codec.decode_entry(codec.encode_entry(e)) == e


@given(hard_states)
def test_hard_state_round_trips(hs: HardState) -> None:
    assert codec.decode_hard_state(codec.encode_hard_state(hs)) == hs


@given(snapshot_metas)
def test_snapshot_meta_round_trips(meta: SnapshotMeta) -> None:
    assert codec.decode_snapshot_meta(codec.encode_snapshot_meta(meta)) == meta


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_message_round_trips(cls: type[Message], data: st.DataObject) -> None:
    m = data.draw(MESSAGE_STRATEGIES[cls])
    decoded = codec.decode_message(codec.encode_message(m))
    assert type(decoded) is cls
    assert decoded == m


def test_encoding_leads_with_the_format_version() -> None:
    for encoded in (codec.encode_entry(Entry(1, 1)), codec.encode_hard_state(HardState()),
                    codec.encode_message(TimeoutNow(1, "a", "b"))):
        assert msgpack.unpackb(encoded)[0] == codec.FORMAT_VERSION


def test_encode_message_rejects_a_non_message() -> None:
    with pytest.raises(TypeError):
        codec.encode_message(Entry(1, 1))  # type: ignore[arg-type]


# Bad input: always DecodeError


def _decodes_or_raises_decode_error(pair: CodecPair, data: bytes) -> None:
    """Bad input raises DecodeError; input that does decode gives a value that round-trips."""
    encode, decode = pair
    try:
        value = decode(data)
    except DecodeError:
        return
    assert decode(encode(value)) == value


@pytest.mark.parametrize("pair", PAIRS)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_decode_error(pair: CodecPair, data: bytes) -> None:
    _decodes_or_raises_decode_error(pair, data)


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x90", b"\x91\x01", b"\x81\xa1a\x01",
                                  b"\xd4\xff\x00", b"\xa2\xff\xfe", b"\xdd\xff\xff\xff\xff",
                                  b"\x91" * 5000, "not bytes", None, 7])
def test_known_garbage_raises_decode_error(decode: Callable[[object], object],
                                           data: object) -> None:
    with pytest.raises(DecodeError):
        decode(data)


@st.composite
def encoded_values(draw: st.DrawFn) -> tuple[Callable[[bytes], object], bytes]:
    decode, encoded, _ = draw(encoded_values_with_encoder())
    return decode, encoded


@st.composite
def encoded_values_with_encoder(
    draw: st.DrawFn,
) -> tuple[Callable[[bytes], object], bytes, Callable[[Any], bytes]]:
    encode, decode, values = draw(st.sampled_from(list(CODECS.values())))
    return decode, encode(draw(values)), encode


@given(encoded_values(), st.data())
def test_truncated_encodings_raise_decode_error(
    case: tuple[Callable[[bytes], object], bytes], data: st.DataObject
) -> None:
    decode, encoded = case
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(DecodeError):
        decode(encoded[:cut])


@given(encoded_values(), st.binary(min_size=1, max_size=8))
def test_trailing_bytes_raise_decode_error(
    case: tuple[Callable[[bytes], object], bytes], extra: bytes
) -> None:
    decode, encoded = case
    with pytest.raises(DecodeError):
        decode(encoded + extra)


@given(encoded_values_with_encoder(), st.data())
def test_mutated_encodings_decode_or_raise_decode_error(
    case: tuple[Callable[[bytes], object], bytes, Callable[[Any], bytes]], data: st.DataObject
) -> None:
    decode, encoded, encode = case
    mutated = bytearray(encoded)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(mutated) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            mutated[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            mutated[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            mutated.insert(at, data.draw(st.integers(0, 255)))
        elif len(mutated) > 1:
            del mutated[at]
    _decodes_or_raises_decode_error((encode, decode), bytes(mutated))


# Wrong types inside a well-formed msgpack value


def _leaf_paths(value: object, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*path, i))]
    return [path] if value is not None else []


def _replace(value: Any, path: tuple[int, ...], new: object) -> Any:
    if not path:
        return new
    copy = list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


def _get(value: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        value = value[i]
    return value


WRONG_TYPED = [True, False, 1, -5, 1.5, "x", b"x", [], [1, 2], {"a": 1}]


def _wrong_values_for(old: object) -> list[object]:
    if isinstance(old, bool):
        return [v for v in WRONG_TYPED if not isinstance(v, bool)]
    return [v for v in WRONG_TYPED if type(v) is not type(old)]


@given(encoded_values())
def test_every_field_of_the_wrong_type_raises_decode_error(
    case: tuple[Callable[[bytes], object], bytes],
) -> None:
    decode, encoded = case
    tree = msgpack.unpackb(encoded, raw=False)
    for path in _leaf_paths(tree):
        for new in _wrong_values_for(_get(tree, path)):
            with pytest.raises(DecodeError):
                decode(msgpack.packb(_replace(tree, path, new), use_bin_type=True))


@pytest.mark.parametrize(("name", "position"), [("entry", 1), ("entry", 2), ("hard_state", 1),
                                                ("hard_state", 3), ("snapshot_meta", 1)])
def test_negative_positions_and_terms_raise_decode_error(name: str, position: int) -> None:
    encode, decode, _ = CODECS[name]
    sample = {"entry": Entry(3, 2), "hard_state": HardState(1, "a", 1),
              "snapshot_meta": SnapshotMeta(2, 1, Membership(frozenset({"a"})))}[name]
    tree = msgpack.unpackb(encode(sample))
    tree[position] = -1
    with pytest.raises(DecodeError):
        decode(msgpack.packb(tree, use_bin_type=True))


def test_newer_format_version_raises_decode_error_naming_it() -> None:
    tree = msgpack.unpackb(codec.encode_entry(Entry(1, 1)))
    tree[0] = codec.FORMAT_VERSION + 1
    with pytest.raises(DecodeError, match="format version"):
        codec.decode_entry(msgpack.packb(tree, use_bin_type=True))


@pytest.mark.parametrize("tag", [0, 13, 99, -1, True, "3", None])
def test_unknown_message_type_raises_decode_error(tag: object) -> None:
    tree = msgpack.unpackb(codec.encode_message(TimeoutNow(1, "a", "b")))
    tree[1] = tag
    with pytest.raises(DecodeError):
        codec.decode_message(msgpack.packb(tree, use_bin_type=True))


def test_snapshot_request_without_a_checksum_is_refused_by_its_old_tag() -> None:
    """Tag 7 was SnapshotRequest before it carried the snapshot's length and checksum."""
    meta = [5, 2, ["n1"], []]
    old = [codec.FORMAT_VERSION, 7, 3, "n1", "n2", meta, 0, b"data", True]
    with pytest.raises(DecodeError, match=r"tag 7.*upgrade every node"):
        codec.decode_message(msgpack.packb(old, use_bin_type=True))


@pytest.mark.parametrize("checksum", ["", "ab" * 31, "AB" * 32, "zz" * 32, "ab" * 33, 7, None])
def test_snapshot_request_with_a_malformed_checksum_raises_decode_error(
        checksum: object) -> None:
    request = SnapshotRequest(3, "n1", "n2", SnapshotMeta(5, 2, Membership(frozenset({"n1"}))),
                              0, b"data", True, 4, "ab" * 32)
    tree = msgpack.unpackb(codec.encode_message(request))
    assert tree[1] == 12
    tree[-1] = checksum
    with pytest.raises(DecodeError, match="checksum"):
        codec.decode_message(msgpack.packb(tree, use_bin_type=True))


@pytest.mark.parametrize("delta", [-1, 1])
def test_message_with_a_field_missing_or_extra_raises_decode_error(delta: int) -> None:
    tree = msgpack.unpackb(codec.encode_message(VoteResponse(1, "a", "b", True)))
    tree = tree[:-1] if delta < 0 else [*tree, 0]
    with pytest.raises(DecodeError):
        codec.decode_message(msgpack.packb(tree, use_bin_type=True))


@pytest.mark.parametrize(("tree", "reason"), [
    ([1, 1, 1, 1, b"", None], "conf change kind without a change"),
    ([1, 1, 1, 0, b"", [0, "n1", ""]], "normal entry carrying a change"),
    ([1, 0, 1, 0, b"", None], "index 0"),
    ([1, 1, 1, 7, b"", None], "unknown kind"),
    ([1, 1, 1, 1, b"", [9, "n1", ""]], "unknown change op"),
    ([1, 1, 1, 1, b"", [0, "", ""]], "empty node id"),
    ([1, 1, 1, 1, b"d", [0, "n1", ""]], "conf change carrying data"),
])
def test_entry_violating_its_invariants_raises_decode_error(tree: list[object],
                                                            reason: str) -> None:
    with pytest.raises(DecodeError):
        codec.decode_entry(msgpack.packb(tree, use_bin_type=True))


def test_an_append_carrying_a_conf_change_with_data_raises_decode_error() -> None:
    """No node makes such an entry (Entry refuses it), and Entry.size_bytes does not count
    its data: from a peer it is malformed, not an entry of unmeasured size."""
    change = Entry(1, 1, EntryKind.CONF_CHANGE, change=ConfChange(ConfChangeOp.REMOVE, "n1"))
    tree = msgpack.unpackb(codec.encode_message(AppendRequest(1, "a", "b", 0, 0, (change,), 0)))
    entry = msgpack.unpackb(tree[7][0])
    assert entry[4] == b""  # the data field, empty
    entry[4] = b"d" * 1000
    tree[7][0] = msgpack.packb(entry, use_bin_type=True)
    with pytest.raises(DecodeError, match="entry: a conf change entry carries no data"):
        codec.decode_message(msgpack.packb(tree, use_bin_type=True))


def test_snapshot_meta_with_a_voter_also_learner_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        codec.decode_snapshot_meta(msgpack.packb([1, 1, 1, ["a"], ["a"]], use_bin_type=True))
