"""The ``pacsai`` command."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pacsai import __version__
from pacsai.config import Settings, load_settings
from pacsai.errors import ConfigError, PacsaiError

F = TypeVar("F", bound=Callable[..., Any])

_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML configuration file (default: embedded defaults plus PACSAI_ environment).",
)


def _settings(config_path: Path | None) -> Settings:
    return load_settings(config_path)


def _friendly(command: F) -> F:
    """Turn pacsai's errors into a message and an exit status instead of a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"pacsai: configuration error: {exc}", err=True)
            sys.exit(2)
        except PacsaiError as exc:
            click.echo(f"pacsai: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pacsai")
def main() -> None:
    """pacsai: a DICOM node that runs AI models on the studies a PACS sends it."""


@main.command()
@_config_option
@_friendly
def serve(config_path: Path | None) -> None:
    """Receive studies and run everything in one process until SIGTERM or Ctrl-C."""
    from pacsai.logs import setup_logging
    from pacsai.service import Node, configure_libraries

    settings = _settings(config_path)
    setup_logging(settings.logging)
    configure_libraries()
    node = Node(settings)
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    node.start()
    try:
        stop.wait()
    finally:
        node.stop()


@main.command()
@click.argument("target")
@click.option("--aet", default="PACSAI", show_default=True, help="Calling AE title.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
@_friendly
def echo(target: str, aet: str, timeout: float) -> None:
    """Send C-ECHO to TARGET (AET@HOST:PORT)."""
    from pacsai.scu import Target
    from pacsai.scu import echo as send_echo

    peer = Target.parse(target)
    status = send_echo(peer, calling_ae_title=aet, timeout=timeout)
    if status != 0:
        click.echo(f"{peer}: C-ECHO answered 0x{status:04X}", err=True)
        sys.exit(1)
    click.echo(f"{peer}: C-ECHO Success")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "target", required=True, help="Destination as AET@HOST:PORT.")
@click.option("--aet", default="PACSAI", show_default=True, help="Calling AE title.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
@_friendly
def push(paths: tuple[Path, ...], target: str, aet: str, timeout: float) -> None:
    """C-STORE files and folders (recursively) to a peer, each file as it is on disk."""
    from pacsai.scu import Target, iter_files
    from pacsai.scu import push as send_files

    peer = Target.parse(target)
    total = sum(1 for _ in iter_files(paths))
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]push[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as progress:
        task = progress.add_task(str(peer), total=total)
        summary = send_files(
            paths,
            peer,
            calling_ae_title=aet,
            timeout=timeout,
            on_file=lambda _path, _outcome: progress.advance(task),
        )
    table = Table(title=f"pushed to {peer}")
    table.add_column("outcome")
    table.add_column("files", justify="right")
    for outcome, count in sorted(summary.outcomes.items()):
        table.add_row(outcome, str(count))
    Console().print(table)
    for path, why in summary.failures[:20]:
        click.echo(f"failed: {path}: {why}", err=True)
    if len(summary.failures) > 20:
        click.echo(f"... and {len(summary.failures) - 20} more failures", err=True)
    click.echo(f"{summary.succeeded} succeeded, {summary.failed} failed")
    if summary.failed:
        sys.exit(1)


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@_config_option
@_friendly
def db_upgrade(config_path: Path | None) -> None:
    """Create or upgrade the database schema to this version of pacsai."""
    from pacsai.db import Database, current_revision, head_revision, upgrade

    settings = _settings(config_path)
    database = Database(settings.database.url)
    before = current_revision(database)
    upgrade(database)
    click.echo(
        f"{database.display_url}: schema {before or 'empty'} -> {head_revision()}"
        if before != head_revision()
        else f"{database.display_url}: schema already at {head_revision()}"
    )
    database.dispose()


if __name__ == "__main__":  # pragma: no cover
    main()
