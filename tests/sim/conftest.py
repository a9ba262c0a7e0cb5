"""Simulator fixtures: the seed list from the environment, and the end-of-run summary.

RAFTKV_SIM_SEEDS=N runs seeds 0..N-1 (default 1000) of the register simulator and seeds
0..N/8-1 of the lease simulator (tests/sim/leases.py, as if it were one more profile);
RAFTKV_SIM_FIRST_SEED=F starts both at F instead of 0 (F..F+N-1 and F..F+N/8-1), so a long
run can explore seeds no earlier run tried; RAFTKV_SIM_SEED=s runs exactly seed s of each
(and none of the other simulator tests).
The summary line is printed at the end of the pytest run (whatever `-s`/`-q` say) and written
to tests/sim/.last_summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from tests.sim.cluster import SimSummary

SUMMARY_KEY = pytest.StashKey[SimSummary]()
SUMMARY_PATH = Path(__file__).with_name(".last_summary.json")


def _env_int(name: str, default: int, least: int) -> int:
    text = os.environ.get(name, "").strip()
    try:
        value = int(text) if text else default
    except ValueError:
        raise pytest.UsageError(f"{name}={text!r}: must be a whole number") from None
    if value < least:
        raise pytest.UsageError(f"{name}={value}: must be at least {least}")
    return value


def _seeds(count: int) -> list[int]:
    one = os.environ.get("RAFTKV_SIM_SEED", "").strip()
    if one:
        return [_env_int("RAFTKV_SIM_SEED", 0, 0)]
    first = _env_int("RAFTKV_SIM_FIRST_SEED", 0, 0)
    return list(range(first, first + count))


def sim_seeds() -> list[int]:
    return _seeds(_env_int("RAFTKV_SIM_SEEDS", 1000, 0))


def lease_sim_seeds() -> list[int]:
    return _seeds(max(1, _env_int("RAFTKV_SIM_SEEDS", 1000, 0) // 8))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Replaying one seed (RAFTKV_SIM_SEED) runs that seed and nothing else of the simulator."""
    if not os.environ.get("RAFTKV_SIM_SEED", "").strip():
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        replay = isinstance(item, pytest.Function) and item.originalname in (
            "test_seed", "test_lease_seed")
        (drop if item.get_closest_marker("sim") and not replay else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def sim_summary(request: pytest.FixtureRequest) -> SimSummary:
    stash = request.config.stash
    if SUMMARY_KEY not in stash:
        stash[SUMMARY_KEY] = SimSummary()
    return stash[SUMMARY_KEY]


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    summary = config.stash.get(SUMMARY_KEY, None)
    if summary is None or not (summary.seeds or summary.injected_bugs):
        return
    terminalreporter.section("raftkv simulator")
    if summary.seeds:
        terminalreporter.write_line(summary.line())
    for key, found in sorted(summary.injected_bugs.items()):
        terminalreporter.write_line(
            f"injected bug ({key}) {found['description']}: caught at seed {found['seed']} "
            f"after {found['seeds_needed']} seed(s) [{found['profile']}]"
            + (f"; end to end: {found['end_to_end']}" if "end_to_end" in found else "")
        )
    try:
        SUMMARY_PATH.write_text(json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    except OSError as e:
        terminalreporter.write_line(f"(could not write {SUMMARY_PATH}: {e})")
