"""Linearizable reads on a follower (ReadIndex through the leader) between real RaftDrivers,
on the test network of tests/runtime/test_forwarding.

Regression (found by the fault tests, seed 107, secure, kills): a follower killed while the
leader was answering its read restarted, and the leader's link delivered what it had queued
meanwhile, that answer included. Read ids restarted at 1 with each run, so the answer for the
previous run's read served the new run's read of the same id, at the old read index: the read
returned a value overwritten before it was invoked. Read ids now start at a random value each
run, as forward ids do.
"""

from __future__ import annotations

from raftkv import codec
from raftkv.codec import FrameKind
from raftkv.core import ReadIndexRequest, ReadIndexResponse
from raftkv.service import ServiceError
from tests.runtime.test_forwarding import Frame, Net, Node, net, put
from tests.support.completions import Done

__all__ = ["net"]  # the fixture


class ReadOf:
    """A read's Completion that does what the Raft process does once a read may be served:
    it reads the key from the state machine at that moment."""

    def __init__(self, node: Node, key: str) -> None:
        self.node = node
        self.key = key
        self.seen: list[object] = []

    def ok(self, value: object) -> None:
        self.seen.append(self.node.driver.sm.get(self.key))

    def fail(self, error: ServiceError) -> None:
        self.seen.append(error)


def raft_message(frame: Frame) -> object:
    return codec.decode_message(frame.payload) if frame.kind == FrameKind.RAFT else None


def test_an_answer_to_a_read_of_the_previous_run_never_serves_a_read_of_this_one(
        net: Net) -> None:
    n1 = net.nodes["n1"]
    old_run = net.nodes["n2"]

    def to_n2(f: Frame) -> bool:
        return f.to == "n2"

    # From here on the leader's frames to n2 wait, as a link's queue does while it is down.
    first = Done()
    n1.driver.propose(put("a", 1), first)
    net.settle(keep=to_n2)
    assert first.done
    # n2's read reaches the leader, which confirms it with n3 and answers: held too.
    old_run.driver.read(net.clock() + 5, Done())
    net.settle(keep=to_n2)
    assert any(isinstance(raft_message(f), ReadIndexResponse) for f in net.in_flight)

    # n2 is killed and restarts on its stores; meanwhile the leader commits a=2.
    new_run = Node("n2", net, seed=22, restart_of=old_run)
    net.nodes["n2"] = new_run
    second = Done()
    n1.driver.propose(put("a", 2), second)
    net.settle(keep=to_n2)
    assert second.done and n1.driver.sm.get("a") == (2, second.value.index)  # type: ignore[attr-defined]

    # The link comes back: the queued frames arrive in order. Once n2 knows the leader (the
    # first of them), a client reads a; its ReadIndex request is held for now.
    queued, net.in_flight = net.in_flight, []
    net.nodes["n2"].receive(queued.pop(0))
    new_run.turn()
    assert new_run.driver.leader == "n1"
    read = ReadOf(new_run, "a")
    new_run.driver.read(net.clock() + 5, read)
    new_run.turn()
    [request] = [f for f in net.in_flight if isinstance(raft_message(f), ReadIndexRequest)]
    net.in_flight.remove(request)
    for frame in queued:
        new_run.receive(frame)
        new_run.turn()
        assert read.seen in ([], [(2, second.value.index)]), (  # type: ignore[attr-defined]
            f"served {read.seen} while a=2 was committed before the read was invoked")

    net.in_flight.append(request)
    net.settle()
    assert read.seen == [(2, second.value.index)]  # type: ignore[attr-defined]
