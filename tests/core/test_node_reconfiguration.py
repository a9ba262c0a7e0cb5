"""Strict reconfiguration (raftkv/core/node.py, RaftNode.propose_conf_change).

A membership change that would leave fewer started, caught-up voters than the quorum of the
new configuration is refused with ConfChangeRejected (etcd's --strict-reconfig-check); a new
member joins only as a learner and only a caught-up learner becomes a voter. The probe this
answers: six unauthenticated joins with made-up ids and addresses made three fake voters, and
a cluster of six voters with three alive never had a leader again.
"""

from __future__ import annotations

import pytest

from raftkv.core import MAX_MEMBERS, ConfChange, ConfChangeOp, ConfChangeRejected, Config
from tests.core.harness import Network, between

ET = 10
THREE = ("n1", "n2", "n3")


def _cluster(voters: tuple[str, ...] = THREE, learners: tuple[str, ...] = (),
             joining: tuple[str, ...] = (), max_members: int = MAX_MEMBERS) -> Network:
    net = Network(voters, learners, joining=joining, election_timeout_ticks=ET,
                  max_members=max_members)
    net.elect("n1")
    net.run(1)
    return net


def _dead(net: Network, *nids: str) -> None:
    """Cut `nids` off and let the leader go an election timeout without hearing from them."""
    for nid in nids:
        net.isolate(nid)
    net.run(ET + 1, nodes=[n for n in net.peers if n not in nids])


def test_made_up_joins_never_add_a_voter() -> None:
    """The probe, against the core: each made-up node is added the way the service adds one
    (a learner, then a promotion on a second join). No fake node ever becomes a voter, and the
    cluster keeps its leader and its quorum."""
    net = _cluster()
    n1 = net.node("n1")
    refused: list[str] = []
    for attempt in range(6):
        nid = f"fake{attempt % 3}"
        op = ConfChangeOp.ADD_LEARNER if nid not in n1.membership.learners \
            else ConfChangeOp.ADD_VOTER
        try:
            n1.propose_conf_change(ConfChange(op, nid, f"10.9.9.{attempt}:5001"))
        except ConfChangeRejected as e:
            refused.append(str(e))
        net.run(2)
    assert n1.membership.voters == set(THREE)
    assert n1.membership.learners == {"fake0", "fake1", "fake2"}
    assert len(refused) == 3
    assert all("cannot be promoted yet" in r for r in refused)
    # A made-up node cannot be made a voter directly either.
    with pytest.raises(ConfChangeRejected, match="joins as a learner first"):
        n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "fake9"))
    index = n1.propose(b"still-writable")
    net.stabilize()
    assert n1.log.commit >= index
    # ...and the fake learners can be removed again (learners are never checked).
    for nid in ("fake0", "fake1", "fake2"):
        n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, nid))
        net.run(2)
    assert n1.membership.learners == frozenset()


def test_a_caught_up_learner_is_promoted() -> None:
    net = _cluster(learners=("n4",))
    n1 = net.node("n1")
    assert n1.caught_up("n4")
    n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    net.stabilize()
    assert n1.membership.voters == {"n1", "n2", "n3", "n4"}


def test_a_learner_that_is_down_is_not_promoted() -> None:
    net = _cluster(learners=("n4",))
    _dead(net, "n4")
    with pytest.raises(ConfChangeRejected, match=r"n4 cannot be promoted yet: not heard from") \
            as refused:
        net.node("n1").propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    assert not refused.value.transient  # no point waiting for it


def test_a_learner_behind_the_commit_index_is_not_promoted() -> None:
    net = _cluster(learners=("n4",))
    n1 = net.node("n1")
    net.cut("n1", "n4")
    n1.propose(b"x")
    net.stabilize()
    net.heal()  # n4 is reachable again but has not been sent the entry yet
    with pytest.raises(ConfChangeRejected, match=r"has the log up to \d+, the commit index") \
            as refused:
        n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    assert refused.value.transient  # it answers: it is only behind
    net.run(1)
    n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))


def test_removing_a_live_voter_while_another_is_down_is_refused() -> None:
    """{n1, n2, n3} with n3 down: removing n2 leaves {n1, n3}, whose quorum (2) has only n1."""
    net = _cluster()
    _dead(net, "n3")
    n1 = net.node("n1")
    with pytest.raises(ConfChangeRejected) as refused:
        n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n2"))
    message = str(refused.value)
    assert not refused.value.transient
    assert "1 started, caught-up voter(s) (n1) of the 2" in message
    assert "quorum of 2" in message and "n3: not heard from" in message
    # Removing the dead one is what keeps the cluster available: allowed.
    index = n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n3"))
    net.stabilize()
    assert n1.log.commit >= index and n1.membership.voters == {"n1", "n2"}


def test_removal_counts_the_new_configuration_of_five() -> None:
    net = _cluster(("n1", "n2", "n3", "n4", "n5"))
    _dead(net, "n4", "n5")
    n1 = net.node("n1")
    with pytest.raises(ConfChangeRejected, match="quorum of 3") as refused:
        n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n2"))
    assert not refused.value.transient
    n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n4"))
    net.stabilize()
    assert n1.membership.voters == {"n1", "n2", "n3", "n5"}


def test_a_new_leader_does_not_count_a_voter_it_never_heard_from() -> None:
    """Right after an election check-quorum counts every peer as active; the strict check
    does not: a voter that never answered this leader has matched nothing."""
    net = Network(THREE, election_timeout_ticks=ET)
    net.isolate("n3")
    net.elect("n1")
    n1 = net.node("n1")
    assert n1.status().peers["n3"].recent_active  # check-quorum's view, right after winning
    assert not n1.caught_up("n3")
    with pytest.raises(ConfChangeRejected):
        n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n2"))


def test_a_leader_may_remove_itself_when_the_rest_is_caught_up() -> None:
    net = _cluster()
    n1 = net.node("n1")
    assert n1.status().peers["n2"].caught_up
    n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n1"))
    net.stabilize()
    assert net.leader() in {"n2", "n3"}


def test_only_a_leader_counts_anyone_as_caught_up() -> None:
    net = _cluster()
    assert not net.node("n2").caught_up("n2")
    assert not net.node("n2").caught_up("n1")


def test_a_removal_refused_only_for_an_acknowledgement_on_its_way_is_transient() -> None:
    """{n1, n2, n3}: an entry commits with n2's acknowledgement while n3's is on its way.
    Removing n2 needs n3 caught up: refused, but only for now (the runtime tries it again);
    once n3's acknowledgement arrives the same removal is taken."""
    net = _cluster()
    n1 = net.node("n1")
    n1.propose(b"x")
    from_n3 = between(frm="n3", to="n1")
    net.stabilize(where=lambda m: not from_n3(m))
    assert n1.log.commit == n1.log.last_index() and not n1.caught_up("n3")
    with pytest.raises(ConfChangeRejected, match="n3: has the log up to") as refused:
        n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n2"))
    assert refused.value.transient
    net.stabilize()
    index = n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n2"))
    net.stabilize()
    assert n1.log.commit >= index and n1.membership.voters == {"n1", "n3"}


def test_a_change_past_the_member_limit_is_refused_and_one_within_it_is_not() -> None:
    """Config.max_members bounds what a SnapshotRequest carries (the whole membership)."""
    net = _cluster(joining=("n4", "n5"), max_members=4)
    n1 = net.node("n1")
    _applied(net, ConfChange(ConfChangeOp.ADD_LEARNER, "n4", "10.0.0.4:5001"))
    net.run(1)  # the new learner is probed on the next heartbeat, and catches up
    with pytest.raises(ConfChangeRejected,
                       match=r"adding n5 would make 5 members .* limit of 4: remove 1") as refused:
        n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n5", "10.0.0.5:5001"))
    assert not refused.value.transient
    assert n1.membership.members == {"n1", "n2", "n3", "n4"}
    # A new member asked for as a voter is told to join as a learner first, not to remove one.
    with pytest.raises(ConfChangeRejected, match="joins as a learner first"):
        n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n5", "10.0.0.5:5001"))
    # At the limit, a promotion (the count stays) and a removal go through, and then an add.
    _applied(net, ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    _applied(net, ConfChange(ConfChangeOp.REMOVE, "n3"))
    _applied(net, ConfChange(ConfChangeOp.ADD_LEARNER, "n5", "10.0.0.5:5001"))
    assert n1.membership.voters == {"n1", "n2", "n4"}
    assert n1.membership.learners == {"n5"}


def test_a_cluster_already_past_a_lowered_limit_can_still_shrink_and_promote() -> None:
    net = _cluster(learners=("n4",), max_members=2)
    n1 = net.node("n1")
    with pytest.raises(ConfChangeRejected, match="limit of 2"):
        n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n5", "10.0.0.5:5001"))
    _applied(net, ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    _applied(net, ConfChange(ConfChangeOp.REMOVE, "n2"))
    assert n1.membership.voters == {"n1", "n3", "n4"}
    with pytest.raises(ConfChangeRejected, match=r"would make 4 members .* remove 2 first"):
        n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n5", "10.0.0.5:5001"))


def _applied(net: Network, change: ConfChange) -> None:
    """Proposed by the leader n1 and delivered until nothing moves."""
    net.node("n1").propose_conf_change(change)
    net.stabilize()


@pytest.mark.parametrize("limit", [0, -1])
def test_a_member_limit_below_one_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="max_members must be >= 1"):
        Config("n1", max_members=limit)
