"""Backup files (written atomically, checked on read) and restore into a new data dir, checked
by booting the restored stores the way the Raft process does (raftkv.runtime.startup)."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from raftkv.core import Config, RaftNode
from raftkv.core.types import ConfChange, ConfChangeOp, Entry, EntryKind
from raftkv.kv.commands import Batch, LeaseGrant, LeaseRevoke, Put, encode_command
from raftkv.kv.state_machine import (
    KVStateMachine,
    LeaseRecord,
    LeaseRevokeResult,
    iter_snapshot_chunks,
)
from raftkv.runtime.backup import (
    BACKUP_MAGIC,
    BackupError,
    BackupHeader,
    RestoreError,
    read_backup,
    restore,
    write_backup,
)
from raftkv.runtime.boot import load_boot_state
from raftkv.runtime.driver import BASE_MEMBERSHIP
from snapshots.checksum import checksum_of
from snapshots.lmdb_store import LmdbSnapshotStore
from storage.lmdb_store import LmdbRaftStorage


def source_state() -> KVStateMachine:
    """A 3-node cluster's state: membership entries 1..3, then writes up to index 6."""
    sm = KVStateMachine()
    for i, nid in enumerate(("n1", "n2", "n3"), start=1):
        sm.apply(Entry(i, 1, EntryKind.CONF_CHANGE,
                       change=ConfChange(ConfChangeOp.ADD_VOTER, nid, f"10.0.0.{i}:5001")))
    sm.apply(Entry(4, 2, EntryKind.NORMAL, b""))  # the leader's no-op
    sm.apply(Entry(5, 2, EntryKind.NORMAL, encode_command(
        Batch(tuple(Put(f"k{i}", {"n": i}) for i in range(50))), "request-1")))
    sm.apply(Entry(6, 2, EntryKind.NORMAL, encode_command(Put("k7", "rewritten"))))
    return sm


def snapshot_bytes(sm: KVStateMachine) -> bytes:
    return b"".join(iter_snapshot_chunks(sm.snapshot_view()))


def write_source_backup(path: Path) -> bytes:
    data = snapshot_bytes(source_state())
    write_backup(path, BackupHeader(6, len(data), checksum_of(data), source="test"), [data])
    return data


def test_backup_file_round_trips_header_and_bytes(tmp_path: Path) -> None:
    data = write_source_backup(tmp_path / "b")
    header, read = read_backup(tmp_path / "b")
    assert read == data
    assert (header.index, header.length_bytes, header.checksum, header.source) == (
        6, len(data), checksum_of(data), "test")


def test_write_refuses_bytes_whose_checksum_differs_and_leaves_the_old_file(
        tmp_path: Path) -> None:
    target = tmp_path / "b"
    target.write_bytes(b"the previous backup")
    data = snapshot_bytes(source_state())
    damaged = data[:10] + bytes([data[10] ^ 1]) + data[11:]
    with pytest.raises(BackupError, match="checksum"):
        write_backup(target, BackupHeader(6, len(data), checksum_of(data)), [damaged])
    assert target.read_bytes() == b"the previous backup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no partial file left


def test_write_refuses_a_download_cut_short(tmp_path: Path) -> None:
    data = snapshot_bytes(source_state())
    with pytest.raises(BackupError, match="cut short"):
        write_backup(tmp_path / "b", BackupHeader(6, len(data), checksum_of(data)),
                     [data[:-5]])
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda raw: raw[:-1], "truncated"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 0x40]), "damaged"),
    (lambda raw: b"PK\x03\x04" + raw[4:], "not a raftkv backup"),
    (lambda raw: BACKUP_MAGIC + b"{not json\n" + raw.split(b"\n", 2)[2], "not JSON"),
])
def test_read_refuses_a_damaged_file(tmp_path: Path, damage: object, message: str) -> None:
    write_source_backup(tmp_path / "b")
    raw = (tmp_path / "b").read_bytes()
    (tmp_path / "b").write_bytes(damage(raw))  # type: ignore[operator]
    with pytest.raises(BackupError, match=message):
        read_backup(tmp_path / "b")


def test_restored_data_dir_boots_as_a_one_node_cluster_with_all_the_data(
        tmp_path: Path) -> None:
    write_source_backup(tmp_path / "b")
    result = restore(tmp_path / "b", tmp_path / "new", "r1", "127.0.0.1:7001")
    assert (result.node_id, result.index, result.keys) == ("r1", 6, 50)

    storage = LmdbRaftStorage(tmp_path / "new" / "raft")
    snapshots = LmdbSnapshotStore(tmp_path / "new" / "snapshots")
    try:
        identity = storage.identity()
        assert identity is not None
        assert (identity.node_id, identity.cluster_id) == ("r1", result.cluster_id)
        boot, stored = load_boot_state(storage, snapshots, BASE_MEMBERSHIP)
        assert stored is not None
        assert (stored.meta.index, stored.meta.term) == (6, 1)
        sm = KVStateMachine()
        sm.restore_chunks(snapshots.chunks(stored), stored.meta.index)
        node = RaftNode(Config("r1"), boot, random.Random(1))
    finally:
        storage.close()
        snapshots.close()
    assert node.membership.voters == frozenset({"r1"}) and not node.membership.learners
    assert node.log.last_index() == 6 and node.log.commit == 6
    assert dict(sm.addresses) == {"r1": "127.0.0.1:7001"}
    original = source_state()
    assert sm.items("", 1000) == original.items("", 1000)  # values and modification indices
    assert sm.get("k7") == ("rewritten", 6)
    assert sm.snapshot_view().requests == original.snapshot_view().requests


def test_backup_and_restore_carry_leases_and_their_keys(tmp_path: Path) -> None:
    sm = source_state()
    sm.apply(Entry(7, 2, EntryKind.NORMAL, encode_command(LeaseGrant(30))))
    sm.apply(Entry(8, 2, EntryKind.NORMAL, encode_command(Put("held", 1, lease=7))))
    sm.apply(Entry(9, 2, EntryKind.NORMAL, encode_command(Put("own", 2, ttl_s=5))))
    data = snapshot_bytes(sm)
    write_backup(tmp_path / "b", BackupHeader(9, len(data), checksum_of(data)), [data])
    restore(tmp_path / "b", tmp_path / "new", "r1", "127.0.0.1:7001")

    snapshots = LmdbSnapshotStore(tmp_path / "new" / "snapshots")
    restored = KVStateMachine()
    try:
        stored = snapshots.latest()
        assert stored is not None
        restored.restore_chunks(snapshots.chunks(stored), stored.meta.index)
    finally:
        snapshots.close()
    assert restored.leases() == [LeaseRecord(7, 30, (), 1), LeaseRecord(9, 5, (), 1)]
    assert restored.lease_of("held") == 7 and restored.lease_of("own") == 9
    revoked = restored.apply(Entry(10, 1, EntryKind.NORMAL, encode_command(LeaseRevoke(7))))
    assert revoked == LeaseRevokeResult(10, 7, ("held",), False)


def test_each_restore_is_a_new_cluster(tmp_path: Path) -> None:
    write_source_backup(tmp_path / "b")
    first = restore(tmp_path / "b", tmp_path / "one", "n1", "127.0.0.1:7001")
    second = restore(tmp_path / "b", tmp_path / "two", "n1", "127.0.0.1:7001")
    assert first.cluster_id != second.cluster_id


def test_restore_into_an_existing_empty_dir_works(tmp_path: Path) -> None:
    write_source_backup(tmp_path / "b")
    (tmp_path / "empty").mkdir()
    restore(tmp_path / "b", tmp_path / "empty", "n1", "127.0.0.1:7001")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["raft", "snapshots"]


def test_restore_refuses_a_non_empty_data_dir_and_leaves_it_alone(tmp_path: Path) -> None:
    write_source_backup(tmp_path / "b")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(RestoreError, match="not empty"):
        restore(tmp_path / "b", tmp_path / "busy", "n1", "127.0.0.1:7001")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]


def test_restore_of_a_damaged_backup_creates_nothing(tmp_path: Path) -> None:
    write_source_backup(tmp_path / "b")
    raw = bytearray((tmp_path / "b").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "b").write_bytes(bytes(raw))
    with pytest.raises(BackupError, match="damaged"):
        restore(tmp_path / "b", tmp_path / "new", "n1", "127.0.0.1:7001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize(("node_id", "address"), [("10.0.0.1", "127.0.0.1:7001"),
                                                   ("n1", "no-port"), ("n1", "0.0.0.0:5001"),
                                                   ("n1", "[::]:5001")])
def test_restore_refuses_a_bad_id_or_address(tmp_path: Path, node_id: str,
                                             address: str) -> None:
    write_source_backup(tmp_path / "b")
    with pytest.raises(RestoreError):
        restore(tmp_path / "b", tmp_path / "new", node_id, address)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_write_replaces_only_a_regular_file(tmp_path: Path, kind: str) -> None:
    """Regression: `raftkv backup /dev/full`, as root, replaced the device with a regular
    file (os.replace takes whatever the name is); a FIFO or a symlink went the same way."""
    data = b"snapshot bytes"
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(b"keep")
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.mkdir()
    with pytest.raises(BackupError, match="not a regular file"):
        write_backup(target, BackupHeader(6, len(data), checksum_of(data)), [data])
    mode = os.lstat(target).st_mode
    assert {"fifo": stat.S_ISFIFO, "symlink": stat.S_ISLNK, "directory": stat.S_ISDIR}[kind](mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["target"] + (["elsewhere"] if kind == "symlink" else []))  # no partial file left


def test_write_refuses_a_path_that_names_no_file(tmp_path: Path) -> None:
    data = b"snapshot bytes"
    with pytest.raises(BackupError, match="not a file name"):
        write_backup("", BackupHeader(6, len(data), checksum_of(data)), [data])
