"""The operator console: server-rendered pages at ``/`` of the API's address.

Jinja2 templates and the assets under ``static/`` (the console's stylesheet, htmx for the
overview's refresh; every page reads and works without JavaScript) ship inside the package, and
nothing is loaded from elsewhere. :func:`install_console` adds the pages, the static files, the
answers for a missing session (a redirect to the sign-in page), a role too low and a missing
CSRF token (403 pages), and the offline API documentation (Swagger UI from the
``fastapi-offline`` package's assets) at ``/api/v1/docs``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.responses import RedirectResponse, Response

from pacsai.api.console._docs import docs_router
from pacsai.api.console._render import render
from pacsai.api.console._session import ConsoleForbidden, CsrfRefused, SignInRequired
from pacsai.api.console.pages import router

__all__ = ["install_console"]


def _sign_in(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    return RedirectResponse(f"/sign-in?next={quote(exc.next_path, safe='/')}", status_code=303)


def _forbidden(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleForbidden)
    message = (
        f"Token {exc.user.name!r} has role {exc.user.role.value}; this page needs "
        f"{exc.needed.value}."
    )
    return render(request, "error.html", exc.user, message=message, status_code=403)


def _csrf(request: Request, exc: Exception) -> Response:
    message = (
        "This form came without its security token (CSRF) and was refused. Reload the page "
        "and submit it again."
    )
    return render(request, "error.html", None, message=message, status_code=403)


def install_console(app: FastAPI, *, open_docs: bool) -> None:
    """Add the console, its static files and the offline API docs to ``app``."""
    static = Path(str(files("pacsai.api.console"))) / "static"
    swagger = Path(str(files("fastapi_offline"))) / "static"
    app.mount("/static/swagger", StaticFiles(directory=swagger), name="swagger-static")
    app.mount("/static", StaticFiles(directory=static), name="console-static")
    app.include_router(router)
    app.include_router(docs_router(open_docs))
    app.add_exception_handler(SignInRequired, _sign_in)
    app.add_exception_handler(ConsoleForbidden, _forbidden)
    app.add_exception_handler(CsrfRefused, _csrf)
