"""`pacsai worker`: run jobs and deliveries (scale-out), one process per GPU by default."""

from __future__ import annotations

import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from pacsai.cli._common import config_option, friendly, load, main
from pacsai.errors import ConfigError

_QUEUE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@main.command()
@config_option
@click.option(
    "--device",
    default=None,
    help="cuda:N, cuda or cpu (default: inference.device; with auto, one worker process per "
    "visible GPU, or one on the CPU).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Jobs run at once by each worker process (threads sharing its warmed models).",
)
@click.option(
    "--queues",
    default="default",
    show_default=True,
    help="Comma-separated job queues to take (a route's `queue:`).",
)
@click.option(
    "--name",
    default=None,
    help="This worker's name within the node (default: worker-<device>); its id in the "
    "workers table is <node id>/<name>.",
)
@friendly
def worker(
    config_path: Path | None, device: str | None, concurrency: int, queues: str, name: str | None
) -> None:
    """Run jobs and deliveries until SIGTERM or Ctrl-C.

    At start it refuses a device it cannot see, takes back what this node's stopped workers
    held, and loads and warms its models.
    """
    from pacsai.logs import setup_logging
    from pacsai.service import configure_libraries

    settings = load(config_path)
    setup_logging(settings.logging)
    configure_libraries()
    wanted = tuple(dict.fromkeys(q.strip() for q in queues.split(",") if q.strip()))
    bad = [q for q in wanted if not _QUEUE.match(q)]
    if not wanted or bad:
        raise ConfigError(f"--queues {queues!r}: give queue names (letters, digits, _ . -)")
    devices = _devices(device or settings.inference.device)
    if len(devices) > 1:
        _run_per_gpu(config_path, devices, concurrency, queues, name)
        return
    from pacsai.jobs.worker import Worker, WorkerOptions

    chosen = devices[0]
    process = Worker(
        settings,
        WorkerOptions(
            name=name or f"worker-{chosen.replace(':', '')}",
            device=chosen,
            queues=wanted,
            concurrency=concurrency,
        ),
    )
    stop = threading.Event()
    if settings.queue.backend == "local":

        def request_stop(signum: int, _frame: Any) -> None:
            stop.set()
            process.request_stop()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    try:
        process.start()
    except BaseException:
        process.stop()
        raise
    if settings.queue.backend == "celery":
        process.run()  # Celery's worker owns the main thread and its signals
        return
    while not stop.wait(0.5) and not process.stopped.is_set():
        pass
    process.stop()


def _devices(setting: str) -> list[str]:
    """One device per worker process: every visible GPU for ``auto``, else the one named."""
    if setting != "auto":
        return [setting]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{index}" for index in range(count)] or ["cpu"]


def _run_per_gpu(
    config_path: Path | None,
    devices: list[str],
    concurrency: int,
    queues: str,
    name: str | None,
) -> None:
    """Start one `pacsai worker --device cuda:N` per GPU and wait for them (SIGTERM reaches
    each); exit with the first failure's status."""
    import subprocess

    command = [sys.executable, "-m", "pacsai.cli", "worker"]
    if config_path is not None:
        command += ["--config", str(config_path)]
    children = []
    for device in devices:
        extra = ["--name", f"{name}-{device.replace(':', '')}"] if name else []
        children.append(
            subprocess.Popen(
                [
                    *command,
                    "--device",
                    device,
                    "--concurrency",
                    str(concurrency),
                    "--queues",
                    queues,
                    *extra,
                ]
            )
        )
    click.echo(f"pacsai worker: one process per GPU ({', '.join(devices)})", err=True)

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    failed = next((code for code in codes if code), 0)
    if failed:
        sys.exit(failed)
