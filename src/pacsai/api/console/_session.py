"""Sign-in to the console: a token pasted once becomes a server-side session.

The browser holds the session's random secret in a cookie (``HttpOnly``, ``SameSite=Strict``,
``Secure`` over HTTPS, path ``/``); the database holds its SHA-256 and the token it acts for.
Sessions are rows rather than signed cookies so that signing out, idling past
``api.session_idle_minutes``, passing ``api.session_max_hours`` or revoking the token really
ends them: a copied cookie is worth nothing afterwards.

Every form that changes something carries a CSRF token derived from the session's secret
(HMAC-SHA256), which a page of another site cannot know; the sign-in form, which has no
session yet, is tied to a short-lived cookie of its own (double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response

from pacsai.api._context import ApiContext, api_context, audit, remote_address
from pacsai.api.auth import ROLE_RANK, Principal
from pacsai.db import AuditEventId, AuditEventType, AuditOutcome, TokenRole, utcnow
from pacsai.db.sessions import TOUCH_EVERY, end_session, find_session, touch_session
from pacsai.operations import Caller

__all__ = [
    "SESSION_COOKIE",
    "SIGN_IN_COOKIE",
    "ConsoleForbidden",
    "ConsoleUser",
    "CsrfRefused",
    "SignInRequired",
    "check_csrf",
    "current_user",
    "safe_next",
    "signed_in",
]

log = logging.getLogger("pacsai.api.console")

SESSION_COOKIE = "pacsai_session"
SIGN_IN_COOKIE = "pacsai_sign_in"


class SignInRequired(Exception):
    """No valid session: the browser is sent to the sign-in page, then back to ``next_path``."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class ConsoleForbidden(Exception):
    """The signed-in token's role is below what the page needs."""

    def __init__(self, user: ConsoleUser, needed: TokenRole) -> None:
        super().__init__(needed.value)
        self.user = user
        self.needed = needed


class CsrfRefused(Exception):
    """A form that changes something came without the session's CSRF token."""


@dataclass(frozen=True)
class ConsoleUser:
    """Who is signed in: the token's principal, the session, and its forms' CSRF token."""

    principal: Principal
    session_id: int
    csrf_token: str

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def role(self) -> TokenRole:
        return self.principal.role

    def can(self, role: TokenRole | str) -> bool:
        """The session's role is at least ``role``."""
        return ROLE_RANK[self.role] >= ROLE_RANK[TokenRole(role)]

    def caller(self, page: str) -> Caller:
        """The caller of an operation run from console ``page`` (``GET /studies``...)."""
        return self.principal.caller(page, via="console")


def csrf_token_of(secret: str) -> str:
    """The CSRF token of the session whose secret is ``secret``."""
    return hmac.new(secret.encode("utf-8"), b"pacsai-console-csrf", hashlib.sha256).hexdigest()


def current_user(request: Request, context: ApiContext) -> ConsoleUser | None:
    """The live session of ``request``'s cookie, or ``None``; a session found idle or too old
    (or whose token was revoked) is ended on the way."""
    secret = request.cookies.get(SESSION_COOKIE)
    if not secret:
        return None
    with context.database.reading() as session:
        found = find_session(session=session, secret=secret)
    if found is None:
        return None
    row, token = found
    now = utcnow()
    api = context.settings.api
    expired = (
        now - row.last_seen_at > timedelta(minutes=api.session_idle_minutes)
        or now - row.created_at > timedelta(hours=api.session_max_hours)
        or token.revoked_at is not None
    )
    if row.ended_at is not None:
        return None
    if expired:
        with context.database.transaction() as session:
            end_session(session=session, session_id=row.id, now=now)
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        with context.database.transaction() as session:
            touch_session(session=session, session_id=row.id, now=now)
    principal = Principal(token.name, token.role, remote_address(request))
    return ConsoleUser(principal, row.id, csrf_token_of(secret))


def safe_next(value: str | None) -> str:
    """A path of this site to go back to after signing in (never another site)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/overview"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value) or len(value) > 2000:
        return "/overview"
    return value


def signed_in(role: TokenRole | str = TokenRole.VIEWER) -> object:
    """A dependency: the signed-in :class:`ConsoleUser` with at least ``role``.

    Without a session it raises :class:`SignInRequired` (answered with a redirect to the sign-in
    page, never with data); with a lower role, :class:`ConsoleForbidden` (a 403 page, audited
    like the API's refusals).
    """
    needed = TokenRole(role)

    def dependency(
        request: Request, context: Annotated[ApiContext, Depends(api_context)]
    ) -> ConsoleUser:
        user = current_user(request, context)
        if user is None:
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise SignInRequired(path if request.method == "GET" else "/overview")
        if not user.can(needed):
            refuse(context, user, request, f"role {user.role.value} < {needed.value}")
            raise ConsoleForbidden(user, needed)
        return user

    return Depends(dependency)


def refuse(context: ApiContext, user: ConsoleUser, request: Request, reason: str) -> None:
    """Log and audit a refused console request (110113, 110132, outcome 4), as the API does."""
    log.warning(
        "console request refused (%s) for token %r from %s to %s",
        reason,
        user.name,
        user.principal.remote_address,
        request.url.path,
        extra={"action": "console_refused", "remote_address": user.principal.remote_address},
    )
    audit(
        context,
        actor=user.principal.actor,
        remote=user.principal.remote_address,
        event_id=AuditEventId.SECURITY_ALERT,
        event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
        outcome=AuditOutcome.MINOR_FAILURE,
        detail={
            "method": request.method,
            "path": request.url.path,
            "reason": reason,
            "via": "console",
        },
    )


def check_csrf(context: ApiContext, user: ConsoleUser, request: Request, submitted: str) -> None:
    """Refuse (and audit) a changing request whose form lacks the session's CSRF token.

    Raises
    ------
    CsrfRefused
        If ``submitted`` is not the session's token.
    """
    if not hmac.compare_digest(submitted.encode("utf-8"), user.csrf_token.encode("utf-8")):
        refuse(context, user, request, "CSRF token missing or wrong")
        raise CsrfRefused()


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    """Set one of the console's cookies: HttpOnly, SameSite=Strict, Secure over HTTPS."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def new_sign_in_nonce() -> str:
    """A random value binding a sign-in form to the browser that loaded it."""
    return secrets.token_urlsafe(24)
