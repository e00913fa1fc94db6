"""`pacsai studies purge`: remove the files of finished studies from this node, audited."""

from __future__ import annotations

import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

from pacsai.cli._common import cli_caller, config_option, friendly, load, main, open_database

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


class Duration(click.ParamType[timedelta]):
    """An age: ``30d``, ``12h``, ``2w``, ``1d12h`` (s m h d w), or ISO 8601 (``P30D``)."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower()
        parts = _PART.findall(text)
        if parts and not _PART.sub("", text).strip():
            total = timedelta()
            for number, unit in parts:
                total += timedelta(**{_UNITS[unit]: float(number)})
            return total
        try:
            return TypeAdapter(timedelta).validate_python(str(value).strip())
        except ValidationError:
            self.fail(
                f"{value!r} is not an age: write it as 30d, 12h, 2w or 1d12h (or ISO 8601, P30D)",
                param,
                ctx,
            )


@main.group()
def studies() -> None:
    """Studies on this node: remove the files of those that are finished."""


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f}"


@studies.command("purge")
@click.option(
    "--older-than",
    "older_than",
    type=Duration(),
    default=None,
    help="Studies whose last instance arrived, and whose last job finished, this long ago "
    "(30d, 12h, 2w).",
)
@click.option(
    "--study",
    "study_uids",
    multiple=True,
    help="Only this Study Instance UID (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@config_option
@friendly
def studies_purge(
    older_than: timedelta | None,
    study_uids: tuple[str, ...],
    dry_run: bool,
    config_path: Path | None,
) -> None:
    """Remove the received instances (files and rows) and result files of finished studies.

    A study still receiving, with a job queued or running, or with a delivery pending or
    retrying is never touched. The study, its series, jobs, findings and deliveries stay
    (marked purged); each study purged is audited (110105 DICOM Study Deleted).

    Exit status 1 if a study named with --study was not purged (the reason is printed).
    """
    from pacsai.operations.storage import purge_studies

    if older_than is None and not study_uids:
        raise click.UsageError("say which studies: --older-than AGE, --study UID, or both")
    settings = load(config_path)
    database = open_database(settings)
    try:
        report = purge_studies(
            database,
            settings,
            cli_caller("studies purge"),
            older_than=older_than,
            study_uids=study_uids,
            dry_run=dry_run,
        )
    finally:
        database.dispose()
    if report.removed:
        table = Table(title="Would remove" if dry_run else "Removed")
        for column in ("study", "last received", "instances", "MiB", "results"):
            table.add_column(column, overflow="fold")
        for study in report.removed:
            table.add_row(
                study.study_instance_uid,
                study.last_received_at.strftime("%Y-%m-%d %H:%M UTC"),
                str(study.instances),
                _mib(study.instance_bytes + study.result_bytes),
                str(study.results),
            )
        Console(width=160).print(table)
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} the files of {len(report.removed)} studies "
        f"({sum(s.instances for s in report.removed)} instances, "
        f"{sum(s.results for s in report.removed)} results, {_mib(report.bytes)} MiB)"
        + ("; nothing was changed" if dry_run else "")
    )
    for kept in report.kept:
        click.echo(f"study {kept.study_instance_uid} kept: {kept.reason}", err=True)
    if report.kept:
        sys.exit(1)
