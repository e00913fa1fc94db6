"""``GET /tokens`` (admin): the API's tokens, never their secrets."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from pacsai.api._context import ApiContext, api_context
from pacsai.api.auth import Principal, require_role
from pacsai.api.problems import problem_responses
from pacsai.db import TokenRole
from pacsai.db.tokens import list_tokens

__all__ = ["TokenOut", "router"]

router = APIRouter(tags=["tokens"])


class TokenOut(BaseModel):
    """A token as administrators see it: who, what role, when made, used and revoked."""

    id: int
    name: str
    role: TokenRole
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@router.get(
    "/tokens",
    response_model=list[TokenOut],
    summary="List the API's tokens (no secrets)",
    responses=problem_responses(401, 403),
)
def get_tokens(
    principal: Annotated[Principal, Depends(require_role("admin"))],
    context: Annotated[ApiContext, Depends(api_context)],
) -> list[TokenOut]:
    """Every token, revoked ones included, in creation order; ``last_used_at`` is kept to the
    minute."""
    with context.database.reading() as session:
        tokens = list_tokens(session=session)
    return [
        TokenOut(
            id=token.id,
            name=token.name,
            role=token.role,
            created_at=token.created_at,
            last_used_at=token.last_used_at,
            revoked_at=token.revoked_at,
        )
        for token in tokens
    ]
