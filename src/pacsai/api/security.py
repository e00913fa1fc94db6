"""What every HTTP response of the node carries, and whose forwarded headers are believed.

:class:`SecurityHeaders` adds to every response, API and console alike (errors included):

- ``Content-Security-Policy``: everything from this node only (no CDN, no inline script or
  style), no plugins, no ``<base>``, forms post back here only, and no framing
  (``frame-ancestors 'none'``);
- ``X-Frame-Options: DENY`` for browsers that predate ``frame-ancestors``;
- ``X-Content-Type-Options: nosniff``;
- ``Referrer-Policy: no-referrer`` (URLs can hold a patient ID or a study UID);
- ``Cross-Origin-Opener-Policy`` and ``Cross-Origin-Resource-Policy: same-origin``;
- ``Cache-Control: no-store`` on everything but the static assets (answers hold patient data).

:func:`install_security` also makes the application believe ``X-Forwarded-For`` and
``X-Forwarded-Proto`` only from ``api.trusted_proxies`` (uvicorn's own handling,
which trusts 127.0.0.1 by default, is switched off in :class:`pacsai.api.ApiServer`): otherwise a
caller could choose the address recorded in the audit trail.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

__all__ = ["CONTENT_SECURITY_POLICY", "SecurityHeaders", "install_security"]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)

_HEADERS = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
)


class SecurityHeaders:
    """ASGI middleware adding the headers above to every HTTP response.

    Parameters
    ----------
    app
        The application.
    cacheable_prefixes
        Path prefixes of static assets, which may be cached (all others: ``no-store``).
    """

    def __init__(self, app: ASGIApp, *, cacheable_prefixes: Sequence[str] = ()) -> None:
        self.app = app
        self.cacheable = tuple(cacheable_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cacheable = (
            str(scope.get("path", "")).startswith(self.cacheable) if self.cacheable else False
        )

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS:
                    headers[name] = value
                if not cacheable:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_security(app: FastAPI, trusted_proxies: Sequence[str]) -> None:
    """Add :class:`SecurityHeaders` and, with ``trusted_proxies``, uvicorn's forwarded-header
    handling limited to them (outermost, so that everything inside sees the real client)."""
    app.add_middleware(SecurityHeaders, cacheable_prefixes=("/static/",))
    if trusted_proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(trusted_proxies))
