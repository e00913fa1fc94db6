"""`pacsai serve` (the whole node, or one role of it) and `pacsai api` (the HTTP API alone)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, cast

import click

from pacsai import __version__
from pacsai.cli._common import config_option, friendly, load, main, open_database, wait_for_signal


@main.command()
@config_option
@click.option(
    "--role",
    type=click.Choice(["all", "receiver", "api"]),
    default="all",
    show_default=True,
    help="all: receiver, API and (local backend) a worker process; receiver: receive studies "
    "and queue jobs; api: the HTTP API. Jobs also run in `pacsai worker` processes.",
)
@friendly
def serve(config_path: Path | None, role: str) -> None:
    """Receive studies and run the node until SIGTERM or Ctrl-C."""
    from pacsai.logs import setup_logging
    from pacsai.service import Node, Role, configure_libraries

    settings = load(config_path)
    setup_logging(settings.logging)
    configure_libraries()
    node = Node(settings, role=cast(Role, role))
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    node.start()
    try:
        wait_for_signal(stop)
    finally:
        node.stop()


@main.command("api")
@config_option
@friendly
def api_command(config_path: Path | None) -> None:
    """Serve the HTTP API alone (no receiver, no workers) until SIGTERM or Ctrl-C.

    It listens on api.host:api.port whatever api.enabled says (which is for `pacsai serve`).
    """
    from pacsai.api import ApiServer, create_app
    from pacsai.db import AuditAction, AuditEventId, AuditEventType, AuditOutcome, append_event
    from pacsai.logs import setup_logging

    settings = load(config_path)
    setup_logging(settings.logging)
    database = open_database(settings)
    server = ApiServer(
        create_app(settings, database), host=settings.api.host, port=settings.api.port
    )
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        stop.set()

    def record(event_type: AuditEventType) -> None:
        with database.transaction() as session:
            append_event(
                session=session,
                event_id=AuditEventId.APPLICATION_ACTIVITY,
                event_type=event_type,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.SUCCESS,
                actor=settings.node.ae_title,
                detail={"version": __version__, "component": "api"},
            )

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server.start()
    record(AuditEventType.APPLICATION_START)
    try:
        wait_for_signal(stop)
    finally:
        server.stop()
        record(AuditEventType.APPLICATION_STOP)
        database.dispose()
