"""The console's pages. Each one needs a session (without one: a redirect to the sign-in page)
and a role; the data comes from :mod:`pacsai.operations`, which audits the reads of patient
data under ``api:<token name>`` with ``"via": "console"``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from starlette.responses import Response

from pacsai.api._context import ApiContext, api_context, audit, remote_address
from pacsai.api.auth import Principal
from pacsai.api.console._forms import FormError, local_day_range, text_field, uid_field
from pacsai.api.console._render import render
from pacsai.api.console._session import (
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    ConsoleUser,
    check_csrf,
    current_user,
    new_sign_in_nonce,
    safe_next,
    set_cookie,
    signed_in,
)
from pacsai.db import (
    AuditAction,
    AuditEventId,
    AuditEventType,
    AuditOutcome,
    JobStatus,
    StudyStatus,
    TokenRole,
    utcnow,
)
from pacsai.db.audit_export import EVENT_ID_MEANINGS
from pacsai.db.audit_query import AuditFilter, AuditQueryError, parse_time
from pacsai.db.sessions import end_session, start_session
from pacsai.db.tokens import find_token, touch_token
from pacsai.operations import OperationError, result_objects
from pacsai.operations import audit as audit_operations
from pacsai.operations import jobs as job_operations
from pacsai.operations import models as model_operations
from pacsai.operations import studies as study_operations
from pacsai.operations import tokens as token_operations
from pacsai.operations.overview import node_overview
from pacsai.operations.priority import priority_reasons

if TYPE_CHECKING:
    from pacsai.inference import ModelRegistry

__all__ = ["router"]

log = logging.getLogger("pacsai.api.console")

router = APIRouter(include_in_schema=False)

Context = Annotated[ApiContext, Depends(api_context)]
Viewer = Annotated[ConsoleUser, signed_in("viewer")]
Auditor = Annotated[ConsoleUser, signed_in("auditor")]
Admin = Annotated[ConsoleUser, signed_in("admin")]
Csrf = Annotated[str, Form()]

_RETRY_MODES = {
    "retry": (
        "Retry",
        "Send its failed deliveries again; run it again if it failed or was skipped.",
        job_operations.RetryOptions(),
    ),
    "rerun": (
        "Re-run",
        "Run the models again (same result UIDs; destinations that have the "
        "results get nothing new).",
        job_operations.RetryOptions(rerun=True),
    ),
    "resend": (
        "Re-send",
        "Run the models again and send the results to every destination, even where they arrived.",
        job_operations.RetryOptions(rerun=True, resend=True),
    ),
}
_NOTICES = {"retried": "Retry requested: the workers take it up at once."}


def _registry(context: ApiContext) -> ModelRegistry:
    """The node's model registry, scanned once per process when the node has none (a scan
    hashes every bundle's weights)."""
    if context.registry is None:
        context.registry = model_operations.registry_of(context.settings, None)
    return context.registry


def _colors(context: ApiContext) -> dict[str, tuple[int, int, int]]:
    registry = _registry(context)
    return {label.name: label.color for bundle in registry.bundles for label in bundle.labels}


# --- sign-in, sign-out ----------------------------------------------------------------------


@router.get("/")
def home() -> Response:
    """The console starts at the overview (which asks to sign in first)."""
    return RedirectResponse("/overview", status_code=303)


@router.get("/sign-in")
def sign_in_page(request: Request, context: Context, next: str | None = None) -> Response:
    """The sign-in form: paste a token once."""
    if current_user(request, context) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    nonce = new_sign_in_nonce()
    response = render(request, "sign_in.html", None, nonce=nonce, next=safe_next(next))
    set_cookie(response, request, SIGN_IN_COOKIE, nonce, max_age=1800)
    return response


@router.post("/sign-in")
def sign_in(
    request: Request,
    context: Context,
    token: Annotated[str, Form()] = "",
    nonce: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/overview",
) -> Response:
    """Start a session for a valid, unrevoked token; audited (110114 User Authentication,
    110122 Login)."""
    remote = remote_address(request)
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    if not expected or nonce != expected:
        return _sign_in_again(request, "The sign-in form expired: paste the token again.")
    with context.database.reading() as session:
        row = find_token(session=session, secret=token.strip())
    if row is None:
        log.warning(
            "console sign-in with an unknown token from %s",
            remote,
            extra={"action": "console_unknown_token", "remote_address": remote},
        )
        return _sign_in_again(request, "This token is not known to this node.")
    principal = Principal(row.name, row.role, remote)
    if row.revoked_at is not None:
        _audit_login(context, principal, AuditOutcome.MINOR_FAILURE, reason="revoked token")
        return _sign_in_again(request, f"Token {row.name!r} was revoked.")
    now = utcnow()
    with context.database.transaction() as session:
        started, secret = start_session(
            session=session, token_id=row.id, remote_address=remote, now=now
        )
        touch_token(session=session, token_id=row.id, now=now)
        session_id = started.id
    _audit_login(context, principal, AuditOutcome.SUCCESS, session_id=session_id)
    response = RedirectResponse(safe_next(next), status_code=303)
    max_age = int(context.settings.api.session_max_hours * 3600)
    set_cookie(response, request, SESSION_COOKIE, secret, max_age=max_age)
    response.delete_cookie(SIGN_IN_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def _sign_in_again(request: Request, message: str) -> Response:
    nonce = new_sign_in_nonce()
    response = render(
        request,
        "sign_in.html",
        None,
        nonce=nonce,
        next="/overview",
        error=message,
        status_code=401,
    )
    set_cookie(response, request, SIGN_IN_COOKIE, nonce, max_age=1800)
    return response


def _audit_login(
    context: ApiContext, principal: Principal, outcome: AuditOutcome, **detail: Any
) -> None:
    audit(
        context,
        actor=principal.actor,
        remote=principal.remote_address,
        event_id=AuditEventId.USER_AUTHENTICATION,
        event_type=AuditEventType.LOGIN,
        outcome=outcome,
        detail={"via": "console", **detail},
    )


@router.post("/sign-out")
def sign_out(request: Request, context: Context, user: Viewer, csrf_token: Csrf = "") -> Response:
    """End the session for good (its cookie is worthless afterwards); audited (110123)."""
    check_csrf(context, user, request, csrf_token)
    with context.database.transaction() as session:
        end_session(session=session, session_id=user.session_id, now=utcnow())
    audit(
        context,
        actor=user.principal.actor,
        remote=user.principal.remote_address,
        event_id=AuditEventId.USER_AUTHENTICATION,
        event_type=AuditEventType.LOGOUT,
        action=AuditAction.EXECUTE,
        detail={"via": "console", "session_id": user.session_id},
    )
    response = RedirectResponse("/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --- overview -------------------------------------------------------------------------------


@router.get("/overview")
def overview(request: Request, context: Context, user: Viewer) -> Response:
    """The node at a glance; it refreshes itself (no patient data: not audited)."""
    data = node_overview(context.database, context.settings, _registry(context))
    return render(request, "overview.html", user, overview=data)


@router.get("/overview/panel")
def overview_panel(request: Request, context: Context, user: Viewer) -> Response:
    """The overview's content alone, for its periodic refresh."""
    data = node_overview(context.database, context.settings, _registry(context))
    return render(request, "_overview_panel.html", user, overview=data)


# --- studies --------------------------------------------------------------------------------


@router.get("/studies")
def studies(
    request: Request,
    context: Context,
    user: Viewer,
    accession: str | None = None,
    patient_id: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    status: str | None = None,
    modality: str | None = None,
    cursor: str | None = None,
) -> Response:
    """Search studies by accession, patient ID, date received, status and modality (paged)."""
    form = {
        "accession": accession or "",
        "patient_id": patient_id or "",
        "date_from": date_from or "",
        "date_to": date_to or "",
        "status": status or "",
        "modality": modality or "",
    }
    try:
        start, end = local_day_range(date_from, date_to)
        wanted_status = StudyStatus(status) if status else None
        wanted_modality = text_field("modality", modality, 16)
        if wanted_modality is not None and not wanted_modality.isalnum():
            raise FormError("modality must be letters and digits, e.g. CT")
        filters = study_operations.StudyFilter(
            status=wanted_status,
            modality=wanted_modality,
            accession=text_field("accession", accession, 16),
            patient_id=text_field("patient ID", patient_id, 64),
            received_from=start,
            received_to=end,
        )
        page = study_operations.search_studies(
            context.database,
            user.caller("GET /studies"),
            filters,
            limit=context.settings.api.page_size,
            cursor=text_field("cursor", cursor, 64),
        )
    except (FormError, OperationError, ValueError) as exc:
        return render(
            request,
            "studies.html",
            user,
            form=form,
            page=None,
            error=str(exc),
            statuses=list(StudyStatus),
            status_code=422,
        )
    more = {k: v for k, v in form.items() if v} | {"cursor": page.next_cursor}
    return render(
        request,
        "studies.html",
        user,
        form=form,
        page=page,
        more=more,
        statuses=list(StudyStatus),
    )


@router.get("/studies/{study_uid}")
def study(request: Request, context: Context, user: Viewer, study_uid: str) -> Response:
    """One study: series, jobs with stage timings, findings and priority, SEG previews, SR
    measurements, deliveries."""
    try:
        uid = uid_field("study UID", study_uid)
        assert uid is not None
        detail = study_operations.get_study(
            context.database, user.caller("GET /studies/{study_uid}"), uid
        )
    except (FormError, OperationError) as exc:
        return _problem_page(request, user, exc)
    routes = {route.name: route for route in context.settings.routes or []}
    previews: dict[int, list[str] | str] = {}
    measurements: dict[int, list[result_objects.MeasurementRow] | str] = {}
    colors = _colors(context)
    for result in detail.results:
        for obj in result.objects:
            try:
                if obj.kind == "SEG":
                    files = result_objects.segmentation_previews(
                        context.database, context.settings, obj.id, colors=colors
                    )
                    previews[obj.id] = [path.name for path in files]
                elif obj.kind == "SR":
                    measurements[obj.id] = result_objects.sr_measurements(
                        context.database, context.settings, obj.id
                    )
            except OperationError as exc:
                (previews if obj.kind == "SEG" else measurements)[obj.id] = str(exc)
    return render(
        request,
        "study.html",
        user,
        study=detail,
        priority=priority_reasons(detail.results, routes),
        previews=previews,
        measurements=measurements,
    )


@router.get("/previews/{object_id}/{name}")
def preview(context: Context, user: Viewer, object_id: int, name: str) -> Response:
    """A SEG preview image drawn for a study page (served to signed-in users only)."""
    if not name.endswith(".png") or "/" in name or name.startswith("."):
        return Response(status_code=404)
    path = Path(context.settings.storage.results_dir) / "previews" / str(object_id) / name
    if object_id < 1 or not path.is_file():
        return Response(status_code=404)
    return FileResponse(path, media_type="image/png")


# --- jobs -----------------------------------------------------------------------------------


@router.get("/jobs")
def jobs(
    request: Request,
    context: Context,
    user: Viewer,
    status: str | None = None,
    cursor: str | None = None,
) -> Response:
    """Jobs, newest first, filtered by state."""
    try:
        page = job_operations.list_jobs(
            context.database,
            user.caller("GET /jobs"),
            status=JobStatus(status) if status else None,
            limit=context.settings.api.page_size,
            cursor=text_field("cursor", cursor, 64),
        )
    except (FormError, OperationError, ValueError) as exc:
        return render(
            request,
            "jobs.html",
            user,
            page=None,
            status=status or "",
            error=str(exc),
            statuses=list(JobStatus),
            status_code=422,
        )
    more = (
        {"status": status, "cursor": page.next_cursor} if status else {"cursor": page.next_cursor}
    )
    return render(
        request,
        "jobs.html",
        user,
        page=page,
        status=status or "",
        more=more,
        statuses=list(JobStatus),
    )


@router.get("/jobs/{job_id}")
def job(
    request: Request, context: Context, user: Viewer, job_id: int, notice: str | None = None
) -> Response:
    """One job: state, reason, a bar per stage, results and deliveries; admins can retry."""
    try:
        detail = job_operations.get_job(context.database, user.caller("GET /jobs/{job_id}"), job_id)
    except OperationError as exc:
        return _problem_page(request, user, exc)
    return render(
        request,
        "job.html",
        user,
        job=detail,
        notice=_NOTICES.get(notice or ""),
        modes=_RETRY_MODES,
    )


@router.get("/jobs/{job_id}/retry")
def confirm_retry(
    request: Request, context: Context, user: Admin, job_id: int, mode: str = "retry"
) -> Response:
    """Ask the admin to confirm a retry, re-run or re-send."""
    if mode not in _RETRY_MODES:
        mode = "retry"
    title, explanation, _ = _RETRY_MODES[mode]
    return render(
        request,
        "confirm.html",
        user,
        title=f"{title} job {job_id}?",
        explanation=explanation,
        action=f"/jobs/{job_id}/retry",
        fields={"mode": mode},
        button=title,
        back=f"/jobs/{job_id}",
    )


@router.post("/jobs/{job_id}/retry")
def retry(
    request: Request,
    context: Context,
    user: Admin,
    job_id: int,
    csrf_token: Csrf = "",
    mode: Annotated[str, Form()] = "retry",
) -> Response:
    """Retry, re-run or re-send a job (audited by the operation), then show the job."""
    check_csrf(context, user, request, csrf_token)
    if mode not in _RETRY_MODES:
        return _problem_page(request, user, FormError(f"unknown retry mode {mode[:20]!r}"))
    try:
        job_operations.retry_job(
            context.database,
            user.caller("POST /jobs/{job_id}/retry"),
            job_id,
            _RETRY_MODES[mode][2],
        )
    except OperationError as exc:
        return _problem_page(request, user, exc)
    if context.on_retry is not None:
        context.on_retry()
    return RedirectResponse(f"/jobs/{job_id}?notice=retried", status_code=303)


# --- models and routes ----------------------------------------------------------------------


@router.get("/models")
def models(
    request: Request, context: Context, user: Viewer, study_uid: str | None = None
) -> Response:
    """Every bundle (version, weights checksum, device, labels and codes, state) and the
    routes; with a study UID, a dry run of the routing on that stored study (audited)."""
    registry = _registry(context)
    statuses = model_operations.model_statuses(context.settings, registry)
    from pacsai.inference.routing import routes_for

    routes = routes_for(context.settings, lambda: registry.bundles)
    plan = error = None
    try:
        uid = uid_field("study UID", study_uid)
        if uid is not None:
            plan = model_operations.plan_stored_study(
                context.database, user.caller("GET /models"), context.settings, registry, uid
            )
    except (FormError, OperationError) as exc:
        error = str(exc)
    return render(
        request,
        "models.html",
        user,
        models=statuses,
        routes=routes,
        plan=plan,
        error=error,
        study_uid=study_uid or "",
        configured=context.settings.routes is not None,
    )


# --- audit ----------------------------------------------------------------------------------


def _audit_filter(params: dict[str, str | None]) -> AuditFilter:
    def codes(value: str | None) -> tuple[str, ...]:
        text = text_field("code", value, 200)
        return () if text is None else tuple(v.strip() for v in text.split(",") if v.strip())

    since, until = (
        text_field("since", params["since"], 40),
        text_field("until", params["until"], 40),
    )
    outcome = text_field("outcome", params["outcome"], 2)
    return AuditFilter(
        event_ids=codes(params["event_id"]),
        event_types=codes(params["event_type"]),
        actor=text_field("actor", params["actor"], 128),
        patient_id=text_field("patient ID", params["patient_id"], 64),
        study_instance_uid=uid_field("study UID", params["study_uid"]),
        outcomes=() if outcome is None else (int(outcome),),
        since=None if since is None else parse_time(since),
        until=None if until is None else parse_time(until),
    )


_AUDIT_FIELDS = (
    "event_id",
    "event_type",
    "actor",
    "patient_id",
    "study_uid",
    "outcome",
    "since",
    "until",
)


@router.get("/audit")
def audit_page(
    request: Request,
    context: Context,
    user: Auditor,
    event_id: str | None = None,
    event_type: str | None = None,
    actor: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    outcome: str | None = None,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
) -> Response:
    """The audit trail with the filters of ``GET /audit`` (reading it is audited, 110101)."""
    params = {
        "event_id": event_id,
        "event_type": event_type,
        "actor": actor,
        "patient_id": patient_id,
        "study_uid": study_uid,
        "outcome": outcome,
        "since": since,
        "until": until,
    }
    form = {k: v or "" for k, v in params.items()}
    try:
        filters = _audit_filter(params)
        page = audit_operations.query_audit(
            context.database,
            user.caller("GET /audit"),
            filters,
            limit=context.settings.api.page_size,
            cursor=text_field("cursor", cursor, 64),
        )
    except (FormError, AuditQueryError, OperationError, ValueError) as exc:
        return render(
            request,
            "audit.html",
            user,
            form=form,
            page=None,
            error=str(exc),
            meanings=EVENT_ID_MEANINGS,
            status_code=422,
        )
    query = {k: v for k, v in form.items() if v}
    return render(
        request,
        "audit.html",
        user,
        form=form,
        page=page,
        meanings=EVENT_ID_MEANINGS,
        query=query,
        more=query | {"cursor": page.next_cursor},
        verification=audit_operations.last_verification(context.database),
    )


@router.post("/audit/verify")
def verify(request: Request, context: Context, user: Auditor, csrf_token: Csrf = "") -> Response:
    """Walk the whole hash chain now and show what was found (audited, 110101/110113)."""
    check_csrf(context, user, request, csrf_token)
    report = audit_operations.verify_audit(context.database, user.caller("POST /audit/verify"))
    return render(request, "verified.html", user, report=report)


@router.get("/audit/export")
def export(
    request: Request,
    context: Context,
    user: Auditor,
    format: str = "jsonl",
    raw: bool = False,
    event_id: str | None = None,
    event_type: str | None = None,
    actor: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    outcome: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> Response:
    """Download every matching event (JSONL, CSV or DICOM XML); recorded (110101) once sent."""
    params = {
        "event_id": event_id,
        "event_type": event_type,
        "actor": actor,
        "patient_id": patient_id,
        "study_uid": study_uid,
        "outcome": outcome,
        "since": since,
        "until": until,
    }
    kinds = {
        "jsonl": ("application/x-ndjson", "jsonl"),
        "csv": ("text/csv; charset=utf-8", "csv"),
        "dicom-xml": ("application/xml", "xml"),
    }
    if format not in kinds:
        return _problem_page(request, user, FormError("format must be jsonl, csv or dicom-xml"))
    try:
        filters = _audit_filter(params)
    except (FormError, AuditQueryError, ValueError) as exc:
        return _problem_page(request, user, exc)
    media_type, suffix = kinds[format]
    chunks = audit_operations.stream_audit_export(
        context.database,
        user.caller("GET /audit/export"),
        filters,
        format,  # type: ignore[arg-type]
        audit_source_id=context.settings.node.ae_title,
        raw_csv=raw,
    )
    headers = {"Content-Disposition": f'attachment; filename="pacsai-audit.{suffix}"'}
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


# --- tokens ---------------------------------------------------------------------------------


@router.get("/tokens")
def tokens(request: Request, context: Context, user: Admin) -> Response:
    """Every token (never a secret), a form to create one, and a revoke button per token."""
    return render(
        request,
        "tokens.html",
        user,
        tokens=token_operations.list_tokens(context.database),
        roles=[role.value for role in TokenRole],
    )


@router.post("/tokens")
def create_token(
    request: Request,
    context: Context,
    user: Admin,
    csrf_token: Csrf = "",
    name: Annotated[str, Form()] = "",
    role: Annotated[str, Form()] = "viewer",
) -> Response:
    """Create a token and show its secret, once (audited, 110113/110132)."""
    check_csrf(context, user, request, csrf_token)
    created = error = None
    try:
        created = token_operations.create_token(
            context.database,
            user.caller("POST /tokens"),
            name=name.strip(),
            role=TokenRole(role),
        )
    except (OperationError, ValueError) as exc:
        error = str(exc)
    return render(
        request,
        "tokens.html",
        user,
        tokens=token_operations.list_tokens(context.database),
        roles=[r.value for r in TokenRole],
        created=created,
        error=error,
        status_code=200 if error is None else 422,
    )


@router.get("/tokens/{token_id}/revoke")
def confirm_revoke(request: Request, context: Context, user: Admin, token_id: int) -> Response:
    """Ask the admin to confirm revoking a token."""
    names = {t.id: t.name for t in token_operations.list_tokens(context.database)}
    return render(
        request,
        "confirm.html",
        user,
        title=f"Revoke token {names.get(token_id, token_id)!r}?",
        explanation="Its holder can no longer call the API, and its console sessions end now.",
        action=f"/tokens/{token_id}/revoke",
        fields={},
        button="Revoke",
        back="/tokens",
    )


@router.post("/tokens/{token_id}/revoke")
def revoke(
    request: Request, context: Context, user: Admin, token_id: int, csrf_token: Csrf = ""
) -> Response:
    """Revoke a token (audited, 110113/110132); then list the tokens."""
    check_csrf(context, user, request, csrf_token)
    try:
        token_operations.revoke_token(
            context.database, user.caller("POST /tokens/revoke"), str(token_id)
        )
    except OperationError as exc:
        return _problem_page(request, user, exc)
    return RedirectResponse("/tokens", status_code=303)


# --- errors ---------------------------------------------------------------------------------


def _problem_page(request: Request, user: ConsoleUser | None, exc: Exception) -> Response:
    from pacsai.operations import ConflictError, NotFoundError

    status = (
        404 if isinstance(exc, NotFoundError) else 409 if isinstance(exc, ConflictError) else 422
    )
    return render(request, "error.html", user, message=str(exc), status_code=status)
