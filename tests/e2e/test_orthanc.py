"""pacsai beside a real PACS (Orthanc): studies pushed by Orthanc come back into the same study
as a SEG and an SR that reference the instances Orthanc holds and pass dciodvfy; results wait
for a stopped PACS and arrive exactly once; STOW-RS works the same way; real CT and MR too.

Orthanc 1.10 (Debian 12, built on DCMTK 3.6.7) does not know the Label Map Segmentation SOP
Class: over DICOM it refuses it unless ``UnknownSopClassAccepted`` is set, so a route's LABELMAP
SEG arrives there in its BINARY form (deflated: Orthanc accepts Deflated Explicit VR Little
Endian by default); with that option, or by STOW-RS (which does not check the SOP Class), it
arrives as the LABELMAP, JPEG-LS compressed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless

from pacsai.db import Delivery, DeliveryStatus, Job, JobStatus, Result, ResultObject
from pacsai.demo.orthanc import Orthanc, find_dicomweb_plugin
from pacsai.phantom import write_phantom
from pacsai.reporting import result_uid
from pacsai.reporting.sop_classes import LABEL_MAP_SEGMENTATION_STORAGE
from pacsai.scu import Target, push
from pacsai.service import Node
from tests.dicom_checks import dciodvfy, known_errors
from tests.support import REPO, db_rows, wait_for

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

TIMEOUT = 300.0  # a job on a busy CPU, with the models loading on first use

Contents = dict[str, list[dict[str, Any]]]


def _rows(node: Node, model: type[Any], *where: Any) -> list[Any]:
    return db_rows(node.database, model, *where)


def _settings(destination: dict[str, Any]) -> dict[str, Any]:
    return {
        "queue": {"local_workers": 1, "poll_seconds": 0.2},
        "inference": {"models_dir": str(REPO / "models"), "device": "cpu"},
        "destinations": {"pacs": destination},
    }


def _start(
    start_node: Callable[..., Node],
    make_orthanc: Callable[..., Orthanc],
    *,
    stow: bool = False,
    **destination: Any,
) -> tuple[Node, Orthanc]:
    """A node whose destination is an Orthanc that knows the node as modality PACSAI."""
    return _start_with(start_node, make_orthanc(), stow=stow, **destination)


def _start_with(
    start_node: Callable[..., Node], pacs: Orthanc, *, stow: bool = False, **destination: Any
) -> tuple[Node, Orthanc]:
    if stow:
        target = {"stow_url": f"{pacs.url}/dicom-web", **destination}
    else:
        target = {
            "ae_title": pacs.ae_title,
            "host": "127.0.0.1",
            "port": pacs.dicom_port,
            **destination,
        }
    node = start_node(**_settings(target))
    pacs.modalities["PACSAI"] = (node.settings.node.ae_title, "127.0.0.1", node.receiver.port)
    pacs.start()
    return node, pacs


def _send_through_orthanc(pacs: Orthanc, paths: list[Path]) -> None:
    """Upload ``paths`` to Orthanc (REST) and have Orthanc C-STORE their study to pacsai."""
    answers = pacs.upload_all(paths)
    assert {answer["Status"] for answer in answers} == {"Success"}
    studies = sorted({str(answer["ParentStudy"]) for answer in answers})
    answer = pacs.store_to("PACSAI", studies, synchronous=True)
    assert int(answer["InstancesCount"]) == len(paths), answer


def _written(node: Node) -> dict[str, str]:
    """Wait for the job; SOP Instance UID -> kind of each object it wrote (fails at once with
    the job's reason if it was skipped or failed)."""

    def finished() -> dict[str, str] | None:
        jobs = _rows(node, Job)
        for job in jobs:
            if job.status in (JobStatus.SKIPPED, JobStatus.FAILED):
                raise AssertionError(f"job {job.id} {job.status.value}: {job.reason}")
        if jobs and all(job.status is JobStatus.SUCCEEDED for job in jobs):
            return {o.sop_instance_uid: o.kind for o in _rows(node, ResultObject)} or None
        return None

    written: dict[str, str] = wait_for(finished, timeout=TIMEOUT, interval=0.25)
    return written


def _forms(written: dict[str, str]) -> dict[str, str]:
    """``written`` and the BINARY form of each object (sent where LABELMAP is not accepted)."""
    return {**written, **{str(result_uid(uid, "BINARY")): kind for uid, kind in written.items()}}


def _arrived(pacs: Orthanc, study_instance_uid: str, written: dict[str, str]) -> Contents:
    """Wait until Orthanc has every object in ``written``, in one of its forms, in the study;
    Modality -> instances."""

    def present() -> Contents | None:
        contents = pacs.study_contents(study_instance_uid)
        there = set().union(*map(_uids, contents.values()))
        arrived = all(uid in there or str(result_uid(uid, "BINARY")) in there for uid in written)
        return contents if arrived else None

    contents: Contents = wait_for(present, timeout=TIMEOUT, interval=0.25)
    return contents


def _uids(instances: list[dict[str, Any]]) -> set[str]:
    return {str(instance["MainDicomTags"]["SOPInstanceUID"]) for instance in instances}


def _referenced(tree: Any, key: str = "ReferencedSOPInstanceUID") -> Iterator[str]:
    """Every value of ``key`` (ReferencedSOPInstanceUID) anywhere in Orthanc's simplified tags."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            if name == key:
                yield str(value)
            else:
                yield from _referenced(value, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from _referenced(item, key)


def _check_seg(pacs: Orthanc, seg: dict[str, Any], series_uid: str, sources: set[str]) -> None:
    """The SEG names the source series, and every frame is derived from an instance Orthanc
    holds in it."""
    tags = pacs.instance_tags(seg["ID"])
    (referenced_series,) = tags["ReferencedSeriesSequence"]
    assert referenced_series["SeriesInstanceUID"] == series_uid
    listed = {
        str(item["ReferencedSOPInstanceUID"])
        for item in referenced_series["ReferencedInstanceSequence"]
    }
    assert listed and listed <= sources, listed - sources
    shared = (tags.get("SharedFunctionalGroupsSequence") or [{}])[0]
    derived = set()
    for frame in tags["PerFrameFunctionalGroupsSequence"]:
        (derivation,) = frame.get("DerivationImageSequence") or shared["DerivationImageSequence"]
        (source,) = derivation["SourceImageSequence"]
        derived.add(str(source["ReferencedSOPInstanceUID"]))
    assert len(tags["PerFrameFunctionalGroupsSequence"]) == int(tags["NumberOfFrames"])
    assert derived and derived <= sources, derived - sources
    assert derived <= listed


def _check_sr(
    pacs: Orthanc, sr: dict[str, Any], series_uid: str, sources: set[str], seg_uid: str | None
) -> None:
    """The SR's evidence is the source series (and the SEG, which its content tree cites with
    the source series, TID 1411; without a SEG the groups cite source images, TID 1501)."""
    tags = pacs.instance_tags(sr["ID"])
    evidence: dict[str, set[str]] = {}
    for study in tags["CurrentRequestedProcedureEvidenceSequence"]:
        for series in study["ReferencedSeriesSequence"]:
            evidence.setdefault(str(series["SeriesInstanceUID"]), set()).update(
                str(item["ReferencedSOPInstanceUID"]) for item in series["ReferencedSOPSequence"]
            )
    assert evidence.get(series_uid), evidence
    assert evidence[series_uid] <= sources, evidence[series_uid] - sources
    cited = set(_referenced(tags["ContentSequence"]))
    if seg_uid is None:
        assert set().union(*evidence.values()) <= sources
    else:
        assert {seg_uid} == set().union(*evidence.values()) - sources
        assert seg_uid in cited
        assert series_uid in set(_referenced(tags["ContentSequence"], "UID"))
        return
    assert cited & sources


def _conformant(pacs: Orthanc, instance: dict[str, Any], folder: Path) -> None:
    """The file as Orthanc serves it passes dciodvfy."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{instance['ID']}.dcm"
    path.write_bytes(pacs.instance_file(instance["ID"]))
    verification = dciodvfy(path)
    known = known_errors(path)
    assert not [error for error in verification.errors if error not in known], verification.report()


def _check_results(
    pacs: Orthanc,
    contents: Contents,
    written: dict[str, str],
    *,
    source_modality: str,
    series_uid: str,
    folder: Path,
) -> None:
    """One SEG (if written) and one SR in the study, referencing its sources, dciodvfy-clean."""
    kinds = sorted(written.values())
    written = _forms(written)
    assert sorted(contents) == sorted([source_modality, *kinds])
    assert {kind: len(contents[kind]) for kind in kinds} == dict.fromkeys(kinds, 1)
    sources = _uids(contents[source_modality])
    seg_uid = None
    if "SEG" in contents:
        (seg,) = contents["SEG"]
        seg_uid = str(seg["MainDicomTags"]["SOPInstanceUID"])
        assert written[seg_uid] == "SEG"
        _check_seg(pacs, seg, series_uid, sources)
        _conformant(pacs, seg, folder)
    (sr,) = contents["SR"]
    assert written[str(sr["MainDicomTags"]["SOPInstanceUID"])] == "SR"
    _check_sr(pacs, sr, series_uid, sources, seg_uid)
    _conformant(pacs, sr, folder)


@pytest.mark.parametrize(
    ("kind", "kinds"),
    [("ct", ["SEG", "SR"]), ("mr", ["SEG", "SR"]), ("cr", ["SR"])],
)
def test_phantom_results_come_back_into_the_same_study_in_orthanc(
    kind: str,
    kinds: list[str],
    start_node: Callable[..., Node],
    make_orthanc: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    study = write_phantom(kind, tmp_path / kind, seed=31)
    node, pacs = _start(start_node, make_orthanc)
    _send_through_orthanc(pacs, list(study.paths))

    written = _written(node)
    # A segmentation model that finds nothing writes no SEG; the demo models find something
    # in their own phantoms, however well or badly they are trained.
    assert sorted(written.values()) == kinds
    contents = _arrived(pacs, study.study_instance_uid, written)
    source_modality = str(dcmread(study.paths[0], stop_before_pixels=True).Modality)
    assert len(contents[source_modality]) == len(study.paths)
    _check_results(
        pacs,
        contents,
        written,
        source_modality=source_modality,
        series_uid=study.series_instance_uid,
        folder=tmp_path / "from-orthanc",
    )
    # Orthanc has the objects before the node has recorded the delivery's outcome.
    wait_for(lambda: [d.status for d in _rows(node, Delivery)] == [DeliveryStatus.SENT])
    (delivery,) = _rows(node, Delivery)
    assert delivery.seg_type == ("BINARY" if "SEG" in kinds else None)  # see the module's doc


def test_results_wait_for_a_stopped_orthanc_and_arrive_exactly_once(
    start_node: Callable[..., Node], make_orthanc: Callable[..., Orthanc], tmp_path: Path
) -> None:
    study = write_phantom("ct", tmp_path / "ct", seed=32)
    node, pacs = _start(
        start_node,
        make_orthanc,
        backoff_seconds=0.2,
        max_backoff_seconds=0.5,
        max_attempts=10_000,
    )
    pacs.upload(study.paths[0])  # something Orthanc must still have after its restart
    pacs.stop()
    target = Target(node.settings.node.ae_title, "127.0.0.1", node.receiver.port)
    assert push(study.paths, target).failed == 0

    def retrying() -> list[Delivery] | None:
        deliveries = _rows(node, Delivery)
        if deliveries and all(
            d.status is DeliveryStatus.RETRYING and d.attempts >= 2 for d in deliveries
        ):
            return deliveries
        return None

    (delivery,) = wait_for(retrying, timeout=TIMEOUT, interval=0.25)
    assert delivery.last_error and f"@127.0.0.1:{pacs.dicom_port}" in delivery.last_error
    assert delivery.kinds == "SEG,SR"

    pacs.start()  # same ports, same storage
    (delivery,) = wait_for(
        lambda: [d for d in _rows(node, Delivery) if d.status is DeliveryStatus.SENT] or None,
        timeout=60,
        interval=0.25,
    )
    assert delivery.attempts >= 3
    written = {o.sop_instance_uid: o.kind for o in _rows(node, ResultObject)}
    contents = _arrived(pacs, study.study_instance_uid, written)
    assert {modality: len(items) for modality, items in contents.items()} == {
        "CT": 1,  # uploaded before the stop: the storage survived the restart
        "SEG": 1,
        "SR": 1,
    }
    assert len(_rows(node, Delivery)) == 1
    assert _uids(contents["SEG"]) | _uids(contents["SR"]) <= set(_forms(written))


def test_results_arrive_by_stow_rs(
    start_node: Callable[..., Node], make_orthanc: Callable[..., Orthanc], tmp_path: Path
) -> None:
    if find_dicomweb_plugin() is None:
        pytest.skip(
            "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
        )
    study = write_phantom("ct", tmp_path / "ct", seed=33)
    node, pacs = _start(start_node, make_orthanc, stow=True)
    if pacs.dicomweb_url is None:
        pytest.skip(f"the DICOMweb plugin did not load; Orthanc's log ends:\n{pacs.log_tail()}")
    _send_through_orthanc(pacs, list(study.paths))

    written = _written(node)
    assert sorted(written.values()) == ["SEG", "SR"]
    contents = _arrived(pacs, study.study_instance_uid, written)
    _check_results(
        pacs,
        contents,
        written,
        source_modality="CT",
        series_uid=study.series_instance_uid,
        folder=tmp_path / "from-orthanc",
    )
    wait_for(lambda: [d.status for d in _rows(node, Delivery)] == [DeliveryStatus.SENT])
    (delivery,) = _rows(node, Delivery)
    assert delivery.seg_type == "LABELMAP"  # the DICOMweb plugin stores any SOP Class
    (seg,) = contents["SEG"]
    assert seg["MainDicomTags"]["SOPInstanceUID"] in written


class _OrthancTakingAnySopClass(Orthanc):
    def configuration(self) -> dict[str, Any]:
        config = super().configuration()
        config["UnknownSopClassAccepted"] = True
        return config


def test_an_orthanc_accepting_unknown_sop_classes_gets_the_labelmap_compressed(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    if not Orthanc.is_installed():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    study = write_phantom("ct", tmp_path / "ct", seed=34)
    pacs = _OrthancTakingAnySopClass(tmp_path / "orthanc", dicomweb=False)
    try:
        node, _ = _start_with(start_node, pacs)
        _send_through_orthanc(pacs, list(study.paths))
        written = _written(node)
        contents = _arrived(pacs, study.study_instance_uid, written)
        _check_results(
            pacs,
            contents,
            written,
            source_modality="CT",
            series_uid=study.series_instance_uid,
            folder=tmp_path / "from-orthanc",
        )
        (seg,) = contents["SEG"]
        stored = dcmread(BytesIO(pacs.instance_file(seg["ID"])), stop_before_pixels=True)
        wait_for(lambda: [d.status for d in _rows(node, Delivery)] == [DeliveryStatus.SENT])
    finally:
        pacs.stop()
    assert stored.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
    assert stored.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert str(stored.SOPInstanceUID) in written
    assert _rows(node, Delivery)[0].seg_type == "LABELMAP"


def _dicom_files(folder: Path) -> list[Path]:
    paths = []
    for path in sorted(folder.iterdir()):
        with path.open("rb") as handle:
            if handle.read(132)[128:] == b"DICM":
                paths.append(path)
    return paths


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("folder", "modality", "model"),
    [
        ("dcm_qa_ct/In/Philips/S21570/S2010", "CT", "ct_abdomen_demo"),
        ("dcm_qa_decubitus/In/HFS/3_t1_fl2d_sag", "MR", "mr_brain_lesion_demo"),
    ],
)
def test_real_series_through_orthanc_come_back_conformant(
    folder: str,
    modality: str,
    model: str,
    shared_dicom: Path,
    start_node: Callable[..., Node],
    make_orthanc: Callable[..., Orthanc],
    tmp_path: Path,
) -> None:
    paths = _dicom_files(shared_dicom / folder)
    header = dcmread(paths[0], stop_before_pixels=True)
    node, pacs = _start(start_node, make_orthanc)
    _send_through_orthanc(pacs, paths)

    written = _written(node)
    # On real images the demo models may find nothing (no SEG then); the SR is always written.
    assert "SR" in written.values()
    (result,) = _rows(node, Result)
    assert result.model_name == model
    assert result.series_instance_uid == str(header.SeriesInstanceUID)
    contents = _arrived(pacs, str(header.StudyInstanceUID), written)
    assert len(contents[modality]) == len(paths)
    _check_results(
        pacs,
        contents,
        written,
        source_modality=modality,
        series_uid=str(header.SeriesInstanceUID),
        folder=tmp_path / "from-orthanc",
    )
