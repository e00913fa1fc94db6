"""What every `pacsai` command shares: the command group, the ``--config`` option, error
handling, the database and the audit actor of the person running a command."""

from __future__ import annotations

import getpass
import os
import sys
import threading
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pacsai import __version__
from pacsai.config import Settings, load_settings
from pacsai.errors import ConfigError, PacsaiError

if TYPE_CHECKING:
    from pacsai.db import Database
    from pacsai.operations import Caller

__all__ = [
    "cli_actor",
    "cli_caller",
    "config_option",
    "friendly",
    "load",
    "main",
    "open_database",
    "wait_for_signal",
]

F = TypeVar("F", bound=Callable[..., Any])

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML configuration file (default: embedded defaults plus PACSAI_ environment).",
)


def load(config_path: Path | None) -> Settings:
    """The settings of a command: the ``--config`` file (if any) plus the environment."""
    return load_settings(config_path)


def friendly(command: F) -> F:
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


def wait_for_signal(stop: threading.Event) -> None:
    """Block the main thread until a signal handler sets ``stop``.

    A process-directed SIGTERM may be delivered to any thread; Python runs the handler only when
    the main thread next executes bytecode, and an untimed wait never wakes it. A timed wait does.
    """
    while not stop.wait(0.5):
        pass


def open_database(settings: Settings) -> Database:
    """The database of a command, its schema brought up to date (or insisted on)."""
    from pacsai.service import prepare_database

    return prepare_database(settings)


def cli_actor() -> str:
    """``cli:<os user>``, the actor of audit events recorded by commands."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def cli_caller(command: str) -> Caller:
    """The :class:`~pacsai.operations.Caller` of an operation run by ``pacsai <command>``."""
    from pacsai.operations import Caller

    return Caller(cli_actor(), None, {"command": command})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pacsai")
def main() -> None:
    """pacsai: a DICOM node that runs AI models on the studies a PACS sends it."""
