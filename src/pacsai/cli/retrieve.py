"""`pacsai retrieve`: list studies on a PACS (C-FIND) and pull them into pacsai (C-MOVE/C-GET)."""

from __future__ import annotations

import sys
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from pacsai.cli._common import cli_caller, config_option, friendly, load, main, open_database

if TYPE_CHECKING:
    from pacsai.operations.retrievals import StudyProgress
    from pacsai.retrieve import FoundStudy, StudyRetrieval


def _date(value: datetime | None) -> date | None:
    return value.date() if value is not None else None


@main.command()
@click.option(
    "--from",
    "source_name",
    required=True,
    metavar="PACS",
    help="A name under sources: or a DICOM destination, or AET@HOST:PORT.",
)
@click.option("--accession", help="Accession number of the study.")
@click.option("--study-uid", help="Study Instance UID.")
@click.option("--patient-id", help="Patient ID (with --since for that patient's recent studies).")
@click.option(
    "--since",
    type=click.DateTime(["%Y-%m-%d", "%Y%m%d"]),
    help="Studies from this date on (YYYY-MM-DD).",
)
@click.option(
    "--until",
    type=click.DateTime(["%Y-%m-%d", "%Y%m%d"]),
    help="Studies up to this date (YYYY-MM-DD).",
)
@click.option("--modality", help="Only studies with this modality, e.g. CT.")
@click.option(
    "--get",
    "use_get",
    is_flag=True,
    help="C-GET instead of C-MOVE (the source's retrieve: setting otherwise).",
)
@click.option("--move-to", metavar="AET", help="AE title to C-MOVE to (default node.ae_title).")
@click.option("--dry-run", is_flag=True, help="List what would be retrieved, and stop.")
@config_option
@friendly
def retrieve(
    source_name: str,
    accession: str | None,
    study_uid: str | None,
    patient_id: str | None,
    since: datetime | None,
    until: datetime | None,
    modality: str | None,
    use_get: bool,
    move_to: str | None,
    dry_run: bool,
    config_path: Path | None,
) -> None:
    """Find studies on a PACS and retrieve them into pacsai, where they are processed.

    With C-MOVE (the default) the PACS sends the studies to this node's AE title, so it must
    know it (AE title, host and port) and `pacsai serve` must be running to receive them. The
    retrieval is recorded like one started with POST /api/v1/retrieve (and listed there).
    """
    from pacsai.db import RetrievalStatus
    from pacsai.operations import InvalidRequestError
    from pacsai.operations.retrievals import RetrieveRequest, run_retrieval, start_retrieval

    settings = load(config_path)
    try:
        request = RetrieveRequest(
            source=source_name,
            accession=accession,
            study_uid=study_uid,
            patient_id=patient_id,
            since=_date(since),
            until=_date(until),
            modality=modality,
            method="get" if use_get else None,
            move_to=move_to,
            dry_run=dry_run,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    caller = cli_caller("retrieve")
    database = open_database(settings)
    try:
        try:
            started = start_retrieval(database, settings, caller, request, any_address=True)
        except InvalidRequestError as exc:
            raise click.UsageError(str(exc)) from exc
        console = Console(stderr=True)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            console=console,
            transient=not console.is_terminal,
        ) as progress:
            tasks: dict[str, TaskID] = {}

            def advance(retrieval: StudyRetrieval) -> None:
                uid = retrieval.study.study_instance_uid
                done = retrieval.completed + retrieval.failed + retrieval.warning
                total = done + (retrieval.remaining or 0)
                if uid not in tasks:
                    label = retrieval.study.accession_number or uid[-20:]
                    tasks[uid] = progress.add_task(label, total=total or None, failed=0)
                progress.update(
                    tasks[uid], completed=done, total=total or None, failed=retrieval.failed
                )

            outcome = run_retrieval(
                database,
                settings,
                caller,
                started.id,
                request,
                on_found=lambda found: _show(found, started.source),
                on_progress=advance,
            )
    finally:
        database.dispose()
    if outcome.found is None or outcome.found == 0:
        click.echo(f"pacsai: {outcome.error}", err=True)
        sys.exit(1)
    if request.dry_run:
        return
    _report(outcome.studies)
    if outcome.status is not RetrievalStatus.SUCCEEDED:
        sys.exit(1)


def _show(found: list[FoundStudy], name: str) -> None:
    table = Table(title=f"studies on {name}")
    for column in ("accession", "date", "modalities", "instances", "patient ID", "study UID"):
        table.add_column(column)
    for study in found:
        table.add_row(
            study.accession_number or "",
            study.study_date or "",
            "/".join(study.modalities),
            "" if study.instances is None else str(study.instances),
            study.patient_id or "",
            study.study_instance_uid,
        )
    Console().print(table)


def _report(studies: list[StudyProgress]) -> None:
    ok = 0
    for study in studies:
        label = study.accession_number or study.study_instance_uid
        if study.state == "retrieved":
            ok += 1
            click.echo(f"retrieved {label}: {study.completed} instances ({study.dimse_status})")
        else:
            click.echo(
                f"failed {label}: {study.error}; {study.completed} completed, "
                f"{study.failed} failed, {study.warning} warnings",
                err=True,
            )
    click.echo(f"{ok} of {len(studies)} studies retrieved")
