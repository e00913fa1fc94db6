"""`pacsai demo`: the whole loop on one machine."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from pacsai.cli._common import friendly, main


@main.command()
@click.option(
    "--modalities",
    default="ct,mr,cr",
    show_default=True,
    help="Phantom studies to push, comma-separated among ct, mr, cr.",
)
@click.option(
    "--pacs",
    "pacs_choice",
    type=click.Choice(["auto", "orthanc", "local"]),
    default="auto",
    show_default=True,
    help="The PACS stand-in: Orthanc when installed (auto), or pacsai's small storage SCP.",
)
@click.option(
    "--models",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("models"),
    show_default=True,
    help="Directory of model bundles.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Where the PNG previews of the SEGs go.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the node's spool, database and the PACS storage here (default: a temporary "
    "directory, removed after a successful run).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the phantoms.")
@click.option(
    "--timeout",
    default=600.0,
    show_default=True,
    help="Seconds to wait for all results to come back.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@friendly
def demo(
    modalities: str,
    pacs_choice: str,
    models_dir: Path,
    out: Path,
    workdir: Path | None,
    seed: int,
    timeout: float,
    device: str,
) -> None:
    """Show the whole loop on one machine: a PACS stand-in pushes phantom studies to pacsai,
    and the SEG and SR come back into it. Exit 1 when a study's results did not come back."""
    from pacsai.demo.run import DemoOptions, print_report, run_demo

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # stops the node and the PACS through the usual clean-up

    # SIGINT too: a shell starts background commands with it ignored, and Python then installs
    # no handler of its own.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    console = Console()
    if not console.is_terminal and console.width < 120:  # a log file or a pipe: wide tables
        console = Console(width=160)
    options = DemoOptions(
        modalities=tuple(m.strip().lower() for m in modalities.split(",") if m.strip()),
        pacs=pacs_choice,  # type: ignore[arg-type]
        models_dir=models_dir,
        out=out,
        workdir=workdir,
        seed=seed,
        timeout=timeout,
        device=device,
    )
    try:
        report = run_demo(options, console)
    except KeyboardInterrupt:
        click.echo("pacsai demo: interrupted; the node and the PACS were stopped", err=True)
        sys.exit(130)
    print_report(report, console)
    sys.exit(0 if report.ok else 1)
