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
    """Load bundles (all, or NAMES) and run each once on a synthetic volume of its declared
    input on the configured device; exit 1 if any is refused."""
    settings = load(config_path)
    registry = _registry(settings)
    results = registry.warm_up(names or None)
    failed = 0
    for result in results:
        if result.status != "ready":
            click.echo(f"{result.name}: REFUSED: {result.reason}")
            failed += 1
            continue
        bundle = registry.get(result.name)
        labels = ", ".join(
            f"{label.value}={label.name} ({label.type.meaning}"
            f"{', ' + label.modifier.meaning if label.modifier else ''})"
            for label in bundle.labels
        )
        inputs = (
            f"; inputs {', '.join(slot.name for slot in bundle.inputs)}"
            if len(bundle.inputs) > 1
            else ""
        )
        click.echo(
            f"{result.name}: OK {bundle.display_version} on {result.device}; "
            f"{'/'.join(bundle.modalities)} {bundle.task} {bundle.spatial_dims}D{inputs}; "
            f"loaded in {result.load_seconds:.1f} s, ran in {result.run_seconds:.1f} s; {labels}"
        )
        for note in result.notes:
            click.echo(f"  note: {note}")
    if not results:
        click.echo(f"no bundles in {settings.inference.models_dir}")
    sys.exit(1 if failed or not results else 0)


@models.command("codes")
@click.argument("name")
@click.option(
    "--write",
    is_flag=True,
    help="Add the stub to the bundle's configs/pacsai.yaml (existing entries are kept).",
)
@config_option
@friendly
def models_codes(name: str, write: bool, config_path: Path | None) -> None:
    """Print a pacsai.yaml stub listing exactly the labels of bundle NAME that need codes."""
    import yaml

    from pacsai.inference.bundle import codes_stub

    settings = load(config_path)
    path = settings.inference.models_dir / name
    if not (path / "configs" / "metadata.json").is_file():
        raise PacsaiError(f"no bundle with configs/metadata.json at {path}")
    stub = codes_stub(path)
    if stub is None:
        click.echo(f"{name}: every label has a coded meaning; nothing to add", err=True)
        return
    header = (
        f"# Codes for bundle {name}: fill in each empty value (SNOMED CT codes from CID 7150 for\n"
        "# the category and CID 7151 for the type; modality: DICOM values such as [CT] or [MR]),\n"
        "# then run `pacsai models check`.\n"
    )
    text = yaml.safe_dump(stub, sort_keys=False, allow_unicode=True)
    if not write:
        click.echo(header + text, nl=False)
        return
    target = path / "configs" / "pacsai.yaml"
    current: dict[str, Any] = {}
    if target.is_file():
        loaded = yaml.safe_load(target.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise PacsaiError(f"{target} is not a YAML mapping: fix or remove it first")
        current = loaded
    if "modality" in stub and not current.get("modality"):
        current["modality"] = stub["modality"]
    known = current.setdefault("labels", {}) or {}
    current["labels"] = known
    for label, entry in stub.get("labels", {}).items():
        known.setdefault(label, entry)
    target.write_text(
        header + yaml.safe_dump(current, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    click.echo(f"wrote {target}: {len(stub.get('labels', {}))} labels to code")


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
