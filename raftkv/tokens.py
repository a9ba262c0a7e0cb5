"""Token requests for a node's service: the commands to propose, and their results as the
KVService answers them (raftkv.service). Shared by every runtime: which thread proposes and
waits is theirs; what goes into the log and what comes back out is decided here once.

The secret is made HERE, on the node that serves the create (its HTTP worker), and leaves this
node only in the answer to the caller: the command carries its digest (raftkv.auth).
"""

from __future__ import annotations

from raftkv.auth import Role, TokenTable, new_secret, new_token_id, token_digest
from raftkv.kv.commands import TokenCreate, TokenRevoke
from raftkv.kv.state_machine import (
    AUTH_REFUSALS,
    AuthRefused,
    TokenCreated,
    TokenNotFound,
    TokenRevoked,
)
from raftkv.service import (
    AuthDisabledError,
    InvalidRequestError,
    TokenConflictError,
    TokenCreateResult,
    TokenInfo,
    TokenNotFoundError,
    TokenRevokeResult,
)

__all__ = ["create_command", "created", "revoke_command", "revoked", "token_infos"]

_DISABLED = ("this cluster was bootstrapped without a root token: auth is off and it keeps no "
             "tokens")


def create_command(table: TokenTable, role: Role,
                   prefixes: tuple[str, ...]) -> tuple[TokenCreate, str]:
    """The command to propose and the secret to answer with once it applied. AuthDisabledError
    when `table` (this node's current one) says auth is off; InvalidRequestError for bad
    prefixes."""
    if not table.enabled:
        raise AuthDisabledError(_DISABLED)
    secret = new_secret()
    try:
        return TokenCreate(new_token_id(), role, prefixes, token_digest(secret)), secret
    except (ValueError, TypeError) as e:
        raise InvalidRequestError(str(e)) from None


def revoke_command(table: TokenTable, token_id: str) -> TokenRevoke:
    if not table.enabled:
        raise AuthDisabledError(_DISABLED)
    try:
        return TokenRevoke(token_id)
    except (ValueError, TypeError) as e:
        raise InvalidRequestError(str(e)) from None


def created(result: object, cmd: TokenCreate, secret: str) -> TokenCreateResult | None:
    """The answer to a create whose entry applied with `result`; None: not a token result
    (the caller's generic handling of what it proposed applies)."""
    if isinstance(result, TokenCreated):
        if result.replayed or result.token_id != cmd.token_id:
            raise TokenConflictError(
                f"this request (its Idempotency-Key) already created token {result.token_id} "
                f"at index {result.index}; its secret was shown only in that first answer: "
                "revoke it and create another", token_id=result.token_id)
        return TokenCreateResult(cmd.token_id, secret, cmd.role, cmd.prefixes, result.index)
    _raise_refused(result)
    return None


def revoked(result: object) -> TokenRevokeResult | None:
    if isinstance(result, TokenRevoked):
        return TokenRevokeResult(result.token_id, result.index)
    if isinstance(result, TokenNotFound):
        raise TokenNotFoundError(f"no token {result.token_id!r}")
    _raise_refused(result)
    return None


def _raise_refused(result: object) -> None:
    if isinstance(result, AuthRefused):
        message = AUTH_REFUSALS.get(result.reason, result.reason)
        if result.reason == "auth_disabled":
            raise AuthDisabledError(_DISABLED)
        raise TokenConflictError(message)


def token_infos(table: TokenTable) -> list[TokenInfo]:
    return [TokenInfo(t.token_id, t.role, t.prefixes, t.created_index) for t in table.tokens]
