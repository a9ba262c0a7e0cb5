"""A leader records a member's incarnation from what that member presented in a handshake (a
note). A note must never outlive the member's removal: recorded for the member added back on
a new data dir, it would lock that node out for good. Found by two reviews: notes were kept
by followers, and a follower that got the removal and the re-add together (in one batch of
entries, or in one snapshot) never saw a configuration without the member."""

from __future__ import annotations

import pytest

from raftkv.core import ConfChange, ConfChangeOp, Role
from raftkv.runtime.driver import HOUSEKEEPING_TICKS
from tests.runtime.test_forwarding import Net, Node, install_snapshot, ticks
from tests.support.completions import Done

FIVE = {f"n{i}": f"127.0.0.1:{i}" for i in range(1, 6)}


def five_nodes() -> Net:
    net = Net()
    for seed, nid in enumerate(sorted(FIVE), start=1):
        net.nodes[nid] = Node(nid, net, seed, FIVE)
    net.nodes["n1"].core.campaign()
    net.settle()
    assert net.nodes["n1"].core.role is Role.LEADER
    return net


@pytest.mark.parametrize("by_snapshot", [False, True], ids=["by_log", "by_snapshot"])
def test_a_follower_that_gets_a_removal_and_the_re_add_together_forgets_its_note(
        by_snapshot: bool) -> None:
    net = five_nodes()
    n1, n4 = net.nodes["n1"], net.nodes["n4"]
    n1.driver.incarnation = "i1"
    for driver in (n1.driver, n4.driver):  # first handshakes with n5, at the cluster's start
        driver.check_incarnation("n5", "old")
    ticks(net, n1, HOUSEKEEPING_TICKS + 3)
    assert n4.driver.sm.incarnations.get("n5") == "old"
    # n4 is cut off (its process runs on); n5 is removed, wiped and added back by a join
    n1.driver.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n5"), Done())
    ticks(net, n1, 3, cut_off="n4")
    n1.driver.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n5", "127.0.0.1:5"),
                                  Done())
    ticks(net, n1, 3, cut_off="n4")
    assert "n5" not in n1.driver.sm.incarnations
    if by_snapshot:
        install_snapshot(net, n1, "n4")
        assert n4.driver.sm.applied_index == n1.driver.sm.applied_index
    ticks(net, n1, 10)  # healed: n4 catches up
    assert "n5" in n4.driver.sm.addresses and "n5" not in n4.driver.sm.incarnations
    n1.core.transfer_leader("n4")
    ticks(net, n1, 5)
    assert n4.core.role is Role.LEADER
    ticks(net, n4, HOUSEKEEPING_TICKS + 3)
    assert "n5" not in n4.driver.sm.incarnations  # not the old data dir's
    assert n4.driver.check_incarnation("n5", "new") is None  # the new one is taken
