"""API tokens: create one (its secret shown once), list them (never secrets), revoke one.

Creation and revocation are audited as 110113 Security Alert with event type 110132 Use of
Restricted Function, in the transaction that makes them.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from pacsai.db import ApiToken, AuditEventId, AuditEventType, Database, TokenRole, utcnow
from pacsai.db import tokens as repository
from pacsai.operations._audit import record
from pacsai.operations.caller import Caller
from pacsai.operations.errors import ConflictError, InvalidRequestError, NotFoundError

__all__ = ["CreatedToken", "TokenOut", "create_token", "list_tokens", "revoke_token"]


class TokenOut(BaseModel):
    """A token as administrators see it: who, what role, when made, used and revoked."""

    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    role: TokenRole
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class CreatedToken(BaseModel):
    """A new token and its secret, which is not stored and cannot be shown again."""

    model_config = ConfigDict(frozen=True)

    token: TokenOut
    secret: str


def _out(row: ApiToken) -> TokenOut:
    return TokenOut(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def create_token(database: Database, caller: Caller, *, name: str, role: TokenRole) -> CreatedToken:
    """Create a token called ``name`` with ``role``; audited.

    Raises
    ------
    InvalidRequestError
        If the name is malformed.
    ConflictError
        If an unrevoked token already holds the name.
    """
    try:
        repository.validate_token_name(name)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    with database.transaction() as session:
        try:
            row, secret = repository.create_token(
                session=session, name=name, role=TokenRole(role), now=utcnow()
            )
        except ValueError as exc:
            raise ConflictError(str(exc)) from exc
        record(
            caller,
            session=session,
            event_id=AuditEventId.SECURITY_ALERT,
            event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
            detail={"action": "token create", "token_id": row.id, "name": name, "role": role},
        )
        created = CreatedToken(token=_out(row), secret=secret)
    return created


def list_tokens(database: Database) -> list[TokenOut]:
    """Every token, revoked ones included, in creation order (``last_used_at`` to the minute)."""
    with database.reading() as session:
        return [_out(row) for row in repository.list_tokens(session=session)]


def revoke_token(database: Database, caller: Caller, name_or_id: str) -> TokenOut:
    """Revoke the unrevoked token called or numbered ``name_or_id``; audited. Its console
    sessions end with it (they are checked against the token on every request).

    Raises
    ------
    NotFoundError
        If no unrevoked token has that name or id.
    """
    with database.transaction() as session:
        row = repository.revoke_token(session=session, name_or_id=name_or_id, now=utcnow())
        if row is None:
            raise NotFoundError(f"no unrevoked token is named or numbered {name_or_id!r}")
        record(
            caller,
            session=session,
            event_id=AuditEventId.SECURITY_ALERT,
            event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
            detail={"action": "token revoke", "token_id": row.id, "name": row.name},
        )
        revoked = _out(row)
    return revoked
