"""A bad peer message never stops or corrupts a node.

A fuzzer holds the cluster token and authenticates to a node as one of its members, then
sends thousands of frames: random bytes, valid Raft messages with fields mutated (gaps in
appends, huge indexes, terms from the future, another sender's name, impossible
acknowledgements), bit-flipped encodings, garbage forwards and snapshot chunks. Clients write
meanwhile. Afterwards: every node is still running, every acknowledged write is there on
every node, and the cluster serves.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import msgpack
import pytest

from raftkv import codec
from raftkv.codec import FrameKind
from raftkv.core import (
    AppendRequest,
    AppendResponse,
    Entry,
    HeartbeatRequest,
    HeartbeatResponse,
    Membership,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    SnapshotMeta,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from raftkv.framing import encode_frame
from raftkv.localcluster import FAST_TIMING, LocalCluster, http_json, wait_until
from tests.support.peers import dial_as

pytestmark = pytest.mark.integration

FRAMES = 5000


def random_message(rng: random.Random, frm: str, to: str) -> Message:
    def n() -> int:
        return rng.choice([0, 1, 2, 5, rng.randrange(100), rng.randrange(1 << 20),
                           (1 << 62) + rng.randrange(100)])

    def entries() -> tuple[Entry, ...]:
        start = n() + 1
        out = []
        for i in range(rng.randrange(6)):
            idx = start + i + (rng.randrange(3) if rng.random() < 0.3 else 0)
            out.append(Entry(idx, rng.randrange(1, 9), data=rng.randbytes(rng.randrange(40))))
        return tuple(out)

    kind = rng.randrange(11)
    term = rng.randrange(1, 12)
    if kind == 0:
        return AppendRequest(term, frm, to, n(), rng.randrange(9), entries(), n())
    if kind == 1:
        return AppendResponse(term, frm, to, rng.random() < 0.5, n(), n(), rng.randrange(9))
    if kind == 2:
        return VoteRequest(term, frm, to, n(), rng.randrange(12), rng.random() < 0.5,
                           rng.random() < 0.5)
    if kind == 3:
        return VoteResponse(term, frm, to, rng.random() < 0.5, rng.random() < 0.5)
    if kind == 4:
        return HeartbeatRequest(term, frm, to, n(), n())
    if kind == 5:
        return HeartbeatResponse(term, frm, to, n())
    if kind == 6:
        meta = SnapshotMeta(n() + 1, term, Membership(frozenset({frm, to})))
        data = rng.randbytes(rng.randrange(200))
        return SnapshotRequest(term, frm, to, meta, rng.choice([0, n()]), data,
                               rng.random() < 0.5, rng.choice([len(data), n()]),
                               rng.randbytes(32).hex())
    if kind == 7:
        return SnapshotResponse(term, frm, to, n(), rng.choice([-1, n()]), rng.random() < 0.5)
    if kind == 8:
        return TimeoutNow(term, frm, to)
    if kind == 9:
        return ReadIndexRequest(term, frm, to, tuple(n() for _ in range(rng.randrange(4))))
    return ReadIndexResponse(term, frm, to, tuple(n() for _ in range(rng.randrange(4))),
                             rng.choice([-1, n()]))


def fuzz_frames(rng: random.Random, frm: str, to: str, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.55:
            sender = frm if rng.random() < 0.8 else rng.choice(["n1", "n2", "n3", "ghost"])
            payload = codec.encode_message(random_message(rng, sender, to))
            out.append(encode_frame(FrameKind.RAFT, payload))
        elif roll < 0.7:  # a valid encoding, bit-flipped
            flipped = bytearray(codec.encode_message(random_message(rng, frm, to)))
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            out.append(encode_frame(FrameKind.RAFT, bytes(flipped)))
        elif roll < 0.8:  # forwards: garbage commands, absurd ops
            items = [[rng.randrange(1 << 40), rng.choice([1, 2, 3, 4, 5, 99]),
                      rng.randbytes(rng.randrange(30))] for _ in range(rng.randrange(1, 4))]
            out.append(encode_frame(FrameKind.FORWARD, msgpack.packb([1, items])))
        elif roll < 0.85:
            out.append(encode_frame(FrameKind.FORWARD_RESULT,
                                    rng.randbytes(rng.randrange(1, 60))))
        else:  # random bytes in a frame of a peer kind
            out.append(encode_frame(rng.choice([FrameKind.RAFT, FrameKind.FORWARD]),
                                    rng.randbytes(rng.randrange(1, 100))))
    return out


def test_thousands_of_bad_frames_from_an_authenticated_peer_stop_no_node(
        tmp_path: Path) -> None:
    rng = random.Random(20261205)
    c = LocalCluster(tmp_path / "c", 3, env=FAST_TIMING)
    acked: dict[str, str] = {}
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            key, value = f"w{i % 50}", f"v{i}"
            for node in c.nodes:
                try:
                    code, _, _ = http_json("PUT", f"{node.http}/keys/{key}?timeout=2",
                                           {"value": value}, timeout_s=4,
                                           headers={"Idempotency-Key": f"{key}-{value}"})
                except OSError:
                    continue
                if code == 200:
                    acked[key] = value
                    break

    try:
        c.start_all()
        c.wait_all_ready()
        c.wait_for_leader()
        writing = threading.Thread(target=writer, daemon=True)
        writing.start()
        wait_until(lambda: len(acked) >= 5, 20, "some writes before the fuzzing")
        sent = 0
        for target in c.nodes:
            claimed = next(n.node_id for n in c.nodes if n is not target)
            frames = fuzz_frames(rng, claimed, target.node_id, FRAMES // len(c.nodes))
            i = 0
            while i < len(frames):  # the node drops a connection on a framing error
                try:
                    with dial_as(target, c.token, claimed) as sock:
                        while i < len(frames):
                            sock.sendall(frames[i])
                            i += 1
                            sent += 1
                except OSError:
                    i += 1  # that frame closed the connection: go on with a new one
        stop.set()
        writing.join(30)
        assert sent >= FRAMES * 0.9
        assert all(n.running for n in c.nodes), "a node stopped"
        c.wait_all_ready(timeout_s=60)
        c.wait_for_leader(timeout_s=30)
        index = c.put("after", "fuzzing")
        assert index > 0

        def all_acked_everywhere() -> bool:
            for node in c.nodes:
                for key in acked:
                    code, body, _ = http_json(
                        "GET", f"{node.http}/keys/{key}?consistency=linearizable")
                    if code != 200:
                        return False
                    # a later write of the same key may have been applied without its ack
                    if not str(body["value"]).startswith("v"):
                        return False
            return True

        wait_until(all_acked_everywhere, 60, "every acknowledged key on every node")
        for node in c.nodes:
            for key, value in acked.items():
                code, body, _ = http_json("GET", f"{node.http}/keys/{key}?consistency=stale")
                assert code == 200
                assert int(str(body["value"])[1:]) >= int(value[1:]), (
                    f"{node.node_id} lost {key}={value}: has {body['value']}")
        logs = [n.log_text() for n in c.nodes]
        assert any("event=peer_message_dropped" in text for text in logs)
        for node, text in zip(c.nodes, logs, strict=True):
            assert "Traceback" not in text, f"{node.node_id} logged a traceback"
            assert " CRITICAL " not in text, f"{node.node_id} logged a critical error"
    finally:
        stop.set()
        c.close()
