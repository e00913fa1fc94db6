"""Repository functions for the operator console's sign-in sessions.

A session's secret is 32 random bytes (``secrets.token_urlsafe``), held by the browser in an
HttpOnly cookie; only its SHA-256 is stored, so a copy of the database cannot be used to sign in.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacsai.db.models import ApiToken, ConsoleSession

__all__ = ["TOUCH_EVERY", "end_session", "find_session", "start_session", "touch_session"]

#: A session's last use is written at most this often (reading a page stays a read).
TOUCH_EVERY = timedelta(seconds=30)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def start_session(
    *, session: Session, token_id: int, remote_address: str | None, now: datetime
) -> tuple[ConsoleSession, str]:
    """A new session for ``token_id``: the row and its secret (for the cookie only)."""
    secret = secrets.token_urlsafe(32)
    row = ConsoleSession(
        secret_hash=_digest(secret),
        token_id=token_id,
        remote_address=remote_address,
        created_at=now,
        last_seen_at=now,
    )
    session.add(row)
    session.flush()
    return row, secret


def find_session(*, session: Session, secret: str) -> tuple[ConsoleSession, ApiToken] | None:
    """The session whose secret is ``secret`` and its token (ended or not), or ``None``."""
    if not 1 <= len(secret) <= 100:
        return None
    row = session.execute(
        select(ConsoleSession, ApiToken)
        .join(ApiToken, ApiToken.id == ConsoleSession.token_id)
        .where(ConsoleSession.secret_hash == _digest(secret))
    ).first()
    return None if row is None else (row[0], row[1])


def touch_session(*, session: Session, session_id: int, now: datetime) -> None:
    """Record that a session was used (at most once per :data:`TOUCH_EVERY`)."""
    session.execute(
        update(ConsoleSession)
        .where(
            ConsoleSession.id == session_id,
            ConsoleSession.ended_at.is_(None),
            ConsoleSession.last_seen_at < now - TOUCH_EVERY,
        )
        .values(last_seen_at=now)
    )


def end_session(*, session: Session, session_id: int, now: datetime) -> bool:
    """End a session (sign-out, idle, too old); ``False`` if it had already ended."""
    result = session.execute(
        update(ConsoleSession)
        .where(ConsoleSession.id == session_id, ConsoleSession.ended_at.is_(None))
        .values(ended_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
