"""The ``pacsai`` command: one module per group of subcommands, registered on :data:`main`."""

from __future__ import annotations

from pacsai.cli import (
    audit,
    db,
    demo,
    jobs,
    models,
    network,
    retrieve,
    serve,
    studies,
    tokens,
    worker,
)
from pacsai.cli._common import main

__all__ = ["main"]

_COMMAND_MODULES = (
    audit,
    db,
    demo,
    jobs,
    models,
    network,
    retrieve,
    serve,
    studies,
    tokens,
    worker,
)
