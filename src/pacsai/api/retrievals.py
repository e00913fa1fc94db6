"""``POST /retrieve``, ``GET /retrieve/{id}`` and ``GET /retrieve`` (admin): studies pulled from
a PACS in the background, answered by :mod:`pacsai.operations.retrievals`."""

from __future__ import annotations

import logging
import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from pacsai.api._context import ApiContext, api_context
from pacsai.api._params import MAX_ID, LimitParam, page_limit
from pacsai.api.auth import Principal, require_role
from pacsai.api.problems import problem_responses
from pacsai.errors import PacsaiError
from pacsai.operations import retrievals as operations
from pacsai.operations.caller import Caller
from pacsai.operations.retrievals import RetrievalOut, RetrieveRequest

__all__ = ["RetrievalOut", "RetrieveRequest", "router"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["retrieve"])

RetrievalIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="A retrieval id")]


def _run(context: ApiContext, caller: Caller, retrieval_id: int, request: RetrieveRequest) -> None:
    try:
        operations.run_retrieval(context.database, context.settings, caller, retrieval_id, request)
    except PacsaiError as exc:  # the database went away: the row cannot say it any more
        log.error("retrieval %d stopped: %s", retrieval_id, exc)
    except Exception as exc:  # the top of its own thread: said in the row and the log
        log.exception("retrieval %d failed unexpectedly", retrieval_id)
        operations.abandon_retrieval(
            context.database, retrieval_id, f"internal error: {type(exc).__name__}: {exc}"
        )


@router.post(
    "/retrieve",
    response_model=RetrievalOut,
    status_code=202,
    summary="Find studies on a PACS and retrieve them into pacsai, in the background",
    responses=problem_responses(400, 401, 403, 422),
)
def start_retrieval(
    request: RetrieveRequest,
    response: Response,
    principal: Annotated[Principal, Depends(require_role("admin"))],
    context: Annotated[ApiContext, Depends(api_context)],
) -> RetrievalOut:
    """What ``pacsai retrieve`` does: C-FIND on the source, then C-MOVE to this node's AE title
    (or C-GET) of each study found; the studies then run like pushed ones.

    ``source`` names an entry of ``sources:`` or a DICOM destination (not an address: the API
    retrieves from configured PACSs only). Answers 202 at once with the retrieval's id;
    ``GET /retrieve/{id}`` shows its progress and each study's outcome with its DIMSE status.
    422 when the source is unknown or the criteria say nothing to look for.
    """
    caller = principal.caller("POST /retrieve")
    started = operations.start_retrieval(context.database, context.settings, caller, request)
    threading.Thread(
        target=_run,
        args=(context, caller, started.id, request),
        name=f"pacsai-retrieval-{started.id}",
        daemon=True,
    ).start()
    response.headers["Location"] = f"/api/v1/retrieve/{started.id}"
    return started


@router.get(
    "/retrieve/{retrieval_id}",
    response_model=RetrievalOut,
    summary="One retrieval: its state and each study's progress and outcome",
    responses=problem_responses(401, 403, 404, 422),
)
def get_retrieval(
    retrieval_id: RetrievalIdPath,
    principal: Annotated[Principal, Depends(require_role("admin"))],
    context: Annotated[ApiContext, Depends(api_context)],
) -> RetrievalOut:
    """RUNNING while it runs, then SUCCEEDED, FAILED (with why, and each failed study's DIMSE
    status) or INTERRUPTED (the process running it stopped)."""
    return operations.get_retrieval(
        context.database, principal.caller("GET /retrieve/{retrieval_id}"), retrieval_id
    )


@router.get(
    "/retrieve",
    response_model=list[RetrievalOut],
    summary="The newest retrievals",
    responses=problem_responses(401, 403, 422),
)
def list_retrievals(
    principal: Annotated[Principal, Depends(require_role("admin"))],
    context: Annotated[ApiContext, Depends(api_context)],
    limit: LimitParam = None,
) -> list[RetrievalOut]:
    """The newest retrievals first, started from the API or the CLI."""
    return operations.list_retrievals(
        context.database,
        principal.caller("GET /retrieve"),
        limit=page_limit(limit, context.settings.api.page_size),
    )
