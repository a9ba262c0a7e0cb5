"""Backup files, and seeding a new one-node cluster from one (`raftkv backup` / `restore`).

A backup file is three parts:

    raftkv-backup 1\\n
    {"index": ..., "length": ..., "checksum_algorithm": "blake2b-256", "checksum": "...",
     "source": ..., "created_at": ...}\\n                         (one line of JSON)
    the snapshot bytes: the body of GET /snapshot, a `raftkv.kv` state machine snapshot

`write_backup` writes one atomically (a temporary file next to it, fsynced, renamed over it,
the directory fsynced) and refuses bytes whose checksum or length differ from the header's;
`read_backup` checks both again.

`restore` seeds an empty data dir with a NEW cluster whose only member is the given node and
whose state is the backup's. The node then boots as if it had installed that snapshot from a
leader:

- the snapshot store holds one snapshot at index S = the backup's index (1 if that is 0), term
  1, membership voters = {node}. Its data is the backup's, with the same last-modified indices,
  remembered request ids, leases (ids, TTLs and attached keys) and tokens (auth on or off, every
  token's digest, role and prefixes: the restored cluster accepts the same tokens), and an
  address book of only {node: raft address}. S is the backup's index, not 1, because the keys
  keep their last-modified indices (what `prev_index` conditions and watches compare) and the
  leases their ids (the indices that granted them): all are <= the backup's index, and every
  new write or lease must get a higher one. The leases' timers start again when the node
  first leads: each gets a full TTL from then (raftkv.kv.leases);
- the Raft store has an empty log (the next entry is S + 1), hard state term 1, no vote,
  commit S, and the identity (node, a new random cluster id);
- no log entry is needed: the membership comes from the snapshot, as after an install.

It is built in a hidden sibling directory and renamed into place, so a failed restore leaves
no half-seeded data dir behind. `raftkv serve --data-dir D --id <node>` then starts it (no
RAFTKV_PEERS: the data dir has state) and it elects itself; more nodes join with RAFTKV_JOIN.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from raftkv.core.types import HardState, Membership, SnapshotMeta
from raftkv.kv.state_machine import (
    KVSnapshotView,
    SnapshotCorrupt,
    iter_snapshot_chunks,
    parse_snapshot,
)
from raftkv.ports import NodeIdentity
from raftkv.settings import SettingsError, check_dialable, check_node_id
from snapshots.checksum import CHECKSUM_ALGORITHM, new_hasher

__all__ = [
    "BACKUP_MAGIC",
    "BackupError",
    "BackupHeader",
    "RestoreError",
    "RestoreResult",
    "read_backup",
    "restore",
    "utc_timestamp",
    "write_backup",
]

BACKUP_MAGIC: Final = b"raftkv-backup 1\n"
MAX_HEADER_BYTES: Final = 64 * 1024
RESTORED_TERM: Final = 1
_COPY_CHUNK_BYTES: Final = 1 << 20
# The layout NodeServer opens (raftkv.runtime.server): <data dir>/raft and /snapshots.
_RAFT_DIR: Final = "raft"
_SNAPSHOTS_DIR: Final = "snapshots"


class BackupError(Exception):
    """A backup file (or download) is not a complete, intact backup; the message says why."""


class RestoreError(Exception):
    """The restore cannot proceed (bad arguments, a data dir that is not empty)."""


@dataclass(frozen=True, slots=True)
class BackupHeader:
    index: int
    """The applied index the snapshot was taken at."""
    length_bytes: int
    checksum: str
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    source: str = ""
    """Where it was taken from (e.g. the node's URL), for people."""
    created_at: str = ""

    def to_json(self) -> bytes:
        return json.dumps({
            "index": self.index, "length": self.length_bytes,
            "checksum_algorithm": self.checksum_algorithm, "checksum": self.checksum,
            "source": self.source, "created_at": self.created_at,
        }, separators=(",", ":")).encode()

    @staticmethod
    def from_json(line: bytes) -> BackupHeader:
        try:
            raw = json.loads(line)
        except ValueError:
            raise BackupError("the backup header is not JSON") from None
        if not isinstance(raw, dict):
            raise BackupError("the backup header is not a JSON object")
        index, length, checksum = raw.get("index"), raw.get("length"), raw.get("checksum")
        algorithm = raw.get("checksum_algorithm")
        if not (type(index) is int and index >= 0 and type(length) is int and length >= 0
                and isinstance(checksum, str) and isinstance(algorithm, str)):
            raise BackupError("the backup header lacks a valid index, length or checksum")
        return BackupHeader(index, length, checksum, algorithm, str(raw.get("source", "")),
                            str(raw.get("created_at", "")))


def _check_algorithm(header: BackupHeader) -> None:
    if header.checksum_algorithm != CHECKSUM_ALGORITHM:
        raise BackupError(f"the backup's checksum algorithm is {header.checksum_algorithm!r}; "
                          f"this build checks {CHECKSUM_ALGORITHM}")


# --------------------------------------------------------------------------- writing
def write_backup(path: str | os.PathLike[str], header: BackupHeader,
                 chunks: Iterable[bytes]) -> None:
    """Write the snapshot `chunks` under `header` to `path`, atomically: on any error (the
    bytes do not match the header's length or checksum, a write fails) `path` is untouched."""
    _check_algorithm(header)
    target = Path(path)
    if not target.name or target.name in (".", ".."):
        raise BackupError(f"{str(path)!r} is not a file name: give the backup file to write")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(target).st_mode):  # a device, FIFO, symlink, directory
            raise BackupError(f"{target} exists and is not a regular file: a backup only "
                              "replaces a regular file; give another name")
    tmp = target.with_name(f".{target.name}.partial-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as out:
            out.write(BACKUP_MAGIC)
            out.write(header.to_json() + b"\n")
            hasher, length = new_hasher(), 0
            for chunk in chunks:
                hasher.update(chunk)
                length += len(chunk)
                out.write(chunk)
            if length != header.length_bytes:
                raise BackupError(f"got {length} bytes of snapshot, expected "
                                  f"{header.length_bytes}: the download was cut short")
            if hasher.hexdigest() != header.checksum:
                raise BackupError("the snapshot's checksum does not match the one it was sent "
                                  "with: the download is damaged; nothing was written")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------- reading
def read_backup(path: str | os.PathLike[str]) -> tuple[BackupHeader, bytes]:
    """The header and the snapshot bytes of a backup file, checked; BackupError if it is not a
    backup, or is truncated or damaged."""
    try:
        with open(path, "rb") as f:
            header = _read_header(f)
            hasher, parts, length = new_hasher(), [], 0
            while chunk := f.read(_COPY_CHUNK_BYTES):
                hasher.update(chunk)
                parts.append(chunk)
                length += len(chunk)
    except OSError as e:
        raise BackupError(f"cannot read {path}: {e.strerror or e}") from None
    if length != header.length_bytes:
        raise BackupError(f"{path} holds {length} bytes of snapshot, its header says "
                          f"{header.length_bytes}: the file is truncated or has extra bytes")
    if hasher.hexdigest() != header.checksum:
        raise BackupError(f"{path} is damaged: its checksum does not match its header")
    return header, b"".join(parts)


def _read_header(f: BinaryIO) -> BackupHeader:
    if f.read(len(BACKUP_MAGIC)) != BACKUP_MAGIC:
        raise BackupError("not a raftkv backup file (it does not start with "
                          f"{BACKUP_MAGIC.decode().strip()!r})")
    line = f.readline(MAX_HEADER_BYTES)
    if not line.endswith(b"\n"):
        raise BackupError("the backup header is truncated or too long")
    header = BackupHeader.from_json(line)
    _check_algorithm(header)
    return header


# --------------------------------------------------------------------------- restoring
@dataclass(frozen=True, slots=True)
class RestoreResult:
    data_dir: str
    node_id: str
    raft_address: str
    cluster_id: str
    index: int
    keys: int


def restore(backup_path: str | os.PathLike[str], data_dir: str | os.PathLike[str],
            node_id: str, raft_address: str) -> RestoreResult:
    """Seed the empty (or absent) `data_dir` with a new one-node cluster holding the backup
    (see the module doc). RestoreError for bad arguments or a non-empty data dir, BackupError
    for a bad backup file, StorageError if the stores cannot be written."""
    try:
        check_node_id(node_id, "--id")
        check_dialable(raft_address, "--raft-addr",
                       "give the address the members will dial the node at (in a container "
                       "whose RAFTKV_RAFT_ADDR listens on 0.0.0.0: --raft-addr <name>:<port>, "
                       "or set RAFTKV_RAFT_ADVERTISE)")
    except SettingsError as e:
        raise RestoreError(str(e)) from None
    target = Path(data_dir)
    _check_empty(target)
    header, data = read_backup(backup_path)
    try:
        view = parse_snapshot(data)
    except SnapshotCorrupt as e:
        raise BackupError(f"{backup_path} does not hold a key-value snapshot: {e}") from None
    del data
    if view.applied_index != header.index:
        raise BackupError(f"{backup_path}: its header says index {header.index}, its snapshot "
                          f"{view.applied_index}")
    index = max(view.applied_index, 1)
    seeded = KVSnapshotView(index, view.data, view.requests, {node_id: raft_address},
                            view.leases, view.key_leases, view.auth)
    meta = SnapshotMeta(index, RESTORED_TERM, Membership(frozenset({node_id})))
    cluster_id = secrets.token_hex(8)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.restoring-{secrets.token_hex(4)}")
    try:
        staging.mkdir()
        _seed(staging, seeded, meta, NodeIdentity(node_id, cluster_id, _format_version()))
        _check_empty(target)  # still empty (nobody started a node there meanwhile)
        os.rename(staging, target)  # replaces an empty directory, atomically
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RestoreResult(str(target), node_id, raft_address, cluster_id, index,
                         len(seeded.data))


def _seed(directory: Path, view: KVSnapshotView, meta: SnapshotMeta,
          identity: NodeIdentity) -> None:
    from snapshots.lmdb_store import LmdbSnapshotStore
    from storage.lmdb_store import LmdbRaftStorage

    snapshots = LmdbSnapshotStore(directory / _SNAPSHOTS_DIR)
    try:
        sink = snapshots.create(meta)
        try:
            for chunk in iter_snapshot_chunks(view):
                sink.write(chunk)
        except BaseException:
            sink.cancel()
            raise
        sink.close()
    finally:
        snapshots.close()
    storage = LmdbRaftStorage(directory / _RAFT_DIR)
    try:
        storage.save(HardState(meta.term, None, meta.index), [])
        storage.set_identity(identity)  # last: a data dir with an identity is a node's
    finally:
        storage.close()
    for sub in (_SNAPSHOTS_DIR, _RAFT_DIR, ""):
        _fsync_dir(directory / sub)


def _format_version() -> int:
    from raftkv.runtime.startup import FORMAT_VERSION

    return FORMAT_VERSION


def _check_empty(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise RestoreError(f"{target} exists and is not a directory; restore into a new or "
                           "empty directory")
    try:
        occupied = next(target.iterdir(), None) is not None
    except OSError as e:
        raise RestoreError(f"cannot list {target}: {e.strerror or e}") from None
    if occupied:
        raise RestoreError(f"refusing to restore into {target}: it is not empty. A restore "
                           "seeds a new node and never overwrites data; use a new or empty "
                           "directory")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utc_timestamp() -> str:
    """Now, as written in a backup header."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
