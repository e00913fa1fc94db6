"""`pacsai models`, `pacsai routes` and `pacsai phantom`: bundles, routing, test studies."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pacsai.cli._common import config_option, friendly, load, main
from pacsai.config import Settings
from pacsai.errors import PacsaiError


@main.group()
def models() -> None:
    """Model bundles under inference.models_dir."""


def _registry(settings: Settings) -> Any:
    from pacsai.inference import ModelRegistry

    return ModelRegistry.from_settings(settings.inference)


@models.command("list")
@config_option
@friendly
def models_list(config_path: Path | None) -> None:
    """Show every bundle: name, version, modality, labels, device and status."""
    settings = load(config_path)
    registry = _registry(settings)
    device = registry.device_name()
    table = Table(title=f"Models in {settings.inference.models_dir}")
    for column in ("name", "version", "modality", "task", "labels", "device", "status"):
        table.add_column(column)
    for entry in registry.entries.values():
        bundle = entry.bundle
        if bundle is None:
            table.add_row(entry.name, "", "", "", "", "", "[red]refused[/red]")
            continue
        table.add_row(
            bundle.name,
            bundle.display_version,
            "/".join(bundle.modalities),
            f"{bundle.task} {bundle.spatial_dims}D",
            ", ".join(label.name for label in bundle.labels),
            device,
            "[green]ready[/green]",
        )
    Console().print(table)
    for entry in registry.entries.values():
        if entry.bundle is None:
            click.echo(f"{entry.name}: refused: {'; '.join(entry.problems)}", err=True)


@models.command("check")
@click.argument("names", nargs=-1)
@config_option
@friendly
def models_check(names: tuple[str, ...], config_path: Path | None) -> None:
    """Check bundles (all, or NAMES) and load them on the device; exit 1 if any is refused."""
    settings = load(config_path)
    registry = _registry(settings)
    wanted = names or tuple(registry.entries)
    failed = 0
    for name in wanted:
        try:
            model = registry.load(name)
        except PacsaiError as exc:
            click.echo(f"{name}: REFUSED: {exc}")
            failed += 1
            continue
        bundle = model.bundle
        labels = ", ".join(
            f"{label.value}={label.name} ({label.type.meaning})" for label in bundle.labels
        )
        click.echo(
            f"{name}: OK {bundle.display_version} on {model.device}; "
            f"{'/'.join(bundle.modalities)} {bundle.task}; {labels}"
        )
    if not wanted:
        click.echo(f"no bundles in {settings.inference.models_dir}")
    sys.exit(1 if failed or not wanted else 0)


@main.group()
def routes() -> None:
    """Routing rules."""


@routes.command("test")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@friendly
def routes_test(path: Path, config_path: Path | None) -> None:
    """Show which route and series each study under PATH would get (no model is run)."""
    from pacsai.inference import plan_study, scan_folder
    from pacsai.inference.routing import routes_for

    settings = load(config_path)
    rules = routes_for(settings, lambda: _registry(settings).bundles)
    studies = scan_folder(path)
    if not studies:
        raise PacsaiError(f"no DICOM images found under {path}")
    table = Table(title=f"Routing of {len(studies)} studies under {path}")
    for column in ("study", "route", "model", "series"):
        table.add_column(column, overflow="fold")
    for study in studies:
        plan = plan_study(study, rules)
        for run in plan.runs:
            table.add_row(
                study.study_instance_uid, run.route.name, run.route.model, run.series.describe()
            )
        if not plan.runs:
            table.add_row(
                study.study_instance_uid, "[yellow]SKIPPED[/yellow]", "", plan.skip_reason
            )
    Console(width=200).print(table)


@main.command()
@click.argument("kind", type=click.Choice(["ct", "mr", "cr"]))
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the synthetic anatomy.")
@click.option(
    "--orientation",
    type=click.Choice(["axial", "axial-reversed", "sagittal", "coronal", "oblique"]),
    default="axial",
    show_default=True,
    help="Slice orientation (ct and mr).",
)
@friendly
def phantom(kind: str, outdir: Path, seed: int, orientation: str) -> None:
    """Write a synthetic ct, mr or cr study to OUTDIR with its ground truth."""
    from pacsai.phantom import write_phantom

    study = write_phantom(kind, outdir, seed=seed, orientation=orientation)
    click.echo(f"{len(study.paths)} images of study {study.study_instance_uid} in {outdir}")
    click.echo(f"ground truth: {study.truth_path}")
