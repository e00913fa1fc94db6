"""``GET /healthz`` (the process answers) and ``GET /readyz`` (it can do its work).

Both are open when ``api.open_health`` is true (the default, for load balancers and
orchestrators), otherwise they need a viewer token. ``/readyz`` answers 503 with the same body
when a check fails: the database answers, the spool directory is writable with
``storage.min_free_mb`` free, the models are warm (or loaded, with ``inference.warm_up`` off) on
a live worker, as the workers' heartbeats report them, none still loading and at least one
runnable (a refused bundle is listed, and does not hold the others back), and jobs can reach a
worker: the broker answers (celery), the node's own worker process runs (local), a
live worker takes each queue that has QUEUED jobs. ``workers`` lists the live workers from the
workers table, with their device, queues and the state of their models (warm or not).
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select, text

from pacsai import __version__
from pacsai.api._context import ApiContext, api_context
from pacsai.api.auth import require_role
from pacsai.api.problems import problem_responses
from pacsai.db import Job, JobStatus, utcnow
from pacsai.db.workers import WorkerInfo, list_workers
from pacsai.errors import DatabaseError

__all__ = ["Check", "Health", "Readiness", "WorkerState", "health_router"]


class Health(BaseModel):
    """The process is up."""

    status: str = "ok"
    version: str


class Check(BaseModel):
    """One readiness check."""

    ok: bool
    detail: str


class WorkerState(BaseModel):
    """A live worker, as its last heartbeat reported it."""

    id: str = Field(description="<node id>/<name>")
    host: str
    pid: int
    backend: str
    device: str
    queues: list[str] = Field(description='job queues it takes ("*": every queue)')
    concurrency: int
    models: dict[str, str] = Field(description='model -> "warm", "loading" or why not')
    heartbeat_at: datetime


class Readiness(BaseModel):
    """Every readiness check; ``ready`` when all of them passed."""

    ready: bool
    checks: dict[str, Check] = Field(description="database, spool, models, queue")
    queued_jobs: int | None = Field(description="QUEUED jobs (null: database not answering)")
    oldest_queued_at: datetime | None
    workers: list[WorkerState] = Field(default_factory=list, description="live workers")


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


def _bundle_names(models_dir: Path) -> set[str]:
    """The bundle directories under ``models_dir`` (the registry's rule), without reading them:
    checking a bundle imports MONAI, which the API process does not need."""
    if not models_dir.is_dir():
        return set()
    return {
        path.name
        for path in models_dir.iterdir()
        if path.is_dir() and ((path / "configs").is_dir() or (path / "models").is_dir())
    }


_RUNNABLE = ("warm", "loaded")  # "loaded": inference.warm_up is off


def _model_state(name: str, workers: list[WorkerInfo]) -> str:
    """The best state any live worker reports for ``name``."""
    states = [w.models[name] for w in workers if name in w.models]
    for state in (*_RUNNABLE, "loading"):
        if state in states:
            return state
    return states[0] if states else "not loaded by any live worker"


def _models(context: ApiContext, live: list[WorkerInfo]) -> Check:
    """Ready when every model the routes name (or every bundle, without routes) that a live
    worker can run is warm there, and at least one is: read from the workers' heartbeats."""
    routes = context.settings.routes
    wanted = (
        {route.model for route in routes}
        if routes
        else _bundle_names(context.settings.inference.models_dir)
    )
    if not wanted:
        return Check(ok=True, detail="no model configured")
    states = {name: _model_state(name, live) for name in sorted(wanted)}
    runnable = [name for name, state in states.items() if state in _RUNNABLE]
    loading = [name for name, state in states.items() if state == "loading"]
    detail = "; ".join(f"{name}: {state}" for name, state in states.items())
    return Check(ok=bool(runnable) and not loading, detail=detail)


def _queue(context: ApiContext, queued: int | None) -> tuple[Check, list[WorkerInfo]]:
    settings = context.settings
    if context.queue is None:
        from pacsai.jobs.queue import make_queue

        context.queue = make_queue(settings, context.database)
    problems: list[str] = []
    notes: list[str] = []
    if context.queue_probe is not None:
        running, detail = context.queue_probe()
        (notes if running else problems).append(detail)
    transport = context.queue.health()
    (notes if transport.ok else problems).append(transport.detail)
    try:
        with context.database.reading() as session:
            workers = list_workers(session=session, include_stopped=True)
            waiting = dict(
                session.execute(
                    select(Job.queue, func.count(Job.id))
                    .where(Job.status == JobStatus.QUEUED)
                    .group_by(Job.queue)
                ).all()
            )
    except DatabaseError:
        return Check(ok=False, detail="; ".join([*problems, "database not answering"])), []
    now = utcnow()
    live = [w for w in workers if w.live(now, settings.queue.lease_seconds)]
    celery = settings.queue.backend == "celery"
    if celery and not live:
        problems.append("no live worker: nothing runs the jobs (start `pacsai worker`)")
    for queue, count in sorted(waiting.items()):
        if not any(w.serves(queue) for w in live) and (workers or celery):
            problems.append(f"{count} job(s) QUEUED on queue {queue!r}, which no live worker takes")
    if live:
        notes.append(f"{len(live)} live worker(s)")
    elif not celery:
        notes.append("no live worker")
    backlog = "?" if queued is None else str(queued)
    notes.append(f"{backlog} queued")
    return Check(ok=not problems, detail="; ".join(problems + notes)), live


def readiness(context: ApiContext) -> Readiness:
    """Run every readiness check."""
    database, queued, oldest = _database(context)
    queue, workers = _queue(context, queued)
    checks = {
        "database": database,
        "spool": _spool(context),
        "models": _models(context, workers),
        "queue": queue,
    }
    return Readiness(
        ready=all(check.ok for check in checks.values()),
        checks=checks,
        queued_jobs=queued,
        oldest_queued_at=oldest,
        workers=[
            WorkerState(
                id=w.id,
                host=w.host,
                pid=w.pid,
                backend=w.backend,
                device=w.device,
                queues=list(w.queues),
                concurrency=w.concurrency,
                models=w.models,
                heartbeat_at=w.heartbeat_at,
            )
            for w in workers
        ],
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
