"""The JSON HTTP API of a node: `create_app(service)` builds a Falcon app over a KVService.

Resources are thin: they validate the request, call the service, and format the answer.
Every failure, whether raised by validation, by the service or by Falcon itself (unknown route,
wrong method), becomes a JSON body `{"error": code, "message": text, "leader": address|null}`
through ONE table, `ERROR_TABLE`. Anything the table does not know is a bug: it is logged with
its traceback and answered 500 `internal_error`, never with the traceback itself.

Limits (every input is bounded): keys 1..MAX_KEY_BYTES bytes of UTF-8, values at most
MAX_VALUE_BYTES once JSON-encoded, bodies at most `max_body_bytes`, batches 1..MAX_BATCH_OPS
ops, lists 1..MAX_LIST_LIMIT keys or leases, waits 0 < timeout <= MAX_TIMEOUT_S seconds, lease
TTLs MIN_LEASE_TTL_S..MAX_LEASE_TTL_S whole seconds, lease ids 1..MAX_LEASE_ID.

Leases: `POST /leases` {"ttl": s} grants one; `POST /leases/<id>/keepalive` restarts its TTL;
`DELETE /leases/<id>` revokes it (its keys are deleted); `GET /leases` lists them and
`GET /leases/<id>` shows one with its keys and remaining time. A key write may carry
`"lease": id` (attach to that lease) or `"ttl": s` (a fresh lease of its own); `/batch` puts
may carry `"lease"`. An unknown lease is 404 `lease_not_found`.

Auth (raftkv.http.auth has the one table of who may call what): with auth on, requests carry
`Authorization: Bearer <token>`; 401 `unauthenticated` (with `WWW-Authenticate: Bearer`) or
403 `forbidden` otherwise. Tokens: `POST /auth/tokens` {"role": "read"|"write"|"admin",
"prefixes": [...]} creates one and answers its secret (this once); `GET /auth/tokens` lists them
(no secrets); `DELETE /auth/tokens/<id>` revokes one.

Alarms: `GET /alarms` lists the raised NOSPACE alarms; `DELETE /alarms` disarms them. While one
is raised, writes that add data are 507 `storage_full` (reads and deletes go on).

Keys live in the path (`/keys/a/b` is the key `a/b`). Because the trailing slash is optional
everywhere, a key that ends with `/` cannot be addressed through the path; use `/batch`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Protocol
from urllib.parse import quote, unquote, unquote_to_bytes

import falcon

from raftkv import service as service_limits
from raftkv.auth import Role, check_prefixes, check_token_id
from raftkv.digits import finite_json_float, parse_decimal, reject_json_constant
from raftkv.http.auth import AuthMiddleware, auth_waited_s, authorize_keys
from raftkv.service import (
    MAX_KEY_BYTES,
    MAX_LEASE_ID,
    MAX_LEASE_TTL_S,
    MAX_VALUE_BYTES,
    MIN_LEASE_TTL_S,
    AuthDisabledError,
    BatchOp,
    ConditionFailedError,
    Consistency,
    DeleteResult,
    ForbiddenError,
    InvalidRequestError,
    KeyNotFoundError,
    KVService,
    LeaseInfo,
    LeaseNotFoundError,
    Member,
    MembershipChangeError,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    ReadTimeoutError,
    ServiceError,
    StorageFullError,
    TokenConflictError,
    TokenInfo,
    TokenNotFoundError,
    UnauthenticatedError,
    UnavailableError,
    WriteResult,
)
from raftkv.settings import is_wildcard_host

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "ERROR_TABLE",
    "MAX_BATCH_OPS",
    "MAX_LIST_LIMIT",
    "MAX_TIMEOUT_S",
    "ErrorRule",
    "create_app",
]

_log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES: Final = MAX_VALUE_BYTES + 64 * 1024
"""One maximal value plus room for the JSON around it."""
MAX_BATCH_OPS: Final = service_limits.MAX_BATCH_OPS
MAX_LIST_LIMIT: Final = 10_000
DEFAULT_LIST_LIMIT: Final = 1000
MAX_TIMEOUT_S: Final = 60.0
DEFAULT_WATCH_TIMEOUT_S: Final = 30.0
SNAPSHOT_MEDIA_TYPE: Final = "application/octet-stream"
MAX_IDEMPOTENCY_KEY_CHARS: Final = 128
MAX_NODE_ID_CHARS: Final = 64
MAX_ADDRESS_CHARS: Final = 255
MAX_INDEX: Final = (1 << 63) - 1
_MIN_JSON_INT: Final = -(1 << 63)
_MAX_JSON_INT: Final = (1 << 64) - 1
_SEPARATORS: Final = (",", ":")
_RETRY_AFTER_S: Final = "1"


# --------------------------------------------------------------------------- request errors
class RequestError(Exception):
    """The request is wrong. `message` is written for the caller and safe to show."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidJsonError(RequestError):
    """The body is not a JSON object (syntax, encoding, NaN/Infinity, empty)."""


class MissingFieldError(RequestError):
    pass


class InvalidFieldError(RequestError):
    """A field, query parameter, path parameter or header has a wrong type or value."""


class BodyTooLargeError(RequestError):
    pass


class ValueTooLargeError(RequestError):
    pass


class UnsupportedMediaTypeError(RequestError):
    pass


class NotReadyError(RequestError):
    """Raised by /ready; not the caller's fault, but it carries a message the same way."""


# --------------------------------------------------------------------------- the error table
@dataclass(frozen=True, slots=True)
class ErrorRule:
    status: int
    code: str
    retry_after: bool = False


ERROR_TABLE: Final[Mapping[type[Exception], ErrorRule]] = MappingProxyType({
    # 400: the request is wrong
    InvalidJsonError: ErrorRule(400, "invalid_json"),
    MissingFieldError: ErrorRule(400, "missing_field"),
    InvalidFieldError: ErrorRule(400, "invalid_field"),
    InvalidRequestError: ErrorRule(400, "invalid_request"),
    falcon.HTTPBadRequest: ErrorRule(400, "invalid_request"),  # e.g. a malformed Content-Length
    # 401, 403: who the caller is, and what its token allows (raftkv.http.auth)
    UnauthenticatedError: ErrorRule(401, "unauthenticated"),
    ForbiddenError: ErrorRule(403, "forbidden"),
    # 404, 405: no such key, no such route, wrong method
    KeyNotFoundError: ErrorRule(404, "key_not_found"),
    LeaseNotFoundError: ErrorRule(404, "lease_not_found"),
    TokenNotFoundError: ErrorRule(404, "token_not_found"),
    falcon.HTTPNotFound: ErrorRule(404, "not_found"),
    falcon.HTTPMethodNotAllowed: ErrorRule(405, "method_not_allowed"),
    # 409: a condition or a membership change was refused
    ConditionFailedError: ErrorRule(409, "condition_failed"),
    MembershipChangeError: ErrorRule(409, "membership_change_rejected"),
    AuthDisabledError: ErrorRule(409, "auth_disabled"),
    TokenConflictError: ErrorRule(409, "token_conflict"),
    # 413, 415: the body
    BodyTooLargeError: ErrorRule(413, "body_too_large"),
    falcon.HTTPContentTooLarge: ErrorRule(413, "body_too_large"),
    ValueTooLargeError: ErrorRule(413, "value_too_large"),
    UnsupportedMediaTypeError: ErrorRule(415, "unsupported_media_type"),
    falcon.HTTPUnsupportedMediaType: ErrorRule(415, "unsupported_media_type"),
    # 503: retry shortly (the leader hint says where)
    NoLeaderError: ErrorRule(503, "no_leader", retry_after=True),
    NotLeaderError: ErrorRule(503, "not_leader", retry_after=True),
    UnavailableError: ErrorRule(503, "unavailable", retry_after=True),
    NotReadyError: ErrorRule(503, "not_ready", retry_after=True),
    # 504: a wait ran out; for a write the outcome is unknown
    OutcomeUnknownError: ErrorRule(504, "commit_timeout"),
    ReadTimeoutError: ErrorRule(504, "read_timeout"),
    # 507
    StorageFullError: ErrorRule(507, "storage_full"),
})

_INTERNAL_ERROR: Final = ErrorRule(500, "internal_error")


def _rule_for(ex: Exception) -> ErrorRule | None:
    for cls in type(ex).__mro__:
        rule = ERROR_TABLE.get(cls)
        if rule is not None:
            return rule
    if isinstance(ex, falcon.HTTPError):  # a Falcon error the table does not name
        status = ex.status_code
        return ErrorRule(status, "invalid_request" if status < 500 else "internal_error")
    return None


class _ErrorRenderer:
    """Renders every exception as the one JSON error shape (registered for Exception)."""

    def __init__(self, service: KVService) -> None:
        self._service = service

    def __call__(self, req: falcon.Request, resp: falcon.Response, ex: Exception,
                 params: dict[str, Any]) -> None:
        rule = _rule_for(ex)
        if rule is None:
            _log.error("event=http_internal_error method=%s route=%s error=%s",
                       req.method, req.uri_template, type(ex).__name__, exc_info=ex)
            rule, message = _INTERNAL_ERROR, "internal error"
        else:
            message = _message_of(ex, req)
        body: dict[str, object] = {"error": rule.code, "message": message,
                                   "leader": self._leader_hint(ex)}
        if isinstance(ex, ConditionFailedError):
            body["key"] = ex.key
            body["current_index"] = ex.current_index
        elif isinstance(ex, LeaseNotFoundError):
            body["lease"] = ex.lease_id
        elif isinstance(ex, OutcomeUnknownError):
            body["outcome"] = "unknown"
        elif isinstance(ex, TokenConflictError) and ex.token_id is not None:
            body["id"] = ex.token_id
        elif isinstance(ex, MembershipChangeError) and ex.probe is not None:
            body["probe"] = ex.probe  # a join's probe found another node: asking again is vain
        elif isinstance(ex, UnauthenticatedError):
            resp.set_header("WWW-Authenticate", 'Bearer realm="raftkv"')
        if isinstance(ex, falcon.HTTPError) and ex.headers:
            resp.set_headers(ex.headers)  # e.g. Allow on a 405
        if rule.retry_after:
            resp.set_header("Retry-After", _RETRY_AFTER_S)
        _send(resp, body, rule.status)

    def _leader_hint(self, ex: Exception) -> str | None:
        if isinstance(ex, ServiceError) and ex.leader is not None:
            return ex.leader
        try:
            return self._service.leader_http_address()
        except Exception:  # the hint is best effort; the error being rendered matters more
            _log.debug("event=leader_hint_failed", exc_info=True)
            return None


def _message_of(ex: Exception, req: falcon.Request) -> str:
    if isinstance(ex, RequestError | ServiceError):
        return ex.message
    if isinstance(ex, falcon.HTTPMethodNotAllowed):
        allowed = (ex.headers or {}).get("Allow", "")  # type: ignore[union-attr]
        return f"{req.method} is not allowed here; allowed: {allowed}"
    if isinstance(ex, falcon.HTTPNotFound):
        return f"no such resource: {req.method} {req.path}"
    if isinstance(ex, falcon.HTTPError):
        return ex.description or ex.title
    return type(ex).__name__


# --------------------------------------------------------------------------- JSON in and out
def _bounded_int(text: str) -> int:
    number = int(text)  # more than sys.get_int_max_str_digits() digits raises ValueError
    if not _MIN_JSON_INT <= number <= _MAX_JSON_INT:
        raise ValueError("an integer does not fit in 64 bits")
    return number


_DECODER: Final = json.JSONDecoder(parse_float=finite_json_float, parse_int=_bounded_int,
                                   parse_constant=reject_json_constant)


def _dumps(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=_SEPARATORS,
                      allow_nan=False, default=str).encode("utf-8")


def _send(resp: falcon.Response, body: object, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _dumps(body)


def _check_media_type(req: falcon.Request) -> None:
    content_type = req.content_type
    if content_type is None or not content_type.strip():
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    # `curl -d '{"value": 1}'` (the original demo's session) labels its JSON body as a form:
    # the body is read as JSON all the same.
    if media_type in ("application/json", "application/x-www-form-urlencoded") or (
            media_type.startswith("application/") and media_type.endswith("+json")):
        return
    raise UnsupportedMediaTypeError(
        f"Content-Type {media_type[:100]!r} is not supported: send application/json")


def _read_object(req: falcon.Request, max_body_bytes: int) -> dict[str, object]:
    """The body as a JSON object, read without ever holding more than max_body_bytes + 1."""
    _check_media_type(req)
    length = req.content_length  # a malformed header raises HTTPInvalidHeader (400)
    if length is not None:
        if length > max_body_bytes:
            raise BodyTooLargeError(
                f"the body is {length} bytes; the limit is {max_body_bytes}")
        data = req.bounded_stream.read()
    elif req.env.get("wsgi.input_terminated"):  # chunked, and the server says where it ends
        data = req.stream.read(max_body_bytes + 1)
        if len(data) > max_body_bytes:
            raise BodyTooLargeError(f"the body is over the limit of {max_body_bytes} bytes")
    else:
        data = b""
    if not data.strip():
        raise InvalidJsonError("the body is empty: send a JSON object")
    try:
        parsed = _DECODER.decode(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidJsonError("the body is not valid UTF-8") from None
    except ValueError as ex:  # JSONDecodeError, NaN/Infinity, out-of-range numbers
        raise InvalidJsonError(f"the body is not valid JSON: {ex}") from None
    except RecursionError:
        raise InvalidJsonError("the body is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise InvalidJsonError("the body must be a JSON object")
    return parsed


# --------------------------------------------------------------------------- field checks
def _only_fields(obj: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InvalidFieldError(
            f"unknown field '{where}{unknown[0]}'; expected: {', '.join(sorted(allowed))}")


def _check_key(key: object, where: str = "key") -> str:
    if not isinstance(key, str):
        raise InvalidFieldError(f"{where} must be a string")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidFieldError(f"{where} is not valid Unicode") from None
    if not 1 <= size <= MAX_KEY_BYTES:
        raise InvalidFieldError(f"{where} must be 1..{MAX_KEY_BYTES} bytes of UTF-8; "
                                f"it is {size}")
    return key


def _check_value(value: object, where: str = "value") -> object:
    if type(value) is str and 6 * len(value) + 2 <= MAX_VALUE_BYTES and value.isascii():
        return value  # even fully escaped, its JSON is under the limit
    try:
        size = len(json.dumps(value, ensure_ascii=False, separators=_SEPARATORS,
                              allow_nan=False).encode("utf-8"))
    except (UnicodeEncodeError, ValueError, RecursionError):
        raise InvalidFieldError(f"{where} is not encodable (lone surrogate?)") from None
    if size > MAX_VALUE_BYTES:
        raise ValueTooLargeError(
            f"{where} is {size} bytes encoded; the limit is {MAX_VALUE_BYTES}")
    return value


def _check_prev_index(value: object, where: str = "prev_index") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INDEX:
        raise InvalidFieldError(f"{where} must be an integer >= 0")
    return value


def _check_lease_id(value: object, where: str = "lease") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LEASE_ID:
        raise InvalidFieldError(f"{where} must be a lease id, an integer >= 1")
    return value


def _check_ttl(value: object, floor_s: int, where: str = "ttl") -> int:
    """A TTL in whole seconds, floor_s..MAX_LEASE_TTL_S (the node's floor: MIN_LEASE_TTL_S,
    or 1.5 election timeouts when its timeout is longer)."""
    if (isinstance(value, bool) or not isinstance(value, int)
            or not floor_s <= value <= MAX_LEASE_TTL_S):
        why = "" if floor_s == MIN_LEASE_TTL_S else (
            " (this node's floor: 1.5 election timeouts, as a failover may take that long)")
        raise InvalidFieldError(f"{where} must be a whole number of seconds in "
                                f"{floor_s}..{MAX_LEASE_TTL_S}{why}")
    return value


def _lease_in_path(value: str) -> int:
    lease_id = parse_decimal(value, MAX_LEASE_ID)
    if lease_id is None or lease_id < 1:
        raise InvalidFieldError("the lease id in the path must be an integer >= 1")
    return lease_id


def _required(obj: Mapping[str, object], name: str, where: str = "") -> object:
    if name not in obj:
        raise MissingFieldError(f"missing field '{where}{name}'")
    return obj[name]


def _check_node_id(value: object, where: str = "id") -> str:
    if (not isinstance(value, str) or not 1 <= len(value) <= MAX_NODE_ID_CHARS
            or not value.isprintable() or any(c.isspace() or c == "/" for c in value)):
        raise InvalidFieldError(
            f"{where} must be a node name of 1..{MAX_NODE_ID_CHARS} printable characters "
            "without spaces or '/', like n1")
    return value


def _check_address(value: object, where: str = "address") -> str:
    if isinstance(value, str) and 3 <= len(value) <= MAX_ADDRESS_CHARS:
        host, sep, port = value.rpartition(":")
        number = parse_decimal(port, 65535) if sep and host else None
        if (number is not None and number >= 1 and host.isprintable()
                and not any(c.isspace() for c in host)):
            if is_wildcard_host(host):
                raise InvalidFieldError(f"{where} is dialled by the other members: {host} "
                                        "names no host; give the node's host name or IP")
            return value
    raise InvalidFieldError(f"{where} must be 'host:port'")


# --------------------------------------------------------------------------- query and headers
def _param(req: falcon.Request, name: str) -> str | None:
    value = req.params.get(name)
    if isinstance(value, list):
        raise InvalidFieldError(f"query parameter {name!r} is given more than once")
    return value


def _positive_seconds(value: object) -> float | None:
    """`value` as a positive, finite number of seconds; None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _flag(req: falcon.Request, name: str) -> bool:
    value = _param(req, name)
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise InvalidFieldError(f"query parameter {name!r} must be true or false")


def _consistency(req: falcon.Request) -> Consistency:
    value = _param(req, "consistency")
    if value is None:
        return Consistency.LINEARIZABLE
    try:
        return Consistency(value)
    except ValueError:
        raise InvalidFieldError(
            "query parameter 'consistency' must be linearizable, leader or stale") from None


def _int_param(req: falcon.Request, name: str, low: int, high: int) -> int | None:
    value = _param(req, name)
    if value is None:
        return None
    number = parse_decimal(value, high)
    if number is None or number < low:
        raise InvalidFieldError(f"query parameter {name!r} must be an integer in {low}..{high}")
    return number


def _request_id(req: falcon.Request) -> str | None:
    value = req.get_header("Idempotency-Key")
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(
            " " <= c <= "~" for c in value):
        raise InvalidFieldError(
            f"header Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} printable "
            "ASCII characters")
    return value


# --------------------------------------------------------------------------- the API context
@dataclass(frozen=True, slots=True)
class _Api:
    """What every resource shares: the service and the request limits."""

    service: KVService
    max_body_bytes: int
    default_timeout_s: float
    min_lease_ttl_s: int

    def own_timeout_s(self, req: falcon.Request) -> float:
        """The timeout `req` asks for, before any wait: ?timeout when it is a positive
        number of seconds, else its route's default (a watch's 30 s, else the app's); a
        malformed ?timeout gets its 400 from timeout_s. The token look-up waits no longer."""
        asked = _positive_seconds(req.params.get("timeout"))
        if asked is not None:
            return asked
        if req.method == "GET" and req.uri_template == "/keys/{key:path}":
            try:
                if _flag(req, "wait"):
                    return DEFAULT_WATCH_TIMEOUT_S
            except InvalidFieldError:
                pass  # the resource answers its 400
        return self.default_timeout_s

    def timeout_s(self, req: falcon.Request, default_s: float | None = None) -> float:
        """`?timeout` (else the default), less what the token check waited, if it did."""
        value = _param(req, "timeout")
        if value is None:
            seconds = self.default_timeout_s if default_s is None else default_s
        else:
            asked = _positive_seconds(value)
            if asked is None or asked > MAX_TIMEOUT_S:
                raise InvalidFieldError(
                    f"query parameter 'timeout' must be seconds in (0, {MAX_TIMEOUT_S:g}]")
            seconds = asked
        waited = auth_waited_s(req)
        if not waited:
            return seconds
        if seconds <= waited:
            raise ReadTimeoutError("checking the token took the request's whole timeout (this "
                                   "node was slow to read the token table); nothing was done: "
                                   "retry")
        return seconds - waited

    def read_object(self, req: falcon.Request) -> dict[str, object]:
        return _read_object(req, self.max_body_bytes)

    def redirected(self, req: falcon.Request, resp: falcon.Response) -> bool:
        """With ?redirect=true on a follower, answer 307 to the leader (and return True)."""
        if not _flag(req, "redirect") or self.service.is_leader():
            return False
        leader = self.service.leader_http_address()
        if leader is None:
            raise NoLeaderError("no leader is known yet; retry shortly")
        base = leader if leader.startswith(("http://", "https://")) else f"http://{leader}"
        query = "&".join(part for part in req.query_string.split("&")
                         if part and unquote(part.split("=", 1)[0]) != "redirect")
        location = base + quote(req.root_path + req.path) + (f"?{query}" if query else "")
        resp.set_header("Location", location)
        _send(resp, {"leader": leader, "location": location}, 307)
        return True


def _write_json(key: str, result: WriteResult | DeleteResult) -> dict[str, object]:
    if isinstance(result, DeleteResult):
        return {"key": key, "deleted": result.deleted, "index": result.index}
    return _with_lease({"key": key, "value": result.value, "index": result.index},
                       result.lease)


def _with_lease(body: dict[str, object], lease: int | None) -> dict[str, object]:
    """A key's JSON with "lease" when it is attached to one (answers without a lease stay as
    they were before leases)."""
    if lease is not None:
        body["lease"] = lease
    return body


def _lease_json(lease: LeaseInfo, *, keys: bool) -> dict[str, object]:
    body: dict[str, object] = {"id": lease.lease_id, "ttl": lease.ttl_s,
                               "remaining": round(lease.remaining_s, 3),
                               "key_count": lease.key_count}
    if keys:
        body["keys"] = list(lease.keys)
    return body


def _member_json(member: Member) -> dict[str, object]:
    return dataclasses.asdict(member)


# --------------------------------------------------------------------------- resources
class _KeyResource:
    _BODY_FIELDS: Final = frozenset({"value", "prev_index", "lease", "ttl"})

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        if _flag(req, "wait"):
            self._watch(req, resp, _check_key(key))
            return
        result = self._api.service.get(_check_key(key), _consistency(req),
                                       self._api.timeout_s(req))
        _send(resp, _with_lease({"value": result.value, "index": result.index}, result.lease))

    def _watch(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        """?wait=true&index=n: 200 once the key changes after n (or after now), or with its
        current state when the timeout (default 30 s) runs out; `changed` tells which."""
        after_index = _int_param(req, "index", 0, MAX_INDEX)
        timeout_s = self._api.timeout_s(req, DEFAULT_WATCH_TIMEOUT_S)
        result = self._api.service.watch(key, after_index, timeout_s)
        if result.deleted:
            _send(resp, {"deleted": True, "index": result.index, "changed": result.changed})
        else:
            _send(resp, {"value": result.value, "index": result.index,
                         "changed": result.changed})

    def on_put(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        key = _check_key(key)
        timeout_s, request_id = self._api.timeout_s(req), _request_id(req)
        if self._api.redirected(req, resp):
            return
        body = self._api.read_object(req)
        _only_fields(body, self._BODY_FIELDS, "")
        value = _check_value(_required(body, "value"))
        prev_index = _check_prev_index(body.get("prev_index"))
        lease = _check_lease_id(body.get("lease"))
        ttl_s = (None if body.get("ttl") is None else
                 _check_ttl(body["ttl"], self._api.min_lease_ttl_s))
        if lease is not None and ttl_s is not None:
            raise InvalidFieldError("give 'lease' (an existing lease) or 'ttl' (a new lease "
                                    "of the key's own), not both")
        result = self._api.service.put(key, value, prev_index=prev_index, lease=lease,
                                       ttl_s=ttl_s, request_id=request_id, timeout_s=timeout_s)
        _send(resp, _with_lease({"value": result.value, "index": result.index}, result.lease))

    on_post = on_put

    def on_delete(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        key = _check_key(key)
        timeout_s, request_id = self._api.timeout_s(req), _request_id(req)
        prev_index = _int_param(req, "prev_index", 0, MAX_INDEX)
        if self._api.redirected(req, resp):
            return
        result = self._api.service.delete(key, prev_index=prev_index, request_id=request_id,
                                          timeout_s=timeout_s)
        _send(resp, {"deleted": result.deleted, "index": result.index})


class _KeysResource:
    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if _flag(req, "wait"):  # a list answered at once would look like a fired watch
            raise InvalidFieldError("?wait watches one key (GET /keys/<key>/?wait=true); "
                                    "the list of keys does not wait")
        prefix = _param(req, "prefix") or ""
        if prefix:
            _check_key(prefix, "query parameter 'prefix'")
        limit = _int_param(req, "limit", 1, MAX_LIST_LIMIT) or DEFAULT_LIST_LIMIT
        found = self._api.service.list_keys(prefix, limit, _consistency(req),
                                            self._api.timeout_s(req))
        _send(resp, {"keys": [{"key": kv.key, "value": kv.value, "index": kv.index}
                              for kv in found]})


class _BatchResource:
    _BODY_FIELDS: Final = frozenset({"ops"})
    _PUT_FIELDS: Final = frozenset({"op", "key", "value", "prev_index", "lease"})
    _DELETE_FIELDS: Final = frozenset({"op", "key", "prev_index"})

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        timeout_s, request_id = self._api.timeout_s(req), _request_id(req)
        if self._api.redirected(req, resp):
            return
        body = self._api.read_object(req)
        _only_fields(body, self._BODY_FIELDS, "")
        raw_ops = _required(body, "ops")
        if not isinstance(raw_ops, list) or not 1 <= len(raw_ops) <= MAX_BATCH_OPS:
            raise InvalidFieldError(f"'ops' must be a list of 1..{MAX_BATCH_OPS} operations")
        ops = [self._op(raw, f"ops[{i}].") for i, raw in enumerate(raw_ops)]
        authorize_keys(req, (op.key for op in ops))
        result = self._api.service.batch(ops, request_id=request_id, timeout_s=timeout_s)
        _send(resp, {"index": result.index,
                     "results": [_write_json(op.key, r)
                                 for op, r in zip(ops, result.results, strict=True)]})

    def _op(self, raw: object, where: str) -> BatchOp:
        if not isinstance(raw, dict):
            raise InvalidFieldError(f"{where[:-1]} must be an object")
        kind = _required(raw, "op", where)
        if kind not in ("put", "delete"):
            raise InvalidFieldError(f"{where}op must be 'put' or 'delete'")
        _only_fields(raw, self._PUT_FIELDS if kind == "put" else self._DELETE_FIELDS, where)
        key = _check_key(_required(raw, "key", where), f"{where}key")
        prev_index = _check_prev_index(raw.get("prev_index"), f"{where}prev_index")
        if kind == "put":
            value = _check_value(_required(raw, "value", where), f"{where}value")
            lease = _check_lease_id(raw.get("lease"), f"{where}lease")
            return BatchOp("put", key, value, prev_index, lease)
        return BatchOp("delete", key, None, prev_index)


class _LeasesResource:
    """POST /leases {"ttl": s}: grant; GET /leases: list (without keys)."""

    _BODY_FIELDS: Final = frozenset({"ttl"})

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        timeout_s, request_id = self._api.timeout_s(req), _request_id(req)
        if self._api.redirected(req, resp):
            return
        body = self._api.read_object(req)
        _only_fields(body, self._BODY_FIELDS, "")
        ttl_s = _check_ttl(_required(body, "ttl"), self._api.min_lease_ttl_s)
        result = self._api.service.lease_grant(ttl_s, request_id=request_id,
                                               timeout_s=timeout_s)
        _send(resp, {"id": result.lease_id, "ttl": result.ttl_s, "index": result.index})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = _int_param(req, "limit", 1, MAX_LIST_LIMIT) or DEFAULT_LIST_LIMIT
        found = self._api.service.leases(limit, timeout_s=self._api.timeout_s(req))
        _send(resp, {"leases": [_lease_json(lease, keys=False) for lease in found]})


class _LeaseResource:
    """GET /leases/<id>: the lease with its keys; DELETE: revoke it (its keys are deleted)."""

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response, lease_id: str) -> None:
        lease = self._api.service.lease(_lease_in_path(lease_id),
                                        timeout_s=self._api.timeout_s(req))
        _send(resp, _lease_json(lease, keys=True))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, lease_id: str) -> None:
        lease = _lease_in_path(lease_id)
        timeout_s, request_id = self._api.timeout_s(req), _request_id(req)
        if self._api.redirected(req, resp):
            return
        result = self._api.service.lease_revoke(lease, request_id=request_id,
                                                timeout_s=timeout_s)
        _send(resp, {"id": result.lease_id, "revoked": True, "index": result.index})


class _KeepAliveResource:
    """POST /leases/<id>/keepalive: restart the lease's TTL (answered by the leader)."""

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response, lease_id: str) -> None:
        lease = _lease_in_path(lease_id)
        timeout_s = self._api.timeout_s(req)
        if self._api.redirected(req, resp):
            return
        result = self._api.service.lease_keepalive(lease, timeout_s=timeout_s)
        _send(resp, {"id": result.lease_id, "ttl": result.ttl_s})


class _SnapshotResource:
    """GET /snapshot: the state machine's snapshot as a stream, for backups."""

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        backup = self._api.service.backup(_consistency(req), self._api.timeout_s(req))
        resp.status = 200
        resp.content_type = SNAPSHOT_MEDIA_TYPE
        resp.set_header("X-Raftkv-Index", str(backup.index))
        resp.set_header("X-Raftkv-Checksum", backup.checksum)
        resp.set_header("X-Raftkv-Checksum-Algorithm", backup.checksum_algorithm)
        resp.content_length = backup.length_bytes
        resp.stream = backup.chunks


class _StatusResource:
    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send(resp, dataclasses.asdict(self._api.service.status()))


class _HealthResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send(resp, {"status": "ok"})


class _ReadyResource:
    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        readiness = self._api.service.readiness()
        if not readiness.ready:
            raise NotReadyError(readiness.reason or "not ready")
        _send(resp, {"status": "ready"})


class _ClusterResource:
    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        members = self._api.service.members()
        leader = next((m.id for m in members if m.leader), None)
        _send(resp, {"members": [_member_json(m) for m in members], "leader": leader})


class _JoinResource:
    _BODY_FIELDS: Final = frozenset({"id", "address", "voter"})

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        timeout_s = self._api.timeout_s(req)
        if self._api.redirected(req, resp):
            return
        body = self._api.read_object(req)
        _only_fields(body, self._BODY_FIELDS, "")
        raw_id = body.get("id")
        node_id = None if raw_id is None else _check_node_id(raw_id)
        address = _check_address(_required(body, "address"))
        voter = body.get("voter", True)
        if not isinstance(voter, bool):
            raise InvalidFieldError("voter must be true or false")
        index = self._api.service.join(node_id, address, voter=voter, timeout_s=timeout_s)
        _send(resp, {"index": index})


class _MemberResource:
    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_delete(self, req: falcon.Request, resp: falcon.Response, member_id: str) -> None:
        node_id = _check_node_id(member_id)
        timeout_s = self._api.timeout_s(req)
        if self._api.redirected(req, resp):
            return
        index = self._api.service.remove(node_id, timeout_s=timeout_s)
        _send(resp, {"index": index})


class _LeaderResource:
    _BODY_FIELDS: Final = frozenset({"id"})

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        timeout_s = self._api.timeout_s(req)
        target: str | None = None
        if req.content_length:
            body = self._api.read_object(req)
            _only_fields(body, self._BODY_FIELDS, "")
            raw_id = body.get("id")
            target = None if raw_id is None else _check_node_id(raw_id)
        leader = self._api.service.transfer_leadership(target, timeout_s=timeout_s)
        _send(resp, {"leader": leader})


# --------------------------------------------------------------------------- tokens
def _token_json(token: TokenInfo) -> dict[str, object]:
    return {"id": token.token_id, "role": token.role.value, "prefixes": list(token.prefixes),
            "created_index": token.created_index}


class _TokensResource:
    """POST /auth/tokens {"role", "prefixes"}: create (the secret is in this answer only);
    GET /auth/tokens: list them (never a secret)."""

    _BODY_FIELDS: Final = frozenset({"role", "prefixes"})

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        timeout_s, request_id = self._api.timeout_s(req), _request_id(req)
        if self._api.redirected(req, resp):
            return
        body = self._api.read_object(req)
        _only_fields(body, self._BODY_FIELDS, "")
        raw_role = _required(body, "role")
        try:
            role = Role(raw_role)
        except ValueError:
            raise InvalidFieldError("role must be 'read', 'write' or 'admin'") from None
        raw_prefixes = body.get("prefixes", [])
        if not isinstance(raw_prefixes, list):
            raise InvalidFieldError("prefixes must be a list of key prefixes")
        try:
            prefixes = check_prefixes(raw_prefixes)
        except (ValueError, TypeError) as e:
            raise InvalidFieldError(f"prefixes: {e}") from None
        if prefixes and role is Role.ADMIN:
            raise InvalidFieldError("an admin token cannot be limited to key prefixes")
        result = self._api.service.token_create(role, prefixes, request_id=request_id,
                                                timeout_s=timeout_s)
        _send(resp, {"id": result.token_id, "token": result.token, "role": result.role.value,
                     "prefixes": list(result.prefixes), "index": result.index})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        found = self._api.service.tokens(_consistency(req), self._api.timeout_s(req))
        _send(resp, {"enabled": self._api.service.authorizer().enabled,
                     "tokens": [_token_json(t) for t in found]})


class _TokenResource:
    """DELETE /auth/tokens/<id>: revoke it (every node refuses it once it applied this)."""

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_delete(self, req: falcon.Request, resp: falcon.Response, token_id: str) -> None:
        try:
            check_token_id(token_id)
        except ValueError as e:
            raise InvalidFieldError(f"the token id in the path: {e}") from None
        timeout_s, request_id = self._api.timeout_s(req), _request_id(req)
        if self._api.redirected(req, resp):
            return
        result = self._api.service.token_revoke(token_id, request_id=request_id,
                                                timeout_s=timeout_s)
        _send(resp, {"id": result.token_id, "revoked": True, "index": result.index})


class _AlarmsResource:
    """GET /alarms: the raised NOSPACE alarms; DELETE /alarms: disarm them (through the log).
    While one is raised, writes that add data answer 507 storage_full on every node."""

    def __init__(self, api: _Api) -> None:
        self._api = api

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        alarms = self._api.service.alarms()
        _send(resp, {"alarms": [{"alarm": "NOSPACE", "node": a.node_id, "cause": a.cause,
                                 "index": a.index} for a in alarms]})

    def on_delete(self, req: falcon.Request, resp: falcon.Response) -> None:
        timeout_s = self._api.timeout_s(req)
        if self._api.redirected(req, resp):
            return
        index = self._api.service.disarm_alarms(timeout_s=timeout_s)
        _send(resp, {"disarmed": True, "index": index})


class MetricsSink(Protocol):
    """Where request latencies go and where /metrics comes from (raftkv.metrics)."""

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None: ...

    def render(self) -> bytes: ...


class _MetricsResource:
    def __init__(self, sink: MetricsSink) -> None:
        self._sink = sink

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = self._sink.render()


class _LatencyMiddleware:
    """Times every request, labelled by its route template (not the raw path: bounded)."""

    def __init__(self, sink: MetricsSink) -> None:
        self._sink = sink

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        started = getattr(req.context, "started", None)
        if started is None:
            return
        route = req.uri_template or "unmatched"
        status = resp.status if isinstance(resp.status, int) else int(str(resp.status)[:3])
        self._sink.observe_http(route, req.method, status, time.perf_counter() - started)


class _Utf8Middleware:
    """Refuses a path or query string whose percent-encoded bytes are not UTF-8.

    Falcon decodes them with errors='replace': without this, /keys/a%ff and /keys/a%fe would
    both name the key 'a\ufffd', and one client's write would overwrite another's."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        path = req.env.get("PATH_INFO", "")
        if not path.isascii() and not _utf8(path.encode("latin-1")):
            raise InvalidFieldError("the path is not UTF-8: percent-encoded bytes in it must "
                                    "form UTF-8 characters")
        query = req.env.get("QUERY_STRING", "")
        if not query.isascii():  # RFC 3986: anything else is percent-encoded
            raise InvalidFieldError("the query string holds bytes that are not ASCII: "
                                    "percent-encode them (as UTF-8)")
        if "%" in query and not _utf8(unquote_to_bytes(query)):
            raise InvalidFieldError("the query string is not UTF-8: percent-encoded bytes in "
                                    "it must form UTF-8 characters")


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------- the factory
def create_app(service: KVService, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               default_timeout_s: float = 5.0, metrics: MetricsSink | None = None,
               metrics_open: bool = False, min_lease_ttl_s: int = MIN_LEASE_TTL_S,
               ) -> falcon.App[falcon.Request, falcon.Response]:
    """The WSGI app of one node. `service` is the only thing it calls. `metrics_open`: with
    auth on, /metrics and /status answer without a token (scrapers on a private network).
    `min_lease_ttl_s`: the shortest TTL this node grants (raftkv.kv.leases.min_lease_ttl_s of
    its election timeout)."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, not {max_body_bytes}")
    if not 0 < default_timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"default_timeout_s must be in (0, {MAX_TIMEOUT_S:g}]")
    if not MIN_LEASE_TTL_S <= min_lease_ttl_s <= MAX_LEASE_TTL_S:
        raise ValueError(f"min_lease_ttl_s must be in {MIN_LEASE_TTL_S}..{MAX_LEASE_TTL_S}")
    api = _Api(service, max_body_bytes, default_timeout_s, min_lease_ttl_s)
    middleware: list[Any] = [] if metrics is None else [_LatencyMiddleware(metrics)]
    middleware.append(_Utf8Middleware())
    middleware.append(AuthMiddleware(service, metrics_open=metrics_open,
                                     own_timeout_s_of=api.own_timeout_s))
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True  # /keys/a/ is /keys/a
    app.req_options.auto_parse_qs_csv = False
    app.req_options.keep_blank_qs_values = True

    app.add_route("/keys", _KeysResource(api))
    app.add_route("/keys/{key:path}", _KeyResource(api))
    app.add_route("/batch", _BatchResource(api))
    app.add_route("/leases", _LeasesResource(api))
    app.add_route("/leases/{lease_id}", _LeaseResource(api))
    app.add_route("/leases/{lease_id}/keepalive", _KeepAliveResource(api))
    app.add_route("/snapshot", _SnapshotResource(api))
    app.add_route("/status", _StatusResource(api))
    app.add_route("/health", _HealthResource())
    app.add_route("/ready", _ReadyResource(api))
    app.add_route("/cluster", _ClusterResource(api))
    app.add_route("/cluster/join", _JoinResource(api))
    app.add_route("/cluster/members/{member_id}", _MemberResource(api))
    app.add_route("/cluster/leader", _LeaderResource(api))
    app.add_route("/auth/tokens", _TokensResource(api))
    app.add_route("/auth/tokens/{token_id}", _TokenResource(api))
    app.add_route("/alarms", _AlarmsResource(api))
    if metrics is not None:
        app.add_route("/metrics", _MetricsResource(metrics))

    # One renderer for everything: Falcon's own HTTPError (404, 405...) included.
    renderer = _ErrorRenderer(service)
    app.add_error_handler(Exception, renderer)
    app.add_error_handler(falcon.HTTPError, renderer)
    return app
