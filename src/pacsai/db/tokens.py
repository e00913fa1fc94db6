"""Repository functions for the HTTP API's bearer tokens.

A token is ``pacsai_`` followed by 32 random bytes in URL-safe base64 (``secrets.token_urlsafe``).
Only the SHA-256 (hex) of the whole token is stored; the token itself is shown once, when it is
created, and cannot be recovered afterwards.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from pacsai.db.models import ApiToken, TokenRole

__all__ = [
    "TOKEN_PREFIX",
    "TOUCH_EVERY",
    "create_token",
    "find_token",
    "hash_secret",
    "list_tokens",
    "revoke_token",
    "touch_token",
    "validate_token_name",
]

TOKEN_PREFIX = "pacsai_"
#: A token's last use is written at most this often (reads stay reads).
TOUCH_EVERY = timedelta(seconds=60)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._@-]{0,63}$")
_SECRET = re.compile(r"^pacsai_[A-Za-z0-9_-]{43}$")


def hash_secret(secret: str) -> str:
    """The SHA-256 (hex) under which a token is stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def validate_token_name(name: str) -> str:
    """``name`` if it can name a token, else ``ValueError``.

    A name starts with a letter (so that it is never mistaken for a token id) and holds at most
    64 letters, digits and ``. _ @ -``.
    """
    if not _NAME.match(name):
        raise ValueError(
            f"token name {name!r} must start with a letter and hold at most 64 letters, "
            "digits, '.', '_', '@' or '-'"
        )
    return name


def create_token(
    *, session: Session, name: str, role: TokenRole, now: datetime
) -> tuple[ApiToken, str]:
    """Create a token; the row and the secret, which is not stored and cannot be shown again.

    Raises
    ------
    ValueError
        If the name is malformed or an unrevoked token already holds it.
    """
    validate_token_name(name)
    taken = session.scalar(
        select(ApiToken.id).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
    )
    if taken is not None:
        raise ValueError(f"token {name!r} already exists (id {taken}); revoke it first")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, role=role, token_hash=hash_secret(secret), created_at=now)
    session.add(token)
    session.flush()
    return token, secret


def find_token(*, session: Session, secret: str) -> ApiToken | None:
    """The token row whose secret is ``secret`` (revoked or not), or ``None``."""
    if not _SECRET.match(secret):
        return None  # not a pacsai token: no need to ask the database
    return session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret)))


def touch_token(*, session: Session, token_id: int, now: datetime) -> None:
    """Record that a token was used, at most once per :data:`TOUCH_EVERY` (a guarded update)."""
    session.execute(
        update(ApiToken)
        .where(
            ApiToken.id == token_id,
            or_(
                ApiToken.last_used_at.is_(None),
                ApiToken.last_used_at < now - TOUCH_EVERY,
            ),
        )
        .values(last_used_at=now)
    )


def list_tokens(*, session: Session) -> list[ApiToken]:
    """Every token in creation order (secrets are never stored, so never listed)."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(*, session: Session, name_or_id: str, now: datetime) -> ApiToken | None:
    """Revoke the unrevoked token called ``name_or_id``, or with that id; ``None`` if none is.

    Names start with a letter, so a string of digits is always an id.
    """
    if name_or_id.isdigit():
        if int(name_or_id) > 2**31 - 1:
            return None
        where = ApiToken.id == int(name_or_id)
    else:
        where = ApiToken.name == name_or_id
    token = session.scalar(select(ApiToken).where(where, ApiToken.revoked_at.is_(None)))
    if token is not None:
        token.revoked_at = now
        session.flush()
    return token
