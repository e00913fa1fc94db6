"""The HTTP API (FastAPI) that worklists, RIS, auditors and monitoring use.

:func:`create_app` builds the application of one node; :class:`ApiServer` runs it with uvicorn
in a thread of `pacsai serve`, or alone for `pacsai api`. Routes declare the least role they need
with ``Depends(require_role(...))`` and receive the caller as a :class:`Principal`.
"""

from __future__ import annotations

from pacsai.api.app import API_PREFIX, create_app
from pacsai.api.auth import Principal, require_role
from pacsai.api.problems import ApiProblem, Problem
from pacsai.api.server import ApiServer

__all__ = [
    "API_PREFIX",
    "ApiProblem",
    "ApiServer",
    "Principal",
    "Problem",
    "create_app",
    "require_role",
]
