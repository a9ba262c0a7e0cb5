"""Mutual TLS on the peer port (raftkv.runtime.transport.tls), with real processes: a cluster
elects and replicates over TLS; plaintext, a certificate from another CA, and a certificate
that names another node are refused with a logged reason; a node joins over TLS, and one
that presents another node's certificate is not added; and a running cluster switches
from plaintext to TLS one node at a time without losing a write."""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

import pytest

from raftkv.localcluster import FAST_TIMING, LocalCluster, http_json, wait_until
from raftkv.runtime.transport.probe import ProbeFailed, probe

pytestmark = pytest.mark.integration

pytest.importorskip("cryptography", reason="raftkv certs needs the cryptography package")


def client_context(certs: Path, name: str, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_cert_chain(certs / f"{name}.pem", certs / f"{name}.key")
    ctx.load_verify_locations(ca or certs / "ca.pem")
    return ctx


def value_everywhere(c: LocalCluster, key: str, value: str) -> bool:
    for n in c.nodes:
        code, body, _ = http_json("GET", f"{n.http}/keys/{key}?consistency=stale")
        if code != 200 or body["value"] != value:
            return False
    return True


def test_a_cluster_elects_and_replicates_over_tls_and_refuses_the_rest(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path / "c", 3, env=FAST_TIMING)
    certs = tmp_path / "certs"
    c.use_peer_tls(certs)
    try:
        c.start_all()
        c.wait_all_ready()
        leader = c.wait_for_leader()
        index = c.put("over", "tls")
        wait_until(lambda: value_everywhere(c, "over", "tls"), 10, "replication over TLS")
        assert index > 0

        # Plaintext, even with the right cluster token: refused, and the reason logged.
        with pytest.raises(ProbeFailed):
            probe(leader.raft, token=c.token, node_id="intruder", cluster_id="",
                  timeout_s=5)
        # A certificate signed by another CA.
        from raftkv.certs import init_certs

        init_certs(tmp_path / "other", ["n2"])
        with pytest.raises(ProbeFailed):
            probe(leader.raft, token=c.token, node_id="n2", cluster_id="", timeout_s=5,
                  tls=client_context(tmp_path / "other", "n2", certs / "ca.pem"))
        # The cluster's own CA, but the certificate of another node than the one claimed:
        # the token handshake passes, the identity check does not.
        other = next(n for n in c.nodes if n is not leader)
        with pytest.raises(ProbeFailed):
            probe(leader.raft, token=c.token, node_id="n9", cluster_id="", timeout_s=5,
                  tls=client_context(certs, other.node_id))
        # A real member's certificate, in its own name: answered.
        info = probe(leader.raft, token=c.token, node_id=other.node_id, cluster_id="",
                     timeout_s=5, tls=client_context(certs, other.node_id))
        assert info.node_id == leader.node_id

        def reasons() -> set[str]:
            text = leader.log_text()
            return {r for r in ("reason=plaintext_refused", "reason=tls_failed",
                                "reason=certificate_mismatch") if r in text}

        wait_until(lambda: len(reasons()) == 3, 10, "the three refusals in the leader's log")
        c.put("still", "serving")
    finally:
        c.close()


def test_a_node_joins_over_tls_and_one_with_another_nodes_certificate_is_not_added(
        tmp_path: Path) -> None:
    """A join is probed over TLS like the leader's link to the new node: with its own
    certificate n4 joins and is promoted; n5 presenting n2's certificate was added as a
    learner that never caught up (every handshake of the leader's link failing). Now its join
    is refused (409 marked as a probe mismatch: the node stops at once, saying why) and it is
    never a member."""
    c = LocalCluster(tmp_path / "c", 3, env=FAST_TIMING)
    certs = tmp_path / "certs"
    c.use_peer_tls(certs)  # certificates for n1..n5
    try:
        c.start_all()
        c.wait_all_ready()
        leader = c.wait_for_leader()
        n4 = c.add_node()
        c.use_peer_tls(certs, nodes=[n4])
        c.start(n4, join=leader.http)
        n5 = c.add_node()
        c.use_peer_tls(certs, nodes=[n5])
        n5.env["RAFTKV_PEER_CERT_FILE"] = str(certs / "n2.pem")
        n5.env["RAFTKV_PEER_KEY_FILE"] = str(certs / "n2.key")
        c.start(n5, join=leader.http)

        def voter() -> dict[str, bool]:
            code, body, _ = http_json("GET", f"{leader.http}/cluster")
            assert code == 200, body
            return {m["id"]: m["voter"] for m in body["members"]}

        wait_until(lambda: voter().get("n4"), 30, "n4 to join over TLS and be promoted")
        assert n5.proc is not None
        assert n5.proc.wait(timeout=30) == 2  # the refusal is final: it is not asked again
        line = next(x for x in n5.log_text().splitlines() if "event=join_refused" in x)
        assert "reason=wrong_identity" in line, line
        # The member's whole message (it was cut at 200 bytes of the answer's body).
        assert "the peer certificate presented at" in line, line
        assert "certificate does not name n5, the id it answers with" in line, line
        assert "n5" not in voter()
        c.put("still", "serving")
    finally:
        c.close()


def test_a_running_cluster_switches_to_tls_one_node_at_a_time(tmp_path: Path) -> None:
    """The documented rolling switch: every node to migrate-accept, then every node to
    migrate-dial, then every node to on; writes go on throughout and none is lost."""
    c = LocalCluster(tmp_path / "c", 3, env=FAST_TIMING)
    certs = tmp_path / "certs"
    written: dict[str, str] = {}
    try:
        c.start_all()
        c.wait_all_ready()
        c.wait_for_leader()
        step = 0
        for mode in ("migrate-accept", "migrate-dial", "on"):
            for node in c.nodes:
                c.use_peer_tls(certs, mode, nodes=[node])
                c.restart(node)
                c.wait_for_ready(node)
                step += 1
                key, value = f"k{step}", f"{mode}-{node.node_id}"
                c.put(key, value)
                written[key] = value
        c.wait_all_ready()
        for key, value in written.items():
            wait_until(functools.partial(value_everywhere, c, key, value), 15,
                       f"{key} on every node")
        # Now TLS only: a plaintext dialer is refused.
        leader = c.wait_for_leader()
        with pytest.raises(ProbeFailed):
            probe(leader.raft, token=c.token, node_id="intruder", cluster_id="", timeout_s=5)
    finally:
        c.close()
