"""Running the API with uvicorn in a thread: for `pacsai serve` and `pacsai api`.

The listening socket is bound here, before the thread starts, so that a port already in use is
an error of :meth:`ApiServer.start` and port 0 is resolved at once. uvicorn's access log is off
(its lines carry query strings, which may hold a patient ID); :class:`pacsai.api.problems.
ProblemGuard` logs each request without its query string instead.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from pacsai.api.app import API_PREFIX
from pacsai.errors import ConfigError, PacsaiError

__all__ = ["ApiServer"]

log = logging.getLogger("pacsai.api")


class ApiServer:
    """One uvicorn server on ``host:port`` in a daemon thread.

    Parameters
    ----------
    app
        The application (see :func:`pacsai.api.create_app`).
    host, port
        Where to listen; port 0 picks a free port, then :attr:`port` tells which.
    """

    def __init__(self, app: FastAPI, *, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound (known once started)."""
        if self._socket is None:
            raise PacsaiError("the API server is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """The base URL of the API, e.g. ``http://127.0.0.1:8080/api/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{API_PREFIX}"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            return socket.create_server((self.host, self.requested_port), family=family)
        except OSError as exc:
            raise ConfigError(
                f"the API cannot listen on {self.host}:{self.requested_port}: {exc.strerror} "
                "(set api.port to a free port, or api.enabled: false)"
            ) from exc

    def start(self, timeout: float = 30.0) -> None:
        """Bind, start serving in a thread, and return once requests are answered.

        Raises
        ------
        ConfigError
            If the address cannot be bound.
        PacsaiError
            If the server did not start within ``timeout`` seconds.
        """
        self._socket = self._bind()
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            server_header=False,
            # Forwarded headers are believed from api.trusted_proxies only, by the application
            # itself (pacsai.api.security); uvicorn would believe them from 127.0.0.1.
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        server, sock = self._server, self._socket
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="pacsai-api", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # uvicorn offers no event to wait on; startup takes milliseconds
        if not server.started:
            where = f"{self.host}:{self.port}"
            self.stop()
            raise PacsaiError(f"the API server on {where} did not start (see the log above)")
        log.info("API listening on %s", self.url, extra={"action": "api_started"})

    def stop(self, timeout: float = 10.0) -> None:
        """Stop answering, let open requests finish (up to a few seconds), and join."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._server = None
