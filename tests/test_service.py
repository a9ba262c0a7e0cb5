"""raftkv.service's errors across processes: a ServiceError travels as its code, message and
details (raftkv.codec.ErrorReply, in a worker reply or a forward result) and error_from_code
raises it again on the other side as its own class, with its details."""

from __future__ import annotations

import pytest

from raftkv import codec
from raftkv.codec import ErrorReply, ForwardResult, ForwardStatus, Reply
from raftkv.service import (
    ConditionFailedError,
    LeaseNotFoundError,
    MembershipChangeError,
    ServiceError,
    TokenConflictError,
    UnavailableError,
    error_from_code,
)


def service_error_classes() -> list[type[ServiceError]]:
    found: list[type[ServiceError]] = []
    todo: list[type[ServiceError]] = [ServiceError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.code)


def sample_error(cls: type[ServiceError]) -> ServiceError:
    if cls is ConditionFailedError:
        return ConditionFailedError("condition failed", key="k", current_index=7)
    if cls is LeaseNotFoundError:
        return LeaseNotFoundError("no such lease", lease_id=12)
    if cls is TokenConflictError:
        return TokenConflictError("already created", token_id="abcd1234")
    if cls is MembershipChangeError:
        return MembershipChangeError("the node at h:1 answers as n5, not n4", probe="mismatch")
    return cls(f"a {cls.__name__}")


FIELDS = ("key", "current_index", "lease_id", "token_id", "probe")
"""Every field beyond the message that an error class has."""


def test_every_service_error_code_is_unique() -> None:
    codes = [cls.code for cls in service_error_classes()]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize("cls", service_error_classes(), ids=lambda c: c.__name__)
def test_every_service_error_crosses_a_worker_reply_as_its_class_with_its_details(
        cls: type[ServiceError]) -> None:
    error = sample_error(cls)
    reply = Reply(1, False, ErrorReply(error.code, error.message, error.details()))
    [decoded] = codec.decode_replies(codec.pack_batch([codec.encode_reply(reply)]))
    wire = decoded.payload
    assert isinstance(wire, ErrorReply)

    again = error_from_code(wire.code, wire.message, wire.details, leader="10.0.0.1:4001")

    assert type(again) is cls
    assert again.message == error.message
    assert again.details() == error.details()
    assert again.leader == "10.0.0.1:4001"
    for name in FIELDS:
        assert getattr(again, name, None) == getattr(error, name, None), name


@pytest.mark.parametrize("cls", service_error_classes(), ids=lambda c: c.__name__)
def test_every_service_error_crosses_a_forward_result_as_its_class_with_its_details(
        cls: type[ServiceError]) -> None:
    error = sample_error(cls)
    sent = ForwardResult(9, ForwardStatus.FAILED,
                         error=ErrorReply(error.code, error.message, error.details()))
    [got] = codec.decode_forward_results(codec.encode_forward_results([sent]))
    assert got.error is not None
    again = error_from_code(got.error.code, got.error.message, got.error.details)
    assert type(again) is cls
    for name in FIELDS:
        assert getattr(again, name, None) == getattr(error, name, None), name


def test_a_token_conflict_without_a_token_id_crosses_without_one() -> None:
    error = TokenConflictError("the last admin token cannot be revoked")
    again = error_from_code(error.code, error.message, error.details())
    assert type(again) is TokenConflictError and again.token_id is None


def test_a_membership_change_refusal_without_a_probe_mark_crosses_without_one() -> None:
    """Only a join's probe mismatch is marked (a joining node gives up on it): another 409,
    one that may pass, must not arrive marked."""
    error = MembershipChangeError("another membership change is not committed yet")
    assert error.details() == {}
    again = error_from_code(error.code, error.message, error.details())
    assert type(again) is MembershipChangeError and again.probe is None


def test_an_unknown_error_code_becomes_unavailable_naming_the_code() -> None:
    error = error_from_code("from_a_newer_build", "something new", {})
    assert type(error) is UnavailableError
    assert "from_a_newer_build" in error.message


@pytest.mark.parametrize(("code", "details"), [
    (ConditionFailedError.code, {"key": 3}),
    (ConditionFailedError.code, {}),
    (LeaseNotFoundError.code, {"lease_id": "seven"}),
])
def test_an_error_with_details_missing_or_wrong_becomes_unavailable_not_a_crash(
        code: str, details: dict[str, object]) -> None:
    error = error_from_code(code, "it failed", details)
    assert type(error) is UnavailableError
    assert code in error.message
