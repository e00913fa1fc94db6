"""Problem details (RFC 9457): every error of the API as ``application/problem+json``.

pacsai's own problems carry a ``type`` of the form ``urn:pacsai:problem:<slug>`` (a URI that is
not meant to be dereferenced); the HTTP errors of routing itself (an unknown path, a method the
path does not allow) carry ``about:blank`` and the status's standard title. ``instance`` is the
request path, never its query string (which may hold a patient ID).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacsai.operations.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OperationError,
)

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "ApiProblem",
    "Problem",
    "ProblemGuard",
    "ValidationIssue",
    "install_problem_handlers",
    "operation_problem",
    "problem_responses",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_PREFIX = "urn:pacsai:problem:"

log = logging.getLogger("pacsai.api")
access_log = logging.getLogger("pacsai.api.access")
_PROBES = ("/healthz", "/readyz", "/metrics")


class ValidationIssue(BaseModel):
    """One reason a request was refused by validation (the offending value is not echoed)."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem details object."""

    type: str = Field(default="about:blank", description="URI naming the kind of problem")
    title: str = Field(description="Short summary of the kind of problem")
    status: int = Field(description="The HTTP status code")
    detail: str | None = Field(default=None, description="What went wrong in this request")
    instance: str | None = Field(default=None, description="The request path")
    errors: list[ValidationIssue] | None = Field(
        default=None, description="For validation problems: each refused parameter"
    )


class ApiProblem(Exception):
    """Raised by routes and dependencies; answered as a problem details response.

    Parameters
    ----------
    status
        The HTTP status code.
    slug
        The last part of the problem's ``type`` URI, e.g. ``"not-found"``.
    detail
        A sentence for people: what was wrong with this request and what to do.
    headers
        Extra response headers (``WWW-Authenticate`` for 401).
    """

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = dict(headers or {})


def problem_response(
    request_path: str,
    status: int,
    *,
    type_: str = "about:blank",
    title: str | None = None,
    detail: str | None = None,
    headers: Mapping[str, str] | None = None,
    errors: list[ValidationIssue] | None = None,
) -> JSONResponse:
    """A JSON response holding a :class:`Problem`."""
    problem = Problem(
        type=type_,
        title=title or HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request_path,
        errors=errors,
    )
    return JSONResponse(
        problem.model_dump(mode="json", exclude_none=True),
        status_code=status,
        headers=dict(headers or {}),
        media_type=PROBLEM_MEDIA_TYPE,
    )


_TITLES = {"validation": "Request parameters are not valid"}


def _api_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiProblem)
    return problem_response(
        request.url.path,
        exc.status,
        type_=_TYPE_PREFIX + exc.slug,
        title=_TITLES.get(exc.slug),
        detail=exc.detail,
        headers=exc.headers,
    )


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return problem_response(
        request.url.path,
        exc.status_code,
        detail=exc.detail if exc.detail != HTTPStatus(exc.status_code).phrase else None,
        headers=exc.headers,
    )


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    issues = [
        ValidationIssue(
            loc=[part if isinstance(part, int) else str(part) for part in error.get("loc", ())],
            msg=str(error.get("msg", "")),
            type=str(error.get("type", "")),
        )
        for error in exc.errors()
    ]
    where = ", ".join(".".join(str(part) for part in issue.loc) for issue in issues)
    return problem_response(
        request.url.path,
        422,
        type_=_TYPE_PREFIX + "validation",
        title=_TITLES["validation"],
        detail=f"refused: {where}" if where else "the request is not valid",
        errors=issues,
    )


def operation_problem(exc: OperationError) -> ApiProblem:
    """The problem of an operation's refusal: 404 not found, 409 conflict, 422 invalid."""
    if isinstance(exc, NotFoundError):
        return ApiProblem(404, "not-found", str(exc))
    if isinstance(exc, ConflictError):
        return ApiProblem(409, "conflict", str(exc))
    if isinstance(exc, InvalidRequestError):
        return ApiProblem(422, "validation", str(exc))
    return ApiProblem(400, "bad-request", str(exc))


def _operation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OperationError)
    return _api_problem(request, operation_problem(exc))


def install_problem_handlers(app: FastAPI) -> None:
    """Answer pacsai's problems, operations' refusals, HTTP errors and validation errors as
    problem details."""
    app.add_exception_handler(ApiProblem, _api_problem)
    app.add_exception_handler(OperationError, _operation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries declaring problem details for ``statuses``."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
        }
        for status in statuses
    }


class ProblemGuard:
    """ASGI middleware: an access log line without the query string, and a generic 500.

    The query string is left out of the log because it may carry a patient ID. An unexpected
    exception is answered with a problem that says nothing of the internals, and logged with its
    exception types and stack frames but without its messages (a database error's message can
    quote the values of the statement, patient IDs included).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        method, path = scope.get("method", "?"), scope.get("path", "?")
        try:
            await self.app(scope, receive, send_status)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: answer 500
            log.error(
                "internal error answering %s %s: %s\n%s",
                method,
                path,
                _exception_types(exc),
                _frames(exc),
                extra={"action": "api_error", "method": method, "path": path},
            )
            if status:
                return  # the response had begun; the client sees it cut short
            status = 500
            response = problem_response(
                path,
                500,
                type_=_TYPE_PREFIX + "internal",
                detail="the server failed to answer this request; the error is in its log",
            )
            await response(scope, receive, send)
        finally:
            quiet = path.endswith(_PROBES)  # probes and scrapes every few seconds: DEBUG only
            access_log.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %d %.1f ms",
                method,
                path,
                status,
                (time.perf_counter() - started) * 1000,
                extra={"action": "api_request", "method": method, "path": path, "status": status},
            )


def _frames(exc: BaseException) -> str:
    """Where it failed: pacsai's own frames and the innermost one, without any message."""
    frames = traceback.extract_tb(exc.__traceback__)
    kept = [
        frame
        for index, frame in enumerate(frames)
        if "/pacsai/" in frame.filename or index == len(frames) - 1
    ]
    return "".join(traceback.format_list(kept)).rstrip()


def _exception_types(exc: BaseException) -> str:
    names: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(names) < 5:
        names.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(names)
