"""Who may call what: ONE table of (route, method) -> what the request needs, and the Falcon
middleware that checks it before any resource runs.

With auth off (a cluster bootstrapped without a root token: `service.authorizer().enabled` is
False) nothing is checked. With auth on, every request but the OPEN ones carries
`Authorization: Bearer <token>`; no token or an unknown one is 401 `unauthenticated` (with
`WWW-Authenticate: Bearer`; for a made-shaped one the read below may answer its own 503/504
first, when no leader can confirm the table), a token whose role or key prefixes do not
allow the request is 403 `forbidden`. All go through the app's one error table. The token is
never logged or echoed.

The check needs only the service's Authorizer, a local copy of the token table: an HTTP worker
answers it without asking the Raft process. Only a bearer that copy does not know, shaped like
a made token, costs a round trip: the copy may lag the cluster (a token created through
another node a moment ago), so the worker reads the table once more behind a linearizable
barrier (`caught_up_authorizer`) before it answers 401: a token works on every node as soon
as its create was answered; that look-up counts against the request's own timeout. A route
missing from the table needs admin (fail closed); tests/http/test_auth.py checks that every
responder of the app is in it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

import falcon

from raftkv.auth import REQUEST_TOKEN_ID, Principal, may_be_made_secret, parse_bearer
from raftkv.service import ForbiddenError, KVService, UnauthenticatedError

__all__ = ["CATCH_UP_TIMEOUT_S", "PERMISSIONS", "AuthMiddleware", "Need", "auth_waited_s",
           "authorize_keys", "principal_of"]

CATCH_UP_TIMEOUT_S: Final = 5.0
"""How long a request with a token this node does not know may wait, at most, for the
linearizable read of the token table that tells whether the token was made elsewhere a moment
ago; never longer than the request's own timeout (`?timeout`, else its route's default), and
what it waited is taken off that timeout (`auth_waited_s`)."""


class Need(enum.Enum):
    OPEN = "open"
    """No token: liveness and readiness probes."""
    ANY_ROLE = "any role"
    """Any valid token."""
    SCRAPE = "any role, or open with --metrics-open"
    READ_KEY = "read on the key"
    """The `key` in the path (plain reads and watches)."""
    LIST = "read on the prefix"
    """`?prefix=`: it must start with one of the token's prefixes (all keys: none)."""
    WRITE_KEY = "write on the key"
    WRITE_KEYS = "write on every key of the body"
    """Checked by the resource once it has parsed the body (authorize_keys): /batch."""
    WRITE_SOME = "a write role"
    """Not about one key: granting, keeping alive and reading leases."""
    WRITE_ALL = "write on every key"
    """Revoking a lease deletes whatever keys are attached to it, whoever attached them."""
    ADMIN = "admin"


PERMISSIONS: Final[Mapping[tuple[str, str], Need]] = MappingProxyType({
    ("/health", "GET"): Need.OPEN,
    ("/ready", "GET"): Need.OPEN,
    ("/metrics", "GET"): Need.SCRAPE,
    ("/status", "GET"): Need.SCRAPE,
    ("/cluster", "GET"): Need.ANY_ROLE,  # what /status shows already
    ("/keys", "GET"): Need.LIST,
    ("/keys/{key:path}", "GET"): Need.READ_KEY,
    ("/keys/{key:path}", "PUT"): Need.WRITE_KEY,
    ("/keys/{key:path}", "POST"): Need.WRITE_KEY,
    ("/keys/{key:path}", "DELETE"): Need.WRITE_KEY,
    ("/batch", "POST"): Need.WRITE_KEYS,
    ("/leases", "POST"): Need.WRITE_SOME,
    ("/leases", "GET"): Need.WRITE_SOME,
    ("/leases/{lease_id}", "GET"): Need.WRITE_SOME,
    ("/leases/{lease_id}", "DELETE"): Need.WRITE_ALL,
    ("/leases/{lease_id}/keepalive", "POST"): Need.WRITE_SOME,
    ("/snapshot", "GET"): Need.ADMIN,
    ("/cluster/join", "POST"): Need.ADMIN,
    ("/cluster/members/{member_id}", "DELETE"): Need.ADMIN,
    ("/cluster/leader", "POST"): Need.ADMIN,
    ("/auth/tokens", "GET"): Need.ADMIN,
    ("/auth/tokens", "POST"): Need.ADMIN,
    ("/auth/tokens/{token_id}", "DELETE"): Need.ADMIN,
    ("/alarms", "GET"): Need.ANY_ROLE,  # why writes get 507: any client may know
    ("/alarms", "DELETE"): Need.ADMIN,
})
"""(route template, method) -> what the request needs. Anything else needs ADMIN."""


def principal_of(req: falcon.Request) -> Principal | None:
    """Who the request acts for; None when auth is off or the route is open."""
    principal: Principal | None = getattr(req.context, "principal", None)
    return principal


def authorize_keys(req: falcon.Request, keys: Iterable[str]) -> None:
    """For WRITE_KEYS routes: ForbiddenError unless the caller may write every key."""
    principal = principal_of(req)
    if principal is None:
        return
    for key in keys:
        if not principal.may_write(key):
            raise ForbiddenError(f"token {principal.token_id} ({principal.role.value}) may not "
                                 f"write the key {key[:200]!r}")


class AuthMiddleware:
    """Checks PERMISSIONS once the route is known (process_resource)."""

    def __init__(self, service: KVService, *, metrics_open: bool = False,
                 own_timeout_s_of: Callable[[falcon.Request], float] | None = None
                 ) -> None:
        """`own_timeout_s_of`: the timeout a request asks for (?timeout, else its route's
        default; the app knows both); None: CATCH_UP_TIMEOUT_S."""
        self._service = service
        self._metrics_open = metrics_open
        self._own_timeout_s_of = own_timeout_s_of

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         params: dict[str, Any]) -> None:
        req.context.principal = None
        REQUEST_TOKEN_ID.set(None)
        if resource is None:
            return  # no route: Falcon answers 404, nothing to protect
        authorizer = self._service.authorizer()
        if not authorizer.enabled:
            return
        need = PERMISSIONS.get((req.uri_template or "", req.method), Need.ADMIN)
        if need is Need.OPEN or (need is Need.SCRAPE and self._metrics_open):
            return
        secret = parse_bearer(req.get_header("Authorization"))
        principal = authorizer.authenticate(secret)
        if principal is None and secret is not None and may_be_made_secret(secret):
            # Made a moment ago through another node, it may not have reached this node's
            # copy of the table yet: look again after a linearizable read of the table.
            principal = self._look_up_again(req, secret)
        if principal is None:
            raise UnauthenticatedError(
                "this cluster requires a token: send 'Authorization: Bearer <token>' with a "
                "valid, unrevoked token")
        req.context.principal = principal
        REQUEST_TOKEN_ID.set(principal.token_id)  # the request's commands carry it
        if not _allows(need, principal, req, params):
            raise ForbiddenError(f"token {principal.token_id} ({principal.role.value}"
                                 f"{_limited(principal)}) may not {_what(need, req, params)}: "
                                 f"it needs {need.value}")

    def _look_up_again(self, req: falcon.Request, secret: str) -> Principal | None:
        """The token's principal in the caught-up table. The look-up waits at most
        CATCH_UP_TIMEOUT_S, or the request's own timeout when that is shorter (?timeout, else
        its route's default); what it waited is recorded (auth_waited_s) and the resource's
        timeout loses it (a request whose whole timeout went into the look-up answers 504
        there, with nothing done)."""
        own = self._own_timeout_s_of
        budget = CATCH_UP_TIMEOUT_S if own is None else min(CATCH_UP_TIMEOUT_S, own(req))
        started = time.monotonic()
        try:
            return self._service.caught_up_authorizer(budget).authenticate(secret)
        finally:
            req.context.auth_waited_s = max(0.0, time.monotonic() - started)


def auth_waited_s(req: falcon.Request) -> float:
    """What the token check of this request waited (0.0 for all but an unknown made-shaped
    bearer): the request's timeout has that much less left."""
    waited: float = getattr(req.context, "auth_waited_s", 0.0)  # set only by a look-up
    return waited


def _allows(need: Need, principal: Principal, req: falcon.Request,
            params: Mapping[str, Any]) -> bool:
    if principal.is_admin or need in (Need.ANY_ROLE, Need.SCRAPE):
        return True
    if need is Need.READ_KEY:
        return principal.may_read(str(params.get("key", "")))
    if need is Need.WRITE_KEY:
        return principal.may_write(str(params.get("key", "")))
    if need is Need.LIST:
        prefix = req.params.get("prefix")
        return principal.may_list(prefix if isinstance(prefix, str) else "")
    if need in (Need.WRITE_KEYS, Need.WRITE_SOME):
        return principal.may_write_some
    if need is Need.WRITE_ALL:
        return principal.may_write_all
    return False  # ADMIN


def _what(need: Need, req: falcon.Request, params: Mapping[str, Any]) -> str:
    if need in (Need.READ_KEY, Need.WRITE_KEY):
        verb = "read" if need is Need.READ_KEY else "write"
        return f"{verb} the key {str(params.get('key', ''))[:200]!r}"
    if need is Need.LIST:
        prefix = req.params.get("prefix")
        return f"list the keys starting with {prefix[:200]!r}" if isinstance(
            prefix, str) and prefix else "list every key"
    return f"{req.method} {req.uri_template}"


def _limited(principal: Principal) -> str:
    if not principal.prefixes:
        return ""
    shown = ", ".join(repr(p[:100]) for p in principal.prefixes[:5])
    return f" on {shown}{', ...' if len(principal.prefixes) > 5 else ''}"
