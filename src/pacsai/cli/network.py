"""The SCU side, for people: `pacsai echo` and `pacsai push`."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pacsai.cli._common import friendly, main


@main.command()
@click.argument("target")
@click.option("--aet", default="PACSAI", show_default=True, help="Calling AE title.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
@friendly
def echo(target: str, aet: str, timeout: float) -> None:
    """Send C-ECHO to TARGET (AET@HOST:PORT)."""
    from pacsai.scu import Target
    from pacsai.scu import echo as send_echo

    peer = Target.parse(target)
    status = send_echo(peer, calling_ae_title=aet, timeout=timeout)
    if status != 0:
        click.echo(f"{peer}: C-ECHO answered 0x{status:04X}", err=True)
        sys.exit(1)
    click.echo(f"{peer}: C-ECHO Success")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "target", required=True, help="Destination as AET@HOST:PORT.")
@click.option("--aet", default="PACSAI", show_default=True, help="Calling AE title.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
@friendly
def push(paths: tuple[Path, ...], target: str, aet: str, timeout: float) -> None:
    """C-STORE files and folders (recursively) to a peer, each file as it is on disk."""
    from pacsai.scu import Target, iter_files
    from pacsai.scu import push as send_files

    peer = Target.parse(target)
    total = sum(1 for _ in iter_files(paths))
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]push[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as progress:
        task = progress.add_task(str(peer), total=total)
        summary = send_files(
            paths,
            peer,
            calling_ae_title=aet,
            timeout=timeout,
            on_file=lambda _path, _outcome: progress.advance(task),
        )
    table = Table(title=f"pushed to {peer}")
    table.add_column("outcome")
    table.add_column("files", justify="right")
    for outcome, count in sorted(summary.outcomes.items()):
        table.add_row(outcome, str(count))
    Console().print(table)
    for path, why in summary.failures[:20]:
        click.echo(f"failed: {path}: {why}", err=True)
    if len(summary.failures) > 20:
        click.echo(f"... and {len(summary.failures) - 20} more failures", err=True)
    click.echo(f"{summary.succeeded} succeeded, {summary.failed} failed")
    if summary.failed:
        sys.exit(1)
