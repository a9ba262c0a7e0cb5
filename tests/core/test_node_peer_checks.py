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
    AppendResponse,
    ConfChange,
    ConfChangeOp,
    Config,
    Entry,
    EntryKind,
    HardState,
    HeartbeatRequest,
    Membership,
    Message,
    RaftNode,
    ReadIndexResponse,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
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
    applied, _ = net.compact_at_applied("n1", b"X-not-our-format-at-all")
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
    _, snap = net.compact_at_applied("n1", SNAP)
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


# =========================================================================================
# Random and mutated messages: the core never raises, and safety holds
# =========================================================================================
def _random_message(rng: random.Random, net: Network, senders: list[str]) -> Message:
    frm, to = rng.choice(senders), rng.choice(THREE)
    term = max(0, net.node(to).term + rng.randint(-2, 2))

    def n() -> int:
        return rng.randint(0, 40)

    kind = rng.randrange(8)
    if kind == 0:
        prev = n()
        start = prev + 1 if rng.random() < 0.5 else n() + 1
        entries = tuple(
            Entry(start + j, max(1, rng.randint(1, term + 1)), EntryKind.CONF_CHANGE,
                  change=ConfChange(rng.choice(list(ConfChangeOp)), rng.choice([*THREE, "x"])))
            if rng.random() < 0.1 else Entry(start + j, max(1, rng.randint(1, term + 1)), data=b"d")
            for j in range(rng.randint(0, 4)))
        return AppendRequest(term, frm, to, prev, rng.randint(0, term + 1), entries, n())
    if kind == 1:
        return AppendResponse(term, frm, to, rng.random() < 0.5, n(), n(), n())
    if kind == 2:
        return HeartbeatRequest(term, frm, to, n(), n())
    if kind == 3:
        return VoteRequest(term, frm, to, n(), n(), rng.random() < 0.5, rng.random() < 0.5)
    if kind == 4:
        data = rng.randbytes(rng.randint(0, 20))
        meta = SnapshotMeta(n() + 1, rng.randint(1, term + 2),
                            Membership(frozenset(rng.sample(THREE, 2))))
        return SnapshotRequest(term, frm, to, meta, rng.choice([0, n()]), data,
                               rng.random() < 0.5, rng.choice([len(data), n()]),
                               rng.choice([checksum_of(data), "ab" * 32]))
    if kind == 5:
        return SnapshotResponse(term, frm, to, n(), rng.randint(-1, 40), rng.random() < 0.5)
    if kind == 6:
        return TimeoutNow(term, frm, to)
    return ReadIndexResponse(term, frm, to, (rng.randint(0, 5),), rng.randint(-1, 40))


def _applied_agree(net: Network) -> None:
    by_index: dict[int, Entry] = {}
    for peer in net.peers.values():
        for e in peer.applied:
            assert by_index.setdefault(e.index, e) == e, f"two entries applied at {e.index}"


@pytest.mark.parametrize("trial", range(20))
def test_random_messages_never_make_the_core_raise(trial: int) -> None:
    """From any sender, the leader's id included (the transport binds messages to the peer
    that authenticated; the core must merely survive what it cannot tell apart): e.g. an
    AppendRequest whose entries do not follow prev_index made a node exit ("append at 1012
    leaves a gap after 12")."""
    rng = random.Random(trial)
    net = Network(THREE, election_timeout_ticks=ET, seed=trial, snapshot_chunk_bytes=8)
    net.elect("n1")
    for _ in range(3):
        net.node("n1").propose(b"x")
    net.stabilize()
    for step in range(200):
        net.send(_random_message(rng, net, [*THREE, "stranger"]))
        if step % 10 == 0:
            net.run(1)
        else:
            net.stabilize()


@pytest.mark.parametrize("trial", range(20))
def test_replayed_and_stale_messages_keep_the_cluster_safe_and_live(trial: int) -> None:
    """Every message the cluster sent, delivered again at random later (duplicated,
    reordered, from past terms), mixed with random messages of past terms: replicas never
    disagree on what they applied, and the cluster still elects and commits afterwards.
    (What a peer that holds the token may claim in a newer term is the transport's to
    bound: Raft trusts its members.)"""
    rng = random.Random(1000 + trial)
    net = Network(THREE, election_timeout_ticks=ET, seed=trial, snapshot_chunk_bytes=8)
    net.elect("n1")
    seen: list[Message] = []
    for step in range(300):
        seen.extend(net.in_flight)
        if seen and rng.random() < 0.7:
            net.send(rng.choice(seen))
        else:
            m = _random_message(rng, net, list(THREE))
            if m.term < net.node(m.to).term:
                net.send(m)
        if step % 10 == 0:
            leader = net.leader()
            if leader is not None:
                net.node(leader).propose(b"w%d" % step)
            net.run(1)
        else:
            net.stabilize()
        _applied_agree(net)
    net.run(4 * ET)
    leader = net.leader()
    assert leader is not None
    index = net.node(leader).propose(b"after")
    net.run(2)
    assert all(net.node(nid).log.commit >= index for nid in THREE)
    _applied_agree(net)


def test_a_second_leader_in_the_same_term_is_ignored() -> None:
    net = _cluster_three_with_leader()
    term = net.node("n1").term
    net.send(AppendRequest(term, "n3", "n2", 0, 0, (), 0),
             HeartbeatRequest(term, "n2", "n1", 0))
    net.stabilize()
    assert net.leader() == "n1" and net.node("n2").leader == "n1"
    assert net.node("n1").role is Role.LEADER
    notes = [why for p in ("n1", "n2") for rd in net.peers[p].readies for why in rd.dropped]
    assert sum("n1 leads this term" in why for why in notes) == 2


def _cluster_three_with_leader() -> Network:
    net = Network(THREE, election_timeout_ticks=ET)
    net.elect("n1")
    net.run(1)
    return net
