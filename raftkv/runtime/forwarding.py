"""Follower-to-leader forwarding: what only the leader can do, asked by any node.

Follower side: writes (client commands), membership changes and lease operations are queued
during a loop turn and leave in one FORWARD frame to the leader at its end (`flush`; more
only past MAX_FORWARD_BATCH items or MAX_FORWARD_FRAME_BYTES, in order). Each gets
a `fid`, random-started per run (an answer the leader queued for an earlier run of this node
must not match a request of this run).

Leader side (`serve`): every forwarded item is checked before it touches the core (a command
must decode; raftkv.kv.commands), then proposed; its outcome goes back in one FORWARD_RESULT
frame per follower per turn (more only past MAX_FORWARD_FRAME_BYTES, in order): a write or
change once COMMITTED (its index and term: sent when the leader applies it), a lease
operation's VALUE, or FAILED with the error. A frame the transport does not take (the link to
that follower down with its queue full) is kept and offered again at the next turns, before
any newer answer to that follower; it is dropped (logged, counted) once older than
FORWARD_TIMEOUT_S, when the follower has given up on it, when that follower's kept frames
pass MAX_KEPT_ANSWER_BYTES (the oldest first), or at the next turn once this node keeps no
link to that follower (it was removed: a frame refused as the link is gone is not offered
again). While answers are kept for a removed member, its link stays (RaftDriver.tick, for at
most LINK_DRAIN_TICKS ticks: `keeps_answers_for`).

Follower side again (`on_results`): a committed write tells the follower that (index, term) is
committed (the core's learn_commit: no wait for the next heartbeat), and the follower answers
its client once IT applied that entry, only if the entry holds exactly what it sent (so a stale
answer can never acknowledge another write). A lease operation's value is the answer.

A write already sent is never failed as if it had no effect: when the leader changes, or no
answer comes within FORWARD_TIMEOUT_S, its outcome is unknown.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from raftkv import codec
from raftkv.codec import (
    ErrorReply,
    Forward,
    ForwardOp,
    ForwardResult,
    ForwardStatus,
    FrameKind,
)
from raftkv.core import ConfChange, ConfChangeOp, RaftNode, Role
from raftkv.framing import payloads_within
from raftkv.kv.commands import CommandDecodeError, decode_command
from raftkv.runtime.driver import Completion, Expect, FrameSender, RaftDriver
from raftkv.runtime.transport.refusals import RateLimitedLog
from raftkv.service import (
    NoLeaderError,
    OutcomeUnknownError,
    ReadTimeoutError,
    ServiceError,
    error_from_code,
)

__all__ = ["FORWARD_TIMEOUT_S", "Forwarder"]

log = logging.getLogger(__name__)

FORWARD_TIMEOUT_S: Final = 60.0
MAX_FORWARD_BATCH: Final = 4096
MAX_FORWARD_FRAME_BYTES: Final = 16 << 20
"""A turn's forwards leave in frames of at most this many bytes (one write is at most ~1 MiB;
the leader's reader takes frames of up to 64 MiB and drops the link on a larger one, which
would end every write in it as outcome unknown)."""
MAX_KEPT_ANSWER_BYTES: Final = 64 << 20
"""At most this many bytes of FORWARD_RESULT frames a follower's link refused are kept for it
(the oldest are dropped past it): with FORWARD_TIMEOUT_S, what waits for a link that stays
down is bounded in size as well as in time."""


def _forward_bytes(item: Forward) -> int:
    """About what `item` adds to a FORWARD frame (its command, and room for the rest)."""
    return len(item.data) + 64


def _result_bytes(result: ForwardResult) -> int:
    """About what `result` adds to a FORWARD_RESULT frame (only asked of a turn's answers
    that do not fit in one frame)."""
    if result.status is ForwardStatus.COMMITTED:
        return 32
    return len(codec.encode_forward_results([result]))


def _is_write(expect: Expect | ForwardOp) -> bool:
    """A forwarded command or membership change (it may commit without this node seeing
    it); not a lease read or keepalive, which a retry repeats harmlessly."""
    return not isinstance(expect, ForwardOp)


@dataclass(slots=True)
class _Waiting:
    sent_at: float
    done: Completion
    expect: Expect | ForwardOp
    """The command or change sent (matched against the applied entry), or the lease op."""


@dataclass(slots=True)
class _Unsent:
    """Leader side: a FORWARD_RESULT frame the transport did not take, to offer again."""
    since: float
    """The turn its answers were made (it was refused then, or queued behind a frame that
    was, and not offered)."""
    answers: int
    payload: bytes


class _AnswerFollower:
    """Leader side: the outcome of one forwarded item, queued for its follower."""

    __slots__ = ("_fid", "_forwarder", "_index", "_peer", "_term")

    def __init__(self, forwarder: Forwarder, peer: str, fid: int, index: int = 0,
                 term: int = 0) -> None:
        self._forwarder = forwarder
        self._peer = peer
        self._fid = fid
        self._index = index
        self._term = term

    def ok(self, value: object) -> None:
        if self._index:
            result = ForwardResult(self._fid, ForwardStatus.COMMITTED, self._index, self._term)
        else:
            result = ForwardResult(self._fid, ForwardStatus.VALUE, value=value)
        self._forwarder.answer(self._peer, result)

    def fail(self, error: ServiceError) -> None:
        self._forwarder.answer(self._peer, ForwardResult(
            self._fid, ForwardStatus.FAILED,
            error=ErrorReply(error.code, error.message, error.details())))


class _AnswerRemovedFollower(_AnswerFollower):
    """Leader side: the answer to a removal forwarded by the node it removes. That node
    will not apply the entry (the leader stops replicating to it as it appends the change):
    it is told the removal's index as a VALUE once the leader applied it, over the link the
    members keep to it until they applied the removal (RaftDriver.sync_peers, tick)."""

    __slots__ = ()

    def ok(self, value: object) -> None:
        self._forwarder.answer(self._peer, ForwardResult(self._fid, ForwardStatus.VALUE,
                                                         value=self._index))


class Forwarder:
    def __init__(self, driver: RaftDriver, frames: FrameSender, rng: random.Random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._driver = driver
        self.core: RaftNode = driver.core
        self._frames = frames
        self._clock = clock
        self._out: list[Forward] = []
        self._waiting: dict[int, _Waiting] = {}
        self._answers: dict[str, list[ForwardResult]] = {}
        self._unsent: dict[str, deque[_Unsent]] = {}
        """Per follower, in order: frames of answers its link did not take yet."""
        self._next_fid = rng.getrandbits(52)
        self._drops = RateLimitedLog()

    # ------------------------------------------------------------------ follower side
    def forward_proposal(self, data: bytes, done: Completion) -> None:
        self._queue(Forward(self._fid(), ForwardOp.PROPOSE, data=data), done, data)

    def forward_conf_change(self, change: ConfChange, done: Completion) -> None:
        self._queue(Forward(self._fid(), ForwardOp.CONF_CHANGE, change=change), done, change)

    def forward_lease(self, op: ForwardOp, number: int, done: Completion) -> None:
        self._queue(Forward(self._fid(), op, number=number), done, op)

    def _fid(self) -> int:
        fid = self._next_fid
        self._next_fid += 1
        return fid

    def _queue(self, item: Forward, done: Completion, expect: Expect | ForwardOp) -> None:
        self._out.append(item)
        self._waiting[item.fid] = _Waiting(self._clock(), done, expect)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def flush(self) -> None:
        """End of the turn: one FORWARD frame to the leader, FORWARD_RESULT frames to the
        followers that asked."""
        if self._out:
            out, self._out = self._out, []
            leader = self.core.leader
            sent = 0  # items handed to the transport: they may commit whatever happens next
            if leader is not None and leader != self.core.id:
                frames = (frame for i in range(0, len(out), MAX_FORWARD_BATCH)
                          for frame in payloads_within(out[i : i + MAX_FORWARD_BATCH],
                                                       codec.encode_forwards,
                                                       MAX_FORWARD_FRAME_BYTES, _forward_bytes))
                for chunk, payload in frames:
                    if not self._frames.send(leader, FrameKind.FORWARD, payload):
                        break
                    sent += len(chunk)
            for item in out[sent:]:  # only what never left this node surely had no effect
                waiting = self._waiting.pop(item.fid, None)
                if waiting is not None:
                    waiting.done.fail(NoLeaderError("cannot reach the leader"))
        if self._answers or self._unsent:
            self._flush_answers()

    def on_results(self, peer: str, payload: bytes) -> None:
        """A FORWARD_RESULT frame from `peer`."""
        try:
            results = codec.decode_forward_results(payload)
        except codec.DecodeError as e:
            self._dropped(peer, "malformed_forward_result", str(e))
            return
        for r in results:
            waiting = self._waiting.pop(r.fid, None)
            if waiting is None:
                continue
            done, expect = waiting.done, waiting.expect
            if r.status is ForwardStatus.FAILED:
                assert r.error is not None
                done.fail(error_from_code(r.error.code, r.error.message, r.error.details))
            elif r.status is ForwardStatus.VALUE:
                done.ok(r.value)
            elif isinstance(expect, ForwardOp):
                done.fail(OutcomeUnknownError("the leader answered a lease operation "
                                              "with a log position"))
            else:
                self._driver.await_entry(r.index, r.term, expect, done)

    def leader_changed(self) -> None:
        """Every write forwarded to the previous leader may or may not have happened; a lease
        read or keepalive is simply retried (as on a leader that loses office mid-read)."""
        waiting, self._waiting = self._waiting, {}
        if self.core.leader is None:
            # This node's own removal: the leader stops heartbeating it as it appends the
            # change, so its election timer may run out before the answer comes. It waits
            # for that answer, or FORWARD_TIMEOUT_S (then: outcome unknown, as any forward).
            me = self.core.id
            for fid, w in list(waiting.items()):
                if (isinstance(w.expect, ConfChange) and w.expect.op is ConfChangeOp.REMOVE
                        and w.expect.node_id == me):
                    self._waiting[fid] = waiting.pop(fid)
        for w in waiting.values():
            w.done.fail(OutcomeUnknownError("the leader changed while forwarding")
                        if _is_write(w.expect) else
                        NoLeaderError("the leader changed while forwarding; retry"))

    def expire(self, now: float) -> None:
        stale = [fid for fid, w in self._waiting.items() if now - w.sent_at > FORWARD_TIMEOUT_S]
        for fid in stale:
            w = self._waiting.pop(fid)
            w.done.fail(OutcomeUnknownError("no answer from the leader") if _is_write(w.expect)
                        else ReadTimeoutError("no answer from the leader"))

    def fail_all(self, error: ServiceError) -> None:
        waiting, self._waiting = self._waiting, {}
        self._out = []
        for w in waiting.values():
            w.done.fail(error)

    # ------------------------------------------------------------------ leader side
    def serve(self, peer: str, payload: bytes) -> None:
        """A FORWARD frame from `peer` (its connection was authenticated as `peer`)."""
        try:
            items = codec.decode_forwards(payload)
        except codec.DecodeError as e:
            self._dropped(peer, "malformed_forward", str(e))
            return
        driver = self._driver
        deadline = self._clock() + FORWARD_TIMEOUT_S
        for item in items:
            if item.op is ForwardOp.PROPOSE:
                self._serve_proposal(peer, item)
            elif item.op is ForwardOp.CONF_CHANGE:
                self._serve_conf_change(peer, item)
            elif self.core.role is not Role.LEADER:
                _AnswerFollower(self, peer, item.fid).fail(
                    NoLeaderError("this node is not the leader any more"))
            elif item.op is ForwardOp.LEASE_KEEPALIVE:
                driver.lease_keepalive(item.number, deadline, _AnswerFollower(self, peer,
                                                                              item.fid))
            elif item.op is ForwardOp.LEASE_INFO:
                driver.lease_info(item.number, deadline, _AnswerFollower(self, peer, item.fid))
            else:
                driver.lease_list(min(item.number, 10_000), deadline,
                                  _AnswerFollower(self, peer, item.fid))

    def _serve_proposal(self, peer: str, item: Forward) -> None:
        if self.core.role is not Role.LEADER:
            _AnswerFollower(self, peer, item.fid).fail(
                NoLeaderError("this node is not the leader any more"))
            return
        try:
            decode_command(item.data)  # nothing unchecked from the network reaches the log
        except CommandDecodeError as e:
            self._dropped(peer, "invalid_command", str(e))
            _AnswerFollower(self, peer, item.fid).fail(
                NoLeaderError("the leader refused a malformed command"))
            return
        try:
            index = self._driver.propose_here(item.data)
        except ServiceError as e:
            _AnswerFollower(self, peer, item.fid).fail(e)
            return
        self._driver.on_apply(index, self.core.term,
                              _AnswerFollower(self, peer, item.fid, index, self.core.term))

    def _serve_conf_change(self, peer: str, item: Forward) -> None:
        change = item.change
        assert change is not None
        if self.core.role is not Role.LEADER:
            _AnswerFollower(self, peer, item.fid).fail(
                NoLeaderError("this node is not the leader any more"))
            return
        answer = (_AnswerRemovedFollower if change.op is ConfChangeOp.REMOVE
                  and change.node_id == peer else _AnswerFollower)

        def proposed(index: int) -> None:
            self._driver.on_apply(index, self.core.term,
                                  answer(self, peer, item.fid, index, self.core.term))

        self._driver.propose_conf_change_here(
            change, proposed, _AnswerFollower(self, peer, item.fid).fail)

    def answer(self, peer: str, result: ForwardResult) -> None:
        self._answers.setdefault(peer, []).append(result)

    def keeps_answers_for(self, peer: str) -> bool:
        """Answers to `peer` wait here: queued this turn, or kept after its link refused them
        (RaftDriver.tick keeps a removed member's link for them, a bounded wait)."""
        return peer in self._unsent or peer in self._answers

    def _flush_answers(self) -> None:
        """Each follower's answers: first the frames its link refused at earlier turns, then
        this turn's, in frames within MAX_FORWARD_FRAME_BYTES (the follower's reader drops
        the link on a frame over its bound); from the first frame refused on, the rest is
        kept, in order, for the next turn (not offered now: a smaller newer frame the link
        would take must not overtake a larger one it refused)."""
        answers, self._answers = self._answers, {}
        unsent = self._unsent
        now = self._clock() if unsent else None
        if now is not None:
            self._drop_undeliverable(now)
        send = self._frames.send
        kind = FrameKind.FORWARD_RESULT
        peers = [*unsent, *(p for p in answers if p not in unsent)] if unsent else answers
        for peer in peers:
            kept = unsent.get(peer)
            if kept is not None:
                while kept and send(peer, kind, kept[0].payload):
                    kept.popleft()
                if not kept:
                    del unsent[peer]
                    kept = None
            results = answers.get(peer)
            if not results:
                continue
            for chunk, payload in payloads_within(results, codec.encode_forward_results,
                                                  MAX_FORWARD_FRAME_BYTES, _result_bytes):
                if kept is None:
                    if send(peer, kind, payload):
                        continue
                    kept = unsent[peer] = deque()
                if now is None:
                    now = self._clock()
                kept.append(_Unsent(now, len(chunk), payload))
            if kept is not None:
                self._drop_oldest(peer, kept)

    def _drop_oldest(self, peer: str, kept: deque[_Unsent]) -> None:
        """Past MAX_KEPT_ANSWER_BYTES of `peer`'s kept frames, the oldest go (their follower
        is the nearest to giving up on them). Only after a refusal: the sum is not kept."""
        excess = sum(len(u.payload) for u in kept) - MAX_KEPT_ANSWER_BYTES
        if excess <= 0:
            return
        dropped = 0
        while kept and excess > 0:
            frame = kept.popleft()
            excess -= len(frame.payload)
            dropped += frame.answers
        if not kept:
            del self._unsent[peer]
        self._answers_dropped(peer, "too_many", dropped)

    def _drop_undeliverable(self, now: float) -> None:
        """Forget the answers kept for a follower this node no longer keeps a link to (it
        was removed), and those older than FORWARD_TIMEOUT_S (the follower gave up on
        them): what waits for a link that stays down is bounded."""
        has_link = self._frames.has_link
        for peer, kept in list(self._unsent.items()):
            if not has_link(peer):
                del self._unsent[peer]
                self._answers_dropped(peer, "not_linked", sum(u.answers for u in kept))
                continue
            stale = 0
            while kept and now - kept[0].since > FORWARD_TIMEOUT_S:
                stale += kept.popleft().answers
            if stale:
                self._answers_dropped(peer, "too_old", stale)
            if not kept:
                del self._unsent[peer]

    def _answers_dropped(self, peer: str, reason: str, answers: int) -> None:
        self._driver.metrics.forward_results_dropped[reason].inc(answers)
        suppressed = self._drops.admit(peer, f"forward_results_{reason}")
        if suppressed is not None:
            log.warning("event=forward_results_dropped node=%s peer=%s reason=%s answers=%d "
                        "suppressed=%d", self.core.id, peer, reason, answers, suppressed)

    def _dropped(self, peer: str, reason: str, detail: str) -> None:
        suppressed = self._drops.admit(peer, reason)
        if suppressed is not None:
            log.warning("event=peer_message_dropped node=%s peer=%s reason=%s suppressed=%d "
                        "detail=%r", self.core.id, peer, reason, suppressed, detail[:200])
