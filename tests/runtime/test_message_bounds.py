"""Every Raft message a node sends fits in one frame to a peer (DEFAULT_MAX_FRAME_BYTES, the
bound peers read with). A peer closes the link on a larger frame, so the link refuses to send
one (logged), and a follower that needs that message would stall.

The chain, one test per link: the HTTP limits bound a command (far) below the core's
max_entry_bytes; the driver refuses a larger command on any node (a forwarded one too), and
the core appends no larger entry; codec.raft_message_bound bounds every message of a core's
config; raft_config refuses a config whose messages may not fit in a peer frame. What slips
through anyway (an entry an older build appended) is refused by the transport, which never
sends a frame over the bound (tests/runtime/transport/test_transport.py)."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from raftkv.codec import (
    ENTRY_OVERHEAD_BYTES,
    MAX_MEMBERS_IN_HEAD,
    MESSAGE_HEAD_BYTES,
    encode_message,
    raft_message_bound,
)
from raftkv.core import (
    AppendRequest,
    AppendResponse,
    ConfChange,
    ConfChangeOp,
    Config,
    Entry,
    EntryKind,
    HeartbeatRequest,
    HeartbeatResponse,
    Membership,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    Role,
    SnapshotMeta,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from raftkv.core.node import MAX_READ_IDS
from raftkv.http.app import DEFAULT_MAX_BODY_BYTES
from raftkv.kv.commands import (
    MAX_REQUEST_ID_CHARS,
    Batch,
    JSONValue,
    Put,
    encode_command,
)
from raftkv.kv.state_machine import KVStateMachine
from raftkv.metrics import NodeMetrics
from raftkv.runtime.driver import (
    ALARM_RETRY_S,
    HOUSEKEEPING_TICKS,
    INCARNATION_RETRY_S,
    TOO_LARGE_LOG_S,
    RaftDriver,
)
from raftkv.runtime.process import raft_config
from raftkv.runtime.startup import StartupError
from raftkv.runtime.transport import DEFAULT_MAX_FRAME_BYTES
from raftkv.runtime.transport.handshake import MAX_ID_CHARS
from raftkv.service import (
    MAX_VALUE_BYTES,
    InvalidRequestError,
    ServiceError,
)
from raftkv.settings import Settings, from_sources
from snapshots.policy import SnapshotPolicy
from tests.support.completions import Done
from tests.support.drivers import new_member
from tests.support.single_node import FakeClock


def settings(tmp_path: Path) -> Settings:
    return from_sources(None, {"RAFTKV_ID": "n1", "RAFTKV_DATA_DIR": str(tmp_path),
                               "RAFTKV_CLUSTER_TOKEN": "t" * 40})


# -- the config, against the frame bound ------------------------------------------------------
def test_the_raft_config_of_a_node_fits_in_a_peer_frame(tmp_path: Path) -> None:
    """Fails if a default of Config (max_append_bytes, max_entry_bytes, snapshot_chunk_bytes)
    or of the node's settings is raised past what a peer frame holds."""
    config = raft_config(settings(tmp_path))
    assert raft_message_bound(config) < DEFAULT_MAX_FRAME_BYTES


def test_a_member_limit_past_what_a_snapshot_head_holds_is_refused() -> None:
    assert raft_message_bound(Config("n1", max_members=MAX_MEMBERS_IN_HEAD)) > 0
    with pytest.raises(ValueError, match="holds the ids of at most 1000 members"):
        raft_message_bound(Config("n1", max_members=MAX_MEMBERS_IN_HEAD + 1))


def test_a_raft_config_whose_messages_may_not_fit_in_a_peer_frame_is_refused(
        tmp_path: Path) -> None:
    s = settings(tmp_path)
    bound = raft_message_bound(raft_config(s))
    assert raft_config(s, max_frame_bytes=bound + 1)  # the payload and the kind byte
    with pytest.raises(StartupError, match=f"may take {bound} bytes.*more than a peer frame"):
        raft_config(s, max_frame_bytes=bound)


# -- the bound, against the encoding ----------------------------------------------------------
BIG = (1 << 64) - 1
"""The largest index, term or id msgpack encodes (9 bytes)."""
LONG_ID = "\U0010ffff" * MAX_ID_CHARS
"""The longest node id a peer may have, of 4-byte characters."""
SMALL = Config("n1", max_append_entries=8, max_append_bytes=4000, max_entry_bytes=6000,
               snapshot_chunk_bytes=5000)


def append(*entries: Entry) -> AppendRequest:
    return AppendRequest(BIG, LONG_ID, LONG_ID, BIG, BIG, entries, BIG)


def data_entry(size_bytes: int, i: int = 0) -> Entry:
    return Entry(BIG - i, BIG, EntryKind.NORMAL, b"d" * (size_bytes - 16))


def change_entry(size_bytes: int, i: int = 0) -> Entry:
    """A membership change whose node id and address are 4-byte characters."""
    chars = (size_bytes - 16) // 4
    half = chars // 2
    change = ConfChange(ConfChangeOp.ADD_VOTER, "\U0010ffff" * half,
                        "\U0010ffff" * (chars - half))
    entry = Entry(BIG - i, BIG, EntryKind.CONF_CHANGE, change=change)
    assert entry.size_bytes == size_bytes
    return entry


def largest_messages(config: Config) -> list[Message]:
    """The largest message of each kind a core of `config` may send: entries, ids and
    positions at their largest, a snapshot's membership of MAX_MEMBERS_IN_HEAD members (the
    most a Config may allow)."""
    n = config.max_append_entries
    share = config.max_append_bytes // n // 4 * 4
    members = frozenset(f"{i:04}" + "\U0010ffff" * (MAX_ID_CHARS - 4)
                        for i in range(MAX_MEMBERS_IN_HEAD))
    meta = SnapshotMeta(BIG, BIG, Membership(members))
    return [
        append(*(data_entry(share, i) for i in range(n))),
        append(*(change_entry(share, i) for i in range(n))),
        append(data_entry(config.max_entry_bytes)),
        append(change_entry(config.max_entry_bytes)),
        SnapshotRequest(BIG, LONG_ID, LONG_ID, meta, BIG, b"s" * config.snapshot_chunk_bytes,
                        True, BIG, "f" * 64),
        ReadIndexRequest(BIG, LONG_ID, LONG_ID, (BIG,) * MAX_READ_IDS),
        ReadIndexResponse(BIG, LONG_ID, LONG_ID, (BIG,) * MAX_READ_IDS, BIG),
        VoteRequest(BIG, LONG_ID, LONG_ID, BIG, BIG, True, True),
        VoteResponse(BIG, LONG_ID, LONG_ID, True, True),
        AppendResponse(BIG, LONG_ID, LONG_ID, True, BIG, BIG, BIG),
        HeartbeatRequest(BIG, LONG_ID, LONG_ID, BIG, BIG),
        HeartbeatResponse(BIG, LONG_ID, LONG_ID, BIG),
        SnapshotResponse(BIG, LONG_ID, LONG_ID, BIG, BIG, True),
        TimeoutNow(BIG, LONG_ID, LONG_ID),
    ]


def test_an_entry_takes_at_most_its_size_bytes_and_the_overhead_in_an_append() -> None:
    """ENTRY_OVERHEAD_BYTES is what an entry's encoding and its bin header add, at most (its
    index and term at their largest, every length in its widest header)."""
    overheads = {}
    for size in (16, 40, 300, 70_000, 140_000):
        for entry in (data_entry(size), change_entry(size // 4 * 4 + 16)):
            grows = len(encode_message(append(entry))) - len(encode_message(append()))
            overheads[entry.kind, size] = grows - entry.size_bytes
    assert max(overheads.values()) == ENTRY_OVERHEAD_BYTES, overheads
    assert max(v for (kind, _), v in overheads.items() if kind is EntryKind.NORMAL) == 16


@pytest.mark.parametrize("config", [SMALL, Config("n1")], ids=["small", "default"])
def test_the_largest_messages_of_every_kind_encode_within_raft_message_bound(
        config: Config) -> None:
    bound = raft_message_bound(config)
    messages = largest_messages(config)
    sizes = {type(m).__name__: 0 for m in messages}
    for m in messages:
        if isinstance(m, AppendRequest):
            assert (sum(e.size_bytes for e in m.entries) <= config.max_append_bytes
                    or len(m.entries) == 1)
            assert all(e.size_bytes <= config.max_entry_bytes for e in m.entries)
        sizes[type(m).__name__] = max(sizes[type(m).__name__], len(encode_message(m)))
    assert max(sizes.values()) <= bound, sizes
    # The head's room is what is left of the bound for what is not entries or a chunk.
    assert sizes["SnapshotRequest"] - config.snapshot_chunk_bytes <= MESSAGE_HEAD_BYTES
    assert sizes["AppendRequest"] <= (MESSAGE_HEAD_BYTES + config.max_append_entries
                                      * ENTRY_OVERHEAD_BYTES + config.max_entry_bytes)


APPEND_LARGEST = Config("n1", max_append_entries=8, max_append_bytes=9000,
                        max_entry_bytes=6000, snapshot_chunk_bytes=5000)
CHUNK_LARGEST = Config("n1", max_append_entries=8, max_append_bytes=9000,
                       max_entry_bytes=6000, snapshot_chunk_bytes=50000)


@pytest.mark.parametrize(("config", "largest"), [
    (APPEND_LARGEST, "max_append_bytes"),
    (SMALL, "max_entry_bytes"),
    (CHUNK_LARGEST, "snapshot_chunk_bytes"),
])
def test_what_the_bound_has_beyond_the_head_holds_the_entries_or_the_chunk(
        config: Config, largest: str) -> None:
    """MESSAGE_HEAD_BYTES (1 MiB) dwarfs these configs: a whole message against the whole
    bound passes with a term of the bound forgotten. So what the entries add to an
    AppendRequest's encoding, and a SnapshotRequest's chunk (its bin header is the head's),
    are held against what the bound has beyond the head, each of its terms the largest in
    turn: fails if raft_message_bound drops max_append_bytes, max_entry_bytes, the per-entry
    overhead or snapshot_chunk_bytes, or counts one twice."""
    terms = ("max_append_bytes", "max_entry_bytes", "snapshot_chunk_bytes")
    assert all(getattr(config, largest) > getattr(config, t) for t in terms if t != largest)
    room = raft_message_bound(config) - MESSAGE_HEAD_BYTES
    no_entries = len(encode_message(append()))
    sizes: dict[str, int] = {}
    for m in largest_messages(config):
        if isinstance(m, AppendRequest):
            size = len(encode_message(m)) - no_entries
        elif isinstance(m, SnapshotRequest):
            size = len(m.data)
        else:
            continue
        kind = type(m).__name__
        assert size <= room, (kind, size, room)
        sizes[kind] = max(sizes.get(kind, 0), size)
    # Tight: over the largest by no more than the overhead allowed for every entry.
    assert room - max(sizes.values()) <= config.max_append_entries * ENTRY_OVERHEAD_BYTES
    if largest == "snapshot_chunk_bytes":
        assert sizes["SnapshotRequest"] == room
    else:
        assert sizes["AppendRequest"] > getattr(config, largest)


# -- what enters the log, against max_entry_bytes ---------------------------------------------
def floats(json_bytes: int) -> list[JSONValue]:
    """A list of floats whose JSON ([1.5,1.5,...]) is at most `json_bytes`: the value that
    grows most from its JSON to its msgpack (4 bytes of JSON per float, 9 of msgpack)."""
    value: list[JSONValue] = [1.5] * ((json_bytes - 1) // 4)
    assert len(json.dumps(value, separators=(",", ":"))) <= json_bytes
    return value


def test_the_largest_command_an_http_request_makes_fits_in_an_entry() -> None:
    """An HTTP body is at most DEFAULT_MAX_BODY_BYTES and a value at most MAX_VALUE_BYTES of
    JSON; fails if they are raised past what an entry may hold."""
    request_id = "\U0010ffff" * MAX_REQUEST_ID_CHARS
    token_id = "t" * 64
    one_value = Put("k" * 1024, floats(MAX_VALUE_BYTES))
    per_op = DEFAULT_MAX_BODY_BYTES // 2
    batch = Batch((Put("a" * 1024, floats(per_op)), Put("b" * 1024, floats(per_op))))
    limit = Config("n1").max_entry_bytes
    for cmd in (one_value, batch):
        data = encode_command(cmd, request_id, token_id)
        assert Entry(1, 1, EntryKind.NORMAL, data).size_bytes <= limit, len(data)


class NoFrames:
    def send(self, to: str, kind: int, payload: bytes) -> bool:
        return True

    def flush(self) -> None:
        pass

    def has_output(self, to: str) -> bool:
        return False

    def has_link(self, to: str) -> bool:
        return False

    def set_peers(self, peers: Any) -> None:
        pass


class Forwards:
    """The driver's forwarder: records what it is asked to forward."""

    def __init__(self) -> None:
        self.proposals: list[bytes] = []

    def forward_proposal(self, data: bytes, done: Done) -> None:
        self.proposals.append(data)


LIMIT = 2000
"""max_entry_bytes of the drivers below."""


def driver(node_id: str, members: dict[str, str], limit: int = LIMIT,
           clock: Callable[[], float] = time.monotonic) -> RaftDriver:
    core, storage, snapshots = new_member(
        Config(node_id, election_timeout_ticks=1000, max_entry_bytes=limit), members)
    return RaftDriver(core=core, storage=storage, snapshots=snapshots,
                      state_machine=KVStateMachine(), frames=NoFrames(), addresses=members,
                      snapshot_policy=SnapshotPolicy(), rng=random.Random(1),
                      metrics=NodeMetrics(), post=lambda callback: callback(), clock=clock)


def command(size_bytes: int) -> bytes:
    """A valid command whose entry is `size_bytes` (Entry.size_bytes)."""
    base = len(encode_command(Put("k", "")))
    data = encode_command(Put("k", "v" * (size_bytes - 16 - base - 2)))
    assert len(data) + 16 == size_bytes, len(data)
    return data


@pytest.fixture
def leader() -> RaftDriver:
    d = driver("n1", {"n1": "127.0.0.1:1"})
    d.core.campaign()
    d.process()
    assert d.core.role is Role.LEADER
    return d


def test_the_leader_refuses_a_command_over_max_entry_bytes(leader: RaftDriver) -> None:
    last = leader.core.log.last_index()
    too_large, fits = Done(), Done()

    leader.propose(command(LIMIT + 1), too_large)
    leader.propose(command(LIMIT), fits)
    leader.process()

    error = too_large.error
    assert isinstance(error, InvalidRequestError)
    assert f"at most {LIMIT}" in str(error)
    assert fits.value is not None
    assert leader.core.log.last_index() == last + 1  # only the one that fits


def test_the_leader_refuses_a_forwarded_command_over_max_entry_bytes(
        leader: RaftDriver) -> None:
    """What a follower forwards comes to the log through propose_here (Forwarder.serve),
    which answers the follower with the ServiceError it raises."""
    last = leader.core.log.last_index()
    with pytest.raises(InvalidRequestError, match=f"at most {LIMIT}"):
        leader.propose_here(command(LIMIT + 1))
    assert leader.core.log.last_index() == last


def test_a_follower_refuses_a_command_over_max_entry_bytes_instead_of_forwarding_it() -> None:
    members = {"n1": "127.0.0.1:1", "n2": "127.0.0.1:2", "n3": "127.0.0.1:3"}
    follower = driver("n2", members)
    forwards = Forwards()
    follower.forwarder = cast(Any, forwards)
    assert follower.step("n1", HeartbeatRequest(2, "n1", "n2", 0)) is None
    assert follower.core.leader == "n1"
    too_large, fits = Done(), Done()

    follower.propose(command(LIMIT + 1), too_large)
    follower.propose(command(LIMIT), fits)

    assert isinstance(too_large.error, InvalidRequestError)
    assert forwards.proposals == [command(LIMIT)]


def test_the_leader_refuses_a_membership_change_over_max_entry_bytes_as_invalid(
        leader: RaftDriver) -> None:
    """Asked here or forwarded (propose_conf_change_here answers the follower with what
    `failed` gets): no leader ever appends it, so a 400, not a refused change (409)."""
    last = leader.core.log.last_index()
    huge = ConfChange(ConfChangeOp.ADD_LEARNER, "n4", "h" * LIMIT)
    asked_here = Done()
    forwarded: list[ServiceError] = []

    leader.propose_conf_change(huge, asked_here)
    leader.propose_conf_change_here(huge, lambda index: None, forwarded.append)

    error = asked_here.error
    assert isinstance(error, InvalidRequestError), error
    assert f"at most {LIMIT}" in str(error)
    assert [type(e) for e in forwarded] == [InvalidRequestError]
    assert error.code == "invalid_request"  # a 400, not membership_change_rejected (409)
    assert leader.core.log.last_index() == last


def test_the_drivers_own_proposals_over_max_entry_bytes_are_logged_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    """A config whose max_entry_bytes leaves no room for the driver's own proposals (here:
    no command at all fits) must not end the loop turn in ProposalTooLarge: each kind is
    logged, at most once per TOO_LARGE_LOG_S, and tried again as after any refusal."""
    clock = FakeClock()
    d = driver("n1", {"n1": "127.0.0.1:1"}, limit=20, clock=clock)
    d.core.campaign()
    d.process()  # the no-op (16 bytes) is the leader's own, not a proposal
    assert d.core.role is Role.LEADER and d.leases.leading
    d.incarnation = "i" * 32
    d.leases.granted(7, 10, clock.now)
    last = d.core.log.last_index()

    def turns(seconds: float) -> list[str]:
        """Loop turns over `seconds`, a housekeeping round each; the proposals logged."""
        caplog.clear()
        end = clock.now + seconds
        while clock.now < end:
            clock.now += max(ALARM_RETRY_S, INCARNATION_RETRY_S)
            for _ in range(HOUSEKEEPING_TICKS):
                d.tick()
            d.raise_alarm("disk_full")
            d.process()
        return sorted(r.getMessage().split("proposal=")[1].split()[0] for r in caplog.records
                      if "event=proposal_too_large" in r.getMessage())

    with caplog.at_level(logging.ERROR, logger="raftkv.runtime.driver"):
        first = turns(TOO_LARGE_LOG_S - 1)
        again = turns(TOO_LARGE_LOG_S)
    assert first == ["alarm_raise", "lease_revoke", "member_incarnation"]
    assert again == first  # once more after TOO_LARGE_LOG_S, not once per try
    assert d.core.log.last_index() == last
