"""`pacsai jobs list|retry`: what ran on which study, and running it again."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from pacsai.cli._common import cli_actor, config_option, friendly, load, main, open_database


@main.group()
def jobs() -> None:
    """Jobs: what ran on which study, what it found, where the results went."""


@jobs.command("list")
@click.option(
    "--status",
    type=click.Choice(["QUEUED", "RUNNING", "SUCCEEDED", "SKIPPED", "FAILED"]),
    default=None,
    help="Only jobs in this state.",
)
@click.option("--limit", default=50, show_default=True, help="How many of the newest jobs.")
@config_option
@friendly
def jobs_list(status: str | None, limit: int, config_path: Path | None) -> None:
    """Show the newest jobs with their models, findings, objects and deliveries."""
    from pacsai.db import JobStatus
    from pacsai.db.jobs import list_jobs

    database = open_database(load(config_path))
    with database.reading() as session:
        rows = list_jobs(session=session, status=JobStatus(status) if status else None, limit=limit)
    database.dispose()
    table = Table(title="Jobs (newest first)")
    for column in ("job", "study", "status", "models", "findings", "objects", "deliveries"):
        table.add_column(column, overflow="fold")
    for row in rows:
        objects = ", ".join(f"{n} {k}" for k, n in sorted(_count(row.objects).items()))
        table.add_row(
            str(row.job_id),
            row.study_instance_uid,
            row.status.value + (f"\n{row.reason}" if row.reason else ""),
            "\n".join(row.models),
            "\n".join(row.findings) or "-",
            objects or "-",
            "\n".join(row.deliveries) or "kept on the node",
        )
    Console(width=200).print(table)


def _count(values: tuple[str, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


@jobs.command("retry")
@click.argument("job_ids", nargs=-1, required=True, type=int)
@click.option("--rerun", is_flag=True, help="Run the models again even if the job succeeded.")
@click.option("--resend", is_flag=True, help="Send results even where they already arrived.")
@click.option("--new-uids", is_flag=True, help="Run again and write results under new UIDs.")
@config_option
@friendly
def jobs_retry(
    job_ids: tuple[int, ...], rerun: bool, resend: bool, new_uids: bool, config_path: Path | None
) -> None:
    """Retry failed deliveries of JOB_IDS, and queue failed or skipped jobs again (admin)."""
    from pacsai.db import (
        AuditAction,
        AuditEventId,
        AuditEventType,
        AuditOutcome,
        append_event,
        utcnow,
    )
    from pacsai.db.jobs import retry_jobs

    settings = load(config_path)
    database = open_database(settings)
    with database.transaction() as session:
        messages = retry_jobs(
            session=session,
            job_ids=list(job_ids),
            now=utcnow(),
            rerun=rerun,
            resend=resend,
            new_uids=new_uids,
        )
        append_event(
            session=session,
            event_id=AuditEventId.APPLICATION_ACTIVITY,
            event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
            action=AuditAction.EXECUTE,
            outcome=AuditOutcome.SUCCESS,
            actor=cli_actor(),
            detail={
                "command": "jobs retry",
                "jobs": messages,
                "rerun": rerun,
                "resend": resend,
                "new_uids": new_uids,
            },
        )
    database.dispose()
    for job_id, message in messages.items():
        click.echo(f"job {job_id}: {message}")
    if any(message == "no such job" for message in messages.values()):
        sys.exit(1)
