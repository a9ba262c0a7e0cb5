"""What bounds the size of the messages a node sends: the leader appends no entry over
Config.max_entry_bytes (an AppendRequest holds at most max_append_bytes of entries, or one
entry alone: a larger one would make every AppendRequest that carries it too large for the
peer's frame bound, refused by the link, and that follower would stall), and a follower sends
its reads in ReadIndex messages of at most MAX_READ_IDS ids (the receiving node drops a larger
one). raftkv.codec.raft_message_bound turns these into bytes (tests in
tests/runtime/test_message_bounds.py)."""

from __future__ import annotations

import pytest

from raftkv.core import (
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    NotLeader,
    ProposalTooLarge,
    ReadIndexRequest,
    ReadIndexResponse,
)
from raftkv.core import node as node_module
from tests.core.harness import Network

ET = 10
LIMIT = 1000
"""max_entry_bytes in these tests."""


def leader_net() -> Network:
    net = Network(["n1", "n2", "n3"], election_timeout_ticks=ET, max_entry_bytes=LIMIT)
    net.elect("n1")
    return net


def test_the_leader_appends_an_entry_of_max_entry_bytes_and_refuses_a_larger_one() -> None:
    net = leader_net()
    n1 = net.node("n1")
    index = n1.propose(b"x" * (LIMIT - 16))  # Entry.size_bytes: the data and 16
    last = n1.log.last_index()
    assert index == last

    with pytest.raises(ProposalTooLarge, match=f"{LIMIT + 1} bytes.*at most {LIMIT}"):
        n1.propose(b"x" * (LIMIT - 15))

    assert n1.log.last_index() == last
    net.stabilize()
    net.heartbeat("n1")
    assert [e.data for e in net.peers["n3"].applied if e.data] == [b"x" * (LIMIT - 16)]


def test_a_membership_change_is_measured_by_its_node_id_and_address() -> None:
    change = ConfChange(ConfChangeOp.ADD_LEARNER, "n4", "é" * 10)  # 20 bytes of UTF-8
    assert Entry(1, 1, EntryKind.CONF_CHANGE, change=change).size_bytes == 2 + 20 + 16


def test_a_membership_change_entry_carries_no_data() -> None:
    """size_bytes counts a change's node id and address, not its data: there is none (no
    node makes such an entry; the codec refuses one from a peer or the disk)."""
    change = ConfChange(ConfChangeOp.ADD_LEARNER, "n4", "a:1")
    with pytest.raises(ValueError, match="carries no data"):
        Entry(1, 1, EntryKind.CONF_CHANGE, b"d" * LIMIT, change)
    assert Entry(1, 1, EntryKind.CONF_CHANGE, b"", change).size_bytes == 2 + 3 + 16


def test_the_leader_refuses_a_membership_change_over_max_entry_bytes() -> None:
    net = leader_net()
    n1 = net.node("n1")
    last = n1.log.last_index()
    huge = ConfChange(ConfChangeOp.ADD_LEARNER, "n4", "h" * LIMIT)

    with pytest.raises(ProposalTooLarge):
        n1.propose_conf_change(huge)

    assert n1.log.last_index() == last
    assert "n4" not in n1.membership.members


def test_any_node_tells_a_proposal_over_max_entry_bytes_before_it_is_proposed() -> None:
    net = leader_net()
    n2 = net.node("n2")
    n2.check_proposal_size(b"x" * (LIMIT - 16))
    with pytest.raises(ProposalTooLarge):
        n2.check_proposal_size(b"x" * (LIMIT - 15))
    with pytest.raises(NotLeader):  # a follower proposes nothing, whatever the size
        n2.propose(b"x")


def test_a_follower_sends_a_turns_reads_in_messages_the_leader_takes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_module, "MAX_READ_IDS", 4)
    net = leader_net()
    n1 = net.node("n1")
    n1.propose(b"x")
    net.stabilize()
    n2 = net.node("n2")
    for rid in range(1, 11):  # 10 reads in one turn: more than one message holds
        n2.read_index(rid)
    net.process("n2")

    requests = [m for m in net.in_flight if isinstance(m, ReadIndexRequest)]
    assert [m.request_ids for m in requests] == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10)]
    net.stabilize()
    assert sorted(r.request_id for r in net.peers["n2"].read_states) == list(range(1, 11))
    assert net.peers["n2"].failed_reads == []
    assert [why for rd in net.peers["n1"].readies for why in rd.dropped] == []


def test_the_leader_drops_a_read_index_message_of_more_than_max_read_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiving node drops the whole message (_malformed): none of its ids is answered,
    and the reason is in Ready.dropped (the driver logs it)."""
    monkeypatch.setattr(node_module, "MAX_READ_IDS", 4)
    net = leader_net()
    n1 = net.node("n1")
    n1.propose(b"x")
    net.stabilize()
    readies = len(net.peers["n1"].readies)

    net.send(ReadIndexRequest(n1.term, "n2", "n1", (1, 2, 3, 4, 5)),
             ReadIndexRequest(n1.term, "n2", "n1", (11, 12, 13, 14)))  # one that fits
    net.stabilize()
    net.heartbeat("n1")

    new = net.peers["n1"].readies[readies:]
    answered = [rid for rd in new for m in rd.messages if isinstance(m, ReadIndexResponse)
                for rid in m.request_ids]
    assert answered == [11, 12, 13, 14]
    assert [why for rd in new for why in rd.dropped] == [
        f"ReadIndexRequest from n2 in term {n1.term} ignored: more than 4 read ids in one "
        "message"]
