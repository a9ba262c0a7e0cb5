"""What the core does with peer messages it must not trust (raftkv/core/node.py).

The transport binds every message to the peer that authenticated the connection; the core
still checks what only it can: a TimeoutNow is honoured only from the leader of its current
term, and a snapshot is checked (declared size against a cap, checksum, format) before
anything of it is installed. What it ignores it names in Ready.dropped for the driver to log.
"""

from __future__ import annotations

from raftkv.core import Role, TimeoutNow
from tests.core.harness import Network

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
