"""The ``pacsai`` command."""

from __future__ import annotations

import getpass
import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pacsai import __version__
from pacsai.config import Settings, load_settings
from pacsai.errors import ConfigError, PacsaiError

F = TypeVar("F", bound=Callable[..., Any])

_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML configuration file (default: embedded defaults plus PACSAI_ environment).",
)


def _settings(config_path: Path | None) -> Settings:
    return load_settings(config_path)


def _friendly(command: F) -> F:
    """Turn pacsai's errors into a message and an exit status instead of a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"pacsai: configuration error: {exc}", err=True)
            sys.exit(2)
        except PacsaiError as exc:
            click.echo(f"pacsai: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _wait_for_signal(stop: threading.Event) -> None:
    """Block the main thread until a signal handler sets ``stop``.

    A process-directed SIGTERM may be delivered to any thread; Python runs the handler only when
    the main thread next executes bytecode, and an untimed wait never wakes it. A timed wait does.
    """
    while not stop.wait(0.5):
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pacsai")
def main() -> None:
    """pacsai: a DICOM node that runs AI models on the studies a PACS sends it."""


@main.command()
@_config_option
@_friendly
def serve(config_path: Path | None) -> None:
    """Receive studies and run everything in one process until SIGTERM or Ctrl-C."""
    from pacsai.logs import setup_logging
    from pacsai.service import Node, configure_libraries

    settings = _settings(config_path)
    setup_logging(settings.logging)
    configure_libraries()
    node = Node(settings)
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    node.start()
    try:
        _wait_for_signal(stop)
    finally:
        node.stop()


@main.command()
@click.argument("target")
@click.option("--aet", default="PACSAI", show_default=True, help="Calling AE title.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
@_friendly
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
@_friendly
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


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@_config_option
@_friendly
def db_upgrade(config_path: Path | None) -> None:
    """Create or upgrade the database schema to this version of pacsai."""
    from pacsai.db import Database, current_revision, head_revision, upgrade

    settings = _settings(config_path)
    database = Database(settings.database.url)
    before = current_revision(database)
    upgrade(database)
    click.echo(
        f"{database.display_url}: schema {before or 'empty'} -> {head_revision()}"
        if before != head_revision()
        else f"{database.display_url}: schema already at {head_revision()}"
    )
    database.dispose()


@main.group()
def models() -> None:
    """Model bundles under inference.models_dir."""


def _registry(settings: Settings) -> Any:
    from pacsai.inference import ModelRegistry

    return ModelRegistry.from_settings(settings.inference)


@models.command("list")
@_config_option
@_friendly
def models_list(config_path: Path | None) -> None:
    """Show every bundle: name, version, modality, labels, device and status."""
    settings = _settings(config_path)
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
@_config_option
@_friendly
def models_check(names: tuple[str, ...], config_path: Path | None) -> None:
    """Check bundles (all, or NAMES) and load them on the device; exit 1 if any is refused."""
    settings = _settings(config_path)
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
@_config_option
@_friendly
def routes_test(path: Path, config_path: Path | None) -> None:
    """Show which route and series each study under PATH would get (no model is run)."""
    from pacsai.inference import plan_study, scan_folder
    from pacsai.inference.routing import routes_for

    settings = _settings(config_path)
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
@_friendly
def phantom(kind: str, outdir: Path, seed: int, orientation: str) -> None:
    """Write a synthetic ct, mr or cr study to OUTDIR with its ground truth."""
    from pacsai.phantom import write_phantom

    study = write_phantom(kind, outdir, seed=seed, orientation=orientation)
    click.echo(f"{len(study.paths)} images of study {study.study_instance_uid} in {outdir}")
    click.echo(f"ground truth: {study.truth_path}")


@main.group()
def jobs() -> None:
    """Jobs: what ran on which study, what it found, where the results went."""


def _database(settings: Settings) -> Any:
    from pacsai.service import prepare_database

    return prepare_database(settings)


@jobs.command("list")
@click.option(
    "--status",
    type=click.Choice(["QUEUED", "RUNNING", "SUCCEEDED", "SKIPPED", "FAILED"]),
    default=None,
    help="Only jobs in this state.",
)
@click.option("--limit", default=50, show_default=True, help="How many of the newest jobs.")
@_config_option
@_friendly
def jobs_list(status: str | None, limit: int, config_path: Path | None) -> None:
    """Show the newest jobs with their models, findings, objects and deliveries."""
    from pacsai.db import JobStatus
    from pacsai.db.jobs import list_jobs

    database = _database(_settings(config_path))
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
@_config_option
@_friendly
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

    settings = _settings(config_path)
    database = _database(settings)
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
            actor=_cli_actor(),
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
@_friendly
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


# --- audit ----------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The audit trail: verify its hash chain, query it, export it (each use is audited)."""


def _cli_actor() -> str:
    """``cli:<os user>``, the actor of audit events recorded by commands."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        import os

        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def _audit_filter_options(command: F) -> F:
    """The filters of `pacsai audit query` and `export` (the same as ``GET /audit``)."""
    options = (
        click.option(
            "--event-id",
            "event_ids",
            multiple=True,
            help="DCM event ID, e.g. 110104 (repeatable: any of them).",
        ),
        click.option(
            "--event-type",
            "event_types",
            multiple=True,
            help="DCM event type code, e.g. 110120 (repeatable).",
        ),
        click.option("--actor", help="Exact actor: AE title, api:<token name> or cli:<user>."),
        click.option("--patient-id", help="Patient ID."),
        click.option("--study-uid", help="Study Instance UID."),
        click.option(
            "--outcome",
            "outcomes",
            multiple=True,
            type=click.Choice(["0", "4", "8", "12"]),
            help="EventOutcomeIndicator (repeatable): 0 success, 4 minor, 8 serious, 12 major.",
        ),
        click.option("--since", help="Events at or after this ISO 8601 time (UTC if no zone)."),
        click.option("--until", help="Events before this ISO 8601 time (UTC if no zone)."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _audit_filter(values: dict[str, Any]) -> Any:
    from pacsai.db.audit_query import AuditFilter, parse_time

    since, until = values.pop("since"), values.pop("until")
    return AuditFilter(
        event_ids=values.pop("event_ids"),
        event_types=values.pop("event_types"),
        actor=values.pop("actor"),
        patient_id=values.pop("patient_id"),
        study_instance_uid=values.pop("study_uid"),
        outcomes=tuple(int(value) for value in values.pop("outcomes")),
        since=None if since is None else parse_time(since),
        until=None if until is None else parse_time(until),
    )


@audit.command("verify")
@click.option(
    "--expect-head",
    metavar="ID:HASH",
    help="A newest row noted at an earlier verify: fail if it is gone or changed (truncation).",
)
@_config_option
@_friendly
def audit_verify(expect_head: str | None, config_path: Path | None) -> None:
    """Walk the whole hash chain; exit 1 and name the first bad row if it is broken."""
    from pacsai.db import AuditEvent, verify_chain
    from pacsai.db.audit_query import chain_head, record_verification

    expected: tuple[int, str] | None = None
    if expect_head is not None:
        row_id, _, row_hash = expect_head.partition(":")
        if not row_id.isdigit() or len(row_hash) != 64:
            raise click.BadParameter(
                "give ID:HASH as printed by a verify", param_hint="--expect-head"
            )
        expected = (int(row_id), row_hash.lower())
    database = _database(_settings(config_path))
    try:
        with database.reading() as session:
            head = chain_head(session=session)
            report = verify_chain(session=session)
            anchor = None if expected is None else session.get(AuditEvent, expected[0])
            anchor_hash = None if anchor is None else anchor.row_hash
        with database.transaction() as session:
            record_verification(
                session=session,
                report=report,
                actor=_cli_actor(),
                remote_address=None,
                detail={"command": "audit verify", "expect_head": expect_head},
            )
    finally:
        database.dispose()
    problems: list[str] = []
    if not report.intact:
        problems.append(f"audit trail BROKEN at row {report.first_bad_id}: {report.problem}")
    if expected is not None:
        if anchor_hash is None:
            problems.append(
                f"row {expected[0]} (the expected head) is gone: the newest rows were deleted"
            )
        elif anchor_hash != expected[1]:
            problems.append(f"row {expected[0]} no longer has the expected hash: it was rewritten")
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        click.echo(f"{report.rows_checked} rows verified before the first problem")
        sys.exit(1)
    click.echo(f"audit trail intact: {report.rows_checked} rows verified")
    if head is not None:
        click.echo(f"newest row: {head[0]}:{head[1]}  (keep it for --expect-head)")


@audit.command("query")
@_audit_filter_options
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(1, 1000), help="Rows per page."
)
@click.option("--cursor", help="Continue after a previous page (printed at its end).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "jsonl", "csv"]),
    default="table",
    show_default=True,
    help="How to print the page.",
)
@_config_option
@_friendly
def audit_query(
    limit: int, cursor: str | None, fmt: str, config_path: Path | None, **filters: Any
) -> None:
    """Show audit events, newest first, filtered like GET /audit."""
    from pacsai.db.audit_export import EVENT_ID_MEANINGS, export_csv, export_jsonl
    from pacsai.db.audit_query import query_events, record_audit_use

    audit_filter = _audit_filter(filters)
    database = _database(_settings(config_path))
    try:
        with database.reading() as session:
            page = query_events(session=session, filters=audit_filter, limit=limit, cursor=cursor)
        with database.transaction() as session:
            record_audit_use(
                session=session,
                actor=_cli_actor(),
                remote_address=None,
                filters=audit_filter,
                detail={"command": "audit query", "format": fmt, "returned": len(page.records)},
            )
    finally:
        database.dispose()
    if fmt == "jsonl":
        click.echo("".join(export_jsonl(page.records)), nl=False)
    elif fmt == "csv":
        click.echo("".join(export_csv(page.records)), nl=False)
    else:
        table = Table(title="Audit events (newest first)")
        for column in ("id", "time (UTC)", "event", "action", "outcome", "actor", "remote"):
            table.add_column(column, overflow="fold")
        for column in ("study", "patient", "model"):
            table.add_column(column, overflow="fold")
        for record in page.records:
            model = " ".join(filter(None, (record.model_name, record.model_version)))
            table.add_row(
                str(record.id),
                record.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
                f"{record.event_id} {EVENT_ID_MEANINGS.get(record.event_id, '')}".strip()
                + (f" / {record.event_type}" if record.event_type else ""),
                record.action,
                str(record.outcome),
                record.actor,
                record.remote_address or "",
                record.study_instance_uid or "",
                record.patient_id or "",
                model,
            )
        Console(width=200).print(table)
    if page.next_cursor is not None:
        click.echo(f"more: repeat with --cursor {page.next_cursor}", err=True)


@audit.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["dicom-xml", "jsonl", "csv"]),
    required=True,
    help="dicom-xml (PS3.15 A.5.1 audit messages), jsonl or csv.",
)
@_audit_filter_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (replaced only once complete) instead of standard output.",
)
@_config_option
@_friendly
def audit_export(fmt: str, out: Path | None, config_path: Path | None, **filters: Any) -> None:
    """Export every matching audit event, oldest first, streamed (any number of rows)."""
    import os
    import tempfile

    from pacsai.db import AuditOutcome
    from pacsai.db.audit_export import export_records
    from pacsai.db.audit_query import iter_records, record_audit_use

    audit_filter = _audit_filter(filters)
    settings = _settings(config_path)
    database = _database(settings)
    count = 0

    def counted(records: Any) -> Any:
        nonlocal count
        for record in records:
            count += 1
            yield record

    temporary: Path | None = None
    completed = False
    try:
        with database.reading() as session:
            chunks = export_records(
                counted(iter_records(session=session, filters=audit_filter)),
                fmt,  # type: ignore[arg-type]
                audit_source_id=settings.node.ae_title,
            )
            if out is None:
                sys.stdout.writelines(chunks)
                sys.stdout.flush()
            else:
                handle, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or ".")
                temporary = Path(name)
                with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
                    stream.writelines(chunks)
                temporary.replace(out)
                temporary = None
        completed = True
    except OSError as exc:
        raise PacsaiError(f"cannot write the export: {exc}") from exc
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        try:
            with database.transaction() as session:
                record_audit_use(
                    session=session,
                    actor=_cli_actor(),
                    remote_address=None,
                    filters=audit_filter,
                    outcome=AuditOutcome.SUCCESS if completed else AuditOutcome.SERIOUS_FAILURE,
                    detail={
                        "command": "audit export",
                        "format": fmt,
                        "rows": count,
                        "out": str(out) if out is not None else "stdout",
                    },
                )
        finally:
            database.dispose()
    if out is not None:
        click.echo(f"{count} audit events written to {out}", err=True)


@main.command("api")
@_config_option
@_friendly
def api_command(config_path: Path | None) -> None:
    """Serve the HTTP API alone (no receiver, no workers) until SIGTERM or Ctrl-C.

    It listens on api.host:api.port whatever api.enabled says (which is for `pacsai serve`).
    """
    from pacsai.api import ApiServer, create_app
    from pacsai.db import AuditAction, AuditEventId, AuditEventType, AuditOutcome, append_event
    from pacsai.logs import setup_logging

    settings = _settings(config_path)
    setup_logging(settings.logging)
    database = _database(settings)
    server = ApiServer(
        create_app(settings, database), host=settings.api.host, port=settings.api.port
    )
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        stop.set()

    def record(event_type: AuditEventType) -> None:
        with database.transaction() as session:
            append_event(
                session=session,
                event_id=AuditEventId.APPLICATION_ACTIVITY,
                event_type=event_type,
                action=AuditAction.EXECUTE,
                outcome=AuditOutcome.SUCCESS,
                actor=settings.node.ae_title,
                detail={"version": __version__, "component": "api"},
            )

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server.start()
    record(AuditEventType.APPLICATION_START)
    try:
        _wait_for_signal(stop)
    finally:
        server.stop()
        record(AuditEventType.APPLICATION_STOP)
        database.dispose()


@main.group()
def token() -> None:
    """Bearer tokens of the HTTP API (stored hashed; each shown once, when created)."""


def _audit_token_change(session: Any, detail: dict[str, Any]) -> None:
    """Record a token's creation or revocation: 110113 Security Alert, 110132 Use of
    Restricted Function, by the OS user who ran the command."""
    from pacsai.db import AuditAction, AuditEventId, AuditEventType, AuditOutcome, append_event

    append_event(
        session=session,
        event_id=AuditEventId.SECURITY_ALERT,
        event_type=AuditEventType.USE_OF_RESTRICTED_FUNCTION,
        action=AuditAction.EXECUTE,
        outcome=AuditOutcome.SUCCESS,
        actor=_cli_actor(),
        detail=detail,
    )


@token.command("create")
@click.option(
    "--role",
    type=click.Choice(["viewer", "auditor", "admin"]),
    required=True,
    help="viewer: studies, jobs, worklist results; auditor: also the audit trail; admin: also "
    "retries and tokens.",
)
@click.option("--name", required=True, help="Who or what uses it (recorded as api:NAME).")
@_config_option
@_friendly
def token_create(role: str, name: str, config_path: Path | None) -> None:
    """Create a token; it is printed once, alone on the last line of the output."""
    from pacsai.db import TokenRole, utcnow
    from pacsai.db.tokens import create_token

    database = _database(_settings(config_path))
    with database.transaction() as session:
        try:
            row, secret = create_token(
                session=session, name=name, role=TokenRole(role), now=utcnow()
            )
        except ValueError as exc:
            raise PacsaiError(str(exc)) from exc
        token_id = row.id
        _audit_token_change(
            session, {"command": "token create", "token_id": token_id, "name": name, "role": role}
        )
    database.dispose()
    click.echo(f"token {name!r} (id {token_id}, role {role}) created; keep it now, it is not")
    click.echo("stored and cannot be shown again. Use it as: Authorization: Bearer <token>")
    click.echo(secret)


@token.command("list")
@_config_option
@_friendly
def token_list(config_path: Path | None) -> None:
    """Show every token: name, role, when created, last used and revoked (never secrets)."""
    from pacsai.db.tokens import list_tokens

    database = _database(_settings(config_path))
    with database.reading() as session:
        tokens = list_tokens(session=session)
    database.dispose()
    table = Table(title="API tokens")
    for column in ("id", "name", "role", "created", "last used", "revoked"):
        table.add_column(column)

    def when(value: Any) -> str:
        return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "-"

    for row in tokens:
        table.add_row(
            str(row.id),
            row.name,
            row.role.value,
            when(row.created_at),
            when(row.last_used_at),
            when(row.revoked_at),
        )
    Console(width=120).print(table)


@token.command("revoke")
@click.argument("name_or_id")
@_config_option
@_friendly
def token_revoke(name_or_id: str, config_path: Path | None) -> None:
    """Revoke the token NAME_OR_ID (its name, or its id from `pacsai token list`)."""
    from pacsai.db import utcnow
    from pacsai.db.tokens import revoke_token

    database = _database(_settings(config_path))
    with database.transaction() as session:
        row = revoke_token(session=session, name_or_id=name_or_id, now=utcnow())
        if row is not None:
            _audit_token_change(
                session,
                {"command": "token revoke", "token_id": row.id, "name": row.name},
            )
            revoked = f"token {row.name!r} (id {row.id}, role {row.role.value}) revoked"
    database.dispose()
    if row is None:
        raise PacsaiError(f"no unrevoked token is named or numbered {name_or_id!r}")
    click.echo(revoked)


if __name__ == "__main__":  # pragma: no cover
    main()
