"""The writer process of test_lmdb_store_kill9: persists steps through LmdbRaftStorage, forever.

    python -m tests.storage.lmdb_store_kill9_writer DATA_DIR START_STEP

It prints "synced <n>" after step n returned. Step n is a pure function of n and the state after
step n - 1 (`plan`), so the test knows the exact state after every step (`Model`) and can check
what a SIGKILL left behind. Steps are saves (entries with a hard state, sometimes with a new
term overwriting an uncommitted suffix) and, now and then, a compaction done in small chunks so
that a kill can land between two of its transactions.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

from raftkv.core.types import Entry, HardState
from storage.lmdb_store import LmdbRaftStorage

PAYLOAD_BYTES = 100
COMPACT_CHUNK_ENTRIES = 4
MAP_SIZE_BYTES = 64 << 20


@dataclass(frozen=True)
class State:
    """The log from `first` and the hard state, as the store should hold them."""

    first: int = 1
    entries: tuple[Entry, ...] = ()
    hard_state: HardState = field(default_factory=HardState)

    @property
    def last(self) -> int:
        return self.first + len(self.entries) - 1


@dataclass(frozen=True)
class Save:
    hard_state: HardState
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Compact:
    before_index: int


Step = Save | Compact


def plan(n: int, state: State) -> Step:
    rng = random.Random(n)
    hs = state.hard_state
    if n % 6 == 0 and hs.commit - state.first > 30:
        return Compact(hs.commit - 10)
    term = max(hs.term, 1) + (1 if rng.random() < 0.2 else 0)
    start = state.last + 1
    if term > hs.term and rng.random() < 0.5:  # a new leader overwrites an uncommitted suffix
        start = max(hs.commit + 1, state.first, start - rng.randint(0, 8))
    commit = rng.randint(hs.commit, start - 1) if start - 1 > hs.commit else hs.commit
    entries = tuple(
        Entry(i, term, data=f"{n}:{i}:".encode().ljust(PAYLOAD_BYTES, b"."))
        for i in range(start, start + rng.randint(1, 30))
    )
    return Save(HardState(term, "n1", commit), entries)


def apply(step: Step, state: State) -> State:
    if isinstance(step, Compact):
        drop = step.before_index - state.first
        return State(step.before_index, state.entries[drop:], state.hard_state)
    keep = state.entries[: step.entries[0].index - state.first]
    return State(state.first, keep + step.entries, step.hard_state)


class Model:
    """states[n] is the state after step n (states[0] is a new store), computed on demand."""

    def __init__(self) -> None:
        self._states = [State()]

    def __getitem__(self, n: int) -> State:
        while len(self._states) <= n:
            k = len(self._states)
            self._states.append(apply(plan(k, self._states[-1]), self._states[-1]))
        return self._states[n]


def main(argv: list[str]) -> int:
    data_dir, start = argv[1], int(argv[2])
    state = Model()[start - 1]
    store = LmdbRaftStorage(data_dir, map_size_bytes=MAP_SIZE_BYTES,
                            compact_chunk_entries=COMPACT_CHUNK_ENTRIES)
    for n in range(start, start + 1_000_000):
        step = plan(n, state)
        if isinstance(step, Save):
            store.save(step.hard_state, step.entries)
        else:
            store.compact(step.before_index)
        state = apply(step, state)
        print(f"synced {n}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
