"""MemberIncarnation: which data dir each member runs on, recorded once by the leader, cleared
by the member's removal, carried by snapshots (a wiped member is then refused)."""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest

from raftkv.core.types import ConfChangeOp
from raftkv.kv.commands import (
    CommandDecodeError,
    MemberIncarnation,
    decode_command,
    encode_command,
)
from raftkv.kv.state_machine import (
    IncarnationResult,
    KVStateMachine,
    SnapshotCorrupt,
    parse_snapshot,
    serialize_snapshot,
)
from tests.kv.test_state_machine import Feeder

INC_A = "a" * 32
INC_B = "b" * 32


@pytest.fixture
def kv() -> Feeder:
    feeder = Feeder(KVStateMachine())
    feeder.change(ConfChangeOp.ADD_VOTER, "n1", "127.0.0.1:1")
    feeder.change(ConfChangeOp.ADD_VOTER, "n2", "127.0.0.1:2")
    return feeder


def test_the_command_round_trips_and_bad_ones_do_not_decode() -> None:
    cmd = MemberIncarnation("n1", INC_A)
    assert decode_command(encode_command(cmd)) == (cmd, None)
    for bad in (["n1", ""], ["n1", "x" * 65], ["n1", "not/alnum"], ["", INC_A], [1, INC_A]):
        with pytest.raises(CommandDecodeError):
            decode_command(msgpack.packb([1, None, [18, *bad]]))


def test_the_first_record_stays_and_another_is_not_taken(kv: Feeder) -> None:
    first = kv.apply(MemberIncarnation("n1", INC_A))
    assert first == IncarnationResult(3, "n1", INC_A, recorded=True)
    again = kv.apply(MemberIncarnation("n1", INC_B))
    assert again == IncarnationResult(4, "n1", INC_A, recorded=False)
    assert dict(kv.machine.incarnations) == {"n1": INC_A}


def test_no_record_for_a_node_that_is_no_member(kv: Feeder) -> None:
    result = kv.apply(MemberIncarnation("n9", INC_A))
    assert result == IncarnationResult(3, "n9", None, recorded=False)
    assert dict(kv.machine.incarnations) == {}


def test_a_removal_clears_the_record_and_a_new_member_gets_its_own(kv: Feeder) -> None:
    kv.apply(MemberIncarnation("n2", INC_A))
    kv.change(ConfChangeOp.REMOVE, "n2")
    assert "n2" not in kv.machine.incarnations
    kv.change(ConfChangeOp.ADD_LEARNER, "n2", "127.0.0.1:2")
    kv.apply(MemberIncarnation("n2", INC_B))
    assert kv.machine.incarnations["n2"] == INC_B


def test_snapshots_carry_the_records(kv: Feeder) -> None:
    kv.apply(MemberIncarnation("n1", INC_A))
    view = parse_snapshot(serialize_snapshot(kv.machine.snapshot_view()))
    assert view.incarnations == {"n1": INC_A}
    restored = KVStateMachine()
    restored.restore_view(view, view.applied_index)
    assert dict(restored.incarnations) == {"n1": INC_A}


def test_a_snapshot_without_records_restores_none_and_bad_ones_are_corrupt(kv: Feeder) -> None:
    """Snapshots of earlier builds have no "incarnations" in their header."""
    data = serialize_snapshot(kv.machine.snapshot_view())
    assert parse_snapshot(data).incarnations == {}
    kv.apply(MemberIncarnation("n1", INC_A))
    good = serialize_snapshot(kv.machine.snapshot_view())
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(good)
    header = next(unpacker)
    header["incarnations"] = {"n1": 5}
    bad = msgpack.packb(header, use_bin_type=True) + good[unpacker.tell():]
    with pytest.raises(SnapshotCorrupt, match="incarnations"):
        parse_snapshot(bad)
