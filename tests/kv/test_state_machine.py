"""The key-value state machine and its commands: encoding, apply semantics, compare-and-swap,
batches, idempotent retries, snapshots."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.core.types import ConfChange, ConfChangeOp, Entry, EntryKind
from raftkv.kv import state_machine as sm_module
from raftkv.kv.commands import (
    ENVELOPE_VERSION,
    MAX_BATCH_OPS,
    MAX_KEY_BYTES,
    MAX_VALUE_DEPTH,
    Batch,
    Command,
    CommandDecodeError,
    Delete,
    JSONValue,
    Put,
    decode_command,
    encode_command,
)
from raftkv.kv.state_machine import (
    SEGMENT_KEYS,
    BatchResult,
    ConditionFailed,
    DeleteResult,
    InvalidCommand,
    KVStateMachine,
    PutResult,
    SnapshotCorrupt,
    StateMachineError,
    iter_snapshot_chunks,
    parse_snapshot,
    serialize_snapshot,
)

# ------------------------------------------------------------------ strategies and helpers

json_values: st.SearchStrategy[JSONValue] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
keys = st.text(min_size=1, max_size=12)
prev_indices = st.none() | st.integers(0, 2**40)
puts = st.builds(Put, keys, json_values, prev_indices)
deletes = st.builds(Delete, keys, prev_indices)
batches = st.builds(Batch, st.lists(puts | deletes, min_size=1, max_size=5).map(tuple))
commands: st.SearchStrategy[Command] = puts | deletes | batches
request_ids = st.none() | st.text(min_size=1, max_size=40)


class Feeder:
    """Feeds commands to a state machine as consecutive committed entries."""

    def __init__(self, machine: KVStateMachine, term: int = 1) -> None:
        self.machine = machine
        self.term = term

    @property
    def next_index(self) -> int:
        return self.machine.applied_index + 1

    def apply(self, cmd: Command, request_id: str | None = None) -> object:
        return self.apply_data(encode_command(cmd, request_id))

    def apply_data(self, data: bytes) -> object:
        return self.machine.apply(Entry(self.next_index, self.term, data=data))

    def change(self, op: ConfChangeOp, node_id: str, address: str = "") -> object:
        entry = Entry(
            self.next_index, self.term, EntryKind.CONF_CHANGE,
            change=ConfChange(op, node_id, address),
        )
        return self.machine.apply(entry)


@pytest.fixture
def kv() -> Feeder:
    return Feeder(KVStateMachine())


def state_of(machine: KVStateMachine) -> tuple[object, ...]:
    return (
        machine.applied_index,
        machine.items("", 100_000),
        dict(machine.addresses),
    )


# ------------------------------------------------------------------ commands


@given(commands, request_ids)
def test_commands_round_trip_through_their_encoding(cmd: Command, request_id: str | None) -> None:
    assert decode_command(encode_command(cmd, request_id)) == (cmd, request_id)


@given(st.binary(max_size=64))
def test_decoding_arbitrary_bytes_fails_only_with_command_decode_error(data: bytes) -> None:
    with contextlib.suppress(CommandDecodeError):
        decode_command(data)


msgpack_objects = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats() | st.text(max_size=4)
    | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=10,
)


@given(st.integers(0, 3), msgpack_objects, msgpack_objects)
def test_decoding_wrongly_shaped_envelopes_fails_only_with_command_decode_error(
    tag: int, a: object, b: object
) -> None:
    for wire in ([tag, a, b], [tag, a], [tag, a, b, None], [tag, [a, b]]):
        data = msgpack.packb([ENVELOPE_VERSION, None, wire], use_bin_type=True)
        with contextlib.suppress(CommandDecodeError):
            decode_command(data)


def _envelope(*parts: object) -> bytes:
    data: bytes = msgpack.packb(list(parts), use_bin_type=True)
    return data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "msgpack"),
        (b"\xc1", "msgpack"),
        (encode_command(Put("k", 1)) + b"\x00", "msgpack"),  # trailing bytes
        (_envelope(2, None, [0, "k", 1, None]), "version"),
        (_envelope(True, None, [0, "k", 1, None]), "version"),
        (_envelope(1, None), "3- or 4-element"),
        (_envelope({"v": 1}), "3- or 4-element"),
        (_envelope(1, "", [0, "k", 1, None]), "request id"),
        (_envelope(1, 7, [0, "k", 1, None]), "request id"),
        (_envelope(1, None, [9, "k", 1, None]), "tag"),
        (_envelope(1, None, [0, "", 1, None]), "key"),
        (_envelope(1, None, [0, b"k", 1, None]), "key"),
        (_envelope(1, None, [0, "k", b"bytes", None]), "JSON"),
        (_envelope(1, None, [0, "k", 1.5, -1]), "prev_index"),
        (_envelope(1, None, [1, "k", "3"]), "prev_index"),
        (_envelope(1, None, [2, []]), "batch"),
        (_envelope(1, None, [2, [[2, [[1, "k", None]]]]]), "tag"),  # nested batch
        (_envelope(1, None, [2, "ops"]), "array"),
        (_envelope(1, None, [0, "k", float("nan"), None]), "finite"),
        (_envelope(1, None, [0, "k", msgpack.ExtType(5, b"x"), None]), "JSON"),
    ],
)
def test_malformed_command_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(CommandDecodeError, match=reason):
        decode_command(data)


def test_command_decode_error_is_a_value_error() -> None:
    assert issubclass(CommandDecodeError, ValueError)


# Untyped aliases, to build the invalid commands the type checker would stop.
AnyPut: Any = Put
AnyDelete: Any = Delete
AnyBatch: Any = Batch


@pytest.mark.parametrize(
    "make",
    [
        lambda: AnyPut("", 1),
        lambda: AnyPut("k" * (MAX_KEY_BYTES + 1), 1),
        lambda: AnyPut("é" * (MAX_KEY_BYTES // 2 + 1), 1),  # counted in UTF-8 bytes
        lambda: AnyPut("\ud800", 1),  # a lone surrogate cannot be encoded
        lambda: AnyPut(7, 1),
        lambda: AnyPut("k", math.nan),
        lambda: AnyPut("k", [1, math.inf]),
        lambda: AnyPut("k", (1, 2)),
        lambda: AnyPut("k", {1: "int key"}),
        lambda: AnyPut("k", {"a": {1, 2}}),
        lambda: AnyPut("k", b"bytes"),
        lambda: AnyPut("k", 2**64),
        lambda: AnyPut("k", -(2**63) - 1),
        lambda: AnyPut("k", "\udfff"),
        lambda: AnyPut("k", 1, prev_index=-1),
        lambda: AnyPut("k", 1, prev_index=True),
        lambda: AnyDelete("k", prev_index=1.0),
        lambda: AnyBatch(()),
        lambda: AnyBatch([Put("k", 1)]),
        lambda: AnyBatch((Put("k", 1), Batch((Put("j", 2),)))),
        lambda: AnyBatch(tuple(Put(f"k{i}", i) for i in range(MAX_BATCH_OPS + 1))),
    ],
)
def test_invalid_commands_are_refused_on_construction(make: Callable[[], object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        make()


def test_values_nested_up_to_the_limit_are_accepted_and_deeper_refused() -> None:
    def nested(depth: int) -> JSONValue:
        value: JSONValue = 1
        for i in range(depth):
            value = [value] if i % 2 else {"k": value}
        return value

    Put("k", nested(MAX_VALUE_DEPTH))
    with pytest.raises(ValueError, match="nested"):
        Put("k", nested(MAX_VALUE_DEPTH + 1))


def test_encoding_refuses_a_bad_request_id() -> None:
    with pytest.raises(ValueError, match="request id"):
        encode_command(Put("k", 1), "")


# ------------------------------------------------------------------ apply


def test_put_stores_the_value_at_the_entry_index(kv: Feeder) -> None:
    assert kv.apply(Put("a", {"x": [1, 2.5, None]})) == PutResult(1, {"x": [1, 2.5, None]})
    assert kv.machine.get("a") == ({"x": [1, 2.5, None]}, 1)
    assert kv.machine.applied_index == 1


def test_put_overwrites_and_moves_the_last_modified_index(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    kv.apply(Put("b", 2))
    assert kv.apply(Put("a", 3)) == PutResult(3, 3)
    assert kv.machine.get("a") == (3, 3)
    assert kv.machine.get("b") == (2, 2)


def test_delete_reports_whether_the_key_existed(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    assert kv.apply(Delete("a")) == DeleteResult(2, deleted=True)
    assert kv.machine.get("a") is None
    assert kv.apply(Delete("a")) == DeleteResult(3, deleted=False)
    assert len(kv.machine) == 0


def test_leader_no_op_entry_changes_nothing_but_the_applied_index(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    assert kv.apply_data(b"") is None
    assert kv.machine.applied_index == 2
    assert kv.machine.items() == [("a", 1, 1)]


def test_undecodable_entry_is_answered_invalid_and_changes_nothing(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    result = kv.apply_data(b"\x93\x07garbage")
    assert isinstance(result, InvalidCommand) and result.index == 2
    assert kv.machine.applied_index == 2
    assert kv.machine.items() == [("a", 1, 1)]


def test_membership_changes_keep_the_address_book(kv: Feeder) -> None:
    assert kv.change(ConfChangeOp.ADD_VOTER, "n1", "10.0.0.1:7000") is None
    kv.change(ConfChangeOp.ADD_LEARNER, "n2", "10.0.0.2:7000")
    kv.change(ConfChangeOp.ADD_VOTER, "n2")  # promotion without an address keeps it
    kv.change(ConfChangeOp.ADD_LEARNER, "n3", "10.0.0.3:7000")
    kv.change(ConfChangeOp.ADD_VOTER, "n1", "10.0.0.9:7000")  # a new address replaces it
    kv.change(ConfChangeOp.REMOVE, "n3")

    assert dict(kv.machine.addresses) == {"n1": "10.0.0.9:7000", "n2": "10.0.0.2:7000"}
    assert kv.machine.applied_index == 6
    assert len(kv.machine) == 0


def test_address_book_is_read_only(kv: Feeder) -> None:
    kv.change(ConfChangeOp.ADD_VOTER, "n1", "a:1")
    with pytest.raises(TypeError):
        kv.machine.addresses["n1"] = "b:2"  # type: ignore[index]


def test_entries_already_applied_are_skipped(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    kv.apply(Put("a", 2))
    stale = Entry(2, 1, data=encode_command(Put("a", 99)))

    assert kv.machine.apply(stale) is None
    assert kv.machine.get("a") == (2, 2)


def test_a_gap_in_applied_entries_is_refused(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    with pytest.raises(StateMachineError, match="skipped"):
        kv.machine.apply(Entry(3, 1, data=encode_command(Put("a", 3))))
    assert kv.machine.applied_index == 1


# ------------------------------------------------------------------ compare-and-swap


def test_put_with_prev_index_zero_creates_only_an_absent_key(kv: Feeder) -> None:
    assert kv.apply(Put("a", 1, prev_index=0)) == PutResult(1, 1)
    assert kv.apply(Put("a", 2, prev_index=0)) == ConditionFailed(2, "a", current_index=1)
    assert kv.machine.get("a") == (1, 1)


def test_put_with_matching_prev_index_swaps_and_a_stale_one_fails(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    assert kv.apply(Put("a", 2, prev_index=1)) == PutResult(2, 2)
    assert kv.apply(Put("a", 3, prev_index=1)) == ConditionFailed(3, "a", current_index=2)
    assert kv.machine.get("a") == (2, 2)
    assert kv.machine.applied_index == 3


def test_delete_with_prev_index_deletes_only_the_expected_version(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    assert kv.apply(Delete("a", prev_index=5)) == ConditionFailed(2, "a", current_index=1)
    assert kv.machine.get("a") == (1, 1)
    assert kv.apply(Delete("a", prev_index=1)) == DeleteResult(3, deleted=True)
    assert kv.apply(Delete("a", prev_index=0)) == DeleteResult(4, deleted=False)


# ------------------------------------------------------------------ batches


def test_batch_applies_every_operation_at_one_index(kv: Feeder) -> None:
    kv.apply(Put("old", 0))
    result = kv.apply(Batch((Put("a", 1), Put("b", 2), Delete("old"), Delete("missing"))))

    assert result == BatchResult(
        2, (PutResult(2, 1), PutResult(2, 2), DeleteResult(2, True), DeleteResult(2, False))
    )
    assert kv.machine.items() == [("a", 1, 2), ("b", 2, 2)]


def test_batch_with_a_failing_condition_applies_nothing(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    kv.apply(Put("b", 1))
    before = kv.machine.snapshot()

    result = kv.apply(Batch((Put("a", 2, prev_index=1), Delete("c"), Put("b", 2, prev_index=7))))

    assert result == ConditionFailed(3, "b", current_index=2)
    assert kv.machine.get("a") == (1, 1)
    assert kv.machine.get("b") == (1, 2)
    after = KVStateMachine()
    after.restore(before, 2)
    assert state_of(kv.machine)[1:] == state_of(after)[1:]


def test_batch_conditions_see_the_batch_s_earlier_operations(kv: Feeder) -> None:
    result = kv.apply(Batch((Put("a", 1, prev_index=0), Put("a", 2, prev_index=1))))
    assert result == BatchResult(1, (PutResult(1, 1), PutResult(1, 2)))
    assert kv.machine.get("a") == (2, 1)

    result = kv.apply(Batch((Delete("a"), Put("a", 3, prev_index=0), Delete("a", prev_index=2))))
    assert result == BatchResult(2, (DeleteResult(2, True), PutResult(2, 3), DeleteResult(2, True)))
    assert kv.machine.get("a") is None


def test_batch_put_after_delete_of_the_same_key_leaves_the_put(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    kv.apply(Batch((Delete("a"), Put("a", 2))))
    assert kv.machine.get("a") == (2, 2)
    assert kv.machine.items() == [("a", 2, 2)]


# ------------------------------------------------------------------ idempotent retries


def test_retried_put_returns_the_first_answer_without_applying_again(kv: Feeder) -> None:
    first = kv.apply(Put("a", 1), "req-1")
    kv.apply(Put("a", 2))
    retry = kv.apply(Put("a", 1), "req-1")

    assert first == retry == PutResult(1, 1)
    assert kv.machine.get("a") == (2, 2)
    assert kv.machine.applied_index == 3


def test_retried_delete_still_reports_that_it_deleted(kv: Feeder) -> None:
    kv.apply(Put("a", 1))
    assert kv.apply(Delete("a"), "req-d") == DeleteResult(2, True)
    assert kv.apply(Delete("a"), "req-d") == DeleteResult(2, True)


def test_retried_failed_condition_fails_the_same_way_even_if_it_would_now_hold(
    kv: Feeder,
) -> None:
    kv.apply(Put("a", 1))
    failed = kv.apply(Put("a", 2, prev_index=0), "req-cas")
    kv.apply(Delete("a"))

    assert kv.apply(Put("a", 2, prev_index=0), "req-cas") == failed == ConditionFailed(2, "a", 1)
    assert kv.machine.get("a") is None


def test_retried_batch_returns_the_first_answer(kv: Feeder) -> None:
    kv.apply(Put("x", 0))
    batch = Batch((Put("a", [1]), Delete("x"), Delete("y")))
    first = kv.apply(batch, "req-b")
    kv.apply(Put("x", 5))

    assert kv.apply(batch, "req-b") == first
    assert kv.machine.get("x") == (5, 3)


def test_request_id_reused_for_another_command_is_refused(kv: Feeder) -> None:
    kv.apply(Put("a", 1), "req-1")
    result = kv.apply(Put("a", 2), "req-1")

    assert isinstance(result, InvalidCommand) and "request id" in result.reason
    assert kv.machine.get("a") == (1, 1)


def test_oldest_request_ids_are_forgotten_first() -> None:
    kv = Feeder(KVStateMachine(max_request_ids=3))
    for n in range(4):
        kv.apply(Put(f"k{n}", n), f"req-{n}")  # req-0 is evicted by req-3

    assert kv.apply(Put("k1", 1), "req-1") == PutResult(2, 1)  # remembered
    assert kv.apply(Put("k0", 0), "req-0") == PutResult(6, 0)  # forgotten: applied again
    assert kv.machine.get("k0") == (0, 6)


def test_zero_request_ids_remembered_means_every_retry_applies() -> None:
    kv = Feeder(KVStateMachine(max_request_ids=0))
    kv.apply(Put("a", 1), "req")
    assert kv.apply(Put("a", 1), "req") == PutResult(2, 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(commands, st.sampled_from([None, "r1", "r2", "r3", "r4", "r5"]))))
def test_replicas_applying_the_same_entries_reach_the_same_state(
    history: list[tuple[Command, str | None]],
) -> None:
    a, b = Feeder(KVStateMachine(max_request_ids=2)), Feeder(KVStateMachine(max_request_ids=2))
    c: Feeder | None = None
    for n, (cmd, request_id) in enumerate(history):
        data = encode_command(cmd, request_id)
        assert a.apply_data(data) == b.apply_data(data)
        if c is not None:
            c.apply_data(data)
        if n == len(history) // 2:  # a third replica joins from a snapshot half way
            c = Feeder(KVStateMachine(max_request_ids=2))
            c.machine.restore(b.machine.snapshot(), b.machine.applied_index)
    assert a.machine.snapshot() == b.machine.snapshot()
    if c is not None:
        assert c.machine.snapshot() == a.machine.snapshot()


# ------------------------------------------------------------------ reads


def test_items_are_in_key_order_filtered_by_prefix_and_limited(kv: Feeder) -> None:
    for key in ("user/2", "user/10", "group/1", "user/1", "users", "user/3"):
        kv.apply(Put(key, key.upper()))
    kv.apply(Delete("user/3"))

    assert [k for k, _, _ in kv.machine.items("user/")] == ["user/1", "user/10", "user/2"]
    assert kv.machine.items("user/", limit=2) == [
        ("user/1", "USER/1", 4), ("user/10", "USER/10", 2),
    ]
    assert [k for k, _, _ in kv.machine.items()] == [
        "group/1", "user/1", "user/10", "user/2", "users",
    ]
    assert kv.machine.items("zzz") == []


@pytest.mark.parametrize("limit", [0, -1, sm_module.MAX_ITEMS_LIMIT + 1])
def test_items_refuses_a_bad_limit(kv: Feeder, limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        kv.machine.items("", limit)


@pytest.fixture
def tiny_key_order_slack(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the sorted-key index merge and drop after a few writes, not 1,024."""
    monkeypatch.setattr(sm_module._KeyOrder, "_MIN_SLACK", 2)
    yield


key_ops = st.lists(
    st.tuples(st.sampled_from(["put", "delete", "items"]), st.text("abc", min_size=1, max_size=3)),
    max_size=80,
)


@pytest.mark.usefixtures("tiny_key_order_slack")
@settings(max_examples=200, deadline=None)
@given(key_ops, st.integers(1, 6))
def test_items_match_a_sorted_model_through_any_writes(
    ops: list[tuple[str, str]], limit: int
) -> None:
    kv = Feeder(KVStateMachine())
    model: dict[str, int] = {}
    for op, key in ops:
        if op == "put":
            kv.apply(Put(key, 0))
            model[key] = kv.machine.applied_index
        elif op == "delete":
            kv.apply(Delete(key))
            model.pop(key, None)
        else:
            prefix = key[:1] if len(key) > 1 else ""
            expected = sorted((k, 0, i) for k, i in model.items() if k.startswith(prefix))
            assert kv.machine.items(prefix, limit) == expected[:limit]
    assert kv.machine.items("", 1000) == sorted((k, 0, i) for k, i in model.items())


# ------------------------------------------------------------------ snapshots


def populated() -> Feeder:
    kv = Feeder(KVStateMachine())
    kv.change(ConfChangeOp.ADD_VOTER, "n1", "h1:7000")
    kv.apply(Batch(tuple(Put(f"key/{i:03d}", {"n": i, "tags": ["x", i / 3]}) for i in range(50))))
    kv.apply(Put("unicode/ключ", "значение ✓"), "req-a")
    kv.apply(Delete("key/007"), "req-b")
    kv.apply(Put("key/001", None, prev_index=0), "req-c")  # fails; remembered as failed
    kv.change(ConfChangeOp.ADD_LEARNER, "n2", "h2:7000")
    kv.apply_data(b"")
    return kv


def test_snapshot_restores_to_an_equal_state() -> None:
    source = populated()
    data = source.machine.snapshot()

    replica = KVStateMachine()
    replica.restore(data, source.machine.applied_index)

    assert state_of(replica) == state_of(source.machine)
    assert replica.get("key/010") == source.machine.get("key/010")
    assert replica.snapshot() == data


def test_request_ids_survive_a_snapshot() -> None:
    source = populated()
    replica = Feeder(KVStateMachine())
    replica.machine.restore(source.machine.snapshot(), source.machine.applied_index)

    assert replica.apply(Delete("key/007"), "req-b") == DeleteResult(4, True)
    assert replica.apply(Put("key/001", None, prev_index=0), "req-c") == ConditionFailed(
        5, "key/001", 2
    )
    assert replica.machine.get("key/001") == ({"n": 1, "tags": ["x", 1 / 3]}, 2)


def test_restore_into_a_smaller_request_memory_keeps_the_newest() -> None:
    source = populated()
    replica = Feeder(KVStateMachine(max_request_ids=1))
    replica.machine.restore(source.machine.snapshot(), source.machine.applied_index)

    assert replica.apply(Put("key/001", None, prev_index=0), "req-c") == ConditionFailed(
        5, "key/001", 2
    )
    assert replica.apply(Put("unicode/ключ", "значение ✓"), "req-a") == PutResult(9, "значение ✓")


def test_restore_replaces_the_previous_state() -> None:
    source = populated()
    replica = Feeder(KVStateMachine())
    for n in range(20):
        replica.apply(Put(f"other/{n}", n))
    replica.change(ConfChangeOp.ADD_VOTER, "n9", "h9:1")
    assert len(replica.machine.items("", 1000)) == 20  # builds the sorted-key index

    replica.machine.restore(source.machine.snapshot(), source.machine.applied_index)

    assert state_of(replica.machine) == state_of(source.machine)
    assert replica.machine.items("other/") == []


def test_empty_state_machine_snapshot_round_trips() -> None:
    replica = KVStateMachine()
    replica.restore(KVStateMachine().snapshot(), 0)
    assert state_of(replica) == (0, [], {})


def test_snapshot_view_is_unaffected_by_later_writes() -> None:
    kv = populated()
    view = kv.machine.snapshot_view()
    expected = serialize_snapshot(view)

    kv.apply(Put("key/000", "changed"), "req-new")
    kv.apply(Delete("key/001"))
    kv.change(ConfChangeOp.REMOVE, "n1")

    assert serialize_snapshot(view) == expected
    assert view.applied_index == kv.machine.applied_index - 3


def test_large_state_is_serialised_in_segments_that_join_to_the_snapshot() -> None:
    kv = Feeder(KVStateMachine())
    for start in range(0, 2 * SEGMENT_KEYS + 10, 1000):
        kv.apply(Batch(tuple(Put(f"k{i}", i) for i in range(start, start + 1000))), f"r{start}")
    view = kv.machine.snapshot_view()

    chunks = list(iter_snapshot_chunks(view))

    assert len(chunks) >= 1 + 3 + 1  # header, three data segments, remembered answers
    assert b"".join(chunks) == serialize_snapshot(view) == kv.machine.snapshot()
    assert parse_snapshot(b"".join(chunks)) == view


def test_restore_at_a_different_index_is_refused() -> None:
    source = populated()
    with pytest.raises(SnapshotCorrupt, match="index"):
        KVStateMachine().restore(source.machine.snapshot(), source.machine.applied_index + 1)


def _corruptions(data: bytes) -> list[bytes]:
    header = msgpack.packb({"format": "raftkv.kv", "v": 99}, use_bin_type=True)
    return [
        b"",
        b"not msgpack at all \xc1",
        data[: len(data) // 2],
        data[:-1],
        data + b"\x00",
        header + data,
        msgpack.packb([1, 2, 3]),
        data.replace(b"raftkv.kv", b"raftkv.xx"),
        data.replace(b"h1:7000", b"h1:7000"[:-1] + b"\xff"),  # invalid UTF-8
    ]


@pytest.mark.parametrize("which", range(9))
def test_corrupt_snapshot_is_refused_clearly_and_leaves_the_state_alone(which: int) -> None:
    source = populated()
    bad = _corruptions(source.machine.snapshot())[which]
    replica = populated()
    before = state_of(replica.machine)

    with pytest.raises(SnapshotCorrupt, match="snapshot"):
        replica.machine.restore(bad, source.machine.applied_index)
    assert state_of(replica.machine) == before


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_damaged_byte_is_refused_or_restores_a_valid_state(data: st.DataObject) -> None:
    source = populated().machine
    snapshot = bytearray(source.snapshot())
    position = data.draw(st.integers(0, len(snapshot) - 1))
    snapshot[position] ^= data.draw(st.integers(1, 255))
    replica = KVStateMachine()
    try:
        replica.restore(bytes(snapshot), source.applied_index)
    except SnapshotCorrupt:
        return
    # A damaged value byte can still parse (the store's checksum catches that); the
    # result must be a usable state machine all the same.
    replica.snapshot()


def test_max_request_ids_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_request_ids"):
        KVStateMachine(max_request_ids=-1)


def test_invalid_command_reason_and_log_never_quote_the_value(
    kv: Feeder, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "secret-value-\ud800"
    data = _envelope(ENVELOPE_VERSION, None, [0, "k", ["secret-value", b"raw"], None])

    with caplog.at_level("DEBUG"):
        result = kv.apply_data(data)

    assert isinstance(result, InvalidCommand)
    assert "secret" not in result.reason
    assert "secret" not in caplog.text
    with pytest.raises(ValueError) as raised:
        Put("k", secret)
    assert "ud800" not in str(raised.value)  # not even the offending character
