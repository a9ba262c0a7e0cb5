"""The simulator's replicated state machine: a set of registers (key -> value).

Commands are small JSON arrays `[op_id, op, key, value]` carrying a unique op id, so a client
can tell its own entry from another one applied at the same index. The machine keeps a running
CRC of everything it applied (`chain`): two replicas at the same applied index hold the same
state exactly when their chains are equal, which the invariants check cheaply after every event.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from raftkv.core.snapshots import SnapshotDecoder
from raftkv.core.types import Entry, EntryKind
from raftkv.ports import StateMachine

PUT = "put"
DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Command:
    op_id: int
    op: str
    key: str
    value: str | None = None

    def __post_init__(self) -> None:
        if self.op not in (PUT, DELETE):
            raise ValueError(f"unknown op {self.op!r}")


def encode_command(cmd: Command) -> bytes:
    return json.dumps([cmd.op_id, cmd.op, cmd.key, cmd.value], separators=(",", ":")).encode()


def decode_command(data: bytes) -> Command:
    op_id, op, key, value = json.loads(data)
    return Command(int(op_id), str(op), str(key), None if value is None else str(value))


@dataclass(frozen=True, slots=True)
class Applied:
    """What apply() returns: the op id of the command (None for no-ops and conf changes)."""

    op_id: int | None


class SimMachine(StateMachine, Protocol):
    """What the simulator needs of a node's state machine: a raftkv.ports.StateMachine with
    the running checksum (`chain`), the whole state to compare replicas (`values`) and its
    snapshot validator. RegisterMachine here; tests/sim/leases.LeaseMachine for the KV one."""

    @property
    def chain(self) -> int: ...
    @property
    def values(self) -> object: ...
    def snapshot_decoder(self) -> SnapshotDecoder: ...


class RegisterMachine:
    """Implements raftkv.ports.StateMachine."""

    def __init__(self) -> None:
        self._applied_index = 0
        self.values: dict[str, str] = {}
        self.chain = 0

    @property
    def applied_index(self) -> int:
        return self._applied_index

    def apply(self, entry: Entry) -> Applied:
        if entry.index != self._applied_index + 1:
            raise AssertionError(
                f"apply out of order: entry {entry.index} after applied {self._applied_index}"
            )
        self._applied_index = entry.index
        self.chain = zlib.crc32(b"%d/%d:" % (entry.index, entry.term) + entry.data, self.chain)
        if entry.kind is not EntryKind.NORMAL or not entry.data:
            return Applied(None)
        cmd = decode_command(entry.data)
        if cmd.op == PUT:
            assert cmd.value is not None
            self.values[cmd.key] = cmd.value
        else:
            self.values.pop(cmd.key, None)
        return Applied(cmd.op_id)

    def snapshot(self) -> bytes:
        state = {"index": self._applied_index, "chain": self.chain, "values": self.values}
        return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()

    def snapshot_chunks(self) -> Iterator[bytes]:
        data = self.snapshot()
        for start in range(0, len(data), SNAPSHOT_PIECE_BYTES):
            yield data[start : start + SNAPSHOT_PIECE_BYTES]

    def restore(self, data: bytes, index: int) -> None:
        self.install(parse_snapshot(data), index)

    def restore_chunks(self, chunks: Iterable[bytes], index: int) -> None:
        self.restore(b"".join(chunks), index)

    @staticmethod
    def snapshot_decoder() -> RegisterSnapshotDecoder:
        return RegisterSnapshotDecoder()

    def install(self, state: object, index: int) -> None:
        assert isinstance(state, dict)
        if state["index"] != index:
            raise AssertionError(f"snapshot data is at {state['index']}, meta says {index}")
        self._applied_index = index
        self.chain = int(state["chain"])
        self.values = {str(k): str(v) for k, v in state["values"].items()}


SNAPSHOT_PIECE_BYTES = 50
"""snapshot_chunks() yields this much at a time (several sink writes per snapshot)."""


def parse_snapshot(data: bytes) -> dict[str, object]:
    """The register snapshot in `data`; ValueError if it is not one."""
    state = json.loads(data)
    if not (isinstance(state, dict) and set(state) == {"index", "chain", "values"}
            and type(state["index"]) is int and type(state["chain"]) is int
            and isinstance(state["values"], dict)):
        raise ValueError("not a register snapshot")
    return state


class RegisterSnapshotDecoder:
    """The simulator's snapshot validator (raftkv.core.snapshots.SnapshotDecoder): refuses a
    first byte that cannot start the JSON object, then checks the whole at the end (the
    snapshots here are small)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if not self._parts and data and not data.startswith(b"{"):
            raise ValueError("not a register snapshot")
        self._parts.append(data)

    def finish(self) -> object:
        return parse_snapshot(b"".join(self._parts))
