"""What a destination receives depends on what it accepts: the Label Map SEG where it takes that
SOP Class, else the BINARY form of the result; each object compressed where it takes that
transfer syntax, else re-encoded. Real pynetdicom storage SCPs on loopback, each with only the
presentation contexts a test gives it, and a STOW-RS endpoint that refuses the Label Map SEG."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    SegmentationStorage,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]

from pacsai.config import Destination
from pacsai.reporting import read_measurements, result_uid
from pacsai.reporting.delivery import DeliveryFailure, Peer, send
from pacsai.reporting.outputs import WrittenObject, write_result_objects
from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE
from tests.dicom_checks import PhantomCase, demo_bundle, phantom_case
from tests.support import free_port

pytestmark = pytest.mark.slow

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomCase, list[WrittenObject]]:
    """A CT result as a job writes it for a route with the default seg_type (LABELMAP)."""
    folder = tmp_path_factory.mktemp("result")
    case = phantom_case("ct", folder / "ct", seed=41)
    bundle = demo_bundle("ct_abdomen_demo", folder / "bundles")
    objects = write_result_objects(
        results_dir=folder,
        folder=Path("result-1"),
        sources=case.datasets,
        volume=case.volume,
        bundle=bundle,
        route_name="ct",
        label_map=case.label_map,
        probabilities=None,
        outputs=["seg", "sr"],
    )
    return case, [
        WrittenObject(
            o.kind, o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid, folder / o.path
        )
        for o in objects
    ]


@contextmanager
def storage_scp(
    folder: Path, contexts: Sequence[tuple[str, Sequence[str]]]
) -> Iterator[tuple[int, Path]]:
    """A storage SCP that accepts only ``contexts`` and writes what it receives, as received."""
    folder.mkdir(parents=True, exist_ok=True)

    def handle_store(event: Event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        (folder / f"{uid}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="STORE")
    for sop_class, syntaxes in contexts:
        ae.add_supported_context(sop_class, list(syntaxes))
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
    )
    try:
        yield port, folder
    finally:
        server.shutdown()


def peer(port: int) -> Peer:
    destination = Destination(ae_title="STORE", host="127.0.0.1", port=port)
    return Peer("store", destination, "STORE", "127.0.0.1")


def received(folder: Path) -> dict[str, pydicom.Dataset]:
    """Modality -> the object received (one of each)."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    by_modality = {str(ds.Modality): ds for ds in datasets}
    assert len(by_modality) == len(datasets)
    return by_modality


def same_segmentation(got: pydicom.Dataset, written: Path, case: PhantomCase) -> None:
    uids = [uid for uid, _ in case.volume.sources]
    theirs = hd.seg.Segmentation.from_dataset(got, copy=False)
    ours = hd.seg.segread(written)
    np.testing.assert_array_equal(
        theirs.get_pixels_by_source_instance(uids, combine_segments=True),
        ours.get_pixels_by_source_instance(uids, combine_segments=True),
    )


@pytest.mark.parametrize(
    ("seg_syntaxes", "expected_syntax"),
    [
        ([DeflatedExplicitVRLittleEndian, *UNCOMPRESSED], DeflatedExplicitVRLittleEndian),
        ([ImplicitVRLittleEndian], ImplicitVRLittleEndian),
    ],
    ids=["deflate", "implicit-only"],
)
def test_a_peer_without_the_label_map_sop_class_receives_binary(
    result: tuple[PhantomCase, list[WrittenObject]],
    tmp_path: Path,
    seg_syntaxes: list[str],
    expected_syntax: str,
) -> None:
    case, objects = result
    seg, sr = objects
    assert seg.sop_class_uid == LABEL_MAP_SEGMENTATION_STORAGE
    contexts = [(SegmentationStorage, seg_syntaxes), (Comprehensive3DSRStorage, UNCOMPRESSED)]
    with storage_scp(tmp_path / "scp", contexts) as (port, folder):
        receipt = send(peer(port), [seg.path, sr.path], calling_ae_title="PACSAI")
        got = received(folder)

    binary_uid = str(result_uid(seg.sop_instance_uid, "BINARY"))
    assert receipt.seg_type == "BINARY"
    assert [(o.path, o.sop_instance_uid) for o in receipt.objects] == [
        (seg.path, binary_uid),
        (sr.path, str(result_uid(sr.sop_instance_uid, "BINARY"))),
    ]
    assert receipt.objects[0].transfer_syntax_uid == expected_syntax
    assert got["SEG"].SOPClassUID == SegmentationStorage
    assert got["SEG"].SOPInstanceUID == binary_uid
    assert got["SEG"].SeriesInstanceUID == seg.series_instance_uid  # the result's SEG series
    assert got["SEG"].file_meta.TransferSyntaxUID == expected_syntax
    same_segmentation(got["SEG"], seg.path, case)
    references = {group["referenced_sop_instance_uid"] for group in read_measurements(got["SR"])}
    assert references == {binary_uid}
    assert got["SR"].SeriesInstanceUID == sr.series_instance_uid
    # the BINARY form was kept beside the result for the next delivery
    assert (seg.path.parent / "seg-binary.dcm").is_file()


def test_a_peer_with_the_label_map_sop_class_receives_it_compressed(
    result: tuple[PhantomCase, list[WrittenObject]], tmp_path: Path
) -> None:
    case, objects = result
    seg, sr = objects
    contexts = [
        (LABEL_MAP_SEGMENTATION_STORAGE, [JPEGLSLossless, *UNCOMPRESSED]),
        (SegmentationStorage, UNCOMPRESSED),
        (Comprehensive3DSRStorage, UNCOMPRESSED),
    ]
    with storage_scp(tmp_path / "scp", contexts) as (port, folder):
        receipt = send(peer(port), [seg.path, sr.path], calling_ae_title="PACSAI")
        got = received(folder)
    assert receipt.seg_type == "LABELMAP"
    assert [o.sop_instance_uid for o in receipt.objects] == [
        seg.sop_instance_uid,
        sr.sop_instance_uid,
    ]
    assert got["SEG"].SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
    assert got["SEG"].file_meta.TransferSyntaxUID == JPEGLSLossless
    assert got["SR"].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    same_segmentation(got["SEG"], seg.path, case)


def test_a_peer_taking_the_label_map_uncompressed_gets_it_decoded(
    result: tuple[PhantomCase, list[WrittenObject]], tmp_path: Path
) -> None:
    case, objects = result
    seg, sr = objects
    contexts = [
        (LABEL_MAP_SEGMENTATION_STORAGE, UNCOMPRESSED),
        (Comprehensive3DSRStorage, UNCOMPRESSED),
    ]
    with storage_scp(tmp_path / "scp", contexts) as (port, folder):
        receipt = send(peer(port), [seg.path, sr.path], calling_ae_title="PACSAI")
        got = received(folder)
    assert receipt.seg_type == "LABELMAP"
    assert got["SEG"].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got["SEG"].SOPInstanceUID == seg.sop_instance_uid
    same_segmentation(got["SEG"], seg.path, case)


def test_a_peer_taking_no_segmentation_refuses_the_delivery_for_good(
    result: tuple[PhantomCase, list[WrittenObject]], tmp_path: Path
) -> None:
    _, objects = result
    contexts = [(Comprehensive3DSRStorage, UNCOMPRESSED)]
    with (
        storage_scp(tmp_path / "scp", contexts) as (port, folder),
        pytest.raises(DeliveryFailure) as refused,
    ):
        send(peer(port), [o.path for o in objects], calling_ae_title="PACSAI")
    assert refused.value.permanent
    assert "accepts neither Label Map Segmentation Storage nor Segmentation Storage" in str(
        refused.value
    )
    assert list(folder.iterdir()) == []  # not the SR alone either


class _StowServer(ThreadingHTTPServer):
    """A STOW-RS endpoint (PS3.18 10.5) that refuses the Label Map Segmentation SOP Class, as
    a DICOMweb server that does not know it answers (409 with a Failed SOP Sequence, Failure
    Reason 0x0122 SOP Class Not Supported), and keeps every instance it accepts."""

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), _StowHandler)
        self.folder = folder
        self.requests: list[list[str]] = []  # SOP Class UIDs per request


class _StowHandler(BaseHTTPRequestHandler):
    server: _StowServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
        parts = [
            part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")
            for part in body.split(b"--" + boundary)
            if b"application/dicom" in part
        ]
        datasets = [pydicom.dcmread(BytesIO(part)) for part in parts]
        self.server.requests.append([str(ds.SOPClassUID) for ds in datasets])
        refused = [ds for ds in datasets if ds.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE]
        if refused:
            failed = [
                {
                    "00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                    "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
                    "00081197": {"vr": "US", "Value": [0x0122]},
                }
                for ds in refused
            ]
            answer, status = {"00081198": {"vr": "SQ", "Value": failed}}, 409
        else:
            for part, ds in zip(parts, datasets, strict=True):
                (self.server.folder / f"{ds.SOPInstanceUID}.dcm").write_bytes(part)
            answer, status = {}, 200
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        return


def test_a_stow_server_refusing_the_label_map_gets_the_binary_form(
    result: tuple[PhantomCase, list[WrittenObject]], tmp_path: Path
) -> None:
    case, objects = result
    seg, sr = objects
    server = _StowServer(tmp_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        destination = Destination(stow_url=url)
        receipt = send(
            Peer("web", destination, None, None), [seg.path, sr.path], calling_ae_title="PACSAI"
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert server.requests == [
        [LABEL_MAP_SEGMENTATION_STORAGE],  # alone first: refused, so no SR refers to it there
        [SegmentationStorage, "1.2.840.10008.5.1.4.1.1.88.34"],
    ]
    assert receipt.seg_type == "BINARY"
    got = received(tmp_path)
    assert got["SEG"].SOPInstanceUID == str(result_uid(seg.sop_instance_uid, "BINARY"))
    same_segmentation(got["SEG"], seg.path, case)
    references = {group["referenced_sop_instance_uid"] for group in read_measurements(got["SR"])}
    assert references == {got["SEG"].SOPInstanceUID}
