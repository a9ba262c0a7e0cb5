"""The simulator's replicated state machine: a set of registers (key -> value).

Commands are small JSON arrays `[op_id, op, key, value]` carrying a unique op id, so a client
can tell its own entry from another one applied at the same index. The machine keeps a running
CRC of everything it applied (`chain`): two replicas at the same applied index hold the same
state exactly when their chains are equal, which the invariants check cheaply after every event.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

from raftkv.core.types import Entry, EntryKind

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

    def restore(self, data: bytes, index: int) -> None:
        state = json.loads(data)
        if state["index"] != index:
            raise AssertionError(f"snapshot data is at {state['index']}, meta says {index}")
        self._applied_index = index
        self.chain = int(state["chain"])
        self.values = {str(k): str(v) for k, v in state["values"].items()}
