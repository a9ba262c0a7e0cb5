"""How a node starts: open its stores, decide how it starts, rebuild its state.

`plan_start` is the decision, a function of what the data dir holds and what the settings
say, and nothing else:

    data dir holds an identity          RESTART (the settings' RAFTKV_JOIN is ignored, unless
                                        the node knows no member yet: it joins again, and
                                        without RAFTKV_JOIN it is refused)
    empty, RAFTKV_PEERS, no RAFTKV_JOIN BOOTSTRAP a static cluster (every member writes the
                                        same first log entries: one ADD_VOTER each, and with
                                        a root token the AuthEnable of its digest; boot.py)
    empty, RAFTKV_JOIN                  JOIN an existing cluster through a member's HTTP API
    empty, neither                      refuse: two clusters never form by accident
    Raft state but no identity          refuse: damage, or a join an older version left

`open_node` does the I/O around it, holding the data dir's LOCK file (an exclusive flock, for
the process's life: two processes on one data dir would be two copies of one voter). Every
problem is a StartupError whose message says what to
do; the CLI prints it without a traceback and exits with status 2.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from raftkv.auth import RootTokenError, read_root_token_file, token_digest
from raftkv.core.ready import BootState
from raftkv.kv.state_machine import KVStateMachine, StateMachineError
from raftkv.ports import NodeIdentity, StorageError
from raftkv.runtime.boot import load_boot_state, save_bootstrap
from raftkv.runtime.driver import BASE_MEMBERSHIP
from raftkv.settings import Settings, SettingsError, check_dialable, derive_cluster_id
from snapshots.lmdb_store import LmdbSnapshotStore
from storage.lmdb_store import LmdbRaftStorage

__all__ = ["FORMAT_VERSION", "NodeState", "StartKind", "StartPlan", "StartupError",
           "join_headers", "open_node", "plan_start"]

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
MIB: Final = 1 << 20


class StartupError(Exception):
    """The node cannot start; the message says why and what to do."""


class StartKind(enum.Enum):
    BOOTSTRAP = "bootstrap"
    JOIN = "join"
    RESTART = "restart"


@dataclass(frozen=True, slots=True)
class StartPlan:
    kind: StartKind
    cluster_id: str
    """Empty while unknown (a node that joins learns it from the cluster)."""
    needs_join: bool
    """Ask a member to add this node (JOIN, or a RESTART that never learnt any member)."""


def plan_start(settings: Settings, identity: NodeIdentity | None, has_raft_state: bool,
               knows_members: bool, data_dir: Path,
               root_digest: bytes | None = None) -> StartPlan:
    """`root_digest`: the digest of the root token a bootstrap starts auth with (it is part of
    the cluster id: members given different root tokens refuse each other)."""
    if identity is None and has_raft_state:
        raise StartupError(
            f"the data dir {data_dir} holds Raft state but no identity (a join an older "
            "version stopped before it finished, or damage): the node neither bootstraps nor "
            "joins over that state. Move the data dir away, then start the node with an "
            "empty data dir and RAFTKV_JOIN")
    if identity is not None:
        if identity.node_id != settings.node_id:
            raise StartupError(
                f"the data dir {data_dir} belongs to node {identity.node_id!r}, not "
                f"{settings.node_id!r}: use RAFTKV_ID={identity.node_id} or another data dir")
        # A node whose join began (the identity is stored once it learns the cluster) but
        # that stopped before anything came from the cluster (no snapshot, no log: no
        # member, no address) would refuse every peer as unknown: it joins again (the
        # leader answers at once for a known member), and without RAFTKV_JOIN it cannot.
        if not knows_members and not settings.join:
            raise StartupError(
                f"the data dir {data_dir} belongs to node {identity.node_id} of cluster "
                f"{identity.cluster_id}, whose join never finished (it knows no member yet): "
                "start it with RAFTKV_JOIN=<a member's HTTP address>, or move the data dir "
                "away to start afresh")
        return StartPlan(StartKind.RESTART, identity.cluster_id,
                         needs_join=not knows_members)
    if settings.join:
        return StartPlan(StartKind.JOIN, "", needs_join=True)
    if settings.peer_map:
        return StartPlan(StartKind.BOOTSTRAP,
                         derive_cluster_id(settings.peer_map, root_digest), needs_join=False)
    raise StartupError(
        f"the data dir {data_dir} is empty and neither RAFTKV_PEERS (to bootstrap a new "
        "cluster) nor RAFTKV_JOIN (to join one) is set: set one of them")


@dataclass(slots=True)
class NodeState:
    storage: LmdbRaftStorage
    snapshots: LmdbSnapshotStore
    sm: KVStateMachine
    boot: BootState
    plan: StartPlan
    joining: bool = False
    """The data dir's joining mark (LmdbRaftStorage.joining): a join that began and whose
    node has not applied its own addition yet."""
    lock_fd: int = -1
    """The data dir's LOCK file, flocked: closed (and so released) by close()."""
    incarnation: str = ""
    """The data dir's random id (LmdbRaftStorage.incarnation): a wiped one gets another."""

    def close(self) -> None:
        self.storage.close()
        self.snapshots.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


LOCK_FILE: Final = "LOCK"


def lock_data_dir(data: Path) -> int:
    """Take the data dir's LOCK (flock, exclusive, not waiting) and write this pid into it;
    the descriptor holds it until closed or the process ends (workers do not inherit it).
    A StartupError names the process that holds it."""
    path = data / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise StartupError(f"cannot open {path}: {e.strerror}; check the data dir's "
                           "permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = b""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(f"cannot lock {path}: {e.strerror}") from None
        who = f"process {holder.decode('ascii', 'replace')}" if holder.isdigit() else (
            "another process")
        raise StartupError(
            f"the data dir {data} is in use by {who} (its {LOCK_FILE} file is locked): a "
            "second node on one data dir would be two copies of one voter. Stop that node "
            "first, or give this one its own data dir") from None
    with contextlib.suppress(OSError):  # only a hint for the message above
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def open_node(settings: Settings) -> NodeState:
    """Open the stores in the data dir, decide how to start, and rebuild the state."""
    data = Path(settings.data_dir)
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"cannot create the data dir {data}: {e.strerror}; check the path "
                           "and its permissions") from None
    lock_fd = lock_data_dir(data)
    try:
        _check_raft_store_present(data)
        try:
            storage = LmdbRaftStorage(
                data / "raft", map_size_bytes=settings.map_size_mb * MIB,
                max_map_size_bytes=settings.max_map_size_mb * MIB,
                unsafe_no_fsync=settings.unsafe_no_fsync)
            snapshots = LmdbSnapshotStore(
                data / "snapshots", max_map_size_bytes=max(settings.max_map_size_mb, 256) * MIB,
                discard_partial=False)
        except StorageError as e:
            raise StartupError(str(e)) from None
        try:
            state = _load(settings, data, storage, snapshots)
        except BaseException:
            storage.close()
            snapshots.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    state.lock_fd = lock_fd
    return state


def _check_raft_store_present(data: Path) -> None:
    """Refuse a data dir whose snapshot store was made but whose Raft store is gone or
    empty: LMDB would make a new, empty one, and the node would start over as a new node
    (bootstrapping again), its log and identity lost without a word. A start makes the Raft
    store first, and opening it writes its first pages: an empty one was never a start."""
    raft, snapshots = data / "raft" / "data.mdb", data / "snapshots" / "data.mdb"
    try:
        if not snapshots.exists() or snapshots.stat().st_size == 0:
            return
        if raft.exists() and raft.stat().st_size > 0:
            return
    except OSError as e:
        raise StartupError(f"cannot read the data dir {data}: {e.strerror}") from None
    raise StartupError(
        f"the data dir {data} holds a snapshot store but its Raft store ({raft}) is missing "
        "or empty: the data dir is damaged, and starting would lose this node's log and "
        "identity. Restore the file from a copy, or move the data dir away and let the node "
        "rejoin empty (RAFTKV_JOIN)")


def _load(settings: Settings, data: Path, storage: LmdbRaftStorage,
          snapshots: LmdbSnapshotStore) -> NodeState:
    damaged = (f"If the data is damaged, move the data dir {data} away and let the node "
               "rejoin empty (RAFTKV_JOIN)")
    try:
        identity = storage.identity()
        joining = storage.joining()
        last_index = storage.last_index()
        hard = storage.hard_state()
        last_term = storage.term(last_index) if last_index > 0 else 0
        latest = snapshots.latest()
    except (StorageError, ValueError) as e:
        raise StartupError(f"cannot read the state in {data}: {e}. {damaged}") from None
    if identity is not None and not 1 <= identity.format_version <= FORMAT_VERSION:
        raise StartupError(
            f"the data dir {data} was written in format {identity.format_version}; this "
            f"build reads format {FORMAT_VERSION}: run the raftkv that wrote it, or move the "
            "data dir away and let the node rejoin empty (RAFTKV_JOIN)")
    if last_term is not None and hard.term < last_term:
        raise StartupError(
            f"the stored term {hard.term} is older than the last log entry's ({last_term}): "
            f"the hard state was lost. {damaged}")
    has_entries = last_index > 0
    has_state = has_entries or hard.term > 0
    if identity is None and not has_state and latest is not None:
        raise StartupError(
            f"the data dir {data} holds a snapshot but an empty Raft store: the Raft store "
            f"was lost or replaced, and starting would begin a new log. {damaged}")
    # Members come only from log entries or a snapshot: a node that joined and then learnt
    # nothing but a term (a heartbeat) before it stopped knows no member yet.
    knows_members = has_entries or latest is not None
    bootstrapping = identity is None and bool(settings.peer_map) and not settings.join
    root_digest = _root_digest(settings, bootstrapping)
    plan = plan_start(settings, identity, has_state, knows_members, data, root_digest)
    check_recorded_addresses(settings, plan)
    if plan.kind is StartKind.BOOTSTRAP:
        save_bootstrap(storage, settings.peer_map, root_digest)
        log.info("event=bootstrap node=%s cluster=%s members=%s auth=%s", settings.node_id,
                 plan.cluster_id, ",".join(sorted(settings.peer_map)),
                 "on" if root_digest else "off")
    elif plan.kind is StartKind.RESTART and settings.join:
        log.info("event=%s node=%s", "join_resumed reason=no_member_known" if plan.needs_join
                 else "join_ignored reason=data_dir_has_state", settings.node_id)
    sm = KVStateMachine()
    try:
        # The snapshot is restored (and so checked) before load_boot_state, which may reset
        # the log to it: a damaged snapshot must not cost the log too.
        if latest is not None:
            sm.restore_chunks(snapshots.chunks(latest), latest.meta.index)
        boot, _ = load_boot_state(storage, snapshots, BASE_MEMBERSHIP, latest=(latest,))
    except (StorageError, StateMachineError, ValueError) as e:
        raise StartupError(f"cannot load the state in {data}: {e}. {damaged}") from None
    if plan.kind is StartKind.BOOTSTRAP:
        storage.set_identity(NodeIdentity(settings.node_id, plan.cluster_id, FORMAT_VERSION))
    try:
        incarnation = storage.incarnation()  # made now for a new data dir (or an older one)
    except (StorageError, ValueError) as e:
        raise StartupError(f"cannot read the state in {data}: {e}. {damaged}") from None
    # Millions of long-lived objects make every full collection stall the loop for tens of
    # milliseconds: move what boot loaded out of the collector's sight and make
    # young-generation collections rarer.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    return NodeState(storage, snapshots, sm, boot, plan, joining=joining,
                     incarnation=incarnation)


def check_recorded_addresses(settings: Settings, plan: StartPlan) -> None:
    """The addresses this start records in the membership, which the members will dial, are
    never wildcards (0.0.0.0 works only while every node is on one host). Checked only when
    they are recorded (a bootstrap, a join): a cluster that runs on them keeps starting."""
    try:
        if plan.kind is StartKind.BOOTSTRAP:
            for nid, address in sorted(settings.peer_map.items()):
                check_dialable(address, f"RAFTKV_PEERS[{nid}]",
                               "give the host name or IP address the members reach it at")
        elif plan.needs_join:
            name = "RAFTKV_RAFT_ADVERTISE" if settings.raft_advertise else "RAFTKV_RAFT_ADDR"
            check_dialable(settings.raft_advertise_addr, name,
                           "a joining node tells the members the address to dial it at: set "
                           "RAFTKV_RAFT_ADVERTISE (e.g. n4:5001)")
    except SettingsError as e:
        raise StartupError(str(e)) from None


def _root_digest(settings: Settings, bootstrapping: bool) -> bytes | None:
    """The root token's digest when this start bootstraps a cluster with auth. The file is
    read at that first start only (later it is not even opened), and never logged."""
    if not settings.root_token_file:
        return None
    if not bootstrapping:
        log.info("event=root_token_file_ignored node=%s reason=%s", settings.node_id,
                 "joining" if settings.join else "data_dir_has_state")
        return None
    try:
        return token_digest(read_root_token_file(settings.root_token_file))
    except RootTokenError as e:
        raise StartupError(str(e)) from None


def join_headers(settings: Settings) -> dict[str, str]:
    """The admin token for joining a cluster with auth (RAFTKV_JOIN_TOKEN_FILE)."""
    if not settings.join_token_file:
        return {}
    try:
        token = read_root_token_file(settings.join_token_file)
    except RootTokenError as e:
        reason = str(e).replace("root token", "join token").split(", e.g.")[0]
        raise StartupError(f"{reason}: RAFTKV_JOIN_TOKEN_FILE must hold the cluster's root "
                           "token or an admin token (`raftkv token create --role admin`)"
                           ) from None
    return {"Authorization": f"Bearer {token}"}
