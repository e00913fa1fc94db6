"""Bearer tokens and roles: ``Authorization: Bearer pacsai_...``.

Roles are ordered, each allowing what the ones before it allow: viewer (studies, jobs, worklist
results) < auditor (also the audit trail) < admin (also retries, token listing, and metrics when
they are not open). A route declares the least role it needs with ``Depends(require_role(...))``
and receives the caller as a :class:`Principal`.

A missing, unknown or revoked token is answered 401 with ``WWW-Authenticate: Bearer``; a token
whose role is too low, 403. The use of a revoked token and a refused role are audited (110113
Security Alert, event type 110132 Use of Restricted Function, outcome 4); an unknown token is
only logged, so that a stream of made-up tokens cannot flood the audit trail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pacsai.api._context import ApiContext, api_context, audit, remote_address
from pacsai.api.problems import ApiProblem
from pacsai.db import AuditEventId, AuditEventType, AuditOutcome, TokenRole, utcnow
from pacsai.db.tokens import TOUCH_EVERY, find_token, touch_token
from pacsai.operations import Caller

__all__ = ["ROLE_RANK", "Principal", "TokenRole", "bearer_scheme", "require_role"]

log = logging.getLogger("pacsai.api")

ROLE_RANK: dict[TokenRole, int] = {TokenRole.VIEWER: 0, TokenRole.AUDITOR: 1, TokenRole.ADMIN: 2}

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="pacsai_<43 characters>",
    description="A token made by `pacsai token create --role viewer|auditor|admin --name NAME`.",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role, and the address the call came from."""

    name: str
    role: TokenRole
    remote_address: str | None = None

    @property
    def actor(self) -> str:
        """The actor recorded in audit events: ``api:<token name>``."""
        return f"api:{self.name}"

    def caller(self, route: str, **origin: Any) -> Caller:
        """The :class:`~pacsai.operations.Caller` of an operation run for this principal from
        ``route`` (recorded in its audit event's detail, with ``origin``)."""
        return Caller(self.actor, self.remote_address, {"route": route, **origin})


def _unauthorized(detail: str, *, invalid: bool) -> ApiProblem:
    challenge = 'Bearer realm="pacsai"' + (', error="invalid_token"' if invalid else "")
    return ApiProblem(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})


def authenticate(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    needed: TokenRole,
    context: ApiContext,
) -> Principal:
    """The caller of ``request`` if its token is valid and its role at least ``needed``.

    Raises
    ------
    ApiProblem
        401 without a valid token, 403 with a role below ``needed``.
    """
    remote = remote_address(request)
    if credentials is None:
        raise _unauthorized(
            "this route needs a bearer token (Authorization: Bearer pacsai_...)", invalid=False
        )
    with context.database.reading() as session:
        token = find_token(session=session, secret=credentials.credentials)
    if token is None:
        log.warning(
            "API call with an unknown token from %s to %s",
            remote,
            request.url.path,
            extra={"action": "api_unknown_token", "remote_address": remote},
        )
        raise _unauthorized("the token is not known to this node", invalid=True)
    principal = Principal(token.name, token.role, remote)
    if token.revoked_at is not None:
        _refused(context, principal, request, reason="revoked token")
        raise _unauthorized(f"token {token.name!r} was revoked", invalid=True)
    if ROLE_RANK[token.role] < ROLE_RANK[needed]:
        _refused(context, principal, request, reason=f"role {token.role.value} < {needed.value}")
        raise ApiProblem(
            403,
            "forbidden",
            f"token {token.name!r} has role {token.role.value}; this route needs {needed.value}",
        )
    now = utcnow()
    if token.last_used_at is None or now - token.last_used_at >= TOUCH_EVERY:
        with context.database.transaction() as session:
            touch_token(session=session, token_id=token.id, now=now)
    return principal


def _refused(context: ApiContext, principal: Principal, request: Request, *, reason: str) -> None:
    log.warning(
        "API call refused (%s) for token %r from %s to %s",
        reason,
        principal.name,
        principal.remote_address,
        request.url.path,
        extra={"action": "api_refused", "remote_address": principal.remote_address},
    )
    audit(
        context,
        actor=principal.actor,
        remote=principal.remote_address,
        event_id=AuditEventId.SECURITY_ALERT,
        event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
        outcome=AuditOutcome.MINOR_FAILURE,
        detail={"method": request.method, "path": request.url.path, "reason": reason},
    )


def require_role(role: TokenRole | str) -> Callable[..., Principal]:
    """A dependency admitting callers whose token has at least ``role``.

    Parameters
    ----------
    role
        ``viewer``, ``auditor`` or ``admin`` (or the :class:`TokenRole`).

    Examples
    --------
    >>> @router.get("/audit")
    ... def read_audit(principal: Annotated[Principal, Depends(require_role("auditor"))]): ...
    """
    needed = TokenRole(role)

    def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
        context: Annotated[ApiContext, Depends(api_context)],
    ) -> Principal:
        return authenticate(request, credentials, needed, context)

    dependency.__name__ = f"require_{needed.value}"
    return dependency
