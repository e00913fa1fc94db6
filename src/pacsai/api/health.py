"""``GET /healthz`` (the process answers) and ``GET /readyz`` (it can do its work).

Both are open when ``api.open_health`` is true (the default, for load balancers and
orchestrators), otherwise they need a viewer token. ``/readyz`` answers 503 with the same body
when a check fails: the database answers, the spool directory is writable with
``storage.min_free_mb`` free, at least one model is ready when models are configured, and the
node's local job workers are alive (the QUEUED backlog is reported, not judged).
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select, text

from pacsai import __version__
from pacsai.api._context import ApiContext, api_context
from pacsai.api.auth import require_role
from pacsai.api.problems import problem_responses
from pacsai.db import Job, JobStatus
from pacsai.errors import DatabaseError

__all__ = ["Check", "Health", "Readiness", "health_router"]


class Health(BaseModel):
    """The process is up."""

    status: str = "ok"
    version: str


class Check(BaseModel):
    """One readiness check."""

    ok: bool
    detail: str


class Readiness(BaseModel):
    """Every readiness check; ``ready`` when all of them passed."""

    ready: bool
    checks: dict[str, Check] = Field(description="database, spool, models, queue")
    queued_jobs: int | None = Field(description="QUEUED jobs (null: database not answering)")
    oldest_queued_at: datetime | None


def _database(context: ApiContext) -> tuple[Check, int | None, datetime | None]:
    try:
        with context.database.reading() as session:
            session.execute(text("SELECT 1"))
            count, oldest = session.execute(
                select(func.count(Job.id), func.min(Job.created_at)).where(
                    Job.status == JobStatus.QUEUED
                )
            ).one()
    except DatabaseError as exc:
        return Check(ok=False, detail=f"not answering: {type(exc.__cause__).__name__}"), None, None
    return Check(ok=True, detail=context.database.dialect), int(count), oldest


def _spool(context: ApiContext) -> Check:
    storage = context.settings.storage
    root = storage.spool_dir
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".readyz-"):
            pass
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return Check(ok=False, detail=f"{root} is not writable: {exc.strerror}")
    need = storage.min_free_mb * 2**20
    if free < need:
        return Check(ok=False, detail=f"{free // 2**20} MiB free, below storage.min_free_mb")
    return Check(ok=True, detail=f"writable, {free // 2**20} MiB free")


def _models(context: ApiContext) -> Check:
    if context.registry is None:
        from pacsai.inference import ModelRegistry  # light: scans bundle metadata, no torch

        context.registry = ModelRegistry.from_settings(context.settings.inference)
    entries = context.registry.entries
    routes = context.settings.routes
    wanted = {route.model for route in routes} if routes else set(entries)
    if not wanted:
        return Check(ok=True, detail="no model configured")
    ready = sorted(name for name in wanted if name in entries and entries[name].bundle)
    if not ready:
        return Check(ok=False, detail=f"none of {', '.join(sorted(wanted))} is ready")
    return Check(ok=True, detail=f"ready: {', '.join(ready)}")


def _queue(context: ApiContext, queued: int | None) -> Check:
    backlog = "?" if queued is None else str(queued)
    if context.queue_probe is None:
        settings = context.settings.queue
        where = "Celery workers" if settings.backend == "celery" else "another process"
        return Check(ok=True, detail=f"{backlog} queued; jobs run in {where}")
    alive, expected = context.queue_probe()
    detail = f"{alive}/{expected} local workers alive, {backlog} queued"
    return Check(ok=alive >= expected, detail=detail)


def readiness(context: ApiContext) -> Readiness:
    """Run every readiness check."""
    database, queued, oldest = _database(context)
    checks = {
        "database": database,
        "spool": _spool(context),
        "models": _models(context),
        "queue": _queue(context, queued),
    }
    return Readiness(
        ready=all(check.ok for check in checks.values()),
        checks=checks,
        queued_jobs=queued,
        oldest_queued_at=oldest,
    )


def health_router(open_health: bool) -> APIRouter:
    """The routes, open or behind a viewer token."""
    dependencies = [] if open_health else [Depends(require_role("viewer"))]
    errors = problem_responses() if open_health else problem_responses(401)
    router = APIRouter(tags=["health"], dependencies=dependencies)

    @router.get("/healthz", response_model=Health, summary="Liveness", responses=errors)
    def healthz() -> Health:
        """Answers as long as the process serves HTTP."""
        return Health(version=__version__)

    ready_responses: dict[int | str, dict[str, Any]] = {
        **errors,
        503: {"model": Readiness, "description": "A check failed"},
    }

    @router.get("/readyz", response_model=Readiness, summary="Readiness", responses=ready_responses)
    def readyz(context: Annotated[ApiContext, Depends(api_context)]) -> JSONResponse:
        """Database, spool, models and queue; 503 when any check fails."""
        report = readiness(context)
        return JSONResponse(
            report.model_dump(mode="json"), status_code=200 if report.ready else 503
        )

    return router
