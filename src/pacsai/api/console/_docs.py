"""``/api/v1`` (what is here), ``/api/v1/docs`` (Swagger UI, served from this node) and
``/api/v1/openapi.json``; ``/docs`` points to them.

With ``api.open_docs: false`` the documentation needs a viewer token or a console session.
The Swagger UI page loads its script, stylesheet and set-up from ``/static`` only: no CDN, no
inline script (the Content-Security-Policy forbids both).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.responses import Response

from pacsai.api._context import ApiContext, api_context
from pacsai.api.auth import authenticate, bearer_scheme
from pacsai.api.console._render import templates
from pacsai.api.console._session import current_user
from pacsai.db import TokenRole

__all__ = ["API_PREFIX", "docs_router"]

API_PREFIX = "/api/v1"


def docs_router(open_docs: bool) -> APIRouter:
    """The documentation routes, open or behind a viewer token or console session."""
    router = APIRouter(include_in_schema=False)

    def allowed(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
        context: Annotated[ApiContext, Depends(api_context)],
    ) -> None:
        if open_docs or (credentials is None and current_user(request, context) is not None):
            return
        authenticate(request, credentials, TokenRole.VIEWER, context)

    guard = [Depends(allowed)]

    @router.get("/docs")
    def docs_pointer() -> Response:
        return RedirectResponse(f"{API_PREFIX}/docs", status_code=307)

    @router.get(API_PREFIX)
    @router.get(API_PREFIX + "/")
    def index(request: Request) -> Response:
        links = {
            "docs": f"{API_PREFIX}/docs",
            "openapi": f"{API_PREFIX}/openapi.json",
            "console": "/",
        }
        if "text/html" in request.headers.get("accept", ""):
            return templates.TemplateResponse(request, "api_index.html", {"links": links})
        return JSONResponse({"name": "pacsai API", "version": request.app.version, **links})

    @router.get(API_PREFIX + "/openapi.json", dependencies=guard)
    def openapi(request: Request) -> Response:
        return JSONResponse(request.app.openapi())

    @router.get(API_PREFIX + "/docs", dependencies=guard)
    def swagger(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(
            request, "docs.html", {"openapi_url": f"{API_PREFIX}/openapi.json"}
        )

    return router
