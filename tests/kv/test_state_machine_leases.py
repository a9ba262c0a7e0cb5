"""Leases in the key-value state machine: the lease commands and their encoding, attaching and
detaching keys, revokes that delete every attached key in one entry, idempotent retries, and
snapshots (version 2, and version 1 still read)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.core.types import Entry
from raftkv.kv import state_machine as sm_module
from raftkv.kv.commands import (
    ENVELOPE_VERSION,
    MAX_LEASE_ID,
    MAX_LEASE_TTL_S,
    MIN_LEASE_TTL_S,
    Batch,
    Command,
    CommandDecodeError,
    Delete,
    LeaseGrant,
    LeaseRevoke,
    Put,
    decode_command,
    encode_command,
)
from raftkv.kv.state_machine import (
    BatchResult,
    ConditionFailed,
    DeleteResult,
    KVSnapshotView,
    KVStateMachine,
    LeaseGrantResult,
    LeaseNotFound,
    LeaseRecord,
    LeaseRevokeResult,
    PutResult,
    SnapshotCorrupt,
    iter_snapshot_chunks,
    parse_snapshot,
    serialize_snapshot,
)


class Feeder:
    """Feeds commands to a state machine as consecutive committed entries."""

    def __init__(self, machine: KVStateMachine | None = None) -> None:
        self.machine = machine or KVStateMachine()

    @property
    def next_index(self) -> int:
        return self.machine.applied_index + 1

    def apply(self, cmd: Command, request_id: str | None = None) -> object:
        data = encode_command(cmd, request_id)
        return self.machine.apply(Entry(self.next_index, 1, data=data))

    def grant(self, ttl_s: int = 10) -> int:
        result = self.apply(LeaseGrant(ttl_s))
        assert isinstance(result, LeaseGrantResult)
        return result.lease_id


@pytest.fixture
def kv() -> Feeder:
    return Feeder()


def full_state(machine: KVStateMachine) -> tuple[object, ...]:
    leases = [machine.lease(r.lease_id) for r in machine.leases(100_000)]
    return (machine.applied_index, machine.items("", 100_000), leases,
            {k: machine.lease_of(k) for k, _, _ in machine.items("", 100_000)})


# ------------------------------------------------------------------ commands and encoding
ttls = st.integers(MIN_LEASE_TTL_S, MAX_LEASE_TTL_S)
lease_ids = st.integers(1, MAX_LEASE_ID)
lease_commands: st.SearchStrategy[Command] = (
    st.builds(LeaseGrant, ttls)
    | st.builds(LeaseRevoke, lease_ids, st.booleans())
    | st.builds(Put, st.text(min_size=1, max_size=8), st.integers(-5, 5),
                st.none() | st.integers(0, 2**40),
                lease=lease_ids)
    | st.builds(Put, st.text(min_size=1, max_size=8), st.none(), ttl_s=ttls)
    | st.builds(lambda lease: Batch((Put("a", 1, lease=lease), Delete("b"), Put("c", 2))),
                lease_ids)
)


@given(lease_commands, st.none() | st.text(min_size=1, max_size=10))
def test_lease_commands_round_trip_through_their_encoding(
    cmd: Command, request_id: str | None
) -> None:
    assert decode_command(encode_command(cmd, request_id)) == (cmd, request_id)


def _wire(cmd: Command) -> object:
    return msgpack.unpackb(encode_command(cmd), raw=False)[2]


def test_entries_without_leases_are_written_exactly_as_before() -> None:
    """Old entries decode the same and new plain commands encode byte for byte as before."""
    assert _wire(Put("k", 1, 3)) == [0, "k", 1, 3]
    assert _wire(Delete("k")) == [1, "k", None]
    assert _wire(Batch((Put("k", 1),))) == [2, [[0, "k", 1, None]]]
    assert encode_command(Put("k", 1)) == msgpack.packb([1, None, [0, "k", 1, None]],
                                                        use_bin_type=True)


def test_lease_commands_have_the_documented_wire_shapes() -> None:
    assert _wire(Put("k", 1, None, lease=7)) == [0, "k", 1, None, 7, None]
    assert _wire(Put("k", 1, 0, ttl_s=10)) == [0, "k", 1, 0, None, 10]
    assert _wire(LeaseGrant(10)) == [3, 10]
    assert _wire(LeaseRevoke(7, expired=True)) == [4, 7, True]
    assert ENVELOPE_VERSION == 1


def _envelope(wire: object) -> bytes:
    data: bytes = msgpack.packb([ENVELOPE_VERSION, None, wire], use_bin_type=True)
    return data


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        ([3, MIN_LEASE_TTL_S - 1], "ttl"),
        ([3, MAX_LEASE_TTL_S + 1], "ttl"),
        ([3, 10.0], "ttl"),
        ([3, True], "ttl"),
        ([3], "tag 3"),
        ([4, 0, False], "lease id"),
        ([4, "7", False], "lease id"),
        ([4, 7, 1], "expired"),
        ([4, 7], "tag 4"),
        ([0, "k", 1, None, None, None], "lease or a ttl"),
        ([0, "k", 1, None, 7, 10], "not both"),
        ([0, "k", 1, None, 0, None], "lease id"),
        ([0, "k", 1, None, None, 1], "ttl"),
        ([0, "k", 1, None, 7], "5 fields"),
        ([2, [[0, "k", 1, None, None, 10]]], "batch"),
        ([2, [[3, 10]]], "tag 3"),
        ([2, [[4, 7, False]]], "tag 4"),
    ],
)
def test_malformed_lease_command_is_refused_with_a_reason(wire: object, reason: str) -> None:
    with pytest.raises(CommandDecodeError, match=reason):
        decode_command(_envelope(wire))


@given(st.integers(0, 6), st.lists(st.none() | st.integers(-2, 12) | st.booleans()
                                   | st.text(max_size=2), max_size=6))
def test_decoding_any_lease_shaped_array_fails_only_with_command_decode_error(
    tag: int, rest: list[object]
) -> None:
    with contextlib.suppress(CommandDecodeError):
        decode_command(_envelope([tag, *rest]))


AnyPut: Any = Put
AnyGrant: Any = LeaseGrant
AnyRevoke: Any = LeaseRevoke


@pytest.mark.parametrize(
    "make",
    [
        lambda: AnyGrant(MIN_LEASE_TTL_S - 1),
        lambda: AnyGrant(MAX_LEASE_TTL_S + 1),
        lambda: AnyGrant(2.5),
        lambda: AnyGrant(True),
        lambda: AnyRevoke(0),
        lambda: AnyRevoke(MAX_LEASE_ID + 1),
        lambda: AnyRevoke(True),
        lambda: AnyRevoke(3, expired=None),
        lambda: AnyPut("k", 1, lease=0),
        lambda: AnyPut("k", 1, lease="3"),
        lambda: AnyPut("k", 1, ttl_s=0),
        lambda: AnyPut("k", 1, lease=3, ttl_s=10),
        lambda: Batch((Put("k", 1, ttl_s=10),)),
    ],
)
def test_invalid_lease_commands_are_refused_on_construction(make: Callable[[], object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        make()


# ------------------------------------------------------------------ grant and revoke
def test_a_lease_s_id_is_the_index_of_the_entry_that_granted_it(kv: Feeder) -> None:
    kv.apply(Put("x", 1))
    index = kv.next_index
    assert kv.apply(LeaseGrant(10)) == LeaseGrantResult(index, index, 10)
    assert kv.machine.lease(index) == LeaseRecord(index, 10, (), 0)
    assert dict(kv.machine.lease_ttls) == {index: 10}


def test_revoke_deletes_every_attached_key_in_one_entry(kv: Feeder) -> None:
    lease = kv.grant()
    kv.apply(Put("b", 2, lease=lease))
    kv.apply(Put("a", 1, lease=lease))
    kv.apply(Put("other", 3))
    index = kv.next_index
    assert kv.apply(LeaseRevoke(lease)) == LeaseRevokeResult(index, lease, ("a", "b"), False)
    assert kv.machine.get("a") is None and kv.machine.get("b") is None
    assert kv.machine.get("other") == (3, 4)
    assert kv.machine.lease(lease) is None
    assert kv.machine.items() == [("other", 3, 4)]
    assert kv.machine.applied_index == index


def test_revoke_says_whether_the_leader_revoked_it_for_expiry(kv: Feeder) -> None:
    lease = kv.grant()
    result = kv.apply(LeaseRevoke(lease, expired=True))
    assert isinstance(result, LeaseRevokeResult) and result.expired


def test_revoke_of_an_unknown_or_revoked_lease_is_lease_not_found(kv: Feeder) -> None:
    assert kv.apply(LeaseRevoke(42)) == LeaseNotFound(1, 42)
    lease = kv.grant()
    kv.apply(LeaseRevoke(lease))
    assert kv.apply(LeaseRevoke(lease)) == LeaseNotFound(kv.machine.applied_index, lease)


def test_a_lease_without_keys_lives_until_revoked(kv: Feeder) -> None:
    lease = kv.grant()
    kv.apply(Put("k", 1, lease=lease))
    kv.apply(Delete("k"))
    assert kv.machine.lease(lease) == LeaseRecord(lease, 10, (), 0)


# ------------------------------------------------------------------ attaching keys
def test_put_with_a_lease_attaches_the_key(kv: Feeder) -> None:
    lease = kv.grant()
    index = kv.next_index
    assert kv.apply(Put("k", "v", lease=lease)) == PutResult(index, "v", lease)
    assert kv.machine.lease_of("k") == lease
    assert kv.machine.lease(lease) == LeaseRecord(lease, 10, ("k",), 1)


def test_put_with_an_unknown_lease_applies_nothing(kv: Feeder) -> None:
    kv.apply(Put("k", "old"))
    assert kv.apply(Put("k", "new", lease=99)) == LeaseNotFound(2, 99)
    assert kv.machine.get("k") == ("old", 1)
    assert kv.machine.lease_of("k") is None


def test_put_with_ttl_grants_a_lease_of_its_own_at_its_index(kv: Feeder) -> None:
    index = kv.next_index
    assert kv.apply(Put("k", 1, ttl_s=5)) == PutResult(index, 1, index, 5)
    assert kv.machine.lease(index) == LeaseRecord(index, 5, ("k",), 1)
    assert kv.machine.lease_of("k") == index


def test_put_without_a_lease_detaches_the_key(kv: Feeder) -> None:
    lease = kv.grant()
    kv.apply(Put("k", 1, lease=lease))
    assert kv.apply(Put("k", 2)) == PutResult(3, 2)
    assert kv.machine.lease_of("k") is None
    kv.apply(LeaseRevoke(lease))
    assert kv.machine.get("k") == (2, 3)


def test_put_with_another_lease_moves_the_key(kv: Feeder) -> None:
    first, second = kv.grant(), kv.grant()
    kv.apply(Put("k", 1, lease=first))
    kv.apply(Put("k", 2, lease=second))
    assert kv.machine.lease(first) == LeaseRecord(first, 10, (), 0)
    kv.apply(LeaseRevoke(first))
    assert kv.machine.get("k") == (2, 4)
    kv.apply(LeaseRevoke(second))
    assert kv.machine.get("k") is None


def test_delete_detaches_the_key_so_a_later_put_is_not_revoked(kv: Feeder) -> None:
    lease = kv.grant()
    kv.apply(Put("k", 1, lease=lease))
    kv.apply(Delete("k"))
    kv.apply(Put("k", 2))
    result = kv.apply(LeaseRevoke(lease))
    assert isinstance(result, LeaseRevokeResult) and result.keys == ()
    assert kv.machine.get("k") == (2, 4)


def test_condition_is_checked_before_the_lease(kv: Feeder) -> None:
    kv.apply(Put("k", 1))
    assert kv.apply(Put("k", 2, prev_index=0, lease=99)) == ConditionFailed(2, "k", 1)
    assert kv.apply(Put("j", 2, prev_index=0, lease=99)) == LeaseNotFound(3, 99)


def test_put_if_absent_on_a_lease_is_a_lock(kv: Feeder) -> None:
    mine, theirs = kv.grant(), kv.grant()
    taken = kv.apply(Put("lock", "me", prev_index=0, lease=mine))
    assert isinstance(taken, PutResult)
    assert kv.apply(Put("lock", "them", prev_index=0, lease=theirs)) == ConditionFailed(
        4, "lock", taken.index)
    kv.apply(LeaseRevoke(mine))
    again = kv.apply(Put("lock", "them", prev_index=0, lease=theirs))
    assert isinstance(again, PutResult) and again.index > taken.index


def test_batch_puts_attach_and_detach_all_at_once(kv: Feeder) -> None:
    lease = kv.grant()
    kv.apply(Put("gone", 0, lease=lease))
    kv.apply(Put("moved", 0, lease=lease))
    index = kv.next_index
    result = kv.apply(Batch((Put("a", 1, lease=lease), Put("moved", 2), Delete("gone"),
                             Put("b", 3, lease=lease))))
    assert result == BatchResult(index, (PutResult(index, 1, lease), PutResult(index, 2),
                                         DeleteResult(index, True),
                                         PutResult(index, 3, lease)))
    assert kv.machine.lease(lease) == LeaseRecord(lease, 10, ("a", "b"), 2)


def test_batch_naming_an_unknown_lease_applies_nothing(kv: Feeder) -> None:
    lease = kv.grant()
    kv.apply(Put("a", 0))
    result = kv.apply(Batch((Put("a", 1, lease=lease), Delete("a"), Put("b", 2, lease=77))))
    assert result == LeaseNotFound(3, 77)
    assert kv.machine.get("a") == (0, 2)
    assert kv.machine.lease(lease) == LeaseRecord(lease, 10, (), 0)


def test_batch_put_after_delete_of_an_attached_key_keeps_the_put_s_lease(kv: Feeder) -> None:
    first, second = kv.grant(), kv.grant()
    kv.apply(Put("k", 0, lease=first))
    kv.apply(Batch((Delete("k"), Put("k", 1, lease=second))))
    assert kv.machine.lease_of("k") == second
    assert kv.machine.lease(first) == LeaseRecord(first, 10, (), 0)


def test_leases_are_listed_in_id_order_with_key_counts(kv: Feeder) -> None:
    ids = [kv.grant(ttl) for ttl in (30, 20, 10)]
    kv.apply(Put("k", 1, lease=ids[1]))
    assert kv.machine.leases(2) == [LeaseRecord(ids[0], 30, (), 0),
                                    LeaseRecord(ids[1], 20, (), 1)]
    with pytest.raises(ValueError, match="limit"):
        kv.machine.leases(0)


def test_lease_keys_are_sorted_and_limited_with_the_full_count(kv: Feeder) -> None:
    lease = kv.grant()
    for key in ("c", "a", "d", "b"):
        kv.apply(Put(key, 1, lease=lease))
    assert kv.machine.lease(lease, keys_limit=2) == LeaseRecord(lease, 10, ("a", "b"), 4)


# ------------------------------------------------------------------ retries
def test_retried_grant_returns_the_first_lease_without_granting_again(kv: Feeder) -> None:
    first = kv.apply(LeaseGrant(10), "r1")
    assert kv.apply(LeaseGrant(10), "r1") == first
    assert len(kv.machine.lease_ttls) == 1


def test_retried_revoke_answers_as_the_first_one_did(kv: Feeder) -> None:
    lease = kv.grant()
    kv.apply(Put("k", 1, lease=lease))
    first = kv.apply(LeaseRevoke(lease), "r1")
    assert isinstance(first, LeaseRevokeResult) and first.keys == ("k",)
    kv.apply(Put("k", 2))
    again = kv.apply(LeaseRevoke(lease), "r1")
    assert again == LeaseRevokeResult(first.index, lease, (), False)  # nothing deleted again
    assert kv.machine.get("k") == (2, 4)


def test_retried_put_with_ttl_returns_the_same_lease(kv: Feeder) -> None:
    first = kv.apply(Put("k", 1, ttl_s=5), "r1")
    assert kv.apply(Put("k", 1, ttl_s=5), "r1") == first
    assert list(kv.machine.lease_ttls) == [1]


def test_retried_put_and_batch_with_a_lease_return_the_lease(kv: Feeder) -> None:
    lease = kv.grant()
    put = kv.apply(Put("k", 1, lease=lease), "p")
    assert kv.apply(Put("k", 1, lease=lease), "p") == put
    batch = kv.apply(Batch((Put("a", 1, lease=lease), Delete("k"))), "b")
    assert kv.apply(Batch((Put("a", 1, lease=lease), Delete("k"))), "b") == batch


def test_retried_lease_not_found_fails_the_same_way_even_once_the_lease_exists(
    kv: Feeder,
) -> None:
    assert kv.apply(Put("k", 1, lease=2), "r1") == LeaseNotFound(1, 2)
    assert kv.grant() == 2
    assert kv.apply(Put("k", 1, lease=2), "r1") == LeaseNotFound(1, 2)
    assert kv.machine.get("k") is None


# ------------------------------------------------------------------ replicas agree
lease_programs = st.lists(
    st.one_of(
        st.builds(LeaseGrant, st.integers(MIN_LEASE_TTL_S, 60)),
        st.builds(LeaseRevoke, st.integers(1, 30), st.booleans()),
        st.builds(Put, st.sampled_from("abcd"), st.integers(0, 9), st.none() | st.integers(0, 30),
                  lease=st.none() | st.integers(1, 30)),
        st.builds(Put, st.sampled_from("abcd"), st.integers(0, 9), ttl_s=st.just(10)),
        st.builds(Delete, st.sampled_from("abcd")),
        st.builds(lambda k, lease: Batch((Put(k, 1, lease=lease), Delete("d"))),
                  st.sampled_from("abc"), st.none() | st.integers(1, 30)),
    ),
    max_size=30,
)


def _check_consistent(machine: KVStateMachine) -> None:
    """Every attached key exists and is listed under its lease, and nothing else is."""
    listed: dict[str, int] = {}
    for record in machine.leases(100_000):
        full = machine.lease(record.lease_id)
        assert full is not None and full.key_count == record.key_count
        for key in full.keys:
            assert machine.get(key) is not None
            listed[key] = record.lease_id
    for key, _, _ in machine.items("", 100_000):
        assert machine.lease_of(key) == listed.get(key)


@settings(max_examples=150, deadline=None)
@given(lease_programs)
def test_any_lease_program_keeps_keys_and_leases_consistent_through_a_snapshot(
    program: list[Command],
) -> None:
    kv = Feeder()
    for cmd in program:
        kv.apply(cmd)
        _check_consistent(kv.machine)
    copy = KVStateMachine()
    copy.restore(kv.machine.snapshot(), kv.machine.applied_index)
    assert full_state(copy) == full_state(kv.machine)
    _check_consistent(copy)
    twin = Feeder()
    for cmd in program:
        twin.apply(cmd)
    assert full_state(twin.machine) == full_state(kv.machine)


# ------------------------------------------------------------------ snapshots
def test_snapshot_carries_leases_and_attachments(kv: Feeder) -> None:
    lease = kv.grant(7)
    kv.apply(Put("k", 1, lease=lease))
    kv.apply(Put("free", 2))
    other = kv.grant(9)
    copy = KVStateMachine()
    copy.restore(kv.machine.snapshot(), kv.machine.applied_index)
    assert copy.lease(lease) == LeaseRecord(lease, 7, ("k",), 1)
    assert copy.lease(other) == LeaseRecord(other, 9, (), 0)
    assert copy.lease_of("k") == lease and copy.lease_of("free") is None
    revoked = Feeder(copy).apply(LeaseRevoke(lease))
    assert isinstance(revoked, LeaseRevokeResult) and revoked.keys == ("k",)


def test_leases_are_serialised_in_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sm_module, "SEGMENT_KEYS", 3)
    kv = Feeder()
    leases = [kv.grant() for _ in range(7)]
    for i in range(8):
        kv.apply(Put(f"k{i}", i, lease=leases[i % 7]))
    view = kv.machine.snapshot_view()
    chunks = list(iter_snapshot_chunks(view))
    assert len(chunks) == 1 + 3 + 3 + 3  # header, data, leases, attached keys
    parsed = parse_snapshot(b"".join(chunks))
    assert parsed.leases == view.leases and parsed.key_leases == view.key_leases


def test_snapshot_view_is_unaffected_by_later_lease_changes(kv: Feeder) -> None:
    lease = kv.grant()
    kv.apply(Put("k", 1, lease=lease))
    view = kv.machine.snapshot_view()
    kv.apply(LeaseRevoke(lease))
    kv.grant()
    assert view.leases == {lease: 10} and view.key_leases == {"k": lease}


def _version1_snapshot(view: KVSnapshotView) -> bytes:
    """The bytes the previous build wrote for a lease-free state."""
    chunks = list(iter_snapshot_chunks(view))
    header = msgpack.unpackb(chunks[0], raw=False)
    header["v"] = 1
    del header["leases"], header["attached"]
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    return packed + b"".join(chunks[1:])


def test_version_1_snapshots_are_still_read() -> None:
    kv = Feeder()
    kv.apply(Put("k", 1))
    kv.apply(Put("j", 2), "req")
    data = _version1_snapshot(kv.machine.snapshot_view())
    copy = KVStateMachine()
    copy.restore(data, 2)
    assert copy.items() == kv.machine.items()
    assert copy.lease_ttls == {}
    assert Feeder(copy).apply(Put("j", 2), "req") == PutResult(2, 2)  # remembered


def _view(**changes: object) -> KVSnapshotView:
    base: dict[str, Any] = {"applied_index": 10, "data": {"k": (1, 3)}, "requests": {},
                            "addresses": {}, "leases": {5: 10}, "key_leases": {"k": 5}}
    base.update(changes)
    return KVSnapshotView(**base)


@pytest.mark.parametrize(
    "view",
    [
        _view(leases={11: 10}, key_leases={}),  # granted after the snapshot's index
        _view(leases={0: 10}, key_leases={}),
        _view(leases={5: 0}),
        _view(leases={5: MAX_LEASE_TTL_S + 1}),
        _view(key_leases={"absent": 5}),  # a key the data does not hold
        _view(key_leases={"k": 6}),  # a lease it does not hold
    ],
)
def test_snapshot_with_bad_leases_is_refused(view: KVSnapshotView) -> None:
    with pytest.raises(SnapshotCorrupt, match=r"lease|attach"):
        parse_snapshot(serialize_snapshot(view))


def test_snapshot_claiming_more_leases_than_it_holds_is_refused() -> None:
    chunks = list(iter_snapshot_chunks(_view()))
    header = msgpack.unpackb(chunks[0], raw=False)
    header["leases"] = 2
    data = msgpack.packb(header, use_bin_type=True) + b"".join(chunks[1:])
    with pytest.raises(SnapshotCorrupt):
        parse_snapshot(data)


def test_unknown_snapshot_version_names_the_versions_read() -> None:
    chunks = list(iter_snapshot_chunks(_view()))
    header = msgpack.unpackb(chunks[0], raw=False)
    header["v"] = 3
    data = msgpack.packb(header, use_bin_type=True) + b"".join(chunks[1:])
    with pytest.raises(SnapshotCorrupt, match="versions 1, 2"):
        parse_snapshot(data)


def test_an_old_entry_applies_as_before(kv: Feeder) -> None:
    """An entry an earlier build wrote applies exactly as before (no lease anywhere)."""
    data = msgpack.packb([1, "rid", [0, "k", 1, None]], use_bin_type=True)
    assert kv.machine.apply(Entry(1, 1, data=data)) == PutResult(1, 1)
    assert kv.machine.lease_of("k") is None


def test_the_service_s_lease_limits_are_the_commands_limits() -> None:
    from raftkv import service

    assert (service.MIN_LEASE_TTL_S, service.MAX_LEASE_TTL_S, service.MAX_LEASE_ID) == (
        MIN_LEASE_TTL_S, MAX_LEASE_TTL_S, MAX_LEASE_ID)
