"""`pacsai jobs list|retry`: what ran on which study, and running it again."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from pacsai.cli._common import cli_caller, config_option, friendly, load, main, open_database

if TYPE_CHECKING:
    from pacsai.operations.jobs import JobListItem
    from pacsai.operations.results import Finding


@main.group()
def jobs() -> None:
    """Jobs: what ran on which study, what it found, where the results went."""


def _finding(finding: Finding) -> str:
    if finding.probability is not None:
        return f"{finding.label} {finding.probability:.2f}"
    return f"{finding.label} {finding.volume_ml or 0.0:.1f} ml"


def _row(item: JobListItem) -> list[str]:
    counts: dict[str, int] = {}
    for result in item.results:
        for obj in result.objects:
            counts[obj.kind] = counts.get(obj.kind, 0) + 1
    deliveries = [
        d.destination
        + ("" if d.kind == "dicom" else f" ({d.kind})")
        + f":{d.status.value}"
        + (f" ({d.last_error[:60]})" if d.last_error and d.status.value != "SENT" else "")
        for d in item.deliveries
    ]
    return [
        str(item.id),
        item.study_instance_uid,
        item.status.value + (f"\n{item.reason}" if item.reason else ""),
        "\n".join(f"{r.model_name} {r.model_version}" for r in item.results),
        "\n".join(_finding(f) for r in item.results for f in r.findings) or "-",
        ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "-",
        "\n".join(deliveries) or "kept on the node",
    ]


@jobs.command("list")
@click.option(
    "--status",
    type=click.Choice(["QUEUED", "RUNNING", "SUCCEEDED", "SKIPPED", "FAILED"]),
    default=None,
    help="Only jobs in this state.",
)
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="How many of the newest jobs.",
)
@config_option
@friendly
def jobs_list(status: str | None, limit: int, config_path: Path | None) -> None:
    """Show the newest jobs with their models, findings, objects and deliveries (audited)."""
    from pacsai.db import JobStatus
    from pacsai.operations.jobs import list_jobs

    database = open_database(load(config_path))
    try:
        page = list_jobs(
            database,
            cli_caller("jobs list"),
            status=JobStatus(status) if status else None,
            limit=limit,
        )
    finally:
        database.dispose()
    table = Table(title="Jobs (newest first)")
    for column in ("job", "study", "status", "models", "findings", "objects", "deliveries"):
        table.add_column(column, overflow="fold")
    for item in page.items:
        table.add_row(*_row(item))
    Console(width=200).print(table)


@jobs.command("retry")
@click.argument("job_ids", nargs=-1, required=True, type=click.IntRange(1, 2**31 - 1))
@click.option("--rerun", is_flag=True, help="Run the models again even if the job succeeded.")
@click.option("--resend", is_flag=True, help="Send results even where they already arrived.")
@click.option("--new-uids", is_flag=True, help="Run again and write results under new UIDs.")
@config_option
@friendly
def jobs_retry(
    job_ids: tuple[int, ...], rerun: bool, resend: bool, new_uids: bool, config_path: Path | None
) -> None:
    """Retry failed deliveries of JOB_IDS, and queue failed or skipped jobs again (admin).

    Exit status 1 if a job does not exist or could not be retried.
    """
    from pacsai.operations import ConflictError, NotFoundError
    from pacsai.operations.jobs import RetryOptions, retry_job

    options = RetryOptions(rerun=rerun, resend=resend, new_uids=new_uids)
    database = open_database(load(config_path))
    refused = False
    try:
        for job_id in job_ids:
            try:
                outcome = retry_job(database, cli_caller("jobs retry"), job_id, options)
            except (NotFoundError, ConflictError) as exc:
                click.echo(f"job {job_id}: {exc}", err=True)
                refused = True
                continue
            click.echo(f"job {job_id}: {outcome.message}")
    finally:
        database.dispose()
    if refused:
        sys.exit(1)
