"""What the core does with peer messages it must not trust (raftkv/core/node.py).

The transport binds every message to the peer that authenticated the connection; the core
still checks what only it can: a TimeoutNow is honoured only from the leader of its current
term, and a snapshot is checked (declared size against a cap, checksum, format) before
anything of it is installed. What it ignores it names in Ready.dropped for the driver to log.
"""

from __future__ import annotations

import random

import pytest

from raftkv.core import (
    AppendRequest,
    Config,
    Entry,
    HardState,
    HeartbeatRequest,
    Membership,
    RaftNode,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
)
from raftkv.core.snapshots import checksum_of
from tests.core.harness import Network, boot_state, log_of_terms

ET = 10
THREE = ("n1", "n2", "n3")


def _cluster() -> Network:
    net = Network(THREE, election_timeout_ticks=ET)
    net.elect("n1")
    net.run(1)
    return net


def _dropped(net: Network, nid: str) -> list[str]:
    return [why for rd in net.peers[nid].readies for why in rd.dropped]


def test_a_forged_timeout_now_from_a_follower_moves_no_leadership() -> None:
    """The probe: a TimeoutNow that does not come from the leader made its target campaign
    and leadership moved."""
    net = _cluster()
    term = net.node("n1").term
    net.send(TimeoutNow(term, "n3", "n2"))
    net.stabilize()
    assert net.leader() == "n1"
    assert net.node("n2").role is Role.FOLLOWER and net.node("n2").term == term
    assert any("TimeoutNow from n3" in why for why in _dropped(net, "n2"))


def test_a_timeout_now_in_a_later_term_changes_nothing_not_even_the_term() -> None:
    net = _cluster()
    term = net.node("n1").term
    for forged in (TimeoutNow(term + 5, "n1", "n2"), TimeoutNow(term - 1, "n1", "n2")):
        net.send(forged)
        net.stabilize()
        assert net.node("n2").term == term
        assert net.leader() == "n1"


def test_a_timeout_now_to_the_leader_itself_is_ignored() -> None:
    net = _cluster()
    term = net.node("n1").term
    net.send(TimeoutNow(term, "n2", "n1"))
    net.stabilize()
    assert net.leader() == "n1" and net.node("n1").term == term


def test_the_leaders_own_timeout_now_still_transfers_leadership() -> None:
    net = _cluster()
    net.node("n1").transfer_leader("n2")
    net.stabilize()
    assert net.leader() == "n2"
    assert _dropped(net, "n2") == []


# =========================================================================================
# Snapshots are checked before anything of them is kept
# =========================================================================================
SNAP = b"0123456789abcdefghij"  # 20 bytes


class _Validator:
    """A format check: a snapshot is bytes that start with b"0", decoded as their length."""

    def __init__(self) -> None:
        self.fed = b""

    def feed(self, data: bytes) -> None:
        if not self.fed and data and not data.startswith(b"0"):
            raise ValueError("not our format")
        self.fed += data

    def finish(self) -> object:
        return ("decoded", len(self.fed))


def _follower(**config: int) -> RaftNode:
    """n2 of THREE, following n1 in term 5, with log 1..3 committed up to 2."""
    boot = boot_state(THREE, (), log_of_terms(1, 1, 2), HardState(term=5, commit=2))
    node = RaftNode(Config("n2", election_timeout_ticks=ET, **config), boot,  # type: ignore[arg-type]
                    random.Random(0), snapshot_validator=_Validator)
    node.step(HeartbeatRequest(5, "n1", "n2", 2))
    _cycle_all(node)
    return node


def _cycle_all(node: RaftNode) -> list[Ready]:
    readies = []
    while node.has_ready():
        rd = node.ready()
        node.advance(rd)
        readies.append(rd)
    return readies


def _chunks(data: bytes, size: int, *, index: int = 10, length: int | None = None,
            checksum: str | None = None) -> list[SnapshotRequest]:
    meta = SnapshotMeta(index, 4, Membership(frozenset(THREE)))
    length = len(data) if length is None else length
    checksum = checksum_of(data) if checksum is None else checksum
    return [SnapshotRequest(5, "n1", "n2", meta, off, data[off : off + size],
                            off + size >= len(data), length, checksum)
            for off in range(0, len(data), size)]


def _state(node: RaftNode) -> tuple[object, ...]:
    log = node.log
    return (node.term, node.leader, node.role, log.first_index(), log.last_index(), log.commit,
            node.snapshot_meta)


def _feed(node: RaftNode, requests: list[SnapshotRequest]) -> list[Ready]:
    readies: list[Ready] = []
    for m in requests:
        node.step(m)
        readies += _cycle_all(node)
    return readies


def _refusals(readies: list[Ready]) -> list[SnapshotResponse]:
    return [m for rd in readies for m in rd.messages
            if isinstance(m, SnapshotResponse) and m.next_offset == -1]


@pytest.mark.parametrize(("case", "requests", "reason"), [
    ("garbage format", _chunks(b"garbage-bytes-that-are-no-snapshot", 8), "not a valid snapshot"),
    ("bad checksum", _chunks(SNAP, 8, checksum="ab" * 32), "checksum mismatch"),
    ("over the cap", _chunks(SNAP, 8, length=10_000), "over this node's cap of 1000"),
    ("malformed checksum", _chunks(SNAP, 8, checksum="xyz"), "not a blake2b-256"),
    ("past its length", _chunks(SNAP, 8, length=12), "does not fit the declared length"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_bad_snapshot_is_refused_and_changes_nothing(
        case: str, requests: list[SnapshotRequest], reason: str) -> None:
    """The probe: one garbage SnapshotRequest was saved before it was checked; the node
    exited, then refused to restart. Now nothing of it is installed or published, the
    leader is told to back off (-1), and the reason is named for the log."""
    node = _follower(max_snapshot_bytes=1000)
    before = _state(node)
    readies = _feed(node, requests)
    assert _state(node) == before
    assert all(rd.snapshot is None for rd in readies)
    assert len(_refusals(readies)) == 1
    assert any(reason in why for rd in readies for why in rd.dropped), case
    written = [w for rd in readies for w in rd.snapshot_writes]
    if written:  # whatever was handed out to stage is discarded again
        assert readies[-1].snapshot_discard or any(rd.snapshot_discard for rd in readies[1:])


def test_garbage_is_refused_on_its_first_chunk_nothing_is_staged() -> None:
    node = _follower()
    readies = _feed(node, _chunks(b"Xgarbage" * 100, 64)[:1])
    assert [w for rd in readies for w in rd.snapshot_writes] == []
    assert len(_refusals(readies)) == 1


def test_a_good_snapshot_is_installed_with_what_the_validator_decoded() -> None:
    node = _follower()
    readies = _feed(node, _chunks(SNAP, 8))
    installs = [rd for rd in readies if rd.snapshot is not None]
    assert len(installs) == 1
    rd = installs[0]
    assert rd.snapshot == Snapshot(SnapshotMeta(10, 4, Membership(frozenset(THREE))), 20,
                                   checksum_of(SNAP))
    assert rd.snapshot_state == ("decoded", 20)
    assert b"".join(w.data for r in readies for w in r.snapshot_writes) == SNAP
    assert node.log.commit == 10 and node.snapshot_meta.index == 10


def test_a_snapshot_the_commit_index_overtook_is_discarded_whole() -> None:
    """Found by the simulator: the leader's commit index reached the snapshot's index while
    its last chunk was on the way; its chunks, the last one included, are dropped."""
    node = _follower()
    requests = _chunks(SNAP, 8)
    readies = _feed(node, requests[:-1])
    node.step(AppendRequest(5, "n1", "n2", 3, 2, tuple(Entry(i, 4) for i in range(4, 11)), 10))
    readies += _cycle_all(node)
    node.step(requests[-1])
    last = _cycle_all(node)
    assert all(rd.snapshot is None for rd in readies + last)
    assert any(rd.snapshot_discard for rd in last)
    assert [w for rd in last for w in rd.snapshot_writes] == []


def test_the_leader_backs_off_after_a_refusal_then_offers_again() -> None:
    net = Network(THREE, election_timeout_ticks=ET, snapshot_chunk_bytes=8,
                  validator=_Validator)
    net.elect("n1")
    net.isolate("n3")
    for d in (b"a", b"b", b"c"):
        net.node("n1").propose(d)
    net.stabilize()
    n1 = net.node("n1")
    applied = n1.log.applied
    meta = SnapshotMeta(applied, n1.log.term(applied) or 0, n1.membership_at(applied))
    n1.compact(net.snapshot_of(meta, b"X-not-our-format-at-all"), keep_from=applied + 1)
    net.heal()
    net.run(1)

    def offers() -> list[SnapshotRequest]:
        return [m for rd in net.peers["n1"].readies for m in rd.messages
                if isinstance(m, SnapshotRequest) and m.offset == 0]

    first = len(offers())
    assert first >= 1
    assert net.node("n1").status().peers["n3"].state == "probe"
    net.run(ET // 2)
    assert len(offers()) == first  # backing off
    net.run(ET)
    assert len(offers()) > first  # offered again after the back-off
    assert net.node("n3").log.commit < applied  # and refused again: never installed


def test_a_snapshot_the_leader_cannot_read_is_not_sent_and_retried_later() -> None:
    net = cluster_of_three()
    net.isolate("n3")
    for d in (b"a", b"b"):
        net.node("n1").propose(d)
    net.stabilize()
    n1 = net.node("n1")
    applied = n1.log.applied
    meta = SnapshotMeta(applied, n1.log.term(applied) or 0, n1.membership_at(applied))
    snap = net.snapshot_of(meta, SNAP)
    n1.compact(snap, keep_from=applied + 1)
    del net.snapshot_data[snap.checksum]  # e.g. already replaced in the store
    net.heal()
    net.run(2)
    assert not any(isinstance(m, SnapshotRequest) for rd in net.peers["n1"].readies
                   for m in rd.messages)
    net.snapshot_data[snap.checksum] = SNAP  # readable again
    net.run(2 * ET)
    assert net.peers["n3"].installed_data == [SNAP]


def cluster_of_three() -> Network:
    net = Network(THREE, election_timeout_ticks=ET)
    net.elect("n1")
    net.run(1)
    return net
