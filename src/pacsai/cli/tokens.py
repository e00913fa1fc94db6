"""`pacsai token create|list|revoke`: bearer tokens of the HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pacsai.cli._common import cli_actor, config_option, friendly, load, main, open_database
from pacsai.errors import PacsaiError


@main.group()
def token() -> None:
    """Bearer tokens of the HTTP API (stored hashed; each shown once, when created)."""


def _audit_token_change(session: Any, detail: dict[str, Any]) -> None:
    """Record a token's creation or revocation: 110113 Security Alert, 110132 Use of
    Restricted Function, by the OS user who ran the command."""
    from pacsai.db import AuditAction, AuditEventId, AuditEventType, AuditOutcome, append_event

    append_event(
        session=session,
        event_id=AuditEventId.SECURITY_ALERT,
        event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
        action=AuditAction.EXECUTE,
        outcome=AuditOutcome.SUCCESS,
        actor=cli_actor(),
        detail=detail,
    )


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
    from pacsai.db import TokenRole, utcnow
    from pacsai.db.tokens import create_token

    database = open_database(load(config_path))
    with database.transaction() as session:
        try:
            row, secret = create_token(
                session=session, name=name, role=TokenRole(role), now=utcnow()
            )
        except ValueError as exc:
            raise PacsaiError(str(exc)) from exc
        token_id = row.id
        _audit_token_change(
            session, {"command": "token create", "token_id": token_id, "name": name, "role": role}
        )
    database.dispose()
    click.echo(f"token {name!r} (id {token_id}, role {role}) created; keep it now, it is not")
    click.echo("stored and cannot be shown again. Use it as: Authorization: Bearer <token>")
    click.echo(secret)


@token.command("list")
@config_option
@friendly
def token_list(config_path: Path | None) -> None:
    """Show every token: name, role, when created, last used and revoked (never secrets)."""
    from pacsai.db.tokens import list_tokens

    database = open_database(load(config_path))
    with database.reading() as session:
        tokens = list_tokens(session=session)
    database.dispose()
    table = Table(title="API tokens")
    for column in ("id", "name", "role", "created", "last used", "revoked"):
        table.add_column(column)

    def when(value: Any) -> str:
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
    """Revoke the token NAME_OR_ID (its name, or its id from `pacsai token list`)."""
    from pacsai.db import utcnow
    from pacsai.db.tokens import revoke_token

    database = open_database(load(config_path))
    with database.transaction() as session:
        row = revoke_token(session=session, name_or_id=name_or_id, now=utcnow())
        if row is not None:
            _audit_token_change(
                session,
                {"command": "token revoke", "token_id": row.id, "name": row.name},
            )
            revoked = f"token {row.name!r} (id {row.id}, role {row.role.value}) revoked"
    database.dispose()
    if row is None:
        raise PacsaiError(f"no unrevoked token is named or numbered {name_or_id!r}")
    click.echo(revoked)
