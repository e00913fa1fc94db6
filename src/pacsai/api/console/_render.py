"""Templates and what every page is given: the signed-in user, the navigation, the time."""

from __future__ import annotations

from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import Response

from pacsai import __version__
from pacsai.api.console._session import ConsoleUser

__all__ = ["NAVIGATION", "render", "templates"]

_HERE = Path(str(files("pacsai.api.console")))
templates = Jinja2Templates(directory=_HERE / "templates")

#: (path, label, least role) of the navigation bar.
NAVIGATION = (
    ("/overview", "Overview", "viewer"),
    ("/studies", "Studies", "viewer"),
    ("/jobs", "Jobs", "viewer"),
    ("/models", "Models and routes", "viewer"),
    ("/audit", "Audit", "auditor"),
    ("/tokens", "Tokens", "admin"),
)


def _when(value: datetime | None) -> str:
    """A time in the node's local zone, to the second (``-`` for none)."""
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"


_UNITS = {"[hnsf'U]": "HU", "cm3": "cm³", "mm2": "mm²", "mm3": "mm³", "%": "%", "1": ""}


def _unit(code: str | None) -> str:
    """A UCUM unit code as people write it (``[hnsf'U]`` is HU)."""
    return _UNITS.get(code or "", code or "")


templates.env.filters["when"] = _when
templates.env.filters["unit"] = _unit
templates.env.filters["seconds"] = _seconds
templates.env.globals["version"] = __version__


def render(
    request: Request,
    name: str,
    user: ConsoleUser | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> Response:
    """Render template ``name`` for ``user`` (its navigation limited to what the role may see)."""
    navigation = [
        (path, label) for path, label, role in NAVIGATION if user is not None and user.can(role)
    ]
    zone = datetime.now().astimezone().tzname()
    return templates.TemplateResponse(
        request,
        name,
        {"user": user, "navigation": navigation, "zone": zone, "path": request.url.path, **context},
        status_code=status_code,
    )
