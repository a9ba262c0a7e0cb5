"""A linearizability checker for histories of per-key registers.

Used by the deterministic simulator (``tests/sim``) and by the fault-injection
tests against real processes (``tests/faults``).

Model
-----
Every key is an independent register (linearizability is local, so keys are
checked separately).  A register holds a value or is *absent* (``None``).

* ``write`` sets the register to ``value``; ``delete`` sets it to absent.
* ``read`` must return the register's value at its linearization point
  (``None`` meaning the key was absent).

Outcomes:

* ``OK``       -- the operation took effect exactly once, at some instant in
  ``[invoke, complete]``.
* ``FAILED``   -- the operation surely had no effect; it is dropped (a failed
  read carries no information either).
* ``UNKNOWN``  -- a write/delete may have taken effect at any instant after its
  invocation, or never; its ``complete`` is ignored (treated as infinity).
  Unknown reads are dropped.

Two operations whose intervals merely touch (``a.complete == b.invoke``) are
treated as concurrent.

Algorithm
---------
Wing & Gong's search with Lowe's just-in-time linearization and memoisation,
as in Porcupine.  A key's call and return events are put in a doubly linked
list sorted by time; from each configuration the search may linearize any
operation whose call precedes the first pending return, lifting it out of the
list, and it backtracks when nothing can be linearized before that return.
The search runs on an explicit stack (no recursion limit) and memoises the
configurations it has explored as ``(linearized bitset, register state)``.
``max_states`` bounds the number of configurations explored *per key*; when
it is exhausted the key gets a violation with ``inconclusive=True`` (so
``CheckResult.ok`` is False; ``CheckResult.inconclusive`` tells them apart).

Sound reductions that keep it fast (none relies on unique values for
correctness, several are only effective with them):

* an UNKNOWN write whose value no read returns is dropped ("never took
  effect" is as good as any placement), and values no read returns collapse
  into one register state;
* a write that is the sole source of a value (no other write of it, not the
  initial value) must take effect before the earliest read of that value
  completes: that becomes its deadline (an UNKNOWN write's only deadline);
* the other UNKNOWN writes are linearized only directly before a read of
  their value, and of several such writes of one value the earliest
  invoked is used (they are interchangeable);
* a read returning the current state is linearized at once without
  alternatives, and a configuration in which a pending read wants a value no
  remaining write can produce is abandoned;
* steps are tried earliest deadline first (a write inheriting the deadline of
  the pending reads of its value).

Before searching, cheap necessary conditions are checked (a read of a value
nothing wrote before it completed; a stale read overwritten by a write that
surely took effect in between).  When one fails the violation is definite and
is reported precisely, completed by the longest linearizable prefix when a
small search finds it.  Otherwise a failed search reports the longest
linearizable prefix it found and the first operation it could not linearize
there, together with the operations concurrent with it.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CheckResult",
    "Operation",
    "Outcome",
    "Violation",
    "check_history",
    "format_violation",
]

_KINDS = frozenset({"read", "write", "delete"})


class Outcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Operation:
    process: int
    """Client id."""
    kind: str
    """``"read"``, ``"write"`` or ``"delete"`` (delete sets the register to absent)."""
    key: str
    value: object | None
    """The written value; for a read the value observed (``None`` = key absent)."""
    invoke: float
    complete: float | None
    """Completion time; ``None`` (or ``math.inf``) when the outcome is UNKNOWN."""
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Violation:
    key: str
    message: str
    operations: tuple[Operation, ...]
    """The operations around the violation (sorted by invocation), for printing."""
    inconclusive: bool = False
    """True when the search gave up (state budget exhausted): no verdict."""
    stuck: Operation | None = None
    """The first operation the deepest search path could not linearize."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    violations: tuple[Violation, ...]
    checked_operations: int
    """Operations that took part in the check (OK ops and UNKNOWN writes/deletes)."""
    unknown_operations: int
    """Operations in the input whose outcome was UNKNOWN (including dropped reads)."""

    @property
    def inconclusive(self) -> bool:
        """True when at least one key could not be decided within the budget."""
        return any(v.inconclusive for v in self.violations)


# --------------------------------------------------------------------------- helpers


class _Interner:
    """Maps values to small ints by equality (values may be unhashable)."""

    __slots__ = ("_by_hash", "_unhashable", "values")

    def __init__(self) -> None:
        self._by_hash: dict[object, int] = {}
        self._unhashable: list[int] = []
        self.values: list[object | None] = []

    def intern(self, value: object | None) -> int:
        try:
            found = self._by_hash.get(value)
        except TypeError:
            for idx, known in enumerate(self.values):
                if known == value:
                    return idx
            idx = len(self.values)
            self.values.append(value)
            self._unhashable.append(idx)
            return idx
        if found is not None:
            return found
        for idx in self._unhashable:  # e.g. frozenset({1}) == {1}
            if self.values[idx] == value:
                return idx
        idx = len(self.values)
        self.values.append(value)
        self._by_hash[value] = idx
        return idx


def _validate(op: Operation) -> None:
    if op.kind not in _KINDS:
        raise ValueError(f"unknown operation kind {op.kind!r} in {op!r}")
    if not isinstance(op.outcome, Outcome):
        raise ValueError(f"outcome must be an Outcome, got {op.outcome!r}")
    if not math.isfinite(op.invoke):
        raise ValueError(f"the invocation time must be finite: {op!r}")
    if op.outcome is Outcome.OK:
        if op.complete is None or not math.isfinite(op.complete):
            raise ValueError(f"an OK operation needs a finite completion time: {op!r}")
        if op.complete < op.invoke:
            raise ValueError(f"operation completes before it is invoked: {op!r}")


def _fmt_time(t: float | None) -> str:
    if t is None or math.isinf(t):
        return "?"
    if float(t).is_integer():
        return str(int(t))
    return f"{t:.6g}"


def _fmt_op(op: Operation) -> str:
    if op.kind == "delete":
        what = "delete"
    elif op.kind == "write":
        what = f"write {op.value!r}"
    else:
        what = f"read -> {op.value!r}" if op.value is not None else "read -> <absent>"
    return (
        f"p{op.process} {what} [{_fmt_time(op.invoke)}, {_fmt_time(op.complete)}] {op.outcome.name}"
    )


def _fmt_value(value: object | None) -> str:
    return "<absent>" if value is None else repr(value)


# --------------------------------------------------------------------------- per key

_UNSEEN = -1
"""Register state standing for every value no read returns (they are equivalent)."""

_PREFIX_BUDGET = 20_000
"""States spent on the longest-prefix search after a cheap check found a violation."""


@dataclass(slots=True)
class _Key:
    """One key's operations, prepared for checking (indexed 0..n-1)."""

    key: str
    initial: object | None
    ops: list[Operation]
    val: list[int]  # interned value (a read: returned; a write/delete: resulting)
    deadline: list[float]  # latest instant it can take effect; inf = "free" unknown
    is_read: list[bool]
    sole_source: list[bool]  # its value has exactly one source (write or initial)
    init_id: int
    read_values: set[int]
    dropped: int  # unknown writes ignored because nothing observed them


def _prepare(key: str, ops: Sequence[Operation], initial: object | None) -> _Key | None:
    """Intern values, drop unobservable unknown writes and compute deadlines."""
    interner = _Interner()
    init_id = interner.intern(initial)
    val = [interner.intern(None if op.kind == "delete" else op.value) for op in ops]

    first_read_done: dict[int, float] = {}  # earliest completion of a read of x
    sources: dict[int, int] = {init_id: 1}  # writes (or the initial value) giving x
    for i, op in enumerate(ops):
        if op.kind == "read":
            assert op.complete is not None
            first_read_done[val[i]] = min(first_read_done.get(val[i], math.inf), op.complete)
        else:
            sources[val[i]] = sources.get(val[i], 0) + 1

    # An UNKNOWN write whose value no read returns is dropped ("never took effect"
    # is as good as any placement).  A write that is the sole source of a value
    # some read returns must take effect before the earliest such read completes:
    # that is its deadline (for an UNKNOWN write, its only one).  Other UNKNOWN
    # writes are "free": deadline infinity.
    prepared = _Key(
        key=key,
        initial=initial,
        ops=[],
        val=[],
        deadline=[],
        is_read=[],
        sole_source=[],
        init_id=init_id,
        read_values=set(first_read_done),
        dropped=0,
    )
    for i, op in enumerate(ops):
        bound = first_read_done.get(val[i], math.inf)
        sole = sources.get(val[i], 0) == 1
        if op.kind == "read":
            assert op.complete is not None
            deadline = op.complete
        else:
            if op.outcome is Outcome.UNKNOWN:
                if math.isinf(bound):
                    prepared.dropped += 1
                    continue
                deadline = math.inf
            else:
                assert op.complete is not None
                deadline = op.complete
            if sole:
                deadline = min(deadline, max(bound, op.invoke))
        prepared.ops.append(op)
        prepared.val.append(val[i])
        prepared.deadline.append(deadline)
        prepared.is_read.append(op.kind == "read")
        prepared.sole_source.append(sole)
    return prepared if prepared.ops else None


def _check_key(
    key: str, ops: Sequence[Operation], initial: object | None, max_states: int
) -> Violation | None:
    """Check the (already filtered) operations of one key; None when linearizable."""
    k = _prepare(key, ops, initial)
    if k is None:
        return None
    quick = _quick_check(k)
    if quick is None:
        status, best, depth = _search(k, max_states)
        if status == "ok":
            return None
        if status == "failed":
            assert best is not None
            return _not_linearizable(k, best)
        return _inconclusive(k, best, depth, max_states)
    # A definite violation: add the longest linearizable prefix if it is cheap.
    status, best, _ = _search(k, min(max_states, _PREFIX_BUDGET))
    if status == "ok":
        raise AssertionError(f"linearizability checker inconsistency on key {key!r}")
    if status == "failed":
        assert best is not None
        message = f"{quick.message}. {_prefix_note(k, best)}"
        return Violation(key, message, quick.operations, stuck=quick.stuck)
    return quick


def _quick_check(k: _Key) -> Violation | None:
    """Cheap necessary conditions, reported precisely when they fail.

    * a read returns a value nothing wrote before the read completed;
    * a stale read: a read returns x whose only source is W (a write or the
      initial value), although another write W2 surely took effect after W and
      before the read was invoked.  "Surely" uses deadlines, which for the sole
      source of a value include the completion of the earliest read of it.
    """
    ops, val, deadline = k.ops, k.val, k.deadline
    n = len(ops)
    first_invoke: dict[int, float] = {}
    source: dict[int, int] = {}
    for j in range(n):
        if not k.is_read[j]:
            first_invoke[val[j]] = min(first_invoke.get(val[j], math.inf), ops[j].invoke)
            source[val[j]] = j
    # Writes that surely take effect (finite deadline) by invocation, with the
    # suffix minimum of their deadlines.
    certain = sorted(
        (j for j in range(n) if not k.is_read[j] and math.isfinite(deadline[j])),
        key=lambda j: ops[j].invoke,
    )
    invokes = [ops[j].invoke for j in certain]
    suffix_min: list[tuple[float, int]] = [(math.inf, -1)] * (len(certain) + 1)
    for pos in range(len(certain) - 1, -1, -1):
        j = certain[pos]
        suffix_min[pos] = min(suffix_min[pos + 1], (deadline[j], j))

    reads = sorted((j for j in range(n) if k.is_read[j]), key=lambda j: (ops[j].invoke, j))
    for j in reads:  # report the earliest offending read
        op = ops[j]
        x = val[j]
        if x != k.init_id and first_invoke.get(x, math.inf) > deadline[j]:
            message = (
                f"key {k.key!r} is not linearizable: {_fmt_op(op)} returned a value that "
                "no operation which may have taken effect wrote before the read completed"
            )
            return Violation(k.key, message, _around(k, j, -1), stuck=op)
        if x == k.init_id and x not in source:
            w, after = -1, -math.inf  # only the initial value explains this read
        elif x != k.init_id and k.sole_source[source[x]]:
            w = source[x]
            after = deadline[w]
        else:
            continue
        pos = bisect.bisect_right(invokes, after)
        w2_deadline, w2 = suffix_min[pos]
        if w2_deadline >= op.invoke:
            continue
        origin = f"the value written by {_fmt_op(ops[w])}" if w >= 0 else "the initial value"
        w2_complete = ops[w2].complete
        why = ""
        if w2_complete is None or w2_deadline < w2_complete:
            why = " (a read returned its value by then)"
        message = (
            f"key {k.key!r} is not linearizable: stale read: {_fmt_op(op)} ({origin}), "
            f"but {_fmt_op(ops[w2])} surely took effect after that and by time "
            f"{_fmt_time(w2_deadline)}{why}, before the read was invoked"
        )
        return Violation(k.key, message, _around(k, j, w2, w), stuck=op)
    return None


def _search(k: _Key, max_states: int) -> tuple[str, tuple[int, int, int] | None, int]:
    """Wing-Gong/Lowe search with just-in-time linearization and memoisation.

    Returns ``(status, best, depth)``: status is "ok", "failed" or "inconclusive";
    best is the deepest failed configuration as (number of operations linearized,
    first operation it could not linearize, last write linearized or -1); depth is
    the number linearized when the budget ran out.
    """
    n = len(k.ops)
    deadline = k.deadline
    is_read = k.is_read
    free = [math.isinf(t) for t in deadline]
    # States compared by the search: all values no read returns collapse into one.
    state_of = [x if x in k.read_values else _UNSEEN for x in k.val]
    init_state = k.init_id if k.init_id in k.read_values else _UNSEEN

    # Call/return events sorted by time, calls first at equal times (so touching
    # intervals count as concurrent), in a doubly linked list; node 0 is the head.
    events = sorted(
        [(k.ops[j].invoke, 0, j) for j in range(n)] + [(deadline[j], 1, j) for j in range(n)]
    )
    size = 2 * n + 1
    nxt = [-1] * size
    prv = [-1] * size
    node_op = [-1] * size
    node_call = [False] * size
    call_node = [0] * n
    ret_node = [0] * n
    for pos, (_, kind, j) in enumerate(events, start=1):
        node_op[pos] = j
        node_call[pos] = kind == 0
        if kind == 0:
            call_node[j] = pos
        else:
            ret_node[j] = pos
        prv[pos] = pos - 1
        nxt[pos - 1] = pos

    # Free unknown writes by state, in invocation order.  They are linearized only
    # immediately before a read returning their value (in any linearization an
    # unknown write not directly followed by such a read can be removed), and
    # those of one value that are already invoked are interchangeable, so the
    # earliest unused one is always the one taken.
    free_by_state: dict[int, list[int]] = {}
    for pos in range(1, size):
        j = node_op[pos]
        if node_call[pos] and free[j]:
            free_by_state.setdefault(state_of[j], []).append(j)

    # Writes not linearized yet, per resulting state.
    remaining: dict[int, int] = {}
    for j in range(n):
        if not is_read[j]:
            remaining[state_of[j]] = remaining.get(state_of[j], 0) + 1

    def lift(j: int) -> None:
        if not is_read[j]:
            remaining[state_of[j]] -= 1
        c, r = call_node[j], ret_node[j]
        nxt[prv[c]] = nxt[c]
        prv[nxt[c]] = prv[c]
        nxt[prv[r]] = nxt[r]
        if nxt[r] != -1:
            prv[nxt[r]] = prv[r]

    def unlift(j: int) -> None:
        if not is_read[j]:
            remaining[state_of[j]] += 1
        c, r = call_node[j], ret_node[j]
        nxt[prv[r]] = r
        if nxt[r] != -1:
            prv[nxt[r]] = r
        nxt[prv[c]] = c
        prv[nxt[c]] = c

    core = 0  # bitset of linearized operations that have a deadline
    used = 0  # bitset of linearized free unknown writes
    state = init_state
    last_writer = -1

    def expand() -> list[tuple[int, int]] | None:
        """The steps possible from the current configuration; None on success.

        Only operations invoked before the first pending return may be linearized
        next.  A read returning the current value is always safe to linearize at
        once (moving it earlier keeps any linearization valid), so it is the only
        step offered when there is one.  Otherwise the steps are every pending
        write/delete and every pending read paired with a free unknown write of
        its value, tried earliest deadline first (a write inheriting the deadline
        of the pending reads of its value).  The order only affects speed.
        """
        node = nxt[0]
        if node == -1:
            return None
        writes: list[int] = []
        reads: list[int] = []
        while node_call[node]:
            j = node_op[node]
            if not free[j]:
                if not is_read[j]:
                    writes.append(j)
                elif state_of[j] == state:
                    return [(j, -1)]
                else:
                    reads.append(j)
            node = nxt[node]
        if free[node_op[node]]:
            return None  # only free unknown writes are left
        want: dict[int, float] = {}
        for j in reads:
            v = state_of[j]
            if not remaining.get(v):
                return []  # no write left can produce the value this read returns
            want[v] = min(want.get(v, math.inf), deadline[j])
        ranked: list[tuple[float, float, int, int]] = []
        for j in writes:
            d = deadline[j]
            ranked.append((min(d, want.get(state_of[j], d)), d, j, -1))
        for j in reads:
            for c in free_by_state.get(state_of[j], ()):
                if call_node[c] > node:
                    break
                if not (used >> c) & 1:
                    ranked.append((deadline[j], deadline[j], j, c))
                    break
        ranked.sort()
        return [(j, u) for _, _, j, u in ranked]

    def stuck_op() -> int:
        node = nxt[0]
        while node_call[node]:
            node = nxt[node]
        return node_op[node]

    # (core, state) -> the `used` sets explored from there (an antichain).  Every
    # explored configuration failed (the search stops at the first success), and
    # having used a subset of the free writes is never worse, so a configuration
    # is skipped when an explored one has the same core and state and a subset of
    # its `used` set.
    cache: dict[tuple[int, int], list[int]] = {}
    n_states = 0
    best: tuple[int, int, int] | None = None

    first = expand()
    if first is None:
        return "ok", None, 0
    # Explicit DFS stack: per configuration its steps and the next one to try;
    # `undo` holds what each step taken changed.
    frame_steps = [first]
    frame_next = [0]
    undo: list[tuple[int, int, int, int]] = []
    while True:
        steps = frame_steps[-1]
        i = frame_next[-1]
        advanced = False
        while i < len(steps):
            j, u = steps[i]
            i += 1
            new_state = state_of[j]
            new_core = core | (1 << j)
            new_used = used | (1 << u) if u >= 0 else used
            ck = (new_core, new_state)
            seen = cache.get(ck)
            if seen is None:
                cache[ck] = [new_used]
            elif any(s | new_used == new_used for s in seen):
                continue
            else:
                seen[:] = [s for s in seen if s | new_used != s]
                seen.append(new_used)
            n_states += 1
            if n_states > max_states:
                return "inconclusive", best, len(undo) + used.bit_count()
            undo.append((j, u, state, last_writer))
            if u >= 0:
                lift(u)
                last_writer = u
            elif not is_read[j]:
                last_writer = j
            lift(j)
            state = new_state
            core = new_core
            used = new_used
            following = expand()
            if following is None:
                return "ok", None, 0
            frame_next[-1] = i
            frame_steps.append(following)
            frame_next.append(0)
            advanced = True
            break
        if advanced:
            continue
        # Every step from this configuration failed.
        depth = len(undo) + used.bit_count()
        if best is None or depth > best[0]:
            best = (depth, stuck_op(), last_writer)
        frame_steps.pop()
        frame_next.pop()
        if not undo:
            return "failed", best, 0
        j, u, state, last_writer = undo.pop()
        unlift(j)
        core ^= 1 << j
        if u >= 0:
            unlift(u)
            used ^= 1 << u


# --------------------------------------------------------------------------- reports


def _register_after(k: _Key, writer: int) -> str:
    if writer < 0:
        return f"the register held {_fmt_value(k.initial)} (the initial value)"
    w = k.ops[writer]
    value = None if w.kind == "delete" else w.value
    return f"the register held {_fmt_value(value)}, last set by {_fmt_op(w)}"


def _around(k: _Key, stuck: int, *also: int) -> tuple[Operation, ...]:
    """The stuck operation, the operations concurrent with it, and `also`."""

    def end(op: Operation) -> float:
        return math.inf if op.complete is None or op.outcome is not Outcome.OK else op.complete

    lo = k.ops[stuck].invoke
    hi = end(k.ops[stuck])
    chosen = [
        j
        for j, op in enumerate(k.ops)
        if j == stuck or j in also or (op.invoke <= hi and end(op) >= lo)
    ]
    chosen.sort(key=lambda j: (k.ops[j].invoke, end(k.ops[j]), j))
    return tuple(k.ops[j] for j in chosen)


def _dropped_note(k: _Key) -> str:
    if not k.dropped:
        return ""
    return f"; {k.dropped} unknown write(s) nobody observed were ignored"


def _prefix_note(k: _Key, best: tuple[int, int, int]) -> str:
    depth, stuck, writer = best
    return (
        f"Longest linearizable prefix found: {depth} of {len(k.ops)} operations; then "
        f"{_fmt_op(k.ops[stuck])} could not be linearized ({_register_after(k, writer)})"
        f"{_dropped_note(k)}"
    )


def _not_linearizable(k: _Key, best: tuple[int, int, int]) -> Violation:
    _, stuck, writer = best
    message = f"key {k.key!r} is not linearizable. {_prefix_note(k, best)}"
    return Violation(k.key, message, _around(k, stuck, writer), stuck=k.ops[stuck])


def _inconclusive(
    k: _Key, best: tuple[int, int, int] | None, depth: int, max_states: int
) -> Violation:
    deepest = max(depth, best[0]) if best is not None else depth
    message = (
        f"INCONCLUSIVE for key {k.key!r}: the search budget of {max_states} states was "
        f"exhausted after linearizing at most {deepest} of {len(k.ops)} operations; "
        "no verdict (raise max_states or shorten the history)"
    )
    if best is None:
        return Violation(k.key, message + _dropped_note(k), (), inconclusive=True)
    _, stuck, writer = best
    stuck_op = k.ops[stuck]
    message += (
        f"; deepest dead end at {_fmt_op(stuck_op)} ({_register_after(k, writer)})"
        f"{_dropped_note(k)}"
    )
    return Violation(k.key, message, _around(k, stuck, writer), inconclusive=True, stuck=stuck_op)


# --------------------------------------------------------------------------- API


def check_history(
    ops: Iterable[Operation], initial: object | None = None, max_states: int = 2_000_000
) -> CheckResult:
    """Check that a history of register operations is linearizable, key by key.

    ``initial`` is every register's value before the history (``None`` = absent).
    ``max_states`` bounds the memoised search configurations per key.
    Raises ``ValueError`` on malformed operations.
    """
    if max_states < 0:
        raise ValueError("max_states must be >= 0")
    per_key: dict[str, list[Operation]] = {}
    checked = 0
    n_unknown = 0
    for op in ops:
        _validate(op)
        if op.outcome is Outcome.UNKNOWN:
            n_unknown += 1
            if op.kind == "read":
                continue
        elif op.outcome is Outcome.FAILED:
            continue
        checked += 1
        per_key.setdefault(op.key, []).append(op)

    violations: list[Violation] = []
    for key in sorted(per_key):
        v = _check_key(key, per_key[key], initial, max_states)
        if v is not None:
            violations.append(v)
    return CheckResult(
        ok=not violations,
        violations=tuple(violations),
        checked_operations=checked,
        unknown_operations=n_unknown,
    )


def format_violation(v: Violation) -> str:
    """A readable multi-line dump of a violation."""
    title = "INCONCLUSIVE" if v.inconclusive else "LINEARIZABILITY VIOLATION"
    lines = [f"{title} on key {v.key!r}", f"  {v.message}"]
    if v.operations:
        lines.append("  operations around the violation (sorted by invocation):")
        header = (
            f"    {'':2} {'process':>7}  {'kind':<6}  {'value':<20}  {'invoke':>12}"
            f"  {'complete':>12}  outcome"
        )
        lines.append(header)
        for op in v.operations:
            mark = ">>" if v.stuck is not None and op is v.stuck else "  "
            value = "-" if op.kind == "delete" else _fmt_value(op.value)
            if len(value) > 20:
                value = value[:17] + "..."
            lines.append(
                f"    {mark} {op.process:>7}  {op.kind:<6}  {value:<20}"
                f"  {_fmt_time(op.invoke):>12}  {_fmt_time(op.complete):>12}"
                f"  {op.outcome.name}"
            )
        if v.stuck is not None:
            lines.append("  (>> marks the operation that could not be linearized)")
    return "\n".join(lines)
