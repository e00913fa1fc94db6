"""`pacsai token create|list|revoke`: bearer tokens of the HTTP API and the console."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from pacsai.cli._common import cli_caller, config_option, friendly, load, main, open_database


@main.group()
def token() -> None:
    """Bearer tokens of the HTTP API (stored hashed; each shown once, when created)."""


@token.command("create")
@click.option(
    "--role",
    type=click.Choice(["viewer", "auditor", "admin"]),
    required=True,
    help="viewer: studies, jobs, worklist results; auditor: also the audit trail; admin: also "
    "retries and tokens.",
)
@click.option("--name", required=True, help="Who or what uses it (recorded as api:NAME).")
@config_option
@friendly
def token_create(role: str, name: str, config_path: Path | None) -> None:
    """Create a token; it is printed once, alone on the last line of the output."""
    from pacsai.db import TokenRole
    from pacsai.operations.tokens import create_token

    database = open_database(load(config_path))
    try:
        created = create_token(
            database, cli_caller("token create"), name=name, role=TokenRole(role)
        )
    finally:
        database.dispose()
    click.echo(
        f"token {name!r} (id {created.token.id}, role {role}) created; keep it now, it is not"
    )
    click.echo("stored and cannot be shown again. Use it as: Authorization: Bearer <token>")
    click.echo(created.secret)


@token.command("list")
@config_option
@friendly
def token_list(config_path: Path | None) -> None:
    """Show every token: name, role, when created, last used and revoked (never secrets)."""
    from pacsai.operations.tokens import list_tokens

    database = open_database(load(config_path))
    try:
        tokens = list_tokens(database)
    finally:
        database.dispose()
    table = Table(title="API tokens")
    for column in ("id", "name", "role", "created", "last used", "revoked"):
        table.add_column(column)

    def when(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "-"

    for row in tokens:
        table.add_row(
            str(row.id),
            row.name,
            row.role.value,
            when(row.created_at),
            when(row.last_used_at),
            when(row.revoked_at),
        )
    Console(width=120).print(table)


@token.command("revoke")
@click.argument("name_or_id")
@config_option
@friendly
def token_revoke(name_or_id: str, config_path: Path | None) -> None:
    """Revoke the token NAME_OR_ID (its name, or its id from `pacsai token list`); its console
    sessions end with it."""
    from pacsai.operations.tokens import revoke_token

    database = open_database(load(config_path))
    try:
        row = revoke_token(database, cli_caller("token revoke"), name_or_id)
    finally:
        database.dispose()
    click.echo(f"token {row.name!r} (id {row.id}, role {row.role.value}) revoked")
