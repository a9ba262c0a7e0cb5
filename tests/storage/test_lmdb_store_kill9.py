"""SIGKILL a writer process at random moments: every save it reported synced survives.

The writer (tests/storage/lmdb_store_kill9_writer.py) prints "synced <n>" after step n
returned. After each kill the test reopens the data dir and requires the exact state after the
last reported step, or after the step that was in flight (it may have committed before the
kill); a compaction in flight may have removed part of the prefix. The next writer resumes
from what is on disk. Replay a run with RAFTKV_KILL9_SEED=<seed>.
"""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from storage.lmdb_store import LmdbRaftStorage
from tests.storage.lmdb_store_kill9_writer import MAP_SIZE_BYTES, Compact, Model, State, plan

REPO_ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 30
MIN_ITERATIONS = 8
TIME_BUDGET_S = 30.0
LINE_TIMEOUT_S = 20.0
MAX_LINES_BEFORE_KILL = 25
MAX_KILL_DELAY_S = 0.02


class LineReader:
    """The lines of a pipe, read by a thread, so the test can wait on them with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next_line(self, timeout_s: float) -> str | None:
        """The next line; None at end of file. Raises queue.Empty after timeout_s."""
        return self._lines.get(timeout=timeout_s)


def observe(store: LmdbRaftStorage) -> State:
    first, last = store.first_index(), store.last_index()
    return State(first, tuple(store.entries(first, last + 1)), store.hard_state())


def check_invariants(state: State) -> None:
    """What must hold after any crash, whatever the writer was doing."""
    indices = [e.index for e in state.entries]
    assert indices == list(range(state.first, state.last + 1)), "log is not contiguous"
    log_terms = [e.term for e in state.entries]
    assert log_terms == sorted(log_terms), "log terms decrease"
    if state.entries:
        assert state.hard_state.term >= log_terms[-1], "hard state term behind the log"
    assert state.hard_state.commit <= state.last, "commit index beyond the log"


def settled_step(actual: State, synced: int, model: Model) -> int:
    """The step the store is at: `synced`, or synced + 1 if the in-flight step committed.

    A compaction in flight may have deleted part of the prefix: that counts as `synced` (the
    next writer redoes the compaction).
    """
    if actual == model[synced]:
        return synced
    if actual == model[synced + 1]:
        return synced + 1
    before, after = model[synced], model[synced + 1]
    if (isinstance(plan(synced + 1, before), Compact)
            and before.first <= actual.first <= after.first
            and actual.hard_state == before.hard_state
            and actual.entries == before.entries[actual.first - before.first:]):
        return synced
    raise AssertionError(
        f"after step {synced} was reported synced the store holds log [{actual.first}, "
        f"{actual.last}] hard state {actual.hard_state}; expected step {synced} (log "
        f"[{before.first}, {before.last}], {before.hard_state}) or step {synced + 1} "
        f"(log [{after.first}, {after.last}], {after.hard_state})")


def run_writer_and_kill(data_dir: Path, start: int, lines_before_kill: int,
                        kill_delay_s: float, stderr_path: Path) -> int:
    """Start a writer at step `start`; SIGKILL it kill_delay_s after its lines_before_kill-th
    line (or after start when that is 0). Returns the last step it reported synced."""
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.storage.lmdb_store_kill9_writer", str(data_dir),
             str(start)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert proc.stdout is not None
    reader = LineReader(proc.stdout)
    synced = start - 1
    ended = False

    def take(line: str | None) -> None:
        nonlocal synced, ended
        if line is None:
            ended = True
            return
        assert line == f"synced {synced + 1}", f"unexpected writer output {line!r}"
        synced += 1

    try:
        while synced - start + 1 < lines_before_kill and not ended:
            take(reader.next_line(LINE_TIMEOUT_S))
        # The kill moment: keep taking lines until it comes (this waits for nothing).
        kill_at = time.monotonic() + kill_delay_s
        while not ended and (left_s := kill_at - time.monotonic()) > 0:
            try:
                take(reader.next_line(left_s))
            except queue.Empty:
                break
    finally:
        proc.kill()
        proc.wait(timeout=LINE_TIMEOUT_S)
    while not ended:  # lines written before the kill landed are synced steps too
        take(reader.next_line(LINE_TIMEOUT_S))
    assert proc.returncode == -9, (
        f"writer exited by itself ({proc.returncode}): {stderr_path.read_text()}")
    return synced


def test_synced_saves_survive_sigkill_at_random_moments(tmp_path: Path) -> None:
    seed = int(os.environ.get("RAFTKV_KILL9_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    data_dir = tmp_path / "raft"
    model = Model()
    step = 0  # the step the store is known to be at
    deadline = time.monotonic() + TIME_BUDGET_S
    iterations = 0
    while iterations < ITERATIONS and (iterations < MIN_ITERATIONS
                                       or time.monotonic() < deadline):
        synced = run_writer_and_kill(data_dir, step + 1, rng.randint(0, MAX_LINES_BEFORE_KILL),
                                     rng.uniform(0, MAX_KILL_DELAY_S), tmp_path / "writer.err")
        with LmdbRaftStorage(data_dir, map_size_bytes=MAP_SIZE_BYTES) as store:
            actual = observe(store)
        try:
            check_invariants(actual)
            step = settled_step(actual, synced, model)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, iteration {iterations}: {e}") from e
        iterations += 1
    assert step > 0, f"seed {seed}: the writer never synced anything"
