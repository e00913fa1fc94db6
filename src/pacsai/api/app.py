"""The application factory: every route under ``/api/v1``, errors as problem details."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from pacsai import __version__
from pacsai.api import audit, jobs, retrievals, studies, tokens, worklist
from pacsai.api._context import ApiContext, Notify, QueueProbe
from pacsai.api.console import install_console
from pacsai.api.health import health_router
from pacsai.api.metrics import metrics_router, new_registry
from pacsai.api.problems import ProblemGuard, install_problem_handlers
from pacsai.api.security import install_security
from pacsai.config import Settings
from pacsai.db import Database

if TYPE_CHECKING:
    from pacsai.inference import ModelRegistry
    from pacsai.jobs.queue import JobQueue

__all__ = ["API_PREFIX", "create_app"]

API_PREFIX = "/api/v1"

_DESCRIPTION = """\
What pacsai received, what its models found and where the results went, for worklists, RIS
and monitoring. Authenticate with `Authorization: Bearer <token>` (`pacsai token create`).
Roles: viewer (studies, jobs, worklist results) < auditor (also the audit trail) < admin (also
retries, tokens and retrieving studies from a PACS). Errors are RFC 9457 problem details
(`application/problem+json`). Every read of patient data is recorded in the audit trail under
`api:<token name>`.
"""


def create_app(
    settings: Settings,
    database: Database,
    *,
    registry: ModelRegistry | None = None,
    queue: JobQueue | None = None,
    queue_probe: QueueProbe | None = None,
    on_retry: Notify | None = None,
) -> FastAPI:
    """The HTTP API of one node, with the operator console at ``/``.

    Parameters
    ----------
    settings
        The node's settings (``api:`` for page size, open health/metrics/docs, trusted proxies
        and console sessions, ``routes:`` for priority rules, ``storage:`` and ``inference:``
        for readiness, previews and the models page).
    database
        The node's database; the API reads it and appends audit events to it.
    registry
        The node's :class:`pacsai.inference.ModelRegistry`, if it has one; otherwise readiness
        scans ``inference.models_dir`` once.
    queue
        The node's job queue, for readiness (is its broker reachable); ``None``: one is made
        from ``queue:`` when readiness is first asked.
    queue_probe
        Whether the node's own worker process runs, for readiness; ``None`` when it has none
        (jobs run in `pacsai worker` processes, seen through the workers table).
    on_retry
        Called after a retry queued a job or deliveries, to wake the workers.
    """
    app = FastAPI(
        title="pacsai",
        version=__version__,
        description=_DESCRIPTION,
        # Served by the console's documentation routes: offline assets, api.open_docs.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.pacsai = ApiContext(
        settings=settings,
        database=database,
        registry=registry,
        queue=queue,
        queue_probe=queue_probe,
        on_retry=on_retry,
        metrics=new_registry(database),
    )
    install_problem_handlers(app)
    app.add_middleware(ProblemGuard)
    install_security(app, settings.api.trusted_proxies)
    routers = [
        studies.router,
        jobs.router,
        worklist.router,
        tokens.router,
        health_router(settings.api.open_health),
        metrics_router(settings.api.open_metrics),
        audit.router,
        retrievals.router,
    ]
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
    install_console(app, open_docs=settings.api.open_docs)
    return app
