"""How a node starts (raftkv.runtime.startup): the decision of open_node on real stores.

Regression (found by a long fault run, seed 31, member_replace): a node killed right after
its join finished, having learnt only the leader's term from a heartbeat (no log entry, no
snapshot), restarted as a plain restart: it knew no member, refused every peer as
`unknown_node`, never caught up and was never promoted."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from raftkv.core import Entry, HardState
from raftkv.core.types import EntryKind, Membership, SnapshotMeta
from raftkv.ports import NodeIdentity
from raftkv.runtime.boot import bootstrap_entries
from raftkv.runtime.startup import (
    FORMAT_VERSION,
    NodeState,
    StartKind,
    StartupError,
    join_headers,
    open_node,
)
from raftkv.settings import Settings, from_sources
from snapshots.lmdb_store import LmdbSnapshotStore
from storage.lmdb_store import LmdbRaftStorage

MEMBERS = {"n1": "127.0.0.1:1", "n2": "127.0.0.1:2", "n3": "127.0.0.1:3"}


def settings_for(data_dir: Path, join: bool) -> Settings:
    env = {"RAFTKV_ID": "n4", "RAFTKV_DATA_DIR": str(data_dir),
           "RAFTKV_CLUSTER_TOKEN": "t" * 40}
    if join:
        env["RAFTKV_JOIN"] = "http://127.0.0.1:1"
    return from_sources(None, env)


def joined(data_dir: Path, hard_state: HardState, entries: list[Entry]) -> None:
    """The data dir of node n4 after its join finished (identity saved), then what it got."""
    with LmdbRaftStorage(data_dir / "raft") as storage:
        storage.set_identity(NodeIdentity("n4", "c1", FORMAT_VERSION))
        storage.save(hard_state, entries)


@pytest.fixture
def opened() -> Iterator[list[NodeState]]:
    states: list[NodeState] = []
    yield states
    for state in states:
        state.close()


def test_a_joined_node_that_learnt_only_a_term_joins_again_after_a_restart(
        tmp_path: Path, opened: list[NodeState]) -> None:
    joined(tmp_path, HardState(39, None, 0), [])
    state = open_node(settings_for(tmp_path, join=True))
    opened.append(state)
    assert state.plan.kind is StartKind.RESTART
    assert state.plan.needs_join, "it knows no member: it must ask to join again"
    assert state.plan.cluster_id == "c1"


@pytest.mark.parametrize("peers", ["", "n4=127.0.0.1:4,n5=127.0.0.1:5"])
def test_a_join_that_never_finished_needs_raftkv_join_to_go_on(tmp_path: Path,
                                                                peers: str) -> None:
    """The identity is stored once a join learns the cluster: if the join then fails, a start
    without RAFTKV_JOIN ran as a member of that cluster knowing no member, silently, for
    ever (or, with RAFTKV_PEERS, did not bootstrap them). It is refused and told how."""
    joined(tmp_path, HardState(0, None, 0), [])
    env = {"RAFTKV_ID": "n4", "RAFTKV_DATA_DIR": str(tmp_path),
           "RAFTKV_CLUSTER_TOKEN": "t" * 40, "RAFTKV_PEERS": peers}
    with pytest.raises(StartupError, match="join never finished") as refused:
        open_node(from_sources(None, {k: v for k, v in env.items() if v}))
    assert "RAFTKV_JOIN" in str(refused.value) and "cluster c1" in str(refused.value)


def test_a_joined_node_that_holds_log_entries_restarts_without_joining(
        tmp_path: Path, opened: list[NodeState]) -> None:
    entries = bootstrap_entries(MEMBERS)
    joined(tmp_path, HardState(39, None, len(entries)), entries)
    state = open_node(settings_for(tmp_path, join=True))
    opened.append(state)
    assert state.plan.kind is StartKind.RESTART and not state.plan.needs_join
    assert [e.change.node_id for e in state.boot.entries if e.change] == sorted(MEMBERS)


# ---------------------------------------------------------------- damaged data dirs
# Found by damaging copies of a data dir: each of these started (or failed) in a way that lost
# data without a word. Now each refuses with a message, and leaves the data dir as it was.


def bootstrapped(data_dir: Path) -> None:
    """A one-node data dir, bootstrapped and closed (its log holds the ADD_VOTER, term 1)."""
    env = {"RAFTKV_ID": "n1", "RAFTKV_DATA_DIR": str(data_dir),
           "RAFTKV_CLUSTER_TOKEN": "t" * 40, "RAFTKV_PEERS": "n1=127.0.0.1:1"}
    state = open_node(from_sources(None, env))
    state.close()


def restart(data_dir: Path) -> NodeState:
    env = {"RAFTKV_ID": "n1", "RAFTKV_DATA_DIR": str(data_dir),
           "RAFTKV_CLUSTER_TOKEN": "t" * 40, "RAFTKV_PEERS": "n1=127.0.0.1:1"}
    return open_node(from_sources(None, env))


@pytest.mark.parametrize("damage", ["removed", "emptied"])
def test_a_lost_raft_store_is_refused_not_bootstrapped_again(tmp_path: Path,
                                                              damage: str) -> None:
    """Regression: LMDB made a new, empty store and the node bootstrapped again: a new log,
    its data gone."""
    bootstrapped(tmp_path)
    log_file = tmp_path / "raft" / "data.mdb"
    if damage == "removed":
        log_file.unlink()
    else:
        log_file.write_bytes(b"")
    with pytest.raises(StartupError, match=r"Raft store .* is missing or empty"):
        restart(tmp_path)
    assert not log_file.exists() or log_file.stat().st_size == 0  # nothing made in its place


def test_a_lost_hard_state_is_refused(tmp_path: Path) -> None:
    """Regression: with the term gone (0) the node started at term 1 and appended after
    entries of a later term."""
    bootstrapped(tmp_path)
    with LmdbRaftStorage(tmp_path / "raft") as storage:
        storage.save(HardState(3, None, 1), [Entry(2, 3, EntryKind.NORMAL, data=b"x")])
        storage.save(HardState(0, None, 0), [])
    with pytest.raises(StartupError, match="older than the last log entry's"):
        restart(tmp_path)


def test_a_data_dir_of_another_format_is_refused(tmp_path: Path) -> None:
    bootstrapped(tmp_path)
    with LmdbRaftStorage(tmp_path / "raft") as storage:
        identity = storage.identity()
        assert identity is not None
        storage.set_identity(NodeIdentity(identity.node_id, identity.cluster_id, 99))
    with pytest.raises(StartupError, match="format 99"):
        restart(tmp_path)


def test_a_snapshot_that_cannot_be_restored_does_not_cost_the_log(tmp_path: Path) -> None:
    """Regression: a snapshot whose term disagreed with the log made boot reset the log to it
    (a synced save), and only then was the snapshot found unreadable: the start failed with
    the log gone too."""
    bootstrapped(tmp_path)
    snapshots = LmdbSnapshotStore(tmp_path / "snapshots")
    sink = snapshots.create(SnapshotMeta(1, 7, Membership(voters=frozenset({"n1"}))))
    sink.write(b"not a snapshot")
    sink.close()
    snapshots.close()
    with pytest.raises(StartupError, match="cannot load the state"):
        restart(tmp_path)
    with LmdbRaftStorage(tmp_path / "raft") as storage:
        assert storage.last_index() == 1 and storage.term(1) == 1


@pytest.mark.parametrize(("key", "value", "problem"), [
    (b"node_id", b"\xff\xfe", "the node identity is unreadable"),
    (b"joining", b"2", "the joining mark is unreadable"),
])
def test_an_unreadable_meta_record_is_a_startup_error_not_a_traceback(
        tmp_path: Path, key: bytes, value: bytes, problem: str) -> None:
    """Regression: the reads of identity, log bounds and hard state sat outside the code that
    turns a storage error into the message the CLI prints (it printed a traceback). Found by
    a review: the join's mark (then an index) was read after the start's checks, so a
    damaged one escaped as a traceback; it is read with the identity now."""
    bootstrapped(tmp_path)
    env = lmdb.open(str(tmp_path / "raft"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(key, value, db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(StartupError, match=problem):
        restart(tmp_path)


def test_a_joining_mark_reaches_the_node_state(tmp_path: Path) -> None:
    bootstrapped(tmp_path)
    with LmdbRaftStorage(tmp_path / "raft") as storage:
        storage.set_joining(True)
    state = restart(tmp_path)
    try:
        assert state.joining
    finally:
        state.close()


def test_unusable_tls_files_refuse_the_start_before_the_data_dir_is_written(
        tmp_path: Path) -> None:
    """Regression: the node bootstrapped its data dir and only then found its TLS files
    unusable; started again with other members, it kept the first ones, silently."""
    from raftkv.runtime.process import RaftProcess

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    env = {"RAFTKV_ID": "n1", "RAFTKV_DATA_DIR": str(tmp_path / "data"),
           "RAFTKV_CLUSTER_TOKEN": "t" * 40,
           "RAFTKV_PEERS": "n1=127.0.0.1:1,n2=127.0.0.1:2",
           "RAFTKV_PEER_CERT_FILE": str(garbage), "RAFTKV_PEER_KEY_FILE": str(garbage),
           "RAFTKV_PEER_TRUSTED_CA_FILE": str(garbage)}
    with pytest.raises(StartupError, match="peer certificate"):
        RaftProcess(from_sources(None, env))
    assert not (tmp_path / "data" / "raft").exists()


def test_a_start_looks_the_latest_snapshot_up_once(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A look-up reads and checks the whole snapshot (seconds for a few GiB): a start made
    three or four of them."""
    bootstrapped(tmp_path)
    calls: list[int] = []
    original = LmdbSnapshotStore.latest

    def counted(self: LmdbSnapshotStore) -> object:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(LmdbSnapshotStore, "latest", counted)
    state = restart(tmp_path)
    state.close()
    assert len(calls) == 1


def test_a_data_dir_in_use_is_refused_until_its_holder_closes_it(tmp_path: Path) -> None:
    """The LOCK file's flock: a second open of the same data dir (here in the same process,
    as a second `raftkv serve` would) is refused with the holder's pid, and nothing of the
    first is disturbed; once the first closes, the data dir opens again."""
    bootstrapped(tmp_path)
    first = restart(tmp_path)
    try:
        with pytest.raises(StartupError, match=f"in use by process {os.getpid()}"):
            restart(tmp_path)
        assert first.storage.last_index() == 1
    finally:
        first.close()
    again = restart(tmp_path)
    again.close()
    assert (tmp_path / "LOCK").read_text().strip() == str(os.getpid())


def wildcard_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {"RAFTKV_ID": "n1", "RAFTKV_DATA_DIR": str(data_dir),
           "RAFTKV_CLUSTER_TOKEN": "t" * 40}
    env.update(extra)
    return env


@pytest.mark.parametrize(("extra", "named"), [
    ({"RAFTKV_PEERS": "n1=0.0.0.0:5001,n2=h2:5001"}, "RAFTKV_PEERS[n1]"),
    ({"RAFTKV_PEERS": "n1=h1:5001,n2=[::]:5001"}, "RAFTKV_PEERS[n2]"),
    ({"RAFTKV_JOIN": "h1:4001", "RAFTKV_RAFT_ADDR": "0.0.0.0:5001"},
     "RAFTKV_RAFT_ADDR='0.0.0.0:5001'"),
    ({"RAFTKV_JOIN": "h1:4001", "RAFTKV_RAFT_ADVERTISE": "[::]:5001"},
     "RAFTKV_RAFT_ADVERTISE='[::]:5001'"),
], ids=repr)
def test_an_address_the_start_records_for_others_to_dial_is_never_a_wildcard(
        tmp_path: Path, extra: dict[str, str], named: str) -> None:
    """Found by a helper: a node joining with RAFTKV_RAFT_ADDR=0.0.0.0:P and no advertise was
    recorded by the cluster as 0.0.0.0:P, which works only while every node is on one host.
    Refused before anything is bootstrapped or asked, saying what to set."""
    with pytest.raises(StartupError, match="names no host") as refused:
        open_node(from_sources(None, wildcard_env(tmp_path, **extra)))
    assert named in str(refused.value)
    with LmdbRaftStorage(tmp_path / "raft") as storage:
        assert storage.last_index() == 0 and storage.identity() is None


def test_a_cluster_bootstrapped_on_wildcards_keeps_starting(tmp_path: Path) -> None:
    """Dialling 0.0.0.0:P reaches this host, so a one-host cluster bootstrapped that way
    before the check ran; its restarts are not refused (RAFTKV_PEERS only seeds it)."""
    peers = "n1=127.0.0.1:5001"
    open_node(from_sources(None, wildcard_env(tmp_path, RAFTKV_PEERS=peers))).close()
    with LmdbRaftStorage(tmp_path / "raft") as storage:
        assert storage.identity() is not None
    state = open_node(from_sources(None, wildcard_env(
        tmp_path, RAFTKV_PEERS="n1=0.0.0.0:5001", RAFTKV_JOIN="h1:4001",
        RAFTKV_RAFT_ADDR="0.0.0.0:5001")))
    try:
        assert state.plan.kind is StartKind.RESTART and not state.plan.needs_join
    finally:
        state.close()



def test_a_bad_join_token_file_says_what_a_join_token_is(tmp_path: Path) -> None:
    """A join token is the root token or an admin token, never a random string: the root
    token's advice (`openssl rand -hex 32`) was wrong here (found by a helper)."""
    token_file = tmp_path / "join.token"
    token_file.write_text("short\n")
    settings = from_sources(None, {"RAFTKV_ID": "n4", "RAFTKV_DATA_DIR": str(tmp_path / "d"),
                                   "RAFTKV_CLUSTER_TOKEN": "t" * 40,
                                   "RAFTKV_JOIN": "http://127.0.0.1:1",
                                   "RAFTKV_JOIN_TOKEN_FILE": str(token_file)})
    with pytest.raises(StartupError) as refused:
        join_headers(settings)
    message = str(refused.value)
    assert "join token" in message and "--role admin" in message and "openssl" not in message
