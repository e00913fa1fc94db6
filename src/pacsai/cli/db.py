"""`pacsai db upgrade`: the database schema."""

from __future__ import annotations

from pathlib import Path

import click

from pacsai.cli._common import config_option, friendly, load, main


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@config_option
@friendly
def db_upgrade(config_path: Path | None) -> None:
    """Create or upgrade the database schema to this version of pacsai."""
    from pacsai.db import Database, current_revision, head_revision, upgrade

    settings = load(config_path)
    database = Database(settings.database.url)
    before = current_revision(database)
    upgrade(database)
    click.echo(
        f"{database.display_url}: schema {before or 'empty'} -> {head_revision()}"
        if before != head_revision()
        else f"{database.display_url}: schema already at {head_revision()}"
    )
    database.dispose()
