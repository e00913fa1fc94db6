"""Results delivered to a real storage SCP (DCMTK storescp): durable, retried, never twice."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from pacsai.db import AuditEvent, Delivery, DeliveryStatus, Job, JobStatus, ResultObject
from pacsai.operations import Caller
from pacsai.operations.jobs import RetryOptions, retry_job
from pacsai.phantom import write_phantom
from pacsai.reporting import read_measurements, result_uid
from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE
from pacsai.scu import Target, push
from pacsai.service import Node
from tests.support import REPO, db_rows, free_port, start_storescp, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


ADMIN = Caller("cli:test-admin", None, {"command": "jobs retry"})


def _rows(node: Node, model: type[Any], *where: Any) -> list[Any]:
    return db_rows(node.database, model, *where)


def _settings(port: int, **destination: Any) -> dict[str, Any]:
    return {
        "queue": {"local_workers": 1, "poll_seconds": 0.2},
        "inference": {"models_dir": str(REPO / "models"), "device": "cpu"},
        "destinations": {
            "pacs": {"ae_title": "DCMTK", "host": "127.0.0.1", "port": port, **destination}
        },
    }


def _push(node: Node, paths: Any) -> None:
    target = Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)
    assert push(paths, target).failed == 0


def _settled(node: Node, count: int = 1, timeout: float = 120.0) -> list[Delivery]:
    """Wait until ``count`` deliveries exist and none is PENDING or RETRYING."""

    def done() -> list[Delivery] | None:
        jobs = _rows(node, Job)
        if not jobs or any(j.status in (JobStatus.QUEUED, JobStatus.RUNNING) for j in jobs):
            return None
        deliveries = _rows(node, Delivery)
        if len(deliveries) < count or any(
            d.status in (DeliveryStatus.PENDING, DeliveryStatus.RETRYING) for d in deliveries
        ):
            return None
        return deliveries

    result: list[Delivery] = wait_for(done, timeout=timeout)
    return result


def _received(folder: Path) -> dict[str, str]:
    """SOP Instance UID -> Modality of everything storescp wrote."""
    return {
        str(ds.SOPInstanceUID): str(ds.Modality)
        for ds in (dcmread(p, stop_before_pixels=True) for p in folder.iterdir() if p.is_file())
    }


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    process = start_storescp(tmp_path / "pacs", port)
    yield port, tmp_path / "pacs"
    process.terminate()
    process.wait(timeout=10)


@pytest.mark.parametrize(
    ("options", "seg_type", "seg_syntax"),
    [
        # DCMTK 3.6.7 knows no Label Map Segmentation SOP Class, and by default takes
        # uncompressed transfer syntaxes only: BINARY, re-encoded in Explicit VR Little Endian.
        ((), "BINARY", ExplicitVRLittleEndian),
        # -pm: any SOP Class; +xa: every transfer syntax it supports (JPEG-LS among them).
        (("-pm", "+xa"), "LABELMAP", JPEGLSLossless),
    ],
    ids=["storescp", "storescp-promiscuous"],
)
def test_seg_and_sr_of_a_ct_study_arrive_at_the_pacs(
    database_url: str,
    start_node: Callable[..., Node],
    tmp_path: Path,
    options: tuple[str, ...],
    seg_type: str,
    seg_syntax: str,
) -> None:
    port = free_port()
    folder = tmp_path / "pacs"
    storescp = start_storescp(folder, port, options=options)
    try:
        study = write_phantom("ct", tmp_path / "ct", seed=21)
        node = start_node(database_url, **_settings(port))
        _push(node, study.paths)
        (delivery,) = _settled(node)
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)

    assert delivery.status is DeliveryStatus.SENT, delivery.last_error
    assert delivery.seg_type == seg_type
    objects = {o.kind: o for o in _rows(node, ResultObject)}
    assert sorted(objects) == ["SEG", "SR"]
    assert objects["SEG"].sop_class_uid == LABEL_MAP_SEGMENTATION_STORAGE  # a route's default
    expected = {o.sop_instance_uid for o in objects.values()}
    if seg_type == "BINARY":
        expected = {str(result_uid(uid, "BINARY")) for uid in expected}
    received = _received(folder)
    assert set(received) == expected
    assert sorted(received.values()) == ["SEG", "SR"]
    files = {str(dcmread(p, stop_before_pixels=True).Modality): p for p in folder.iterdir()}
    for path in files.values():
        assert dcmread(path, stop_before_pixels=True).StudyInstanceUID == study.study_instance_uid

    # The PACS holds the segmentation the node wrote, pixel for pixel, in the negotiated form.
    seg = hd.seg.segread(files["SEG"])
    assert seg.SegmentationType == seg_type
    assert seg.file_meta.TransferSyntaxUID == seg_syntax
    written = hd.seg.segread(node.settings.storage.results_dir / objects["SEG"].path)
    sources = [str(sop) for _, _, sop in written.get_source_image_uids()]
    np.testing.assert_array_equal(
        seg.get_pixels_by_source_instance(sources, combine_segments=True),
        written.get_pixels_by_source_instance(sources, combine_segments=True),
    )
    # ... and the SR that refers to that form of it.
    report = dcmread(files["SR"])
    referenced = {group["referenced_sop_instance_uid"] for group in read_measurements(report)}
    assert referenced == {str(seg.SOPInstanceUID)}

    (export,) = _rows(node, AuditEvent, AuditEvent.event_id == "110106")
    assert export.model_name == "ct_abdomen_demo" and export.outcome == 0
    detail = json.loads(export.detail or "{}")
    assert detail["destination"] == "pacs"
    assert detail["seg_type"] == seg_type
    assert set(detail["sop_instance_uids"]) == expected
    timings = json.loads(_rows(node, Job)[0].timings or "{}")
    assert "report" in timings


def test_destination_down_retries_then_fails_and_an_admin_retry_delivers_once(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet
    study = write_phantom("cr", tmp_path / "cr", seed=22)
    node = start_node(**_settings(port, max_attempts=3, backoff_seconds=0.2))
    _push(node, study.paths)

    (delivery,) = _settled(node)
    assert delivery.status is DeliveryStatus.FAILED
    assert delivery.attempts == 3
    assert delivery.last_error and "could not connect" in delivery.last_error

    storescp = start_storescp(tmp_path / "pacs", port)
    try:
        (job,) = _rows(node, Job)
        outcome = retry_job(node.database, ADMIN, job.id)
        assert "pending again" in outcome.message
        assert node.deliveries is not None
        node.deliveries.notify()
        (delivery,) = wait_for(
            lambda: [d for d in _rows(node, Delivery) if d.status is DeliveryStatus.SENT] or None
        )
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)
    received = _received(tmp_path / "pacs")
    assert list(received.values()) == ["SR"]  # the classification's report, exactly once


def test_a_destination_that_refuses_the_object_fails_at_once_with_the_reason(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """A storage SCP that only takes CT images has no presentation context for SR."""
    port = free_port()
    scp = AE(ae_title="CTONLY")
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[])
    try:
        study = write_phantom("cr", tmp_path / "cr", seed=23)
        node = start_node(**_settings(port, max_attempts=5, backoff_seconds=0.2))
        _push(node, study.paths)
        (delivery,) = _settled(node)
    finally:
        server.shutdown()
    assert delivery.status is DeliveryStatus.FAILED
    assert delivery.attempts == 1
    assert delivery.last_error and "presentation context" in delivery.last_error


def test_a_rerun_sends_nothing_twice_unless_asked(
    start_node: Callable[..., Node], storescp: tuple[int, Path], tmp_path: Path
) -> None:
    port, folder = storescp
    study = write_phantom("cr", tmp_path / "cr", seed=24)
    node = start_node(**_settings(port))
    _push(node, study.paths)
    (first,) = _settled(node)
    assert first.status is DeliveryStatus.SENT
    (job,) = _rows(node, Job)
    first_uids = {o.sop_instance_uid for o in _rows(node, ResultObject)}

    def rerun(**flags: bool) -> None:
        retry_job(node.database, ADMIN, job.id, RetryOptions(rerun=True, **flags))
        node.workers.notify()  # type: ignore[union-attr]
        wait_for(
            lambda: (
                _rows(node, Job)[0].status is JobStatus.SUCCEEDED
                and len({o.result_id for o in _rows(node, ResultObject)}) == runs[0]
            )
        )

    runs = [2]
    rerun()
    assert {o.sop_instance_uid for o in _rows(node, ResultObject)} == first_uids  # same UIDs
    assert len(_rows(node, Delivery)) == 1  # and not sent again

    runs[0] = 3
    rerun(resend=True)
    deliveries = _settled(node, count=2)
    assert [d.status for d in deliveries] == [DeliveryStatus.SENT] * 2

    runs[0] = 4
    rerun(new_uids=True)
    _settled(node, count=3)
    all_uids = {o.sop_instance_uid for o in _rows(node, ResultObject)}
    assert len(all_uids) == 2  # one new SR instance beside the first
    assert set(_received(folder)) == all_uids


def test_without_destinations_results_are_kept_on_the_node(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    study = write_phantom("cr", tmp_path / "cr", seed=25)
    settings = _settings(1)
    settings["destinations"] = {}
    node = start_node(**settings)
    _push(node, study.paths)
    job = wait_for(
        lambda: next((j for j in _rows(node, Job) if j.status is JobStatus.SUCCEEDED), None)
    )
    assert job is not None
    assert [o.kind for o in _rows(node, ResultObject)] == ["SR"]
    assert _rows(node, Delivery) == []


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(0x0110, False), (0xA700, False), (0xA900, True), (0xC000, True)],
)
def test_a_refusal_is_permanent_unless_another_attempt_may_pass(
    tmp_path: Path, status: int, permanent: bool
) -> None:
    """Out of Resources and Processing Failure (which pacsai answers for a database error) are
    retried; a data set the peer cannot take is not."""
    from pynetdicom import evt

    from pacsai.config import Destination
    from pacsai.reporting.delivery import DeliveryFailure, Peer, send
    from tests.support import make_ct_series, write_datasets

    port = free_port()
    scp = AE(ae_title="PICKY")
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status)]
    )
    try:
        files = write_datasets(make_ct_series(1), tmp_path)
        peer = Peer(
            "picky",
            Destination(ae_title="PICKY", host="127.0.0.1", port=port),
            "PICKY",
            "127.0.0.1",
        )
        with pytest.raises(DeliveryFailure) as refused:
            send(peer, files, calling_ae_title="PACSAI")
    finally:
        server.shutdown()
    assert refused.value.permanent is permanent
    assert f"0x{status:04X}" in str(refused.value)
