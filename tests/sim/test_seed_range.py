"""Which simulator seeds a run takes from the environment (tests/sim/conftest.py)."""

from __future__ import annotations

import pytest

from tests.sim.conftest import lease_sim_seeds, sim_seeds


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAFTKV_SIM_SEEDS", "RAFTKV_SIM_FIRST_SEED", "RAFTKV_SIM_SEED"):
        monkeypatch.delenv(name, raising=False)


def test_default_and_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sim_seeds() == list(range(1000)) and lease_sim_seeds() == list(range(125))
    monkeypatch.setenv("RAFTKV_SIM_SEEDS", "20")
    assert sim_seeds() == list(range(20)) and lease_sim_seeds() == [0, 1]


def test_a_first_seed_moves_both_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAFTKV_SIM_SEEDS", "16")
    monkeypatch.setenv("RAFTKV_SIM_FIRST_SEED", "9000")
    assert sim_seeds() == list(range(9000, 9016))
    assert lease_sim_seeds() == [9000, 9001]


def test_one_seed_replays_exactly_that_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAFTKV_SIM_FIRST_SEED", "9000")
    monkeypatch.setenv("RAFTKV_SIM_SEED", "9007")
    assert sim_seeds() == [9007] and lease_sim_seeds() == [9007]


@pytest.mark.parametrize(("name", "value"), [
    ("RAFTKV_SIM_SEEDS", "many"), ("RAFTKV_SIM_SEEDS", "-1"),
    ("RAFTKV_SIM_FIRST_SEED", "1e3"), ("RAFTKV_SIM_FIRST_SEED", "-5"),
])
def test_a_bad_value_is_a_usage_error_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(pytest.UsageError, match=name):
        sim_seeds()
