"""Membership with real processes: join as a learner, automatic promotion, removal of a live
or dead node, replacing a failed node, and a removed node that cannot disrupt the cluster."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from raftkv.core.types import HardState
from raftkv.localcluster import (
    FAST_TIMING,
    LocalCluster,
    NodeProc,
    http_json,
    reserve_port,
    wait_until,
)
from raftkv.ports import NodeIdentity
from raftkv.runtime.boot import bootstrap_entries
from raftkv.runtime.process import bound_socket
from raftkv.runtime.startup import FORMAT_VERSION
from storage.lmdb_store import LmdbRaftStorage
from tests.support.clusters import STEADY_LEADER, running_cluster
from tests.support.peers import answering_as

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path, request=request) as c:
        yield c



def members(c: LocalCluster, node: NodeProc) -> dict[str, dict[str, object]]:
    code, body, _ = http_json("GET", f"{node.http}/cluster")
    assert code == 200, body
    return {m["id"]: m for m in body["members"]}


def rejoin_empty(c: LocalCluster, node: NodeProc, via: NodeProc) -> None:
    """The way back for a lost data dir: `node`, removed already, is stopped, emptied and
    started with RAFTKV_JOIN through `via`, until it is a voter again."""
    c.kill(node)
    c.wipe(node)
    c.start(node, join=via.http)
    wait_until(lambda: members(c, c.wait_for_leader()).get(node.node_id, {}).get("voter")
               is True, 30, f"{node.node_id} to join again and be promoted")


def test_new_node_joins_as_learner_is_promoted_and_serves_data(cluster: LocalCluster) -> None:
    for i in range(20):
        cluster.put(f"k{i}", i)
    new = cluster.add_node()
    leader = cluster.wait_for_leader()
    cluster.start(new, join=leader.http)
    wait_until(lambda: members(cluster, leader).get(new.node_id, {}).get("voter") is True, 30,
               "the new node to be promoted to voter")
    last = cluster.put("after-join", "yes")
    cluster.wait_applied(new, last)
    for i in range(20):
        code, body, _ = http_json("GET", f"{new.http}/keys/k{i}?consistency=stale")
        assert code == 200 and body["value"] == i
    code, body, _ = http_json("GET", f"{new.http}/keys/after-join")  # linearizable, forwarded
    assert code == 200 and body["value"] == "yes"
    # It rejoins with its identity after a restart, without asking to join again.
    cluster.kill(new)
    cluster.start(new, join=leader.http)
    wait_until(lambda: cluster.status(new)["leader"] is not None, 20, "the node to rejoin")
    assert "event=join_ignored" in new.log_text()


def test_dead_node_is_removed_and_replaced_while_writes_continue(cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    dead = next(n for n in cluster.nodes if n is not leader)
    cluster.kill(dead)
    cluster.put("before", 1)
    code, body, _ = http_json("DELETE", f"{leader.http}/cluster/members/{dead.node_id}",
                              timeout_s=10)
    assert code == 200, body
    assert dead.node_id not in members(cluster, leader)
    cluster.put("between", 2)
    replacement = cluster.add_node()
    cluster.start(replacement, join=leader.http)
    wait_until(lambda: members(cluster, leader).get(replacement.node_id, {}).get("voter"), 30,
               "the replacement to become a voter")
    last = cluster.put("after", 3)
    cluster.wait_applied(replacement, last)
    for key, value in (("before", 1), ("between", 2), ("after", 3)):
        code, body, _ = http_json("GET", f"{replacement.http}/keys/{key}?consistency=stale")
        assert code == 200 and body["value"] == value


def test_removed_node_cannot_disrupt_the_cluster(steady_cluster: LocalCluster) -> None:
    cluster = steady_cluster
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    campaigns = victim.log_text().count("event=became_pre_candidate")
    cluster.wait_replicated(leader)
    code, body, _ = http_json("DELETE", f"{leader.http}/cluster/members/{victim.node_id}",
                              timeout_s=10)
    assert code == 200, body
    term = cluster.status(leader)["term"]
    # The removed node keeps running, stops hearing from the leader and may campaign: the
    # others must ignore it (pre-vote + leader lease), so the leader and term stay.
    for i in range(30):
        cluster.put(f"x{i}", i)
    # It campaigns once its election timeout runs out (the leader stops sending to it as it
    # appends the removal, which never reaches it): wait for that, elections being slow here.
    wait_until(lambda: victim.log_text().count("event=became_pre_candidate") > campaigns, 20,
               "the removed node to campaign")
    wait_until(lambda: cluster.status(victim)["role"] in ("follower", "pre_candidate",
                                                          "candidate"), 5, "victim alive")
    assert cluster.leader([n for n in cluster.nodes if n is not victim]) is leader
    assert cluster.status(leader)["term"] == term


def test_leadership_transfer_moves_the_leader_without_an_election_timeout(
        cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    cluster.put("t", 1)
    code, body, _ = http_json("POST", f"{leader.http}/cluster/leader", timeout_s=10)
    assert code == 200, body
    new_id = body["leader"]
    assert new_id != leader.node_id
    new = cluster.node(new_id)
    assert cluster.status(new)["role"] == "leader"
    cluster.put("t", 2)


def test_membership_changes_sent_to_a_follower_go_to_the_leader_over_the_peer_link(
        cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    victim = next(n for n in cluster.nodes if n is not leader and n is not follower)
    code, body, _ = http_json("DELETE", f"{follower.http}/cluster/members/{victim.node_id}",
                              timeout_s=10)
    assert code == 200, body
    assert victim.node_id not in members(cluster, leader)
    code, body, _ = http_json("DELETE", f"{follower.http}/cluster/members/nobody", timeout_s=10)
    assert code == 409 and body["error"] == "membership_change_rejected", body
    new = cluster.add_node()
    cluster.start(new, join=follower.http)  # the joiner asks a follower
    wait_until(lambda: members(cluster, leader).get(new.node_id, {}).get("voter"), 30,
               "the new node to be promoted to voter")


def test_cli_members_promote_makes_a_learner_a_voter(cluster: LocalCluster) -> None:
    import subprocess
    import sys

    leader = cluster.wait_for_leader()
    new = cluster.add_node()
    cluster.start(new, join=leader.http)
    wait_until(lambda: new.node_id in members(cluster, leader), 20, "the learner to be added")
    result = subprocess.run([sys.executable, "-m", "raftkv", "members", "promote", new.node_id,
                             "--urls", leader.http], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert members(cluster, leader)[new.node_id]["voter"] is True
    missing = subprocess.run([sys.executable, "-m", "raftkv", "members", "promote", "nobody",
                              "--urls", leader.http], capture_output=True, text=True,
                             timeout=30, check=False)
    assert missing.returncode == 1 and "not a member" in missing.stderr


def test_a_new_member_with_a_members_address_is_refused(cluster: LocalCluster) -> None:
    """Regression: `raftkv members add n8 --address <n1's raft address>` was accepted, and
    the others dialled n1 as n8 until someone removed it."""
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    for asked in (leader, follower):
        code, body, _ = http_json("POST", f"{asked.http}/cluster/join",
                                  {"id": "n8", "address": follower.raft}, timeout_s=10)
        assert code == 409 and body["error"] == "membership_change_rejected", body
        assert f"member {follower.node_id}" in body["message"], body
    assert "n8" not in members(cluster, leader)


def test_a_join_naming_an_id_is_refused_unless_that_node_answers_at_its_address(
        cluster: LocalCluster) -> None:
    """Found by a review (a documented gap): a join naming its id (what RAFTKV_JOIN sends, and
    `raftkv members add`) was not probed, so an address where nothing listens, or another
    node does, was added as a learner that never caught up, until an operator removed it.
    Now nothing answering is a 503 (a node started with RAFTKV_JOIN asks again), another node
    answering a 409; and a node refused so joins once the members reach it."""
    leader = cluster.wait_for_leader()
    join = f"{leader.http}/cluster/join"
    with contextlib.closing(reserve_port()) as held:  # bound, never listening: refused
        nowhere = f"127.0.0.1:{held.getsockname()[1]}"
        code, body, _ = http_json("POST", join, {"id": "n4", "address": nowhere}, timeout_s=10)
        assert code == 503 and body["error"] == "unavailable", body
        assert f"no raftkv node answered at {nowhere}" in body["message"], body
        assert "probe" not in body, body  # it may listen soon: a joining node asks again
        with answering_as(cluster.token, "n5") as other:
            code, body, _ = http_json("POST", join, {"id": "n4", "address": other},
                                      timeout_s=10)
        assert code == 409 and body["error"] == "membership_change_rejected", body
        assert f"the node at {other} answers as n5, not n4" in body["message"], body
        assert body["probe"] == "mismatch", body  # final: a joining node stops on it
        # A node started with RAFTKV_JOIN that advertises a raft address nobody listens at.
        new = cluster.add_node()
        assert new.node_id == "n4"
        new.env["RAFTKV_RAFT_ADVERTISE"] = nowhere
        cluster.start(new, join=leader.http)
        wait_until(lambda: "event=join_retrying" in new.log_text(), 15,
                   "the refused join to be asked again")
        line = next(x for x in new.log_text().splitlines() if "event=join_retrying" in x)
        assert "answered 503" in line and "no raftkv node answered" in line, line
        assert new.running
        cluster.kill(new)
    assert "n4" not in members(cluster, leader)
    del new.env["RAFTKV_RAFT_ADVERTISE"]  # its own address: its join goes on, and through
    cluster.start(new, join=leader.http)
    wait_until(lambda: members(cluster, leader).get("n4", {}).get("voter") is True, 30,
               "n4 to join at its own address and be promoted")


def test_a_joining_node_that_another_node_answers_for_stops_at_once_saying_why(
        cluster: LocalCluster) -> None:
    """Found by a review: a join refused because its probe found another node at the joining
    node's raft address (a 409 as final as a refused token: asking again finds the same) was
    asked again for 60 s like a refusal that may pass, and logged cut at 200 bytes. The 409
    is marked "probe": "mismatch" now: the node stops at once (exit 2), logging the member's
    whole message and what to check."""
    leader = cluster.wait_for_leader()
    new = cluster.add_node()
    with answering_as(cluster.token, "n9") as other:
        new.env["RAFTKV_RAFT_ADVERTISE"] = other
        cluster.start(new, join=leader.http)
        assert new.proc is not None
        assert new.proc.wait(timeout=20) == 2
    log = new.log_text()
    nid = new.node_id
    assert f"event=join_refused node={nid} reason=wrong_identity" in log, log
    assert (f"the node at {other} answers as n9, not {nid}: give {nid}'s own raft address"
            in log), log
    assert "RAFTKV_RAFT_ADVERTISE" in log and "event=join_retrying" not in log, log
    assert nid not in members(cluster, leader)


def test_a_promotion_naming_another_address_is_refused_not_a_silent_move(
        cluster: LocalCluster) -> None:
    """Found by a helper: `members add n8 --address NEW` for a learner n8 at OLD was taken as
    a promotion at OLD, NEW silently ignored; it is refused like the same request for a
    voter or with voter false."""
    leader = cluster.wait_for_leader()
    with answering_as(cluster.token, "n8") as old:  # what n8's addition probes
        code, body, _ = http_json("POST", f"{leader.http}/cluster/join",
                                  {"id": "n8", "address": old, "voter": False}, timeout_s=10)
        assert code == 200, body
        for voter in (True, False):
            code, body, _ = http_json("POST", f"{leader.http}/cluster/join",
                                      {"id": "n8", "address": "127.0.0.1:10", "voter": voter},
                                      timeout_s=10)
            assert code == 409 and "another address; remove it first" in body["message"], body
    assert members(cluster, leader)["n8"]["raft_address"] == old
    assert members(cluster, leader)["n8"]["voter"] is False


def test_a_voter_whose_data_was_lost_is_refused_until_it_is_removed(
        cluster: LocalCluster) -> None:
    """Found by a helper: a voter wiped and started again with RAFTKV_JOIN was taken back at
    once (already a member), with an empty log, and its vote let a node that had missed an
    acknowledged write be elected: the write was gone on every node. Now the node refuses to
    join before it lets any peer in (so it casts no vote), and says to remove it first; once
    removed, it joins empty and catches up."""
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    index = cluster.put("acknowledged", "kept")
    cluster.wait_applied(victim, index)
    cluster.kill(victim)
    cluster.wipe(victim)

    earlier = len(victim.log_text())
    # RAFTKV_PEERS beside RAFTKV_JOIN, as docker-compose gives every node: its peers were
    # linked (and their vote requests answered) before the check ran, found by a review.
    victim.env["RAFTKV_PEERS"] = cluster.peers
    cluster.start(victim, join=leader.http)
    assert victim.proc is not None
    assert victim.proc.wait(timeout=30) == 2
    victim.env.clear()
    log = victim.log_text()[earlier:]
    assert "event=join_refused" in log and "reason=voter_without_log" in log
    assert f"raftkv members remove {victim.node_id}" in log
    assert "event=became_follower" not in log  # it took no part in any term
    assert members(cluster, leader)[victim.node_id]["voter"] is True  # nothing changed

    code, body, _ = http_json("DELETE", f"{leader.http}/cluster/members/{victim.node_id}",
                              timeout_s=10)
    assert code == 200, body
    rejoin_empty(cluster, victim, via=leader)
    last = cluster.put("after", 1)
    cluster.wait_applied(victim, last)
    code, body, _ = http_json("GET", f"{victim.http}/keys/acknowledged?consistency=stale")
    assert code == 200 and body["value"] == "kept"


class _JoinAnswerWithheld:
    """A member's HTTP face that passes every request on to it but never answers the join:
    the join is applied and the leader streams its log to the new node, which still waits
    for its answer (the moment a kill used to leave Raft state without an identity)."""

    def __init__(self, member: str) -> None:
        self.release = threading.Event()
        self.joined = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else None
                code, body, _ = http_json(self.command, f"{member}{self.path}", raw_body=raw,
                                          timeout_s=30)
                if self.path == "/cluster/join":
                    outer.joined.set()
                    outer.release.wait(60)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _relay  # noqa: N815 (http.server names)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_node_stopped_mid_join_restarts_and_finishes_it(cluster: LocalCluster) -> None:
    """The identity is stored when the join learns the cluster, before any Raft state: a
    node killed while its join's answer was on the way used to be refused at every restart
    ('Raft state but no identity'), even with the RAFTKV_JOIN the message asked for."""
    leader = cluster.wait_for_leader()
    for i in range(50):
        cluster.put(f"k{i}", i)
    withheld = _JoinAnswerWithheld(leader.http)
    try:
        new = cluster.add_node()
        cluster.start(new, join=withheld.url)
        assert withheld.joined.wait(30), "the join never reached the member"
        wait_until(lambda: "event=became_follower" in new.log_text(), 30,
                   "the leader's log to reach the joining node")
        assert "event=joined" not in new.log_text()
        cluster.kill(new)
    finally:
        withheld.close()
    cluster.start(new, join=leader.http)
    wait_until(lambda: members(cluster, leader).get(new.node_id, {}).get("voter") is True, 30,
               "the node to finish joining and be promoted")
    last = cluster.put("after", 1)
    cluster.wait_applied(new, last)
    code, body, _ = http_json("GET", f"{new.http}/keys/k7?consistency=stale")
    assert code == 200 and body["value"] == 7


def test_a_node_restarted_on_another_address_is_warned_the_members_dial_the_old_one(
        cluster: LocalCluster) -> None:
    """Found by a helper: n3 restarted with a new raft address started without a word and
    was never reached again (the members dial the address in the membership). Its start now
    says so, and so does a RAFTKV_PEERS that disagrees with the membership; listening on
    0.0.0.0 at the same port is no move."""
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    other = next(n for n in cluster.nodes if n not in (leader, victim))
    port = victim.raft_port

    # Listening on 0.0.0.0:<port> needs the port free on every address, and a port the
    # victim has let go of may meanwhile be handed to another socket (it was once in CI:
    # "Address already in use" after 10 s of retries). Sockets bound to the ports with
    # SO_REUSEADDR that never listen keep them from being handed out (on 127.0.0.1: from
    # connections; on 0.0.0.0, once the victim no longer listens: from any bind) and do
    # not stop the node, whose listener sets SO_REUSEADDR too, from listening on them.
    held = contextlib.ExitStack()
    held.enter_context(held_port("127.0.0.1", port))
    moved = f"127.0.0.1:{held.enter_context(held_port('0.0.0.0', 0)).getsockname()[1]}"
    wildcard_held: list[socket.socket] = []

    def restart_with(**env: str) -> str:
        cluster.terminate(victim)
        if not wildcard_held:
            wildcard_held.append(held.enter_context(held_port("0.0.0.0", port)))
        victim.env.clear()
        victim.env.update(env)
        earlier = len(victim.log_text())
        cluster.start(victim)
        wait_until(lambda: "event=node_started" in victim.log_text()[earlier:], 20, "a start")
        return victim.log_text()[earlier:]

    with held:
        peers = cluster.peers.replace(other.raft, "127.0.0.1:9")
        log = restart_with(RAFTKV_RAFT_ADDR=moved, RAFTKV_RAFT_ADVERTISE=moved,
                           RAFTKV_PEERS=peers)
        assert (f"event=address_mismatch node={victim.node_id} stored={victim.raft} "
                f"configured={moved}") in log
        assert (f"event=peers_setting_ignored node={victim.node_id} member={other.node_id} "
                f"stored={other.raft} configured=127.0.0.1:9") in log
        # As in docker-compose: every interface, a new port, RAFTKV_PEERS unchanged.
        wildcard_moved = "0.0.0.0:" + moved.rpartition(":")[2]
        log = restart_with(RAFTKV_RAFT_ADDR=wildcard_moved)
        assert f"stored={victim.raft} configured={wildcard_moved}" in log
        log = restart_with(RAFTKV_RAFT_ADDR=f"0.0.0.0:{port}")
        assert "event=address_mismatch" not in log
        wait_until(lambda: cluster.status(victim)["leader"] is not None, 20,
                   "it to be reached")


def held_port(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (port 0: a free one) with SO_REUSEADDR that never
    listens."""
    return bound_socket(host, port, socket.AF_INET)


def test_a_join_that_began_with_another_cluster_is_not_resumed_with_this_one(
        cluster: LocalCluster) -> None:
    """A data dir whose join began with cluster c-other (its identity says so) and that
    knows no member is refused when RAFTKV_JOIN now names a member of another cluster: it
    may hold that cluster's term and vote (found by a review)."""
    leader = cluster.wait_for_leader()
    new = cluster.add_node()
    (new.data_dir / "raft").mkdir(parents=True)
    with LmdbRaftStorage(new.data_dir / "raft") as storage:
        storage.set_identity(NodeIdentity(new.node_id, "c-other", FORMAT_VERSION))
    cluster.start(new, join=leader.http)
    assert new.proc is not None
    assert new.proc.wait(timeout=30) == 2
    log = new.log_text()
    assert "event=join_refused" in log and "reason=other_cluster" in log
    assert "belongs to cluster c-other" in log
    assert new.node_id not in members(cluster, leader)


def test_a_removed_node_learns_it_was_removed_and_says_so(cluster: LocalCluster) -> None:
    """Found by a helper: a removed node stayed a pre-candidate for ever, answering 'no
    leader is known yet; retry', with nothing in its log or status to say why. The members
    now refuse its handshakes as removed_member: it logs event=removed_from_cluster and its
    /status says removed_from_cluster; the others do not."""
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    cluster.wait_replicated(leader)
    code, body, _ = http_json("DELETE", f"{leader.http}/cluster/members/{victim.node_id}",
                              timeout_s=10)
    assert code == 200, body
    wait_until(lambda: "event=removed_from_cluster" in victim.log_text(), 30,
               "the removed node to be told")
    assert cluster.status(victim)["extra"]["removed_from_cluster"] is True
    for node in cluster.nodes:
        if node is not victim:
            assert cluster.status(node)["extra"]["removed_from_cluster"] is False
            assert "event=removed_from_cluster" not in node.log_text()



def test_a_join_asked_again_before_the_addition_committed_is_told_to_retry(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Asked again while the member's addition is appended and not yet committed (here: both
    followers paused), the leader said "already a member" with its commit index, below the
    addition, which a new leader could yet overwrite (found by reviews): it is a 503 "retry"
    now, and once the addition committed, "already a member" with an index past it. The
    first request's probe gets 2 s (half its 4 s timeout: with 1 s, a probe's 0.5 s could
    run out under load); the election timeout (6-12 s, the check-quorum step-down 6 s after
    the pause at the earliest) keeps the leader a leader through the 4 s request and the
    next one, answered at once."""
    with running_cluster(tmp_path, request=request, timeout_s=30,
                         env={"RAFTKV_ELECTION_TICKS": "300"}) as cluster:
        _join_asked_again(cluster)


def _join_asked_again(cluster: LocalCluster) -> None:
    leader = cluster.wait_for_leader()
    followers = [n for n in cluster.nodes if n is not leader]
    with answering_as(cluster.token, "n9") as address:  # what n9's addition probes
        body = {"id": "n9", "address": address, "voter": False}
        join = f"{leader.http}/cluster/join?timeout=4"
        for n in followers:
            cluster.pause(n)
        try:
            code, answer, _ = http_json("POST", join, body)
            assert code == 504, answer  # appended, not committed
            added_at = cluster.status(leader)["last_index"]
            code, answer, _ = http_json("POST", join, body)
            assert code == 503 and answer["error"] == "unavailable", answer
            assert "not committed yet" in answer["message"]
        finally:
            for n in followers:
                cluster.resume(n)
        wait_until(lambda: cluster.status(leader)["commit_index"] >= added_at, 20,
                   "the addition to commit")
        code, answer, _ = http_json("POST", join, body)
        assert code == 200, answer
        assert answer["index"] >= added_at


def test_a_joined_node_restarted_before_it_applied_its_addition_waits_for_it_again(
        cluster: LocalCluster) -> None:
    """Found by a review: a joined node stopped after it had stored part of the cluster's log,
    and not yet its own addition, served at once when restarted (a restart is no join), from
    that partial state. The data dir keeps a joining mark until the node applied its own
    addition.
    Here the node can never be reached (at its advertised raft address a stand-in answers
    the join's probe as it, and drops the leader's log), and it is given the cluster's first
    entries by hand, as if it had stored them: it must not listen for HTTP."""
    leader = cluster.wait_for_leader()
    new = cluster.add_node()
    with answering_as(cluster.token, new.node_id) as nobody:
        new.env["RAFTKV_RAFT_ADVERTISE"] = nobody
        cluster.start(new, join=leader.http)
        wait_until(lambda: "event=joined" in new.log_text(), 30, "the join")
        cluster.kill(new)
        peers = dict(p.split("=", 1) for p in cluster.peers.split(","))
        first = bootstrap_entries(peers)
        with LmdbRaftStorage(new.data_dir / "raft") as storage:
            assert storage.joining()
            storage.save(HardState(term=1, vote=None, commit=len(first)), first)
        earlier = len(new.log_text())
        cluster.start(new, join=leader.http)  # ignored: the data dir knows the members
        wait_until(lambda: "event=catching_up" in new.log_text()[earlier:], 30, "its start")
        with pytest.raises(ConnectionRefusedError):
            http_json("GET", f"{new.http}/health", timeout_s=3)
        assert "event=node_started" not in new.log_text()[earlier:]


def test_a_node_stopped_before_its_join_was_answered_waits_for_its_addition_when_restarted(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Found by a review: the mark of a join (then an index) was stored only when the join's
    answer came, but the leader sends the log to a node as soon as it has appended its
    addition. A node stopped in between (here: killed while its addition cannot commit,
    both followers paused, after it stored the log) served at once when restarted, from that
    partial state. It is restarted where the members cannot reach it (another raft port than
    the membership's), so it can never apply its addition: it must not listen for HTTP."""
    with running_cluster(tmp_path, request=request,
                         env={"RAFTKV_ELECTION_TICKS": "150"}) as cluster:
        leader = cluster.wait_for_leader()
        followers = [n for n in cluster.nodes if n is not leader]
        new = cluster.add_node()
        for n in followers:
            cluster.pause(n)
        try:
            cluster.start(new, join=leader.http)

            def stored_by_new() -> bool:
                status = cluster.status(leader)
                peer = status["extra"]["peers"].get(new.node_id)
                return peer is not None and peer["match"] >= status["last_index"]

            wait_until(stored_by_new, 20, "the new node to store the leader's log")
            cluster.kill(new)
        finally:
            for n in followers:
                cluster.resume(n)
        with LmdbRaftStorage(new.data_dir / "raft") as storage:
            assert storage.last_index() > 0
        with held_port("127.0.0.1", 0) as elsewhere:  # held: see held_port's users above
            moved = f"127.0.0.1:{elsewhere.getsockname()[1]}"
            new.env.update(RAFTKV_RAFT_ADDR=moved, RAFTKV_RAFT_ADVERTISE=moved)
            earlier = len(new.log_text())
            cluster.start(new, join=leader.http)  # ignored: the data dir knows the members
            wait_until(lambda: "event=catching_up" in new.log_text()[earlier:]
                       or "event=node_started" in new.log_text()[earlier:], 30, "its start")
            assert "event=node_started" not in new.log_text()[earlier:]
            with pytest.raises(ConnectionRefusedError):
                http_json("GET", f"{new.http}/health", timeout_s=3)


def test_a_removal_asked_through_the_node_it_removes_is_answered(cluster: LocalCluster) -> None:
    """A removal asked through the node it removes used to commit with its answer lost: the
    leader dropped its link to that node as it appended the change, so the FORWARD_RESULT
    had no way back and the client got 504 commit_timeout for a removal that was done. The
    members keep their link to a node until they applied its removal, and the leader tells
    the node the removal's index (it never applies the entry itself)."""
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    code, body, _ = http_json("DELETE", f"{victim.http}/cluster/members/{victim.node_id}",
                              timeout_s=15)
    assert code == 200, body
    assert victim.node_id not in members(cluster, leader)
    # the removal's own index (the removed node never applies it: the leader tells it)
    assert body["index"] > cluster.status(victim)["commit_index"]
    assert body["index"] <= cluster.status(leader)["commit_index"]
    # the link is dropped once the removal is applied: the node is told, as any removed node
    wait_until(lambda: "event=removed_from_cluster" in victim.log_text(), 30,
               "the removed node to be told")
    cluster.put("after", 1)


def test_a_join_naming_the_node_itself_is_refused_at_once(cluster: LocalCluster) -> None:
    """A node told to join through its own HTTP address (it listens only once a member) used
    to retry its refused port for 60 s and fail with 'connection refused'. Now it stops at
    once, exit 2, saying to name a running member; a join that keeps failing says why every
    few seconds instead of only at the end."""
    new = cluster.add_node()
    cluster.start(new, join=new.http)
    assert new.proc is not None
    assert new.proc.wait(timeout=20) == 2
    log = new.log_text()
    assert "event=join_refused" in log and "reason=join_names_this_node" in log, log[-2000:]
    assert "name a running member" in log
    assert "event=join_failed" not in log


def test_a_join_that_keeps_failing_says_why_before_it_gives_up(cluster: LocalCluster) -> None:
    new = cluster.add_node()
    with contextlib.closing(reserve_port()) as held:  # bound, never listening: refused
        cluster.start(new, join=f"http://127.0.0.1:{held.getsockname()[1]}")
        wait_until(lambda: "event=join_retrying" in new.log_text(), 15,
                   "the join to say why it retries")
        assert new.running  # it goes on trying (JOIN_TIMEOUT_S), it does not give up yet
        cluster.kill(new)
    line = next(x for x in new.log_text().splitlines() if "event=join_retrying" in x)
    assert "refused" in line.lower() and "gives_up_in_s=" in line, line


def test_a_removal_through_the_node_it_removes_outlasting_its_election_timeout_is_answered(
        steady_cluster: LocalCluster) -> None:
    """Found by the review of the fix above: the leader stops heartbeating the node as it
    appends the removal, so that node's election timer (not the forward timeout) ran out
    first when the commit took longer: it became a pre-candidate, its leader None, and its
    forwarded removal failed 504 'the leader changed while forwarding' though the removal
    committed with the same leader in the same term. The node now waits for the answer to its
    own removal while no other leader is known."""
    cluster = steady_cluster
    leader = cluster.wait_for_leader()
    victim, other = [n for n in cluster.nodes if n is not leader]
    cluster.terminate(victim)  # the victim alone gets quick elections (200-400 ms)
    cluster.extra_env["RAFTKV_ELECTION_TICKS"] = "10"
    try:
        cluster.start(victim)
    finally:
        cluster.extra_env["RAFTKV_ELECTION_TICKS"] = STEADY_LEADER["RAFTKV_ELECTION_TICKS"]
    cluster.wait_for_ready(victim)
    leader = cluster.wait_for_leader()
    if leader is victim:
        code, body, _ = http_json("POST", f"{leader.http}/cluster/leader",
                                  {"id": other.node_id}, timeout_s=10)
        assert code == 200, body
        leader = cluster.wait_for_leader()
    victim, other = [n for n in cluster.nodes if n is not leader]
    last = cluster.put("warm", 1)
    cluster.wait_applied(other, last)  # the strict check counts `other` caught up
    term = cluster.status(leader)["term"]
    campaigns = victim.log_text().count("event=became_pre_candidate")
    out: dict[str, Any] = {}

    def remove() -> None:
        out["r"] = http_json("DELETE", f"{victim.http}/cluster/members/{victim.node_id}",
                             timeout_s=20)

    asking = threading.Thread(target=remove)
    cluster.pause(other)  # the removal cannot commit until `other` is back
    try:
        asking.start()
        wait_until(lambda: victim.log_text().count("event=became_pre_candidate") > campaigns,
                   10, "the victim's election timer to run out while its removal waits")
    finally:
        cluster.resume(other)
    asking.join(25)
    code, body, _ = out["r"]
    assert victim.node_id not in members(cluster, leader)
    assert cluster.status(leader)["term"] == term  # same leader, same term: it did commit
    assert code == 200, body


def _recorded(cluster: LocalCluster, node: NodeProc) -> bool:
    return any("event=kv_member_incarnation index=" in line and f"node={node.node_id} " in line
               for n in cluster.nodes for line in n.log_text().splitlines())


def test_a_member_wiped_and_started_again_with_raftkv_peers_is_refused(
        cluster: LocalCluster) -> None:
    """A member whose data dir was wiped, started again with RAFTKV_PEERS, bootstrapped afresh
    under its old id and cluster id, and nothing noticed: its empty vote could elect a node
    that missed an acknowledged write. Each data dir now has a random incarnation, the
    leader records each member's in the log, and the members refuse a member presenting
    another one (replaced_member) until it is removed; the node says what to do."""
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    index = cluster.put("acknowledged", "kept")
    cluster.wait_applied(victim, index)
    wait_until(lambda: _recorded(cluster, victim), 20, "the victim's incarnation recorded")
    cluster.kill(victim)
    cluster.wipe(victim)
    cluster.start(victim)  # RAFTKV_PEERS, an empty data dir: it bootstraps afresh

    wait_until(lambda: "event=replaced_member" in victim.log_text(), 20,
               "the wiped member to be told")
    assert cluster.status(victim)["extra"]["replaced_in_cluster"] is True
    assert "raftkv members remove" in victim.log_text()
    others = [n for n in cluster.nodes if n is not victim]
    wait_until(lambda: any("reason=replaced_member" in n.log_text() for n in others), 10,
               "a member to refuse it")
    after = cluster.put("after", 1)
    assert cluster.status(victim)["applied_index"] < index  # it took no part
    assert cluster.status(victim)["extra"]["replaced_in_cluster"] is True

    # The way back: remove it (which clears the record), then join with an empty data dir.
    code, body, _ = http_json("DELETE", f"{leader.http}/cluster/members/{victim.node_id}",
                              timeout_s=10)
    assert code == 200, body
    rejoin_empty(cluster, victim, via=cluster.wait_for_leader())
    cluster.wait_applied(victim, after)
    code, body, _ = http_json("GET", f"{victim.http}/keys/acknowledged?consistency=stale")
    assert code == 200 and body["value"] == "kept"


def test_a_member_that_starts_for_the_first_time_late_is_taken_in(tmp_path: Path) -> None:
    """No false alarm: a member whose first start comes after the others have recorded
    theirs and written is taken in (nothing was recorded for it)."""
    c = LocalCluster(tmp_path, 3, env=FAST_TIMING)
    try:
        first, second, late = c.nodes
        c.start(first)
        c.start(second)
        c.wait_for_leader(among=[first, second], timeout_s=30)
        wait_until(lambda: _recorded(c, first) and _recorded(c, second), 20,
                   "the first two incarnations recorded")
        index = c.put("early", 1)
        c.start(late)
        c.wait_applied(late, index, timeout_s=30)
        wait_until(lambda: _recorded(c, late), 20, "the late member's incarnation recorded")
        assert "replaced_member" not in "".join(n.log_text() for n in c.nodes)
    finally:
        c.close()


def test_a_member_removed_and_added_back_empty_after_a_leader_change_is_taken_in(
        cluster: LocalCluster) -> None:
    """The way back for a lost data dir, with another leader by then: the record of the old
    data dir went with the removal, and the new one is taken (from the review of ba7c103)."""
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    cluster.put("x", 1)
    wait_until(lambda: _recorded(cluster, victim), 20, "the victim's incarnation recorded")
    cluster.wait_replicated(leader)  # else the removal may be refused: the third one lags
    code, body, _ = http_json("DELETE", f"{leader.http}/cluster/members/{victim.node_id}",
                              timeout_s=10)
    assert code == 200, body
    cluster.kill(victim)
    code, body, _ = http_json("POST", f"{leader.http}/cluster/leader", timeout_s=10)
    assert code == 200, body
    rejoin_empty(cluster, victim, via=cluster.node(body["leader"]))
    last = cluster.put("after", 2)
    cluster.wait_applied(victim, last, timeout_s=30)
    assert "replaced_member" not in "".join(n.log_text() for n in cluster.nodes)
