"""Tests for the per-key register linearizability checker (tests/support/linearizability.py)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.linearizability import (
    CheckResult,
    Operation,
    Outcome,
    _prepare,
    _search,
    check_history,
    format_violation,
)

OK = Outcome.OK
FAILED = Outcome.FAILED
UNKNOWN = Outcome.UNKNOWN


def op(
    process: int,
    kind: str,
    value: object | None,
    invoke: float,
    complete: float | None,
    outcome: Outcome = OK,
    key: str = "k",
) -> Operation:
    return Operation(
        process=process,
        kind=kind,
        key=key,
        value=value,
        invoke=invoke,
        complete=complete,
        outcome=outcome,
    )


def w(
    p: int, v: object, t0: float, t1: float | None, out: Outcome = OK, key: str = "k"
) -> Operation:
    """A write by process p of v over [t0, t1]."""
    return op(p, "write", v, t0, t1, out, key)


def r(
    p: int, v: object | None, t0: float, t1: float | None, out: Outcome = OK, key: str = "k"
) -> Operation:
    """A read by process p returning v (None: absent) over [t0, t1]."""
    return op(p, "read", v, t0, t1, out, key)


def d(p: int, t0: float, t1: float | None, out: Outcome = OK, key: str = "k") -> Operation:
    """A delete by process p over [t0, t1]."""
    return op(p, "delete", None, t0, t1, out, key)


def assert_ok(result: CheckResult) -> None:
    assert result.ok, "\n\n".join(format_violation(v) for v in result.violations)
    assert result.violations == ()


# --------------------------------------------------------------------------- hand-made


def test_valid_sequential_history_is_ok() -> None:
    history = [
        r(0, None, 0, 1),
        w(0, 1, 2, 3),
        r(1, 1, 4, 5),
        w(1, 2, 6, 7),
        r(0, 2, 8, 9),
        r(2, 2, 10, 11),
    ]
    result = check_history(history)
    assert_ok(result)
    assert result.checked_operations == 6
    assert result.unknown_operations == 0


def test_read_concurrent_with_write_may_see_the_new_value() -> None:
    history = [w(0, 1, 0, 1), w(0, 2, 2, 6), r(1, 2, 3, 4)]
    assert_ok(check_history(history))


def test_read_concurrent_with_write_may_see_the_old_value() -> None:
    history = [w(0, 1, 0, 1), w(0, 2, 2, 6), r(1, 1, 3, 4), r(1, 2, 7, 8)]
    assert_ok(check_history(history))


def test_concurrent_reads_must_agree_on_a_single_order() -> None:
    # Two readers see the concurrent writes in opposite orders: not linearizable.
    # No single stale read shows it, so the search has to find it.
    history = [
        w(0, 1, 0, 10),
        w(1, 2, 0, 10),
        r(2, 1, 1, 2),
        r(2, 2, 3, 4),
        r(3, 2, 1, 2),
        r(3, 1, 3, 4),
    ]
    result = check_history(history)
    assert not result.ok
    (v,) = result.violations
    assert not v.inconclusive
    assert "stale read" not in v.message
    assert "Longest linearizable prefix found" in v.message
    assert v.stuck is not None and v.stuck in v.operations


def test_read_of_older_value_after_a_read_of_newer_value_is_a_violation() -> None:
    # The new value was observed, so the write surely took effect before the
    # second read started, even though the write itself had not completed.
    history = [w(0, 1, 0, 1), w(1, 2, 2, 10), r(2, 2, 3, 4), r(3, 1, 5, 6)]
    result = check_history(history)
    assert not result.ok
    (v,) = result.violations
    assert v.stuck == history[3]
    assert "a read returned its value by then" in v.message


def test_definite_violation_is_reported_even_with_a_tiny_state_budget() -> None:
    history = [w(0, 1, 0, 1), w(1, 2, 2, 3), r(2, 1, 4, 5)]
    result = check_history(history, max_states=1)
    assert not result.ok
    assert not result.inconclusive
    assert "stale read" in result.violations[0].message


def test_stale_read_is_a_violation() -> None:
    stale = r(2, 1, 4, 5)
    history = [w(0, 1, 0, 1), w(1, 2, 2, 3), stale]
    result = check_history(history)
    assert not result.ok
    assert not result.inconclusive
    (v,) = result.violations
    assert v.key == "k"
    assert not v.inconclusive
    assert v.stuck == stale
    assert stale in v.operations
    assert history[1] in v.operations  # the write whose value the read should have seen
    assert "stale read" in v.message
    assert "2 of 3" in v.message  # the longest linearizable prefix
    assert "register held 2" in v.message


def test_lost_acknowledged_write_is_a_violation() -> None:
    history = [
        w(0, "old", 0, 1),
        w(1, "new", 2, 3),
        r(2, "old", 4, 5),
        r(3, "old", 10, 11),
        r(2, "old", 20, 21),
    ]
    result = check_history(history)
    assert not result.ok
    (v,) = result.violations
    assert v.stuck == history[2]


def test_read_of_value_before_its_write_was_invoked_is_a_violation() -> None:
    history = [r(0, 1, 0, 1), w(1, 1, 2, 3)]
    result = check_history(history)
    assert not result.ok
    assert result.violations[0].stuck == history[0]


def test_unknown_write_that_must_have_taken_effect_is_ok() -> None:
    history = [w(0, 1, 0, 1), w(1, 2, 2, None, UNKNOWN), r(2, 2, 5, 6), r(3, 2, 7, 8)]
    result = check_history(history)
    assert_ok(result)
    assert result.unknown_operations == 1
    assert result.checked_operations == 4


def test_unknown_write_may_take_effect_long_after_its_invocation() -> None:
    history = [w(0, 1, 0, 1), w(1, 2, 2, math.inf, UNKNOWN), r(2, 1, 5, 6), r(3, 2, 7, 8)]
    assert_ok(check_history(history))


def test_unknown_write_never_observed_is_ok() -> None:
    history = [w(0, 1, 0, 1), w(1, 2, 2, None, UNKNOWN), r(2, 1, 5, 6), r(3, 1, 7, 8)]
    assert_ok(check_history(history))


def test_unknown_write_cannot_be_undone_after_being_observed() -> None:
    history = [w(0, 1, 0, 1), w(1, 2, 2, None, UNKNOWN), r(2, 2, 5, 6), r(3, 1, 7, 8)]
    result = check_history(history)
    assert not result.ok
    assert result.violations[0].stuck == history[3]


def test_unknown_write_cannot_take_effect_before_its_invocation() -> None:
    history = [w(0, 1, 0, 1), r(2, 2, 2, 3), w(1, 2, 4, None, UNKNOWN)]
    assert not check_history(history).ok


def test_failed_write_observed_by_a_read_is_a_violation() -> None:
    history = [w(0, 1, 0, 1), w(1, 2, 2, 3, FAILED), r(2, 2, 4, 5)]
    result = check_history(history)
    assert not result.ok
    assert result.checked_operations == 2


def test_failed_and_unknown_reads_carry_no_information() -> None:
    history = [
        w(0, 1, 0, 1),
        r(1, "garbage", 2, 3, FAILED),
        r(2, "nonsense", 2, None, UNKNOWN),
        r(3, 1, 4, 5),
    ]
    result = check_history(history)
    assert_ok(result)
    assert result.checked_operations == 2
    assert result.unknown_operations == 1


def test_delete_then_read_absent_is_ok() -> None:
    history = [w(0, 1, 0, 1), d(0, 2, 3), r(1, None, 4, 5)]
    assert_ok(check_history(history))


def test_read_of_deleted_value_after_delete_completed_is_a_violation() -> None:
    history = [w(0, 1, 0, 1), d(0, 2, 3), r(1, 1, 4, 5)]
    assert not check_history(history).ok


def test_unknown_delete_observed_by_an_absent_read_is_ok() -> None:
    history = [w(0, 1, 0, 1), d(1, 2, None, UNKNOWN), r(2, None, 4, 5)]
    assert_ok(check_history(history))


def test_read_absent_before_any_write_uses_the_initial_value() -> None:
    assert_ok(check_history([r(0, None, 0, 1)]))
    assert not check_history([r(0, None, 0, 1)], initial=0).ok
    assert_ok(check_history([r(0, 0, 0, 1), w(0, 5, 2, 3), r(1, 5, 4, 5)], initial=0))


def test_touching_intervals_count_as_concurrent() -> None:
    # The read completes at the very instant the write is invoked.
    assert_ok(check_history([r(0, 1, 0, 2), w(1, 1, 2, 3)]))


def test_independent_keys_do_not_interfere() -> None:
    history = [
        w(0, 1, 0, 1, key="a"),
        w(1, 1, 0, 1, key="b"),
        w(0, 2, 2, 3, key="a"),
        r(1, 1, 4, 5, key="b"),  # b still holds 1: fine although a now holds 2
        r(2, 2, 4, 5, key="a"),
    ]
    assert_ok(check_history(history))


def test_violation_on_one_key_does_not_flag_another() -> None:
    history = [
        w(0, 1, 0, 1, key="a"),
        r(1, 1, 2, 3, key="a"),
        w(0, 1, 0, 1, key="b"),
        w(0, 2, 2, 3, key="b"),
        r(1, 1, 4, 5, key="b"),
    ]
    result = check_history(history)
    assert not result.ok
    assert [v.key for v in result.violations] == ["b"]
    assert all(o.key == "b" for o in result.violations[0].operations)


def test_duplicate_write_values_are_handled_correctly() -> None:
    # Two writes of the same value: the read of 1 after the write of 2 is explained
    # by the second write of 1, which is concurrent with it.
    history = [w(0, 1, 0, 1), w(0, 2, 2, 3), w(1, 1, 2, 10, UNKNOWN), r(2, 1, 4, 5)]
    assert_ok(check_history(history))
    history = [w(0, 1, 0, 1), w(0, 2, 2, 3), w(1, 1, 6, 10, UNKNOWN), r(2, 1, 4, 5)]
    assert not check_history(history).ok


def test_unhashable_values_are_compared_by_equality() -> None:
    history = [w(0, [1, 2], 0, 1), r(1, [1, 2], 2, 3), w(0, {"a": 1}, 4, 5), r(1, {"a": 1}, 6, 7)]
    assert_ok(check_history(history))
    assert not check_history([w(0, [1, 2], 0, 1), r(1, [2, 1], 2, 3)]).ok


def test_empty_history_is_ok() -> None:
    result = check_history([])
    assert_ok(result)
    assert result.checked_operations == 0


@pytest.mark.parametrize(
    "bad",
    [
        op(0, "cas", 1, 0, 1),
        op(0, "write", 1, 0, None, OK),
        op(0, "write", 1, 0, math.inf, OK),
        op(0, "write", 1, 5, 4, OK),
    ],
)
def test_malformed_operations_are_rejected(bad: Operation) -> None:
    with pytest.raises(ValueError):
        check_history([bad])


def test_format_violation_shows_the_stale_read() -> None:
    history = [w(0, "v1", 0, 1), w(1, "v2", 2, 3), r(2, "v1", 4, 5), r(3, "v2", 4.5, 6)]
    result = check_history(history)
    (v,) = result.violations
    text = format_violation(v)
    assert "LINEARIZABILITY VIOLATION" in text
    assert "'k'" in text
    assert "'v1'" in text and "'v2'" in text
    marked = [line for line in text.splitlines() if line.lstrip().startswith(">>")]
    assert len(marked) == 1
    assert "'v1'" in marked[0] and "read" in marked[0]
    # the concurrent read is among the operations shown
    assert history[3] in v.operations


def test_exhausted_state_budget_is_reported_as_inconclusive() -> None:
    history = generate_valid_history(random.Random(7), n_ops=60, keys=["k"], concurrency=3)
    assert_ok(check_history(history))
    result = check_history(history, max_states=5)
    assert not result.ok
    assert result.inconclusive
    (v,) = result.violations
    assert v.inconclusive
    assert "INCONCLUSIVE" in v.message
    assert format_violation(v).startswith("INCONCLUSIVE")


def test_long_sequential_history_needs_no_recursion() -> None:
    history = []
    t = 0.0
    for i in range(10_000):
        history.append(w(i % 3, i, t, t + 1))
        history.append(r((i + 1) % 3, i, t + 2, t + 3))
        t += 4
    assert_ok(check_history(history))


# --------------------------------------------------------------------------- generators


def generate_valid_history(
    rng: random.Random,
    *,
    n_ops: int,
    keys: Sequence[str],
    concurrency: int,
    unknown_rate: float = 0.05,
    failed_rate: float = 0.05,
) -> list[Operation]:
    """A history produced by a real (atomic) register per key with random timing.

    Each process issues one operation at a time; every effective operation takes
    effect at a random instant inside its interval (UNKNOWN writes possibly later,
    or never), so the history is linearizable by construction.
    """
    clocks = [rng.uniform(0.0, 1.0) for _ in range(concurrency)]
    counters = dict.fromkeys(keys, 0)
    # (linearization point, index, kind, key, value or None, outcome, process, invoke, complete)
    planned: list[tuple[float, int, str, str, object | None, Outcome, int, float, float | None]]
    planned = []
    for idx in range(n_ops):
        p = min(range(concurrency), key=clocks.__getitem__)
        invoke = clocks[p]
        complete = invoke + rng.uniform(0.1, 3.0)
        clocks[p] = complete + rng.uniform(0.0, 0.5)
        key = rng.choice(keys)
        kind = rng.choices(["read", "write", "delete"], weights=[5, 4, 1])[0]
        roll = rng.random()
        outcome = OK
        if roll < unknown_rate:
            outcome = UNKNOWN
        elif roll < unknown_rate + failed_rate:
            outcome = FAILED
        value: object | None = None
        if kind == "write":
            counters[key] += 1
            value = f"{key}-{counters[key]}"
        lin = rng.uniform(invoke, complete)
        if outcome is UNKNOWN:
            lin = invoke + rng.uniform(0.0, 10.0) if rng.random() < 0.5 else math.inf
        elif outcome is FAILED:
            lin = math.inf
        shown_complete = None if outcome is UNKNOWN else complete
        planned.append((lin, idx, kind, key, value, outcome, p, invoke, shown_complete))

    state: dict[str, object | None] = {}
    ops: list[Operation | None] = [None] * n_ops
    for lin, idx, kind, key, value, outcome, p, invoke, done in sorted(planned):
        observed = value
        if kind == "read":
            observed = state.get(key) if outcome is OK else "garbage"
        elif math.isfinite(lin):
            state[key] = value  # delete stores None (absent)
        ops[idx] = Operation(p, kind, key, observed, invoke, done, outcome)
    return [o for o in ops if o is not None]


def test_generated_valid_histories_are_ok() -> None:
    for seed in range(30):
        rng = random.Random(seed)
        history = generate_valid_history(rng, n_ops=200, keys=["a", "b"], concurrency=4)
        assert_ok(check_history(history))


def test_performance_2000_ops_5_keys_concurrency_5_is_ok() -> None:
    history = generate_valid_history(
        random.Random(2024), n_ops=2000, keys=[f"key{i}" for i in range(5)], concurrency=5
    )
    result = check_history(history)
    assert_ok(result)
    assert result.checked_operations > 1500


def test_performance_3000_ops_on_one_key_is_ok() -> None:
    history = generate_valid_history(random.Random(99), n_ops=3000, keys=["hot"], concurrency=5)
    assert_ok(check_history(history))


def long_history_ending_in_a_stale_read(seed: int, n_ops: int) -> list[Operation]:
    history = generate_valid_history(random.Random(seed), n_ops=n_ops, keys=["k"], concurrency=5)
    end = max(o.invoke if o.complete is None else o.complete for o in history) + 20
    # Settle the register with fresh writes, then read the overwritten value.
    history.append(w(0, "settled", end, end + 1))
    history.append(w(1, "final", end + 2, end + 3))
    history.append(r(2, "settled", end + 4, end + 5))
    return history


def test_stale_read_at_the_end_of_a_long_history_is_found() -> None:
    history = long_history_ending_in_a_stale_read(5, 2000)
    result = check_history(history)
    assert not result.ok
    (v,) = result.violations
    assert not v.inconclusive
    assert v.stuck == history[-1]
    assert "stale read" in v.message


def test_search_alone_proves_the_stale_read_in_a_long_history() -> None:
    history = long_history_ending_in_a_stale_read(6, 1000)
    assert not search_only_linearizable(history, None)


# --------------------------------------------------------------------------- brute force


def brute_force_linearizable(ops: Sequence[Operation], initial: object | None) -> bool:
    """Try every subset of UNKNOWN writes and every order respecting real time."""
    certain = [o for o in ops if o.outcome is OK]
    maybe = [o for o in ops if o.outcome is UNKNOWN and o.kind != "read"]

    def end(o: Operation) -> float:
        assert o.complete is not None or o.outcome is UNKNOWN
        return math.inf if o.outcome is UNKNOWN or o.complete is None else o.complete

    def legal(order: Sequence[Operation]) -> bool:
        for i, later in enumerate(order):
            for earlier in order[i + 1 :]:
                if end(earlier) < later.invoke:
                    return False  # `earlier` finished before `later` started
        state: dict[str, object | None] = {}
        for o in order:
            current = state.get(o.key, initial)
            if o.kind == "read":
                if o.value != current:
                    return False
            elif o.kind == "write":
                state[o.key] = o.value
            else:
                state[o.key] = None
        return True

    for size in range(len(maybe) + 1):
        for chosen in itertools.combinations(maybe, size):
            if any(legal(p) for p in itertools.permutations(certain + list(chosen))):
                return True
    return False


def test_brute_force_agrees_on_hand_made_examples() -> None:
    assert brute_force_linearizable([w(0, 1, 0, 1), w(1, 2, 2, 3), r(2, 2, 4, 5)], None)
    assert not brute_force_linearizable([w(0, 1, 0, 1), w(1, 2, 2, 3), r(2, 1, 4, 5)], None)
    assert brute_force_linearizable([w(1, 2, 2, None, UNKNOWN), r(2, None, 4, 5)], None)


VALUES = [1, 2, 3]


@st.composite
def small_histories(draw: st.DrawFn) -> tuple[list[Operation], object | None]:
    n = draw(st.integers(min_value=0, max_value=6))
    history: list[Operation] = []
    for _ in range(n):
        kind = draw(st.sampled_from(["read", "write", "write", "delete"]))
        key = draw(st.sampled_from(["a", "a", "a", "b"]))
        if kind == "read":
            value: object | None = draw(st.sampled_from([None, *VALUES]))
        elif kind == "write":
            value = draw(st.sampled_from(VALUES))
        else:
            value = None
        invoke = draw(st.integers(min_value=0, max_value=10))
        complete: float | None = invoke + draw(st.integers(min_value=0, max_value=5))
        outcome = draw(st.sampled_from([OK, OK, OK, FAILED, UNKNOWN, UNKNOWN]))
        if outcome is UNKNOWN:
            complete = draw(st.sampled_from([None, math.inf, complete]))
        process = draw(st.integers(min_value=0, max_value=3))
        history.append(Operation(process, kind, key, value, invoke, complete, outcome))
    initial = draw(st.sampled_from([None, 1]))
    return history, initial


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_histories())
def test_checker_agrees_with_brute_force(case: tuple[list[Operation], object | None]) -> None:
    history, initial = case
    expected = brute_force_linearizable(history, initial)
    result = check_history(history, initial=initial)
    assert result.ok == expected, (history, initial, *map(format_violation, result.violations))
    assert not result.inconclusive
    for v in result.violations:
        assert v.stuck is not None and v.stuck in v.operations


@st.composite
def small_valid_histories(draw: st.DrawFn) -> list[Operation]:
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    n = draw(st.integers(min_value=0, max_value=6))
    return generate_valid_history(
        random.Random(seed),
        n_ops=n,
        keys=["a", "b"],
        concurrency=3,
        unknown_rate=0.3,
        failed_rate=0.2,
    )


@settings(max_examples=200, deadline=None)
@given(small_valid_histories())
def test_generated_small_histories_are_ok_for_both_checkers(history: list[Operation]) -> None:
    assert brute_force_linearizable(history, None)
    assert_ok(check_history(history))


def search_only_linearizable(ops: Sequence[Operation], initial: object | None) -> bool:
    """The result of the exhaustive search alone, without the quick checks."""
    by_key: dict[str, list[Operation]] = {}
    for o in ops:
        if o.outcome is OK or (o.outcome is UNKNOWN and o.kind != "read"):
            by_key.setdefault(o.key, []).append(o)
    for key, key_ops in by_key.items():
        prepared = _prepare(key, key_ops, initial)
        if prepared is None:
            continue
        status, _, _ = _search(prepared, 10**9)
        assert status != "inconclusive"
        if status != "ok":
            return False
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_histories())
def test_search_alone_agrees_with_brute_force(case: tuple[list[Operation], object | None]) -> None:
    history, initial = case
    assert search_only_linearizable(history, initial) == brute_force_linearizable(history, initial)


@st.composite
def small_unique_value_histories(draw: st.DrawFn) -> tuple[list[Operation], object | None]:
    """Like small_histories, but every write of a key writes a distinct value."""
    history, initial = draw(small_histories())
    fresh = itertools.count(10)
    written: dict[str, list[object]] = {}
    unique: list[Operation] = []
    for o in history:
        if o.kind == "write":
            value = next(fresh)
            written.setdefault(o.key, []).append(value)
            unique.append(dataclasses.replace(o, value=value))
        else:
            unique.append(o)
    # Reads return the initial value, absent, a written value or an unwritten one.
    final: list[Operation] = []
    for o in unique:
        if o.kind == "read":
            choices: list[object | None] = [None, 1, 99, *written.get(o.key, [])]
            final.append(dataclasses.replace(o, value=draw(st.sampled_from(choices))))
        else:
            final.append(o)
    return final, initial


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_unique_value_histories())
def test_checker_agrees_with_brute_force_on_unique_values(
    case: tuple[list[Operation], object | None],
) -> None:
    history, initial = case
    expected = brute_force_linearizable(history, initial)
    result = check_history(history, initial=initial)
    assert result.ok == expected, (history, initial, *map(format_violation, result.violations))
    assert search_only_linearizable(history, initial) == expected
