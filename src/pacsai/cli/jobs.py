"""`pacsai jobs list|retry|send`: what ran on which study, running it again, and sending its
results to another destination."""

from __future__ import annotations

import sys
import time
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


@jobs.command("send")
@click.argument("job_id", type=click.IntRange(1, 2**31 - 1))
@click.option("--to", "destination", required=True, help="A DICOM destination under destinations:.")
@click.option("--again", is_flag=True, help="Send even if the destination has them already.")
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(0),
    default=0,
    show_default=True,
    help="Wait this many seconds for the node to send them, and say how it went.",
)
@config_option
@friendly
def jobs_send(
    job_id: int, destination: str, again: bool, wait_seconds: float, config_path: Path | None
) -> None:
    """Send the stored results (SEG, SR) of JOB_ID to the destination DEST (admin).

    New deliveries are queued; the node's delivery workers send them, retry them with backoff
    and audit each attempt. Refused when the result files were removed from this node (storage
    retention, `pacsai studies purge`), or when the destination has them already (--again).
    Exit status 1 if refused, or if --wait ends with a delivery not SENT.
    """
    from pacsai.db import DeliveryStatus
    from pacsai.operations import ConflictError, InvalidRequestError, NotFoundError
    from pacsai.operations.jobs import delivery_states, send_job_results

    settings = load(config_path)
    database = open_database(settings)
    try:
        try:
            outcome = send_job_results(
                database, settings, cli_caller("jobs send"), job_id, destination, again=again
            )
        except (NotFoundError, ConflictError, InvalidRequestError) as exc:
            click.echo(f"job {job_id}: {exc}", err=True)
            sys.exit(1)
        ids = ", ".join(str(i) for i in outcome.delivery_ids)
        click.echo(f"job {job_id}: {outcome.message} (delivery {ids})")
        if not wait_seconds:
            return
        deadline = time.monotonic() + wait_seconds
        waiting = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)
        states = delivery_states(database, outcome.delivery_ids)
        while any(s.status in waiting for s in states) and time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            states = delivery_states(database, outcome.delivery_ids)
    finally:
        database.dispose()
    for state in states:
        error = f" ({state.last_error})" if state.last_error else ""
        click.echo(f"delivery {state.id} to {state.destination}: {state.status.value}{error}")
    if any(s.status is not DeliveryStatus.SENT for s in states):
        sys.exit(1)
