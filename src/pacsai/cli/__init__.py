"""The ``pacsai`` command: one module per group of subcommands, registered on :data:`main`."""

from __future__ import annotations

# Each module registers its commands on `main` when it is imported.
from pacsai.cli import (  # noqa: F401
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
