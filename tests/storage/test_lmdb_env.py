"""storage.lmdb_env: the one LMDB environment helper of the log and snapshot stores: map
growth, a full map or disk as StorageFull with nothing written, other failures as
StorageError."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from raftkv.ports import StorageError, StorageFull
from storage import lmdb_env
from storage.lmdb_env import LmdbEnvironment, is_disk_full
from tests.support.lmdb_faults import CommitFails, lmdb_error
from tests.support.tmpfs import can_mount_tmpfs

SMALL_MAP_BYTES = 64 << 10


def open_env(path: Path, map_size_bytes: int = SMALL_MAP_BYTES,
             max_map_size_bytes: int = 64 << 20) -> LmdbEnvironment:
    return LmdbEnvironment(path, what="the test store", map_size_bytes=map_size_bytes,
                           max_map_size_bytes=max_map_size_bytes, max_dbs=2,
                           not_ours="move it away", damaged="rebuild it")


def put_all(env: LmdbEnvironment, items: dict[bytes, bytes]) -> None:
    def body(txn: lmdb.Transaction[bytes]) -> None:
        for key, value in items.items():
            txn.put(key, value)

    env.write(body)


def stored(env: LmdbEnvironment) -> dict[bytes, bytes]:
    with env.reading() as txn:
        return dict(txn.cursor().iternext())


def items(first: int, count: int, size: int = 1000) -> dict[bytes, bytes]:
    return {f"k{i:06d}".encode(): bytes([i % 251]) * size for i in range(first, first + count)}


# Map growth


def test_a_write_larger_than_the_map_grows_it_and_is_written_whole(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = open_env(tmp_path)
    big = items(0, 1000)  # ~1 MB in one transaction, 16 times the initial map

    with caplog.at_level(logging.INFO, logger="storage.lmdb_env"):
        put_all(env, big)

    assert stored(env) == big
    assert env.map_size_bytes >= 1 << 20
    assert any("event=lmdb_map_grown" in r.getMessage() for r in caplog.records)
    env.close()


def test_the_map_doubles_and_stops_at_the_max(tmp_path: Path) -> None:
    env = open_env(tmp_path, max_map_size_bytes=3 * SMALL_MAP_BYTES)
    with pytest.raises(StorageFull):
        for first in range(0, 100_000, 10):
            put_all(env, items(first, 10))
    assert env.map_size_bytes == 3 * SMALL_MAP_BYTES  # 64 KiB -> 128 KiB -> 192 KiB (the max)
    env.close()


# A full map


def test_a_full_map_at_its_max_raises_storage_full_and_writes_nothing(tmp_path: Path) -> None:
    env = open_env(tmp_path, max_map_size_bytes=SMALL_MAP_BYTES)
    kept = items(0, 10)
    put_all(env, kept)

    with pytest.raises(StorageFull, match=r"max_map_size_bytes=65536") as raised:
        put_all(env, items(10, 1000))
    assert str(tmp_path / "data.mdb") in str(raised.value)
    assert isinstance(raised.value.__cause__, lmdb.MapFullError)
    assert stored(env) == kept  # none of the failed transaction's puts
    put_all(env, items(10, 1))  # a small write still fits
    assert len(stored(env)) == 11
    env.close()


# A full disk: decided by errno


@pytest.mark.parametrize("error", [
    lmdb_error(lmdb.DiskError, "mdb_txn_commit", errno.ENOSPC),
    lmdb_error(lmdb.Error, "mdb_txn_commit", errno.EDQUOT),
], ids=["ENOSPC", "EDQUOT"])
def test_a_full_disk_at_commit_raises_storage_full_and_writes_nothing(
        tmp_path: Path, error: lmdb.Error) -> None:
    env = open_env(tmp_path)
    kept = items(0, 3)
    put_all(env, kept)
    real = env.env
    env.env = CommitFails(real, error)  # type: ignore[assignment]

    with pytest.raises(StorageFull, match="no space left on the disk") as raised:
        put_all(env, items(3, 5))
    assert raised.value.__cause__ is error
    env.env = real
    assert stored(env) == kept
    env.close()


def test_other_errors_are_storage_errors_whatever_their_message_says(tmp_path: Path) -> None:
    env = open_env(tmp_path)
    error = lmdb_error(lmdb.Error, "mdb_txn_commit", errno.EIO)
    error.args = ("mdb_txn_commit: No space left on device (a misleading text)",)
    assert not is_disk_full(error)
    real = env.env
    env.env = CommitFails(real, error)  # type: ignore[assignment]

    with pytest.raises(StorageError, match="The node must stop") as raised:
        put_all(env, items(0, 1))
    assert not isinstance(raised.value, StorageFull)
    env.env = real
    assert stored(env) == {}
    env.close()


def test_an_eio_on_a_file_system_with_no_room_left_is_storage_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LMDB turns a short write (a full disk's answer to a large transaction) into EIO: with
    almost no free space that is a full disk, not a broken one."""
    env = open_env(tmp_path)
    real_statvfs = os.statvfs

    def full(path: object) -> os.statvfs_result:
        st = real_statvfs(path)  # type: ignore[arg-type]
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 3, st.f_files,
                                  st.f_ffree, st.f_favail, st.f_flag, st.f_namemax))

    monkeypatch.setattr("storage.lmdb_env.os.statvfs", full)
    error = lmdb_error(lmdb.Error, "mdb_txn_commit", errno.EIO)
    real = env.env
    env.env = CommitFails(real, error)  # type: ignore[assignment]
    with pytest.raises(StorageFull, match="no space left on the disk") as raised:
        put_all(env, items(0, 1))
    assert raised.value.cause == "disk_full"
    env.env = real
    assert stored(env) == {}
    env.close()


def test_nearly_full_means_under_a_floor_or_one_percent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fs(total_blocks: int, free_blocks: int) -> None:
        result = os.statvfs_result((4096, 4096, total_blocks, free_blocks, free_blocks,
                                    0, 0, 0, 0, 255))
        monkeypatch.setattr("storage.lmdb_env.os.statvfs", lambda path: result)

    fs(total_blocks=1 << 20, free_blocks=(1 << 20) // 200)  # 4 GiB, 0.5% free: 20 MiB
    assert lmdb_env.nearly_full(tmp_path)
    fs(total_blocks=1 << 20, free_blocks=(1 << 20) // 50)  # 2% free
    assert not lmdb_env.nearly_full(tmp_path)
    fs(total_blocks=1 << 30, free_blocks=(2 << 30) // 4096)  # 4 TiB, 2 GiB free: over 1 GiB
    assert not lmdb_env.nearly_full(tmp_path)
    fs(total_blocks=1024, free_blocks=1000)  # 4 MiB fs, almost empty, but under the floor
    assert lmdb_env.nearly_full(tmp_path)


def test_a_full_map_names_its_cause(tmp_path: Path) -> None:
    env = open_env(tmp_path, map_size_bytes=64 << 10, max_map_size_bytes=64 << 10)
    with pytest.raises(StorageFull) as raised:
        put_all(env, items(0, 200))
    assert raised.value.cause == "map_full"
    env.close()


def test_is_disk_full_reads_the_errno() -> None:
    assert is_disk_full(lmdb_error(lmdb.DiskError, "mdb_put", errno.ENOSPC))
    assert is_disk_full(lmdb_error(lmdb.Error, "mdb_txn_commit", errno.EDQUOT))
    assert not is_disk_full(lmdb_error(lmdb.Error, "mdb_txn_commit", errno.EIO))
    assert not is_disk_full(lmdb_error(lmdb.MapFullError, "mdb_put", -30792))


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs (needs root; skipped elsewhere), unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs",
                              str(mount_point)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_really_full_disk_raises_storage_full_and_loses_nothing(
        small_filesystem: Path) -> None:
    """LMDB's own ENOSPC from a filesystem that is full, with a map far larger than the disk.
    (Small transactions: LMDB reports a short write of a large one as EIO.)"""
    env = open_env(small_filesystem / "store", map_size_bytes=16 << 20)
    acknowledged: dict[bytes, bytes] = {}
    with pytest.raises(StorageFull, match="no space left on the disk"):
        for i in range(10_000):
            one = items(i, 1, size=300)
            put_all(env, one)
            acknowledged.update(one)
    assert len(acknowledged) > 100
    assert stored(env) == acknowledged
    env.close()
    reopened = open_env(small_filesystem / "store", map_size_bytes=16 << 20)
    assert stored(reopened) == acknowledged
    reopened.close()


def test_a_large_transaction_on_a_full_disk_is_storage_full_not_a_stop(
        small_filesystem: Path) -> None:
    """The probe: on a real full tmpfs LMDB reported a large transaction's short write as
    EIO, and two of three nodes stopped instead of answering 507. It is StorageFull now, and
    what was acknowledged before is all there."""
    env = open_env(small_filesystem / "store", map_size_bytes=16 << 20)
    acknowledged: dict[bytes, bytes] = {}
    raised: StorageFull | None = None
    for i in range(0, 10_000, 50):
        batch = items(i, 50, size=4000)  # ~200 KiB per transaction on a 512 KiB disk
        try:
            put_all(env, batch)
        except StorageFull as e:
            raised = e
            break
        acknowledged.update(batch)
    assert raised is not None and raised.cause == "disk_full"
    assert stored(env) == acknowledged
    env.close()
    reopened = open_env(small_filesystem / "store", map_size_bytes=16 << 20)
    assert stored(reopened) == acknowledged
    reopened.close()


# Errors raised by the body, closing, opening


def test_an_error_raised_by_the_body_aborts_the_transaction_and_passes_through(
        tmp_path: Path) -> None:
    env = open_env(tmp_path)

    def body(txn: lmdb.Transaction[bytes]) -> None:
        txn.put(b"half", b"done")
        raise StorageError("the caller's own check failed")

    with pytest.raises(StorageError, match="the caller's own check failed"):
        env.write(body)
    assert stored(env) == {}
    env.close()


def test_a_closed_environment_refuses_transactions(tmp_path: Path) -> None:
    env = open_env(tmp_path)
    env.close()
    env.close()  # twice is fine
    with pytest.raises(StorageError, match=r"the test store at .* is closed"):
        stored(env)
    with pytest.raises(StorageError, match="closed"):
        put_all(env, items(0, 1))


def test_a_file_that_is_not_lmdb_is_refused_with_the_callers_advice(tmp_path: Path) -> None:
    (tmp_path / "data.mdb").write_bytes(os.urandom(3 * 4096))
    with pytest.raises(StorageError, match=r"data\.mdb is not an LMDB file .*move it away"):
        open_env(tmp_path)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    env = open_env(tmp_path)
    put_all(env, items(0, 200))
    env.close()
    os.truncate(tmp_path / "data.mdb", 4 * 4096)
    with pytest.raises(StorageError, match=r"data\.mdb is truncated .*rebuild it"):
        open_env(tmp_path)


def test_map_size_above_the_max_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        open_env(tmp_path, map_size_bytes=2 << 20, max_map_size_bytes=1 << 20)


def test_a_new_store_on_a_full_disk_is_refused_with_a_message(tmp_path: Path) -> None:
    """Regression: LMDB writes its new lock file through a memory map, and on a disk with no
    room the kernel killed the process with SIGBUS (a new data dir on a full disk: exit -7,
    no message). In a child process, so that the old behaviour fails this test instead of
    killing the test run."""
    disk = tmp_path / "disk"
    why = can_mount_tmpfs(disk)
    if why is not None:
        pytest.skip(why)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        with open(disk / "fill", "wb") as fill, contextlib.suppress(OSError):
            while True:
                fill.write(b"\0" * 65536)
        child = subprocess.run(
            [sys.executable, "-c",
             "import sys; from storage.lmdb_store import LmdbRaftStorage\n"
             "from raftkv.ports import StorageFull\n"
             "try:\n    LmdbRaftStorage(sys.argv[1])\n"
             "except StorageFull as e:\n    print(e)\n",
             str(disk / "raft")],
            capture_output=True, text=True, timeout=60, check=False,
            cwd=Path(__file__).resolve().parents[2])
        assert child.returncode == 0, (child.returncode, child.stderr)
        assert "free some space" in child.stdout
    finally:
        subprocess.run(["umount", str(disk)], check=True)
