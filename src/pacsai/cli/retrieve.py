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

from pacsai.cli._common import cli_actor, config_option, friendly, load, main, open_database

if TYPE_CHECKING:
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
    know it (AE title, host and port) and `pacsai serve` must be running to receive them.
    """
    from pacsai.retrieve import (
        StudyQuery,
        audit_retrieval,
        find_studies,
        resolve_source,
        retrieve_studies,
    )

    settings = load(config_path)
    name, source = resolve_source(settings, source_name)
    if use_get:
        source = source.model_copy(update={"retrieve": "get"})
    try:
        query = StudyQuery(
            accession_number=accession,
            study_instance_uid=study_uid,
            patient_id=patient_id,
            since=_date(since),
            until=_date(until),
            modality=modality.upper() if modality else None,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    calling = settings.node.ae_title
    found = find_studies(source, query, calling_ae_title=calling)
    database = open_database(settings)
    try:
        if not found:
            audit_retrieval(
                database,
                actor=cli_actor(),
                source_name=name,
                source=source,
                query=query,
                found=found,
                retrievals=[],
            )
            click.echo(f"pacsai: nothing found on {name} for {query.describe()}", err=True)
            sys.exit(1)
        _show(found, name)
        if dry_run:
            audit_retrieval(
                database,
                actor=cli_actor(),
                source_name=name,
                source=source,
                query=query,
                found=found,
                retrievals=[],
            )
            return
        instances = None
        if source.retrieve == "get":
            from pacsai.scp import InstanceStore, Spool

            spool = Spool(
                settings.storage.spool_dir,
                min_free_bytes=settings.storage.min_free_mb * 2**20,
            )
            instances = InstanceStore(database=database, spool=spool)
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

            results = retrieve_studies(
                source,
                found,
                calling_ae_title=calling,
                move_destination=move_to or settings.node.ae_title,
                instances=instances,
                quiet_seconds=settings.node.study_quiet_seconds,
                on_progress=advance,
            )
        audit_retrieval(
            database,
            actor=cli_actor(),
            source_name=name,
            source=source,
            query=query,
            found=found,
            retrievals=results,
        )
    finally:
        database.dispose()
    _report(results)
    if not all(r.succeeded for r in results):
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


def _report(results: list[StudyRetrieval]) -> None:
    ok = 0
    for retrieval in results:
        label = retrieval.study.accession_number or retrieval.study.study_instance_uid
        if retrieval.succeeded:
            ok += 1
            click.echo(
                f"retrieved {label}: {retrieval.completed} instances ({retrieval.status_text})"
            )
        else:
            click.echo(
                f"failed {label}: {retrieval.status_text}; {retrieval.completed} completed, "
                f"{retrieval.failed} failed, {retrieval.warning} warnings",
                err=True,
            )
    click.echo(f"{ok} of {len(results)} studies retrieved")
