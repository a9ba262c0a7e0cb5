"""The state machine's size (what the quota counts) and the replicated NOSPACE alarm
(raftkv/kv/state_machine.py, the alarm commands of raftkv/kv/commands.py)."""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.kv.commands import (
    AlarmDisarm,
    AlarmRaise,
    Batch,
    CommandDecodeError,
    Delete,
    JSONValue,
    LeaseGrant,
    LeaseRevoke,
    Put,
    adds_data,
    decode_command,
    encode_command,
)
from raftkv.kv.state_machine import (
    LEASE_BYTES,
    RECORD_OVERHEAD_BYTES,
    SEGMENT_TARGET_BYTES,
    AlarmRecord,
    AlarmResult,
    BatchResult,
    DeleteResult,
    KVStateMachine,
    LeaseRevokeResult,
    NoSpace,
    PutResult,
    SnapshotCorrupt,
    encoded_size,
    iter_snapshot_chunks,
    parse_snapshot,
    record_size,
)
from tests.kv.test_state_machine import Feeder

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=70_000),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=400)
def test_encoded_size_is_the_msgpack_encoding_length(value: JSONValue) -> None:
    assert encoded_size(value) == len(msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize("n", [0, 31, 32, 255, 256, 65535, 65536])
def test_encoded_size_of_strings_at_every_header_boundary(n: int) -> None:
    for text in ("a" * n, "é" * n):
        assert encoded_size(text) == len(msgpack.packb(text, use_bin_type=True))


def test_record_size_counts_key_value_and_overhead() -> None:
    assert record_size("ké", "abc") == 3 + 4 + RECORD_OVERHEAD_BYTES


def _recount(machine: KVStateMachine) -> int:
    view = machine.snapshot_view()
    return (sum(record_size(k, r[0]) for k, r in view.data.items())
            + LEASE_BYTES * len(view.leases))


ops = st.lists(st.tuples(st.sampled_from(["put", "delete", "batch", "grant", "revoke"]),
                         st.integers(0, 7), json_values), max_size=40)


@given(ops)
@settings(max_examples=150, deadline=None)
def test_size_is_exact_after_any_writes_and_survives_a_snapshot(
        script: list[tuple[str, int, JSONValue]]) -> None:
    kv = Feeder(KVStateMachine())
    leases: list[int] = []
    for op, k, value in script:
        key = f"key{k}"
        if op == "put":
            kv.apply(Put(key, value, lease=leases[-1] if leases and k % 2 else None))
        elif op == "delete":
            kv.apply(Delete(key))
        elif op == "batch":
            kv.apply(Batch((Put(key, value), Delete(f"key{(k + 1) % 8}"), Put(key, [value]))))
        elif op == "grant":
            leases.append(kv.next_index)
            kv.apply(LeaseGrant(10))
        elif leases:
            kv.apply(LeaseRevoke(leases.pop(0)))
        assert kv.machine.size_bytes == _recount(kv.machine)
    restored = KVStateMachine()
    restored.restore(kv.machine.snapshot(), kv.machine.applied_index)
    assert restored.size_bytes == kv.machine.size_bytes


# ------------------------------------------------------------------ the alarm


def test_alarm_commands_round_trip_and_are_checked() -> None:
    for cmd in (AlarmRaise("n1", "quota"), AlarmRaise("n3", "disk_full"), AlarmDisarm()):
        assert decode_command(encode_command(cmd)) == (cmd, None)
    with pytest.raises(ValueError, match="cause"):
        AlarmRaise("n1", "bored")
    bad = msgpack.packb([1, None, [16, "n1", "bored"]], use_bin_type=True)
    with pytest.raises(CommandDecodeError):
        decode_command(bad)


def test_what_adds_data() -> None:
    assert adds_data(Put("k", 1)) and adds_data(LeaseGrant(5))
    assert adds_data(Batch((Delete("a"), Put("b", 1))))
    assert not adds_data(Batch((Delete("a"),)))
    assert not any(adds_data(c) for c in (Delete("k"), LeaseRevoke(3), AlarmRaise("n1", "quota"),
                                          AlarmDisarm()))


def test_while_the_alarm_is_raised_only_writes_that_add_data_are_refused() -> None:
    kv = Feeder(KVStateMachine())
    kv.apply(Put("a", "x" * 100))
    kv.apply(Put("b", 1))
    lease = kv.next_index
    kv.apply(LeaseGrant(30))
    kv.apply(Put("c", 2, lease=lease))
    raised = kv.apply(AlarmRaise("n2", "quota"))
    assert isinstance(raised, AlarmResult)
    assert raised.alarms == (AlarmRecord("n2", "quota", raised.index),)
    assert kv.machine.alarm_active
    size = kv.machine.size_bytes

    for cmd in (Put("a", "y"), Put("new", 1), LeaseGrant(5), Batch((Delete("b"), Put("d", 3))),
                Put("b", 2, ttl_s=5)):
        assert isinstance(kv.apply(cmd, f"rid-{cmd}"[:200]), NoSpace)
    assert kv.machine.size_bytes == size and kv.machine.get("a") is not None
    assert kv.machine.get("b") == (1, 2)

    assert isinstance(kv.apply(Delete("a")), DeleteResult)
    assert isinstance(kv.apply(Batch((Delete("b"),))), BatchResult)
    revoked = kv.apply(LeaseRevoke(lease))
    assert isinstance(revoked, LeaseRevokeResult) and revoked.keys == ("c",)
    assert kv.machine.size_bytes == 0

    # A second node raising for another cause adds a record; raising again changes nothing.
    kv.apply(AlarmRaise("n3", "disk_full"))
    kv.apply(AlarmRaise("n2", "quota"))
    assert [(a.node_id, a.cause) for a in kv.machine.alarms] == [("n2", "quota"),
                                                                   ("n3", "disk_full")]
    assert kv.apply(AlarmDisarm()) == AlarmResult(kv.machine.applied_index, ())
    active: bool = kv.machine.alarm_active  # read anew: the disarm cleared it
    assert not active
    assert isinstance(kv.apply(Put("a", "z")), PutResult)


def test_a_write_refused_for_no_space_applies_when_retried_after_the_disarm() -> None:
    """NoSpace is not remembered for the request id: the retry is not a replay."""
    kv = Feeder(KVStateMachine())
    kv.apply(AlarmRaise("n1", "map_full"))
    assert isinstance(kv.apply(Put("k", 1), "req-1"), NoSpace)
    kv.apply(AlarmDisarm())
    result = kv.apply(Put("k", 1), "req-1")
    assert isinstance(result, PutResult) and kv.machine.get("k") == (1, result.index)
    assert kv.apply(Put("k", 1), "req-1") == result  # and now it is remembered


def test_alarms_are_carried_in_snapshots_as_an_optional_section() -> None:
    kv = Feeder(KVStateMachine())
    kv.apply(Put("k", 1))
    plain = kv.machine.snapshot()
    header = msgpack.Unpacker(raw=False)
    header.feed(plain)
    assert "alarms" not in next(header)  # no alarm: the section is left out entirely
    kv.apply(AlarmRaise("n2", "quota"))
    kv.apply(AlarmRaise("n1", "disk_full"))
    restored = KVStateMachine()
    restored.restore(kv.machine.snapshot(), kv.machine.applied_index)
    assert restored.alarms == kv.machine.alarms
    assert isinstance(Feeder(restored).apply(Put("x", 1)), NoSpace)
    # A snapshot without the section (written before it existed) reads as no alarm.
    old = KVStateMachine()
    old.restore(plain, 1)
    assert old.alarms == () and not old.alarm_active


def test_a_bad_alarm_section_is_refused() -> None:
    kv = Feeder(KVStateMachine())
    kv.apply(AlarmRaise("n2", "quota"))
    view = kv.machine.snapshot_view()
    view.alarms[("n2", "quota")] = 99  # after the snapshot's index
    with pytest.raises(SnapshotCorrupt, match="alarm"):
        parse_snapshot(b"".join(iter_snapshot_chunks(view)))


def test_segments_of_large_values_stay_near_the_target_size() -> None:
    kv = Feeder(KVStateMachine())
    for i in range(40):
        kv.apply(Put(f"k{i}", "v" * 200_000))
    chunks = list(iter_snapshot_chunks(kv.machine.snapshot_view()))
    assert max(map(len, chunks)) <= 2 * SEGMENT_TARGET_BYTES
    assert parse_snapshot(b"".join(chunks)) == kv.machine.snapshot_view()
