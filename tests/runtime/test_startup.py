"""How a node starts (raftkv.runtime.startup): the decision of open_node on real stores.

Regression (found by a long fault run, seed 31, member_replace): a node killed right after
its join finished, having learnt only the leader's term from a heartbeat (no log entry, no
snapshot), restarted as a plain restart: it knew no member, refused every peer as
`unknown_node`, never caught up and was never promoted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from raftkv.core import Entry, HardState
from raftkv.ports import NodeIdentity
from raftkv.runtime.boot import bootstrap_entries
from raftkv.runtime.startup import FORMAT_VERSION, NodeState, StartKind, open_node
from raftkv.settings import Settings, from_sources
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
        state.storage.close()
        state.snapshots.close()


def test_a_joined_node_that_learnt_only_a_term_joins_again_after_a_restart(
        tmp_path: Path, opened: list[NodeState]) -> None:
    joined(tmp_path, HardState(39, None, 0), [])
    state = open_node(settings_for(tmp_path, join=True))
    opened.append(state)
    assert state.plan.kind is StartKind.RESTART
    assert state.plan.needs_join, "it knows no member: it must ask to join again"
    assert state.plan.cluster_id == "c1"


def test_a_joined_node_that_holds_log_entries_restarts_without_joining(
        tmp_path: Path, opened: list[NodeState]) -> None:
    entries = bootstrap_entries(MEMBERS)
    joined(tmp_path, HardState(39, None, len(entries)), entries)
    state = open_node(settings_for(tmp_path, join=True))
    opened.append(state)
    assert state.plan.kind is StartKind.RESTART and not state.plan.needs_join
    assert [e.change.node_id for e in state.boot.entries if e.change] == sorted(MEMBERS)
