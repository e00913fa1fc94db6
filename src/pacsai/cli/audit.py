"""`pacsai audit verify|query|export`: the audit trail (each use is itself audited)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from pacsai.cli._common import cli_caller, config_option, friendly, load, main, open_database
from pacsai.errors import PacsaiError

F = TypeVar("F", bound=Callable[..., Any])


@main.group()
def audit() -> None:
    """The audit trail: verify its hash chain, query it, export it (each use is audited)."""


def _audit_filter_options(command: F) -> F:
    """The filters of `pacsai audit query` and `export` (the same as ``GET /audit``)."""
    options = (
        click.option(
            "--event-id",
            "event_ids",
            multiple=True,
            help="DCM event ID, e.g. 110104 (repeatable: any of them).",
        ),
        click.option(
            "--event-type",
            "event_types",
            multiple=True,
            help="DCM event type code, e.g. 110120 (repeatable).",
        ),
        click.option("--actor", help="Exact actor: AE title, api:<token name> or cli:<user>."),
        click.option("--patient-id", help="Patient ID."),
        click.option("--study-uid", help="Study Instance UID."),
        click.option(
            "--outcome",
            "outcomes",
            multiple=True,
            type=click.Choice(["0", "4", "8", "12"]),
            help="EventOutcomeIndicator (repeatable): 0 success, 4 minor, 8 serious, 12 major.",
        ),
        click.option("--since", help="Events at or after this ISO 8601 time (UTC if no zone)."),
        click.option("--until", help="Events before this ISO 8601 time (UTC if no zone)."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _audit_filter(values: dict[str, Any]) -> Any:
    from pacsai.db.audit_query import AuditFilter, parse_time

    since, until = values.pop("since"), values.pop("until")
    return AuditFilter(
        event_ids=values.pop("event_ids"),
        event_types=values.pop("event_types"),
        actor=values.pop("actor"),
        patient_id=values.pop("patient_id"),
        study_instance_uid=values.pop("study_uid"),
        outcomes=tuple(int(value) for value in values.pop("outcomes")),
        since=None if since is None else parse_time(since),
        until=None if until is None else parse_time(until),
    )


_raw_option = click.option(
    "--raw",
    is_flag=True,
    help="CSV: write values exactly as stored, to check the hashes. By default a value that a "
    "spreadsheet would run as a formula (starting with = + - @, tab or CR) gets a leading '.",
)


@audit.command("verify")
@click.option(
    "--expect-head",
    metavar="ID:HASH",
    help="A newest row noted at an earlier verify: fail if it is gone or changed (truncation).",
)
@config_option
@friendly
def audit_verify(expect_head: str | None, config_path: Path | None) -> None:
    """Walk the whole hash chain; exit 1 and name the first bad row if it is broken."""
    from pacsai.operations.audit import verify_audit

    expected: tuple[int, str] | None = None
    if expect_head is not None:
        row_id, _, row_hash = expect_head.partition(":")
        if not row_id.isdigit() or len(row_hash) != 64:
            raise click.BadParameter(
                "give ID:HASH as printed by a verify", param_hint="--expect-head"
            )
        expected = (int(row_id), row_hash.lower())
    database = open_database(load(config_path))
    try:
        report = verify_audit(
            database,
            cli_caller("audit verify"),
            expect_head=expected,
        )
    finally:
        database.dispose()
    if not report.ok:
        for problem in report.problems:
            click.echo(problem, err=True)
        click.echo(f"{report.rows_checked} rows verified before the first problem")
        sys.exit(1)
    click.echo(f"audit trail intact: {report.rows_checked} rows verified")
    if report.head_id is not None:
        click.echo(f"newest row: {report.head_id}:{report.head_hash}  (keep it for --expect-head)")


@audit.command("query")
@_audit_filter_options
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(1, 1000), help="Rows per page."
)
@click.option("--cursor", help="Continue after a previous page (printed at its end).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "jsonl", "csv"]),
    default="table",
    show_default=True,
    help="How to print the page.",
)
@_raw_option
@config_option
@friendly
def audit_query(
    limit: int,
    cursor: str | None,
    fmt: str,
    raw: bool,
    config_path: Path | None,
    **filters: Any,
) -> None:
    """Show audit events, newest first, filtered like GET /audit."""
    from pacsai.db.audit_export import EVENT_ID_MEANINGS, export_csv, export_jsonl
    from pacsai.operations.audit import query_audit

    audit_filter = _audit_filter(filters)
    database = open_database(load(config_path))
    try:
        page = query_audit(
            database,
            cli_caller("audit query"),
            audit_filter,
            limit=limit,
            cursor=cursor,
            format=fmt,
            raw=raw if fmt == "csv" else None,
        )
    finally:
        database.dispose()
    if fmt == "jsonl":
        click.echo("".join(export_jsonl(page.records)), nl=False)
    elif fmt == "csv":
        click.echo("".join(export_csv(page.records, raw=raw)), nl=False)
    else:
        table = Table(title="Audit events (newest first)")
        for column in ("id", "time (UTC)", "event", "action", "outcome", "actor", "remote"):
            table.add_column(column, overflow="fold")
        for column in ("study", "patient", "model"):
            table.add_column(column, overflow="fold")
        for record in page.records:
            model = " ".join(filter(None, (record.model_name, record.model_version)))
            table.add_row(
                str(record.id),
                record.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
                f"{record.event_id} {EVENT_ID_MEANINGS.get(record.event_id, '')}".strip()
                + (f" / {record.event_type}" if record.event_type else ""),
                record.action,
                str(record.outcome),
                record.actor,
                record.remote_address or "",
                record.study_instance_uid or "",
                record.patient_id or "",
                model,
            )
        Console(width=200).print(table)
    if page.next_cursor is not None:
        click.echo(f"more: repeat with --cursor {page.next_cursor}", err=True)


@audit.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["dicom-xml", "jsonl", "csv"]),
    required=True,
    help="dicom-xml (PS3.15 A.5.1 audit messages), jsonl or csv.",
)
@_audit_filter_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (replaced only once complete) instead of standard output.",
)
@_raw_option
@config_option
@friendly
def audit_export(
    fmt: str, out: Path | None, raw: bool, config_path: Path | None, **filters: Any
) -> None:
    """Export every matching audit event, oldest first, streamed (any number of rows)."""
    import os
    import tempfile

    from pacsai.operations.audit import audit_export as open_export

    audit_filter = _audit_filter(filters)
    settings = load(config_path)
    database = open_database(settings)
    temporary: Path | None = None
    try:
        with open_export(
            database,
            cli_caller("audit export"),
            audit_filter,
            fmt,  # type: ignore[arg-type]
            audit_source_id=settings.node.ae_title,
            raw_csv=raw,
            out=str(out) if out is not None else "stdout",
        ) as export:
            if out is None:
                sys.stdout.writelines(export.chunks)
                sys.stdout.flush()
            else:
                handle, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or ".")
                temporary = Path(name)
                with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
                    stream.writelines(export.chunks)
                temporary.replace(out)
                temporary = None
            count = export.rows
    except OSError as exc:
        raise PacsaiError(f"cannot write the export: {exc}") from exc
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        database.dispose()
    if out is not None:
        click.echo(f"{count} audit events written to {out}", err=True)
