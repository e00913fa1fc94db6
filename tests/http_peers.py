"""Run a test's own ASGI app (a FHIR server or webhook receiver stand-in) with uvicorn on a free
loopback port, in a thread, for the duration of a ``with`` block."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from tests.support import wait_for


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app``; yield its base URL (``http://127.0.0.1:PORT``)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=20)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        listener.close()
