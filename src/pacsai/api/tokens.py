"""``GET /tokens`` (admin): the API's tokens, never their secrets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from pacsai.api._context import ApiContext, api_context
from pacsai.api.auth import Principal, require_role
from pacsai.api.problems import problem_responses
from pacsai.operations.tokens import TokenOut, list_tokens

__all__ = ["TokenOut", "router"]

router = APIRouter(tags=["tokens"])


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
    return list_tokens(context.database)
