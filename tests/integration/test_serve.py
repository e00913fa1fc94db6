"""`pacsai serve` as a process: start line, clean stop on SIGTERM with in-flight work finished."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from pacsai.db import AuditEvent, Database, Instance
from tests.support import ServeProcess, make_ct_series, wait_for


def test_start_line_names_ae_address_database_and_spool(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process()
    log = wait_for(lambda: "listening" in server.log.read_text() and server.log.read_text())
    line = next(line for line in log.splitlines() if "listening" in line)
    assert f"AE PACSAI on 127.0.0.1:{server.port}" in line
    assert "database sqlite:///" in line and "spool" in line


def test_sigterm_finishes_the_open_association_then_exits(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process(node={"shutdown_grace_seconds": 20})
    datasets = make_ct_series(40)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSAI")
    assert assoc.is_established
    statuses: list[int] = []
    halfway = threading.Event()

    def send() -> None:
        for index, ds in enumerate(datasets):
            statuses.append(int(assoc.send_c_store(ds).Status))
            if index == 10:
                halfway.set()
        assoc.release()

    sender = threading.Thread(target=send)
    sender.start()
    assert halfway.wait(60)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    sender.join(120)

    assert server.process.wait(60) == 0
    assert statuses == [0] * 40  # the association was allowed to finish
    database = Database(server.settings.database.url)
    with database.reading() as session:
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 40
        stops = session.execute(
            select(func.count()).where(AuditEvent.event_type == "110121")
        ).scalar_one()
    assert stops == 1
    database.dispose()
