"""The Raft core against the Raft paper and Ongaro's dissertation (etcd's raft_paper_test.go).

Each test quotes the section it checks. "Paper" is "In Search of an Understandable Consensus
Algorithm (Extended Version)"; "dissertation" is "Consensus: Bridging Theory and Practice".
Most tests drive a `Network` (tests/core/harness.py) whose Ready cycle also checks, on
every Ready, that no vote or append reply leaves before what it reveals is on disk.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

import pytest

from raftkv.core import (
    AppendRequest,
    AppendResponse,
    BootState,
    ConfChange,
    ConfChangeOp,
    ConfChangeRejected,
    Config,
    Entry,
    EntryKind,
    HardState,
    HeartbeatRequest,
    HeartbeatResponse,
    Membership,
    Message,
    NotLeader,
    ProposalDropped,
    RaftError,
    RaftNode,
    ReadIndexRequest,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from raftkv.core.snapshots import checksum_of
from tests.core.harness import Network, between, boot_state, log_of_terms

ET = 10  # election_timeout_ticks everywhere
M = TypeVar("M")
THREE = ("n1", "n2", "n3")


# -- helpers --------------------------------------------------------------------------------
def lone_node(
    nid: str = "n1",
    voters: Sequence[str] = THREE,
    *,
    terms: Sequence[int] = (),
    hs: HardState | None = None,
    learners: Sequence[str] = (),
    seed: int = 0,
    **config: int | bool,
) -> RaftNode:
    """One node of a cluster, driven by hand (no network)."""
    boot = boot_state(voters, learners, log_of_terms(*terms), hs)
    return RaftNode(Config(nid, election_timeout_ticks=ET, **config),  # type: ignore[arg-type]
                    boot, random.Random(seed))


def cycle(node: RaftNode) -> Ready:
    """One Ready cycle with an instant, perfect disk."""
    rd = node.ready()
    node.advance(rd)
    return rd


def drain(node: RaftNode) -> list[Message]:
    """Run Ready cycles until there is no more work; every message sent, in order."""
    sent: list[Message] = []
    while node.has_ready():
        rd = cycle(node)
        sent.extend(rd.messages)
        sent.extend(m for m in rd.after_persist if m.to != node.id)  # sent once persisted
    return sent


def of_type(messages: Sequence[Message], kind: type[M]) -> list[M]:
    return [m for m in messages if isinstance(m, kind)]


def sent_by(net: Network, nid: str) -> list[Message]:
    return [m for rd in net.peers[nid].readies
            for m in (*rd.messages, *(a for a in rd.after_persist if a.to != nid))]


def make_candidate(node: RaftNode) -> None:
    """Campaign without pre-vote and persist the self-vote."""
    node.campaign()
    assert node.role is Role.CANDIDATE
    drain(node)


def make_leader(node: RaftNode, *voters: str) -> None:
    """Win an election in node.term + 1 with votes from `voters`, and persist the no-op."""
    make_candidate(node)
    for v in voters:
        node.step(VoteResponse(node.term, v, node.id, granted=True))
    assert node.role is Role.LEADER
    drain(node)


def cluster(size: int = 3, **config: int | bool) -> Network:
    names = [f"n{i}" for i in range(1, size + 1)]
    return Network(names, election_timeout_ticks=ET, **config)  # type: ignore[arg-type]


def role_of(node: RaftNode) -> Role:
    """The node's role, read afresh (steps change it behind a type checker's back)."""
    return node.role


def data_of(entries: Sequence[Entry]) -> list[bytes]:
    return [e.data for e in entries if e.kind is EntryKind.NORMAL and e.data]


# =========================================================================================
# §5.1 Raft basics: terms
# =========================================================================================
def _into_role(role: Role) -> Network:
    net = cluster(pre_vote=role is not Role.CANDIDATE)
    if role is Role.LEADER:
        net.elect("n1")
    elif role in (Role.PRE_CANDIDATE, Role.CANDIDATE):
        net.node("n1").campaign()
        net.process("n1")
    assert net.node("n1").role is role
    return net


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(
    ("message", "leader"),
    [
        (AppendRequest(5, "n2", "n1", 0, 0, (), 0), "n2"),
        (HeartbeatRequest(5, "n2", "n1", 0), "n2"),
        (AppendResponse(5, "n2", "n1", False, 0), None),
    ],
    ids=["append", "heartbeat", "append-response"],
)
def test_a_message_with_a_higher_term_makes_any_node_a_follower_of_that_term(
    role: Role, message: Message, leader: str | None
) -> None:
    """§5.1: "If a candidate or leader discovers that its term is out of date, it immediately
    reverts to follower state." and "If one server's current term is smaller than the other's,
    then it updates its current term to the larger value." """
    net = _into_role(role)
    node = net.node("n1")
    node.step(message)
    assert (node.role, node.term, node.leader) == (Role.FOLLOWER, 5, leader)
    rd = net.process("n1")
    assert rd is not None and rd.hard_state is not None
    assert (rd.hard_state.term, rd.must_sync) == (5, True)


def test_follower_rejects_append_from_a_stale_term_and_tells_it_the_current_term() -> None:
    """§5.1: "If a server receives a request with a stale term number, it rejects the request."
    """
    node = lone_node("n2", terms=(1, 1), hs=HardState(term=3))
    node.step(AppendRequest(2, "n1", "n2", 2, 1, (Entry(3, 2),), 3))
    sent = drain(node)
    assert node.log.last_index() == 2
    assert node.log.commit == 0
    assert node.leader is None
    assert of_type(sent, AppendResponse) == [AppendResponse(3, "n2", "n1", False, 0)]


def test_stale_vote_request_gets_no_vote() -> None:
    """§5.1: a request with a stale term is rejected: no vote is granted in an old term."""
    node = lone_node("n2", hs=HardState(term=3))
    node.step(VoteRequest(2, "n1", "n2", 5, 2))
    node.step(VoteRequest(2, "n1", "n2", 5, 2, pre_vote=True))
    sent = drain(node)
    assert node.vote is None
    assert node.term == 3
    assert all(not r.granted for r in of_type(sent, VoteResponse))
    assert of_type(sent, VoteResponse) == [VoteResponse(3, "n2", "n1", False, pre_vote=True)]


def test_candidate_ignores_a_vote_from_an_earlier_term() -> None:
    """§5.1: stale-term messages carry no weight: an old grant does not elect anyone."""
    node = lone_node("n1", pre_vote=False, hs=HardState(term=4))
    make_candidate(node)
    node.step(VoteResponse(4, "n2", "n1", granted=True))
    assert node.role is Role.CANDIDATE
    node.step(VoteResponse(5, "n2", "n1", granted=True))
    assert role_of(node) is Role.LEADER


# =========================================================================================
# §5.2 Leader election
# =========================================================================================
def test_follower_starts_a_pre_vote_after_the_election_timeout_without_raising_its_term() -> None:
    """§5.2: "If a follower receives no communication over a period of time called the election
    timeout, then it assumes there is no viable leader and begins an election." With pre-vote
    (dissertation §9.6) it first asks whether it could win, keeping its term."""
    net = cluster()
    n1 = net.node("n1")
    net.tick("n1", ET - 1)
    assert n1.role is Role.FOLLOWER
    net.tick("n1", ET)
    assert (n1.role, n1.term, n1.vote) == (Role.PRE_CANDIDATE, 0, None)
    rd = net.process("n1")
    assert rd is not None
    assert rd.hard_state is None  # nothing about the term or vote changed
    assert sorted(of_type(rd.messages, VoteRequest), key=lambda m: m.to) == [
        VoteRequest(1, "n1", peer, 0, 0, pre_vote=True) for peer in ("n2", "n3")
    ]
    assert net.node("n2").term == 0  # a pre-vote request changes nobody's term
    net.deliver()
    assert (net.node("n2").term, net.node("n2").vote) == (0, None)


def test_pre_candidate_raises_its_term_only_once_the_pre_vote_wins() -> None:
    """Dissertation §9.6: "Only if the candidate hears from a majority of the cluster does it
    increment its term and start a normal election." """
    net = cluster()
    n1 = net.node("n1")
    n1.campaign()
    net.process("n1")
    net.deliver(between(to="n2"))
    net.drop(between(to="n3"))
    net.process("n2")
    net.process("n2")  # the pre-vote answer needs nothing persisted, but leaves after advance
    assert n1.role is Role.PRE_CANDIDATE
    net.deliver(between(frm="n2", kind=VoteResponse))
    assert (n1.role, n1.term, n1.vote) == (Role.CANDIDATE, 1, "n1")
    net.stabilize()
    assert net.leader() == "n1"
    assert {net.node(n).term for n in THREE} == {1}


@pytest.mark.parametrize(
    ("size", "votes", "role"),
    [
        (1, {}, Role.LEADER),
        (3, {"n2": True, "n3": True}, Role.LEADER),
        (3, {"n2": True}, Role.LEADER),
        (5, {"n2": True, "n3": True, "n4": True, "n5": True}, Role.LEADER),
        (5, {"n2": True, "n3": True}, Role.LEADER),
        (4, {"n2": True}, Role.CANDIDATE),  # 2 of 4 is not a majority
        (4, {"n2": True, "n3": True}, Role.LEADER),
        (3, {}, Role.CANDIDATE),
        (5, {"n2": True, "n3": False, "n4": False}, Role.CANDIDATE),
        (3, {"n2": False, "n3": False}, Role.FOLLOWER),
        (5, {"n2": False, "n3": False, "n4": False}, Role.FOLLOWER),
        (4, {"n2": False, "n3": False}, Role.FOLLOWER),  # 2 of 4 can no longer be reached
    ],
)
def test_candidate_wins_with_a_majority_of_votes_and_loses_to_a_majority_of_refusals(
    size: int, votes: dict[str, bool], role: Role
) -> None:
    """§5.2: "A candidate wins an election if it receives votes from a majority of the servers
    in the full cluster for the same term." """
    voters = [f"n{i}" for i in range(1, size + 1)]
    node = lone_node("n1", voters, pre_vote=False)
    make_candidate(node)
    for voter, granted in votes.items():
        node.step(VoteResponse(1, voter, "n1", granted))
    assert node.role is role
    assert node.term == 1


@pytest.mark.parametrize("kind", [AppendRequest, HeartbeatRequest])
def test_candidate_steps_down_on_a_message_from_a_leader_of_its_own_term(kind: type) -> None:
    """§5.2: "If the leader's term ... is at least as large as the candidate's current term,
    then the candidate recognizes the leader as legitimate and returns to follower state." """
    node = lone_node("n1", pre_vote=False)
    make_candidate(node)
    m = (AppendRequest(1, "n2", "n1", 0, 0, (), 0) if kind is AppendRequest
         else HeartbeatRequest(1, "n2", "n1", 0))
    node.step(m)
    assert (node.role, node.term, node.leader) == (Role.FOLLOWER, 1, "n2")


def test_candidate_that_neither_wins_nor_loses_starts_a_new_election_after_a_timeout() -> None:
    """§5.2: "When this happens, each candidate will time out and start a new election by
    incrementing its term and initiating another round of RequestVote RPCs." """
    node = lone_node("n1", pre_vote=False)
    make_candidate(node)
    for _ in range(2 * ET):
        node.tick()
    assert (node.role, node.term, node.vote) == (Role.CANDIDATE, 2, "n1")
    requests = of_type(drain(node), VoteRequest)
    assert {(m.to, m.term) for m in requests} == {("n2", 2), ("n3", 2)}


def test_election_timeouts_are_randomized_within_one_to_two_timeouts() -> None:
    """§5.2: "Raft uses randomized election timeouts to ensure that split votes are rare ...
    election timeouts are chosen randomly from a fixed interval." """
    waited: list[int] = []
    for seed in range(30):
        node = lone_node("n1", seed=seed)
        ticks = 0
        while node.role is Role.FOLLOWER:
            node.tick()
            ticks += 1
            assert ticks < 2 * ET, "no election within two timeouts"
        waited.append(ticks)
    assert all(ET <= t < 2 * ET for t in waited)
    assert len(set(waited)) >= 3


def test_followers_of_one_cluster_time_out_at_different_ticks() -> None:
    """§5.2: randomized timeouts spread servers out "so that in most cases only a single server
    will time out"."""
    net = cluster(5)
    first_campaign: dict[str, int] = {}
    for t in range(1, 2 * ET):
        for nid, peer in net.peers.items():
            peer.node.tick()
            if nid not in first_campaign and peer.node.role is not Role.FOLLOWER:
                first_campaign[nid] = t
    assert len(first_campaign) == 5
    assert len(set(first_campaign.values())) > 1


def test_pre_candidate_that_loses_the_pre_vote_returns_to_follower_in_the_same_term() -> None:
    """Dissertation §9.6: a server that could not win does not increment its term."""
    node = lone_node("n1", hs=HardState(term=3))
    node.campaign()
    assert node.role is Role.PRE_CANDIDATE
    drain(node)
    node.step(VoteResponse(3, "n2", "n1", granted=False, pre_vote=True))
    node.step(VoteResponse(3, "n3", "n1", granted=False, pre_vote=True))
    assert (node.role, node.term, node.vote) == (Role.FOLLOWER, 3, None)
    assert not node.has_ready() or cycle(node).hard_state is None


def test_follower_refuses_proposals_and_names_the_leader() -> None:
    """§5.1: "The leader handles all client requests (if a client contacts a follower, the
    follower redirects it to the leader)." """
    net = cluster()
    net.elect("n1")
    with pytest.raises(NotLeader) as refused:
        net.node("n2").propose(b"x")
    assert refused.value.leader == "n1"
    with pytest.raises(NotLeader):
        net.node("n2").propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n4"))


def test_follower_votes_for_at_most_one_candidate_per_term() -> None:
    """§5.2: "Each server will vote for at most one candidate in a given term, on a
    first-come-first-served basis." """
    node = lone_node("n3")
    node.step(VoteRequest(1, "n1", "n3", 0, 0))
    node.step(VoteRequest(1, "n2", "n3", 0, 0))
    node.step(VoteRequest(1, "n1", "n3", 0, 0))  # a retransmission gets the same answer
    answers = [(m.to, m.granted) for m in of_type(drain(node), VoteResponse)]
    assert answers == [("n1", True), ("n2", False), ("n1", True)]
    assert node.vote == "n1"


# =========================================================================================
# §5.3 Log replication
# =========================================================================================
def test_leader_appends_a_proposal_and_commits_it_once_a_majority_stored_it() -> None:
    """§5.3: "The leader appends the command to its log as a new entry, then issues
    AppendEntries RPCs ... A log entry is committed once the leader that created the entry
    has replicated it on a majority of the servers." """
    net = cluster()
    net.elect("n1")
    n1 = net.node("n1")
    net.isolate("n3")
    index = n1.propose(b"x")
    assert n1.log.entry(index) == Entry(index, 1, EntryKind.NORMAL, b"x")
    net.process("n1")
    assert n1.log.commit == index - 1
    net.stabilize()  # n2 stores it and acknowledges
    assert n1.log.commit == index
    assert data_of(net.peers["n1"].applied) == [b"x"]
    assert net.node("n3").log.last_index() == index - 1


def test_leader_does_not_commit_before_a_majority_stored_the_entry() -> None:
    """§5.3: a single acknowledgement out of four followers is not a majority of five."""
    net = cluster(5)
    net.elect("n1")
    n1 = net.node("n1")
    for nid in ("n3", "n4", "n5"):
        net.isolate(nid)
    index = n1.propose(b"x")
    net.stabilize()
    assert net.node("n2").log.last_index() == index
    assert n1.log.commit == index - 1
    assert net.peers["n1"].applied[-1].index == index - 1


def test_followers_learn_the_commit_index_from_the_leader_and_apply_in_order() -> None:
    """§5.3: "The leader keeps track of the highest index it knows to be committed, and it
    includes that index in future AppendEntries RPCs ... Once a follower learns that a log entry
    is committed, it applies the entry to its local state machine (in log order)." The
    commit index rides on the next append or heartbeat: no append is sent for it alone."""
    net = cluster()
    net.elect("n1")
    for d in (b"a", b"b", b"c"):
        net.node("n1").propose(d)
    net.stabilize()
    assert net.node("n1").log.commit == 4
    assert net.node("n2").log.commit < 4
    net.heartbeat("n1")
    for nid in THREE:
        assert data_of(net.peers[nid].applied) == [b"a", b"b", b"c"]
        assert net.node(nid).log.commit == 4


def test_follower_rejects_append_when_prev_term_mismatches() -> None:
    """§5.3: "If the follower does not find an entry in its log with the same index and term,
    then it refuses the new entries." """
    node = lone_node("n2", terms=(1, 1, 2), hs=HardState(term=3))
    node.step(AppendRequest(3, "n1", "n2", 3, 3, (Entry(4, 3),), 0))
    replies = of_type(drain(node), AppendResponse)
    assert node.log.last_index() == 3
    assert [(r.success, r.index) for r in replies] == [(False, 3)]
    assert (replies[0].hint_index, replies[0].hint_term) == (3, 2)


def test_follower_accepts_append_when_prev_matches_and_acknowledges_the_last_new_index() -> None:
    """§5.3 and Figure 2 (AppendEntries receiver, steps 2-5)."""
    node = lone_node("n2", terms=(1, 1), hs=HardState(term=2))
    node.step(AppendRequest(2, "n1", "n2", 2, 1, (Entry(3, 2), Entry(4, 2)), 3))
    replies = of_type(drain(node), AppendResponse)
    assert [(r.success, r.index) for r in replies] == [(True, 4)]
    assert node.log.commit == 3  # min(leaderCommit, index of last new entry)


FIGURE_7_LEADER = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)
FIGURE_7_FOLLOWERS = {
    "a": (1, 1, 1, 4, 4, 5, 5, 6, 6),
    "b": (1, 1, 1, 4),
    "c": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6),
    "d": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7),
    "e": (1, 1, 1, 4, 4, 4, 4),
    "f": (1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3),
}


@pytest.mark.parametrize("case", sorted(FIGURE_7_FOLLOWERS))
def test_leader_brings_a_figure_7_follower_in_line_with_few_round_trips(case: str) -> None:
    """§5.3 (Figure 7): "the leader handles inconsistencies by forcing the followers' logs to
    duplicate its own. This means that conflicting entries in follower logs will be overwritten"
    ... and: "the follower can include the term of the conflicting entry and the first index it
    stores for that term. With this information, the leader can decrement nextIndex to bypass
    all of the conflicting entries in that term." """
    voters = ("n1", "n2", "n3")
    boots = {
        "n1": boot_state(voters, (), log_of_terms(*FIGURE_7_LEADER), HardState(term=7)),
        "n2": boot_state(voters, (), log_of_terms(*FIGURE_7_FOLLOWERS[case]), HardState(term=7)),
        "n3": boot_state(voters, (), log_of_terms(*FIGURE_7_LEADER), HardState(term=7)),
    }
    net = Network(voters, boot=boots, election_timeout_ticks=ET)
    net.elect("n1")
    leader_log = net.node("n1").log
    expected = [*log_of_terms(*FIGURE_7_LEADER), Entry(11, 8)]
    assert leader_log.slice(1, 12) == expected
    follower_log = net.node("n2").log
    assert follower_log.slice(1, follower_log.last_index() + 1) == expected
    rejections = [m for m in sent_by(net, "n2") if isinstance(m, AppendResponse) and not m.success]
    # Decrementing nextIndex one by one would take up to 7 rejections (case f).
    assert len(rejections) <= 1


def test_follower_that_catches_up_after_the_commit_learns_it_without_waiting_for_a_heartbeat(
) -> None:
    """§5.3: "The leader keeps track of the highest index it knows to be committed, and it
    includes that index in future AppendEntries RPCs". Here n3 acknowledges first and the entry
    commits while the leader is still probing n2 (Figure 7, follower f); when n2 finally
    matches, the leader's next AppendEntries to it carries the commit index (no tick here)."""
    voters = ("n1", "n2", "n3")
    boots = {
        "n1": boot_state(voters, (), log_of_terms(*FIGURE_7_LEADER), HardState(term=7)),
        "n2": boot_state(voters, (), log_of_terms(*FIGURE_7_FOLLOWERS["f"]), HardState(term=7)),
        "n3": boot_state(voters, (), log_of_terms(*FIGURE_7_LEADER), HardState(term=7)),
    }
    net = Network(voters, boot=boots, election_timeout_ticks=ET)
    net.elect("n1")
    assert net.node("n1").log.commit == 11
    assert net.node("n2").log.last_index() == 11
    assert net.node("n2").log.commit == 11
    assert net.peers["n2"].applied_index == 11


# =========================================================================================
# §5.4 Safety
# =========================================================================================
@pytest.mark.parametrize(
    ("voter_terms", "last_index", "last_term", "granted"),
    [
        ((1, 1), 2, 1, True),  # same last term, same length
        ((1, 1), 3, 1, True),  # same last term, longer
        ((1, 1), 1, 1, False),  # same last term, shorter
        ((1, 1), 1, 2, True),  # higher last term, even if shorter
        ((1, 2), 3, 1, False),  # lower last term, even if longer
        ((1, 2), 2, 2, True),
        ((1, 2), 0, 0, False),  # an empty log is behind any non-empty one
    ],
)
def test_voter_refuses_its_vote_to_a_less_up_to_date_candidate(
    voter_terms: tuple[int, ...], last_index: int, last_term: int, granted: bool
) -> None:
    """§5.4.1: "The RequestVote RPC implements this restriction: the RPC includes information
    about the candidate's log, and the voter denies its vote if its own log is more up-to-date
    than that of the candidate." """
    node = lone_node("n2", terms=voter_terms, hs=HardState(term=2))
    node.step(VoteRequest(3, "n1", "n2", last_index, last_term))
    replies = of_type(drain(node), VoteResponse)
    assert [(r.term, r.granted) for r in replies] == [(3, granted)]
    assert node.vote == ("n1" if granted else None)


def test_new_leader_appends_a_no_op_of_its_own_term() -> None:
    """§5.4.2/§8: "Raft handles this by having each leader commit a blank no-op entry into the
    log at the start of its term." """
    node = lone_node("n1", terms=(1, 2), hs=HardState(term=2), pre_vote=False)
    make_leader(node, "n2")
    last = node.log.entry(node.log.last_index())
    assert (last.index, last.term, last.kind, last.data) == (3, 3, EntryKind.NORMAL, b"")


def test_leader_never_commits_an_earlier_term_entry_by_counting_replicas() -> None:
    """§5.4.2 (Figure 8): "Raft never commits log entries from previous terms by counting
    replicas. Only log entries from the leader's current term are committed by counting
    replicas; once an entry from the current term has been committed in this way, then all
    prior entries are committed indirectly because of the Log Matching Property." """
    node = lone_node("n1", terms=(1, 2), hs=HardState(term=2, commit=1), pre_vote=False)
    make_leader(node, "n2")  # term 3; its no-op is entry 3
    assert node.log.commit == 1
    # n2 now stores the term-2 entry: that is a majority (n1, n2), but of an earlier term.
    node.step(AppendResponse(3, "n2", "n1", True, 2))
    assert node.status().peers["n2"].match == 2
    assert node.log.commit == 1
    assert cycle(node).committed_entries == ()  # entry 2 is not handed out to be applied
    # Once the no-op of term 3 is on a majority, both commit.
    node.step(AppendResponse(3, "n2", "n1", True, 3))
    assert node.log.commit == 3
    assert [e.index for e in cycle(node).committed_entries] == [2, 3]


def test_figure_8_an_entry_on_a_majority_from_an_old_term_can_still_be_overwritten() -> None:
    """Figure 8 (c)-(d): S1 replicated its term-2 entry to a majority but did not commit it;
    S5, elected with a term-3 entry at that index, overwrites it. Committing it by counting
    replicas in (c) would have lost a committed entry."""
    voters = ("s1", "s2", "s3", "s4", "s5")
    boots = {
        "s1": boot_state(voters, (), log_of_terms(1, 2), HardState(term=4)),
        "s2": boot_state(voters, (), log_of_terms(1, 2), HardState(term=4)),
        "s3": boot_state(voters, (), log_of_terms(1, 2), HardState(term=4)),
        "s4": boot_state(voters, (), log_of_terms(1), HardState(term=4)),
        "s5": boot_state(voters, (), log_of_terms(1, 3), HardState(term=4)),
    }
    net = Network(voters, boot=boots, election_timeout_ticks=ET)
    net.isolate("s1")
    net.elect("s5")  # s2, s3 (last term 2 < 3) and s4 vote for s5
    for nid in voters:
        if nid != "s1":
            assert net.node(nid).log.term(2) == 3
    # s1 is the only one left with the term-2 entry: it was never committed, nor applied.
    assert all(e.term != 2 for nid in voters for e in net.peers[nid].applied)


# =========================================================================================
# §9.6 Preventing disruptions: pre-vote and check-quorum
# =========================================================================================
def test_partitioned_node_rejoining_raises_no_terms_and_keeps_the_leader() -> None:
    """Dissertation §9.6: "the Pre-Vote algorithm ... a candidate would first ask other servers
    whether its log was up-to-date enough to get their vote ... [this] solves the issue of a
    partitioned server disrupting the cluster when it rejoins." """
    net = cluster()
    net.elect("n1")
    net.isolate("n3")
    net.run(5 * ET)
    assert net.node("n3").role is Role.PRE_CANDIDATE
    assert net.node("n3").term == 1
    net.heal()
    net.run(3 * ET)
    assert net.leader() == "n1"
    assert [net.node(n).term for n in THREE] == [1, 1, 1]
    assert net.node("n3").role is Role.FOLLOWER


def test_without_pre_vote_a_rejoining_node_disrupts_the_leader() -> None:
    """The failure pre-vote prevents (dissertation §9.6), so the test above can fail."""
    net = cluster(pre_vote=False, check_quorum=False)
    net.elect("n1")
    net.isolate("n3")
    net.run(5 * ET)
    assert net.node("n3").term > 1
    net.heal()
    net.run(2 * ET)
    assert net.node("n1").term > 1


def test_leader_steps_down_when_it_hears_from_no_quorum_for_an_election_timeout() -> None:
    """Dissertation §6.2: "a leader steps down if an election timeout elapses without a
    successful round of heartbeats to a majority of its cluster." """
    net = cluster()
    net.elect("n1")
    net.run(3 * ET)
    assert net.node("n1").role is Role.LEADER  # heartbeats answered: it stays
    net.isolate("n1")
    net.tick("n1", 2 * ET)
    net.stabilize()
    assert net.node("n1").role is Role.FOLLOWER
    assert net.node("n1").term == 1


def test_leader_with_a_quorum_but_not_everyone_stays_leader() -> None:
    """Dissertation §6.2: one follower answering is a majority of three (with the leader)."""
    net = cluster()
    net.elect("n1")
    net.isolate("n3")
    net.run(4 * ET, nodes=["n1", "n2"])
    assert net.node("n1").role is Role.LEADER


def test_follower_that_heard_from_a_leader_recently_ignores_a_vote_request() -> None:
    """Dissertation §4.2.3: "if a server receives a RequestVote request within the minimum
    election timeout of hearing from a current leader, it does not update its term or grant
    its vote." Leadership transfer sets a flag that overrides this (§3.10)."""
    net = cluster()
    net.elect("n1")
    n2 = net.node("n2")
    n2.step(VoteRequest(2, "n3", "n2", 5, 1))
    assert (n2.term, n2.vote, n2.leader) == (1, "n1", "n1")
    net.process("n2")
    assert not net.take(between(frm="n2", kind=VoteResponse))
    n2.step(VoteRequest(2, "n3", "n2", 5, 1, transfer=True))
    assert (n2.term, n2.vote) == (2, "n3")


def test_follower_votes_again_once_the_leader_was_silent_for_an_election_timeout() -> None:
    """Dissertation §4.2.3: the lease ends one election timeout after the last contact."""
    net = cluster()
    net.elect("n1")
    n2 = net.node("n2")
    net.tick("n2", ET)
    n2.step(VoteRequest(2, "n3", "n2", 5, 1))
    assert (n2.term, n2.vote) == (2, "n3")


# =========================================================================================
# §6.4 Processing read-only queries (ReadIndex)
# =========================================================================================
def test_leader_serves_a_read_only_after_a_quorum_acknowledged_a_heartbeat() -> None:
    """Dissertation §6.4: "the leader ... sends heartbeats ... Once it receives
    acknowledgments from a majority of the cluster, the leader knows that there could not have
    existed a leader for a greater term at the moment it sent the heartbeats." """
    net = cluster()
    net.elect("n1")
    commit = net.node("n1").log.commit
    net.node("n1").read_index(42)
    net.process("n1")
    beats = net.take(between(kind=HeartbeatRequest))
    assert {m.to for m in beats} == {"n2", "n3"}
    net.send(*[m for m in beats if m.to == "n2"])
    net.deliver()
    net.process("n2")
    assert net.peers["n1"].read_states == []  # n2 answered, n1 has not heard it yet
    net.deliver(between(frm="n2", kind=HeartbeatResponse))
    net.process_all()
    assert net.peers["n1"].read_states == [ReadState(42, commit)]


def test_leader_does_not_serve_a_read_when_heartbeats_are_lost() -> None:
    """Dissertation §6.4: no quorum acknowledgement, no read."""
    net = cluster()
    net.elect("n1")
    net.node("n1").read_index(42)
    net.process("n1")
    net.drop(between(kind=HeartbeatRequest))
    net.stabilize()
    assert net.peers["n1"].read_states == []
    net.run(1)  # the next heartbeat round gets through
    assert [r.request_id for r in net.peers["n1"].read_states] == [42]


def test_read_is_not_confirmed_by_acks_of_heartbeats_sent_before_it() -> None:
    """Dissertation §6.4, step 3: the heartbeats must be sent after the read index was
    recorded; answers to an earlier round prove nothing about now (d-engine #381)."""
    net = cluster()
    net.elect("n1")
    net.tick("n1")
    net.process("n1")
    net.deliver(between(kind=HeartbeatRequest))
    net.process("n2")
    net.process("n3")
    old_acks = net.take(between(kind=HeartbeatResponse))
    assert len(old_acks) == 2
    net.node("n1").read_index(7)
    net.send(*old_acks)
    net.deliver()
    assert net.peers["n1"].read_states == []
    net.process("n1")
    assert net.peers["n1"].read_states == []
    net.stabilize()
    assert [r.request_id for r in net.peers["n1"].read_states] == [7]


def test_new_leader_serves_reads_only_once_it_committed_an_entry_of_its_term() -> None:
    """Dissertation §6.4, step 1: "If the leader has not yet marked an entry from its current
    term committed, it waits until it has done so." """
    net = cluster()
    net.elect("n1")
    net.node("n1").propose(b"x")
    net.stabilize()
    net.node("n1").transfer_leader("n2")

    def no_appends_from_n2(m: Message) -> bool:
        return not (isinstance(m, AppendRequest) and m.frm == "n2")

    net.stabilize(where=no_appends_from_n2)  # n2 wins term 2; its no-op goes nowhere
    n2 = net.node("n2")
    assert n2.role is Role.LEADER and n2.term == 2
    assert n2.log.term(n2.log.commit) == 1
    n2.read_index(5)
    for _ in range(3):  # heartbeat rounds are answered all the same
        net.tick("n2")
        net.stabilize(where=no_appends_from_n2)
    assert net.peers["n1"].readies[-1].messages  # n1 and n3 did answer heartbeats
    assert net.peers["n2"].read_states == []
    net.stabilize()
    assert n2.log.term(n2.log.commit) == 2
    assert net.peers["n2"].read_states == [ReadState(5, n2.log.commit)]


def test_follower_read_is_answered_by_the_leader_with_its_read_index() -> None:
    """Dissertation §6.4: "followers ... issue a request to the leader to get just the latest
    commit index. The leader ... return[s] the index to the follower." """
    net = cluster()
    net.elect("n1")
    index = net.node("n1").propose(b"x")
    net.stabilize()
    net.node("n3").read_index(9)
    net.process("n3")
    assert [(m.to, m.request_ids) for m in net.in_flight if isinstance(m, ReadIndexRequest)] == [
        ("n1", (9,))]
    net.stabilize()
    assert net.peers["n3"].read_states == [ReadState(9, index)]
    # The read index is a commit index at an entry of the leader's term: the follower, whose
    # log holds that entry, learns from it that everything up to it is committed, and
    # applies it without waiting for the next heartbeat.
    assert net.node("n3").log.commit == index
    assert net.peers["n3"].applied[-1].index == index


def test_a_commit_alone_sends_no_append_and_gets_no_ack() -> None:
    """The commit index rides on the next append or heartbeat (as in etcd): a commit that
    finds nothing new to send costs no message and no acknowledgement."""
    net = cluster()
    net.elect("n1")
    index = net.node("n1").propose(b"x")
    net.process("n1")  # the leader sends the entry and persists it
    net.deliver()  # the appends with the entry
    net.process_all()  # the followers persist and answer
    net.deliver()  # the acks reach the leader, which commits
    before = len(sent_by(net, "n1"))
    net.process("n1")
    assert net.node("n1").log.commit == index
    assert not [m for m in sent_by(net, "n1")[before:] if isinstance(m, AppendRequest)]
    net.stabilize()
    assert net.node("n2").log.commit < index
    net.heartbeat("n1")
    assert net.node("n2").log.commit == index


def test_learn_commit_commits_only_an_entry_of_the_named_term() -> None:
    """Log Matching: an entry of the same index and term means the same log up to it. The
    leader's word that (index, term) is committed commits a follower's log up to it only if
    the follower holds that very entry."""
    net = cluster()
    net.elect("n1")
    index = net.node("n1").propose(b"x")
    net.stabilize()
    n2 = net.node("n2")
    assert n2.log.commit < index
    n2.learn_commit(index, n2.term + 1)  # another term: not this entry
    assert n2.log.commit < index
    n2.learn_commit(index + 5, n2.term)  # not in this log at all
    assert n2.log.commit < index
    n2.learn_commit(index, n2.term)
    assert n2.log.commit == index
    net.stabilize()
    assert net.peers["n2"].applied[-1].index == index


def test_leader_fails_its_pending_reads_when_it_steps_down() -> None:
    """Dissertation §6.4: a read confirmed by no quorum must not be served by an ex-leader."""
    net = cluster()
    net.elect("n1")
    n1 = net.node("n1")
    n1.read_index(5)
    net.process("n1")
    net.drop(between(kind=HeartbeatRequest))
    n1.step(AppendResponse(2, "n2", "n1", False, 0))
    net.process("n1")
    assert net.peers["n1"].failed_reads == [5]
    assert net.peers["n1"].read_states == []


def test_forwarded_read_fails_when_the_leader_steps_down() -> None:
    """Dissertation §6.4: the follower learns that the leader could not serve its read."""
    net = cluster()
    net.elect("n1")
    net.node("n2").read_index(6)
    net.process("n2")
    net.deliver(between(kind=ReadIndexRequest))
    net.process("n1")
    net.drop(between(kind=HeartbeatRequest))
    net.node("n1").step(AppendResponse(2, "n3", "n1", False, 0))
    net.stabilize()
    assert net.peers["n2"].failed_reads == [6]
    assert net.peers["n2"].read_states == []


def test_single_voter_leader_serves_reads_without_a_heartbeat_round() -> None:
    """Dissertation §6.4: with one voter, the leader alone is the quorum."""
    node = lone_node("n1", ["n1"])
    node.campaign()
    drain(node)
    assert node.role is Role.LEADER and node.log.commit == 1
    node.read_index(4)
    rd = cycle(node)
    assert rd.read_states == (ReadState(4, 1),)
    assert rd.messages == ()


def test_read_on_a_node_that_knows_no_leader_fails_at_once() -> None:
    node = lone_node("n2")
    node.read_index(3)
    assert cycle(node).failed_reads == (3,)


# =========================================================================================
# §3.10 Leadership transfer
# =========================================================================================
def test_timeout_now_to_a_caught_up_follower_makes_it_leader_without_an_election_timeout() -> None:
    """Dissertation §3.10: "the prior leader sends a TimeoutNow request to the target server.
    This request has the same effect as the target server's election timer firing: the target
    server starts a new election." """
    net = cluster()
    net.elect("n1")
    net.node("n1").transfer_leader("n2")
    net.stabilize()  # no tick anywhere
    assert net.leader() == "n2"
    assert [net.node(n).term for n in THREE] == [2, 2, 2]
    requests = of_type(sent_by(net, "n2"), VoteRequest)
    assert requests and all(m.transfer and not m.pre_vote for m in requests)


def test_transfer_to_a_lagging_follower_catches_it_up_first() -> None:
    """Dissertation §3.10: "the prior leader ... transmit[s] to the target server any log
    entries it is missing". TimeoutNow goes only after the target caught up."""
    net = cluster()
    net.elect("n1")
    net.isolate("n3")
    for d in (b"a", b"b"):
        net.node("n1").propose(d)
    net.stabilize()
    net.heal()
    last = net.node("n1").log.last_index()
    net.node("n1").transfer_leader("n3")
    net.run(2)  # a heartbeat reveals that n3 lost what was sent to it
    assert net.leader() == "n3"
    sent = [m for m in sent_by(net, "n1") if m.to == "n3"]
    timeout_now = [i for i, m in enumerate(sent) if isinstance(m, TimeoutNow)]
    catch_up = [i for i, m in enumerate(sent)
                if isinstance(m, AppendRequest) and any(e.index == last for e in m.entries)]
    assert timeout_now and catch_up
    assert max(catch_up) < min(timeout_now)
    assert net.node("n3").log.term(last) == 1
    assert data_of(net.peers["n3"].applied) == [b"a", b"b"]


def test_proposals_are_refused_while_leadership_is_being_transferred() -> None:
    """Dissertation §3.10: "the prior leader stops accepting new client requests" during a
    transfer; the transfer is abandoned after an election timeout."""
    net = cluster()
    net.elect("n1")
    n1 = net.node("n1")
    net.isolate("n3")
    n1.propose(b"a")
    net.stabilize()
    n1.transfer_leader("n3")
    with pytest.raises(ProposalDropped):
        n1.propose(b"b")
    with pytest.raises(ProposalDropped):
        n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n4"))
    net.run(ET, nodes=["n1", "n2"])
    assert n1.role is Role.LEADER
    assert n1.propose(b"b") > 0


def test_transfer_needs_a_leader_and_a_voter() -> None:
    net = Network(["n1", "n2"], ["n3"], election_timeout_ticks=ET)
    net.elect("n1")
    with pytest.raises(NotLeader):
        net.node("n2").transfer_leader("n1")
    with pytest.raises(RaftError):
        net.node("n1").transfer_leader("n3")


# =========================================================================================
# §4.1 Cluster membership changes (single-server)
# =========================================================================================
def test_leader_refuses_a_membership_change_before_committing_an_entry_of_its_term() -> None:
    """Dissertation §4.1 (and the 2015 raft-dev correction): "a leader may not append a new
    configuration entry until it has committed an entry from its current term." """
    net = cluster()
    net.node("n1").campaign()
    net.stabilize(where=lambda m: not isinstance(m, AppendRequest))
    n1 = net.node("n1")
    assert n1.role is Role.LEADER
    with pytest.raises(ConfChangeRejected) as refused:
        n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n4"))
    assert refused.value.transient  # the runtime tries it again for a while
    net.stabilize()
    n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n4"))


def test_only_one_membership_change_may_be_uncommitted_at_a_time() -> None:
    """Dissertation §4.1: "The leader will not begin another membership change until the
    previous one has been committed." """
    net = Network(THREE, joining=["n4", "n5"], election_timeout_ticks=ET)
    net.elect("n1")
    n1 = net.node("n1")
    n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n4"))
    with pytest.raises(ConfChangeRejected) as refused:
        n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n5"))
    assert refused.value.transient
    net.stabilize()
    n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "n5"))
    net.stabilize()
    net.run(1)  # the new learner is probed on the next heartbeat
    assert n1.membership.learners == {"n4", "n5"}
    assert net.node("n5").membership.learners == {"n4", "n5"}


def test_a_new_configuration_takes_effect_when_appended_not_when_committed() -> None:
    """Dissertation §4.1: "a server always uses the latest configuration in its log,
    regardless of whether the entry is committed." """
    net = Network(THREE, ["n4"], election_timeout_ticks=ET)
    net.elect("n1")
    n1 = net.node("n1")
    index = n1.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    assert n1.membership.voters == {"n1", "n2", "n3", "n4"}
    assert n1.log.commit < index


def test_learner_receives_entries_but_never_counts_toward_commit() -> None:
    """Dissertation §4.2.1: new servers join as non-voting members: "the leader will replicate
    log entries to them, but they are not considered for majorities." """
    net = Network(["n1", "n2"], ["n3"], election_timeout_ticks=ET)
    net.elect("n1")
    net.isolate("n2")
    index = net.node("n1").propose(b"x")
    net.stabilize()
    assert net.node("n3").log.last_index() == index
    assert net.node("n1").status().peers["n3"].match == index
    assert net.node("n1").log.commit < index
    net.heal()
    net.run(1)
    assert net.node("n1").log.commit == index
    net.heartbeat("n1")
    assert data_of(net.peers["n3"].applied) == [b"x"]


def test_learner_never_campaigns_and_its_vote_is_not_counted() -> None:
    """Dissertation §4.2.1: non-voting members take no part in elections."""
    net = Network(["n1", "n2"], ["n3"], election_timeout_ticks=ET)
    net.run(1)
    net.isolate("n3")
    net.tick("n3", 10 * ET)
    assert (net.node("n3").role, net.node("n3").term) == (Role.FOLLOWER, 0)
    assert not net.node("n3").has_ready()

    node = lone_node("n1", ["n1", "n2"], learners=["n3"], pre_vote=False)
    node.campaign()
    requests = of_type(drain(node), VoteRequest)
    assert [m.to for m in requests] == ["n2"]
    node.step(VoteResponse(1, "n3", "n1", granted=True))
    assert node.role is Role.CANDIDATE


def test_add_voter_promotes_a_learner_which_then_counts_toward_commit() -> None:
    """Dissertation §4.2.1: once caught up, the learner is added as a voter."""
    net = Network(["n1", "n2"], ["n3"], election_timeout_ticks=ET)
    net.elect("n1")
    net.node("n1").propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n3"))
    net.stabilize()
    for nid in ("n1", "n2", "n3"):
        assert net.node(nid).membership.voters == {"n1", "n2", "n3"}
        assert net.node(nid).membership.learners == frozenset()
    net.isolate("n2")
    index = net.node("n1").propose(b"x")
    net.stabilize()
    assert net.node("n1").log.commit == index  # n1 + n3 are a majority of three


def test_removed_leader_steps_down_once_its_removal_commits() -> None:
    """Dissertation §4.2.2: "the leader steps down (returns to follower state) once the
    Cnew entry is committed" and it no longer counts itself in majorities."""
    net = cluster()
    net.elect("n1")
    n1 = net.node("n1")
    index = n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n1"))
    net.process("n1")
    assert n1.role is Role.LEADER
    net.stabilize()
    assert n1.log.commit >= index
    assert role_of(n1) is Role.FOLLOWER
    before = len(sent_by(net, "n1"))
    net.run(4 * ET)
    assert net.leader() in {"n2", "n3"}
    assert role_of(n1) is Role.FOLLOWER
    assert not any(isinstance(m, VoteRequest) for m in sent_by(net, "n1")[before:])


def test_removed_leader_hands_over_without_an_election_timeout() -> None:
    """Dissertation §4.2.2 and §3.10: once its removal commits, the leader tells the others
    the commit index and sends TimeoutNow to a caught-up voter, so a new leader is elected at
    once instead of after an election timeout."""
    net = cluster()
    net.elect("n1")
    n1 = net.node("n1")
    n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n1"))
    net.stabilize()  # no ticks: only the hand-over can make a new leader
    assert role_of(n1) is Role.FOLLOWER
    assert any(isinstance(m, TimeoutNow) for m in sent_by(net, "n1"))
    assert net.leader() in {"n2", "n3"}


def test_removed_leader_does_not_count_itself_toward_committing_its_removal() -> None:
    """Dissertation §4.2.2: the removal commits on a majority of the new configuration."""
    net = cluster()
    net.elect("n1")
    n1 = net.node("n1")
    net.isolate("n3")
    index = n1.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "n1"))
    net.stabilize()  # n1 and n2 have it: a majority of {n1,n2,n3} but not of {n2,n3}
    assert net.node("n2").log.last_index() == index
    assert n1.log.commit < index
    assert n1.role is Role.LEADER
    net.heal()
    net.run(1)
    assert n1.log.commit == index
    assert role_of(n1) is Role.FOLLOWER


# =========================================================================================
# §7 Log compaction: InstallSnapshot (Figure 13)
# =========================================================================================
SNAPSHOT_DATA = b"state-of-the-machine"  # 20 bytes: 7 chunks of 3


def _n3_left_behind(net: Network) -> RaftNode:
    """n1 leads and commits three entries while n3 is cut off; returns n1."""
    net.elect("n1")
    net.isolate("n3")
    for d in (b"a", b"b", b"c"):
        net.node("n1").propose(d)
    net.stabilize()
    return net.node("n1")


def test_leader_sends_a_snapshot_in_chunks_to_a_follower_behind_its_compacted_log() -> None:
    """§7 (Figure 13): "the leader must occasionally send snapshots to followers that lag
    behind ... when the leader has already discarded the next log entry that it needs to send
    to a follower." The snapshot goes in chunks (offset, data, done)."""
    net = cluster(snapshot_chunk_bytes=3)
    n1 = _n3_left_behind(net)
    applied, snap = net.compact_at_applied("n1", SNAPSHOT_DATA)
    assert n1.log.first_index() == applied + 1
    net.heal()
    net.run(1)
    chunks = [m for m in sent_by(net, "n1") if isinstance(m, SnapshotRequest)]
    assert [m.offset for m in chunks] == list(range(0, len(SNAPSHOT_DATA), 3))
    assert [m.done for m in chunks] == [False] * 6 + [True]
    assert b"".join(m.data for m in chunks) == SNAPSHOT_DATA
    assert {(m.length, m.checksum) for m in chunks} == {(len(SNAPSHOT_DATA), snap.checksum)}
    assert net.peers["n3"].restored == [snap]
    assert net.peers["n3"].installed_data == [SNAPSHOT_DATA]
    assert net.node("n3").log.snapshot_index == applied
    # ... and it catches up with entries after the snapshot.
    index = n1.propose(b"d")
    net.stabilize()
    net.heartbeat("n1")
    assert [e.index for e in net.peers["n3"].applied] == [index]
    assert net.node("n3").log.commit == index
    assert n1.status().peers["n3"].state == "replicate"


NEWER_DATA = b"newer-state-of-the-machine"


def _transfer_under_way(net: Network) -> Snapshot:
    """n3 cut off while n1 commits and compacts (n3 then needs n1's snapshot); after the
    heal, two chunks of that snapshot reach n3. Returns the snapshot in flight."""
    n1 = _n3_left_behind(net)
    applied = n1.log.applied
    snap = net.snapshot_of(SnapshotMeta(applied, n1.log.term(applied) or 0,
                                        n1.membership_at(applied)), SNAPSHOT_DATA)
    n1.compact(snap, keep_from=applied)  # one trailing entry, as the runtime keeps some
    net.heal()
    net.tick("n1", n1.config.heartbeat_interval_ticks)
    for _ in range(4):  # two chunk/response round trips
        net.process_all()
        net.deliver()
    assert net.node("n1").status().peers["n3"].state == "snapshot"
    return snap


def _chunks_to_n3(net: Network) -> list[SnapshotRequest]:
    return [m for m in sent_by(net, "n1") if isinstance(m, SnapshotRequest) and m.to == "n3"]


def test_snapshot_transfer_finishes_with_its_snapshot_when_the_leader_takes_a_newer_one() -> None:
    """A newer snapshot does not restart the transfer in flight: with snapshots taken faster
    than one transfer takes, a restarted transfer never finishes (a fault run's new member
    never caught up). The log after the snapshot in flight is what the compaction holds."""
    net = cluster(snapshot_chunk_bytes=3)
    snap = _transfer_under_way(net)
    n1 = net.node("n1")
    assert n1.sending_snapshot()
    assert n1.compaction_hold() is None  # nothing after the snapshot yet
    n1.propose(b"d")
    net.stabilize(lambda m: "n3" not in (m.frm, m.to))
    hold = n1.compaction_hold()
    assert hold == snap.meta.index  # the term of its last entry checks the next append
    applied = n1.log.applied
    newer = net.snapshot_of(SnapshotMeta(applied, n1.log.term(applied) or 0,
                                         n1.membership_at(applied)), NEWER_DATA)
    n1.compact(newer, keep_from=hold)
    net.stabilize()
    chunks = _chunks_to_n3(net)
    assert {m.meta for m in chunks} == {snap.meta}
    assert [m.offset for m in chunks if m.offset == 0] == [0]  # never started over
    assert net.peers["n3"].restored == [snap]
    net.heartbeat("n1")
    assert data_of(net.peers["n3"].applied) == [b"d"]  # then entries: no second snapshot
    assert n1.status().peers["n3"].state == "replicate"
    assert not n1.sending_snapshot()
    assert n1.compaction_hold() is None


def test_snapshot_transfer_starts_over_with_the_newest_when_its_snapshot_is_gone() -> None:
    """When the store dropped the snapshot in flight (newer ones replaced it), the transfer
    starts over with the newest at once, not after a back-off."""
    net = cluster(snapshot_chunk_bytes=3)
    snap = _transfer_under_way(net)
    n1 = net.node("n1")
    n1.propose(b"d")
    net.stabilize(lambda m: "n3" not in (m.frm, m.to))
    _, newer = net.compact_at_applied("n1", NEWER_DATA)
    del net.snapshot_data[snap.checksum]
    net.stabilize()
    chunks = _chunks_to_n3(net)
    assert [m.meta for m in chunks if m.offset == 0] == [snap.meta, newer.meta]
    assert net.peers["n3"].restored == [newer]
    assert net.peers["n3"].installed_data == [NEWER_DATA]


def test_compaction_hold_is_what_a_live_follower_still_needs_and_none_once_it_is_silent() -> None:
    net = cluster()
    net.elect("n1")
    n1 = net.node("n1")
    assert n1.compaction_hold() is None  # every follower has everything
    net.isolate("n3")
    n1.propose(b"a")
    net.stabilize()
    behind = n1.status().peers["n3"].match
    assert n1.compaction_hold() == behind
    assert net.node("n2").compaction_hold() is None  # a follower holds nothing
    assert not n1.sending_snapshot()
    net.run(ET - 1, nodes=["n1", "n2"])
    assert n1.compaction_hold() == behind
    net.run(1, nodes=["n1", "n2"])  # n3 silent for an election timeout: hold nothing for it
    assert n1.compaction_hold() is None


def test_leader_sends_entries_not_a_snapshot_to_a_follower_within_the_trailing_log() -> None:
    """§7: a snapshot is needed only when "the leader has already discarded the next log entry
    that it needs to send"; entries kept before the snapshot serve slow followers."""
    net = cluster()
    net.elect("n1")
    net.node("n1").propose(b"a")
    net.stabilize()
    net.isolate("n3")  # n3 holds entries 1-2
    for d in (b"b", b"c"):
        net.node("n1").propose(d)
    net.stabilize()
    n1 = net.node("n1")
    applied = n1.log.applied
    meta = SnapshotMeta(applied, n1.log.term(applied) or 0, n1.membership_at(applied))
    n1.compact(net.snapshot_of(meta, SNAPSHOT_DATA), keep_from=2)
    assert (n1.log.first_index(), n1.log.snapshot_index) == (2, 4)
    net.heal()
    net.run(1)
    assert not any(isinstance(m, SnapshotRequest) for m in sent_by(net, "n1"))
    assert net.peers["n3"].restored == []
    assert data_of(net.peers["n3"].applied) == [b"a", b"b", b"c"]


def _snapshot_request(index: int, term: int, data: bytes = b"snap") -> SnapshotRequest:
    meta = SnapshotMeta(index, term, Membership(frozenset(THREE)))
    return SnapshotRequest(5, "n1", "n2", meta, 0, data, True, len(data), checksum_of(data))


def test_the_first_chunk_again_of_the_transfer_under_way_is_a_duplicate_not_a_restart() -> None:
    """Found by a helper: a leader resends its current chunk on a heartbeat response, often
    the first one before its answer is back, and the follower took every chunk at offset 0
    as a new transfer: it dropped and restaged what it had (41 restarts of one transfer in
    2 s). The same first chunk of the same snapshot is now a duplicate: answered with the
    offset reached, nothing dropped, and the transfer ends with one install."""
    data = b"snapshot-in-three-chunks"
    meta = SnapshotMeta(4, 2, Membership(frozenset(THREE)))

    def chunk(offset: int, end: int) -> SnapshotRequest:
        return SnapshotRequest(5, "n1", "n2", meta, offset, data[offset:end], end == len(data),
                               len(data), checksum_of(data))

    node = lone_node("n2", terms=(1, 1), hs=HardState(term=5))
    node.step(chunk(0, 8))
    node.advance(node.ready())
    node.step(chunk(0, 8))  # the resend
    rd = node.ready()
    assert not rd.snapshot_discard and rd.snapshot_writes == ()
    answers = of_type([*rd.messages, *rd.after_persist], SnapshotResponse)
    assert [(a.next_offset, a.done) for a in answers] == [(8, False)]
    node.advance(rd)
    node.step(chunk(8, 16))
    node.advance(node.ready())
    node.step(chunk(16, len(data)))
    rd = node.ready()
    assert rd.snapshot is not None and rd.snapshot.meta == meta
    node.advance(rd)
    assert node.log.snapshot_index == 4
    # A first chunk of another snapshot still starts a new transfer.
    other = SnapshotMeta(6, 2, Membership(frozenset(THREE)))
    node.step(SnapshotRequest(5, "n1", "n2", other, 0, b"x", False, 2, checksum_of(b"xy")))
    node.step(SnapshotRequest(5, "n1", "n2", meta, 0, b"x", False, 2, checksum_of(b"xz")))
    assert node.ready().snapshot_discard


def test_follower_installing_a_snapshot_keeps_its_log_suffix_when_the_last_entry_matches() -> None:
    """Figure 13, step 6: "If existing log entry has same index and term as snapshot's last
    included entry, retain log entries following it and reply." """
    node = lone_node("n2", terms=(1, 1, 2, 2, 3), hs=HardState(term=5))
    node.step(_snapshot_request(4, 2))
    rd = node.ready()
    assert rd.snapshot is not None and rd.snapshot.meta.index == 4
    assert rd.entries == (Entry(5, 3),)  # the kept suffix is written again after the snapshot
    assert rd.must_sync
    node.advance(rd)
    assert (node.log.first_index(), node.log.last_index()) == (5, 5)
    acks = of_type([*rd.after_persist, *drain(node)], AppendResponse)
    assert [(a.success, a.index) for a in acks] == [(True, 4)]


def test_follower_installing_a_snapshot_discards_a_conflicting_log() -> None:
    """Figure 13, step 7: "Discard the entire log" when the entry at the snapshot's last index
    does not match its term."""
    node = lone_node("n2", terms=(1, 1, 2, 2, 3), hs=HardState(term=5))
    node.step(_snapshot_request(4, 4))
    rd = node.ready()
    assert rd.entries == ()
    node.advance(rd)
    assert (node.log.last_index(), node.log.last_term()) == (4, 4)


def test_follower_does_not_install_a_snapshot_it_already_committed_past() -> None:
    """Figure 13: a snapshot older than the follower's commit index brings nothing new."""
    node = lone_node("n2", terms=(1, 1, 2), hs=HardState(term=5, commit=3))
    node.step(_snapshot_request(2, 1))
    rd = node.ready()
    assert rd.snapshot is None
    node.advance(rd)
    assert node.log.last_index() == 3
    acks = of_type([*rd.after_persist, *drain(node)], AppendResponse)
    assert [(a.success, a.index) for a in acks] == [(True, 3)]


# =========================================================================================
# Persistence contract (Figure 2: "Updated on stable storage before responding to RPCs")
# =========================================================================================
def test_vote_response_leaves_only_in_the_ready_after_the_vote_was_persisted() -> None:
    """Figure 2: currentTerm and votedFor are "updated on stable storage before responding to
    RPCs". The answer is in the after_persist of the Ready that persists the vote, never in
    the messages that may leave before the persist."""
    node = lone_node("n2")
    node.step(HeartbeatRequest(1, "n1", "n2", 0))
    rd1 = node.ready()
    assert rd1.hard_state == HardState(1, None, 0)
    node.step(VoteRequest(2, "n3", "n2", 0, 0, transfer=True))  # while rd1 is being persisted
    node.advance(rd1)
    rd2 = node.ready()
    assert rd2.hard_state == HardState(2, "n3", 0)
    assert rd2.must_sync
    assert of_type(rd1.after_persist, VoteResponse) == []
    assert of_type(rd2.messages, VoteResponse) == []
    assert of_type(rd2.after_persist, VoteResponse) == [VoteResponse(2, "n2", "n3", True)]
    node.advance(rd2)
    assert not of_type(node.ready().messages, VoteResponse)  # sent once, by the driver


def test_append_response_leaves_only_in_the_ready_after_the_entries_were_persisted() -> None:
    """Figure 2: the log is updated on stable storage before responding to AppendEntries."""
    node = lone_node("n2")
    node.step(HeartbeatRequest(1, "n1", "n2", 0))
    rd1 = node.ready()
    node.step(AppendRequest(1, "n1", "n2", 0, 0, (Entry(1, 1), Entry(2, 1)), 0))
    node.advance(rd1)
    assert of_type(rd1.messages, AppendResponse) == []
    rd2 = node.ready()
    assert rd2.entries == (Entry(1, 1), Entry(2, 1))
    assert of_type(rd2.messages, AppendResponse) == []
    assert of_type(rd2.after_persist, AppendResponse) == [AppendResponse(1, "n2", "n1", True, 2)]


def test_rejection_of_a_stale_leader_waits_until_the_new_term_is_persisted() -> None:
    """Figure 2: currentTerm too is on stable storage before any RPC answer reveals it."""
    node = lone_node("n2", hs=HardState(term=1))
    node.step(VoteRequest(2, "n3", "n2", 0, 0))  # term 2, not yet on disk
    node.step(AppendRequest(1, "n1", "n2", 0, 0, (), 0))  # the old leader of term 1
    rd1 = node.ready()
    assert rd1.hard_state is not None and rd1.hard_state.term == 2
    assert of_type(rd1.messages, AppendResponse) == []
    assert of_type(rd1.after_persist, AppendResponse) == [AppendResponse(2, "n2", "n1", False, 0)]


def test_candidate_counts_its_own_vote_only_after_advance() -> None:
    """Figure 2: the candidate "votes for self" — a vote that counts once it is on disk."""
    single = lone_node("n1", ["n1"])
    single.campaign()
    assert single.role is Role.CANDIDATE  # the pre-vote of one node wins at once
    rd = single.ready()
    assert rd.hard_state == HardState(1, "n1", 0)
    assert single.role is Role.CANDIDATE
    single.advance(rd)
    assert role_of(single) is Role.LEADER

    node = lone_node("n1", pre_vote=False)
    node.campaign()
    rd = node.ready()
    node.step(VoteResponse(1, "n2", "n1", granted=True))
    assert node.role is Role.CANDIDATE  # n2 alone is not a majority of three
    node.advance(rd)
    assert role_of(node) is Role.LEADER


def test_leader_counts_itself_toward_commit_only_after_advance() -> None:
    """Figure 2: an entry counts as stored on the leader once the leader persisted it."""
    net = cluster()
    net.elect("n1")
    net.isolate("n3")
    n1 = net.node("n1")
    index = n1.propose(b"x")
    rd = net.send_ready("n1")
    assert rd is not None and rd.entries[-1].index == index
    net.stabilize()  # n2 stores and acknowledges; n1 is still persisting
    assert n1.status().peers["n2"].match == index
    assert n1.log.commit == index - 1
    net.advance("n1", rd)
    assert n1.log.commit == index
    net.stabilize()
    assert data_of(net.peers["n1"].applied) == [b"x"]


def test_commit_only_hard_state_changes_need_no_sync() -> None:
    """Figure 2 keeps commitIndex volatile: a Ready that only moves it need not fsync."""
    follower = lone_node("n2", terms=(1, 1), hs=HardState(term=1))
    follower.step(HeartbeatRequest(1, "n1", "n2", 2))
    rd = follower.ready()
    assert rd.hard_state == HardState(1, None, 2)
    assert (rd.entries, rd.must_sync) == ((), False)
    assert [e.index for e in rd.committed_entries] == [1, 2]

    leader = lone_node("n1", ["n1"])
    leader.campaign()
    drain(leader)
    leader.propose(b"x")
    rd1 = leader.ready()
    assert rd1.must_sync and rd1.entries
    leader.advance(rd1)
    rd2 = leader.ready()
    assert rd2.hard_state is not None and rd2.hard_state.commit == 2
    assert (rd2.entries, rd2.must_sync) == ((), False)
    assert data_of(rd2.committed_entries) == [b"x"]


def test_committed_entries_are_handed_out_only_once_persisted_locally() -> None:
    """A follower told the commit index before its own write finished applies nothing yet."""
    node = lone_node("n2", hs=HardState(term=1))
    node.step(AppendRequest(1, "n1", "n2", 0, 0, (Entry(1, 1, data=b"x"),), 1))
    rd1 = node.ready()
    assert rd1.entries and rd1.committed_entries == ()
    node.advance(rd1)
    assert data_of(node.ready().committed_entries) == [b"x"]


def test_ready_cannot_be_taken_twice_nor_advanced_out_of_order() -> None:
    node = lone_node("n2")
    node.step(HeartbeatRequest(1, "n1", "n2", 0))
    rd = node.ready()
    assert not node.has_ready()
    with pytest.raises(RaftError):
        node.ready()
    node.advance(rd)
    with pytest.raises(RaftError):
        node.advance(rd)


def test_boot_state_is_restored_as_persisted() -> None:
    """Figure 2: a restarted server resumes with its persisted term, vote and log."""
    boot = BootState(
        HardState(term=4, vote="n3", commit=1),
        Snapshot(SnapshotMeta(0, 0, boot_state(THREE).snapshot.meta.membership)),
        tuple(log_of_terms(1, 4)),
    )
    node = RaftNode(Config("n2"), boot, random.Random(0))
    assert (node.term, node.vote, node.log.commit, node.log.last_index()) == (4, "n3", 1, 2)
    node.step(VoteRequest(4, "n1", "n2", 9, 4))
    replies = of_type(drain(node), VoteResponse)
    assert [r.granted for r in replies] == [False]  # already voted for n3 in term 4


def _run_random_schedule(net: Network, rng: random.Random, steps: int) -> dict[int, str]:
    """Random ticks, proposals, deliveries, losses and partitions; returns term -> leader."""
    leaders: dict[int, str] = {}
    for step in range(steps):
        action = rng.random()
        if action < 0.4:
            net.tick(rng.choice(THREE))
        elif action < 0.5 and (lead := net.leader()) is not None:
            net.node(lead).propose(b"%d" % step)
        elif action < 0.55:
            net.drop(lambda m: rng.random() < 0.3)
        elif action < 0.57:
            net.isolate(rng.choice(THREE))
        elif action < 0.62:
            net.heal()
        else:
            net.deliver(lambda m: rng.random() < 0.7)
        net.process_all()
        for nid in THREE:
            node = net.node(nid)
            if node.role is Role.LEADER:
                assert leaders.setdefault(node.term, nid) == nid, f"two leaders in {node.term}"
    return leaders


@pytest.mark.parametrize("seed", range(40))
def test_random_schedules_keep_replies_behind_the_disk_and_the_logs_consistent(
    seed: int,
) -> None:
    """Figure 3's Election Safety and State Machine Safety, plus the persistence contract
    (checked by the harness on every Ready), under seeded random delivery, loss, partitions
    and ticks; once the network heals, the cluster elects a leader and commits again."""
    net = Network(THREE, election_timeout_ticks=ET, seed=seed)
    leaders = _run_random_schedule(net, random.Random(seed), 600)
    net.heal()
    net.run(4 * ET)
    lead = net.leader()
    assert lead is not None, "no leader after healing"
    assert leaders.get(net.node(lead).term, lead) == lead
    net.node(lead).propose(b"final")
    net.run(2)
    histories = [net.peers[nid].applied for nid in THREE]
    assert histories[0] == histories[1] == histories[2]
    assert data_of(histories[0])[-1] == b"final"
