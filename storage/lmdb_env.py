"""One LMDB environment as raftkv's stores use it: the Raft log (storage.lmdb_store) and the
snapshot store (snapshots.lmdb_store) both open theirs through `LmdbEnvironment`.

- Opening: `sync` and `metasync` on (every commit is fsynced), never `writemap` or
  `map_async`; a file that is not LMDB, cannot be opened, or is shorter than LMDB's own page
  count says becomes a StorageError naming it.
- Writing: `write(body)` runs `body` in one write transaction. When the map is full
  (MapFullError) the transaction is aborted, the map doubles, up to `max_map_size_bytes`, and
  `body` runs again.
- Full: a map at its maximum, or a disk without room (the errno of the LMDB error is ENOSPC
  or EDQUOT; py-lmdb raises DiskError for ENOSPC and keeps the errno in `.code`), is the one
  StorageFull error (`.cause` "map_full" or "disk_full"): the transaction was aborted, so
  nothing of it was written. This is decided by the exception class and errno, never by the
  message's text. One more case is a full disk: LMDB reports a SHORT write (what a full disk
  gives a large transaction) as EIO, so on EIO the free space of the file system that holds
  the file is checked (os.statvfs), and "nearly none left" (below NEARLY_FULL_BYTES, or 1% of
  the file system if that is more, at most 1 GiB) is StorageFull too. Every other LMDB error,
  EIO with room left included, is a StorageError naming the file: the node must stop.
- Threads: every transaction, map resize and close holds one lock (set_mapsize needs no
  transaction active in this process; LMDB allows one writer at a time anyway).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias, TypeVar

import lmdb

from raftkv.ports import StorageError, StorageFull

__all__ = ["FULL_ERRNOS", "NEARLY_FULL_BYTES", "LmdbEnvironment", "is_disk_full",
           "is_short_write_on_full_disk", "nearly_full"]

log = logging.getLogger(__name__)

FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})

_T = TypeVar("_T")
if TYPE_CHECKING:
    WriteTxn: TypeAlias = lmdb.Transaction[bytes]
    BufferTxn: TypeAlias = lmdb.Transaction[memoryview]


NEARLY_FULL_BYTES: Final = 8 << 20
"""Free space under which an EIO from LMDB is taken for a full disk (see the module doc)."""


LOCK_FILE_ROOM_BYTES: Final = 64 << 10
"""Free space a new lock file needs (LMDB's reader table: about 8 KiB for its 126 readers)."""


def _check_room_for_lock_file(path: Path, what: str) -> None:
    """LMDB maps its lock file into memory and writes the reader table through that map: on a
    disk with no room left, the first write faults and the kernel ends the process with
    SIGBUS, before any error can be returned (a new data dir on a full disk died with no
    message). A lock file that already has its size was written before: only a new or empty
    one needs the room."""
    lock_file = path / "lock.mdb"
    try:
        if lock_file.exists() and lock_file.stat().st_size > 0:
            return
        probe = path if path.exists() else path.parent
        info = os.statvfs(probe)
    except OSError:
        return  # lmdb.open says what is wrong with the path
    free = info.f_bavail * info.f_frsize
    if free < LOCK_FILE_ROOM_BYTES:
        raise StorageFull(f"cannot open {what} at {path}: the disk holding it has {free} bytes "
                          "free; free some space and start the node again", cause="disk_full")


def is_disk_full(e: lmdb.Error) -> bool:
    """Whether LMDB failed for want of disk space (ENOSPC, EDQUOT), by errno alone."""
    return isinstance(e, lmdb.DiskError) or getattr(e, "code", None) in FULL_ERRNOS


def nearly_full(path: Path) -> bool:
    """Whether the file system holding `path` has (almost) no room left for us: free bytes
    below NEARLY_FULL_BYTES, or below 1% of its size if that is more (at most 1 GiB)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False  # cannot tell: not a full disk we know of
    free = st.f_bavail * st.f_frsize
    threshold = min(max(NEARLY_FULL_BYTES, st.f_blocks * st.f_frsize // 100), 1 << 30)
    return free < threshold


def is_short_write_on_full_disk(e: lmdb.Error, path: Path) -> bool:
    """An EIO that LMDB made of a short write, on a file system with no room left."""
    return getattr(e, "code", None) == errno.EIO and nearly_full(path)


class LmdbEnvironment:
    """An open LMDB environment in directory `path` (its file is `path/data.mdb`).

    `what` names the store in messages ("the Raft log store"); `not_ours` says what to do with
    a file that is not LMDB, `damaged` what to do when LMDB fails on a file it opened.
    """

    def __init__(
        self,
        path: Path,
        *,
        what: str,
        map_size_bytes: int,
        max_map_size_bytes: int,
        max_dbs: int,
        sync: bool = True,
        not_ours: str,
        damaged: str,
    ) -> None:
        if not 0 < map_size_bytes <= max_map_size_bytes:
            raise ValueError("need 0 < map_size_bytes <= max_map_size_bytes")
        self.path = path
        self.file = path / "data.mdb"
        self.max_map_size_bytes = max_map_size_bytes
        self._what = what
        self._damaged = damaged
        self._lock = threading.Lock()
        self._closed = False
        _check_room_for_lock_file(path, what)
        try:
            self.env = lmdb.open(str(path), map_size=map_size_bytes, subdir=True,
                                 max_dbs=max_dbs, sync=sync, metasync=sync, writemap=False,
                                 map_async=False, lock=True, max_spare_txns=1)
        except lmdb.InvalidError as e:
            raise StorageError(f"{self.file} is not an LMDB file ({e}); it is not {what}: "
                               f"{not_ours}") from e
        except (lmdb.Error, OSError, OverflowError) as e:
            raise StorageError(f"cannot open {what} at {path} ({e}); check that it exists, is "
                               "writable and is not open in another process") from e
        try:
            size = self.file.stat().st_size
            needed = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        except (lmdb.Error, OSError) as e:
            self.env.close()
            raise StorageError(f"cannot inspect {self.file} ({e})") from e
        if size < needed:
            self.env.close()
            raise StorageError(f"{self.file} is truncated ({size} bytes, LMDB needs {needed}); "
                               f"{damaged}")

    @property
    def map_size_bytes(self) -> int:
        with self._lock:
            self._check_open()
            return int(self.env.info()["map_size"])

    @contextmanager
    def reading(self) -> Iterator[WriteTxn]:
        """A read transaction whose values are bytes."""
        with self._lock:
            self._check_open()
            try:
                with self.env.begin() as txn:
                    yield txn
            except lmdb.Error as e:
                raise self.failure("read", e) from e

    @contextmanager
    def reading_buffers(self) -> Iterator[BufferTxn]:
        """A read transaction whose values are memoryviews into the map (valid inside it)."""
        with self._lock:
            self._check_open()
            try:
                with self.env.begin(buffers=True) as txn:
                    yield txn
            except lmdb.Error as e:
                raise self.failure("read", e) from e

    def write(self, body: Callable[[WriteTxn], _T]) -> _T:
        """Run `body` in one write transaction, committed (and fsynced) when it returns.

        Raises StorageFull when the map is at its maximum or the disk is full (nothing of the
        transaction was written), StorageError for any other LMDB failure. Errors that `body`
        raises abort the transaction and pass through.
        """
        with self._lock:
            self._check_open()
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        return body(txn)
                except lmdb.MapFullError as e:
                    self._grow_map(e)
                except lmdb.Error as e:
                    if is_disk_full(e) or is_short_write_on_full_disk(e, self.path):
                        # Logged by whoever handles it (once per episode, not per try).
                        log.debug("event=disk_full path=%s error=%s", self.file, e)
                        raise StorageFull(
                            f"no space left on the disk for {self.file} ({e}; "
                            f"{_free_bytes(self.path)} bytes free); nothing was written: free "
                            "disk space, then disarm the NOSPACE alarm (raftkv alarm disarm)",
                            cause="disk_full") from e
                    raise self.failure("write", e) from e

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.env.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def failure(self, action: str, e: lmdb.Error) -> StorageError:
        """The StorageError for an LMDB failure that is not a full map or disk."""
        return StorageError(f"LMDB {action} failed in {self.file}: {e}. The node must stop: "
                            "check the disk (space, permissions, I/O errors) and restart; "
                            f"{self._damaged}")

    def _grow_map(self, cause: lmdb.MapFullError) -> None:
        size = int(self.env.info()["map_size"])
        if size >= self.max_map_size_bytes:
            raise StorageFull(
                f"the LMDB map of {self.file} is full at {size} bytes (max_map_size_bytes="
                f"{self.max_map_size_bytes}); nothing was written: raise max_map_size_bytes "
                "(with the disk space to match)", cause="map_full") from cause
        new_size = min(2 * size, self.max_map_size_bytes)
        try:
            self.env.set_mapsize(new_size)
        except lmdb.Error as e:
            raise self.failure("map resize", e) from e
        log.info("event=lmdb_map_grown path=%s map_size_bytes=%d max_map_size_bytes=%d",
                 self.file, new_size, self.max_map_size_bytes)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"{self._what} at {self.path} is closed")


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
